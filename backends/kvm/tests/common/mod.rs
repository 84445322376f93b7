//! Shared helpers of the KVM integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use kvm_ioctls::Kvm;
pub use notifier_kvm::testing::TestPrimary;
use notifier_kvm::{KvmMirror, MemfdFrames};

/// `/dev/kvm`, or a visible skip (a failure with NOTIFIER_REQUIRE_KVM=1).
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            if std::env::var("NOTIFIER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm required (NOTIFIER_REQUIRE_KVM=1) but unavailable: {e}");
            }
            eprintln!("SKIP: {test}: /dev/kvm unavailable: {e}");
            None
        }
    }
}

/// A VM with a mirror of a fresh test primary over `frames` memfd frames.
pub fn setup(test: &str, frames: usize) -> Option<(Kvm, Arc<TestPrimary>, KvmMirror<TestPrimary>)> {
    let kvm = kvm_or_skip(test)?;
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let store = Arc::new(MemfdFrames::new(0x1000, frames).unwrap());
    let primary = TestPrimary::new(store.clone());
    let max = kvm.get_nr_memslots() as u32;
    let mirror = KvmMirror::new(vm, primary.clone(), store, max);
    Some((kvm, primary, mirror))
}
