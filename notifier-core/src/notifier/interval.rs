//! Interval subscriptions and the reader side of the sequence protocol
//! (the kernel's `struct mmu_interval_notifier`).
//!
//! # The sequence encoding
//!
//! The set of subscriptions ([`NotifierSubscriptions`]) has one sequence
//! number `S`; each subscription has its own `s`:
//!
//! | `S`  | meaning |
//! |------|---------|
//! | even | no invalidation that overlaps a subscription is running |
//! | odd  | at least one is: the tree is frozen, inserts and removes are deferred |
//!
//! An overlapping invalidation makes `S` odd and hands that value to each
//! overlapping subscriber as `cur_seq`; the subscriber stores it in `s` with
//! [`IntervalNotifier::set_seq`] under its own lock. The last invalidation to
//! end bumps `S` to even. So `s == S` means "this subscription is being
//! invalidated right now". A new subscription starts with `s = S - 1` (odd,
//! never equal to any future `S`), or with `s = S` when it is added during
//! an invalidation (it must assume it is covered).
//!
//! # The reader side
//!
//! ```text
//!   invalidator                         reader (device fault path)
//!   -----------                         --------------------------
//!                                       seq = read_begin()       (waits while s == S)
//!   lock; S |= 1; unlock                look at the primary's PTEs
//!   invalidate(cur_seq = S):
//!     user_lock
//!     set_seq(S)          -- s = S
//!     drop external entries
//!     user_unlock
//!   change the primary's PTEs           user_lock
//!                                       if read_retry(seq) { unlock; goto again }
//!                                          -- s != seq: collided, retry
//!                                       write external entries
//!                                       user_unlock
//!   end: lock; S += 1; unlock; wake
//! ```
//!
//! Either the reader's `read_retry` runs after the invalidator's `set_seq`
//! under the user lock (it sees the collision), or before it (its entries
//! are written before the invalidator takes the lock, and the invalidator
//! drops them). A translation built from a PTE the invalidation is about to
//! change therefore never survives the invalidation.

use std::sync::Arc;

use super::ops::IntervalNotifierOps;
use super::subscriptions::NotifierSubscriptions;
use super::NotifierError;
use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};

pub(crate) const NOT_IN_TREE: u32 = u32::MAX;
pub(crate) const LIVE: u8 = 0;
pub(crate) const DEAD: u8 = 1;
/// One of its callbacks panicked: removed, no further callback.
pub(crate) const FAILED: u8 = 2;

/// The part of an interval subscription the machinery and the reader share.
/// Callbacks receive it to call [`IntervalNotifier::set_seq`].
pub struct IntervalNotifier {
    /// `s` of the sequence encoding: written by `set_seq` (under the
    /// subscriber's lock) and at insertion (under the subscriptions lock);
    /// read by `read_begin` (Acquire, pairs with the Release in `set_seq`)
    /// and `read_retry` (under the subscriber's lock, which orders it).
    pub(crate) seq: AtomicU64,
    pub(crate) start: u64,
    pub(crate) last: u64,
    /// Index of the node in the interval tree, or `NOT_IN_TREE` while an
    /// insert is deferred. Only touched under the subscriptions lock.
    pub(crate) node: AtomicU32,
    /// `LIVE`, `DEAD` or `FAILED`; DEAD once unsubscribe or release
    /// started, FAILED once a callback panicked: no new callback starts
    /// after either.
    pub(crate) state: AtomicU8,
    pub(crate) subs: Arc<NotifierSubscriptions>,
}

/// The allocation shared by the subscription handle and the index.
pub(crate) struct IntervalEntry<T: ?Sized> {
    pub(crate) hdr: IntervalNotifier,
    pub(crate) ops: T,
}

pub(crate) type DynEntry = IntervalEntry<dyn IntervalNotifierOps>;

impl IntervalNotifier {
    /// First byte of the subscribed range.
    #[inline]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte of the subscribed range.
    #[inline]
    pub fn end(&self) -> u64 {
        self.last.wrapping_add(1)
    }

    /// Begin a read-side critical section (`mmu_interval_read_begin`).
    ///
    /// Returns the sequence to hand to [`Self::read_retry`]. If an
    /// invalidation of this subscription is in progress it first waits for
    /// it to end, so the caller does not fault in pages that are about to be
    /// invalidated and loop.
    ///
    /// # Locking
    /// Takes no lock on the fast path (two Acquire loads). May sleep: the
    /// caller must not hold a lock that the subscriber's invalidate callback
    /// takes.
    #[inline]
    pub fn read_begin(&self) -> u64 {
        // Acquire pairs with the Release store in `set_seq`: if we see the
        // callback's `cur_seq`, we also see `S` at least that high.
        let seq = self.seq.load(Ordering::Acquire);
        if seq == self.subs.seq.load(Ordering::Acquire) {
            self.subs.wait_seq_change(seq);
        }
        seq
    }

    /// Whether the read section that began with `seq` collided with an
    /// invalidation and must be retried (`mmu_interval_read_retry`).
    ///
    /// # Locking
    /// Call it with the subscriber's lock held (the one its invalidate
    /// callback takes around `set_seq`), and write the external page table
    /// under that same lock only when it returns false.
    #[inline]
    pub fn read_retry(&self, seq: u64) -> bool {
        // Relaxed: the caller's lock orders this against `set_seq`.
        self.seq.load(Ordering::Relaxed) != seq
    }

    /// Lock-free hint that a read section will have to retry
    /// (`mmu_interval_check_retry`): true means certainly stale, false means
    /// nothing; use it to bail out of long work early.
    #[inline]
    pub fn check_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Relaxed) != seq
    }

    /// Record `cur_seq` (`mmu_interval_set_seq`).
    ///
    /// # Locking
    /// Only from [`IntervalNotifierOps::invalidate`], with the subscriber's
    /// lock held.
    #[inline]
    pub fn set_seq(&self, cur_seq: u64) {
        // Release pairs with the Acquire in `read_begin`.
        self.seq.store(cur_seq, Ordering::Release);
    }

    /// Whether the subscription is still live.
    #[inline]
    pub fn is_live(&self) -> bool {
        self.state.load(Ordering::Acquire) == LIVE
    }

    /// Whether one of its callbacks panicked. A failed subscription was
    /// removed at that moment and hears of no later invalidation: its owner
    /// must drop every translation it holds.
    #[inline]
    pub fn has_failed(&self) -> bool {
        self.state.load(Ordering::Acquire) == FAILED
    }
}

impl core::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("start", &format_args!("{:#x}", self.start))
            .field("end", &format_args!("{:#x}", self.end()))
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .field("live", &self.is_live())
            .finish()
    }
}

/// An interval subscription: the owner's handle. Dropping it unsubscribes.
///
/// It dereferences to [`IntervalNotifier`] for the read side
/// (`read_begin`, `read_retry`, ...).
pub struct IntervalSubscription<T: IntervalNotifierOps + 'static> {
    pub(crate) entry: Arc<IntervalEntry<T>>,
}

impl<T: IntervalNotifierOps + 'static> IntervalSubscription<T> {
    /// The subscriber's callbacks object.
    #[inline]
    pub fn ops(&self) -> &T {
        &self.entry.ops
    }

    /// The shared header (for `read_begin`, `read_retry`, ...).
    #[inline]
    pub fn notifier(&self) -> &IntervalNotifier {
        &self.entry.hdr
    }

    /// Remove the subscription (`mmu_interval_notifier_remove`).
    ///
    /// When it returns, no callback of this subscription runs or will start,
    /// except when called from inside a notifier callback on this thread:
    /// then waiting would deadlock, so it marks the subscription dead (no
    /// new callback starts) and defers the removal without waiting.
    ///
    /// # Errors
    /// [`NotifierError::NotSubscribed`] if it was already removed,
    /// [`NotifierError::Released`] if the address space was released.
    ///
    /// # Locking
    /// Takes the subscriptions lock; may sleep until an invalidation in
    /// progress ends, so the caller must not hold a lock its own invalidate
    /// callback takes.
    pub fn unsubscribe(&self) -> Result<(), NotifierError> {
        let dyn_entry: Arc<DynEntry> = self.entry.clone();
        self.entry.hdr.subs.interval_remove(&dyn_entry)
    }
}

impl<T: IntervalNotifierOps + 'static> core::ops::Deref for IntervalSubscription<T> {
    type Target = IntervalNotifier;
    #[inline]
    fn deref(&self) -> &IntervalNotifier {
        &self.entry.hdr
    }
}

impl<T: IntervalNotifierOps + 'static> Drop for IntervalSubscription<T> {
    fn drop(&mut self) {
        if self.entry.hdr.is_live() {
            let _ = self.unsubscribe();
        }
    }
}

impl<T: IntervalNotifierOps + 'static> core::fmt::Debug for IntervalSubscription<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.entry.hdr.fmt(f)
    }
}
