//! Dirty tracking: KVM's dirty log, the mirror's write faults (including
//! soft-dirty write-protection) and VMM writes merge into one bitmap.

mod common;

use common::setup;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::DeviceView;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn guest_and_vmm_writes_appear_and_nothing_else() {
    let Some((_kvm, primary, mirror)) = setup("guest_and_vmm_writes_appear_and_nothing_else", 512)
    else {
        return;
    };
    primary.mmap_anon(0, 0x40000);
    mirror.add_region(0, 0x40000).unwrap();
    mirror.set_dirty_logging(0, true).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    // Pre-fault pages for read so some guest writes go straight to KVM.
    mirror.populate(0x10000, 0x4000, false).unwrap();
    for a in [0x10000u64, 0x11000, 0x12000, 0x13000, 0x20000] {
        g.read_u32(&mirror, a).unwrap();
    }
    let _ = mirror.dirty_log(0).unwrap(); // forget loading the program

    g.write_u32(&mirror, 0x10000, 1).unwrap(); // present, writable: KVM's log
    g.write_u32(&mirror, 0x30000, 2).unwrap(); // a hole: the mirror's write fault
    dev.write_obj(3u32, GuestAddress(0x12000)).unwrap(); // the VMM
    let d = mirror.dirty_log(0).unwrap();
    let dirty: Vec<u64> = d.iter().collect();
    assert_eq!(dirty, vec![0x10000, 0x12000, 0x30000], "{d:?}");
    assert!(
        !d.is_dirty(0x11000) && !d.is_dirty(0x20000),
        "read pages are clean"
    );
    assert_eq!(
        mirror.dirty_log(0).unwrap().count(),
        0,
        "reading the log clears it"
    );
}

#[test]
fn soft_dirty_write_protect_catches_the_next_guest_write() {
    let Some((_kvm, primary, mirror)) =
        setup("soft_dirty_write_protect_catches_the_next_guest_write", 512)
    else {
        return;
    };
    primary.mmap_anon(0, 0x20000);
    mirror.add_region(0, 0x20000).unwrap(); // no KVM dirty logging at all
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    for a in [0x8000u64, 0x9000, 0xa000] {
        g.write_u32(&mirror, a, 1).unwrap();
    }
    let _ = mirror.dirty_log(0).unwrap();
    primary.clear_soft_dirty(0x8000, 0x3000);
    let st = mirror.stats(0).unwrap();
    assert_eq!(st.write_protected, 3, "{st:?}");
    assert!(!mirror.translation(0x9000).unwrap().writable);
    // Reads keep working without an exit back to the mirror.
    assert_eq!(g.read_u32(&mirror, 0x8000).unwrap(), 1);
    g.write_u32(&mirror, 0x9000, 2).unwrap();
    let d = mirror.dirty_log(0).unwrap();
    assert_eq!(d.iter().collect::<Vec<_>>(), vec![0x9000]);
    assert_eq!(primary.read_u32(0x9000), 2);
}
