//! Memslot management through the mirror: add, remove, move, resize, KVM's
//! errors as typed errors, failed updates that leave the layout intact, and
//! the slot limit.

mod common;

use common::setup;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{KvmError, RegionInfo};

#[test]
fn overlap_and_bad_flags_are_typed_errors_and_change_nothing() {
    let Some((_kvm, primary, mirror)) = setup(
        "overlap_and_bad_flags_are_typed_errors_and_change_nothing",
        256,
    ) else {
        return;
    };
    primary.mmap_anon(0, 0x10_0000);
    mirror.add_region(0, 0x10000).unwrap();
    let before = (mirror.regions(), mirror.slots_used());
    let e = mirror.add_region(0x8000, 0x10000).unwrap_err();
    assert!(
        matches!(
            e,
            KvmError::Overlap {
                gpa: 0x8000,
                len: 0x10000
            }
        ),
        "{e:?}"
    );
    let e = mirror
        .add_region_at(0x20000, 0x20000, 0x1000, 1 << 7)
        .unwrap_err();
    assert!(matches!(e, KvmError::InvalidSlot { .. }), "{e:?}");
    assert!(matches!(
        mirror.add_region(0x20001, 0x1000),
        Err(KvmError::Range(_))
    ));
    assert!(matches!(
        mirror.add_region(0x20000, 0),
        Err(KvmError::Range(_))
    ));
    assert!(matches!(
        mirror.remove_region(0x5000),
        Err(KvmError::NoRegion(0x5000))
    ));
    assert_eq!(
        (mirror.regions(), mirror.slots_used()),
        before,
        "layout unchanged"
    );
    // The surviving region still works.
    primary.write(0x4000, &9u32.to_le_bytes());
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x4000).unwrap(), 9);
}

#[test]
fn move_resize_remove_and_failed_updates() {
    let Some((_kvm, primary, mirror)) = setup("move_resize_remove_and_failed_updates", 256) else {
        return;
    };
    primary.mmap_anon(0, 0x10_0000);
    let a = mirror.add_region(0, 0x10000).unwrap();
    let b = mirror.add_region(0x20000, 0x10000).unwrap();
    assert_ne!(a.slot, b.slot);
    primary.write(0x20100, &0xb0b0_0001u32.to_le_bytes());
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x20100).unwrap(), 0xb0b0_0001);

    // Move B in place: the guest finds B's memory at the new gpa.
    let moved = mirror.move_region(0x20000, 0x40000).unwrap();
    assert_eq!(moved, RegionInfo { gpa: 0x40000, ..b });
    assert_eq!(g.read_u32(&mirror, 0x40100).unwrap(), 0xb0b0_0001);
    assert!(
        g.read_u32(&mirror, 0x20100).is_err(),
        "nothing at the old gpa"
    );
    let mut g = RealModeGuest::new(&mirror, 1).unwrap();

    // A move onto A fails and leaves B where it was.
    let layout = mirror.regions();
    assert!(matches!(
        mirror.move_region(0x40000, 0x8000),
        Err(KvmError::Overlap { .. })
    ));
    assert_eq!(mirror.regions(), layout);
    assert_eq!(g.read_u32(&mirror, 0x40100).unwrap(), 0xb0b0_0001);

    // Resize A over B fails (delete + re-add): the old slot is restored.
    primary.write(0x100, &0xa0a0_0001u32.to_le_bytes());
    assert!(matches!(
        mirror.resize_region(0, 0x50000),
        Err(KvmError::Overlap { .. })
    ));
    assert_eq!(mirror.regions(), layout);
    assert_eq!(g.read_u32(&mirror, 0x100).unwrap(), 0xa0a0_0001);

    // Resize A to grow (no overlap): the new tail is reachable.
    primary.write(0x18000, &0xa0a0_0002u32.to_le_bytes());
    let grown = mirror.resize_region(0, 0x20000).unwrap();
    assert_eq!((grown.len, grown.slot), (0x20000, a.slot));
    assert_eq!(g.read_u32(&mirror, 0x18000).unwrap(), 0xa0a0_0002);
    assert_eq!(g.read_u32(&mirror, 0x100).unwrap(), 0xa0a0_0001);

    // Remove B: its slot id is reused by the next region.
    mirror.remove_region(0x40000).unwrap();
    let c = mirror.add_region(0x60000, 0x1000).unwrap();
    assert_eq!(c.slot, b.slot);
    assert_eq!(mirror.slots_used().0, 2);
}

#[test]
fn slot_limit_is_kvms() {
    let Some((kvm, primary, mirror)) = setup("slot_limit_is_kvms", 16) else {
        return;
    };
    let max = kvm.get_nr_memslots() as u32;
    assert_eq!(mirror.slots_used(), (0, max));
    let base = 0x1_0000_0000u64;
    primary.mmap_anon(base, (max as u64 + 1) * 0x1000);
    for i in 0..max as u64 {
        mirror.add_region(base + i * 0x1000, 0x1000).unwrap();
    }
    let e = mirror
        .add_region(base + max as u64 * 0x1000, 0x1000)
        .unwrap_err();
    assert!(matches!(e, KvmError::OutOfSlots(m) if m == max), "{e:?}");
    mirror.remove_region(base + 7 * 0x1000).unwrap();
    let r = mirror
        .add_region(base + max as u64 * 0x1000, 0x1000)
        .unwrap();
    assert_eq!(r.slot, 7);
    assert_eq!(mirror.slots_used(), (max, max));
}

/// A removed region's host-view VA range is pooled and reused: the next
/// region of that size starts with every page a hole, and the guest sees
/// only the new region's primary pages, never the old region's frames.
#[test]
fn reused_host_view_starts_empty() {
    let Some((_kvm, primary, mirror)) = setup("reused_host_view_starts_empty", 256) else {
        return;
    };
    primary.mmap_anon(0, 0x20000);
    primary.mmap_anon(0x100000, 0x10000);
    primary.write(0x3000, &0x0101_0101u32.to_le_bytes());
    primary.write(0x100000 + 0x3000, &0x0202_0202u32.to_le_bytes());
    // Old region: code region plus a data region, fully populated.
    mirror.add_region(0, 0x10000).unwrap();
    mirror.add_region_at(0x10000, 0, 0x10000, 0).unwrap();
    mirror.populate(0x10000, 0x10000, true).unwrap();
    assert_eq!(mirror.stats(0x10000).unwrap().present, 16);
    mirror.remove_region(0x10000).unwrap();
    // Same size, other primary pages: must not show the old frames.
    mirror.add_region_at(0x10000, 0x100000, 0x10000, 0).unwrap();
    assert_eq!(mirror.stats(0x10000).unwrap().present, 0, "all holes");
    for p in 0..16u64 {
        assert_eq!(mirror.translation(0x10000 + p * 0x1000), None);
    }
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x13000).unwrap(), 0x0202_0202);
}
