//! loom model of the event gate (the application's order for events that
//! userfaultfd reports after the fact). Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p notifier-core --release --test loom_gate
//! ```
#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, Ordering};
use notifier_core::notifier::EventGate;

/// The monitor reads an event (which releases the unmapping thread, as the
/// kernel's wake-up does) and applies it; a reader ordered after the unmap
/// must see it applied. `gated` says whether the monitor brackets the batch.
fn model(gated: bool) {
    loom::model(move || {
        let gate = Arc::new(EventGate::new());
        let read = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(AtomicBool::new(false));

        let monitor = {
            let (gate, read, applied) = (gate.clone(), read.clone(), applied.clone());
            loom::thread::spawn(move || {
                let batch = gated.then(|| gate.begin_batch());
                // The read: the kernel dequeues the event and wakes munmap.
                read.store(true, Ordering::Release);
                applied.store(true, Ordering::Relaxed);
                drop(batch);
            })
        };

        // The application thread: munmap returns once the event was read.
        while !read.load(Ordering::Acquire) {
            loom::thread::yield_now();
        }
        gate.wait_applied();
        assert!(
            applied.load(Ordering::Relaxed),
            "a get after munmap returned saw the event unapplied"
        );
        monitor.join().unwrap();
    });
}

#[test]
fn a_reader_after_the_unmap_sees_the_event_applied() {
    model(true);
}

/// The same run without the gate fails: the check can fail.
#[test]
#[should_panic(expected = "unapplied")]
fn without_the_gate_the_reader_sees_a_stale_state() {
    model(false);
}
