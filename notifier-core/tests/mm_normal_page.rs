//! Every row of the `vm_normal_page` decision table (seeds 000 and 001),
//! one test per row; docs/SEMANTICS.md names them.

mod common;

use common::*;
use notifier_core::frame::{FrameStore, Pfn};
use notifier_core::mm::{
    vm_normal_page, Backing, MmapRequest, NormalPageEnv, PageArray, PresentPte, Prot, Row, VmFlags,
    Vma, VmaKind,
};

fn anon_vma() -> Vma {
    Vma {
        start: 0x10000,
        end: 0x20000,
        flags: VmFlags::READ | VmFlags::MAYWRITE,
        pgoff: 0,
        kind: VmaKind::Anon,
        pages: None,
    }
}

// ---- with pte_special (seed 000's path) ----

#[test]
fn row_special_page_array_returns_the_array_page() {
    let mm = new_mm();
    let pages: Vec<Pfn> = (0..4).map(|_| mm.alloc_page().unwrap()).collect();
    let arr = PageArray::new(pages.clone(), |_| {});
    let a = mm
        .mmap(
            &MmapRequest::new(4 * PAGE, Prot::RW, Backing::PfnMapEmpty)
                .shared()
                .with_pages(arr),
        )
        .unwrap();
    // The PTE holds a foreign (raw) frame number; the array says which page it is.
    mm.insert_pfn(a + 2 * PAGE, Pfn(IO_BASE + 9)).unwrap();
    let d = mm.vm_normal_page(a + 2 * PAGE).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::SpecialPageArray, Some(pages[2])));
}

#[test]
fn row_special_page_array_short_returns_none() {
    let mm = new_mm();
    let arr = PageArray::new(vec![mm.alloc_page().unwrap()], |_| {});
    let a = mm
        .mmap(
            &MmapRequest::new(2 * PAGE, Prot::RW, Backing::PfnMapEmpty)
                .shared()
                .with_pages(arr),
        )
        .unwrap();
    mm.insert_pfn(a + PAGE, Pfn(IO_BASE)).unwrap();
    let d = mm.vm_normal_page(a + PAGE).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::SpecialPageArrayShort, None));
}

#[test]
fn row_special_pfnmap_or_mixedmap_returns_none() {
    let mm = new_mm();
    let a = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE, 2 * PAGE, Prot::RW).shared())
        .unwrap();
    let d = mm.vm_normal_page(a + PAGE).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::SpecialPfnOrMixed, None));
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    mm.insert_pfn(m, Pfn(IO_BASE + 3)).unwrap();
    assert_eq!(
        mm.vm_normal_page(m).unwrap().unwrap().row,
        Row::SpecialPfnOrMixed
    );
}

#[test]
fn row_special_zero_page_returns_none() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.read_u64(a).unwrap();
    let d = mm.vm_normal_page(a).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::SpecialZero, None));
}

#[test]
fn row_special_bad_pte_returns_none() {
    let valid = |_: Pfn| true;
    let env = NormalPageEnv {
        pte_special: true,
        zero: Pfn(1),
        pfn_valid: &valid,
    };
    let d = vm_normal_page(
        &anon_vma(),
        0x10000,
        PresentPte::new(Pfn(77), false, true),
        &env,
    );
    assert_eq!((d.row, d.page), (Row::SpecialBad, None));
}

#[test]
fn row_check_pfn_invalid_returns_none() {
    let valid = |p: Pfn| p.0 < 100;
    for pte_special in [true, false] {
        let env = NormalPageEnv {
            pte_special,
            zero: Pfn(1),
            pfn_valid: &valid,
        };
        let d = vm_normal_page(
            &anon_vma(),
            0x10000,
            PresentPte::new(Pfn(500), true, false),
            &env,
        );
        assert_eq!((d.row, d.page), (Row::InvalidPfn, None));
    }
}

#[test]
fn row_normal_page_returns_the_frame() {
    for mm in [new_mm(), new_mm_no_special()] {
        let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
        mm.write_u64(a, 1).unwrap();
        let pfn = mm.lookup(a).unwrap().pfn;
        let d = mm.vm_normal_page(a).unwrap().unwrap();
        assert_eq!((d.row, d.page), (Row::Normal, Some(pfn)));
    }
}

#[test]
fn row_special_path_cowed_pfnmap_page_is_normal() {
    let mm = new_mm();
    let a = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE, PAGE, Prot::RW))
        .unwrap();
    mm.write_u64(a, 3).unwrap();
    let d = mm.vm_normal_page(a).unwrap().unwrap();
    assert_eq!(d.row, Row::Normal);
    assert!(mm.frames().pfn_valid(d.page.unwrap()));
}

// ---- without pte_special (seed 001's path) ----

#[test]
fn row_mixedmap_raw_pfn_returns_none() {
    let mm = new_mm_no_special();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    mm.insert_pfn(m, Pfn(IO_BASE + 1)).unwrap();
    let d = mm.vm_normal_page(m).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::MixedRaw, None));
    assert!(
        mm.page_info(Pfn(IO_BASE + 1)).is_none(),
        "raw PFNs are never refcounted"
    );
}

#[test]
fn row_mixedmap_valid_frame_returns_the_frame() {
    let mm = new_mm_no_special();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    mm.insert_page(m, p).unwrap();
    let d = mm.vm_normal_page(m).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::MixedValid, Some(p)));
    assert_eq!(
        mm.page_info(p).unwrap().refcount,
        2,
        "valid frames are refcounted"
    );
}

#[test]
fn row_pfnmap_linear_pfn_returns_none() {
    let mm = new_mm_no_special();
    let a = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE + 4, 3 * PAGE, Prot::RW).shared())
        .unwrap();
    let d = mm.vm_normal_page(a + 2 * PAGE).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::PfnMapLinear, None));
}

#[test]
fn row_pfnmap_nonlinear_in_shared_mapping_returns_none() {
    let mm = new_mm_no_special();
    let a = mm
        .mmap(&MmapRequest::new(2 * PAGE, Prot::RW, Backing::PfnMapEmpty).shared())
        .unwrap();
    // vm_pgoff is 0: PFN IO_BASE + 7 at page 1 breaks the linearity rule.
    mm.insert_pfn(a + PAGE, Pfn(IO_BASE + 7)).unwrap();
    let d = mm.vm_normal_page(a + PAGE).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::PfnMapNotCow, None));
}

#[test]
fn row_pfnmap_cowed_page_in_cow_mapping_returns_the_frame() {
    let mm = new_mm_no_special();
    let io = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE + 5, PAGE, Prot::RW).shared())
        .unwrap();
    mm.write_u64(io, 0xfeed).unwrap();
    let a = mm
        .mmap(&MmapRequest::pfnmap(IO_BASE + 5, PAGE, Prot::RW))
        .unwrap();
    assert_eq!(mm.read_u64(a).unwrap(), 0xfeed);
    assert_eq!(
        mm.vm_normal_page(a).unwrap().unwrap().row,
        Row::PfnMapLinear
    );
    mm.write_u64(a + 8, 1).unwrap();
    let d = mm.vm_normal_page(a).unwrap().unwrap();
    assert_eq!(d.row, Row::PfnMapCowed);
    assert_eq!(d.page, Some(mm.lookup(a).unwrap().pfn));
    assert_eq!(
        mm.read_u64(a).unwrap(),
        0xfeed,
        "COW copied the device page"
    );
    assert_eq!(
        mm.read_u64(io + 8).unwrap(),
        0,
        "the device page is untouched"
    );
}

#[test]
fn row_zero_page_without_special_returns_none() {
    let mm = new_mm_no_special();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.read_u64(a).unwrap();
    let d = mm.vm_normal_page(a).unwrap().unwrap();
    assert_eq!((d.row, d.page), (Row::Zero, None));
}
