//! On-demand paging: NIC faults fill the MTT, the three prefetch advices,
//! and implicit ODP.

mod common;

use common::*;
use notifier_core::primary::Primary;
use notifier_rdma::{Access, Advice, DmaError, RegError, RegistryConfig};

#[test]
fn the_mtt_fills_on_nic_faults_only() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    assert_eq!(reg.region(h).unwrap().mr().mapped_pages(), 0);
    assert_eq!(mm.present_pages(), 0);
    nic.remote_write(h.rkey(), BASE + 4096 - 2, b"span")
        .unwrap(); // two pages
    let mr = reg.region(h).unwrap().mr();
    assert_eq!(mr.mapped_pages(), 2);
    assert_eq!(mr.translation(BASE).unwrap(), mm.lookup_page(BASE).unwrap());
    assert_eq!(nic.stats().faults, 2);
    let mut b = [0u8; 4];
    nic.local_read(h.lkey(), BASE + 4096 - 2, &mut b).unwrap();
    assert_eq!(&b, b"span");
    assert_eq!(nic.stats().faults, 2); // hits in the MTT
    reg.put(h).unwrap();
}

#[test]
fn a_read_fault_of_a_write_then_upgrades() {
    let (_mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::ALL).unwrap();
    reg.advise(h, Advice::PrefetchNoFault, BASE, 64 * KIB)
        .unwrap();
    let mut b = [0u8; 8];
    nic.local_read(h.lkey(), BASE, &mut b).unwrap();
    nic.local_write(h.lkey(), BASE, &b).unwrap();
    assert!(
        reg.region(h)
            .unwrap()
            .mr()
            .translation(BASE)
            .unwrap()
            .writable
    );
    reg.put(h).unwrap();
}

#[test]
fn prefetch_faults_every_page_in() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, Access::LOCAL_READ).unwrap();
    reg.advise(h, Advice::Prefetch, BASE, 32 * KIB).unwrap();
    assert_eq!(reg.region(h).unwrap().mr().mapped_pages(), 8);
    assert_eq!(mm.present_pages(), 8);
    let faults = nic.stats().faults;
    let mut b = [0u8; 8];
    nic.local_read(h.lkey(), BASE + 28 * KIB, &mut b).unwrap();
    assert_eq!(nic.stats().faults, faults);
    reg.put(h).unwrap();
}

#[test]
fn prefetch_write_needs_a_writable_region_and_maps_writable() {
    let (_mm, nic, mut reg) = setup(64, 1 << 20, RegistryConfig::default());
    let ro = reg
        .get(BASE, 64 * KIB, Access::LOCAL_READ | Access::REMOTE_READ)
        .unwrap();
    assert!(matches!(
        reg.advise(ro, Advice::PrefetchWrite, BASE, 4096),
        Err(RegError::PermissionDenied)
    ));
    assert_eq!(reg.region(ro).unwrap().mr().mapped_pages(), 0);
    let rw = reg
        .get(BASE + 128 * KIB, 64 * KIB, Access::LOCAL_RW)
        .unwrap();
    reg.advise(rw, Advice::PrefetchWrite, BASE + 128 * KIB, 16 * KIB)
        .unwrap();
    let mr = reg.region(rw).unwrap().mr();
    assert_eq!(mr.mapped_pages(), 4);
    assert!(mr.translation(BASE + 128 * KIB).unwrap().writable);
    let faults = nic.stats().faults;
    nic.local_write(rw.lkey(), BASE + 128 * KIB, b"no fault")
        .unwrap();
    assert_eq!(nic.stats().faults, faults);
    reg.put(ro).unwrap();
    reg.put(rw).unwrap();
}

#[test]
fn prefetch_no_fault_maps_only_present_pages() {
    let (mm, _nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    mm.fault_page(BASE + 8 * KIB, true).unwrap();
    mm.fault_page(BASE + 20 * KIB, false).unwrap();
    let h = reg.get(BASE, 64 * KIB, Access::LOCAL_RW).unwrap();
    reg.advise(h, Advice::PrefetchNoFault, BASE, 64 * KIB)
        .unwrap();
    let mr = reg.region(h).unwrap().mr();
    assert_eq!(mr.mapped_pages(), 2);
    assert_eq!(mm.present_pages(), 2); // nothing faulted
    assert!(mr.translation(BASE + 8 * KIB).is_some());
    assert!(mr.translation(BASE + 20 * KIB).is_some());
    reg.put(h).unwrap();
}

#[test]
fn prefetch_of_unmapped_memory_or_an_invalidated_region_is_an_error() {
    let (mm, _nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let h = reg
        .get(BASE + 128 * KIB, 64 * KIB, Access::LOCAL_RW)
        .unwrap();
    assert!(matches!(
        reg.advise(h, Advice::Prefetch, BASE + 128 * KIB, 4096),
        Err(RegError::Fault(_))
    ));
    // NO_FAULT of unmapped memory maps nothing, and is no error.
    reg.advise(h, Advice::PrefetchNoFault, BASE + 128 * KIB, 4096)
        .unwrap();
    let g = reg.get(BASE, 64 * KIB, Access::LOCAL_RW).unwrap();
    mm.munmap(BASE, 64 * KIB).unwrap();
    for a in Advice::ALL {
        assert!(matches!(
            reg.advise(g, a, BASE, 4096),
            Err(RegError::Invalidated)
        ));
    }
    reg.put(g).unwrap();
    reg.put(h).unwrap();
}

#[test]
fn implicit_odp_covers_the_address_space_lazily_and_survives_unmaps() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    mm.mmap(0x7f00_0000_0000, 64 * KIB, true).unwrap();
    let imp = reg.register_implicit(Access::ALL).unwrap();
    assert_eq!(reg.region(imp).unwrap().mr().mapped_pages(), 0);
    nic.remote_write(imp.rkey(), BASE + 100, b"low").unwrap();
    nic.remote_write(imp.rkey(), 0x7f00_0000_0000, b"high")
        .unwrap();
    assert_eq!(reg.region(imp).unwrap().mr().mapped_pages(), 2);
    // Unmap: translations drop, the registration stays.
    mm.munmap(BASE, 64 * KIB).unwrap();
    assert!(reg.region(imp).unwrap().is_valid());
    assert_eq!(reg.region(imp).unwrap().mr().mapped_pages(), 1);
    let mut b = [0u8; 3];
    assert!(matches!(
        nic.remote_read(imp.rkey(), BASE + 100, &mut b),
        Err(DmaError::Fault(_))
    ));
    // Memory re-created there is reached by faulting anew: fresh zeros.
    mm.mmap(BASE, 64 * KIB, true).unwrap();
    nic.remote_read(imp.rkey(), BASE + 100, &mut b).unwrap();
    assert_eq!(b, [0; 3]);
    reg.advise(imp, Advice::PrefetchNoFault, 0x7f00_0000_0000, 64 * KIB)
        .unwrap();
    reg.advise(imp, Advice::Prefetch, BASE, 64 * KIB).unwrap();
    assert_eq!(reg.region(imp).unwrap().mr().mapped_pages(), 17);
    reg.deregister(imp).unwrap();
    assert!(matches!(reg.deregister(imp), Err(RegError::NotRegistered)));
}
