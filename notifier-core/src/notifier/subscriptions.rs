//! The set of subscribers of one primary address space (the kernel's
//! `struct mmu_notifier_subscriptions`) and the writer side of both
//! protocols.
//!
//! # Locking
//!
//! One mutex, `state`, guards the interval index, the sequence `S`, the
//! count of active invalidations, the deferred list, the range-subscriber
//! snapshot and the grace-period counters. It is held only for bookkeeping:
//! never while a callback runs. A callback may therefore subscribe,
//! unsubscribe, or read, but it must not start an invalidation of the same
//! subscriptions and wait for another thread's.
//!
//! # Invalidation bracket
//!
//! ```text
//!   invalidate_range_start(range)
//!     lock: active += 1; inflight[phase] += 1
//!           hits = itree ∩ range; if hits: S |= 1
//!           snapshot = range subscribers
//!     unlock
//!     for each hit:   invalidate(range, cur_seq = S)   (interval subscribers)
//!     for each range: invalidate_range_start(range)    (range subscribers)
//!   ... the primary changes PTEs, calls clear() per present PTE, flushes ...
//!   end()
//!     for each started range: invalidate_range_end(range)
//!     lock: active -= 1; inflight[phase] -= 1
//!           if active == 0 and S odd: S += 1; apply deferred inserts/removes
//!     unlock; wake waiters
//! ```
//!
//! # Grace periods
//!
//! Interval subscriptions follow the kernel: a removal during an
//! invalidation is deferred to the last end, and the remover waits until
//! `S` moves. Range subscribers and the stand-alone hooks (aging, TLB) use
//! two-phase counters, an SRCU analogue: each bracket or hook call counts
//! itself in `inflight[phase]`; `synchronize` flips `phase` and waits until
//! the old phase drains, so new readers never starve it.
//!
//! # Panicking subscribers
//!
//! Every callback runs under a panic guard (see `guard.rs`): the bracket
//! and the hook sections end whatever a subscriber does, so `S` never stays
//! odd and no section stays counted. The subscriber that panicked is
//! failed (unsubscribed without waiting); the operation gets
//! [`NotifierError::SubscriberPanicked`]. A panic in a start-side hook
//! (`invalidate`, `invalidate_range_start`) abandons the bracket like a
//! refusal: the caller must change nothing.

use std::sync::Arc;

use super::bracket::Invalidation;
use super::guard::{guarded, FirstPanic};
use super::interval::{
    DynEntry, IntervalEntry, IntervalNotifier, IntervalSubscription, DEAD, FAILED, LIVE,
    NOT_IN_TREE,
};
use super::interval_tree::IntervalTree;
use super::ops::{Hooks, IntervalNotifierOps, MmuNotifierOps};
use super::range::{Again, InvalidateRange};
use super::range_sub::{MmuNotifier, RangeEntry};
use super::{EventGate, Hook, NotifierError};
use crate::addr::PageRange;
use crate::sync::{
    self, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, CallbackScope, Condvar, Mutex, MutexGuard,
    Ordering,
};

/// The initial `S`: even, and `S - 1` is a valid odd start for new entries.
const INITIAL_SEQ: u64 = 2;

enum Deferred {
    Insert(Arc<DynEntry>),
    Remove(Arc<DynEntry>),
}

pub(super) struct State {
    itree: IntervalTree<Arc<DynEntry>>,
    /// `S`; mirrored in `NotifierSubscriptions::seq` for lock-free readers.
    seq: u64,
    /// Invalidations between start and end.
    active: u32,
    deferred: Vec<Deferred>,
    /// Copy-on-write snapshot of the range subscribers; `None` when empty.
    pub(super) ranges: Option<Arc<[Arc<RangeEntry>]>>,
    /// Grace-period phase and the bracket/hook sections counted in each.
    pub(super) phase: usize,
    pub(super) inflight: [u32; 2],
    syncing: bool,
    released: bool,
}

impl State {
    #[inline]
    fn invalidating(&self) -> bool {
        self.seq & 1 == 1
    }
}

/// All subscribers of one primary address space.
///
/// Create it with [`NotifierSubscriptions::new`] and share it as an `Arc`:
/// the primary calls the writer side (`invalidate_range_start`, the aging
/// hooks, `release`), secondaries subscribe.
pub struct NotifierSubscriptions {
    pub(super) state: Mutex<State>,
    /// `S` for lock-free readers; written only under `state` (Release).
    pub(crate) seq: AtomicU64,
    /// Threads sleeping on `wq`; `end` skips the wake-up when zero.
    waiters: AtomicUsize,
    wq: Condvar,
    /// Number of range subscribers, so hook calls skip the lock when zero.
    pub(super) nr_ranges: AtomicU32,
    /// The application's order for primaries that report after the fact.
    gate: EventGate,
}

impl core::fmt::Debug for NotifierSubscriptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = sync::lock(&self.state);
        f.debug_struct("NotifierSubscriptions")
            .field("intervals", &st.itree.len())
            .field("ranges", &st.ranges.as_ref().map_or(0, |r| r.len()))
            .field("seq", &st.seq)
            .field("active", &st.active)
            .field("released", &st.released)
            .finish()
    }
}

/// A small vector of interval hits that does not allocate for up to 4.
struct Hits {
    inline: [Option<Arc<DynEntry>>; 4],
    n: usize,
    spill: Vec<Arc<DynEntry>>,
}

impl Hits {
    #[inline]
    fn new() -> Self {
        Self {
            inline: [None, None, None, None],
            n: 0,
            spill: Vec::new(),
        }
    }
    #[inline]
    fn push(&mut self, e: Arc<DynEntry>) {
        if self.n < 4 {
            self.inline[self.n] = Some(e);
            self.n += 1;
        } else {
            self.spill.push(e);
        }
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.n == 0
    }
    #[inline]
    fn iter(&self) -> impl Iterator<Item = &Arc<DynEntry>> {
        self.inline[..self.n]
            .iter()
            .flatten()
            .chain(self.spill.iter())
    }
}

impl NotifierSubscriptions {
    /// A new, empty set of subscribers.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: sync::new_mutex(State {
                itree: IntervalTree::new(),
                seq: INITIAL_SEQ,
                active: 0,
                deferred: Vec::new(),
                ranges: None,
                phase: 0,
                inflight: [0, 0],
                syncing: false,
                released: false,
            }),
            seq: AtomicU64::new(INITIAL_SEQ),
            waiters: AtomicUsize::new(0),
            wq: Condvar::new(),
            nr_ranges: AtomicU32::new(0),
            gate: EventGate::new(),
        })
    }

    // ----------------------------------------------------------------------
    // Waiting.

    /// Sleep until `cond(state)` holds.
    fn wait_until<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        mut cond: impl FnMut(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        if cond(&st) {
            return st;
        }
        // SeqCst pairs with the SeqCst load in `wake`: a waker that changed
        // the state after we checked it under the lock sees us counted.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while !cond(&st) {
            st = self.wq.wait(st);
        }
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        st
    }

    /// Wake sleepers after a state change made under the lock (now dropped).
    #[inline]
    pub(super) fn wake(&self) {
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.wq.notify_all();
        }
    }

    /// Wait until `S != seq` (the reader's slow path).
    pub(crate) fn wait_seq_change(&self, seq: u64) {
        let st = sync::lock(&self.state);
        drop(self.wait_until(st, |st| st.seq != seq));
    }

    /// Wait until every bracket and hook section that started before now
    /// has ended (`synchronize_srcu`).
    fn synchronize(&self) {
        let st = sync::lock(&self.state);
        let mut st = self.wait_until(st, |st| !st.syncing);
        st.syncing = true;
        let old = st.phase;
        st.phase ^= 1;
        let mut st = self.wait_until(st, |st| st.inflight[old] == 0);
        st.syncing = false;
        drop(st);
        self.wake();
    }

    // ----------------------------------------------------------------------
    // Writer side: invalidation brackets.

    /// Announce that the PTEs of `range` are about to change
    /// (`mmu_notifier_invalidate_range_start`).
    ///
    /// Calls every overlapping interval subscriber's `invalidate` and every
    /// range subscriber's `invalidate_range_start`, then returns the open
    /// bracket. The caller changes the PTEs (calling
    /// [`Invalidation::clear`] before each present PTE it clears), flushes,
    /// and ends the bracket; it frees no frame of the range before the end.
    ///
    /// # Errors
    /// [`NotifierError::Again`] when `!range.blockable` and a subscriber
    /// refused, [`NotifierError::SubscriberPanicked`] when a subscriber
    /// panicked (it is failed): every subscriber that had accepted was ended
    /// and the caller must not change anything.
    ///
    /// # Locking
    /// Takes the subscriptions lock twice, briefly; callbacks run unlocked.
    ///
    /// # Pairing
    /// The returned [`Invalidation`] ends the bracket when `end` is called
    /// or when it is dropped.
    pub fn invalidate_range_start(
        &self,
        range: &InvalidateRange,
    ) -> Result<Invalidation<'_>, NotifierError> {
        let mut hits = Hits::new();
        let (cur_seq, ranges, phase, counted);
        {
            let mut st = sync::lock(&self.state);
            counted = !st.released;
            if counted {
                st.active += 1;
                phase = st.phase;
                st.inflight[phase] += 1;
                st.itree
                    .for_each_overlap(range.start(), range.end() - 1, |_, e| hits.push(e.clone()));
                if !hits.is_empty() && !st.invalidating() {
                    st.seq |= 1;
                    self.seq.store(st.seq, Ordering::Release);
                }
                ranges = st.ranges.clone();
            } else {
                phase = 0;
                ranges = None;
            }
            cur_seq = st.seq;
        }
        let mut inv = Invalidation {
            subs: self,
            range: *range,
            ranges,
            started: 0,
            phase,
            counted,
            ended: false,
            panicked: FirstPanic::new(),
        };
        let _scope = CallbackScope::enter();
        for e in hits.iter() {
            if e.hdr.state.load(Ordering::Acquire) != LIVE {
                continue;
            }
            match guarded(|| e.ops.invalidate(&e.hdr, range, cur_seq)) {
                Some(Ok(())) => {}
                Some(Err(Again)) if range.blockable() => {}
                // No range subscriber was started; end the interval part.
                Some(Err(Again)) => {
                    inv.finish();
                    return Err(NotifierError::Again);
                }
                None => {
                    self.fail_interval(e);
                    inv.finish();
                    return Err(NotifierError::SubscriberPanicked {
                        hook: Hook::Invalidate,
                    });
                }
            }
        }
        if let Some(rs) = inv.ranges.clone() {
            for (i, r) in rs.iter().enumerate() {
                inv.started = i;
                if !r.hooks.contains(Hooks::START) || r.dead.load(Ordering::Acquire) {
                    continue;
                }
                // Subscribers [0, i) accepted: on refusal or panic end them;
                // i refused or failed and gets no end.
                match guarded(|| r.ops.invalidate_range_start(range)) {
                    Some(Ok(())) => {}
                    Some(Err(Again)) if range.blockable() => {}
                    Some(Err(Again)) => {
                        inv.finish();
                        return Err(NotifierError::Again);
                    }
                    None => {
                        self.fail_range(r);
                        inv.finish();
                        return Err(NotifierError::SubscriberPanicked {
                            hook: Hook::InvalidateRangeStart,
                        });
                    }
                }
            }
            inv.started = rs.len();
        }
        Ok(inv)
    }

    pub(crate) fn end_bracket(&self, phase: usize) {
        {
            let mut st = sync::lock(&self.state);
            st.active -= 1;
            st.inflight[phase] -= 1;
            if st.active == 0 && st.invalidating() {
                st.seq += 1;
                self.seq.store(st.seq, Ordering::Release);
                let deferred = core::mem::take(&mut st.deferred);
                for d in deferred {
                    match d {
                        Deferred::Insert(e) => {
                            let idx = st.itree.insert(e.hdr.start, e.hdr.last, e.clone());
                            e.hdr.node.store(idx, Ordering::Relaxed);
                        }
                        Deferred::Remove(e) => {
                            let idx = e.hdr.node.swap(NOT_IN_TREE, Ordering::Relaxed);
                            st.itree.remove(idx);
                        }
                    }
                }
            }
        }
        self.wake();
    }

    // ----------------------------------------------------------------------
    // Range subscribers.

    /// Register a range subscriber (`mmu_notifier_register`).
    ///
    /// On return, every invalidation that was in flight has ended, so every
    /// later change of the primary is bracketed for the new subscriber.
    ///
    /// # Errors
    /// [`NotifierError::TlbHookWithStartEnd`],
    /// [`NotifierError::RefusingSubscriberWithEnd`] for contradictory hooks,
    /// [`NotifierError::Released`] after [`Self::release`].
    ///
    /// # Locking
    /// Takes the subscriptions lock; may sleep for the grace period (not
    /// from inside a callback, where it does not wait).
    pub fn register(
        self: &Arc<Self>,
        ops: Arc<dyn MmuNotifierOps>,
    ) -> Result<MmuNotifier, NotifierError> {
        let hooks = ops.hooks();
        if hooks.contains(Hooks::TLB) && hooks.intersects(Hooks::START_END) {
            return Err(NotifierError::TlbHookWithStartEnd);
        }
        if hooks.contains(Hooks::MAY_REFUSE) && hooks.contains(Hooks::END) {
            return Err(NotifierError::RefusingSubscriberWithEnd);
        }
        let entry = Arc::new(RangeEntry::new(ops, hooks));
        {
            let mut st = sync::lock(&self.state);
            if st.released {
                return Err(NotifierError::Released);
            }
            let mut v: Vec<Arc<RangeEntry>> =
                st.ranges.as_deref().map_or_else(Vec::new, <[_]>::to_vec);
            v.push(entry.clone());
            st.ranges = Some(v.into());
            self.nr_ranges.fetch_add(1, Ordering::Release);
        }
        if !sync::in_callback() {
            self.synchronize();
        }
        Ok(MmuNotifier {
            subs: self.clone(),
            entry,
        })
    }

    pub(crate) fn unregister(&self, entry: &Arc<RangeEntry>) -> Result<(), NotifierError> {
        {
            let mut st = sync::lock(&self.state);
            if entry.dead.swap(true, Ordering::AcqRel) {
                return Err(if st.released {
                    NotifierError::Released
                } else {
                    NotifierError::NotSubscribed
                });
            }
            let v: Vec<Arc<RangeEntry>> = st
                .ranges
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .filter(|r| !Arc::ptr_eq(r, entry))
                .cloned()
                .collect();
            st.ranges = if v.is_empty() { None } else { Some(v.into()) };
            self.nr_ranges.fetch_sub(1, Ordering::Release);
        }
        if !sync::in_callback() {
            self.synchronize();
        }
        Ok(())
    }

    // ----------------------------------------------------------------------
    // Interval subscribers.

    /// Subscribe to `[start, start + len)` (`mmu_interval_notifier_insert`).
    ///
    /// # Errors
    /// [`NotifierError::Range`] for an empty, misaligned or wrapping range,
    /// [`NotifierError::Released`] after [`Self::release`].
    ///
    /// # Locking
    /// Takes the subscriptions lock briefly; never sleeps. During an
    /// invalidation the insertion is deferred to its end and the new
    /// subscription starts "being invalidated", so its first `read_begin`
    /// waits for that end.
    pub fn interval_subscribe<T: IntervalNotifierOps + 'static>(
        self: &Arc<Self>,
        start: u64,
        len: u64,
        ops: T,
    ) -> Result<IntervalSubscription<T>, NotifierError> {
        let range = PageRange::new(start, len)?;
        let entry = Arc::new(IntervalEntry {
            hdr: IntervalNotifier {
                seq: AtomicU64::new(0),
                start: range.start(),
                last: range.end() - 1,
                node: AtomicU32::new(NOT_IN_TREE),
                state: AtomicU8::new(LIVE),
                subs: self.clone(),
            },
            ops,
        });
        let dyn_entry: Arc<DynEntry> = entry.clone();
        let mut st = sync::lock(&self.state);
        if st.released {
            return Err(NotifierError::Released);
        }
        if st.active > 0 {
            if st.invalidating() {
                st.deferred.push(Deferred::Insert(dyn_entry));
            } else {
                // A bracket with no interval hit is running; it may cover the
                // new range, so the new subscription must count as invalidated.
                st.seq |= 1;
                self.seq.store(st.seq, Ordering::Release);
                let idx = st.itree.insert(range.start(), range.end() - 1, dyn_entry);
                entry.hdr.node.store(idx, Ordering::Relaxed);
            }
            entry.hdr.seq.store(st.seq, Ordering::Release);
        } else {
            entry.hdr.seq.store(st.seq - 1, Ordering::Release);
            let idx = st.itree.insert(range.start(), range.end() - 1, dyn_entry);
            entry.hdr.node.store(idx, Ordering::Relaxed);
        }
        drop(st);
        Ok(IntervalSubscription { entry })
    }

    pub(crate) fn interval_remove(&self, e: &Arc<DynEntry>) -> Result<(), NotifierError> {
        if let Some(seq) = self.detach_interval(e, DEAD)? {
            if !sync::in_callback() {
                self.wait_seq_change(seq);
            }
        }
        Ok(())
    }

    /// Mark `e` `state` (DEAD or FAILED) and take it out of the index, or
    /// defer that to the end of the running invalidation; returns the `S`
    /// to wait out in the deferred case.
    pub(super) fn detach_interval(
        &self,
        e: &Arc<DynEntry>,
        state: u8,
    ) -> Result<Option<u64>, NotifierError> {
        let wait_for = {
            let mut st = sync::lock(&self.state);
            if e.hdr
                .state
                .compare_exchange(LIVE, state, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(if st.released {
                    NotifierError::Released
                } else {
                    NotifierError::NotSubscribed
                });
            }
            if st.invalidating() {
                if e.hdr.node.load(Ordering::Relaxed) == NOT_IN_TREE {
                    // Inserted during this invalidation, not applied yet.
                    st.deferred
                        .retain(|d| !matches!(d, Deferred::Insert(x) if Arc::ptr_eq(x, e)));
                    None
                } else {
                    st.deferred.push(Deferred::Remove(e.clone()));
                    Some(st.seq)
                }
            } else {
                let idx = e.hdr.node.swap(NOT_IN_TREE, Ordering::Relaxed);
                st.itree.remove(idx);
                None
            }
        };
        Ok(wait_for)
    }

    /// Number of live interval subscriptions in the index (deferred inserts
    /// not counted).
    pub fn interval_count(&self) -> usize {
        sync::lock(&self.state).itree.len()
    }

    /// Bytes of heap held by the interval index.
    pub fn index_heap_bytes(&self) -> usize {
        let st = sync::lock(&self.state);
        st.itree.heap_bytes() + st.deferred.capacity() * core::mem::size_of::<Deferred>()
    }

    /// Bytes of one index node (per interval subscription, excluding the
    /// subscription's own allocation).
    pub const fn index_node_bytes() -> usize {
        IntervalTree::<Arc<DynEntry>>::node_bytes()
    }

    /// Bytes of one subscription allocation for callbacks of type `T`.
    pub const fn subscription_bytes<T: IntervalNotifierOps>() -> usize {
        // The Arc header (two counters) plus the entry.
        2 * core::mem::size_of::<usize>() + core::mem::size_of::<IntervalEntry<T>>()
    }

    /// Current `S` (even when idle).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// The application's-order gate of this primary: a monitor that reports
    /// changes after the fact (userfaultfd) brackets each batch of events
    /// with it, and readers that must not miss an event the application
    /// already saw complete call [`EventGate::wait_applied`] first. A
    /// primary that announces before it changes never opens it.
    #[inline]
    pub fn event_gate(&self) -> &EventGate {
        &self.gate
    }

    /// Whether [`Self::release`] ran.
    pub fn is_released(&self) -> bool {
        sync::lock(&self.state).released
    }

    // ----------------------------------------------------------------------
    // Teardown.

    /// The address space goes away (`mmu_notifier_release`).
    ///
    /// Calls `release` on every range subscriber (that declares it) and every
    /// interval subscriber, once; marks them all dead; waits until every
    /// invalidation and hook call in flight has ended; then empties the
    /// index. After it returns no callback runs or starts, and subscribing
    /// fails with [`NotifierError::Released`]. A second call does nothing.
    ///
    /// # Locking
    /// Takes the subscriptions lock; sleeps for in-flight invalidations
    /// (except from inside a callback, where it cannot wait).
    pub fn release(&self) {
        let _ = self.try_release();
    }

    /// [`Self::release`], reporting a subscriber whose `release` panicked
    /// (it is marked failed; every other subscriber was still released and
    /// the teardown completed).
    ///
    /// # Errors
    /// [`NotifierError::SubscriberPanicked`] with [`Hook::Release`].
    pub fn try_release(&self) -> Result<(), NotifierError> {
        let (ranges, intervals) = {
            let mut st = sync::lock(&self.state);
            if st.released {
                return Ok(());
            }
            st.released = true;
            let ranges = st.ranges.take();
            self.nr_ranges.store(0, Ordering::Release);
            let mut v = Vec::with_capacity(st.itree.len());
            st.itree.for_each(|_, e| v.push(e.clone()));
            for d in &st.deferred {
                if let Deferred::Insert(e) = d {
                    v.push(e.clone());
                }
            }
            (ranges, v)
        };
        let panicked = FirstPanic::new();
        {
            let _scope = CallbackScope::enter();
            for r in ranges.iter().flat_map(|r| r.iter()) {
                if !r.dead.swap(true, Ordering::AcqRel)
                    && r.hooks.contains(Hooks::RELEASE)
                    && guarded(|| r.ops.release()).is_none()
                {
                    panicked.record(Hook::Release);
                    r.failed.store(true, Ordering::Release);
                }
            }
            for e in &intervals {
                if e.hdr.state.swap(DEAD, Ordering::AcqRel) == LIVE
                    && guarded(|| e.ops.release(&e.hdr)).is_none()
                {
                    panicked.record(Hook::Release);
                    e.hdr.state.store(FAILED, Ordering::Release);
                }
            }
        }
        let st = sync::lock(&self.state);
        let mut st = if sync::in_callback() {
            st
        } else {
            self.wait_until(st, |st| st.active == 0 && st.inflight == [0, 0])
        };
        if st.active == 0 {
            st.itree.clear();
            st.deferred.clear();
            if st.invalidating() {
                st.seq += 1;
                self.seq.store(st.seq, Ordering::Release);
            }
        }
        drop(st);
        self.wake();
        panicked.result()
    }
}

/// Convenience: run `f` between start and end of a blockable invalidation.
impl NotifierSubscriptions {
    /// Bracket `f` with an invalidation of `range`.
    ///
    /// # Errors
    /// As [`Self::invalidate_range_start`] (then `f` did not run), and
    /// [`NotifierError::SubscriberPanicked`] for a hook that panicked after
    /// `f` started (then `f` ran and its result is lost).
    pub fn with_invalidation<R>(
        &self,
        range: &InvalidateRange,
        f: impl FnOnce(&Invalidation<'_>) -> R,
    ) -> Result<R, NotifierError> {
        let inv = self.invalidate_range_start(range)?;
        let r = f(&inv);
        inv.try_end()?;
        Ok(r)
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<NotifierSubscriptions>();
    is::<MmuNotifier>();
    let _ = Again;
}
