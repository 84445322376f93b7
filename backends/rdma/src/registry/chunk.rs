//! Chunk subscriptions and the invalidation index (the design of UCX's
//! single memory hook and of the kernel's implicit ODP child MRs).
//!
//! Subscribing every region to the primary costs an interval-index node
//! and a subscription allocation per region and an index insert and
//! remove per registration. Instead, regions join a *chunk*: one interval
//! subscription per 1 GiB aligned window that holds at least one region
//! (kept while empty, up to [`MAX_EMPTY_CHUNKS`] of them, so a
//! register/deregister cycle does not resubscribe). A region that crosses
//! a window boundary, and an implicit region, get a *private* chunk of
//! exactly their range. Every region has exactly one chunk, which covers it.
//!
//! The chunk's callback finds the affected regions in the registry's
//! [`Index`], which the owner keeps under the same lock.
//!
//! # Locking
//!
//! ```text
//!   chunk callback                       NIC fill (soft/mtt.rs)          owner (slow paths)
//!   --------------                       ----------------------          ------------------
//!   index.lock()  (try_lock if !blockable)  seq = chunk.read_begin()     index.lock()
//!   chunk.set_seq(cur_seq)               look up the primary             insert/remove/query
//!   for each region of this chunk        mtt.write()                     index.unlock()
//!     overlapping the range:             chunk.read_retry(seq)? retry    (never holds it across
//!     stale/kill + drop translations     state VALID? insert             provider calls,
//!     under the region's MTT lock        mtt.unlock()                      read_begin or
//!   queue the killed; index.unlock()                                       unsubscribe)
//! ```
//!
//! `set_seq` runs before the callback takes any region's MTT lock, so a
//! fill that takes that lock after the callback sees the new sequence and
//! retries, and a fill that took it before wrote an entry the callback then
//! removes: the protocol of `notifier_core::notifier::interval` with the
//! region's MTT lock as the subscriber lock. Lock order: index, then MTT;
//! no path takes them the other way round.
//!
//! Dead regions (invalidated) leave the index: they need no further
//! callback, because every DMA and fill checks the state under the MTT lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notifier_core::notifier::{
    Again, Event, IntervalNotifier, IntervalNotifierOps, IntervalSubscription, InvalidateRange,
};
use parking_lot::Mutex;

use super::ordered::SortedBlocks;
use crate::provider::ProviderMr;
use crate::region::Region;
use crate::slab::SlabArc;

/// log2 of the window of a shared chunk (1 GiB, as mlx5's implicit ODP).
pub(crate) const CHUNK_SHIFT: u32 = 30;

/// Most empty shared chunks kept subscribed; beyond, empty ones are unsubscribed.
pub(crate) const MAX_EMPTY_CHUNKS: usize = 16;

/// Callback invocations whose ranges [`Index::log`] keeps.
const LOG: usize = 64;

/// A chunk: an interval subscription whose callback serves its regions.
pub(crate) type Chunk<M> = IntervalSubscription<ChunkOps<M>>;

/// The live regions the callbacks must find, by kind. Owner writes, under
/// [`Shared::index`].
pub(crate) struct Index<M: ProviderMr> {
    /// Cached regions by start: disjoint, never adjacent.
    pub(crate) cached: SortedBlocks<Region<M>>,
    /// Live regions outside the cache (direct registrations, cached regions
    /// superseded by a merge but still referenced) by (start, slot); they
    /// may overlap anything.
    pub(crate) others: BTreeMap<(u64, u32), Region<M>>,
    /// Upper bound of the lengths in `others` (reset when it empties).
    pub(crate) others_max_len: u64,
    /// Implicit regions (whole address space).
    pub(crate) implicit: Vec<Region<M>>,
    /// Regions the callbacks killed, as (slot, gen), for the owner to retire.
    pub(crate) queue: Vec<(u32, u32)>,
    /// Regions the callbacks killed, ever.
    pub(crate) invalidations: u64,
    /// Callback invocations so far (every chunk of the registry).
    pub(crate) calls: u64,
    /// The range each of the last [`LOG`] invocations invalidated, at
    /// `calls % LOG`: what a region built meanwhile may have missed (see
    /// [`Index::missed`]).
    log: [(u64, u64); LOG],
}

impl<M: ProviderMr> Default for Index<M> {
    fn default() -> Self {
        Self {
            cached: SortedBlocks::default(),
            others: BTreeMap::new(),
            others_max_len: 0,
            implicit: Vec::new(),
            queue: Vec::new(),
            invalidations: 0,
            calls: 0,
            log: [(0, 0); LOG],
        }
    }
}

impl<M: ProviderMr> Index<M> {
    /// A callback invalidated `[start, end)`.
    fn record(&mut self, start: u64, end: u64) {
        self.log[(self.calls % LOG as u64) as usize] = (start, end);
        self.calls += 1;
    }

    /// Whether a callback invoked after [`Self::calls`] read `mark`
    /// invalidated part of `[start, end)` (or too many ran to tell).
    ///
    /// A region is built outside the index lock and enters the index only
    /// afterwards: a callback that ran in between cannot have found it. The
    /// owner reads `mark` under the lock before the region's `read_begin`,
    /// so every callback whose `set_seq` that `read_begin` did not see is
    /// counted after `mark`; only those that overlap the region can have
    /// changed its memory.
    pub(crate) fn missed(&self, mark: u64, start: u64, end: u64) -> bool {
        if self.calls - mark > LOG as u64 {
            return true;
        }
        (mark..self.calls).any(|c| {
            let (a, b) = self.log[(c % LOG as u64) as usize];
            a < end && start < b
        })
    }

    /// Add a live region outside the cache.
    pub(crate) fn link_other(&mut self, r: Region<M>) {
        if r.is_implicit() {
            self.implicit.push(r);
        } else {
            self.others_max_len = self.others_max_len.max(r.end() - r.start());
            self.others.insert((r.start(), r.0.slot), r);
        }
    }

    /// Remove a region added by [`Self::link_other`].
    pub(crate) fn unlink_other(&mut self, r: &Region<M>) {
        if r.is_implicit() {
            self.implicit.retain(|x| !SlabArc::ptr_eq(&x.0, &r.0));
        } else {
            self.others.remove(&(r.start(), r.0.slot));
            if self.others.is_empty() {
                self.others_max_len = 0;
            }
        }
    }
}

/// What the chunk callbacks share with the registry owner.
///
/// # Pairing
/// A callback pushes to `index.queue` and then sets `pending` (Release);
/// the owner loads `pending` (Acquire) at the head of every `get` and drains.
pub(crate) struct Shared<M: ProviderMr> {
    pub(crate) pending: AtomicBool,
    pub(crate) index: Mutex<Index<M>>,
}

impl<M: ProviderMr> Shared<M> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: AtomicBool::new(false),
            index: Mutex::new(Index::default()),
        })
    }

    /// Kill every cached region overlapping `[start, end)` from any thread
    /// (an explicit invalidation of a cache whose owner is another thread):
    /// their keys die now; the owner retires them at its next `get`, as it
    /// does for the callbacks' kills. Returns how many this call killed.
    pub(crate) fn kill_range(&self, start: u64, end: u64) -> usize {
        let mut ix = self.index.lock();
        let mut n = 0;
        let mut dead = Vec::new();
        for r in ix.cached.rev_below(end).map(|(_, r)| r) {
            if r.end() <= start {
                break;
            }
            if r.kill() {
                r.mr().zap();
                dead.push((r.0.slot, r.0.gen));
                n += 1;
            }
        }
        if n > 0 {
            ix.invalidations += n as u64;
            ix.queue.append(&mut dead);
            // Release pairs with the owner's Acquire load of `pending`.
            self.pending.store(true, Ordering::Release);
        }
        n
    }

    /// Take the queued invalidations into `out`.
    pub(crate) fn take(&self, out: &mut Vec<(u32, u32)>) {
        let mut ix = self.index.lock();
        self.pending.store(false, Ordering::Relaxed);
        out.append(&mut ix.queue);
    }
}

/// The callbacks object of a chunk subscription.
pub(crate) struct ChunkOps<M: ProviderMr> {
    pub(crate) shared: Arc<Shared<M>>,
}

/// Invalidate `r`'s part of `[a, b)` with ODP semantics: the translations
/// of the invalidated pages go, and pages that still exist fault in again.
/// An unmap of part of an on-demand region makes it *stale*: the cache
/// never hands it out again, its keys keep working on the pages that
/// remain, and the unmapped pages are recorded as gone (DMA there fails
/// with a typed error, even once new memory is mapped there). The region
/// dies (keys rejected) when the unmap covers all of it, when the provider
/// cannot record gone pages, for a pinned registration on any event, and
/// for every region when the address space goes away. Either transition
/// queues it for the owner. Called with the index lock held.
fn invalidate_one<M: ProviderMr>(
    r: &Region<M>,
    a: u64,
    b: u64,
    event: Event,
    blockable: bool,
    queue: &mut Vec<(u32, u32)>,
    killed_count: &mut u64,
) -> Result<(), Again> {
    let (lo, hi) = (a.max(r.start()), b.min(r.end()));
    let unmap = !r.is_implicit() && matches!(event, Event::Unmap);
    let whole = lo <= r.start() && hi >= r.end();
    let kill = !r.is_implicit()
        && (matches!(event, Event::Release) || !r.mr().on_demand() || (unmap && whole));
    let mut queued = false;
    let mut mark = || {
        if kill {
            queued = r.kill();
        } else if unmap {
            queued = r.mark_stale();
        }
        kill
    };
    r.mr().invalidate(lo, hi, blockable, &mut mark)?;
    if unmap && !kill && !r.mr().forget(lo, hi) && r.kill() {
        r.mr().zap();
        queued = true;
    }
    if queued {
        queue.push((r.0.slot, r.0.gen));
        *killed_count += 1;
    }
    Ok(())
}

impl<M: ProviderMr> IntervalNotifierOps for ChunkOps<M> {
    /// Under the index lock: record the sequence, then for every live
    /// region of this chunk that overlaps the range drop its translations
    /// (and kill it on an unmap, or on any event for a pinned registration).
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut ix = if range.blockable() {
            self.shared.index.lock()
        } else {
            self.shared.index.try_lock().ok_or(Again)?
        };
        sub.set_seq(cur_seq);
        let (a, b) = (range.start().max(sub.start()), range.end().min(sub.end()));
        ix.record(a, b);
        let mine = |r: &Region<M>| core::ptr::eq(r.notifier(), sub);
        let Index {
            cached,
            others,
            others_max_len,
            implicit,
            queue,
            invalidations,
            ..
        } = &mut *ix;
        let before = queue.len();
        let mut res = Ok(());
        // Cached regions are disjoint: walk back from the last starting
        // before `b` until one ends at or before `a`.
        for r in cached.rev_below(b).map(|(_, r)| r) {
            if r.end() <= a {
                break;
            }
            if mine(r) {
                res = res.and(invalidate_one(
                    r,
                    a,
                    b,
                    range.event(),
                    range.blockable(),
                    queue,
                    invalidations,
                ));
            }
        }
        if !others.is_empty() {
            let lo = a.saturating_sub(*others_max_len);
            for r in others.range((lo, 0)..(b, 0)).map(|(_, r)| r) {
                if r.end() > a && mine(r) {
                    res = res.and(invalidate_one(
                        r,
                        a,
                        b,
                        range.event(),
                        range.blockable(),
                        queue,
                        invalidations,
                    ));
                }
            }
        }
        for r in implicit.iter() {
            if mine(r) {
                res = res.and(invalidate_one(
                    r,
                    a,
                    b,
                    range.event(),
                    range.blockable(),
                    queue,
                    invalidations,
                ));
            }
        }
        if queue.len() > before {
            // Release pairs with the owner's Acquire load of `pending`.
            self.shared.pending.store(true, Ordering::Release);
        }
        res
    }

    /// The address space goes away: kill every region of this chunk.
    fn release(&self, sub: &IntervalNotifier) {
        let mut ix = self.shared.index.lock();
        ix.record(sub.start(), sub.end());
        let Index {
            cached,
            others,
            implicit,
            queue,
            invalidations,
            ..
        } = &mut *ix;
        let before = queue.len();
        for r in cached
            .values()
            .chain(others.values())
            .chain(implicit.iter())
        {
            if core::ptr::eq(r.notifier(), sub) && r.kill() {
                r.mr().zap();
                queue.push((r.0.slot, r.0.gen));
                *invalidations += 1;
            }
        }
        if queue.len() > before {
            self.shared.pending.store(true, Ordering::Release);
        }
    }
}
