//! Per-operation latency stages, measured on the mutator thread (where the
//! invalidation callbacks run): event → first callback, first callback →
//! last shootdown done, and the stale window (event → last shootdown).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use notifier_core::frame::Pfn;
use notifier_core::notifier::Event;
use notifier_core::secondary::AccessCheck;
use notifier_core::verify::{LatencyHistogram, Oracle};

thread_local! {
    static FIRST: Cell<Option<Instant>> = const { Cell::new(None) };
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The oracle plus the timing hooks.
pub struct TimedCheck {
    /// The coherence oracle.
    pub oracle: Arc<Oracle>,
}

impl AccessCheck for TimedCheck {
    #[inline]
    fn check_access(&self, device: usize, addr: u64, pfn: Pfn, write: bool) {
        self.oracle.check_access(device, addr, pfn, write);
    }
    fn on_invalidate_begin(&self, _start: u64, _end: u64, _event: Event) {
        FIRST.with(|f| {
            if f.get().is_none() {
                f.set(Some(Instant::now()));
            }
        });
    }
    fn on_fill(&self, addr: u64, pfn: Pfn, writable: bool) {
        self.oracle.on_fill(addr, pfn, writable);
    }
    fn on_invalidate(&self, start: u64, end: u64, event: Event) {
        LAST.with(|l| l.set(Some(Instant::now())));
        self.oracle.on_invalidate(start, end, event);
    }
}

/// The three latency stages.
#[derive(Clone, Debug, Default)]
pub struct Stages {
    /// Event (the operation starts) to the first invalidate callback.
    pub event_to_start: LatencyHistogram,
    /// First callback to the last secondary's shootdown done.
    pub start_to_flushed: LatencyHistogram,
    /// Event to the last shootdown: how long a stale lookup could still hit.
    pub stale_window: LatencyHistogram,
}

impl Stages {
    /// Record the stages of the operation that began at `t0` on this thread
    /// (if it invalidated anything), and reset the thread's marks.
    pub fn finish_op(&mut self, t0: Instant) {
        let first = FIRST.with(|f| f.take());
        let last = LAST.with(|l| l.take());
        if let (Some(f), Some(l)) = (first, last) {
            self.event_to_start
                .record(f.saturating_duration_since(t0).as_nanos() as u64);
            self.start_to_flushed
                .record(l.saturating_duration_since(f).as_nanos() as u64);
            self.stale_window
                .record(l.saturating_duration_since(t0).as_nanos() as u64);
        }
    }

    /// Merge another thread's stages.
    pub fn merge(&mut self, o: &Stages) {
        self.event_to_start.merge(&o.event_to_start);
        self.start_to_flushed.merge(&o.start_to_flushed);
        self.stale_window.merge(&o.stale_window);
    }
}
