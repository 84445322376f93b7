//! The cache rules: hits, covering lookups, merging, limits with LRU
//! eviction, direct registrations, statistics.

mod common;

use common::*;
use notifier_rdma::{Access, RegError, RegistryConfig};

const RW: Access = Access::LOCAL_RW;

#[test]
fn second_get_of_a_range_is_a_hit_with_the_same_keys() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(a).unwrap();
    let b = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_eq!((a.lkey(), a.rkey()), (b.lkey(), b.rkey()));
    reg.put(b).unwrap();
    let s = reg.stats();
    assert_eq!(
        (s.hits, s.misses, s.registrations, s.cached_regions),
        (1, 1, 1, 1)
    );
    assert_eq!(nic.stats().registrations, 1);
}

#[test]
fn a_covered_subrange_hits_the_covering_region() {
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    let b = reg
        .get(BASE + 16 * KIB, 8 * KIB, Access::LOCAL_READ)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 64 * KIB));
    reg.put(a).unwrap();
    reg.put(b).unwrap();
    assert_eq!(reg.stats().hits, 1);
}

#[test]
fn overlapping_requests_merge_into_one_region() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 16 * KIB, RW).unwrap();
    reg.put(a).unwrap();
    let b = reg.get(BASE + 8 * KIB, 16 * KIB, RW).unwrap();
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 24 * KIB));
    assert_ne!(a.lkey(), b.lkey());
    reg.put(b).unwrap();
    let s = reg.stats();
    assert_eq!(
        (s.merges, s.cached_regions, s.cached_bytes),
        (1, 1, 24 * KIB)
    );
    // The idle merged-away region was deregistered at once.
    assert_eq!(nic.stats().deregistrations, 1);
    assert!(matches!(reg.put(a), Err(RegError::StaleHandle)));
}

#[test]
fn adjacent_requests_merge_and_a_spanning_request_folds_several() {
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 8 * KIB, RW).unwrap();
    let b = reg.get(BASE + 8 * KIB, 8 * KIB, RW).unwrap();
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 16 * KIB));
    let c = reg.get(BASE + 64 * KIB, 8 * KIB, RW).unwrap();
    let d = reg.get(BASE + 12 * KIB, 56 * KIB, RW).unwrap();
    assert_eq!(reg.bounds(d).unwrap(), (BASE, BASE + 72 * KIB));
    assert_eq!(reg.stats().merges, 3);
    assert_eq!(reg.stats().cached_regions, 1);
    // Busy merged-away regions stay valid for their holders until the last put.
    for h in [a, b, c, d] {
        reg.put(h).unwrap();
    }
    assert_eq!(reg.stats().registrations - reg.stats().deregistrations, 1);
}

#[test]
fn a_request_for_wider_access_replaces_the_region_with_widened_access() {
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 16 * KIB, Access::LOCAL_READ).unwrap();
    reg.put(a).unwrap();
    let b = reg
        .get(BASE, 8 * KIB, Access::LOCAL_RW | Access::REMOTE_WRITE)
        .unwrap();
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 16 * KIB));
    assert_eq!(
        reg.region(b).unwrap().access(),
        Access::LOCAL_RW | Access::REMOTE_WRITE
    );
    reg.put(b).unwrap();
    // And the widened region now serves the narrow request.
    let c = reg.get(BASE, 16 * KIB, Access::LOCAL_READ).unwrap();
    assert_eq!(c, b);
    reg.put(c).unwrap();
    assert_eq!(reg.stats().merges, 1);
}

#[test]
fn the_region_limit_evicts_the_least_recently_used_idle_region() {
    let cfg = RegistryConfig {
        max_regions: 3,
        ..RegistryConfig::default()
    };
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, cfg);
    let addr = |i: u64| BASE + i * 128 * KIB;
    let mut hs = Vec::new();
    for i in 0..3 {
        let h = reg.get(addr(i), 64 * KIB, RW).unwrap();
        reg.put(h).unwrap();
        hs.push(h);
    }
    // Touch region 0: region 1 becomes the least recently used.
    let h0 = reg.get(addr(0), 64 * KIB, RW).unwrap();
    reg.put(h0).unwrap();
    let h3 = reg.get(addr(3), 64 * KIB, RW).unwrap();
    reg.put(h3).unwrap();
    let s = reg.stats();
    assert_eq!((s.evictions, s.cached_regions), (1, 3));
    assert!(matches!(reg.put(hs[1]), Err(RegError::StaleHandle)));
    // 0 and 2 are still cached: hits.
    let before = reg.stats().misses;
    for i in [0, 2] {
        let h = reg.get(addr(i), 64 * KIB, RW).unwrap();
        reg.put(h).unwrap();
    }
    assert_eq!(reg.stats().misses, before);
}

#[test]
fn the_byte_limit_evicts_idle_regions_but_never_busy_ones() {
    let cfg = RegistryConfig {
        max_bytes: 128 * KIB,
        ..RegistryConfig::default()
    };
    let (_mm, _nic, mut reg) = setup(16, 1 << 20, cfg);
    let a = reg.get(BASE, 64 * KIB, RW).unwrap(); // held
    let b = reg.get(BASE + 128 * KIB, 64 * KIB, RW).unwrap();
    reg.put(b).unwrap();
    let c = reg.get(BASE + 256 * KIB, 64 * KIB, RW).unwrap();
    assert_eq!(reg.stats().evictions, 1);
    assert!(reg.region(a).unwrap().is_valid());
    // Both remaining regions are busy: no room for a fourth.
    let before = reg.stats();
    assert!(matches!(
        reg.get(BASE + 384 * KIB, 64 * KIB, RW),
        Err(RegError::LimitExceeded)
    ));
    assert_eq!(reg.stats().cached_regions, before.cached_regions);
    assert_eq!(reg.stats().registrations, before.registrations);
    reg.put(a).unwrap();
    reg.put(c).unwrap();
    let d = reg.get(BASE + 384 * KIB, 64 * KIB, RW).unwrap();
    reg.put(d).unwrap();
    // Eviction goes down to 15/16 of the limit, in LRU order (a, then c).
    let s = reg.stats();
    assert!(s.cached_bytes <= 128 * KIB);
    assert_eq!(s.evictions, 3);
    assert!(reg.region(d).unwrap().is_valid());
}

#[test]
fn direct_registrations_are_not_cached() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let d = reg.register(BASE, 64 * KIB, RW).unwrap();
    let g = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(d.lkey(), g.lkey());
    reg.put(g).unwrap();
    reg.deregister(d).unwrap();
    assert_eq!(nic.stats().deregistrations, 1);
    assert_eq!(reg.stats().cached_regions, 1);
}

#[test]
fn dropping_the_registry_deregisters_everything() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    for i in 0..10 {
        let h = reg.get(BASE + i * 128 * KIB, 64 * KIB, RW).unwrap();
        if i % 2 == 0 {
            reg.put(h).unwrap();
        }
    }
    reg.register(BASE, 4 * KIB, RW).unwrap();
    drop(reg);
    let s = nic.stats();
    assert_eq!((s.registrations, s.deregistrations), (11, 11));
}
