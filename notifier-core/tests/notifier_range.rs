//! Range notifiers: hooks, pairing, refusal, validation, teardown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use notifier_core::notifier::*;
use notifier_core::PageRange;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Start(u64, u64, Event),
    End(u64, u64),
    Clear(u64),
    Young(u64, u64),
    Tlb(u64, u64),
    Release,
}

struct Recorder {
    hooks: Hooks,
    refuse: bool,
    log: Mutex<Vec<Call>>,
}

impl Recorder {
    fn new(hooks: Hooks) -> Arc<Self> {
        Arc::new(Self {
            hooks,
            refuse: false,
            log: Mutex::new(Vec::new()),
        })
    }
    fn refusing(hooks: Hooks) -> Arc<Self> {
        Arc::new(Self {
            hooks,
            refuse: true,
            log: Mutex::new(Vec::new()),
        })
    }
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl MmuNotifierOps for Recorder {
    fn hooks(&self) -> Hooks {
        self.hooks
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        if self.refuse && !r.blockable() {
            return Err(Again);
        }
        self.log
            .lock()
            .unwrap()
            .push(Call::Start(r.start(), r.end(), r.event()));
        Ok(())
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        self.log.lock().unwrap().push(Call::End(r.start(), r.end()));
    }
    fn clear(&self, addr: u64) {
        self.log.lock().unwrap().push(Call::Clear(addr));
    }
    fn clear_flush_young(&self, s: u64, e: u64) -> bool {
        self.log.lock().unwrap().push(Call::Young(s, e));
        true
    }
    fn clear_young(&self, s: u64, e: u64) -> bool {
        self.log.lock().unwrap().push(Call::Young(s, e));
        false
    }
    fn test_young(&self, a: u64) -> bool {
        self.log.lock().unwrap().push(Call::Young(a, a));
        a == 0x5000
    }
    fn invalidate_secondary_tlbs(&self, s: u64, e: u64) {
        self.log.lock().unwrap().push(Call::Tlb(s, e));
    }
    fn release(&self) {
        self.log.lock().unwrap().push(Call::Release);
    }
}

fn range(start: u64, len: u64, ev: Event) -> InvalidateRange {
    InvalidateRange::new(PageRange::new(start, len).unwrap(), ev)
}

const ALL: Hooks = Hooks::START_END
    .union(Hooks::CLEAR)
    .union(Hooks::AGING)
    .union(Hooks::RELEASE);

#[test]
fn bracket_clear_and_end_in_order() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(ALL);
    let _h = subs.register(rec.clone()).unwrap();
    let inv = subs
        .invalidate_range_start(&range(0x1000, 0x3000, Event::Clear))
        .unwrap();
    inv.clear(0x1000);
    inv.clear(0x3000);
    inv.end();
    assert_eq!(
        rec.take(),
        vec![
            Call::Start(0x1000, 0x4000, Event::Clear),
            Call::Clear(0x1000),
            Call::Clear(0x3000),
            Call::End(0x1000, 0x4000)
        ]
    );
}

#[test]
fn dropping_the_bracket_ends_it() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(Hooks::START_END);
    let _h = subs.register(rec.clone()).unwrap();
    drop(
        subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
            .unwrap(),
    );
    assert_eq!(
        rec.take(),
        vec![Call::Start(0, 0x1000, Event::Unmap), Call::End(0, 0x1000)]
    );
}

#[test]
fn only_declared_hooks_are_called() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(Hooks::END);
    let _h = subs.register(rec.clone()).unwrap();
    let inv = subs
        .invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap();
    inv.clear(0);
    inv.end();
    assert!(!subs.clear_young(0, 0x1000).unwrap());
    assert_eq!(rec.take(), vec![Call::End(0, 0x1000)]);
}

#[test]
fn aging_hooks_fold_answers() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(Hooks::AGING);
    let _h = subs.register(rec.clone()).unwrap();
    assert!(subs.clear_flush_young(0, 0x2000).unwrap());
    assert!(!subs.clear_young(0, 0x2000).unwrap());
    assert!(subs.test_young(0x5000).unwrap());
    assert!(!subs.test_young(0x6000).unwrap());
    assert_eq!(rec.take().len(), 4);
}

#[test]
fn tlb_only_hook_is_called_at_flush() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(Hooks::TLB);
    let _h = subs.register(rec.clone()).unwrap();
    let inv = subs
        .invalidate_range_start(&range(0x2000, 0x1000, Event::Clear))
        .unwrap();
    inv.invalidate_secondary_tlbs(0x2000, 0x3000);
    inv.end();
    subs.invalidate_secondary_tlbs(0x8000, 0x9000).unwrap();
    assert_eq!(
        rec.take(),
        vec![Call::Tlb(0x2000, 0x3000), Call::Tlb(0x8000, 0x9000)]
    );
}

#[test]
fn contradictory_hooks_are_rejected() {
    let subs = NotifierSubscriptions::new();
    let e = subs
        .register(Recorder::new(Hooks::TLB | Hooks::START))
        .unwrap_err();
    assert_eq!(e, NotifierError::TlbHookWithStartEnd);
    let e = subs
        .register(Recorder::new(Hooks::TLB | Hooks::END))
        .unwrap_err();
    assert_eq!(e, NotifierError::TlbHookWithStartEnd);
    let e = subs
        .register(Recorder::new(Hooks::MAY_REFUSE | Hooks::START_END))
        .unwrap_err();
    assert_eq!(e, NotifierError::RefusingSubscriberWithEnd);
    assert!(subs
        .register(Recorder::new(Hooks::MAY_REFUSE | Hooks::START))
        .is_ok());
}

#[test]
fn refusal_in_non_blockable_context_ends_those_that_accepted() {
    let subs = NotifierSubscriptions::new();
    let first = Recorder::new(Hooks::START_END);
    let refuser = Recorder::refusing(Hooks::START | Hooks::MAY_REFUSE);
    let last = Recorder::new(Hooks::START_END);
    let _a = subs.register(first.clone()).unwrap();
    let _b = subs.register(refuser.clone()).unwrap();
    let _c = subs.register(last.clone()).unwrap();
    let r = range(0, 0x1000, Event::Unmap).non_blocking();
    assert!(matches!(
        subs.invalidate_range_start(&r),
        Err(NotifierError::Again)
    ));
    assert_eq!(
        first.take(),
        vec![Call::Start(0, 0x1000, Event::Unmap), Call::End(0, 0x1000)]
    );
    assert!(refuser.take().is_empty());
    assert!(
        last.take().is_empty(),
        "a subscriber after the refusal must see neither start nor end"
    );
    // Nothing is left half done: the sequence is idle again.
    assert_eq!(subs.seq() & 1, 0);
    // A blockable invalidation goes through.
    subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap()
        .end();
    assert_eq!(last.take().len(), 2);
}

#[test]
fn unregister_stops_callbacks_and_double_unregister_is_an_error() {
    let subs = NotifierSubscriptions::new();
    let rec = Recorder::new(ALL);
    let h = subs.register(rec.clone()).unwrap();
    h.unregister().unwrap();
    assert_eq!(h.unregister(), Err(NotifierError::NotSubscribed));
    subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap()
        .end();
    assert!(!subs.clear_young(0, 0x1000).unwrap());
    assert!(rec.take().is_empty());
}

#[test]
fn release_calls_each_subscriber_once_and_blocks_new_subscriptions() {
    let subs = NotifierSubscriptions::new();
    let a = Recorder::new(ALL);
    let b = Recorder::new(ALL);
    let ha = subs.register(a.clone()).unwrap();
    let _hb = subs.register(b.clone()).unwrap();
    subs.release();
    subs.release();
    assert_eq!(a.take(), vec![Call::Release]);
    assert_eq!(b.take(), vec![Call::Release]);
    // Nothing runs after release.
    subs.invalidate_range_start(&range(0, 0x1000, Event::Release))
        .unwrap()
        .end();
    assert!(a.take().is_empty());
    assert_eq!(
        subs.register(Recorder::new(ALL)).unwrap_err(),
        NotifierError::Released
    );
    assert_eq!(ha.unregister(), Err(NotifierError::Released));
}

/// A subscriber that unregisters itself from inside its own callback.
struct SelfRemover {
    me: Mutex<Option<MmuNotifier>>,
    calls: AtomicUsize,
}

impl MmuNotifierOps for SelfRemover {
    fn hooks(&self) -> Hooks {
        Hooks::START_END
    }
    fn invalidate_range_start(&self, _: &InvalidateRange) -> Result<(), Again> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(h) = self.me.lock().unwrap().take() {
            h.unregister().unwrap();
        }
        Ok(())
    }
    fn invalidate_range_end(&self, _: &InvalidateRange) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn unregister_from_inside_a_callback_does_not_deadlock() {
    let subs = NotifierSubscriptions::new();
    let s = Arc::new(SelfRemover {
        me: Mutex::new(None),
        calls: AtomicUsize::new(0),
    });
    let h = subs.register(s.clone()).unwrap();
    *s.me.lock().unwrap() = Some(h);
    subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap()
        .end();
    // Start ran; the end of the same bracket is not delivered after unregister.
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap()
        .end();
    assert_eq!(s.calls.load(Ordering::SeqCst), 1);
}

/// Registration waits for in-flight invalidations, so a new subscriber
/// never sees an end without its start.
#[test]
fn register_waits_for_in_flight_invalidations() {
    let subs = NotifierSubscriptions::new();
    let inv = subs
        .invalidate_range_start(&range(0, 0x1000, Event::Unmap))
        .unwrap();
    let rec = Recorder::new(Hooks::START_END);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let subs = subs.clone();
        let rec = rec.clone();
        std::thread::spawn(move || {
            let h = subs.register(rec).unwrap();
            tx.send(()).unwrap();
            h
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(100))
            .is_err(),
        "register returned during an invalidation"
    );
    inv.end();
    rx.recv().unwrap();
    let _h = t.join().unwrap();
    assert!(rec.take().is_empty());
}

#[test]
fn unregister_waits_for_a_running_callback() {
    use std::sync::Barrier;
    struct Slow(Arc<Barrier>, AtomicUsize);
    impl MmuNotifierOps for Slow {
        fn hooks(&self) -> Hooks {
            Hooks::START_END
        }
        fn invalidate_range_start(&self, _: &InvalidateRange) -> Result<(), Again> {
            self.0.wait();
            std::thread::sleep(std::time::Duration::from_millis(50));
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn invalidate_range_end(&self, _: &InvalidateRange) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }
    let subs = NotifierSubscriptions::new();
    let barrier = Arc::new(Barrier::new(2));
    let slow = Arc::new(Slow(barrier.clone(), AtomicUsize::new(0)));
    let h = subs.register(slow.clone()).unwrap();
    let t = {
        let subs = subs.clone();
        std::thread::spawn(move || {
            subs.invalidate_range_start(&range(0, 0x1000, Event::Unmap))
                .unwrap()
                .end()
        })
    };
    barrier.wait();
    h.unregister().unwrap();
    // The callback that was running has returned, and its end was delivered
    // or skipped; either way nothing runs after unregister returned.
    let seen = slow.1.load(Ordering::SeqCst);
    assert!(seen >= 1);
    t.join().unwrap();
    assert_eq!(slow.1.load(Ordering::SeqCst), seen);
}
