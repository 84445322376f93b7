//! loom model checks of the interval sequence protocol and its deferred
//! updates. Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p notifier-core --release --test loom_seq
//! ```
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Mutex;
use notifier_core::notifier::*;
use notifier_core::PageRange;

/// The secondary: one cached translation under the driver lock.
struct Driver {
    entry: Mutex<Option<u64>>,
}

impl IntervalNotifierOps for Driver {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut g = self.entry.lock().unwrap();
        sub.set_seq(cur_seq);
        *g = None;
        Ok(())
    }
}

fn inv_range() -> InvalidateRange {
    InvalidateRange::new(PageRange::new(0, 0x1000).unwrap(), Event::Clear)
}

/// One invalidator changes the PTE from 1 to 2; one reader faults it in.
/// `check` says whether the reader calls `read_retry`.
fn model(check: bool) {
    loom::model(move || {
        let subs = NotifierSubscriptions::new();
        let sub = Arc::new(
            subs.interval_subscribe(
                0,
                0x1000,
                Driver {
                    entry: Mutex::new(None),
                },
            )
            .unwrap(),
        );
        let pte = Arc::new(AtomicU64::new(1));

        let reader = {
            let (sub, pte) = (sub.clone(), pte.clone());
            loom::thread::spawn(move || loop {
                let seq = sub.read_begin();
                let v = pte.load(Ordering::SeqCst);
                let mut g = sub.ops().entry.lock().unwrap();
                if check && sub.read_retry(seq) {
                    drop(g);
                    continue;
                }
                *g = Some(v);
                break;
            })
        };

        let inv = subs.invalidate_range_start(&inv_range()).unwrap();
        pte.store(2, Ordering::SeqCst);
        inv.end();

        reader.join().unwrap();
        // Coherence: whatever is cached matches the primary's PTE now.
        let cached = *sub.ops().entry.lock().unwrap();
        assert!(
            cached.is_none() || cached == Some(pte.load(Ordering::SeqCst)),
            "stale translation {cached:?}"
        );
    });
}

#[test]
fn read_retry_prevents_stale_translations() {
    model(true);
}

/// Negative test: without `read_retry` loom must find the interleaving in
/// which the reader caches the old PTE after the invalidation dropped it.
#[test]
fn skipping_read_retry_is_caught() {
    let r = std::panic::catch_unwind(|| model(false));
    let msg = match r {
        Ok(()) => panic!("loom found no stale translation although read_retry was skipped"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(
        msg.contains("stale translation"),
        "failed for another reason: {msg}"
    );
}

/// A subscription added while an invalidation runs is deferred, applied at
/// the end, and its first read section never collides with an idle state.
#[test]
fn deferred_insert_and_remove() {
    loom::model(|| {
        let subs = NotifierSubscriptions::new();
        let a = subs
            .interval_subscribe(
                0,
                0x1000,
                Driver {
                    entry: Mutex::new(None),
                },
            )
            .unwrap();
        let t = {
            let subs = subs.clone();
            loom::thread::spawn(move || {
                let b = subs
                    .interval_subscribe(
                        0,
                        0x1000,
                        Driver {
                            entry: Mutex::new(None),
                        },
                    )
                    .unwrap();
                let s = b.read_begin();
                // After read_begin no invalidation of b is in progress that
                // began before it, unless one is running now.
                let _ = b.read_retry(s);
                b.unsubscribe().unwrap();
                assert_eq!(b.unsubscribe(), Err(NotifierError::NotSubscribed));
            })
        };
        let inv = subs.invalidate_range_start(&inv_range()).unwrap();
        inv.end();
        t.join().unwrap();
        assert_eq!(subs.seq() & 1, 0);
        assert_eq!(subs.interval_count(), 1);
        drop(a);
        assert_eq!(subs.interval_count(), 0);
    });
}

/// Two concurrent invalidations: the sequence goes even only after both
/// ended, and the reader's read_begin returns only when none is running.
#[test]
fn overlapping_invalidations_keep_sequence_odd_until_last_end() {
    loom::model(|| {
        let subs = NotifierSubscriptions::new();
        let sub = Arc::new(
            subs.interval_subscribe(
                0,
                0x1000,
                Driver {
                    entry: Mutex::new(None),
                },
            )
            .unwrap(),
        );
        let other = {
            let subs = subs.clone();
            loom::thread::spawn(move || {
                let inv = subs.invalidate_range_start(&inv_range()).unwrap();
                inv.end();
            })
        };
        let inv = subs.invalidate_range_start(&inv_range()).unwrap();
        assert_eq!(subs.seq() & 1, 1);
        inv.end();
        other.join().unwrap();
        assert_eq!(subs.seq() & 1, 0);
        let s = sub.read_begin();
        assert!(!sub.read_retry(s));
    });
}
