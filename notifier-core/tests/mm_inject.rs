//! The fault-injection test switches change behaviour (so the toolkit's
//! oracle tests can rely on them).

mod common;

use std::sync::{Arc, Weak};

use common::*;
use notifier_core::frame::Pfn;
use notifier_core::mm::{Mm, MmapRequest, Prot, Pte};
use notifier_core::notifier::{Event, Hooks, InvalidateRange, MmuNotifierOps};
use parking_lot::Mutex;

#[test]
fn skip_event_removes_the_bracket_but_still_changes_ptes() {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 1).unwrap();
    mm.inject().set_skip_event(Some(Event::Unmap));
    assert_eq!(mm.inject().skip_event(), Some(Event::Unmap));
    rec.take();
    mm.munmap(a, 2 * PAGE).unwrap();
    assert!(rec.starts().is_empty(), "no bracket was opened");
    assert_eq!(mm.pte(a), Pte::None, "the PTE changed anyway");
    let err = check_discipline(&rec.events()).unwrap_err();
    assert!(err.contains("without a covering bracket"), "{err}");
    // Other events are still bracketed; clearing the switch restores Unmap.
    let b = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.write_u64(b, 1).unwrap();
    rec.take();
    mm.try_to_unmap(b, PAGE).unwrap();
    assert_eq!(rec.starts(), vec![(b, b + PAGE, Event::Clear)]);
    mm.inject().set_skip_event(None);
    mm.munmap(b, PAGE).unwrap();
    assert!(rec.starts().contains(&(b, b + PAGE, Event::Unmap)));
}

/// Records, at each bracket end, whether a watched frame was still held.
struct EndProbe {
    mm: Mutex<Weak<Mm>>,
    watch: Mutex<Option<Pfn>>,
    held_at_end: Mutex<Vec<bool>>,
}

impl MmuNotifierOps for EndProbe {
    fn hooks(&self) -> Hooks {
        Hooks::START_END
    }
    fn invalidate_range_end(&self, _r: &InvalidateRange) {
        if let (Some(mm), Some(p)) = (self.mm.lock().upgrade(), *self.watch.lock()) {
            self.held_at_end.lock().push(mm.page_info(p).is_some());
        }
    }
}

fn probe_run(free_before_end: bool) -> Vec<bool> {
    let mm = new_mm();
    let probe = Arc::new(EndProbe {
        mm: Mutex::new(Arc::downgrade(&mm)),
        watch: Mutex::new(None),
        held_at_end: Mutex::new(vec![]),
    });
    let _h = mm.notifiers().register(probe.clone()).unwrap();
    let a = mm.mmap(&MmapRequest::anon(PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 1).unwrap();
    *probe.watch.lock() = Some(mm.lookup(a).unwrap().pfn);
    mm.inject().set_free_before_end(free_before_end);
    mm.munmap(a, PAGE).unwrap();
    let r = probe.held_at_end.lock().clone();
    r
}

#[test]
fn frames_are_released_only_after_the_bracket_ends() {
    assert_eq!(probe_run(false), vec![true]);
}

#[test]
fn free_before_end_releases_frames_inside_the_bracket() {
    assert_eq!(probe_run(true), vec![false]);
}
