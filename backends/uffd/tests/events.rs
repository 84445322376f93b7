//! Mapping changes of registered real memory become invalidations with the
//! right event and exact ranges, for range and interval subscribers.

mod common;

use std::sync::Arc;

use common::{monitor, wait_until, IRec, Rec, P};
use notifier_core::addr::PageRange;
use notifier_core::notifier::Event;
use notifier_uffd::{Advice, Fill, PageBuf, PageFault, Region, RegisterMode, UffdMonitor};

fn pattern_handler() -> Arc<dyn notifier_uffd::FaultHandler> {
    Arc::new(|f: &PageFault, page: &mut PageBuf| {
        page.fill(0x40 + f.pgoff as u8);
        Ok(Fill::Bytes)
    })
}

struct Setup {
    m: UffdMonitor,
    rec: Arc<Rec>,
    _reg: notifier_core::notifier::MmuNotifier,
}

fn setup() -> Option<Setup> {
    let m = monitor(UffdMonitor::builder(), pattern_handler())?;
    let rec = Arc::new(Rec::default());
    let reg = m.notifiers().register(rec.clone()).unwrap();
    Some(Setup { m, rec, _reg: reg })
}

fn ranges(m: &UffdMonitor) -> Vec<(u64, u64)> {
    m.registered()
        .iter()
        .map(|r| (r.range.start(), r.range.end()))
        .collect()
}

#[test]
fn munmap_gives_unmap_to_both_kinds_and_cuts_registration() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::anon(8 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    let irec =
        s.m.notifiers()
            .interval_subscribe(base, 8 * P, IRec::default())
            .unwrap();
    region.munmap(2 * P, 2 * P).unwrap();
    wait_until("unmap invalidation", || !s.rec.log.lock().is_empty());
    assert_eq!(
        *s.rec.log.lock(),
        vec![(Event::Unmap, base + 2 * P, base + 4 * P)]
    );
    assert_eq!(
        *irec.ops().log.lock(),
        vec![(Event::Unmap, base + 2 * P, base + 4 * P)]
    );
    assert_eq!(
        ranges(&s.m),
        vec![(base, base + 2 * P), (base + 4 * P, base + 8 * P)]
    );
    assert_eq!(s.m.stats().unmaps, 1);
    // The rest is still served.
    assert_eq!(region.read_u8(5 * P).unwrap(), 0x45);
}

#[test]
fn madvise_dontneed_gives_clear_and_page_is_served_again() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    assert_eq!(region.read_u8(P + 7).unwrap(), 0x41);
    region.write(P, &[9]).unwrap();
    region.madvise(P, 2 * P, Advice::DontNeed).unwrap();
    wait_until("remove invalidation", || !s.rec.log.lock().is_empty());
    assert_eq!(
        *s.rec.log.lock(),
        vec![(Event::Clear, base + P, base + 3 * P)]
    );
    // The page was zapped: the next access is a missing fault again.
    assert_eq!(region.read_u8(P).unwrap(), 0x41);
    wait_until("copies counted", || s.m.stats().copies == 2);
    let st = s.m.stats();
    assert_eq!((st.removes, st.missing_faults, st.copies), (1, 2, 2));
    assert_eq!(ranges(&s.m), vec![(base, base + 4 * P)]);
}

#[test]
fn madvise_free_gives_clear() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    region.read_u8(3 * P).unwrap();
    region.madvise(2 * P, 2 * P, Advice::Free).unwrap();
    wait_until("free invalidation", || !s.rec.log.lock().is_empty());
    assert_eq!(
        *s.rec.log.lock(),
        vec![(Event::Clear, base + 2 * P, base + 4 * P)]
    );
}

#[test]
fn madvise_remove_on_memfd_gives_clear() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::memfd(4 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    assert_eq!(
        region.read_u8(0).unwrap(),
        0x40,
        "shmem missing fault served"
    );
    region.madvise(0, P, Advice::Remove).unwrap();
    wait_until("remove invalidation", || !s.rec.log.lock().is_empty());
    assert_eq!(*s.rec.log.lock(), vec![(Event::Clear, base, base + P)]);
    assert_eq!(
        region.read_u8(0).unwrap(),
        0x40,
        "hole punched: served again"
    );
}

#[test]
fn mremap_gives_unmap_of_old_range_and_moves_registration() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let mut region = Region::anon(4 * P).unwrap();
    let old = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    assert_eq!(region.read_u8(0).unwrap(), 0x40);
    let new = region.mremap_move().unwrap();
    assert_ne!(new, old);
    wait_until("remap invalidation", || {
        s.m.stats().remaps == 1 && !s.rec.log.lock().is_empty()
    });
    assert!(
        s.rec.log.lock().contains(&(Event::Unmap, old, old + 4 * P)),
        "{:?}",
        s.rec.log.lock()
    );
    assert_eq!(ranges(&s.m), vec![(new, new + 4 * P)]);
    // The moved page kept its contents; an unpopulated one is served with
    // its offset relative to the moved registration.
    assert_eq!(region.read_u8(0).unwrap(), 0x40);
    assert_eq!(region.read_u8(2 * P).unwrap(), 0x42);
}

#[test]
fn map_fixed_over_gives_unmap_and_new_memory_is_ordinary() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::anon(6 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    region.map_fixed_over(2 * P, 2 * P).unwrap();
    wait_until("unmap invalidation", || !s.rec.log.lock().is_empty());
    assert_eq!(
        *s.rec.log.lock(),
        vec![(Event::Unmap, base + 2 * P, base + 4 * P)]
    );
    assert_eq!(
        ranges(&s.m),
        vec![(base, base + 2 * P), (base + 4 * P, base + 6 * P)]
    );
    assert_eq!(
        region.read_u8(2 * P).unwrap(),
        0,
        "new mapping is not registered"
    );
    assert_eq!(region.read_u8(4 * P).unwrap(), 0x44);
    wait_until("copy counted", || s.m.stats().copies == 1);
    assert_eq!(s.m.stats().missing_faults, 1);
}

#[test]
fn register_errors_are_typed_and_lose_nothing() {
    let Some(s) = setup() else { return };
    let _t = s.m.spawn().unwrap();
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    s.m.register_range(&region, 0, 2 * P, RegisterMode::MISSING)
        .unwrap();
    assert!(matches!(
        s.m.register_range(&region, P, 2 * P, RegisterMode::MISSING),
        Err(notifier_uffd::UffdError::Overlap { .. })
    ));
    assert!(matches!(
        s.m.register_range(&region, 3 * P, 2 * P, RegisterMode::MISSING),
        Err(notifier_uffd::UffdError::OutsideMapping)
    ));
    assert!(matches!(
        s.m.register_range(&region, 100, P, RegisterMode::MISSING),
        Err(notifier_uffd::UffdError::Range(_))
    ));
    // MINOR is refused on anonymous memory by the kernel.
    assert!(matches!(
        s.m.register_range(&region, 2 * P, P, RegisterMode::MINOR),
        Err(notifier_uffd::UffdError::UnsupportedMode(_))
    ));
    assert!(matches!(
        s.m.unregister(PageRange::new(base + P, 2 * P).unwrap()),
        Err(notifier_uffd::UffdError::NotRegistered { .. })
    ));
    assert_eq!(ranges(&s.m), vec![(base, base + 2 * P)]);
    s.m.unregister(PageRange::new(base + P, P).unwrap())
        .unwrap();
    assert_eq!(ranges(&s.m), vec![(base, base + P)]);
    // The unregistered page is ordinary memory again.
    assert_eq!(region.read_u8(P).unwrap(), 0);
}

#[test]
fn panicking_subscriber_is_reported_and_nothing_hangs() {
    struct Bad;
    impl notifier_core::notifier::MmuNotifierOps for Bad {
        fn hooks(&self) -> notifier_core::notifier::Hooks {
            notifier_core::notifier::Hooks::START
        }
        fn invalidate_range_start(
            &self,
            _: &notifier_core::notifier::InvalidateRange,
        ) -> Result<(), notifier_core::notifier::Again> {
            panic!("subscriber bug")
        }
    }
    let Some(m) = monitor(UffdMonitor::builder(), pattern_handler()) else {
        return;
    };
    let _bad = m.notifiers().register(Arc::new(Bad)).unwrap();
    let _t = m.spawn().unwrap();
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    m.register(&region, RegisterMode::MISSING).unwrap();
    region.munmap(0, P).unwrap();
    wait_until("failure reported", || m.stats().subscriber_failures == 1);
    assert!(m
        .last_error()
        .unwrap()
        .contains("panicked in invalidate_range_start"));
    // The registry was still updated and faults are still served.
    assert_eq!(ranges(&m), vec![(base + P, base + 4 * P)]);
    assert_eq!(region.read_u8(2 * P).unwrap(), 0x42);
}

#[test]
fn poll_driven_handle_pending_applies_events() {
    let Some(s) = setup() else { return };
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    s.m.register(&region, RegisterMode::MISSING).unwrap();
    // madvise blocks until its event is read: drive the monitor by hand
    // from this thread while another thread madvises.
    std::thread::scope(|sc| {
        let h = sc.spawn(|| region.madvise(0, P, Advice::DontNeed).unwrap());
        let mut n = 0;
        while n == 0 {
            n += s.m.handle_pending().unwrap();
            std::thread::yield_now();
        }
        h.join().unwrap();
    });
    assert_eq!(*s.rec.log.lock(), vec![(Event::Clear, base, base + P)]);
    // Nobody drives the monitor any more: unregister before the region is
    // unmapped (munmap would wait for its UNMAP event to be read).
    s.m.unregister(PageRange::new(base, 4 * P).unwrap())
        .unwrap();
}
