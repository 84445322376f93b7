//! Real memory: layout changes (memslot move, remap of the RAM, resize)
//! publish a new view generation; a view of an old layout is refused and a
//! refreshed one serves the current bytes, as the real vCPU sees them. The
//! dirty log starts clean when logging is enabled. Frames that are not the
//! primary's are refused at construction.

mod common;

use std::sync::Arc;

use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{DeviceView, GuestRam, KvmError, KvmMirror, MemfdFrames};
use notifier_uffd::ZeroHandler;
use vm_memory::{Bytes, GuestAddress};

const P: u64 = 4096;
const K512: u64 = 512 << 10;

#[test]
fn real_memslot_move_remap_resize_publish_new_views() {
    let Some(w) = common::real_setup("real_memslot_move", Arc::new(ZeroHandler)) else {
        return;
    };
    // Low half: code and scratch (anonymous); high half: a memfd region.
    w.mem
        .add_region(0, GuestRam::anon(K512 / 2).unwrap(), None)
        .unwrap();
    let hi = w
        .mem
        .add_region(K512, GuestRam::memfd(K512 / 4).unwrap(), None)
        .unwrap();
    let mut guest = RealModeGuest::new(&w.mem, 0).unwrap();
    hi.write(0x100, &0xA5A5_0001u32.to_le_bytes()).unwrap();

    let mut old = w.mem.memory();
    assert_eq!(common::view_u32(&old, K512 + 0x100).unwrap(), 0xA5A5_0001);
    assert_eq!(guest.read_u32(&w.mem, K512 + 0x100).unwrap(), 0xA5A5_0001);

    // Move the memslot: the old view is refused, never served.
    let g0 = old.generation();
    w.mem.move_region(K512, 3 * K512 / 2).unwrap();
    assert!(!old.is_current());
    let e = common::view_u32(&old, K512 + 0x100).unwrap_err();
    assert!(e.to_string().contains("stale"), "{e}");
    let e = common::view_u32(&old, 3 * K512 / 2 + 0x100).unwrap_err();
    assert!(e.to_string().contains("stale"), "{e}");
    assert!(old.refresh());
    assert!(old.generation() > g0);
    assert_eq!(
        common::view_u32(&old, 3 * K512 / 2 + 0x100).unwrap(),
        0xA5A5_0001
    );
    assert!(
        common::view_u32(&old, K512 + 0x100).is_err(),
        "nothing there now"
    );
    assert_eq!(
        guest.read_u32(&w.mem, 3 * K512 / 2 + 0x100).unwrap(),
        0xA5A5_0001
    );

    // Remap the RAM (mremap): new host address, same bytes, same gpa.
    let host0 = hi.addr();
    let stale = w.mem.memory();
    let host1 = w.mem.remap_region(3 * K512 / 2).unwrap();
    assert_ne!(host0, host1);
    assert_eq!(hi.addr(), host1);
    assert!(common::view_u32(&stale, 3 * K512 / 2 + 0x100).is_err());
    let view = w.mem.memory();
    assert_eq!(
        common::view_u32(&view, 3 * K512 / 2 + 0x100).unwrap(),
        0xA5A5_0001
    );
    assert_eq!(
        guest.read_u32(&w.mem, 3 * K512 / 2 + 0x100).unwrap(),
        0xA5A5_0001
    );
    guest
        .write_u32(&w.mem, 3 * K512 / 2 + 0x200, 0x7777_0002)
        .unwrap();
    let mut b = [0u8; 4];
    hi.read(0x200, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0x7777_0002,
        "guest wrote the moved RAM"
    );
    assert_eq!(w.mem.stats().gone_regions, 0, "our own remap is not a loss");

    // Resize the low region within its RAM: shrink, then grow back.
    let low = w.mem.translate(0).unwrap().0;
    low.write(K512 / 4 + P, &0x3C3C_0003u32.to_le_bytes())
        .unwrap();
    w.mem.resize_region(0, K512 / 4).unwrap();
    assert!(common::view_u32(&w.mem.memory(), K512 / 4 + P).is_err());
    w.mem.resize_region(0, K512 / 2).unwrap();
    assert_eq!(
        common::view_u32(&w.mem.memory(), K512 / 4 + P).unwrap(),
        0x3C3C_0003
    );
    assert_eq!(guest.read_u32(&w.mem, K512 / 4 + P).unwrap(), 0x3C3C_0003);
    assert!(matches!(
        w.mem.resize_region(0, K512),
        Err(KvmError::BeyondRam { .. })
    ));

    // Remove: gone from the layout, KVM no longer maps it.
    let ram = w.mem.remove_region(3 * K512 / 2).unwrap();
    assert!(w.mem.translate(3 * K512 / 2).is_none());
    assert!(guest.read_u32(&w.mem, 3 * K512 / 2 + 0x100).is_err());
    drop(ram);
}

#[test]
fn real_dirty_log_starts_clean_at_enable() {
    let Some(w) = common::real_setup("real_dirty_log", Arc::new(ZeroHandler)) else {
        return;
    };
    w.mem
        .add_region(0, GuestRam::anon(K512).unwrap(), None)
        .unwrap();
    let mut guest = RealModeGuest::new(&w.mem, 0).unwrap();
    let view = w.mem.memory();
    // Writes before logging is on: by the guest and by a device.
    guest.write_u32(&w.mem, 0x10_000, 1).unwrap();
    view.write_obj(2u32, GuestAddress(0x11_000)).unwrap();
    w.mem.set_dirty_logging(0, true).unwrap();
    let log = w.mem.dirty_log(0).unwrap();
    assert_eq!(
        log.count(),
        0,
        "pages written before enabling: {:?}",
        log.iter().collect::<Vec<_>>()
    );
    guest.write_u32(&w.mem, 0x12_000, 3).unwrap();
    view.write_obj(4u32, GuestAddress(0x13_000)).unwrap();
    let log = w.mem.dirty_log(0).unwrap();
    assert!(log.is_dirty(0x12_000), "guest write after enabling");
    assert!(log.is_dirty(0x13_000), "device write after enabling");
    assert!(!log.is_dirty(0x10_000) && !log.is_dirty(0x11_000));
}

#[test]
fn model_dirty_log_starts_clean_at_enable() {
    let Some((_kvm, primary, mirror)) = common::setup("model_dirty_log", 64) else {
        return;
    };
    primary.mmap_anon(0, 16 * P);
    mirror.add_region(0, 16 * P).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    dev.write_obj(9u32, GuestAddress(3 * P)).unwrap();
    mirror.set_dirty_logging(0, true).unwrap();
    assert_eq!(mirror.dirty_log(0).unwrap().count(), 0);
    dev.write_obj(9u32, GuestAddress(5 * P)).unwrap();
    let log = mirror.dirty_log(0).unwrap();
    assert!(log.is_dirty(5 * P) && !log.is_dirty(3 * P));
}

#[test]
fn model_device_view_of_old_layout_is_refused() {
    let Some((_kvm, primary, mirror)) = common::setup("model_view_stale", 64) else {
        return;
    };
    primary.mmap_anon(0x10_0000, 16 * P);
    mirror
        .add_region_at(0x10_0000, 0x10_0000, 16 * P, 0)
        .unwrap();
    let old = DeviceView::new(&mirror).unwrap();
    old.write_obj(0x55u32, GuestAddress(0x10_0000)).unwrap();
    mirror.move_region(0x10_0000, 0x40_0000).unwrap();
    assert!(!old.is_current());
    assert!(old.read_obj::<u32>(GuestAddress(0x10_0000)).is_err());
    assert!(matches!(
        old.translate(0x10_0000, false),
        Err(KvmError::StaleView { .. })
    ));
    let new = DeviceView::new(&mirror).unwrap();
    assert_eq!(new.read_obj::<u32>(GuestAddress(0x40_0000)).unwrap(), 0x55);
}

#[test]
fn mirror_refuses_frames_that_are_not_the_primary_s() {
    let Some(kvm) = common::kvm_or_skip("mirror_frames_mismatch") else {
        return;
    };
    let a = Arc::new(MemfdFrames::new(0x1000, 8).unwrap());
    let b = Arc::new(MemfdFrames::new(0x1000, 8).unwrap());
    let primary = common::TestPrimary::new(a.clone());
    let vm = Arc::new(kvm.create_vm().unwrap());
    let r = KvmMirror::new(vm.clone(), primary.clone(), b, 16);
    assert!(matches!(r, Err(KvmError::FramesMismatch)));
    assert!(KvmMirror::new(vm, primary, a, 16).is_ok());
}
