//! Seed exactness where features meet: a nonlinear window across reclaim
//! and `madvise(DONTNEED)` (seed 004 with seed 003's reclaim), reclaim
//! leaving driver pages alone (seed 001's MIXEDMAP), raw PFNs of a special
//! mapping's fault callback classified like the kernel's (seed 002 with
//! seed 000/001's `vm_normal_page`), and seed 002's fault offset after a
//! split.

mod common;

use std::sync::Arc;

use common::*;
use notifier_core::frame::Pfn;
use notifier_core::mm::{
    Advice, Backing, FileOptions, MmapRequest, Prot, Pte, Row, SpecialFault, SpecialMapping,
    SpecialSource, VmFlags, MAP_NONBLOCK,
};
use parking_lot::Mutex;

/// A shared 8-page mapping of a 16-page file whose page `i` holds `100 + i`,
/// with the window `[a, a + 2 pages)` remapped to file pages 10 and 11.
fn window() -> (Arc<notifier_core::mm::Mm>, u64) {
    let mm = new_mm();
    let f = mm.create_file(FileOptions::new(16));
    for i in 0..16u64 {
        f.write(i * PAGE, &(100 + i).to_le_bytes()).unwrap();
    }
    let a = mm
        .mmap(&MmapRequest::file(f, 0, 8 * PAGE, Prot::RW).shared())
        .unwrap();
    mm.remap_file_pages(a, 2 * PAGE, 0, 10, 0).unwrap();
    assert_eq!(mm.read_u64(a).unwrap(), 110);
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 111);
    mm.read_u64(a + 4 * PAGE).unwrap();
    (mm, a)
}

#[test]
fn reclaim_writes_file_ptes_for_a_nonlinear_window() {
    let (mm, a) = window();
    let st = mm.try_to_unmap(a, 8 * PAGE).unwrap();
    assert_eq!(st.unmapped, 3);
    assert_eq!(mm.pte(a), Pte::File { pgoff: 10 });
    assert_eq!(mm.pte(a + PAGE), Pte::File { pgoff: 11 });
    assert_eq!(mm.pte(a + 4 * PAGE), Pte::None, "linear page: none");
    // "The new mappings are also safe across swapout."
    assert_eq!(mm.read_u64(a).unwrap(), 110);
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 111);
    assert_eq!(mm.read_u64(a + 4 * PAGE).unwrap(), 104);
}

#[test]
fn dontneed_keeps_a_nonlinear_window() {
    let (mm, a) = window();
    // A window page never faulted keeps its file PTE as is.
    mm.remap_file_pages(a + 2 * PAGE, PAGE, 0, 12, MAP_NONBLOCK)
        .unwrap();
    mm.madvise(a, 8 * PAGE, Advice::DontNeed).unwrap();
    assert_eq!(
        mm.pte(a),
        Pte::File { pgoff: 10 },
        "present page -> file PTE"
    );
    assert_eq!(mm.pte(a + PAGE), Pte::File { pgoff: 11 });
    assert_eq!(
        mm.pte(a + 2 * PAGE),
        Pte::File { pgoff: 12 },
        "file PTE kept"
    );
    assert_eq!(mm.pte(a + 4 * PAGE), Pte::None);
    assert_eq!(mm.read_u64(a).unwrap(), 110);
    assert_eq!(mm.read_u64(a + PAGE).unwrap(), 111);
    assert_eq!(mm.read_u64(a + 2 * PAGE).unwrap(), 112);
    // A linear VMA's DONTNEED still clears to none.
    let f = mm.create_file(FileOptions::new(2));
    let b = mm
        .mmap(&MmapRequest::file(f, 0, 2 * PAGE, Prot::RW).shared())
        .unwrap();
    mm.read_u64(b).unwrap();
    mm.madvise(b, 2 * PAGE, Advice::DontNeed).unwrap();
    assert_eq!(mm.pte(b), Pte::None);
}

#[test]
fn reclaim_leaves_driver_inserted_mixedmap_pages_alone() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(2 * PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    mm.insert_page(m, p).unwrap();
    mm.write_u64(m, 0xd1).unwrap();
    let st = mm.try_to_unmap(m, 2 * PAGE).unwrap();
    assert_eq!(st.total(), 0, "nothing a fault could bring back was taken");
    assert!(mm.pte(m).present().is_some());
    assert_eq!(mm.read_u64(m).unwrap(), 0xd1, "no bus error, same page");
    // Anonymous memory next to it is still reclaimed.
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 1).unwrap();
    assert_eq!(mm.try_to_unmap(a, PAGE).unwrap().swapped, 1);
    mm.munmap(m, 2 * PAGE).unwrap();
    mm.put_page(p).unwrap();
}

#[test]
fn reclaim_leaves_special_mapping_pages_alone() {
    let mm = new_mm();
    let p = mm.alloc_page().unwrap();
    let sm = Arc::new(SpecialMapping {
        name: "[vdso]",
        source: SpecialSource::Pages(vec![p]),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, PAGE, Prot::READ))
        .unwrap();
    mm.read_u64(a).unwrap();
    assert_eq!(mm.try_to_unmap(a, PAGE).unwrap().total(), 0);
    assert_eq!(mm.lookup(a).unwrap().pfn, p);
}

fn io_special(mm: &notifier_core::mm::Mm) -> u64 {
    let sm = Arc::new(SpecialMapping {
        name: "[hpet]",
        source: SpecialSource::Fault(Box::new(|f: &SpecialFault| Ok(Pfn(IO_BASE + 50 + f.pgoff)))),
    });
    mm.mmap(&MmapRequest::special(sm, 2 * PAGE, Prot::READ))
        .unwrap()
}

#[test]
fn raw_pfns_of_a_special_fault_callback_are_not_bad_ptes() {
    for no_special in [false, true] {
        let mm = mm_with(no_special);
        let a = io_special(&mm);
        assert!(mm.vma_at(a).unwrap().flags.contains(VmFlags::MIXEDMAP));
        mm.read_u64(a + PAGE).unwrap();
        let np = mm.vm_normal_page(a + PAGE).unwrap().unwrap();
        let want = if no_special {
            Row::MixedRaw
        } else {
            Row::SpecialPfnOrMixed
        };
        assert_eq!(np.row, want, "pte_special = {}", !no_special);
        assert_eq!(np.page, None);
        assert_eq!(
            mm.page_info(Pfn(IO_BASE + 51)),
            None,
            "raw PFN not refcounted"
        );
    }
}

#[test]
fn valid_frames_of_a_special_fault_callback_stay_refcounted() {
    let mm = new_mm();
    let p = mm.alloc_page().unwrap();
    let sm = Arc::new(SpecialMapping {
        name: "[vvar]",
        source: SpecialSource::Fault(Box::new(move |_: &SpecialFault| Ok(p))),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, PAGE, Prot::READ))
        .unwrap();
    mm.read_u64(a).unwrap();
    assert_eq!(mm.vm_normal_page(a).unwrap().unwrap().page, Some(p));
    assert_eq!(mm.page_info(p).unwrap().mapcount, 1);
    mm.munmap(a, PAGE).unwrap();
    mm.put_page(p).unwrap();
}

#[test]
fn seed002_fault_offset_is_relative_to_the_faulting_vma_after_a_split() {
    let mm = new_mm();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let sm = Arc::new(SpecialMapping {
        name: "[vvar]",
        source: SpecialSource::Fault(Box::new(move |f: &SpecialFault| {
            s2.lock().push(f.pgoff);
            Ok(Pfn(IO_BASE + f.pgoff))
        })),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, 4 * PAGE, Prot::READ))
        .unwrap();
    mm.read_u64(a + 3 * PAGE).unwrap();
    // Split: the upper part starts at a + PAGE with vm_pgoff 1;
    // `vmf->pgoff - vma->vm_pgoff` for a + 2 pages is 1, not 2.
    mm.munmap(a, PAGE).unwrap();
    mm.read_u64(a + 2 * PAGE).unwrap();
    assert_eq!(*seen.lock(), vec![3, 1]);
    assert_eq!(mm.lookup(a + 2 * PAGE).unwrap().pfn, Pfn(IO_BASE + 1));
}

#[test]
fn seed002_page_list_offset_is_relative_to_the_faulting_vma_too() {
    let mm = new_mm();
    let pages: Vec<Pfn> = (0..3).map(|_| mm.alloc_page().unwrap()).collect();
    let sm = Arc::new(SpecialMapping {
        name: "[vdso]",
        source: SpecialSource::Pages(pages.clone()),
    });
    let a = mm
        .mmap(&MmapRequest::special(sm, 3 * PAGE, Prot::READ))
        .unwrap();
    mm.munmap(a, PAGE).unwrap();
    mm.read_u64(a + PAGE).unwrap();
    assert_eq!(mm.lookup(a + PAGE).unwrap().pfn, pages[0]);
    assert_eq!(mm.read_u64(a + 2 * PAGE).map(|_| ()), Ok(()));
    assert_eq!(mm.lookup(a + 2 * PAGE).unwrap().pfn, pages[1]);
}
