//! Announced zaps: the cooperative path for removing pages that
//! secondaries may be using at that moment ([`UffdMonitor::madvise`],
//! [`UffdMonitor::announce_remove`]).
//!
//! # Why announce
//!
//! `UFFD_EVENT_REMOVE` is queued before the zap, but the `madvise` caller
//! only waits until the monitor has *read* it; the zap then runs
//! concurrently with the monitor's invalidation. A device of a mirror over
//! real memory accesses a page with a CPU load under its device lock. If
//! that load hits a page just zapped, it takes a missing fault that only
//! the monitor's driver can serve, while the driver waits in the mirror's
//! invalidation callback for that same device lock: both hang for good.
//!
//! An announced zap does what the kernel does for its own secondary MMUs:
//! `invalidate_range_start(Clear)` **before** the zap, on the calling
//! thread, then the zap, then `invalidate_range_end`. Translations are
//! dropped before any page goes, none can be re-established until the end
//! (interval readers retry), and the monitor's driver never takes a device
//! lock for this zap.
//!
//! # The kernel's own REMOVE: suppressed while the bracket is open
//!
//! The zap still raises `UFFD_EVENT_REMOVE`. When the driver processes it
//! while an announced range covering it is registered here, it dispatches
//! no second invalidation (counted in `Stats::announced_removes`). This
//! is safe for any REMOVE, even one from another thread's unannounced
//! `madvise` of the same pages, because of the order below: the range is
//! registered only after its `invalidate_range_start` returned, and is
//! withdrawn before its end. So if the driver finds it, either the start
//! ran after the REMOVE was read (dropping every translation made before
//! the read), or the REMOVE was read inside the bracket (no translation
//! made since the start): in both cases every translation older than the
//! read is gone before the driver serves a later fault, which is the
//! guarantee an unannounced REMOVE gets. If the driver only processes the
//! REMOVE after the bracket ended (it was descheduled between the `read`
//! and the check), it dispatches a second invalidation: harmless, because
//! the zap had completed by then (the announcer's `madvise` returned before
//! it withdrew the range), so devices hold only translations of pages
//! populated after the zap.
//!
//! # Locking
//! `ranges` is a leaf lock held for a push, a removal or a scan; never
//! across a notifier callback or a system call. `count` lets the REMOVE
//! path skip the lock when nothing is announced.

use std::sync::atomic::{AtomicUsize, Ordering};

use notifier_core::addr::PageRange;
use notifier_core::notifier::{Event, InvalidateRange};
use parking_lot::Mutex;

use crate::error::UffdError;
use crate::monitor::UffdMonitor;
use crate::stats::Counters;
use crate::sys::{Advice, Region};

/// The ranges of announced zaps in progress (at most one per thread
/// inside [`UffdMonitor::announce_remove`]).
#[derive(Default)]
pub(crate) struct Announced {
    /// `ranges.len()`, readable without the lock.
    count: AtomicUsize,
    /// `(start, end)` of each announced zap in progress.
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl Announced {
    fn push(&self, r: PageRange) {
        let mut v = self.ranges.lock();
        v.push((r.start(), r.end()));
        // SeqCst pairs with the load in `covers`; the REMOVE read that
        // follows our madvise is a system call later in any case.
        self.count.store(v.len(), Ordering::SeqCst);
    }

    fn remove(&self, r: PageRange) {
        let mut v = self.ranges.lock();
        if let Some(i) = v.iter().position(|&x| x == (r.start(), r.end())) {
            v.swap_remove(i);
        }
        self.count.store(v.len(), Ordering::SeqCst);
    }

    /// Whether an announced zap in progress covers `[start, end)`.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        // A stale zero only costs a second, harmless invalidation.
        if self.count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.ranges
            .lock()
            .iter()
            .any(|&(s, e)| s <= start && end <= e)
    }
}

/// Withdraws an announced range, also when the zap panics.
struct Withdraw<'a>(&'a Announced, PageRange);

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

impl UffdMonitor {
    /// `madvise(advice)` over `[off, off + len)` of `region`, announced to
    /// this monitor's subscribers: the cooperative way to zap memory that
    /// secondaries (mirrors) may be accessing at that moment. See
    /// [`Self::announce_remove`] for what it guarantees.
    ///
    /// # Errors
    /// [`UffdError::Range`] for a bad range, [`UffdError::OutsideMapping`],
    /// [`UffdError::Notifier`] when the notifier set refuses the bracket
    /// (nothing is zapped then), [`UffdError::Io`] when `madvise` fails
    /// (the bracket is still closed).
    ///
    /// # Locking
    /// As [`Self::announce_remove`]; it must not be called from the thread
    /// driving the monitor, nor under a device lock of a mirror over this
    /// monitor's memory.
    pub fn madvise(
        &self,
        region: &Region,
        off: u64,
        len: u64,
        advice: Advice,
    ) -> Result<PageRange, UffdError> {
        let range = PageRange::new(region.addr().wrapping_add(off), len)?;
        if off.checked_add(len).is_none_or(|e| e > region.len()) {
            return Err(UffdError::OutsideMapping);
        }
        self.announce_remove(range, || region.madvise(off, len, advice))?
            .map_err(UffdError::Io)?;
        Ok(range)
    }

    /// Run `zap`, which removes pages of `range` (an `madvise(DONTNEED /
    /// FREE / REMOVE)` of memory that is not a [`Region`], e.g. a VMM's
    /// guest memory), inside an [`Event::Clear`] bracket on this monitor's
    /// notifier set: `invalidate_range_start` before `zap`, the end after
    /// it, as the kernel brackets its own zaps for its secondary MMUs. The
    /// `UFFD_EVENT_REMOVE` the zap raises then causes no second
    /// invalidation (see the module docs for why that is safe, and for
    /// the rare harmless second one).
    ///
    /// # What it guarantees
    /// Every subscriber has dropped its translations of `range` before the
    /// first page goes, and none re-establishes one before the zap is done
    /// (an interval reader's `read_retry` fails until the end). So a
    /// device never touches a page while it is being zapped, and the
    /// monitor's driver takes no device lock for this zap: the deadlock
    /// of an unannounced `madvise` (crate docs, *Zapping memory that
    /// devices use*) cannot happen.
    ///
    /// # Errors
    /// [`UffdError::Notifier`] when the notifier set refuses the bracket
    /// (e.g. released); `zap` is not run then.
    ///
    /// # Locking
    /// Runs the subscribers' invalidation callbacks on the calling thread
    /// (they take device locks), and `zap` waits until the monitor's driver
    /// has read the REMOVE: so never call it from the thread driving the
    /// monitor, nor while holding a lock a subscriber takes.
    ///
    /// # Pairing
    /// The bracket is always closed, also when `zap` panics.
    pub fn announce_remove<R>(
        &self,
        range: PageRange,
        zap: impl FnOnce() -> R,
    ) -> Result<R, UffdError> {
        let inner = &self.inner;
        // Declared first, so dropped last: the range is withdrawn before
        // the bracket ends, also on unwind.
        let inv = inner
            .subs
            .invalidate_range_start(&InvalidateRange::new(range, Event::Clear))?;
        // Registered only once the start returned (see the module docs).
        inner.announced.push(range);
        let withdraw = Withdraw(&inner.announced, range);
        let r = zap();
        drop(withdraw);
        inv.end();
        Counters::inc(&inner.counters.invalidations);
        Ok(r)
    }
}
