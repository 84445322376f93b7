//! Basic behaviour of the primary address space: faults, COW, the layout
//! operations, the notification discipline, bad input, concurrency.

mod common;

use notifier_core::frame::FrameStore;

use std::sync::Arc;

use common::*;
use notifier_core::mm::{
    Advice, FileOptions, MmError, MmapRequest, MremapFlags, Prot, Pte, Row, VmFlags,
};
use notifier_core::notifier::Event;
use notifier_core::primary::{Primary, PrimaryFault};
use notifier_core::RangeError;

#[test]
fn anon_read_fault_maps_the_zero_page_read_only() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(4 * PAGE, Prot::RW)).unwrap();
    assert_eq!(mm.read_u64(a + 8).unwrap(), 0);
    let t = mm.lookup_page(a).unwrap();
    assert_eq!(t.pfn, mm.zero_pfn());
    assert!(!t.writable);
    assert_eq!(mm.vm_normal_page(a).unwrap().unwrap().row, Row::SpecialZero);
}

#[test]
fn write_after_zero_page_breaks_cow_inside_a_clear_bracket() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.read_u64(a).unwrap();
    mm.write_u64(a, 42).unwrap();
    assert_eq!(mm.read_u64(a).unwrap(), 42);
    let t = mm.lookup_page(a).unwrap();
    assert!(t.writable);
    assert_ne!(t.pfn, mm.zero_pfn());
    assert_eq!(rec.starts(), vec![(a, a + PAGE, Event::Clear)]);
    assert_eq!(rec.clears(), vec![a]);
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn exclusive_anon_page_is_reused_on_write_after_mprotect() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 7).unwrap();
    let pfn = mm.lookup_page(a).unwrap().pfn;
    mm.mprotect(a, PAGE, Prot::READ).unwrap();
    assert!(!mm.lookup_page(a).unwrap().writable);
    assert_eq!(mm.write_u64(a, 1), Err(MmError::Permission { addr: a }));
    mm.mprotect(a, PAGE, Prot::RW).unwrap();
    mm.write_u64(a, 8).unwrap();
    assert_eq!(mm.lookup_page(a).unwrap().pfn, pfn, "reused, not copied");
}

#[test]
fn munmap_partial_splits_and_keeps_the_rest() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(4 * PAGE, Prot::RW)).unwrap();
    for i in 0..4 {
        mm.write_u64(a + i * PAGE, i + 1).unwrap();
    }
    let before = mm.frames().allocated();
    mm.munmap(a + PAGE, 2 * PAGE).unwrap();
    assert_eq!(mm.frames().allocated(), before - 2);
    let v: Vec<(u64, u64)> = mm.vmas().iter().map(|v| (v.start, v.end)).collect();
    assert_eq!(v, vec![(a, a + PAGE), (a + 3 * PAGE, a + 4 * PAGE)]);
    assert_eq!(mm.read_u64(a).unwrap(), 1);
    assert_eq!(mm.read_u64(a + 3 * PAGE).unwrap(), 4);
    assert_eq!(
        mm.read_u64(a + PAGE),
        Err(MmError::NoVma { addr: a + PAGE })
    );
    assert!(rec
        .starts()
        .contains(&(a + PAGE, a + 3 * PAGE, Event::Unmap)));
    assert_eq!(rec.clears(), vec![a + PAGE, a + 2 * PAGE]);
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn mprotect_downgrade_invalidates_with_protection_vma() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(3 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a + PAGE, 5).unwrap();
    rec.take();
    mm.mprotect(a + PAGE, PAGE, Prot::READ).unwrap();
    assert_eq!(
        rec.starts(),
        vec![(a + PAGE, a + 2 * PAGE, Event::ProtectionVma)]
    );
    assert_eq!(mm.vmas().len(), 3);
    assert!(!mm.lookup_page(a + PAGE).unwrap().writable);
    check_discipline(&rec.events()).unwrap();
    // Upgrade: no bracket.
    rec.take();
    mm.mprotect(a + PAGE, PAGE, Prot::RW).unwrap();
    assert!(rec.starts().is_empty());
    // PROT_NONE: lookups stop answering.
    mm.mprotect(a + PAGE, PAGE, Prot::NONE).unwrap();
    assert!(mm.lookup_page(a + PAGE).is_none());
    assert_eq!(
        mm.read_u64(a + PAGE),
        Err(MmError::Permission { addr: a + PAGE })
    );
    mm.mprotect(a + PAGE, PAGE, Prot::READ).unwrap();
    assert_eq!(
        mm.read_u64(a + PAGE).unwrap(),
        5,
        "contents survive PROT_NONE"
    );
}

#[test]
fn mprotect_over_a_hole_changes_nothing() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    assert_eq!(
        mm.mprotect(a, 2 * PAGE, Prot::READ),
        Err(MmError::NoVma { addr: a + PAGE })
    );
    assert!(mm.vma_at(a).unwrap().flags.contains(VmFlags::WRITE));
}

#[test]
fn madvise_dontneed_zeroes_private_and_keeps_shared() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let p = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    let s = mm
        .mmap(&MmapRequest::anon(PAGE, Prot::RW).shared())
        .unwrap();
    mm.write_u64(p, 1).unwrap();
    mm.write_u64(s, 2).unwrap();
    mm.madvise(p, PAGE, Advice::DontNeed).unwrap();
    mm.madvise(s, PAGE, Advice::DontNeed).unwrap();
    assert_eq!(mm.read_u64(p).unwrap(), 0);
    assert_eq!(mm.read_u64(s).unwrap(), 2);
    assert!(rec.starts().contains(&(p, p + PAGE, Event::Clear)));
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn madvise_free_discards_clean_pages_on_reclaim_and_keeps_rewritten_ones() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 1).unwrap();
    mm.write_u64(a + PAGE, 2).unwrap();
    mm.madvise(a, 2 * PAGE, Advice::Free).unwrap();
    mm.write_u64(a + PAGE, 3).unwrap();
    let st = mm.try_to_unmap(a, 2 * PAGE).unwrap();
    assert_eq!((st.discarded, st.swapped), (1, 1));
    assert_eq!(mm.read_u64(a).unwrap(), 0);
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 3);
    let f = mm.create_file(FileOptions::new(1));
    let m = mm
        .mmap(&MmapRequest::file(f, 0, PAGE, Prot::RW).shared())
        .unwrap();
    assert!(matches!(
        mm.madvise(m, PAGE, Advice::Free),
        Err(MmError::WrongVmaKind { .. })
    ));
}

#[test]
fn shared_file_mapping_sees_the_page_cache_and_private_copies_on_write() {
    let mm = new_mm();
    let f = mm.create_file(FileOptions::new(2));
    f.write(PAGE + 3, b"file!").unwrap();
    let sh = mm
        .mmap(&MmapRequest::file(f.clone(), 0, 2 * PAGE, Prot::RW).shared())
        .unwrap();
    let pr = mm
        .mmap(&MmapRequest::file(f.clone(), 0, 2 * PAGE, Prot::RW))
        .unwrap();
    let mut b = [0u8; 5];
    mm.read(pr + PAGE + 3, &mut b).unwrap();
    assert_eq!(&b, b"file!");
    assert_eq!(mm.lookup_page(pr + PAGE).unwrap().pfn, f.cached(1).unwrap());
    mm.write(pr + PAGE + 3, b"priv!").unwrap();
    mm.write(sh + PAGE + 3, b"shar!").unwrap();
    let mut c = [0u8; 5];
    f.read(PAGE + 3, &mut c).unwrap();
    assert_eq!(&c, b"shar!");
    mm.read(pr + PAGE + 3, &mut b).unwrap();
    assert_eq!(&b, b"priv!");
    // Beyond the file: SIGBUS.
    let big = mm
        .mmap(&MmapRequest::file(f, 0, 3 * PAGE, Prot::READ).shared())
        .unwrap();
    assert_eq!(
        mm.read_u64(big + 2 * PAGE),
        Err(MmError::Bus {
            addr: big + 2 * PAGE
        })
    );
}

#[test]
fn mremap_shrinks_grows_in_place_and_moves() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 11).unwrap();
    mm.write_u64(a + PAGE, 12).unwrap();
    assert_eq!(
        mm.mremap(a, 2 * PAGE, PAGE, MremapFlags::default())
            .unwrap(),
        a
    );
    assert!(mm.vma_at(a + PAGE).is_none());
    assert_eq!(
        mm.mremap(a, PAGE, 3 * PAGE, MremapFlags::default())
            .unwrap(),
        a
    );
    assert_eq!(mm.read_u64(a + 2 * PAGE).unwrap(), 0);
    // Block growth, then move.
    let blocker = mm
        .mmap(&MmapRequest::anon(PAGE, Prot::RW).at(a + 3 * PAGE))
        .unwrap();
    assert_eq!(
        mm.mremap(a, 3 * PAGE, 5 * PAGE, MremapFlags::default()),
        Err(MmError::CannotGrow { addr: a })
    );
    let pfn = mm.lookup_page(a).unwrap().pfn;
    rec.take();
    let b = mm
        .mremap(
            a,
            3 * PAGE,
            5 * PAGE,
            MremapFlags {
                may_move: true,
                fixed: None,
            },
        )
        .unwrap();
    assert_ne!(b, a);
    assert_eq!(mm.read_u64(b).unwrap(), 11);
    assert_eq!(
        mm.lookup_page(b).unwrap().pfn,
        pfn,
        "frames move with the PTEs"
    );
    assert!(mm.vma_at(a).is_none());
    assert!(mm.vma_at(blocker).is_some());
    assert!(rec.starts().contains(&(a, a + 3 * PAGE, Event::Unmap)));
    // The written page and the zero page mapped by the read of a + 2 pages.
    assert_eq!(rec.clears(), vec![a, a + 2 * PAGE]);
    check_discipline(&rec.events()).unwrap();
    let fixed = b + 16 * PAGE;
    assert_eq!(
        mm.mremap(
            b,
            5 * PAGE,
            PAGE,
            MremapFlags {
                may_move: true,
                fixed: Some(fixed)
            }
        )
        .unwrap(),
        fixed
    );
    assert_eq!(mm.read_u64(fixed).unwrap(), 11);
    assert_eq!(mm.vma_at(fixed).unwrap().end, fixed + PAGE);
}

#[test]
fn mremap_rejects_a_source_spanning_vmas() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.mmap(&MmapRequest::anon(PAGE, Prot::READ).at(a + PAGE))
        .unwrap();
    assert_eq!(
        mm.mremap(a, 2 * PAGE, PAGE, MremapFlags::default()),
        Err(MmError::MremapSpansVmas { addr: a })
    );
}

#[test]
fn bad_ranges_are_typed_errors_and_lose_nothing() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 99).unwrap();
    assert_eq!(
        mm.munmap(a + 1, PAGE),
        Err(MmError::Misaligned { addr: a + 1 })
    );
    assert_eq!(mm.munmap(a, 0), Err(MmError::Range(RangeError::Empty)));
    assert!(matches!(
        mm.munmap(!0xfffu64, 2 * PAGE),
        Err(MmError::Range(RangeError::Wraps { .. }))
    ));
    assert!(matches!(
        mm.mmap(&MmapRequest::anon(PAGE, Prot::RW).at(1 << 47)),
        Err(MmError::BeyondTaskSize { .. })
    ));
    assert!(matches!(
        mm.mmap(&MmapRequest::anon(0, Prot::RW)),
        Err(MmError::Range(RangeError::Empty))
    ));
    assert_eq!(mm.read_u64(a + 3), Err(MmError::Misaligned { addr: a + 3 }));
    assert_eq!(mm.read_u64(0x1000), Err(MmError::NoVma { addr: 0x1000 }));
    assert_eq!(
        mm.madvise(a, 2 * PAGE, Advice::DontNeed),
        Err(MmError::NoVma { addr: a + PAGE })
    );
    assert_eq!(
        mm.fault_page(0x1000, false),
        Err(PrimaryFault::NoMapping(0x1000))
    );
    let ro = mm.mmap(&MmapRequest::anon(PAGE, Prot::READ)).unwrap();
    assert_eq!(mm.fault_page(ro, true), Err(PrimaryFault::Permission(ro)));
    assert_eq!(mm.read_u64(a).unwrap(), 99);
}

#[test]
fn mmap_fixed_replaces_with_an_unmap_bracket() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a + PAGE, 3).unwrap();
    rec.take();
    mm.mmap(&MmapRequest::anon(PAGE, Prot::RW).at(a + PAGE))
        .unwrap();
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 0);
    assert_eq!(rec.starts(), vec![(a + PAGE, a + 2 * PAGE, Event::Unmap)]);
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn fork_write_protects_the_parent_and_copies_on_write() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    let s = mm
        .mmap(&MmapRequest::anon(PAGE, Prot::RW).shared())
        .unwrap();
    mm.write_u64(a, 1).unwrap();
    mm.write_u64(s, 5).unwrap();
    rec.take();
    let child = mm.fork().unwrap();
    assert_eq!(rec.starts(), vec![(a, a + 2 * PAGE, Event::ProtectionPage)]);
    assert!(!mm.lookup_page(a).unwrap().writable);
    let pfn = mm.lookup_page(a).unwrap().pfn;
    assert_eq!(mm.page_info(pfn).unwrap().mapcount, 2);
    child.write_u64(a, 2).unwrap();
    mm.write_u64(s, 6).unwrap();
    assert_eq!(mm.read_u64(a).unwrap(), 1);
    assert_eq!(child.read_u64(a).unwrap(), 2);
    assert_eq!(child.read_u64(s).unwrap(), 6, "shared mappings stay shared");
    assert!(!Arc::ptr_eq(mm.notifiers(), child.notifiers()));
    // The child's COW ran in the child's notifiers: the parent's recorder saw nothing new.
    assert_eq!(rec.starts().len(), 1);
    mm.write_u64(a, 3).unwrap();
    assert_eq!(
        mm.lookup_page(a).unwrap().pfn,
        pfn,
        "the parent's page is exclusive again and reused"
    );
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn exit_releases_then_tears_down_and_frees_everything() {
    let frames = Arc::new(notifier_core::frame::HeapFrames::new(0x1000, 64));
    let mm = notifier_core::mm::Mm::new(frames.clone());
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(8 * PAGE, Prot::RW)).unwrap();
    for i in 0..8 {
        mm.write_u64(a + i * PAGE, i).unwrap();
    }
    let child = mm.fork().unwrap();
    mm.exit();
    assert_eq!(
        rec.events().iter().filter(|e| **e == Ev::Release).count(),
        1
    );
    assert_eq!(mm.read_u64(a), Err(MmError::Exited));
    assert_eq!(child.read_u64(a + 7 * PAGE).unwrap(), 7);
    drop(child);
    mm.exit();
    drop(mm);
    assert_eq!(
        frames.allocated(),
        0,
        "every frame, the zero page included, went back"
    );
}

#[test]
fn migrate_moves_contents_to_a_new_frame() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a + 16, 0xdead).unwrap();
    mm.read_u64(a + PAGE).unwrap();
    let old = mm.lookup_page(a).unwrap().pfn;
    assert_eq!(
        mm.migrate(a, 2 * PAGE).unwrap(),
        1,
        "the zero page does not move"
    );
    let new = mm.lookup_page(a).unwrap().pfn;
    assert_ne!(old, new);
    assert_eq!(mm.read_u64(a + 16).unwrap(), 0xdead);
    assert!(mm.page_info(old).is_none(), "old frame freed");
    assert_eq!(rec.starts(), vec![(a, a + 2 * PAGE, Event::Migrate)]);
    check_discipline(&rec.events()).unwrap();
}

#[test]
fn aging_calls_the_young_hooks() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 1).unwrap();
    assert!(mm.test_young(a).unwrap());
    assert_eq!(mm.age_range(a, 2 * PAGE, true).unwrap(), 1);
    assert!(rec.events().contains(&Ev::Young(a, a + PAGE)));
    assert!(!mm.test_young(a).unwrap());
    rec.young_answer
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        mm.age_range(a, PAGE, false).unwrap(),
        1,
        "a secondary's young bit counts"
    );
}

#[test]
fn reclaim_swaps_anon_and_unmaps_page_cache() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    let f = mm.create_file(FileOptions::new(1));
    let m = mm
        .mmap(&MmapRequest::file(f.clone(), 0, PAGE, Prot::RW).shared())
        .unwrap();
    mm.write_u64(a, 77).unwrap();
    mm.write_u64(m, 88).unwrap();
    let st = mm.try_to_unmap(a, m + PAGE - a).unwrap();
    assert_eq!((st.swapped, st.unmapped), (1, 1));
    assert!(matches!(mm.pte(a), Pte::Swap { .. }));
    assert_eq!(mm.pte(m), Pte::None);
    assert_eq!(mm.swap_slots(), 1);
    assert_eq!(mm.read_u64(a).unwrap(), 77);
    assert_eq!(mm.read_u64(m).unwrap(), 88);
    assert_eq!(mm.swap_slots(), 0);
    assert_eq!(mm.lookup_page(m).unwrap().pfn, f.cached(0).unwrap());
}

#[test]
fn locked_mapping_is_populated_and_not_reclaimed() {
    let mm = new_mm();
    let a = mm
        .mmap(&MmapRequest::anon(3 * PAGE, Prot::RW).locked())
        .unwrap();
    for i in 0..3 {
        assert!(mm.lookup_page(a + i * PAGE).unwrap().writable);
    }
    assert_eq!(mm.try_to_unmap(a, 3 * PAGE).unwrap().total(), 0);
    assert!(matches!(
        mm.madvise(a, PAGE, Advice::DontNeed),
        Err(MmError::WrongVmaKind { .. })
    ));
}

#[test]
fn refcounts_balance_across_operations() {
    let frames = Arc::new(notifier_core::frame::HeapFrames::new(0x1000, 256));
    let mm = notifier_core::mm::Mm::new(frames.clone());
    let base = frames.allocated();
    let a = mm.mmap(&MmapRequest::anon(8 * PAGE, Prot::RW)).unwrap();
    for i in 0..8 {
        mm.write_u64(a + i * PAGE, i).unwrap();
    }
    let c = mm.fork().unwrap();
    c.write_u64(a, 5).unwrap();
    mm.try_to_unmap(a, 4 * PAGE).unwrap();
    mm.migrate(a, 8 * PAGE).unwrap();
    let b = mm
        .mremap(
            a,
            8 * PAGE,
            16 * PAGE,
            MremapFlags {
                may_move: true,
                fixed: None,
            },
        )
        .unwrap();
    mm.madvise(b, 2 * PAGE, Advice::DontNeed).unwrap();
    drop(c);
    mm.munmap(b, 16 * PAGE).unwrap();
    assert_eq!(mm.tracked_pages(), 0);
    assert_eq!(mm.swap_slots(), 0);
    assert_eq!(frames.allocated(), base);
    assert_eq!(mm.page_table_memory().leaves, 0, "tables freed");
}

#[test]
fn concurrent_faults_with_a_mutator_stay_coherent() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(64 * PAGE, Prot::RW)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let mm = mm.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                let page = a + ((n * 7 + t) % 64) * PAGE;
                // Each thread owns word t of every page: a value it wrote
                // must read back unless the page was dropped (then 0).
                let _ = mm.write_u64(page + t * 8, n);
                let v = mm.read_u64(page + t * 8).unwrap();
                assert!(v == n || v == 0, "thread {t} read {v} expected {n} or 0");
                n += 1;
            }
        }));
    }
    for i in 0..200u64 {
        let p = a + (i % 64) * PAGE;
        match i % 4 {
            0 => mm.madvise(p, PAGE, Advice::DontNeed).unwrap(),
            1 => drop(
                mm.try_to_unmap(p, 4 * PAGE.min(64 * PAGE - (i % 64) * PAGE))
                    .unwrap(),
            ),
            2 => drop(mm.migrate(p, PAGE).unwrap()),
            _ => drop(mm.age_range(a, 64 * PAGE, true).unwrap()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    check_discipline(&rec.events()).unwrap();
}
