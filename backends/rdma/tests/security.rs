//! Access rights on every DMA, dead keys, and bounds.

mod common;

use common::*;
use notifier_core::primary::PrimaryFault;
use notifier_rdma::{Access, DmaError, RegistryConfig};

#[test]
fn no_write_through_a_read_only_registration() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg
        .get(BASE, 64 * KIB, Access::LOCAL_READ | Access::REMOTE_READ)
        .unwrap();
    assert!(matches!(
        nic.local_write(h.lkey(), BASE, b"w"),
        Err(DmaError::AccessDenied { .. })
    ));
    assert!(matches!(
        nic.remote_write(h.rkey(), BASE, b"w"),
        Err(DmaError::AccessDenied { .. })
    ));
    assert!(matches!(
        nic.remote_fetch_add(h.rkey(), BASE, 1),
        Err(DmaError::AccessDenied { .. })
    ));
    let mut b = [0u8; 1];
    nic.local_read(h.lkey(), BASE, &mut b).unwrap();
    nic.remote_read(h.rkey(), BASE, &mut b).unwrap();
    reg.put(h).unwrap();
}

#[test]
fn no_remote_access_without_remote_flags() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::LOCAL_RW).unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(
        nic.remote_read(h.rkey(), BASE, &mut b),
        Err(DmaError::AccessDenied { .. })
    ));
    assert!(matches!(
        nic.remote_write(h.rkey(), BASE, &b),
        Err(DmaError::AccessDenied { .. })
    ));
    nic.local_write(h.lkey(), BASE, b"local ok").unwrap();
    reg.put(h).unwrap();
    // Remote write without remote atomic: no atomics.
    let h = reg
        .get(
            BASE + 128 * KIB,
            64 * KIB,
            Access::LOCAL_RW | Access::REMOTE_WRITE,
        )
        .unwrap();
    assert!(matches!(
        nic.remote_fetch_add(h.rkey(), BASE + 128 * KIB, 1),
        Err(DmaError::AccessDenied { .. })
    ));
    reg.put(h).unwrap();
}

#[test]
fn keys_are_bound_to_their_initiator() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        nic.remote_read(h.lkey(), BASE, &mut b),
        Err(DmaError::WrongKeyKind(h.lkey()))
    );
    assert_eq!(
        nic.local_read(h.rkey(), BASE, &mut b),
        Err(DmaError::WrongKeyKind(h.rkey()))
    );
    reg.put(h).unwrap();
}

#[test]
fn keys_of_invalidated_or_deregistered_regions_and_unknown_keys_are_rejected() {
    let (mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let mut b = [0u8; 8];
    assert_eq!(
        nic.remote_read(0, BASE, &mut b),
        Err(DmaError::UnknownKey(0))
    );
    assert_eq!(
        nic.remote_read(0xdead_beef, BASE, &mut b),
        Err(DmaError::UnknownKey(0xdead_beef))
    );
    // Deregistered: unknown, and never reissued to a later region.
    let d = reg.register(BASE, 64 * KIB, Access::ALL).unwrap();
    reg.deregister(d).unwrap();
    assert_eq!(
        nic.remote_read(d.rkey(), BASE, &mut b),
        Err(DmaError::UnknownKey(d.rkey()))
    );
    for _ in 0..300 {
        let x = reg.register(BASE, 64 * KIB, Access::ALL).unwrap();
        assert_ne!(x.rkey(), d.rkey());
        reg.deregister(x).unwrap();
    }
    // Invalidated while held: rejected until and after the last put.
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    mm.munmap(BASE, 64 * KIB).unwrap();
    assert_eq!(
        nic.remote_read(h.rkey(), BASE, &mut b),
        Err(DmaError::Invalidated(h.rkey()))
    );
    reg.put(h).unwrap();
    assert_eq!(
        nic.remote_read(h.rkey(), BASE, &mut b),
        Err(DmaError::UnknownKey(h.rkey()))
    );
}

#[test]
fn memory_outside_a_registration_is_never_reachable() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE + 64 * KIB, 64 * KIB, Access::ALL).unwrap();
    let mut b = [0u8; 16];
    let lo = BASE + 64 * KIB;
    let hi = BASE + 128 * KIB;
    assert!(matches!(
        nic.remote_read(h.rkey(), lo - 8, &mut b),
        Err(DmaError::OutOfBounds { .. })
    ));
    assert!(matches!(
        nic.remote_read(h.rkey(), hi - 8, &mut b),
        Err(DmaError::OutOfBounds { .. })
    ));
    assert!(matches!(
        nic.remote_write(h.rkey(), hi, &b),
        Err(DmaError::OutOfBounds { .. })
    ));
    assert!(matches!(
        nic.remote_read(h.rkey(), u64::MAX - 4, &mut b),
        Err(DmaError::OutOfBounds { .. })
    ));
    assert!(matches!(
        nic.remote_fetch_add(h.rkey(), hi, 1),
        Err(DmaError::OutOfBounds { .. })
    ));
    assert!(matches!(
        nic.remote_read(h.rkey(), lo, &mut []),
        Err(DmaError::OutOfBounds { .. })
    ));
    // The last bytes inside are fine, across a page boundary too.
    nic.remote_write(h.rkey(), hi - 16, &b).unwrap();
    nic.remote_write(h.rkey(), lo + 4096 - 8, &b).unwrap();
    reg.put(h).unwrap();
}

#[test]
fn atomics_are_aligned_and_really_atomic() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    assert_eq!(
        nic.remote_fetch_add(h.rkey(), BASE + 4, 1),
        Err(DmaError::Misaligned(BASE + 4))
    );
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    nic.remote_fetch_add(h.rkey(), BASE + 8, 1).unwrap();
                }
            });
        }
    });
    assert_eq!(nic.remote_fetch_add(h.rkey(), BASE + 8, 0).unwrap(), 4000);
    reg.put(h).unwrap();
}

#[test]
fn a_writable_registration_cannot_write_read_only_memory() {
    let (mm, nic, mut reg) = setup(16, 64 * KIB, RegistryConfig::default());
    mm.mmap(BASE + 128 * KIB, 64 * KIB, false).unwrap();
    let h = reg.get(BASE + 128 * KIB, 64 * KIB, Access::ALL).unwrap();
    let mut b = [0u8; 8];
    nic.remote_read(h.rkey(), BASE + 128 * KIB, &mut b).unwrap();
    assert_eq!(
        nic.remote_write(h.rkey(), BASE + 128 * KIB, &b),
        Err(DmaError::Fault(PrimaryFault::Permission(BASE + 128 * KIB)))
    );
    // Unmapped memory inside a registration: the NIC fault fails cleanly.
    let u = reg.get(BASE + 512 * KIB, 64 * KIB, Access::ALL).unwrap();
    assert!(matches!(
        nic.remote_read(u.rkey(), BASE + 512 * KIB, &mut b),
        Err(DmaError::Fault(PrimaryFault::NoMapping(_)))
    ));
    reg.put(h).unwrap();
    reg.put(u).unwrap();
}
