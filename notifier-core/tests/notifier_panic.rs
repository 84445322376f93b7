//! Panic safety: a subscriber that panics in any hook leaves the machinery
//! consistent (`S` even when idle, no section counted, so later
//! `read_begin`, `register`, `release` and `exit` return), the operation's
//! caller gets `SubscriberPanicked` naming the hook, and the subscriber is
//! failed (unsubscribed, never called again).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{new_mm, PAGE};
use notifier_core::mm::{Advice, MmError, MmapRequest, Prot};
use notifier_core::notifier::*;
use notifier_core::PageRange;

/// A range subscriber with every hook that panics in `bad` and counts the
/// calls of every hook.
struct Bomb {
    hooks: Hooks,
    bad: Hook,
    calls: AtomicUsize,
}

impl Bomb {
    fn new(hooks: Hooks, bad: Hook) -> Arc<Self> {
        Arc::new(Self {
            hooks,
            bad,
            calls: AtomicUsize::new(0),
        })
    }
    fn hit(&self, h: Hook) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if h == self.bad {
            panic!("subscriber bug in {h}");
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl MmuNotifierOps for Bomb {
    fn hooks(&self) -> Hooks {
        self.hooks
    }
    fn invalidate_range_start(&self, _: &InvalidateRange) -> Result<(), Again> {
        self.hit(Hook::InvalidateRangeStart);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &InvalidateRange) {
        self.hit(Hook::InvalidateRangeEnd);
    }
    fn clear(&self, _: u64) {
        self.hit(Hook::Clear);
    }
    fn clear_flush_young(&self, _: u64, _: u64) -> bool {
        self.hit(Hook::ClearFlushYoung);
        true
    }
    fn clear_young(&self, _: u64, _: u64) -> bool {
        self.hit(Hook::ClearYoung);
        true
    }
    fn test_young(&self, _: u64) -> bool {
        self.hit(Hook::TestYoung);
        true
    }
    fn invalidate_secondary_tlbs(&self, _: u64, _: u64) {
        self.hit(Hook::InvalidateSecondaryTlbs);
    }
    fn release(&self) {
        self.hit(Hook::Release);
    }
}

/// An interval subscriber that panics in `invalidate` or `release`.
struct IntervalBomb {
    bad: Hook,
    calls: Arc<AtomicUsize>,
}

impl IntervalNotifierOps for IntervalBomb {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        seq: u64,
    ) -> Result<(), Again> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(self.bad != Hook::Invalidate, "subscriber bug in invalidate");
        sub.set_seq(seq);
        Ok(())
    }
    fn release(&self, _: &IntervalNotifier) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        assert!(self.bad != Hook::Release, "subscriber bug in release");
    }
}

/// A well-behaved interval subscriber.
struct Quiet;

impl IntervalNotifierOps for Quiet {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        seq: u64,
    ) -> Result<(), Again> {
        sub.set_seq(seq);
        Ok(())
    }
}

const FULL: Hooks = Hooks::START
    .union(Hooks::END)
    .union(Hooks::CLEAR)
    .union(Hooks::AGING)
    .union(Hooks::RELEASE);
const TLB: Hooks = Hooks::TLB.union(Hooks::RELEASE);

fn range(start: u64, len: u64) -> InvalidateRange {
    InvalidateRange::new(PageRange::new(start, len).unwrap(), Event::Clear)
}

fn panicked(hook: Hook) -> NotifierError {
    NotifierError::SubscriberPanicked { hook }
}

/// Run `f` on another thread; fail (instead of hanging) if it does not
/// return within a generous bound.
fn returns<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung after a subscriber panic"))
}

/// The machinery is usable: `S` is even, an interval reader does not wait,
/// a new range subscriber registers (grace period drains), a bracket runs,
/// and release returns.
fn assert_usable(subs: &Arc<NotifierSubscriptions>) {
    assert_eq!(subs.seq() % 2, 0, "S left odd");
    let s = subs.clone();
    returns("read_begin/register/bracket/release", move || {
        let sub = s.interval_subscribe(0, 0x10000, Quiet).unwrap();
        let seq = sub.read_begin();
        assert!(!sub.read_retry(seq));
        let n = s.register(Bomb::new(FULL, Hook::Release)).unwrap();
        s.invalidate_range_start(&range(0x20000, PAGE))
            .unwrap()
            .end();
        n.unregister().unwrap();
        drop(sub);
        s.release();
        assert!(s.is_released());
    });
}

fn failed_and_quiet(b: &Bomb, n: &MmuNotifier, subs: &NotifierSubscriptions) {
    assert!(n.has_failed(), "not marked failed");
    assert!(!n.is_registered());
    let before = b.calls();
    subs.invalidate_range_start(&range(0, PAGE))
        .unwrap()
        .try_end()
        .unwrap();
    assert!(subs.clear_young(0, PAGE).is_ok());
    assert_eq!(subs.invalidate_secondary_tlbs(0, PAGE), Ok(()));
    assert_eq!(b.calls(), before, "a failed subscriber was called again");
}

#[test]
fn panic_in_invalidate_range_start_abandons_the_bracket() {
    let subs = NotifierSubscriptions::new();
    let good = Bomb::new(FULL, Hook::Release);
    let _g = subs.register(good.clone()).unwrap();
    let b = Bomb::new(FULL, Hook::InvalidateRangeStart);
    let n = subs.register(b.clone()).unwrap();
    let sub = subs.interval_subscribe(0, 0x10000, Quiet).unwrap();
    let r = subs.invalidate_range_start(&range(0, PAGE));
    assert_eq!(r.err(), Some(panicked(Hook::InvalidateRangeStart)));
    // The subscriber before it got its start and its end.
    assert_eq!(good.calls(), 2);
    assert!(!sub.read_retry(sub.read_begin()));
    failed_and_quiet(&b, &n, &subs);
    drop(sub);
    assert_usable(&subs);
}

#[test]
fn panic_in_invalidate_range_end_still_ends_the_bracket() {
    let subs = NotifierSubscriptions::new();
    let b = Bomb::new(FULL, Hook::InvalidateRangeEnd);
    let n = subs.register(b.clone()).unwrap();
    let good = Bomb::new(FULL, Hook::Release);
    let _g = subs.register(good.clone()).unwrap();
    let sub = subs.interval_subscribe(0, 0x10000, Quiet).unwrap();
    let inv = subs.invalidate_range_start(&range(0, PAGE)).unwrap();
    assert_eq!(subs.seq() % 2, 1);
    assert_eq!(inv.try_end(), Err(panicked(Hook::InvalidateRangeEnd)));
    assert_eq!(good.calls(), 2, "the next subscriber still got its end");
    assert_eq!(subs.seq() % 2, 0);
    failed_and_quiet(&b, &n, &subs);
    drop(sub);
    assert_usable(&subs);
}

#[test]
fn panic_in_invalidate_range_end_on_drop_still_ends_the_bracket() {
    let subs = NotifierSubscriptions::new();
    let b = Bomb::new(FULL, Hook::InvalidateRangeEnd);
    let n = subs.register(b.clone()).unwrap();
    let _sub = subs.interval_subscribe(0, 0x10000, Quiet).unwrap();
    drop(subs.invalidate_range_start(&range(0, PAGE)).unwrap());
    failed_and_quiet(&b, &n, &subs);
    assert_usable(&subs);
}

#[test]
fn panic_in_interval_invalidate_abandons_the_bracket() {
    let subs = NotifierSubscriptions::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let bad = subs
        .interval_subscribe(
            0,
            0x10000,
            IntervalBomb {
                bad: Hook::Invalidate,
                calls: calls.clone(),
            },
        )
        .unwrap();
    let r = subs.invalidate_range_start(&range(0, PAGE));
    assert_eq!(r.err(), Some(panicked(Hook::Invalidate)));
    assert!(bad.has_failed());
    assert!(!bad.is_live());
    assert_eq!(
        subs.interval_count(),
        0,
        "the failed subscription left the index"
    );
    subs.invalidate_range_start(&range(0, PAGE)).unwrap().end();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "called again after failing"
    );
    // Its owner's unsubscribe (drop) reports it gone, never hangs.
    assert_eq!(bad.unsubscribe(), Err(NotifierError::NotSubscribed));
    drop(bad);
    assert_usable(&subs);
}

#[test]
fn panic_in_clear_is_reported_at_the_end() {
    let subs = NotifierSubscriptions::new();
    let b = Bomb::new(FULL, Hook::Clear);
    let n = subs.register(b.clone()).unwrap();
    let good = Bomb::new(FULL, Hook::Release);
    let _g = subs.register(good.clone()).unwrap();
    let inv = subs.invalidate_range_start(&range(0, 2 * PAGE)).unwrap();
    inv.clear(0);
    inv.clear(PAGE);
    assert_eq!(inv.try_end(), Err(panicked(Hook::Clear)));
    // good: start, 2 clears, end.
    assert_eq!(good.calls(), 4);
    // b: start, the clear that panicked; no second clear and no end.
    assert_eq!(b.calls(), 2);
    failed_and_quiet(&b, &n, &subs);
    assert_usable(&subs);
}

#[test]
fn panic_in_each_aging_hook_is_contained() {
    type Call = fn(&NotifierSubscriptions) -> Result<bool, NotifierError>;
    let cases: [(Hook, Call); 3] = [
        (Hook::ClearFlushYoung, |s| s.clear_flush_young(0, PAGE)),
        (Hook::ClearYoung, |s| s.clear_young(0, PAGE)),
        (Hook::TestYoung, |s| s.test_young(0)),
    ];
    for (hook, call) in cases {
        let subs = NotifierSubscriptions::new();
        let b = Bomb::new(FULL, hook);
        let n = subs.register(b.clone()).unwrap();
        let good = Bomb::new(FULL, Hook::Release);
        let _g = subs.register(good.clone()).unwrap();
        assert_eq!(call(&subs), Err(panicked(hook)), "{hook}");
        assert_eq!(good.calls(), 1, "{hook}: the other subscriber was asked");
        assert_eq!(call(&subs), Ok(true), "{hook}: only the good one answers");
        failed_and_quiet(&b, &n, &subs);
        assert_usable(&subs);
    }
}

#[test]
fn panic_in_invalidate_secondary_tlbs_is_contained() {
    // Stand-alone and inside a bracket.
    for in_bracket in [false, true] {
        let subs = NotifierSubscriptions::new();
        let b = Bomb::new(TLB, Hook::InvalidateSecondaryTlbs);
        let n = subs.register(b.clone()).unwrap();
        let good = Bomb::new(TLB, Hook::Release);
        let _g = subs.register(good.clone()).unwrap();
        let r = if in_bracket {
            let inv = subs.invalidate_range_start(&range(0, PAGE)).unwrap();
            inv.invalidate_secondary_tlbs(0, PAGE);
            inv.try_end()
        } else {
            subs.invalidate_secondary_tlbs(0, PAGE)
        };
        assert_eq!(r, Err(panicked(Hook::InvalidateSecondaryTlbs)));
        assert_eq!(good.calls(), 1);
        failed_and_quiet(&b, &n, &subs);
        assert_usable(&subs);
    }
}

#[test]
fn panic_in_release_still_releases_everyone() {
    let subs = NotifierSubscriptions::new();
    let b = Bomb::new(FULL, Hook::Release);
    let n = subs.register(b.clone()).unwrap();
    let good = Bomb::new(FULL, Hook::ClearYoung);
    let _g = subs.register(good.clone()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let ib = subs
        .interval_subscribe(
            0,
            PAGE,
            IntervalBomb {
                bad: Hook::Release,
                calls: calls.clone(),
            },
        )
        .unwrap();
    let s = subs.clone();
    let r = returns("release", move || s.try_release());
    assert_eq!(r, Err(panicked(Hook::Release)));
    assert!(n.has_failed());
    assert!(ib.has_failed());
    assert_eq!(good.calls(), 1, "the next subscriber was released too");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(subs.is_released());
    assert_eq!(subs.interval_count(), 0);
    assert_eq!(subs.seq() % 2, 0);
    assert_eq!(subs.try_release(), Ok(()), "second release does nothing");
}

// ---------------------------------------------------------------------------
// Through the primary address space.

#[test]
fn mm_operations_report_and_survive_a_panicking_subscriber() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(4 * PAGE, Prot::RW)).unwrap();
    mm.write_u64(a, 7).unwrap();

    // Start: munmap is abandoned, nothing changed; a retry works.
    let b = Bomb::new(FULL, Hook::InvalidateRangeStart);
    let n = mm.notifiers().register(b.clone()).unwrap();
    let r = mm.munmap(a, PAGE);
    assert_eq!(
        r,
        Err(MmError::Notifier(panicked(Hook::InvalidateRangeStart)))
    );
    assert_eq!(mm.read_u64(a).unwrap(), 7, "abandoned before any change");
    assert!(n.has_failed());

    // Clear: madvise completes and reports.
    let b = Bomb::new(FULL, Hook::Clear);
    let n = mm.notifiers().register(b.clone()).unwrap();
    let r = mm.madvise(a, PAGE, Advice::DontNeed);
    assert_eq!(r, Err(MmError::Notifier(panicked(Hook::Clear))));
    assert_eq!(mm.read_u64(a).unwrap(), 0, "the change completed");
    assert!(n.has_failed());

    // End: munmap completes and reports.
    let b = Bomb::new(FULL, Hook::InvalidateRangeEnd);
    let n = mm.notifiers().register(b.clone()).unwrap();
    let r = mm.munmap(a, PAGE);
    assert_eq!(
        r,
        Err(MmError::Notifier(panicked(Hook::InvalidateRangeEnd)))
    );
    assert!(mm.vma_at(a).is_none(), "the unmap completed");
    assert!(n.has_failed());

    // Aging.
    mm.write_u64(a + PAGE, 1).unwrap();
    let b = Bomb::new(FULL, Hook::ClearFlushYoung);
    let n = mm.notifiers().register(b.clone()).unwrap();
    let r = mm.age_range(a + PAGE, PAGE, true);
    assert_eq!(r, Err(MmError::Notifier(panicked(Hook::ClearFlushYoung))));
    assert!(n.has_failed());
    let b = Bomb::new(FULL, Hook::TestYoung);
    let n = mm.notifiers().register(b.clone()).unwrap();
    assert_eq!(
        mm.test_young(a + PAGE),
        Err(MmError::Notifier(panicked(Hook::TestYoung)))
    );
    assert!(n.has_failed());

    // Release, through exit.
    let b = Bomb::new(FULL, Hook::Release);
    let n = mm.notifiers().register(b.clone()).unwrap();
    let m = mm.clone();
    let r = returns("exit", move || m.try_exit());
    assert_eq!(r, Err(MmError::Notifier(panicked(Hook::Release))));
    assert!(n.has_failed());
    assert!(mm.is_exited());
    assert_eq!(mm.notifiers().seq() % 2, 0);
}
