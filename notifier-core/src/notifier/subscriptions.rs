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

use std::sync::Arc;

use super::interval::{
    DynEntry, IntervalEntry, IntervalNotifier, IntervalSubscription, DEAD, LIVE, NOT_IN_TREE,
};
use super::interval_tree::IntervalTree;
use super::ops::{Hooks, IntervalNotifierOps, MmuNotifierOps};
use super::range::{Again, InvalidateRange};
use super::{EventGate, NotifierError};
use crate::addr::PageRange;
use crate::sync::{
    self, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, CallbackScope, Condvar, Mutex,
    MutexGuard, Ordering,
};

/// The initial `S`: even, and `S - 1` is a valid odd start for new entries.
const INITIAL_SEQ: u64 = 2;

pub(crate) struct RangeEntry {
    ops: Arc<dyn MmuNotifierOps>,
    hooks: Hooks,
    /// Set by unregister/release: no new callback starts.
    dead: AtomicBool,
}

enum Deferred {
    Insert(Arc<DynEntry>),
    Remove(Arc<DynEntry>),
}

struct State {
    itree: IntervalTree<Arc<DynEntry>>,
    /// `S`; mirrored in `NotifierSubscriptions::seq` for lock-free readers.
    seq: u64,
    /// Invalidations between start and end.
    active: u32,
    deferred: Vec<Deferred>,
    /// Copy-on-write snapshot of the range subscribers; `None` when empty.
    ranges: Option<Arc<[Arc<RangeEntry>]>>,
    /// Grace-period phase and the bracket/hook sections counted in each.
    phase: usize,
    inflight: [u32; 2],
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
    state: Mutex<State>,
    /// `S` for lock-free readers; written only under `state` (Release).
    pub(crate) seq: AtomicU64,
    /// Threads sleeping on `wq`; `end` skips the wake-up when zero.
    waiters: AtomicUsize,
    wq: Condvar,
    /// Number of range subscribers, so hook calls skip the lock when zero.
    nr_ranges: AtomicU32,
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
    fn wake(&self) {
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
    /// refused: every subscriber that had accepted was ended and the caller
    /// must not change anything.
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
        debug_assert!(range.start < range.end);
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
                    .for_each_overlap(range.start, range.end - 1, |_, e| hits.push(e.clone()));
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
        };
        let _scope = CallbackScope::enter();
        for e in hits.iter() {
            if e.hdr.state.load(Ordering::Acquire) != LIVE {
                continue;
            }
            if e.ops.invalidate(&e.hdr, range, cur_seq).is_err() && !range.blockable {
                // No range subscriber was started; end the interval part.
                inv.finish();
                return Err(NotifierError::Again);
            }
        }
        if let Some(rs) = inv.ranges.clone() {
            for (i, r) in rs.iter().enumerate() {
                inv.started = i;
                if !r.hooks.contains(Hooks::START) || r.dead.load(Ordering::Acquire) {
                    continue;
                }
                if r.ops.invalidate_range_start(range).is_err() && !range.blockable {
                    // Subscribers [0, i) accepted: end them; i refused.
                    inv.finish();
                    return Err(NotifierError::Again);
                }
            }
            inv.started = rs.len();
        }
        Ok(inv)
    }

    fn end_bracket(&self, phase: usize) {
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
    // Stand-alone hooks (aging, TLB).

    /// Run `f` over the live range subscribers that have `hook`, inside a
    /// grace-period section.
    #[inline]
    fn for_each_range(&self, hook: Hooks, mut f: impl FnMut(&dyn MmuNotifierOps)) {
        if self.nr_ranges.load(Ordering::Acquire) == 0 {
            return;
        }
        let (ranges, phase) = {
            let mut st = sync::lock(&self.state);
            let Some(r) = st.ranges.clone() else { return };
            let phase = st.phase;
            st.inflight[phase] += 1;
            (r, phase)
        };
        {
            let _scope = CallbackScope::enter();
            for r in ranges.iter() {
                if r.hooks.contains(hook) && !r.dead.load(Ordering::Acquire) {
                    f(&*r.ops);
                }
            }
        }
        let mut st = sync::lock(&self.state);
        st.inflight[phase] -= 1;
        drop(st);
        self.wake();
    }

    /// Age the secondaries' accessed bits in `[start, end)` and flush
    /// (`mmu_notifier_clear_flush_young`); true if any subscriber saw a
    /// young page.
    pub fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let mut young = false;
        self.for_each_range(Hooks::AGING, |o| young |= o.clear_flush_young(start, end));
        young
    }

    /// Like [`Self::clear_flush_young`] without the flush (`mmu_notifier_clear_young`).
    pub fn clear_young(&self, start: u64, end: u64) -> bool {
        let mut young = false;
        self.for_each_range(Hooks::AGING, |o| young |= o.clear_young(start, end));
        young
    }

    /// Whether any secondary has the page at `addr` young (`mmu_notifier_test_young`).
    pub fn test_young(&self, addr: u64) -> bool {
        let mut young = false;
        self.for_each_range(Hooks::AGING, |o| young |= o.test_young(addr));
        young
    }

    /// The primary flushed its TLB for `[start, end)`
    /// (`mmu_notifier_arch_invalidate_secondary_tlbs`).
    pub fn invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        self.for_each_range(Hooks::TLB, |o| o.invalidate_secondary_tlbs(start, end));
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
        let entry = Arc::new(RangeEntry {
            ops,
            hooks,
            dead: AtomicBool::new(false),
        });
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

    fn unregister(&self, entry: &Arc<RangeEntry>) -> Result<(), NotifierError> {
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
        let wait_for = {
            let mut st = sync::lock(&self.state);
            if e.hdr.state.swap(DEAD, Ordering::AcqRel) != LIVE {
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
        if let Some(seq) = wait_for {
            if !sync::in_callback() {
                self.wait_seq_change(seq);
            }
        }
        Ok(())
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
        let (ranges, intervals) = {
            let mut st = sync::lock(&self.state);
            if st.released {
                return;
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
        {
            let _scope = CallbackScope::enter();
            for r in ranges.iter().flat_map(|r| r.iter()) {
                if !r.dead.swap(true, Ordering::AcqRel) && r.hooks.contains(Hooks::RELEASE) {
                    r.ops.release();
                }
            }
            for e in &intervals {
                if e.hdr.state.swap(DEAD, Ordering::AcqRel) == LIVE {
                    e.ops.release(&e.hdr);
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
    }
}

/// An open invalidation bracket, returned by
/// [`NotifierSubscriptions::invalidate_range_start`].
///
/// # Pairing
/// Ends with [`Invalidation::end`] or on drop (so a panicking primary does
/// not leave readers waiting forever).
#[must_use = "the bracket ends when this is dropped; change the PTEs first"]
pub struct Invalidation<'a> {
    subs: &'a NotifierSubscriptions,
    range: InvalidateRange,
    ranges: Option<Arc<[Arc<RangeEntry>]>>,
    /// Range subscribers `[0, started)` of the snapshot got a start.
    started: usize,
    phase: usize,
    /// Whether this bracket is counted in `active` (false after release).
    counted: bool,
    ended: bool,
}

impl Invalidation<'_> {
    /// The range being invalidated.
    #[inline]
    pub fn range(&self) -> &InvalidateRange {
        &self.range
    }

    /// Seed 003's per-PTE hook: the present PTE at `addr` is about to be
    /// cleared. Call it before clearing, inside the bracket.
    #[inline]
    pub fn clear(&self, addr: u64) {
        if let Some(rs) = &self.ranges {
            let _scope = CallbackScope::enter();
            for r in rs.iter() {
                if r.hooks.contains(Hooks::CLEAR) && !r.dead.load(Ordering::Acquire) {
                    r.ops.clear(addr);
                }
            }
        }
    }

    /// The primary flushed its TLB for `[start, end)` inside this bracket.
    #[inline]
    pub fn invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        if let Some(rs) = &self.ranges {
            let _scope = CallbackScope::enter();
            for r in rs.iter() {
                if r.hooks.contains(Hooks::TLB) && !r.dead.load(Ordering::Acquire) {
                    r.ops.invalidate_secondary_tlbs(start, end);
                }
            }
        }
    }

    /// End the bracket (`mmu_notifier_invalidate_range_end`): range
    /// subscribers get their end, `S` becomes even when this was the last
    /// overlapping invalidation, deferred subscriptions are applied and
    /// waiting readers wake.
    #[inline]
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(rs) = &self.ranges {
            let _scope = CallbackScope::enter();
            for r in &rs[..self.started] {
                if r.hooks.contains(Hooks::END) && !r.dead.load(Ordering::Acquire) {
                    r.ops.invalidate_range_end(&self.range);
                }
            }
        }
        self.ranges = None;
        if self.counted {
            self.subs.end_bracket(self.phase);
        }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A registered range subscriber: the owner's handle.
pub struct MmuNotifier {
    subs: Arc<NotifierSubscriptions>,
    entry: Arc<RangeEntry>,
}

impl MmuNotifier {
    /// Unregister (`mmu_notifier_unregister`). When it returns no callback
    /// of this subscriber runs or will start (from inside a callback: no new
    /// one starts once the current one returns).
    ///
    /// # Errors
    /// [`NotifierError::NotSubscribed`] on a second call,
    /// [`NotifierError::Released`] after release.
    ///
    /// # Locking
    /// Takes the subscriptions lock; may sleep for the grace period.
    pub fn unregister(&self) -> Result<(), NotifierError> {
        self.subs.unregister(&self.entry)
    }

    /// Whether still registered.
    pub fn is_registered(&self) -> bool {
        !self.entry.dead.load(Ordering::Acquire)
    }
}

impl Drop for MmuNotifier {
    /// Dropping the handle unregisters the subscriber (errors ignored: it
    /// may already be unregistered or released).
    fn drop(&mut self) {
        if self.is_registered() {
            let _ = self.subs.unregister(&self.entry);
        }
    }
}

impl core::fmt::Debug for MmuNotifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmuNotifier")
            .field("hooks", &self.entry.hooks)
            .field("registered", &self.is_registered())
            .finish()
    }
}

/// Convenience: run `f` between start and end of a blockable invalidation.
impl NotifierSubscriptions {
    /// Bracket `f` with a blockable invalidation of `range` for `event`.
    pub fn with_invalidation<R>(
        &self,
        range: &InvalidateRange,
        f: impl FnOnce(&Invalidation<'_>) -> R,
    ) -> Result<R, NotifierError> {
        let inv = self.invalidate_range_start(range)?;
        let r = f(&inv);
        inv.end();
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
