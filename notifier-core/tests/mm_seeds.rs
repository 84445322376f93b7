//! The behaviours of seeds 000, 001, 002, 003 and 004, one named test each.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use notifier_core::frame::Pfn;
use notifier_core::mm::{
    Backing, FileOptions, MmError, MmapRequest, PageArray, PagesRef, Prot, Pte, Row, SpecialFault,
    SpecialFaultError, SpecialMapping, SpecialSource, VmFlags, Vma, VmaKind, MAP_NONBLOCK,
    PTE_FILE_MAX_BITS,
};
use notifier_core::notifier::Event;
use parking_lot::Mutex;

// ---------------------------------------------------------------- seed 000

fn vma_with_array(n: usize) -> (Vma, Arc<PageArray>) {
    let arr = PageArray::new((0..n as u64).map(|i| Pfn(500 + i)).collect(), |_| {});
    let v = Vma {
        start: 0x100000,
        end: 0x100000 + n as u64 * PAGE,
        flags: VmFlags::READ | VmFlags::PFNMAP | VmFlags::SHARED,
        pgoff: 10,
        kind: VmaKind::PfnMap,
        pages: Some(PagesRef {
            array: arr.clone(),
            offset: 0,
        }),
    };
    (v, arr)
}

#[test]
fn seed000_split_upper_new_vma_advances_its_page_offset() {
    let (mut v, _arr) = vma_with_array(4);
    let new = v.split(v.start + PAGE, false);
    assert_eq!((v.start, v.end, v.pgoff), (0x100000, 0x100000 + PAGE, 10));
    assert_eq!(
        (new.start, new.pgoff, new.pages.as_ref().unwrap().offset),
        (0x100000 + PAGE, 11, 1)
    );
    assert_eq!(v.pages.as_ref().unwrap().offset, 0);
}

#[test]
fn seed000_split_new_below_advances_the_old_vma_page_offset() {
    let (mut v, _arr) = vma_with_array(4);
    let new = v.split(v.start + 3 * PAGE, true);
    assert_eq!(
        (
            new.start,
            new.end,
            new.pgoff,
            new.pages.as_ref().unwrap().offset
        ),
        (0x100000, 0x100000 + 3 * PAGE, 10, 0)
    );
    assert_eq!(
        (v.start, v.pgoff, v.pages.as_ref().unwrap().offset),
        (0x100000 + 3 * PAGE, 13, 3)
    );
}

#[test]
fn seed000_vm_normal_page_stays_exact_across_splits_in_both_directions() {
    let mm = new_mm();
    let pages: Vec<Pfn> = (0..6).map(|_| mm.alloc_page().unwrap()).collect();
    let arr = PageArray::new(pages.clone(), |_| {});
    let a = mm
        .mmap(
            &MmapRequest::new(6 * PAGE, Prot::RW, Backing::PfnMapEmpty)
                .shared()
                .with_pages(arr),
        )
        .unwrap();
    for i in 0..6 {
        mm.insert_pfn(a + i * PAGE, Pfn(IO_BASE + 20 + i)).unwrap();
    }
    // munmap splits with new_below = 0 at the start, 1 at the end;
    // mprotect with 1 at the start, 0 at the end.
    mm.munmap(a + PAGE, PAGE).unwrap();
    mm.mprotect(a + 3 * PAGE, PAGE, Prot::READ).unwrap();
    assert_eq!(mm.vmas().len(), 4);
    for i in [0u64, 2, 3, 4, 5] {
        let d = mm.vm_normal_page(a + i * PAGE).unwrap().unwrap();
        assert_eq!(
            (d.row, d.page),
            (Row::SpecialPageArray, Some(pages[i as usize])),
            "page {i}"
        );
    }
}

#[test]
fn seed000_page_array_freed_only_when_the_last_sub_vma_closes() {
    let mm = new_mm();
    let freed = Arc::new(AtomicUsize::new(0));
    let f2 = freed.clone();
    let arr = PageArray::new(vec![Pfn(IO_BASE); 4], move |p| {
        f2.fetch_add(p.len(), Ordering::SeqCst);
    });
    let a = mm
        .mmap(
            &MmapRequest::new(4 * PAGE, Prot::RW, Backing::PfnMapEmpty)
                .shared()
                .with_pages(arr.clone()),
        )
        .unwrap();
    assert_eq!(arr.openers(), 1);
    mm.munmap(a + PAGE, PAGE).unwrap();
    assert_eq!(arr.openers(), 2, "split into three, the middle closed");
    let child = mm.fork().unwrap();
    assert_eq!(arr.openers(), 4);
    drop(child);
    mm.munmap(a, PAGE).unwrap();
    assert!(!arr.is_freed());
    assert_eq!(freed.load(Ordering::SeqCst), 0);
    mm.munmap(a + 2 * PAGE, 2 * PAGE).unwrap();
    assert!(arr.is_freed());
    assert_eq!(
        freed.load(Ordering::SeqCst),
        4,
        "on_free ran once, with the whole array"
    );
}

#[test]
fn seed000_page_array_is_consulted_only_for_special_ptes() {
    let mm = new_mm();
    let arr_page = mm.alloc_page().unwrap();
    let arr = PageArray::new(vec![arr_page, arr_page], |_| {});
    let m = mm
        .mmap(
            &MmapRequest::new(2 * PAGE, Prot::RW, Backing::MixedMap)
                .shared()
                .with_pages(arr),
        )
        .unwrap();
    let own = mm.alloc_page().unwrap();
    mm.insert_page(m, own).unwrap();
    let d = mm.vm_normal_page(m).unwrap().unwrap();
    assert_eq!(
        (d.row, d.page),
        (Row::Normal, Some(own)),
        "a normal PTE ignores the array"
    );
    mm.insert_pfn(m + PAGE, Pfn(IO_BASE)).unwrap();
    assert_eq!(
        mm.vm_normal_page(m + PAGE).unwrap().unwrap().page,
        Some(arr_page)
    );
}

// ---------------------------------------------------------------- seed 001

fn pfnmap_empty(mm: &notifier_core::mm::Mm, shared: bool) -> u64 {
    let r = MmapRequest::new(2 * PAGE, Prot::RW, Backing::PfnMapEmpty);
    mm.mmap(&if shared { r.shared() } else { r }).unwrap()
}

#[test]
fn seed001_insert_pfn_needs_pfnmap_or_mixedmap() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    assert!(matches!(
        mm.insert_pfn(a, Pfn(IO_BASE)),
        Err(MmError::WrongVmaKind { .. })
    ));
}

#[test]
fn seed001_insert_pfn_rejects_pfnmap_and_mixedmap_together() {
    let mm = new_mm();
    let a = pfnmap_empty(&mm, true);
    mm.vma_set_flags(a, VmFlags::MIXEDMAP).unwrap();
    assert_eq!(
        mm.insert_pfn(a, Pfn(IO_BASE)),
        Err(MmError::PfnMapAndMixedMap { addr: a })
    );
}

#[test]
fn seed001_insert_pfn_rejects_cow_pfnmap() {
    let mm = new_mm();
    let a = pfnmap_empty(&mm, false);
    assert_eq!(
        mm.insert_pfn(a, Pfn(IO_BASE)),
        Err(MmError::CowPfnMap { addr: a })
    );
}

#[test]
fn seed001_insert_pfn_rejects_valid_frame_in_mixedmap() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    assert_eq!(
        mm.insert_pfn(m, p),
        Err(MmError::ValidPfnInMixedMap { pfn: p.0 })
    );
    assert_eq!(mm.pte(m), Pte::None, "nothing was mapped");
}

#[test]
fn seed001_insert_page_needs_a_valid_frame_and_mixedmap() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    assert_eq!(
        mm.insert_page(m, Pfn(IO_BASE)),
        Err(MmError::InvalidPage { pfn: IO_BASE })
    );
    let a = pfnmap_empty(&mm, true);
    let p = mm.alloc_page().unwrap();
    assert!(matches!(
        mm.insert_page(a, p),
        Err(MmError::WrongVmaKind { .. })
    ));
    mm.insert_page(m, p).unwrap();
    assert_eq!(mm.insert_page(m, p), Err(MmError::Busy { addr: m }));
    assert_eq!(
        mm.insert_pfn(m, Pfn(IO_BASE)),
        Err(MmError::Busy { addr: m })
    );
}

#[test]
fn seed001_mixedmap_refcounts_valid_frames_only() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(2 * PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    mm.insert_page(m, p).unwrap();
    mm.insert_pfn(m + PAGE, Pfn(IO_BASE + 2)).unwrap();
    assert_eq!(mm.page_info(p).unwrap().refcount, 2);
    assert_eq!(mm.page_info(p).unwrap().mapcount, 1);
    assert_eq!(mm.page_info(Pfn(IO_BASE + 2)), None);
    mm.munmap(m, 2 * PAGE).unwrap();
    assert_eq!(
        mm.page_info(p).unwrap().refcount,
        1,
        "only the caller's reference remains"
    );
    mm.put_page(p).unwrap();
    assert_eq!(mm.page_info(p), None);
}

#[test]
fn seed001_mixedmap_cow_of_a_raw_pfn_copies_it() {
    let mm = new_mm();
    let dev = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE + 30, PAGE, Prot::RW).shared())
        .unwrap();
    mm.write_u64(dev, 0xabc).unwrap();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap))
        .unwrap();
    mm.insert_pfn(m, Pfn(IO_BASE + 30)).unwrap();
    assert!(
        !mm.lookup(m).unwrap().writable,
        "private: read-only until COW"
    );
    mm.write_u64(m + 8, 1).unwrap();
    assert_eq!(mm.read_u64(m).unwrap(), 0xabc);
    assert_eq!(mm.read_u64(dev + 8).unwrap(), 0);
    assert_eq!(mm.vm_normal_page(m).unwrap().unwrap().row, Row::Normal);
}

#[test]
fn seed001_pfnmap_cow_follows_the_linearity_rule() {
    let mm = new_mm_no_special();
    let a = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE + 40, 2 * PAGE, Prot::RW))
        .unwrap();
    mm.write_u64(a + PAGE, 5).unwrap();
    assert_eq!(
        mm.vm_normal_page(a).unwrap().unwrap().row,
        Row::PfnMapLinear
    );
    assert_eq!(
        mm.vm_normal_page(a + PAGE).unwrap().unwrap().row,
        Row::PfnMapCowed
    );
    // Splitting keeps the rule exact (pgoff advances).
    mm.munmap(a, PAGE).unwrap();
    assert_eq!(
        mm.vm_normal_page(a + PAGE).unwrap().unwrap().row,
        Row::PfnMapCowed
    );
    mm.munmap(a + PAGE, PAGE).unwrap();
    assert_eq!(
        mm.tracked_pages(),
        0,
        "the COWed page was freed, the raw ones never counted"
    );
}

// ---------------------------------------------------------------- seed 002

#[test]
fn seed002_fault_callback_gets_the_offset_relative_to_the_mapping() {
    let mm = new_mm();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let backing: Vec<Pfn> = (0..4).map(|_| mm.alloc_page().unwrap()).collect();
    let b2 = backing.clone();
    let sm = Arc::new(SpecialMapping {
        name: "[vvar]",
        source: SpecialSource::Fault(Box::new(move |f: &SpecialFault| {
            s2.lock().push(f.pgoff);
            b2.get(f.pgoff as usize).copied().ok_or(SpecialFaultError)
        })),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, 4 * PAGE, Prot::READ))
        .unwrap();
    mm.read_u64(a + 3 * PAGE).unwrap();
    mm.read_u64(a).unwrap();
    assert_eq!(mm.lookup(a + 3 * PAGE).unwrap().pfn, backing[3]);
    // After a split the offset is relative to the faulting VMA
    // (`vmf->pgoff - vma->vm_pgoff`): a + 2 pages is page 1 of the upper part.
    mm.munmap(a, PAGE).unwrap();
    mm.read_u64(a + 2 * PAGE).unwrap();
    assert_eq!(*seen.lock(), vec![3, 0, 1]);
    assert_eq!(mm.lookup(a + 2 * PAGE).unwrap().pfn, backing[1]);
}

#[test]
fn seed002_fault_callback_failure_is_a_bus_error() {
    let mm = new_mm();
    let sm = Arc::new(SpecialMapping {
        name: "[io]",
        source: SpecialSource::Fault(Box::new(|_| Err(SpecialFaultError))),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, PAGE, Prot::READ))
        .unwrap();
    assert_eq!(mm.read_u64(a), Err(MmError::Bus { addr: a }));
    assert_eq!(mm.pte(a), Pte::None);
}

#[test]
fn seed002_page_list_shorter_than_the_mapping_faults_with_bus_error() {
    let mm = new_mm();
    let p = mm.alloc_page().unwrap();
    let sm = Arc::new(SpecialMapping {
        name: "[vdso]",
        source: SpecialSource::Pages(vec![p]),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, 2 * PAGE, Prot::READ))
        .unwrap();
    mm.read_u64(a).unwrap();
    assert_eq!(mm.lookup(a).unwrap().pfn, p);
    assert_eq!(mm.read_u64(a + PAGE), Err(MmError::Bus { addr: a + PAGE }));
}

#[test]
fn seed002_fault_callback_may_return_raw_io_memory() {
    let mm = new_mm();
    let sm = Arc::new(SpecialMapping {
        name: "[io]",
        source: SpecialSource::Fault(Box::new(|f: &SpecialFault| Ok(Pfn(IO_BASE + 50 + f.pgoff)))),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, 2 * PAGE, Prot::READ))
        .unwrap();
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 0);
    assert_eq!(mm.lookup(a + PAGE).unwrap().pfn, Pfn(IO_BASE + 51));
    assert!(matches!(mm.pte(a + PAGE), Pte::Present(p) if p.special));
}

// ---------------------------------------------------------------- seed 003

#[test]
fn seed003_reclaim_calls_clear_before_each_present_pte_is_cleared() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(8 * PAGE, Prot::RW)).unwrap();
    for i in [0u64, 2, 5] {
        mm.write_u64(a + i * PAGE, i).unwrap();
    }
    rec.take();
    let st = mm.try_to_unmap(a, 8 * PAGE).unwrap();
    assert_eq!(st.swapped, 3);
    let log = rec.events();
    assert_eq!(rec.clears(), vec![a, a + 2 * PAGE, a + 5 * PAGE]);
    // Order: start, then for each page clear immediately before its PTE store, then end.
    assert_eq!(log.first(), Some(&Ev::Start(a, a + 8 * PAGE, Event::Clear)));
    assert_eq!(log.last(), Some(&Ev::End(a, a + 8 * PAGE, Event::Clear)));
    for (i, e) in log.iter().enumerate() {
        if let Ev::Pte(c) = e {
            assert_eq!(
                log[i - 1],
                Ev::Clear(c.addr),
                "clear precedes the PTE change at {:#x}",
                c.addr
            );
        }
    }
    assert_eq!(check_discipline(&log).unwrap(), 3);
}

// ---------------------------------------------------------------- seed 004

fn nonlinear_setup() -> (
    Arc<notifier_core::mm::Mm>,
    Arc<notifier_core::mm::FileObj>,
    u64,
) {
    let mm = new_mm();
    let f = mm.create_file(FileOptions::new(16));
    for i in 0..16u64 {
        f.write(i * PAGE, &(100 + i).to_le_bytes()).unwrap();
    }
    let a = mm
        .mmap(&MmapRequest::file(f.clone(), 0, 8 * PAGE, Prot::RW).shared())
        .unwrap();
    (mm, f, a)
}

#[test]
fn seed004_rejects_nonzero_prot() {
    let (mm, _f, a) = nonlinear_setup();
    assert_eq!(
        mm.remap_file_pages(a, PAGE, 1, 3, 0),
        Err(MmError::RemapProtNotZero)
    );
}

#[test]
fn seed004_rejects_zero_or_wrapping_size() {
    let (mm, _f, a) = nonlinear_setup();
    assert_eq!(
        mm.remap_file_pages(a, 0, 0, 3, 0),
        Err(MmError::RemapSizeZeroOrWraps)
    );
    assert_eq!(
        mm.remap_file_pages(a, 0xfff, 0, 3, 0),
        Err(MmError::RemapSizeZeroOrWraps),
        "size masked to zero"
    );
    assert_eq!(
        mm.remap_file_pages(!0xfffu64, 2 * PAGE, 0, 3, 0),
        Err(MmError::RemapSizeZeroOrWraps)
    );
}

#[test]
fn seed004_rejects_wrapping_pgoff() {
    let (mm, _f, a) = nonlinear_setup();
    assert_eq!(
        mm.remap_file_pages(a, 2 * PAGE, 0, u64::MAX, 0),
        Err(MmError::RemapPgoffWraps)
    );
}

#[test]
fn seed004_rejects_pgoff_beyond_a_file_pte() {
    let (mm, _f, a) = nonlinear_setup();
    let max = 1u64 << PTE_FILE_MAX_BITS;
    assert_eq!(
        mm.remap_file_pages(a, PAGE, 0, max - 1, 0),
        Err(MmError::RemapPgoffTooLarge)
    );
    assert_eq!(
        mm.remap_file_pages(a, PAGE, 0, max - 2, MAP_NONBLOCK),
        Ok(()),
        "the last representable offset"
    );
}

#[test]
fn seed004_rejects_no_vma() {
    let (mm, _f, a) = nonlinear_setup();
    assert_eq!(
        mm.remap_file_pages(a + 64 * PAGE, PAGE, 0, 3, 0),
        Err(MmError::RemapNoVma {
            addr: a + 64 * PAGE
        })
    );
}

#[test]
fn seed004_rejects_private_vma() {
    let (mm, f, _a) = nonlinear_setup();
    let p = mm
        .mmap(&MmapRequest::file(f, 0, 2 * PAGE, Prot::RW))
        .unwrap();
    assert_eq!(
        mm.remap_file_pages(p, PAGE, 0, 3, 0),
        Err(MmError::RemapNotShared)
    );
}

#[test]
fn seed004_rejects_vma_without_nonlinear_support() {
    let mm = new_mm();
    let f = mm.create_file(FileOptions {
        pages: 4,
        can_nonlinear: false,
    });
    let a = mm
        .mmap(&MmapRequest::file(f, 0, 2 * PAGE, Prot::RW).shared())
        .unwrap();
    assert_eq!(
        mm.remap_file_pages(a, PAGE, 0, 3, 0),
        Err(MmError::RemapNoNonlinear)
    );
}

#[test]
fn seed004_rejects_range_not_inside_one_vma() {
    let (mm, _f, a) = nonlinear_setup();
    assert_eq!(
        mm.remap_file_pages(a + 7 * PAGE, 2 * PAGE, 0, 3, 0),
        Err(MmError::RemapNotInOneVma)
    );
    // find_vma picks the next VMA when start lies in a hole before it.
    assert_eq!(
        mm.remap_file_pages(a - PAGE, 2 * PAGE, 0, 3, 0),
        Err(MmError::RemapNotInOneVma)
    );
}

#[test]
fn seed004_linear_shortcut_changes_nothing() {
    let (mm, _f, a) = nonlinear_setup();
    let (rec, _h) = attach(&mm);
    mm.remap_file_pages(a + 2 * PAGE, 2 * PAGE, 0, 2, 0)
        .unwrap();
    assert!(!mm.vma_at(a).unwrap().flags.contains(VmFlags::NONLINEAR));
    assert!(rec.events().is_empty());
    assert_eq!(mm.pte(a + 2 * PAGE), Pte::None);
}

#[test]
fn seed004_nonlinear_flag_is_set_before_populating_inside_a_bracket() {
    let (mm, _f, a) = nonlinear_setup();
    let (rec, _h) = attach(&mm);
    mm.read_u64(a + PAGE).unwrap();
    rec.take();
    mm.remap_file_pages(a + PAGE, 2 * PAGE, 0, 9, MAP_NONBLOCK)
        .unwrap();
    let log = rec.events();
    assert_eq!(
        log.first(),
        Some(&Ev::Start(a + PAGE, a + 3 * PAGE, Event::Clear))
    );
    assert_eq!(
        log.last(),
        Some(&Ev::End(a + PAGE, a + 3 * PAGE, Event::Clear))
    );
    let stores: Vec<_> = log
        .iter()
        .filter_map(|e| if let Ev::Pte(c) = e { Some(*c) } else { None })
        .collect();
    assert!(!stores.is_empty());
    assert!(
        stores
            .iter()
            .all(|c| c.vma_flags.contains(VmFlags::NONLINEAR)),
        "flag set before the first PTE"
    );
    assert_eq!(
        rec.clears(),
        vec![a + PAGE],
        "the mapped page was zapped with clear"
    );
    check_discipline(&log).unwrap();
}

#[test]
fn seed004_map_nonblock_leaves_file_ptes_and_faults_read_the_remapped_pages() {
    let (mm, _f, a) = nonlinear_setup();
    mm.remap_file_pages(a, 2 * PAGE, 0, 12, MAP_NONBLOCK)
        .unwrap();
    assert_eq!(mm.pte(a), Pte::File { pgoff: 12 });
    assert_eq!(mm.pte(a + PAGE), Pte::File { pgoff: 13 });
    assert!(mm.lookup(a).is_none());
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 113);
    assert_eq!(
        mm.read_u64(a + 2 * PAGE).unwrap(),
        102,
        "outside the window: linear"
    );
}

#[test]
fn seed004_without_nonblock_the_window_is_prefaulted() {
    let (mm, f, a) = nonlinear_setup();
    mm.remap_file_pages(a + 4 * PAGE, 2 * PAGE, 0, 0, 0)
        .unwrap();
    assert_eq!(mm.lookup(a + 4 * PAGE).unwrap().pfn, f.cached(0).unwrap());
    assert_eq!(mm.lookup(a + 5 * PAGE).unwrap().pfn, f.cached(1).unwrap());
    assert_eq!(mm.read_u64(a + 5 * PAGE).unwrap(), 101);
}

#[test]
fn seed004_locked_vma_is_prefaulted() {
    let mm = new_mm();
    let f = mm.create_file(FileOptions::new(8));
    f.write(6 * PAGE, &7u64.to_le_bytes()).unwrap();
    let a = mm
        .mmap(
            &MmapRequest::file(f.clone(), 0, 4 * PAGE, Prot::RW)
                .shared()
                .locked(),
        )
        .unwrap();
    mm.remap_file_pages(a, PAGE, 0, 6, 0).unwrap();
    assert_eq!(mm.lookup(a).unwrap().pfn, f.cached(6).unwrap());
    assert_eq!(mm.read_u64(a).unwrap(), 7);
}

#[test]
fn seed004_nonlinear_window_munmaps_cleanly() {
    let (mm, _f, a) = nonlinear_setup();
    mm.remap_file_pages(a, PAGE, 0, 15, 0).unwrap();
    assert_eq!(mm.read_u64(a).unwrap(), 115);
    mm.munmap(a, 8 * PAGE).unwrap();
    assert_eq!(mm.page_table_memory().leaves, 0);
}
