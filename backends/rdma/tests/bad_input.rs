//! Every bad argument is a typed error and leaves the registry as it was.

mod common;

use common::*;
use notifier_core::RangeError;
use notifier_rdma::{Access, Advice, RegError, RegistryConfig};

const RW: Access = Access::LOCAL_RW;

#[test]
fn bad_ranges_are_typed_errors_and_change_nothing() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, RW).unwrap();
    let before = reg.stats();
    let top: u64 = !0xfff;
    for (start, len) in [(BASE, 0), (BASE + 1, 4096), (BASE, 4095), (top, 8192)] {
        // `get` takes any alignment (below); the others want pages.
        assert!(matches!(
            reg.register(start, len, RW),
            Err(RegError::Range(_))
        ));
        assert!(matches!(
            reg.invalidate(start, len),
            Err(RegError::Range(_))
        ));
        assert!(matches!(
            reg.advise(h, Advice::Prefetch, start, len),
            Err(RegError::Range(_))
        ));
    }
    assert!(matches!(
        reg.get(BASE, 0, RW),
        Err(RegError::Range(RangeError::Empty))
    ));
    assert!(matches!(
        reg.get(top, 8192, RW),
        Err(RegError::Range(RangeError::Wraps { .. }))
    ));
    assert_eq!(reg.stats(), before);
    assert_eq!(nic.stats().registrations, 1);
    reg.put(h).unwrap();
}

#[test]
fn get_takes_any_alignment_and_covers_the_pages_of_the_range() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    // A malloc-like pointer: 100 bytes from 16 bytes before a page boundary.
    let h = reg.get(BASE + 4096 - 16, 100, RW).unwrap();
    assert_eq!(reg.bounds(h).unwrap(), (BASE, BASE + 2 * 4096));
    // Any byte range inside those pages is a hit on the same region.
    let h2 = reg.get(BASE + 7, 8000, RW).unwrap();
    assert_eq!(h2, h);
    assert_eq!(reg.stats().hits, 1);
    assert_eq!(nic.stats().registrations, 1);
    // The last byte of the address space does not wrap.
    let top = u64::MAX - 10;
    assert!(matches!(
        reg.get(top, 5, RW),
        Err(RegError::Range(RangeError::Wraps { .. }))
    ));
    reg.put(h).unwrap();
    reg.put(h2).unwrap();
}

#[test]
fn invalid_access_combinations_are_rejected() {
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    for bad in [
        Access::REMOTE_WRITE,
        Access::REMOTE_ATOMIC | Access::LOCAL_READ,
        Access::from_bits(0x80),
    ] {
        // Even when a cached region would grant more, an invalid request is an error.
        assert!(matches!(
            reg.get(BASE, 64 * KIB, bad),
            Err(RegError::InvalidAccess(_))
        ));
        assert!(matches!(
            reg.register(BASE, 64 * KIB, bad),
            Err(RegError::InvalidAccess(_))
        ));
        assert!(matches!(
            reg.register_implicit(bad),
            Err(RegError::InvalidAccess(_))
        ));
    }
    reg.put(h).unwrap();
}

#[test]
fn stale_handles_double_puts_and_double_deregistrations_are_errors() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(h).unwrap();
    // Put without a get.
    assert!(matches!(reg.put(h), Err(RegError::PutWithoutGet)));
    // A cached region cannot be deregistered directly.
    assert!(matches!(reg.deregister(h), Err(RegError::NotRegistered)));
    // After invalidation the idle region is destroyed: its handle is stale.
    reg.invalidate(BASE, 64 * KIB).unwrap();
    assert!(matches!(reg.put(h), Err(RegError::StaleHandle)));
    assert!(matches!(reg.region(h), Err(RegError::StaleHandle)));

    let d = reg.register(BASE, 64 * KIB, RW).unwrap();
    assert!(matches!(reg.put(d), Err(RegError::PutWithoutGet)));
    reg.deregister(d).unwrap();
    assert!(matches!(reg.deregister(d), Err(RegError::NotRegistered)));
    // The registry still works and its books balance.
    let g = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(g).unwrap();
    let s = reg.stats();
    assert_eq!(s.registrations - s.deregistrations, 1);
    assert_eq!(nic.stats().registrations - nic.stats().deregistrations, 1);
}

#[test]
fn advice_outside_the_region_is_an_error() {
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let h = reg.get(BASE, 16 * KIB, RW).unwrap();
    assert!(matches!(
        reg.advise(h, Advice::Prefetch, BASE + 8 * KIB, 16 * KIB),
        Err(RegError::OutOfRegion { .. })
    ));
    reg.put(h).unwrap();
}

#[test]
fn a_registration_over_16_tib_is_too_large_and_evicts_nothing() {
    // One idle cached region that a merge would fold in, under a limit
    // that would make the merge evict.
    let cfg = RegistryConfig {
        max_regions: 1,
        ..Default::default()
    };
    let (_mm, nic, mut reg) = setup(16, 1 << 20, cfg);
    let h = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(h).unwrap();
    let before = reg.stats();
    let huge = (notifier_rdma::region::MAX_PAGES + 1) * 4096;
    // Overlapping the cached region: the merged range is too large.
    assert!(matches!(
        reg.get(BASE, huge, RW),
        Err(RegError::TooLarge { len }) if len == huge
    ));
    assert!(matches!(
        reg.register(BASE, huge, RW),
        Err(RegError::TooLarge { .. })
    ));
    assert_eq!(reg.stats(), before);
    assert_eq!(nic.stats().registrations, 1);
    // The cached region still serves hits; 16 TiB exactly is accepted.
    let again = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_eq!(again, h);
    reg.put(again).unwrap();
    let big = reg
        .register(BASE, notifier_rdma::region::MAX_PAGES * 4096, RW)
        .unwrap();
    assert_eq!(
        reg.bounds(big).unwrap(),
        (BASE, BASE + notifier_rdma::region::MAX_PAGES * 4096)
    );
    reg.deregister(big).unwrap();
}
