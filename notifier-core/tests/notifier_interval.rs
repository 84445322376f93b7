//! Interval notifiers: the sequence protocol, deferred updates, teardown
//! and bad input.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notifier_core::notifier::*;
use notifier_core::{PageRange, RangeError};

/// A minimal secondary: one cached "translation" guarded by its lock.
#[derive(Default)]
struct Mirror {
    lock: Mutex<Option<u64>>,
    invalidations: AtomicUsize,
    last_seq: AtomicU64,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _r: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut g = self.lock.lock().unwrap();
        sub.set_seq(cur_seq);
        *g = None;
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.last_seq.store(cur_seq, Ordering::SeqCst);
        Ok(())
    }
}

fn range(start: u64, len: u64) -> InvalidateRange {
    InvalidateRange::new(PageRange::new(start, len).unwrap(), Event::Unmap)
}

#[test]
fn bad_ranges_are_typed_errors() {
    let subs = NotifierSubscriptions::new();
    let e = |r| NotifierError::Range(r);
    assert_eq!(
        subs.interval_subscribe(0x1000, 0, Mirror::default())
            .unwrap_err(),
        e(RangeError::Empty)
    );
    assert!(matches!(
        subs.interval_subscribe(0x1001, 0x1000, Mirror::default())
            .unwrap_err(),
        NotifierError::Range(RangeError::Misaligned { .. })
    ));
    assert!(matches!(
        subs.interval_subscribe(0x1000, 0x1001, Mirror::default())
            .unwrap_err(),
        NotifierError::Range(RangeError::Misaligned { .. })
    ));
    assert!(matches!(
        subs.interval_subscribe(u64::MAX - 0xfff, 0x2000, Mirror::default())
            .unwrap_err(),
        NotifierError::Range(RangeError::Wraps { .. })
    ));
    assert_eq!(subs.interval_count(), 0);
    // Half-open ranges cannot name the very top page: its end is 2^64.
    assert!(matches!(
        subs.interval_subscribe(u64::MAX - 0xfff, 0x1000, Mirror::default())
            .unwrap_err(),
        NotifierError::Range(RangeError::Wraps { .. })
    ));
    assert_eq!(subs.interval_count(), 0);
}

#[test]
fn sequence_is_even_idle_odd_during_overlap() {
    let subs = NotifierSubscriptions::new();
    let sub = subs
        .interval_subscribe(0x10000, 0x4000, Mirror::default())
        .unwrap();
    let s0 = subs.seq();
    assert_eq!(s0 & 1, 0);
    let seq = sub.read_begin();
    assert_ne!(seq, s0, "a new subscription must not match an idle read");
    assert!(!sub.read_retry(seq));

    // A non-overlapping invalidation leaves S and s alone.
    subs.invalidate_range_start(&range(0x20000, 0x1000))
        .unwrap()
        .end();
    assert_eq!(subs.seq(), s0);
    assert!(!sub.read_retry(seq));

    // An overlapping one makes S odd, hands it to the callback, then even.
    let inv = subs
        .invalidate_range_start(&range(0x13000, 0x2000))
        .unwrap();
    assert_eq!(subs.seq() & 1, 1);
    assert_eq!(sub.ops().last_seq.load(Ordering::SeqCst), subs.seq());
    assert!(sub.read_retry(seq));
    assert!(sub.check_retry(seq));
    inv.end();
    assert_eq!(subs.seq() & 1, 0);
    assert!(sub.read_retry(seq), "a collided read stays collided");
    let seq2 = sub.read_begin();
    assert!(!sub.read_retry(seq2));
}

#[test]
fn read_begin_waits_while_its_range_is_invalidated() {
    let subs = NotifierSubscriptions::new();
    let sub = Arc::new(
        subs.interval_subscribe(0, 0x1000, Mirror::default())
            .unwrap(),
    );
    let inv = subs.invalidate_range_start(&range(0, 0x1000)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let sub = sub.clone();
        std::thread::spawn(move || {
            let s = sub.read_begin();
            tx.send(s).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "read_begin returned mid-invalidation"
    );
    inv.end();
    let s = rx.recv().unwrap();
    t.join().unwrap();
    assert!(!sub.read_retry(s));
}

#[test]
fn subscribe_during_invalidation_is_deferred_and_counts_as_invalidated() {
    let subs = NotifierSubscriptions::new();
    let _a = subs
        .interval_subscribe(0, 0x1000, Mirror::default())
        .unwrap();
    let inv = subs.invalidate_range_start(&range(0, 0x10000)).unwrap();
    let b = subs
        .interval_subscribe(0x2000, 0x1000, Mirror::default())
        .unwrap();
    assert_eq!(
        subs.interval_count(),
        1,
        "insert deferred while the tree is frozen"
    );
    inv.end();
    assert_eq!(subs.interval_count(), 2);
    // Its first read begins after the end and does not collide.
    let s = b.read_begin();
    assert!(!b.read_retry(s));
    // And it now receives invalidations.
    subs.invalidate_range_start(&range(0x2000, 0x1000))
        .unwrap()
        .end();
    assert_eq!(b.ops().invalidations.load(Ordering::SeqCst), 1);
    assert!(b.read_retry(s));
}

#[test]
fn subscribe_during_a_non_overlapping_bracket_must_wait_for_it() {
    // A bracket with no interval hit is running; a subscription added now
    // might be covered by it, so its first read must wait for the end.
    let subs = NotifierSubscriptions::new();
    let inv = subs.invalidate_range_start(&range(0x5000, 0x1000)).unwrap();
    let b = Arc::new(
        subs.interval_subscribe(0x5000, 0x1000, Mirror::default())
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let b = b.clone();
        std::thread::spawn(move || tx.send(b.read_begin()).unwrap())
    };
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    inv.end();
    let s = rx.recv().unwrap();
    t.join().unwrap();
    assert!(!b.read_retry(s));
}

#[test]
fn unsubscribe_during_invalidation_is_deferred_and_waits() {
    let subs = NotifierSubscriptions::new();
    let a = Arc::new(
        subs.interval_subscribe(0, 0x1000, Mirror::default())
            .unwrap(),
    );
    let inv = subs.invalidate_range_start(&range(0, 0x1000)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let a = a.clone();
        std::thread::spawn(move || tx.send(a.unsubscribe()).unwrap())
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "unsubscribe returned while its callback's invalidation runs"
    );
    assert_eq!(subs.interval_count(), 1);
    inv.end();
    assert_eq!(rx.recv().unwrap(), Ok(()));
    t.join().unwrap();
    assert_eq!(subs.interval_count(), 0);
    assert_eq!(a.unsubscribe(), Err(NotifierError::NotSubscribed));
    // No callback after unsubscribe.
    let before = a.ops().invalidations.load(Ordering::SeqCst);
    subs.invalidate_range_start(&range(0, 0x1000))
        .unwrap()
        .end();
    assert_eq!(a.ops().invalidations.load(Ordering::SeqCst), before);
}

#[test]
fn subscribe_then_unsubscribe_inside_one_invalidation() {
    let subs = NotifierSubscriptions::new();
    let _x = subs
        .interval_subscribe(0, 0x1000, Mirror::default())
        .unwrap();
    let inv = subs.invalidate_range_start(&range(0, 0x1000)).unwrap();
    let b = subs
        .interval_subscribe(0x3000, 0x1000, Mirror::default())
        .unwrap();
    b.unsubscribe().unwrap();
    inv.end();
    assert_eq!(subs.interval_count(), 1);
}

type Remover = Arc<dyn Fn() -> Result<(), NotifierError> + Send + Sync>;

/// Unsubscribes itself from its own invalidate callback.
struct SelfRemove {
    me: Mutex<Option<Remover>>,
    calls: AtomicUsize,
}

impl IntervalNotifierOps for SelfRemove {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        seq: u64,
    ) -> Result<(), Again> {
        sub.set_seq(seq);
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(f) = self.me.lock().unwrap().take() {
            f().unwrap();
        }
        Ok(())
    }
}

#[test]
fn unsubscribe_from_inside_the_callback_is_safe() {
    let subs = NotifierSubscriptions::new();
    let sub = Arc::new(
        subs.interval_subscribe(
            0,
            0x1000,
            SelfRemove {
                me: Mutex::new(None),
                calls: AtomicUsize::new(0),
            },
        )
        .unwrap(),
    );
    let weak = Arc::downgrade(&sub);
    *sub.ops().me.lock().unwrap() = Some(Arc::new(move || {
        weak.upgrade().map_or(Ok(()), |s| s.unsubscribe())
    }));
    subs.invalidate_range_start(&range(0, 0x1000))
        .unwrap()
        .end();
    assert_eq!(subs.interval_count(), 0);
    subs.invalidate_range_start(&range(0, 0x1000))
        .unwrap()
        .end();
    assert_eq!(sub.ops().calls.load(Ordering::SeqCst), 1);
}

struct Refuser;
impl IntervalNotifierOps for Refuser {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        r: &InvalidateRange,
        seq: u64,
    ) -> Result<(), Again> {
        if !r.blockable() {
            return Err(Again);
        }
        sub.set_seq(seq);
        Ok(())
    }
}

#[test]
fn interval_refusal_leaves_nothing_half_done() {
    let subs = NotifierSubscriptions::new();
    let _r = subs.interval_subscribe(0, 0x1000, Refuser).unwrap();
    let r = range(0, 0x1000).non_blocking();
    assert!(matches!(
        subs.invalidate_range_start(&r),
        Err(NotifierError::Again)
    ));
    assert_eq!(
        subs.seq() & 1,
        0,
        "sequence idle after a refused invalidation"
    );
    subs.invalidate_range_start(&range(0, 0x1000))
        .unwrap()
        .end();
}

#[test]
fn release_reaches_interval_subscribers_and_stops_subscribing() {
    struct Rel(AtomicUsize);
    impl IntervalNotifierOps for Rel {
        fn invalidate(
            &self,
            s: &IntervalNotifier,
            _: &InvalidateRange,
            q: u64,
        ) -> Result<(), Again> {
            s.set_seq(q);
            Ok(())
        }
        fn release(&self, _: &IntervalNotifier) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let subs = NotifierSubscriptions::new();
    let a = subs
        .interval_subscribe(0, 0x1000, Rel(AtomicUsize::new(0)))
        .unwrap();
    subs.release();
    subs.release();
    assert_eq!(a.ops().0.load(Ordering::SeqCst), 1);
    assert_eq!(subs.interval_count(), 0);
    assert_eq!(a.unsubscribe(), Err(NotifierError::Released));
    assert_eq!(
        subs.interval_subscribe(0, 0x1000, Rel(AtomicUsize::new(0)))
            .unwrap_err(),
        NotifierError::Released
    );
}

#[test]
fn release_during_invalidation_waits_for_it() {
    let subs = NotifierSubscriptions::new();
    let _a = subs
        .interval_subscribe(0, 0x1000, Mirror::default())
        .unwrap();
    let inv = subs.invalidate_range_start(&range(0, 0x1000)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let subs = subs.clone();
        std::thread::spawn(move || {
            subs.release();
            tx.send(()).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "release returned during an invalidation"
    );
    inv.end();
    rx.recv().unwrap();
    t.join().unwrap();
    assert_eq!(subs.seq() & 1, 0);
}

/// Many threads: invalidators change a "PTE", readers fault it in with
/// the retry protocol. No reader may keep a translation the invalidation
/// was about to change.
#[test]
fn concurrent_readers_never_keep_stale_translations() {
    const ROUNDS: u64 = 20_000;
    let subs = NotifierSubscriptions::new();
    let pte = Arc::new(AtomicU64::new(0));
    let sub = Arc::new(
        subs.interval_subscribe(0, 0x1000, Mirror::default())
            .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (sub, pte, stop) = (sub.clone(), pte.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut retries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                loop {
                    let seq = sub.read_begin();
                    let v = pte.load(Ordering::SeqCst);
                    let mut g = sub.ops().lock.lock().unwrap();
                    if sub.read_retry(seq) {
                        retries += 1;
                        continue;
                    }
                    *g = Some(v);
                    break;
                }
            }
            retries
        })
    };
    for i in 1..=ROUNDS {
        let inv = subs.invalidate_range_start(&range(0, 0x1000)).unwrap();
        // The invalidation has started: no translation may be cached.
        assert_eq!(*sub.ops().lock.lock().unwrap(), None);
        pte.store(i, Ordering::SeqCst);
        inv.end();
        let cached = *sub.ops().lock.lock().unwrap();
        assert!(
            cached.is_none() || cached == Some(i),
            "stale translation {cached:?} after round {i}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _retries = reader.join().unwrap();
}
