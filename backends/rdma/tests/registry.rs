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
    let b = reg.get(BASE + 16 * KIB, 8 * KIB, RW).unwrap();
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
fn a_request_for_other_rights_displaces_without_merging_and_gets_exactly_its_rights() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 16 * KIB, Access::LOCAL_READ).unwrap();
    let b = reg
        .get(BASE, 8 * KIB, Access::LOCAL_RW | Access::REMOTE_WRITE)
        .unwrap();
    // Not merged: the new region has its own range and exactly its rights.
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 8 * KIB));
    assert_eq!(
        reg.region(b).unwrap().access(),
        Access::LOCAL_RW | Access::REMOTE_WRITE
    );
    assert_eq!(reg.stats().merges, 0);
    // The displaced region still serves its holder with its own rights.
    assert!(reg.region(a).unwrap().is_valid());
    assert_eq!(reg.region(a).unwrap().access(), Access::LOCAL_READ);
    reg.put(a).unwrap();
    reg.put(b).unwrap();
    // A narrow request is not served by the wider region.
    let c = reg.get(BASE, 16 * KIB, Access::LOCAL_READ).unwrap();
    assert_ne!(c, b);
    assert_eq!(reg.region(c).unwrap().access(), Access::LOCAL_READ);
    assert!(nic.local_write(c.lkey(), BASE, b"w").is_err());
    reg.put(c).unwrap();
}

#[test]
fn a_read_only_remote_request_next_to_an_all_region_never_gets_remote_write() {
    let (_mm, nic, mut reg) = setup(16, 1 << 20, RegistryConfig::default());
    let all = reg.get(BASE, 16 * KIB, Access::ALL).unwrap();
    let ro = Access::LOCAL_READ | Access::REMOTE_READ;
    // Adjacent and overlapping requests alike.
    for (start, len) in [(BASE + 16 * KIB, 16 * KIB), (BASE + 8 * KIB, 16 * KIB)] {
        let h = reg.get(start, len, ro).unwrap();
        assert_eq!(reg.region(h).unwrap().access(), ro);
        assert!(matches!(
            nic.remote_write(h.rkey(), start, b"x"),
            Err(notifier_rdma::DmaError::AccessDenied { .. })
        ));
        assert!(matches!(
            nic.remote_fetch_add(h.rkey(), start, 1),
            Err(notifier_rdma::DmaError::AccessDenied { .. })
        ));
        let mut buf = [0u8; 4];
        nic.remote_read(h.rkey(), start, &mut buf).unwrap();
        reg.put(h).unwrap();
    }
    reg.put(all).unwrap();
}

#[test]
fn a_handle_of_another_registry_is_a_typed_error() {
    let (_mm, _nic, mut a) = setup(16, 1 << 20, RegistryConfig::default());
    let (_mm2, _nic2, mut b) = setup(16, 1 << 20, RegistryConfig::default());
    let ha = a.get(BASE, 16 * KIB, RW).unwrap();
    let hb = b.get(BASE, 16 * KIB, RW).unwrap();
    assert!(matches!(a.put(hb), Err(RegError::ForeignHandle)));
    assert!(matches!(a.bounds(hb), Err(RegError::ForeignHandle)));
    assert!(matches!(b.region(ha), Err(RegError::ForeignHandle)));
    // Nothing changed: both still hold their own reference.
    a.put(ha).unwrap();
    b.put(hb).unwrap();
    assert!(matches!(a.put(ha), Err(RegError::PutWithoutGet)));
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
