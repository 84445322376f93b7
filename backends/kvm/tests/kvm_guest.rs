//! A real guest proves that KVM sees the primary's current frame after
//! every kind of primary change, and that guest writes land in the frame
//! the primary maps.

mod common;

use std::sync::Arc;

use common::setup;
use notifier_core::frame::FrameStore;
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_kvm::guest::RealModeGuest;

const RAM: u64 = 0x10_0000; // 1 MiB at gpa 0
const DATA: u64 = 0x8000;

#[test]
fn guest_reads_what_the_primary_maps_after_every_change() {
    let Some((_kvm, primary, mirror)) =
        setup("guest_reads_what_the_primary_maps_after_every_change", 1024)
    else {
        return;
    };
    primary.mmap_anon(0, RAM);
    mirror.add_region(0, RAM).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();

    // Demand fault: first touch of a hole gives the primary's (zero) page.
    assert_eq!(g.read_u32(&mirror, DATA).unwrap(), 0);
    assert!(
        g.exits().mmio + g.exits().memory_fault >= 1,
        "the first read came back to the VMM: {:?}",
        g.exits()
    );

    // The primary writes; KVM sees it through the shared memfd page.
    primary.write(DATA, &0x1111_1111u32.to_le_bytes());
    assert_eq!(g.read_u32(&mirror, DATA).unwrap(), 0x1111_1111);

    // Remap to another (file) page.
    let other = primary.memfd().alloc().unwrap();
    primary
        .memfd()
        .write(other, 0, &0x2222_2222u32.to_le_bytes())
        .unwrap();
    let old = mirror.translation(DATA).unwrap().pfn;
    primary.remap(DATA, other, true);
    assert_eq!(
        mirror.translation(DATA),
        None,
        "invalidation punched the page"
    );
    assert_eq!(g.read_u32(&mirror, DATA).unwrap(), 0x2222_2222);
    // The old frame changes after the remap: the guest must not see it.
    primary
        .memfd()
        .write(old, 0, &0xdead_beefu32.to_le_bytes())
        .unwrap();
    assert_eq!(g.read_u32(&mirror, DATA).unwrap(), 0x2222_2222);

    // Migrate: same bytes, new frame; then write the new frame.
    primary.remap(DATA + 0x1000, primary.memfd().alloc().unwrap(), true);
    primary.write(DATA + 0x1000, &0x3333_3333u32.to_le_bytes());
    assert_eq!(g.read_u32(&mirror, DATA + 0x1000).unwrap(), 0x3333_3333);
    let before = mirror.translation(DATA + 0x1000).unwrap().pfn;
    let new = primary.migrate(DATA + 0x1000);
    assert_ne!(before, new);
    assert_eq!(g.read_u32(&mirror, DATA + 0x1000).unwrap(), 0x3333_3333);
    primary
        .memfd()
        .write(new, 0, &0x3434_3434u32.to_le_bytes())
        .unwrap();
    primary
        .memfd()
        .write(before, 0, &0xbad0_bad0u32.to_le_bytes())
        .unwrap();
    assert_eq!(g.read_u32(&mirror, DATA + 0x1000).unwrap(), 0x3434_3434);
    assert_eq!(mirror.translation(DATA + 0x1000).unwrap().pfn, new);

    // munmap, then map again and fault back with new content.
    primary.write(DATA + 0x2000, &0x4444_4444u32.to_le_bytes());
    assert_eq!(g.read_u32(&mirror, DATA + 0x2000).unwrap(), 0x4444_4444);
    primary.munmap(DATA + 0x2000, 0x1000);
    assert_eq!(mirror.translation(DATA + 0x2000), None);
    assert!(
        g.read_u32(&mirror, DATA + 0x2000).is_err(),
        "no mapping: the guest access fails"
    );
    primary.mmap_anon(DATA + 0x2000, 0x1000);
    primary.write(DATA + 0x2000, &0x4545_4545u32.to_le_bytes());
    let mut g = RealModeGuest::new(&mirror, 1).unwrap();
    assert_eq!(g.read_u32(&mirror, DATA + 0x2000).unwrap(), 0x4545_4545);

    // DONTNEED: back to zero.
    primary.write(DATA + 0x3000, &0x5555_5555u32.to_le_bytes());
    assert_eq!(g.read_u32(&mirror, DATA + 0x3000).unwrap(), 0x5555_5555);
    primary.dontneed(DATA + 0x3000, 0x1000);
    assert_eq!(g.read_u32(&mirror, DATA + 0x3000).unwrap(), 0);

    // COW: a shared read-only frame; the guest reads it, then writes: the
    // write breaks COW in the primary and lands in the new private frame.
    let shared = primary.memfd().alloc().unwrap();
    primary
        .memfd()
        .write(shared, 0, &0x6666_6666u32.to_le_bytes())
        .unwrap();
    primary.map_cow(DATA + 0x4000, shared);
    assert_eq!(g.read_u32(&mirror, DATA + 0x4000).unwrap(), 0x6666_6666);
    assert!(!mirror.translation(DATA + 0x4000).unwrap().writable);
    g.write_u32(&mirror, DATA + 0x4000, 0x6767_6767).unwrap();
    let private = primary.lookup_page(DATA + 0x4000).unwrap();
    assert_ne!(private.pfn, shared, "COW broken");
    assert_eq!(
        primary.read_u32(DATA + 0x4000),
        0x6767_6767,
        "the write landed in the primary's frame"
    );
    let mut b = [0u8; 4];
    primary.memfd().read(shared, 0, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0x6666_6666,
        "the shared frame is untouched"
    );
    assert_eq!(g.read_u32(&mirror, DATA + 0x4000).unwrap(), 0x6767_6767);
}

#[test]
fn guest_write_lands_in_the_primary_frame() {
    let Some((_kvm, primary, mirror)) = setup("guest_write_lands_in_the_primary_frame", 512) else {
        return;
    };
    primary.mmap_anon(0, RAM);
    mirror.add_region(0, RAM).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    // To a hole (write fault), then to a present writable page (direct).
    g.write_u32(&mirror, DATA, 0xabcd_0001).unwrap();
    assert_eq!(primary.read_u32(DATA), 0xabcd_0001);
    g.write_u32(&mirror, DATA, 0xabcd_0002).unwrap();
    assert_eq!(primary.read_u32(DATA), 0xabcd_0002);
    // After a migration the next write goes to the new frame only.
    let old = primary.lookup_page(DATA).unwrap().pfn;
    let new = primary.migrate(DATA);
    g.write_u32(&mirror, DATA, 0xabcd_0003).unwrap();
    assert_eq!(primary.read_u32(DATA), 0xabcd_0003);
    assert_eq!(primary.lookup_page(DATA).unwrap().pfn, new);
    assert_ne!(old, new);
    // A write across a page boundary lands in both frames.
    g.write_u32(&mirror, DATA + 0x1ffe, 0x4433_2211).unwrap();
    assert_eq!(primary.read_u32(DATA + 0x1ffc) >> 16, 0x2211);
    assert_eq!(primary.read_u32(DATA + 0x2000) & 0xffff, 0x4433);
}

#[test]
fn special_mapping_fault_is_served_by_its_callback() {
    let Some((_kvm, primary, mirror)) =
        setup("special_mapping_fault_is_served_by_its_callback", 512)
    else {
        return;
    };
    primary.mmap_anon(0, 0x8000);
    let rom = primary.memfd().alloc().unwrap();
    primary
        .memfd()
        .write(rom, 0x10, &0x0707_0707u32.to_le_bytes())
        .unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    primary.mmap_special(
        0x8000,
        0x1000,
        Arc::new(move |addr| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if addr == 0x8000 {
                Ok(Translation {
                    pfn: rom,
                    writable: false,
                })
            } else {
                Err(PrimaryFault::Bus(addr))
            }
        }),
    );
    mirror.add_region(0, 0x10000).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x8010).unwrap(), 0x0707_0707);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        !mirror.translation(0x8000).unwrap().writable,
        "read-only special page"
    );
    // A ROM write fails in the primary (no COW on a special mapping here):
    // the page stays read-only and the frame unchanged.
    primary.dontneed(0x8000, 0x1000);
    assert_eq!(g.read_u32(&mirror, 0x8010).unwrap(), 0x0707_0707);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "refaulted through the callback"
    );
}

#[test]
fn code_page_faults_in_on_fetch() {
    let Some((_kvm, primary, mirror)) = setup("code_page_faults_in_on_fetch", 512) else {
        return;
    };
    primary.mmap_anon(0, 0x10000);
    mirror.add_region(0, 0x10000).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x3000).unwrap(), 0);
    // Migrate the code page: the host view punches it; the next fetch fails
    // emulation (or faults) and the runner faults CS:IP back in.
    primary.migrate(0x1000);
    primary.write(0x3000, &7u32.to_le_bytes());
    assert_eq!(g.read_u32(&mirror, 0x3000).unwrap(), 7);
    eprintln!("exits: {:?}", g.exits());
}

#[test]
fn concurrent_remaps_never_show_a_freed_frame() {
    let Some((_kvm, primary, mirror)) = setup("concurrent_remaps_never_show_a_freed_frame", 512)
    else {
        return;
    };
    primary.mmap_anon(0, 0x10000);
    mirror.add_region(0, 0x10000).unwrap();
    let frames = primary.memfd().clone();
    let first = frames.alloc().unwrap();
    frames.write(first, 0, &1u32.to_le_bytes()).unwrap();
    primary.remap(DATA, first, true);
    let current = std::sync::atomic::AtomicU32::new(1);
    let done = std::sync::atomic::AtomicBool::new(false);
    const POISON: u32 = 0xdead_dead;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut old = first;
            for v in 2..400u32 {
                let f = frames.alloc().unwrap();
                frames.write(f, 0, &v.to_le_bytes()).unwrap();
                primary.remap(DATA, f, true);
                current.store(v, std::sync::atomic::Ordering::SeqCst);
                // The bracket ended: the old frame may be freed and reused.
                frames.write(old, 0, &POISON.to_le_bytes()).unwrap();
                frames.free(old);
                old = f;
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut g = RealModeGuest::new(&mirror, 0).unwrap();
        let mut reads = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || reads < 10 {
            let floor = current.load(std::sync::atomic::Ordering::SeqCst);
            let v = g.read_u32(&mirror, DATA).unwrap();
            assert_ne!(v, POISON, "the guest read a freed frame");
            assert!(
                v >= floor,
                "the guest read {v}, older than {floor} which was current before the read"
            );
            reads += 1;
        }
    });
    let st = mirror.stats(0).unwrap();
    assert!(st.invalidations >= 399, "{st:?}");
}
