//! The ibverbs provider for real. Where the machine has no RDMA device
//! (no kernel RDMA: `ibv_get_device_list` fails with ENOSYS) opening must
//! return the typed no-device error, and nothing may crash.
#![cfg(feature = "ibverbs")]

mod common;

use notifier_rdma::ibverbs::Ibverbs;
use notifier_rdma::{Access, ProviderError, Registry, RegistryConfig};

#[test]
fn opening_without_a_device_is_a_typed_error_and_with_one_registers() {
    match Ibverbs::open(None) {
        Err(ProviderError::NoDevice(e)) => {
            eprintln!("SKIP: no RDMA device ({e}); the no-device path returned its typed error");
            assert!(e.raw_os_error().is_some(), "the cause carries the errno");
            assert!(!format!("{}", ProviderError::NoDevice(e)).is_empty());
        }
        Err(e) => panic!("unexpected error opening the device: {e:?}"),
        Ok(dev) => {
            // A real device: register a heap buffer of this process.
            let buf = vec![0u8; 64 * 1024 + 4096];
            let start = (buf.as_ptr() as u64 + 4095) & !4095;
            let mm = notifier_rdma::testing::ModelPrimary::new(1);
            let mut reg = Registry::new(&*mm, dev.clone(), RegistryConfig::default());
            let h = reg
                .get(start, 64 * 1024, Access::LOCAL_RW | Access::REMOTE_READ)
                .unwrap();
            assert_ne!(h.lkey(), 0);
            reg.put(h).unwrap();
            drop(reg);
            eprintln!("registered with {} (odp {})", dev.device_name(), dev.odp());
        }
    }
}

#[test]
fn a_named_device_that_does_not_exist_is_no_device() {
    assert!(matches!(
        Ibverbs::open(Some("no-such-device-0")),
        Err(ProviderError::NoDevice(_))
    ));
}
