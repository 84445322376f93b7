//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use notifier_rdma::testing::ModelPrimary;
use notifier_rdma::{Registry, RegistryConfig, SoftNic};

pub const KIB: u64 = 1024;
pub const BASE: u64 = 0x4000_0000;

/// A model primary with `frames` frames and one writable area of `len`
/// bytes at [`BASE`], a software NIC and a registry over both.
pub fn setup(
    frames: usize,
    len: u64,
    cfg: RegistryConfig,
) -> (Arc<ModelPrimary>, SoftNic, Registry<SoftNic>) {
    let mm = ModelPrimary::new(frames);
    mm.mmap(BASE, len, true).unwrap();
    let nic = SoftNic::new(mm.clone());
    let reg = Registry::new(&*mm, nic.clone(), cfg);
    (mm, nic, reg)
}
