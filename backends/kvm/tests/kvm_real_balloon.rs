//! Real memory: a real vCPU and a device view over guest RAM the VMM owns
//! (anonymous and memfd, 4 KiB and 2 MiB pages) report the current bytes
//! after a balloon inflation (REMOVE) and a deflation.

mod common;

use std::sync::Arc;

use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{GuestRam, RamBacking, RamPages};
use notifier_uffd::ZeroHandler;
use vm_memory::{Bytes, GuestAddress};

const P: u64 = 4096;
const MIB: u64 = 1 << 20;

fn balloon(test: &str, backing: RamBacking, pages: RamPages) {
    let Some(w) = common::real_setup(test, Arc::new(ZeroHandler)) else {
        return;
    };
    let len = 2 * MIB;
    let ram = GuestRam::new(len, backing, pages).expect("guest RAM");
    let ram = w.mem.add_region(0, ram, None).expect("region");
    let mut guest = RealModeGuest::new(&w.mem, 0).expect("guest");
    let view = w.mem.memory();

    // The VMM writes through the device view; the guest sees it, and the
    // guest's write is what the view and the RAM read back.
    let (a, b) = (0x8000u64, 0x9000u64);
    view.write_obj(0x1122_3344u32, GuestAddress(a)).unwrap();
    assert_eq!(guest.read_u32(&w.mem, a).unwrap(), 0x1122_3344);
    guest.write_u32(&w.mem, b, 0x5566_7788).unwrap();
    assert_eq!(common::view_u32(&view, b).unwrap(), 0x5566_7788);
    let mut raw = [0u8; 4];
    ram.read(b, &mut raw).unwrap();
    assert_eq!(u32::from_le_bytes(raw), 0x5566_7788);

    // Inflate over both pages: KVM, the device view and the RAM read zeros.
    let before = w.mem.stats().removed_pages;
    w.mem.balloon_inflate(a, 2 * P).unwrap();
    assert!(
        w.mem.stats().removed_pages >= before + 2,
        "{:?}",
        w.mem.stats()
    );
    assert_eq!(guest.read_u32(&w.mem, a).unwrap(), 0, "guest after REMOVE");
    assert_eq!(guest.read_u32(&w.mem, b).unwrap(), 0, "guest after REMOVE");
    assert_eq!(common::view_u32(&view, a).unwrap(), 0, "view after REMOVE");
    assert_eq!(common::view_u32(&view, b).unwrap(), 0, "view after REMOVE");

    // Deflate (prefaulted) and use the pages again.
    w.mem.balloon_deflate(a, 2 * P, true).unwrap();
    guest.write_u32(&w.mem, a, 0xCAFE_F00D).unwrap();
    assert_eq!(common::view_u32(&view, a).unwrap(), 0xCAFE_F00D);
    view.write_obj(0x0BAD_BEEFu32, GuestAddress(b)).unwrap();
    assert_eq!(guest.read_u32(&w.mem, b).unwrap(), 0x0BAD_BEEF);

    // A large inflation, the whole second half of the first MiB.
    w.mem.balloon_inflate(MIB / 2, MIB / 2).unwrap();
    assert_eq!(guest.read_u32(&w.mem, MIB / 2 + 0x3000).unwrap(), 0);
    assert_eq!(w.mem.stats().gone_regions, 0);
}

#[test]
fn real_balloon_anon_4k() {
    balloon("real_balloon_anon_4k", RamBacking::Anon, RamPages::Small);
}

#[test]
fn real_balloon_memfd_4k() {
    balloon("real_balloon_memfd_4k", RamBacking::Memfd, RamPages::Small);
}

#[test]
fn real_balloon_anon_thp() {
    balloon("real_balloon_anon_thp", RamBacking::Anon, RamPages::Huge);
}

#[test]
fn real_balloon_memfd_thp() {
    balloon("real_balloon_memfd_thp", RamBacking::Memfd, RamPages::Huge);
}

/// A balloon range outside every region is a typed error, nothing zapped.
#[test]
fn real_balloon_outside_regions_is_refused() {
    let Some(w) = common::real_setup("real_balloon_outside", Arc::new(ZeroHandler)) else {
        return;
    };
    let ram = w
        .mem
        .add_region(0, GuestRam::anon(MIB).unwrap(), None)
        .unwrap();
    ram.write(0x4000, &[7]).unwrap();
    assert!(matches!(
        w.mem.balloon_inflate(4 * MIB, P),
        Err(notifier_kvm::KvmError::Unmapped(_))
    ));
    assert!(
        w.mem.balloon_inflate(MIB - P, 2 * P).is_err(),
        "straddles the end"
    );
    let mut b = [0u8];
    ram.read(0x4000, &mut b).unwrap();
    assert_eq!(b[0], 7);
}
