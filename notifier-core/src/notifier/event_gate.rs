//! The event gate: the application's order for primaries whose changes are
//! reported *after* the fact (userfaultfd's UNMAP and REMAP, a REMOVE whose
//! zap already runs).
//!
//! # The problem
//!
//! userfaultfd makes the thread that calls `munmap` wait until the monitor
//! has *read* the UNMAP event, not until it has *applied* it (run the
//! invalidation brackets). Between the two, `munmap` has returned in the
//! application while every secondary still holds translations of the
//! range: a `get` that starts then would hand back a registration of
//! memory that is gone.
//!
//! # The protocol
//!
//! The monitor (the only writer of a gate) makes the gate's sequence odd
//! *before* it reads events and even again once it has applied every event
//! it read ([`EventGate::begin_batch`], the guard's drop). A reader that
//! must respect the application's order (a registration `get`, a DMA)
//! calls [`EventGate::wait_applied`] first: an even sequence returns at
//! once (one Acquire load, the common case); an odd one waits until the
//! sequence changes.
//!
//! ```text
//!   monitor                         app thread A            thread B (ordered after A)
//!   poll(): readable
//!   seq 2n -> 2n+1 (SeqCst)
//!   read(): dequeues UNMAP  ------> munmap() returns
//!                                   (kernel wake-up:         A signals B
//!                                    happens-after the read) get(): wait_applied
//!   apply: brackets, regions killed                          sees 2n+1: waits
//!   seq 2n+1 -> 2n+2 (Release) ----------------------------> sees 2n+2 (Acquire):
//!                                                            the kill is visible, miss
//! ```
//!
//! Why it is enough: the read that releases `munmap` happens inside the
//! odd window, so any operation ordered after `munmap` returned loads a
//! sequence of at least `2n+1`; `2n+1` waits, `2n+2` or later means the
//! batch (and the UNMAP in it) was applied, and the Release/Acquire pair
//! makes the invalidation's effects visible. A reader that loads an even
//! value it could have loaded before the batch began cannot be ordered
//! after the `munmap`.
//!
//! What it costs: readers that start during a batch wait for it even when
//! its events concern other memory (a batch is a few microseconds); the
//! hit path pays one load of a line written once per batch.
//!
//! A monitor that stops or dies [`closes`](EventGate::close) the gate:
//! waiters return and see [`EventGate::is_closed`]; the batch guard ends
//! its batch when dropped during a panic, so a panicking monitor never
//! leaves readers waiting.

use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// The application's-order gate of one primary (see the module docs).
#[derive(Debug, Default)]
pub struct EventGate {
    /// Even: every event read has been applied. Odd: a batch of events is
    /// being read or applied. Written by the monitor only.
    seq: AtomicU64,
    /// The monitor is gone: no event will be applied any more.
    closed: AtomicBool,
}

/// A batch of events being read and applied; dropping it (also during a
/// panic) ends the batch.
#[must_use = "the batch ends when the guard is dropped"]
#[derive(Debug)]
pub struct GateBatch<'a> {
    gate: &'a EventGate,
}

impl Drop for GateBatch<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire load of `wait_applied`, so the
        // invalidations applied in the batch are visible to a reader that
        // sees the even value.
        self.gate.seq.fetch_add(1, Ordering::Release);
    }
}

impl EventGate {
    /// A gate with no batch in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begin a batch: call *before* reading events from the kernel, and
    /// keep the guard until every event read has been applied.
    ///
    /// # Pairing
    /// One writer: batches of one gate never overlap (the monitor thread).
    pub fn begin_batch(&self) -> GateBatch<'_> {
        // SeqCst (a full barrier): the odd value must be visible before the
        // read syscall that follows releases the thread that unmapped.
        let prev = self.seq.fetch_add(1, Ordering::SeqCst);
        debug_assert!(prev & 1 == 0, "overlapping event batches");
        GateBatch { gate: self }
    }

    /// Whether a batch is in flight now.
    #[inline]
    pub fn pending(&self) -> bool {
        self.seq.load(Ordering::Acquire) & 1 == 1
    }

    /// Wait until every event read before this call began has been applied
    /// (or the gate is closed). The common case is one Acquire load.
    ///
    /// # Locking
    /// Must not be called with a lock that the monitor's invalidation
    /// callbacks take (it would wait for a batch that waits for it).
    #[inline]
    pub fn wait_applied(&self) {
        let s = self.seq.load(Ordering::Acquire);
        if s & 1 == 0 {
            return;
        }
        self.wait_slow(s);
    }

    #[cold]
    #[inline(never)]
    fn wait_slow(&self, s: u64) {
        let mut spins = 0u32;
        while self.seq.load(Ordering::Acquire) == s && !self.closed.load(Ordering::Acquire) {
            spins += 1;
            if spins < 64 {
                core::hint::spin_loop();
            } else {
                yield_now();
            }
        }
    }

    /// Close the gate: the monitor is gone. Waiters return at once and
    /// later calls never wait; [`Self::is_closed`] tells them why.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Whether the monitor that fed this gate is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The sequence (even when settled), for statistics and tests.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

#[cfg(not(loom))]
fn yield_now() {
    std::thread::yield_now();
}

#[cfg(loom)]
fn yield_now() {
    loom::thread::yield_now();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn settled_gate_returns_at_once_and_a_batch_makes_readers_wait() {
        let g = Arc::new(EventGate::new());
        g.wait_applied();
        assert!(!g.pending());
        let b = g.begin_batch();
        assert!(g.pending());
        let applied = Arc::new(AtomicBool::new(false));
        let t = {
            let (g, applied) = (g.clone(), applied.clone());
            std::thread::spawn(move || {
                g.wait_applied();
                applied.load(Ordering::Acquire)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        applied.store(true, Ordering::Release);
        drop(b);
        assert!(
            t.join().unwrap(),
            "the reader returned before the batch ended"
        );
        assert_eq!(g.seq(), 2);
    }

    #[test]
    fn a_panicking_monitor_ends_its_batch() {
        let g = Arc::new(EventGate::new());
        let g2 = g.clone();
        let r = std::thread::spawn(move || {
            let _b = g2.begin_batch();
            panic!("monitor dies mid-batch");
        })
        .join();
        assert!(r.is_err());
        assert!(!g.pending());
        g.wait_applied();
    }

    #[test]
    fn close_releases_waiters() {
        let g = Arc::new(EventGate::new());
        let b = g.begin_batch();
        let t = {
            let g = g.clone();
            std::thread::spawn(move || {
                g.wait_applied();
                g.is_closed()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(10));
        g.close();
        assert!(t.join().unwrap());
        drop(b);
    }
}
