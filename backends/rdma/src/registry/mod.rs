//! The registration cache (the role of UCX's `ucs_rcache`, libfabric's MR
//! cache): refcounted `get`/`put` of regions covering a range, merging,
//! limits with LRU eviction, and invalidation that never serves a stale
//! registration.
//!
//! # Ownership and locking
//!
//! A [`Registry`] has one owner: `get`, `put` and every other operation
//! take `&mut self` (like a UCX worker's rcache). Sharing it between
//! threads means wrapping it in a mutex; the NIC side (DMA, faults) and the
//! primary's invalidations are concurrent with the owner and never touch
//! its private state. The owner's reference counts are therefore plain
//! integers: the hit path is a hash probe and a few plain loads and
//! stores, with no atomic read-modify-write.
//!
//! The only state the notifier callbacks share with the owner is
//! [`Shared`](crate::region): the callback marks the region invalidated
//! (its keys are rejected from then on, its translations are gone) and
//! queues it; every `get` first checks the queue flag (one Acquire load)
//! and drains it.
//!
//! # Deferred deregistration
//!
//! Invalidation is eager, deregistration deferred: the callback does the
//! part that protects memory (kill the keys, drop translations, under the
//! provider's lock, before the primary's invalidation returns), and leaves
//! the bookkeeping (unindexing, provider deregistration, unsubscribing) to
//! the owner's next `get`. Why: the callback runs inside the primary's
//! invalidation, possibly non-blockable, on any thread; unsubscribing from
//! there cannot wait for the grace period, and taking the owner's state
//! would need a lock on the hit path. No DMA can reach a freed frame
//! either way, because the translations die in the callback.

mod index;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use notifier_core::notifier::NotifierSubscriptions;
use notifier_core::primary::Primary;
use notifier_core::{PageRange, PAGE_SHIFT, PAGE_SIZE};

use crate::access::{Access, Advice};
use crate::error::RegError;
use crate::provider::{Provider, ProviderMr};
use crate::region::{Region, RegionCore, Shared, DEREGISTERED, INVALIDATED, VALID};
use index::{Hit, StartHash};

/// Limits of a registry. Exceeding one evicts idle cached regions in LRU
/// order (down to 15/16 of the limit, so the scan is amortised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Most cached regions.
    pub max_regions: usize,
    /// Most cached bytes.
    pub max_bytes: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_regions: usize::MAX,
            max_bytes: u64::MAX,
        }
    }
}

/// Counters of a registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `get`s served by an existing region.
    pub hits: u64,
    /// `get`s that registered a new region.
    pub misses: u64,
    /// Existing regions folded into a new one (overlap, adjacency, wider access).
    pub merges: u64,
    /// Idle regions evicted by the limits.
    pub evictions: u64,
    /// Regions invalidated (by the primary or explicitly).
    pub invalidations: u64,
    /// Regions registered with the provider.
    pub registrations: u64,
    /// Regions deregistered from the provider.
    pub deregistrations: u64,
    /// Cached regions in the index now.
    pub cached_regions: u64,
    /// Bytes of the cached regions.
    pub cached_bytes: u64,
}

/// A reference to a registered region, returned by `get`, `register` and
/// `register_implicit`. It is plain data (16 bytes, passed in registers):
/// give it back with `put` (or `deregister` for direct registrations); a
/// handle that outlived its region is rejected with a typed error. The
/// region's bounds are [`Registry::bounds`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MrHandle {
    slot: u32,
    gen: u32,
    lkey: u32,
    rkey: u32,
}

impl MrHandle {
    /// The local key.
    #[inline]
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    /// The remote key.
    #[inline]
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Free,
    /// In the index (live, servable).
    Cached,
    /// Cached once, now superseded or invalidated; destroyed at the last put.
    Orphan,
    /// `register`ed outside the cache; destroyed by `deregister`.
    Direct,
}

/// What the slow paths read of a slot (from its region).
#[derive(Clone, Copy)]
struct Info {
    start: u64,
    end: u64,
    access: Access,
}

/// The part of a slot every `get` and `put` touches, kept dense (16 bytes)
/// so a working set of thousands of regions stays in L1/L2.
#[derive(Clone, Copy)]
struct Hot {
    refs: u32,
    /// Value of the owner's use clock at the last `get` (wrapping; LRU age
    /// is `now - tick`).
    tick: u32,
    gen: u32,
    kind: Kind,
}

/// The registration cache over one primary and one provider.
pub struct Registry<N: Provider> {
    provider: N,
    subs: Arc<NotifierSubscriptions>,
    shared: Arc<Shared>,
    /// The region of each slot (`None` when free): the cold part.
    slots: Vec<Option<Region<N::Mr>>>,
    hot: Vec<Hot>,
    free: Vec<u32>,
    /// Cached regions by start; they are disjoint and never adjacent.
    tree: BTreeMap<u64, u32>,
    hash: StartHash,
    /// Reused buffer of slot indices for merges and invalidations.
    scratch: Vec<u32>,
    cfg: RegistryConfig,
    cached: u64,
    cached_bytes: u64,
    tick: u32,
    hits: u64,
    misses: u64,
    merges: u64,
    evictions: u64,
    /// Explicit invalidations (the callbacks count theirs in `shared`).
    invalidations: u64,
    registrations: u64,
    deregistrations: u64,
}

impl<N: Provider> core::fmt::Debug for Registry<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Registry")
            .field("provider", &self.provider.name())
            .field("stats", &self.stats())
            .finish()
    }
}

impl<N: Provider> Registry<N> {
    /// A registry whose regions follow `primary` and are registered with `provider`.
    pub fn new(primary: &dyn Primary, provider: N, cfg: RegistryConfig) -> Self {
        Self {
            provider,
            subs: primary.notifiers().clone(),
            shared: Arc::new(Shared::default()),
            slots: Vec::new(),
            hot: Vec::new(),
            free: Vec::new(),
            tree: BTreeMap::new(),
            hash: StartHash::new(),
            scratch: Vec::new(),
            cfg,
            cached: 0,
            cached_bytes: 0,
            tick: 0,
            hits: 0,
            misses: 0,
            merges: 0,
            evictions: 0,
            invalidations: 0,
            registrations: 0,
            deregistrations: 0,
        }
    }

    /// The provider.
    pub fn provider(&self) -> &N {
        &self.provider
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        Stats {
            hits: self.hits,
            misses: self.misses,
            merges: self.merges,
            evictions: self.evictions,
            invalidations: self.shared.invalidations.load(Ordering::Relaxed) + self.invalidations,
            registrations: self.registrations,
            deregistrations: self.deregistrations,
            cached_regions: self.cached,
            cached_bytes: self.cached_bytes,
        }
    }

    /// Heap bytes of the owner's own structures (slots, ordered index, hash),
    /// excluding the per-region allocations (subscription, provider state).
    pub fn owner_heap_bytes(&self) -> usize {
        // A B-tree leaf holds up to 11 entries; count the entries at 3/4 fill.
        let tree =
            self.tree.len() * (core::mem::size_of::<u64>() + core::mem::size_of::<u32>()) * 4 / 3;
        self.slots.capacity() * core::mem::size_of::<Option<Region<N::Mr>>>()
            + self.hot.capacity() * core::mem::size_of::<Hot>()
            + self.free.capacity() * 4
            + tree
            + self.hash.heap_bytes()
    }

    /// The region behind a handle, for providers' DMA tests and diagnostics.
    ///
    /// # Errors
    /// [`RegError::StaleHandle`] if the handle outlived its region.
    pub fn region(&self, h: MrHandle) -> Result<&Region<N::Mr>, RegError> {
        self.check(h)?;
        self.slots[h.slot as usize]
            .as_ref()
            .ok_or(RegError::StaleHandle)
    }

    /// The bounds `[start, end)` of the handle's region (a merge may have
    /// made it larger than the request).
    ///
    /// # Errors
    /// [`RegError::StaleHandle`] if the handle outlived its region.
    pub fn bounds(&self, h: MrHandle) -> Result<(u64, u64), RegError> {
        self.check(h)?;
        let i = self.info(h.slot);
        Ok((i.start, i.end))
    }

    /// The kind of the handle's live slot.
    #[inline]
    fn check(&self, h: MrHandle) -> Result<Kind, RegError> {
        match self.hot.get(h.slot as usize) {
            Some(x) if x.gen == h.gen && x.kind != Kind::Free => Ok(x.kind),
            _ => Err(RegError::StaleHandle),
        }
    }

    #[inline]
    fn handle(&self, idx: u32) -> MrHandle {
        let r = self.slots[idx as usize].as_ref().expect("live slot");
        MrHandle {
            slot: idx,
            gen: self.hot[idx as usize].gen,
            lkey: r.mr().lkey(),
            rkey: r.mr().rkey(),
        }
    }

    /// Range and rights of a live slot.
    #[inline]
    fn info(&self, idx: u32) -> Info {
        let r = self.slots[idx as usize].as_ref().expect("live slot");
        Info {
            start: r.start(),
            end: r.end(),
            access: r.access(),
        }
    }

    /// Take a reference on a slot (hit or new region).
    #[inline(always)]
    fn take_ref(&mut self, idx: u32) {
        self.tick = self.tick.wrapping_add(1);
        let x = &mut self.hot[idx as usize];
        x.refs += 1;
        x.tick = self.tick;
    }

    // ------------------------------------------------------------------
    // The cache.

    /// Get a cached region covering `[start, start + len)` with at least
    /// `access`, registering (and merging) on a miss; takes a reference.
    ///
    /// Never returns a region that an invalidation has touched.
    ///
    /// # Errors
    /// Bad range or access, [`RegError::LimitExceeded`], provider or
    /// notifier failures. The cache is unchanged on error.
    #[inline(always)]
    pub fn get(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        // Acquire pairs with the Release in the callback's queue push: a get
        // ordered after an invalidation sees the flag and drains first.
        if !self.shared.pending.load(Ordering::Acquire)
            && len != 0
            && (start | len) & (PAGE_SIZE - 1) == 0
            && access.validate()
        {
            if let Some(&hit) = self.hash.get(start >> PAGE_SHIFT) {
                // The hash holds cached regions only, keyed by their start.
                let end = hit.end_access & !(PAGE_SIZE - 1);
                let granted = Access::from_bits(hit.end_access as u8 & Access::ALL.bits());
                if len <= end - start && granted.contains(access) {
                    self.take_ref(hit.slot);
                    self.hits += 1;
                    return Ok(MrHandle {
                        slot: hit.slot,
                        gen: hit.gen,
                        lkey: hit.lkey,
                        rkey: hit.rkey,
                    });
                }
            }
        }
        self.get_slow(start, len, access)
    }

    #[inline(never)]
    fn get_slow(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        self.drain_pending();
        let range = PageRange::new(start, len)?;
        if !access.validate() {
            return Err(RegError::InvalidAccess(access));
        }
        let access = access.normalize();
        // One descent serves the covering check and the merge scan: cached
        // regions are disjoint and never adjacent, so a region covering the
        // range is the last one starting at or below its end.
        let (mut lo, mut hi, mut acc) = (range.start(), range.end(), access);
        // A reused buffer: no allocation per miss.
        let mut victims = core::mem::take(&mut self.scratch);
        victims.clear();
        for (_, &idx) in self.tree.range(..=range.end()).rev() {
            let s = self.info(idx);
            if s.end < range.start() {
                break;
            }
            if victims.is_empty()
                && s.start <= range.start()
                && s.end >= range.end()
                && s.access.contains(access)
            {
                self.take_ref(idx);
                self.hits += 1;
                self.scratch = victims;
                return Ok(self.handle(idx));
            }
            victims.push(idx);
            lo = lo.min(s.start);
            hi = hi.max(s.end);
            acc = acc | s.access;
        }
        let r = self.merge_in(&victims, lo, hi, acc);
        self.scratch = victims;
        let idx = r?;
        self.index(idx);
        self.take_ref(idx);
        Ok(self.handle(idx))
    }

    /// Register `[lo, hi)` with `acc`, replacing the cached `victims`.
    fn merge_in(
        &mut self,
        victims: &[u32],
        lo: u64,
        hi: u64,
        acc: Access,
    ) -> Result<u32, RegError> {
        let merged = PageRange::from_bounds(lo, hi)?;
        let victim_bytes: u64 = victims
            .iter()
            .map(|&i| self.info(i))
            .map(|s| s.end - s.start)
            .sum();
        self.make_room(
            self.cached - victims.len() as u64 + 1,
            self.cached_bytes - victim_bytes + merged.len(),
            victims,
        )?;
        let idx = self.create(merged, acc, Kind::Cached, false)?;
        self.misses += 1;
        self.merges += victims.len() as u64;
        for &v in victims {
            self.unindex(v);
            self.retire_if_idle(v);
        }
        Ok(idx)
    }

    /// Give back a reference taken by [`Self::get`]. The last put of a
    /// region that was invalidated or superseded deregisters it.
    ///
    /// # Errors
    /// [`RegError::StaleHandle`] for a handle of a destroyed region,
    /// [`RegError::PutWithoutGet`] when the region holds no reference (or
    /// is a direct registration).
    #[inline(always)]
    pub fn put(&mut self, h: MrHandle) -> Result<(), RegError> {
        let x = match self.hot.get_mut(h.slot as usize) {
            Some(x) if x.gen == h.gen && x.kind != Kind::Free => x,
            _ => return Err(RegError::StaleHandle),
        };
        if x.refs == 0 || x.kind == Kind::Direct {
            return Err(RegError::PutWithoutGet);
        }
        x.refs -= 1;
        if x.refs == 0 {
            if x.kind == Kind::Orphan {
                self.destroy(h.slot);
            } else if self.shared.pending.load(Ordering::Acquire) {
                // The region may be queued as invalidated: deregister it now.
                self.drain_pending();
            }
        }
        Ok(())
    }

    /// Invalidate every cached region that overlaps `[start, start + len)`
    /// (`ucs_rcache_region_invalidate`): their keys die now, idle ones are
    /// deregistered now, busy ones at their last put. Returns how many.
    ///
    /// # Errors
    /// Bad range.
    pub fn invalidate(&mut self, start: u64, len: u64) -> Result<usize, RegError> {
        let range = PageRange::new(start, len)?;
        self.drain_pending();
        let mut hit = core::mem::take(&mut self.scratch);
        hit.clear();
        for (_, &idx) in self.tree.range(..range.end()).rev() {
            if self.info(idx).end <= range.start() {
                break;
            }
            hit.push(idx);
        }
        for &idx in &hit {
            if let Some(r) = &self.slots[idx as usize] {
                let core = r.core();
                if core
                    .state
                    .compare_exchange(VALID, INVALIDATED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.invalidations += 1;
                }
                r.mr().zap();
            }
            self.unindex(idx);
            self.retire_if_idle(idx);
        }
        let n = hit.len();
        self.scratch = hit;
        Ok(n)
    }

    /// Apply the invalidations the notifier callbacks queued.
    fn drain_pending(&mut self) {
        // Acquire pairs with the Release in `Shared::invalidated`.
        if !self.shared.pending.load(Ordering::Acquire) {
            return;
        }
        for (idx, gen) in self.shared.take() {
            let Some(x) = self.hot.get(idx as usize) else {
                continue;
            };
            if x.gen != gen || x.kind != Kind::Cached {
                continue;
            }
            self.unindex(idx);
            self.retire_if_idle(idx);
        }
    }

    // ------------------------------------------------------------------
    // Direct registrations.

    /// Register `[start, start + len)` outside the cache (never merged,
    /// never evicted, never served to `get`). Give it back with
    /// [`Self::deregister`]. An unmap of its memory invalidates it.
    ///
    /// # Errors
    /// Bad range or access, provider or notifier failures.
    pub fn register(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        self.drain_pending();
        let range = PageRange::new(start, len)?;
        if !access.validate() {
            return Err(RegError::InvalidAccess(access));
        }
        let idx = self.create(range, access.normalize(), Kind::Direct, false)?;
        self.take_ref(idx);
        Ok(self.handle(idx))
    }

    /// Register the whole address space as one implicit ODP region: its
    /// translations are built lazily by NIC faults and prefetch, and dropped
    /// (not the region) on every invalidation.
    ///
    /// # Errors
    /// Bad access; [`crate::ProviderError::Unsupported`] from a provider without ODP.
    pub fn register_implicit(&mut self, access: Access) -> Result<MrHandle, RegError> {
        self.drain_pending();
        if !access.validate() {
            return Err(RegError::InvalidAccess(access));
        }
        let range = PageRange::new(0, !(PAGE_SIZE - 1))?;
        let idx = self.create(range, access.normalize(), Kind::Direct, true)?;
        self.take_ref(idx);
        Ok(self.handle(idx))
    }

    /// Deregister a direct or implicit registration.
    ///
    /// # Errors
    /// [`RegError::NotRegistered`] for a cached region's handle or a handle
    /// already deregistered.
    pub fn deregister(&mut self, h: MrHandle) -> Result<(), RegError> {
        match self.check(h) {
            Ok(Kind::Direct) => {
                self.hot[h.slot as usize].refs = 0;
                self.destroy(h.slot);
                Ok(())
            }
            _ => Err(RegError::NotRegistered),
        }
    }

    // ------------------------------------------------------------------
    // ODP.

    /// Prefetch translations of `[start, start + len)` of the handle's
    /// region (`ibv_advise_mr`).
    ///
    /// # Errors
    /// [`RegError::PermissionDenied`] for [`Advice::PrefetchWrite`] on a
    /// region without local write, [`RegError::OutOfRegion`],
    /// [`RegError::Invalidated`], faults of the primary.
    pub fn advise(
        &self,
        h: MrHandle,
        advice: Advice,
        start: u64,
        len: u64,
    ) -> Result<(), RegError> {
        let range = PageRange::new(start, len)?;
        let region = self.region(h)?;
        if !region.covers(range.start(), range.len()) {
            return Err(RegError::OutOfRegion { start, len });
        }
        if advice == Advice::PrefetchWrite && !region.access().contains(Access::LOCAL_WRITE) {
            return Err(RegError::PermissionDenied);
        }
        if !region.is_valid() {
            return Err(RegError::Invalidated);
        }
        self.provider.advise_mr(region, advice, range)
    }

    // ------------------------------------------------------------------
    // Internals.

    fn create(
        &mut self,
        range: PageRange,
        access: Access,
        kind: Kind,
        implicit: bool,
    ) -> Result<u32, RegError> {
        let mr = self.provider.create_mr(range, access, implicit)?;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| RegError::LimitExceeded)?;
                self.slots.push(None);
                self.hot.push(Hot {
                    refs: 0,
                    tick: 0,
                    gen: 0,
                    kind: Kind::Free,
                });
                i
            }
        };
        let gen = self.hot[idx as usize].gen;
        let core = RegionCore {
            state: std::sync::atomic::AtomicU8::new(VALID),
            access,
            implicit,
            slot: idx,
            gen,
            shared: self.shared.clone(),
            mr,
        };
        let sub = match self
            .subs
            .interval_subscribe(range.start(), range.len(), core)
        {
            Ok(s) => s,
            Err(e) => {
                self.free.push(idx);
                return Err(e.into());
            }
        };
        let region = Region(Arc::new(sub));
        if let Err(e) = self.provider.activate_mr(&region) {
            region.core().state.store(DEREGISTERED, Ordering::Release);
            let _ = region.0.unsubscribe();
            self.free.push(idx);
            return Err(e);
        }
        self.registrations += 1;
        self.slots[idx as usize] = Some(region);
        self.hot[idx as usize] = Hot {
            refs: 0,
            tick: self.tick,
            gen,
            kind,
        };
        Ok(idx)
    }

    fn index(&mut self, idx: u32) {
        let s = self.info(idx);
        let h = self.handle(idx);
        self.tree.insert(s.start, idx);
        let hit = Hit {
            end_access: s.end | u64::from(s.access.bits()),
            slot: idx,
            gen: h.gen,
            lkey: h.lkey,
            rkey: h.rkey,
        };
        self.hash.insert(s.start >> PAGE_SHIFT, hit);
        self.cached += 1;
        self.cached_bytes += s.end - s.start;
    }

    /// Take a cached slot out of the index; it becomes an orphan.
    fn unindex(&mut self, idx: u32) {
        debug_assert_eq!(self.hot[idx as usize].kind, Kind::Cached);
        self.hot[idx as usize].kind = Kind::Orphan;
        let s = self.info(idx);
        self.tree.remove(&s.start);
        self.hash.remove(s.start >> PAGE_SHIFT);
        self.cached -= 1;
        self.cached_bytes -= s.end - s.start;
    }

    fn retire_if_idle(&mut self, idx: u32) {
        if self.hot[idx as usize].refs == 0 {
            self.destroy(idx);
        }
    }

    /// Deregister and free a slot with no reference that is not indexed.
    fn destroy(&mut self, idx: u32) {
        let x = &mut self.hot[idx as usize];
        debug_assert!(x.refs == 0 && x.kind != Kind::Cached && x.kind != Kind::Free);
        x.kind = Kind::Free;
        x.gen = x.gen.wrapping_add(1);
        let region = self.slots[idx as usize].take();
        self.free.push(idx);
        if let Some(region) = region {
            region.core().state.store(DEREGISTERED, Ordering::Release);
            self.provider.dereg_mr(&region);
            // NotSubscribed/Released: the address space is gone; nothing to undo.
            let _ = region.0.unsubscribe();
            self.deregistrations += 1;
        }
    }

    /// Evict idle cached regions (not in `keep`) until `regions` and
    /// `bytes` fit the limits.
    fn make_room(&mut self, regions: u64, bytes: u64, keep: &[u32]) -> Result<(), RegError> {
        let max_r = self.cfg.max_regions as u64;
        let max_b = self.cfg.max_bytes;
        if regions <= max_r && bytes <= max_b {
            return Ok(());
        }
        let now = self.tick;
        let mut idle: Vec<(core::cmp::Reverse<u32>, u32)> = self
            .hot
            .iter()
            .enumerate()
            .filter(|(i, x)| x.kind == Kind::Cached && x.refs == 0 && !keep.contains(&(*i as u32)))
            .map(|(i, x)| (core::cmp::Reverse(now.wrapping_sub(x.tick)), i as u32))
            .collect();
        // Oldest (largest age) first.
        idle.sort_unstable();
        let (low_r, low_b) = (max_r - max_r / 16, max_b - max_b / 16);
        let (mut r, mut b) = (regions, bytes);
        for (_, idx) in idle {
            if r <= low_r && b <= low_b {
                break;
            }
            let len = self.info(idx).end - self.info(idx).start;
            self.unindex(idx);
            self.destroy(idx);
            self.evictions += 1;
            r -= 1;
            b -= len;
        }
        if r <= max_r && b <= max_b {
            Ok(())
        } else {
            Err(RegError::LimitExceeded)
        }
    }
}

impl<N: Provider> Drop for Registry<N> {
    /// Destroy every region (`ucs_rcache_destroy`): held references are
    /// forgotten, every registration is deregistered.
    fn drop(&mut self) {
        for idx in 0..self.hot.len() as u32 {
            let x = &mut self.hot[idx as usize];
            if x.kind == Kind::Free {
                continue;
            }
            x.refs = 0;
            x.kind = Kind::Orphan;
            self.destroy(idx);
        }
    }
}
