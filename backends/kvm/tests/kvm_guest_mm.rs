//! The proof on the real software primary (`notifier_core::mm::Mm`):
//! a real guest reads guest-physical memory after each kind of primary
//! change and always reports the primary's current bytes, never the old
//! frame's; a guest write lands in the frame the primary maps.
//!
//! Guest-physical `gpa` is `Mm` address `GUEST_BASE + gpa` (see
//! `common::GUEST_BASE`): guest RAM is an ordinary mapping of the `Mm`.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{setup_mm, GUEST_BASE};
use notifier_core::frame::Pfn;
use notifier_core::mm::{
    Advice, FileOptions, MmapRequest, Prot, SpecialFault, SpecialMapping, SpecialSource,
};
use notifier_core::PAGE_SIZE;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::KvmError;

const RAM: u64 = 0x10_0000; // 1 MiB at gpa 0
const PAGE: u64 = PAGE_SIZE;

/// The `Mm` address of guest-physical `gpa`.
const fn va(gpa: u64) -> u64 {
    GUEST_BASE + gpa
}

/// After a change, the host view holds nothing but what the primary maps.
fn assert_coherent(mirror: &notifier_kvm::KvmMirror<notifier_core::mm::Mm>, gpa: u64) {
    if let Some(t) = mirror.translation(gpa) {
        let p = mirror.primary().lookup(va(gpa)).expect("primary maps it");
        assert_eq!(t.pfn, p.pfn, "host view at {gpa:#x} is the primary's frame");
        assert!(!t.writable || p.writable, "no permission the primary lacks");
    }
}

#[test]
fn guest_follows_mm_through_every_change() {
    let Some((_kvm, mm, mirror)) = setup_mm("guest_follows_mm_through_every_change", 2048) else {
        return;
    };
    mm.mmap(&MmapRequest::anon(RAM, Prot::RW).at(GUEST_BASE))
        .unwrap();
    mirror.add_region_at(0, GUEST_BASE, RAM, 0).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();

    // Demand fault of an untouched anonymous page: the zero page.
    const Z: u64 = 0x8000;
    assert_eq!(g.read_u32(&mirror, Z).unwrap(), 0);
    assert!(g.exits().mmio + g.exits().memory_fault >= 1);
    mm.write_u64(va(Z), 0x1111_1111).unwrap(); // COW from the zero page
    assert_eq!(g.read_u32(&mirror, Z).unwrap(), 0x1111_1111);
    assert_coherent(&mirror, Z);

    // remap_file_pages to another file page.
    const F: u64 = 0x10000;
    let file = mm.create_file(FileOptions::new(16));
    for i in 0..16u64 {
        file.write(i * PAGE, &(0xf11e_0000u32 + i as u32).to_le_bytes())
            .unwrap();
    }
    mm.mmap(
        &MmapRequest::file(file.clone(), 0, 4 * PAGE, Prot::RW)
            .shared()
            .at(va(F)),
    )
    .unwrap();
    assert_eq!(g.read_u32(&mirror, F).unwrap(), 0xf11e_0000);
    mm.remap_file_pages(va(F), PAGE, 0, 7, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, F).unwrap(), 0xf11e_0007);
    file.write(0, &0xdead_beefu32.to_le_bytes()).unwrap();
    assert_eq!(
        g.read_u32(&mirror, F).unwrap(),
        0xf11e_0007,
        "the old file page changed after the remap: the guest must not see it"
    );
    assert_coherent(&mirror, F);
    g.write_u32(&mirror, F, 0x7777_7777).unwrap();
    let mut b = [0u8; 4];
    file.read(7 * PAGE, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        0x7777_7777,
        "guest write in file page 7"
    );
    file.read(0, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xdead_beef, "page 0 untouched");

    // Migrate: same bytes on a new frame; later writes go to the new one.
    const M: u64 = 0x9000;
    mm.write_u64(va(M), 0x3333_3333).unwrap();
    assert_eq!(g.read_u32(&mirror, M).unwrap(), 0x3333_3333);
    let before = mm.lookup(va(M)).unwrap().pfn;
    assert_eq!(mm.migrate(va(M), PAGE).unwrap(), 1);
    let after = mm.lookup(va(M)).unwrap().pfn;
    assert_ne!(before, after);
    assert_eq!(mirror.translation(M), None, "migration punched the page");
    assert_eq!(g.read_u32(&mirror, M).unwrap(), 0x3333_3333);
    mm.write_u64(va(M), 0x3434_3434).unwrap();
    assert_eq!(g.read_u32(&mirror, M).unwrap(), 0x3434_3434);
    assert_eq!(mirror.translation(M).unwrap().pfn, after);
    g.write_u32(&mirror, M, 0x3535_3535).unwrap();
    assert_eq!(mm.read_u64(va(M)).unwrap() as u32, 0x3535_3535);

    // COW break: fork write-protects the parent's anonymous pages; the
    // guest's write breaks COW in the parent and lands in its new frame.
    const C: u64 = 0xa000;
    mm.write_u64(va(C), 0x6666_6666).unwrap();
    assert_eq!(g.read_u32(&mirror, C).unwrap(), 0x6666_6666);
    assert!(mirror.translation(C).unwrap().writable);
    let child = mm.fork().unwrap();
    assert!(
        !mirror.translation(C).unwrap().writable,
        "fork write-protected the host view"
    );
    let shared = mm.lookup(va(C)).unwrap().pfn;
    assert_eq!(g.read_u32(&mirror, C).unwrap(), 0x6666_6666);
    g.write_u32(&mirror, C, 0x6767_6767).unwrap();
    let private = mm.lookup(va(C)).unwrap().pfn;
    assert_ne!(private, shared, "COW broken in the parent");
    assert_eq!(mm.read_u64(va(C)).unwrap() as u32, 0x6767_6767);
    assert_eq!(
        child.read_u64(va(C)).unwrap() as u32,
        0x6666_6666,
        "the child keeps the old bytes"
    );
    assert_eq!(g.read_u32(&mirror, C).unwrap(), 0x6767_6767);
    assert_coherent(&mirror, C);
    drop(child);

    // madvise(DONTNEED): back to zero.
    const D: u64 = 0xb000;
    mm.write_u64(va(D), 0x5555_5555).unwrap();
    assert_eq!(g.read_u32(&mirror, D).unwrap(), 0x5555_5555);
    mm.madvise(va(D), PAGE, Advice::DontNeed).unwrap();
    assert_eq!(mirror.translation(D), None);
    assert_eq!(g.read_u32(&mirror, D).unwrap(), 0);

    // munmap, then map again and fault back with new content.
    const U: u64 = 0xc000;
    mm.write_u64(va(U), 0x4444_4444).unwrap();
    assert_eq!(g.read_u32(&mirror, U).unwrap(), 0x4444_4444);
    mm.munmap(va(U), PAGE).unwrap();
    assert_eq!(mirror.translation(U), None);
    assert!(
        matches!(mirror.handle_fault(U, false), Err(KvmError::Fault(_))),
        "nothing mapped: a guest access cannot be served"
    );
    mm.mmap(&MmapRequest::anon(PAGE, Prot::RW).at(va(U)))
        .unwrap();
    mm.write_u64(va(U), 0x4545_4545).unwrap();
    assert_eq!(g.read_u32(&mirror, U).unwrap(), 0x4545_4545);
    assert_coherent(&mirror, U);
}

#[test]
fn guest_reads_a_special_mapping_through_its_fault_callback() {
    let Some((_kvm, mm, mirror)) = setup_mm(
        "guest_reads_a_special_mapping_through_its_fault_callback",
        512,
    ) else {
        return;
    };
    const S: u64 = 0x20000;
    mm.mmap(&MmapRequest::anon(S, Prot::RW).at(GUEST_BASE))
        .unwrap();
    // Two ROM pages; the callback serves whichever `which` names. It never
    // calls into the Mm (it runs under the Mm's locks).
    let roms: Vec<Pfn> = (0..2).map(|_| mm.alloc_page().unwrap()).collect();
    for (i, &p) in roms.iter().enumerate() {
        mm.frames()
            .write(p, 0x10, &(0x0707_0700u32 + i as u32).to_le_bytes())
            .unwrap();
    }
    let which = Arc::new(AtomicU64::new(roms[0].0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (w, c) = (which.clone(), calls.clone());
    let sm = Arc::new(SpecialMapping {
        name: "[rom]",
        source: SpecialSource::Fault(Box::new(move |f: &SpecialFault| {
            c.fetch_add(1, Ordering::SeqCst);
            assert_eq!(f.pgoff, 0);
            Ok(Pfn(w.load(Ordering::SeqCst)))
        })),
    });
    mm.mmap(&MmapRequest::special(sm, PAGE, Prot::READ).at(va(S)))
        .unwrap();
    mirror.add_region_at(0, GUEST_BASE, 0x30000, 0).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();

    assert_eq!(g.read_u32(&mirror, S + 0x10).unwrap(), 0x0707_0700);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(mirror.translation(S).unwrap().pfn, roms[0]);
    assert!(!mirror.translation(S).unwrap().writable, "ROM is read-only");
    // A guest write to the ROM is refused by the primary; nothing changes.
    assert!(g.write_u32(&mirror, S + 0x10, 1).is_err());
    let mut g = RealModeGuest::new(&mirror, 1).unwrap();
    assert_eq!(g.read_u32(&mirror, S + 0x10).unwrap(), 0x0707_0700);

    // The VMM switches ROM banks: zap the page; the next guest access
    // faults through the callback again and sees the other bank.
    which.store(roms[1].0, Ordering::SeqCst);
    mm.munmap(va(S), PAGE).unwrap();
    assert_eq!(mirror.translation(S), None);
    let w = which.clone();
    let sm = Arc::new(SpecialMapping {
        name: "[rom]",
        source: SpecialSource::Fault(Box::new(move |_: &SpecialFault| {
            Ok(Pfn(w.load(Ordering::SeqCst)))
        })),
    });
    mm.mmap(&MmapRequest::special(sm, PAGE, Prot::READ).at(va(S)))
        .unwrap();
    assert_eq!(g.read_u32(&mirror, S + 0x10).unwrap(), 0x0707_0701);
    assert_eq!(mirror.translation(S).unwrap().pfn, roms[1]);
}

#[test]
fn guest_writes_land_in_the_frame_mm_maps() {
    let Some((_kvm, mm, mirror)) = setup_mm("guest_writes_land_in_the_frame_mm_maps", 512) else {
        return;
    };
    mm.mmap(&MmapRequest::anon(0x10000, Prot::RW).at(GUEST_BASE))
        .unwrap();
    mirror.add_region_at(0, GUEST_BASE, 0x10000, 0).unwrap();
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    // To a hole (write fault), then to a present writable page.
    g.write_u32(&mirror, 0x3000, 0xabcd_0001).unwrap();
    assert_eq!(mm.read_u64(va(0x3000)).unwrap(), 0xabcd_0001);
    g.write_u32(&mirror, 0x3000, 0xabcd_0002).unwrap();
    assert_eq!(mm.read_u64(va(0x3000)).unwrap(), 0xabcd_0002);
    // After a read-only mprotect and back, the write faults and upgrades.
    mm.mprotect(va(0x3000), PAGE, Prot::READ).unwrap();
    assert_eq!(mirror.translation(0x3000), None);
    mm.mprotect(va(0x3000), PAGE, Prot::RW).unwrap();
    g.write_u32(&mirror, 0x3000, 0xabcd_0003).unwrap();
    assert_eq!(mm.read_u64(va(0x3000)).unwrap(), 0xabcd_0003);
    // Across a page boundary: both frames.
    g.write_u32(&mirror, 0x4ffe, 0x4433_2211).unwrap();
    assert_eq!(mm.read_u64(va(0x4ff8)).unwrap() >> 48, 0x2211);
    assert_eq!(mm.read_u64(va(0x5000)).unwrap() & 0xffff, 0x4433);
}

/// A thread remaps the page among file pages `1, 2, ...` (page `v` holds
/// `v`) while the guest reads it: every value the guest reports is at
/// least the one that was current before its read began.
#[test]
fn guest_never_reads_behind_concurrent_remap_file_pages() {
    let Some((_kvm, mm, mirror)) =
        setup_mm("guest_never_reads_behind_concurrent_remap_file_pages", 1024)
    else {
        return;
    };
    const N: u64 = 300;
    const F: u64 = 0x8000;
    mm.mmap(&MmapRequest::anon(F, Prot::RW).at(GUEST_BASE))
        .unwrap();
    let file = mm.create_file(FileOptions::new(N + 1));
    for v in 0..=N {
        file.write(v * PAGE, &(v as u32).to_le_bytes()).unwrap();
    }
    mm.mmap(
        &MmapRequest::file(file, 0, PAGE, Prot::RW)
            .shared()
            .at(va(F)),
    )
    .unwrap();
    mirror.add_region_at(0, GUEST_BASE, F + PAGE, 0).unwrap();
    let current = AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for v in 1..=N {
                mm.remap_file_pages(va(F), PAGE, 0, v, 0).unwrap();
                current.store(v, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut g = RealModeGuest::new(&mirror, 0).unwrap();
        let mut reads = 0;
        while !done.load(Ordering::SeqCst) || reads < 10 {
            let floor = current.load(Ordering::SeqCst);
            let v = u64::from(g.read_u32(&mirror, F).unwrap());
            assert!(v >= floor, "guest read file page {v}, behind {floor}");
            reads += 1;
        }
    });
    let mut g = RealModeGuest::new(&mirror, 1).unwrap();
    assert_eq!(u64::from(g.read_u32(&mirror, F).unwrap()), N);
    assert_coherent(&mirror, F);
    assert!(mirror.stats(0).unwrap().invalidations >= N);
}
