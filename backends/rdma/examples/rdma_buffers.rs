//! An application's view: register buffers through the cache, move data
//! with the software NIC, free and reallocate the buffers at the same
//! addresses, and show that the registry never serves a stale registration.
//!
//! The primary is the crate's model primary for now; the userfaultfd
//! backend's real process memory plugs into the same `Primary` trait.
//!
//! `cargo run -p notifier-rdma --example rdma_buffers`

use notifier_rdma::testing::ModelPrimary;
use notifier_rdma::{Access, DmaError, Registry, RegistryConfig, SoftNic};

const BUF: u64 = 64 * 1024;
const BASE: u64 = 0x7f00_0000_0000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mm = ModelPrimary::new(1024);
    let nic = SoftNic::new(mm.clone());
    let mut reg = Registry::new(
        &*mm,
        nic.clone(),
        RegistryConfig {
            max_regions: 64,
            ..Default::default()
        },
    );
    let access = Access::LOCAL_RW | Access::REMOTE_READ | Access::REMOTE_WRITE;
    let addr = |i: u64| BASE + i * 2 * BUF;

    // Allocate four buffers and register them (misses), then reuse them (hits).
    for i in 0..4 {
        mm.mmap(addr(i), BUF, true)?;
    }
    let mut old_keys = Vec::new();
    for round in 0..2 {
        for i in 0..4 {
            let h = reg.get(addr(i), BUF, access)?;
            let msg = format!("buffer {i} round {round}");
            // A remote peer writes into the buffer; we read it back locally.
            nic.remote_write(h.rkey(), addr(i) + 64, msg.as_bytes())?;
            let mut back = vec![0u8; msg.len()];
            nic.local_read(h.lkey(), addr(i) + 64, &mut back)?;
            assert_eq!(back, msg.as_bytes());
            if round == 1 {
                old_keys.push(h);
            }
            reg.put(h)?;
        }
    }
    println!("after two rounds: {:?}", reg.stats());

    // Free the buffers and allocate new ones at the very same addresses.
    for i in 0..4 {
        mm.munmap(addr(i), BUF)?;
        mm.mmap(addr(i), BUF, true)?;
    }
    for (i, old) in old_keys.iter().enumerate() {
        let i = i as u64;
        // The old rkey is dead: a late remote write cannot land anywhere.
        match nic.remote_write(old.rkey(), addr(i) + 64, b"late write") {
            Err(DmaError::UnknownKey(_) | DmaError::Invalidated(_)) => {}
            other => panic!("stale rkey was served: {other:?}"),
        }
        // A get registers anew and sees the new, zeroed memory.
        let h = reg.get(addr(i), BUF, access)?;
        assert_ne!(h.rkey(), old.rkey(), "stale registration served");
        let mut b = [0xffu8; 10];
        nic.remote_read(h.rkey(), addr(i) + 64, &mut b)?;
        assert_eq!(b, [0u8; 10], "new buffer must not show the old data");
        reg.put(h)?;
    }
    let s = reg.stats();
    println!("after free + reallocate: {s:?}");
    assert_eq!(s.invalidations, 4);
    println!(
        "no stale registration served; {} NIC faults, {} page accesses",
        nic.stats().faults,
        nic.stats().page_accesses
    );
    Ok(())
}
