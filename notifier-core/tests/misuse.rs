//! Misuse of the public API is a typed error, never memory unsafety: a
//! frame freed twice, a reference dropped twice, a free frame inserted, a
//! TLB or mirror of impossible geometry, a detached mirror's leftovers.

mod common;

use std::sync::Arc;

use common::{new_mm, PAGE};
use notifier_core::frame::{FrameError, FrameStore, HeapFrames, Pfn};
use notifier_core::mm::{Backing, MmError, MmapRequest, Prot};
use notifier_core::notifier::{Event, InvalidateRange};
use notifier_core::secondary::*;
use notifier_core::verify::TestPrimary;
use notifier_core::{PageRange, RangeError};

#[test]
fn heap_frames_refuse_a_second_free() {
    let f = HeapFrames::new(0x100, 2);
    let p = f.alloc().unwrap();
    assert_eq!(f.try_free(p), Ok(()));
    assert_eq!(f.try_free(p), Err(FrameError::NotAllocated(p.0)));
    // The silent `free` of the trait ignores it too: the frame is not on
    // the free list twice, so two allocations get two different frames.
    f.free(p);
    let (a, b) = (f.alloc().unwrap(), f.alloc().unwrap());
    assert_ne!(a, b);
    assert_eq!(f.alloc(), Err(FrameError::OutOfMemory));
    assert_eq!(f.allocated(), 2);
    assert_eq!(
        f.try_free(Pfn(0x100 + 7)),
        Err(FrameError::InvalidPfn(0x107))
    );
    assert_eq!(
        f.try_free(Pfn(0x100 + 1)).is_ok(),
        a.0 == 0x101 || b.0 == 0x101
    );
}

#[test]
fn put_page_twice_on_a_mapped_frame_is_refused() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    mm.insert_page(m, p).unwrap();
    mm.write_u64(m, 0xfeed).unwrap();
    assert_eq!(mm.put_page(p), Ok(()), "the caller's own reference");
    assert_eq!(mm.put_page(p), Err(MmError::FrameNotHeld { pfn: p.0 }));
    let info = mm.page_info(p).unwrap();
    assert_eq!(
        (info.refcount, info.mapcount),
        (1, 1),
        "the PTE's reference stays"
    );
    assert_eq!(mm.read_u64(m).unwrap(), 0xfeed);
    mm.munmap(m, PAGE).unwrap();
    assert_eq!(mm.page_info(p), None, "freed with its last mapping");
    assert_eq!(mm.put_page(p), Err(MmError::FrameNotHeld { pfn: p.0 }));
}

#[test]
fn insert_page_of_a_free_frame_is_refused() {
    let mm = new_mm();
    let m = mm
        .mmap(&MmapRequest::new(PAGE, Prot::RW, Backing::MixedMap).shared())
        .unwrap();
    let p = mm.alloc_page().unwrap();
    mm.put_page(p).unwrap();
    assert_eq!(
        mm.insert_page(m, p),
        Err(MmError::FrameNotHeld { pfn: p.0 })
    );
    assert!(mm.pte(m).present().is_none());
}

#[test]
fn invalidate_range_is_only_built_valid() {
    let r = InvalidateRange::from_bounds(0x1000, 0x3000, Event::Unmap).unwrap();
    assert_eq!(
        (r.start(), r.end(), r.event(), r.blockable()),
        (0x1000, 0x3000, Event::Unmap, true)
    );
    assert_eq!(r.page_range(), PageRange::new(0x1000, 0x2000).unwrap());
    assert!(!r.non_blocking().blockable());
    assert_eq!(
        InvalidateRange::from_bounds(0x3000, 0x1000, Event::Unmap),
        Err(RangeError::Empty)
    );
    assert!(matches!(
        InvalidateRange::from_bounds(0x1001, 0x3000, Event::Unmap),
        Err(RangeError::Misaligned { .. })
    ));
}

#[test]
fn tlb_with_huge_sets_is_checked() {
    let huge = TlbConfig {
        sets: usize::MAX,
        ways: 8,
    };
    assert_eq!(
        Tlb::try_new(huge).err(),
        Some(TlbError::TooManySets { sets: usize::MAX })
    );
    // `new` caps instead of overflowing.
    let t = Tlb::new(TlbConfig {
        sets: Tlb::MAX_SETS + 1,
        ways: 1,
    });
    assert_eq!(t.capacity(), Tlb::MAX_SETS);
    assert!(Tlb::try_new(TlbConfig { sets: 64, ways: 8 }).is_ok());
}

fn primary() -> Arc<TestPrimary> {
    TestPrimary::new(PageRange::new(0, 16 * PAGE).unwrap(), 64)
}

#[test]
fn mirror_beyond_the_48_bit_external_space_is_refused() {
    let p = primary();
    for (base, len) in [(EXT_ADDR_LIMIT - PAGE, 2 * PAGE), (!0xfff, 2 * PAGE)] {
        let cfg = MirrorConfig {
            ext_base: base,
            ..MirrorConfig::identity(0, len)
        };
        assert_eq!(
            Mirror::<TestPrimary, Iova>::new(p.clone(), cfg, None).err(),
            Some(MirrorError::OutOfRange(base))
        );
    }
    let cfg = MirrorConfig {
        ext_base: EXT_ADDR_LIMIT - 2 * PAGE,
        ..MirrorConfig::identity(0, 2 * PAGE)
    };
    let m = Mirror::<TestPrimary, Iova>::new(p, cfg, None).unwrap();
    m.write_u64(0, PAGE, 5).unwrap();
    assert_eq!(
        m.read_u64(0, PAGE).unwrap(),
        5,
        "the last external page works"
    );
}

#[test]
fn detach_drops_every_translation() {
    for flush in [FlushPolicy::InCallback, FlushPolicy::AtEnd] {
        let p = primary();
        let cfg = MirrorConfig {
            flush,
            ..MirrorConfig::identity(0, 4 * PAGE)
        };
        let m = Mirror::<TestPrimary, Va>::new(p.clone(), cfg, None).unwrap();
        for i in 0..4 {
            m.write_u64(0, i * PAGE, i).unwrap();
        }
        assert!(m.translate(0, 0).is_some());
        assert_eq!(m.ept().mapped_pages(), 4);
        m.detach().unwrap();
        assert_eq!(
            m.ept().mapped_pages(),
            0,
            "{flush:?}: external table emptied"
        );
        for i in 0..4 {
            assert_eq!(m.translate(0, i * PAGE), None, "{flush:?}: TLB flushed");
        }
        assert!(m.detach().is_err(), "second detach");
        // A detached mirror never fills again: nothing would invalidate it.
        assert!(m.read_u64(0, PAGE).is_err(), "{flush:?}: fill after detach");
        assert_eq!(m.ept().mapped_pages(), 0, "{flush:?}: nothing installed");
    }
}
