//! The application's order on the monitor side: every batch of events is
//! bracketed by the [`EventGate`] of the notifier set the monitor feeds,
//! and every query that must see what the application already did waits
//! on it.
//!
//! # The rule
//!
//! Once `munmap`, `mremap` or `madvise(DONTNEED / FREE / REMOVE)` of
//! watched memory has returned in any thread, a query that starts
//! afterwards ([`UffdMonitor::registration`], [`UffdMonitor::registered`],
//! [`UffdMonitor::is_watched`], `UffdPrimary::fault_page`,
//! `UffdPrimary::ensure_covered`) sees the change applied: the
//! registration cut or moved, every subscriber's invalidation run.
//!
//! # Why it holds
//!
//! The kernel releases the thread that unmapped only once the monitor has
//! *read* its event ("the caller sleeps until the event is read"). The
//! monitor opens the gate's batch (odd sequence, a full barrier) before
//! the `read(2)` and closes it (even, Release) after applying every event
//! the read returned. A query ordered after the `munmap` returned thus
//! loads an odd sequence (it waits) or a later even one (the batch was
//! applied, and Acquire makes the effects visible).
//!
//! # Who must not wait
//!
//! - The thread driving the monitor, inside its own batch (a subscriber's
//!   callback querying the monitor): it would wait for itself. A
//!   thread-local mark skips the wait there.
//! - Code holding a lock that invalidation callbacks take (a device lock):
//!   `RealMemory` accesses and `UffdPrimary::lookup_page` never wait.
//!
//! # Pairing
//! One monitor feeds one gate: two monitors feeding the same notifier set
//! would overlap their batches (`MonitorBuilder::notifiers`).

use std::cell::Cell;

use notifier_core::notifier::GateBatch;

use crate::monitor::{Inner, UffdMonitor};

thread_local! {
    /// The monitor (its `Inner` address) whose batch this thread is
    /// applying, or 0.
    static DRIVING: Cell<usize> = const { Cell::new(0) };
}

/// A batch in progress on this thread: the gate's guard and the
/// thread-local mark, both undone on drop (also during a panic).
pub(crate) struct Batch<'a> {
    _gate: GateBatch<'a>,
    prev: usize,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        DRIVING.with(|d| d.set(self.prev));
    }
}

impl Inner {
    fn key(&self) -> usize {
        self as *const Inner as usize
    }

    /// Open a batch: call before reading events, drop once they are
    /// applied.
    pub(crate) fn begin_batch(&self) -> Batch<'_> {
        let prev = DRIVING.with(|d| d.replace(self.key()));
        Batch {
            _gate: self.subs.event_gate().begin_batch(),
            prev,
        }
    }

    /// Wait until every event read before this call was applied, unless
    /// this thread is applying them itself.
    pub(crate) fn wait_applied(&self) {
        if DRIVING.with(|d| d.get()) == self.key() {
            return;
        }
        self.subs.event_gate().wait_applied();
    }
}

impl UffdMonitor {
    /// Wait until every event the kernel has handed to this monitor was
    /// applied (registrations updated, invalidations run); returns at once
    /// in the common case (one load). After it, the monitor reflects every
    /// `munmap`, `mremap` and `madvise` that returned before the call.
    ///
    /// Returns at once when the monitor has stopped (its gate is closed).
    ///
    /// # Locking
    /// Must not be called while holding a lock that the monitor's
    /// subscribers take in their invalidation callbacks.
    pub fn sync(&self) {
        self.inner.wait_applied();
    }

    /// Run `f` with this monitor's queries on this thread not waiting for
    /// the application's order: for callers that hold a lock the monitor's
    /// subscribers take in their callbacks (libfabric calls its monitor's
    /// `subscribe` with `mm_lock` held, and its `notify` takes `mm_lock`:
    /// waiting there would deadlock). Queries inside `f` may miss events
    /// the monitor has read but not yet applied; `watch` still covers new
    /// memory (it registers again what its records say is covered).
    pub fn without_order<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(usize);
        impl Drop for Restore {
            fn drop(&mut self) {
                DRIVING.with(|d| d.set(self.0));
            }
        }
        let _restore = Restore(DRIVING.with(|d| d.replace(self.inner.key())));
        f()
    }
}
