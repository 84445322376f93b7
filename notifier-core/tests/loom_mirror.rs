//! loom model of the mirror's fault path under a reader-writer lock
//! (`secondary::Mirror`, docs/DESIGN.md "Mirror locking and the access
//! path"): fault-ins take the driver lock for reading, so two of them run
//! in parallel; the invalidate callback takes it for writing. Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p notifier-core --release --test loom_mirror
//! ```
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::RwLock;
use notifier_core::notifier::*;
use notifier_core::PageRange;

/// The secondary: one external entry (0 = empty) behind the driver lock.
struct Driver {
    lock: RwLock<()>,
    entry: AtomicU64,
}

impl IntervalNotifierOps for Driver {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let _g = self.lock.write().unwrap();
        sub.set_seq(cur_seq);
        self.entry.store(0, Ordering::SeqCst);
        Ok(())
    }
}

/// `Mirror::fault_in`: read_begin, ask the primary, read lock, read_retry,
/// write the entry.
fn fault_in(sub: &IntervalSubscription<Driver>, pte: &AtomicU64, check: bool) {
    loop {
        let seq = sub.read_begin();
        let v = pte.load(Ordering::SeqCst);
        let g = sub.ops().lock.read().unwrap();
        if check && sub.read_retry(seq) {
            drop(g);
            continue;
        }
        sub.ops().entry.store(v, Ordering::SeqCst);
        return;
    }
}

/// Two devices fault the page in concurrently (both under the read lock)
/// while the primary changes its PTE from 1 to 2 inside an invalidation.
fn model(check: bool) {
    loom::model(move || {
        let subs = NotifierSubscriptions::new();
        let sub = Arc::new(
            subs.interval_subscribe(
                0,
                0x1000,
                Driver {
                    lock: RwLock::new(()),
                    entry: AtomicU64::new(0),
                },
            )
            .unwrap(),
        );
        let pte = Arc::new(AtomicU64::new(1));
        let faulters: Vec<_> = (0..2)
            .map(|_| {
                let (sub, pte) = (sub.clone(), pte.clone());
                loom::thread::spawn(move || fault_in(&sub, &pte, check))
            })
            .collect();

        let range = InvalidateRange::new(PageRange::new(0, 0x1000).unwrap(), Event::Clear);
        let inv = subs.invalidate_range_start(&range).unwrap();
        pte.store(2, Ordering::SeqCst);
        inv.end();

        for f in faulters {
            f.join().unwrap();
        }
        // Coherence: the entry is empty or what the primary maps now.
        let cached = sub.ops().entry.load(Ordering::SeqCst);
        assert!(
            cached == 0 || cached == pte.load(Ordering::SeqCst),
            "stale translation {cached}"
        );
    });
}

#[test]
fn parallel_fault_ins_under_the_read_lock_stay_coherent() {
    model(true);
}

/// Negative test: without `read_retry` loom must find the interleaving in
/// which a fault writes the old PTE after the invalidation cleared the
/// entry.
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
