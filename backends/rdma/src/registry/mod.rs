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
//! The only state the notifier callbacks share with the owner is the
//! invalidation index (`chunk.rs`): the live regions by range, under a
//! mutex the owner takes only on its slow paths (miss, invalidate,
//! destroy). A chunk callback marks the regions it kills invalidated (their
//! keys are rejected from then on, their translations are gone) and queues
//! them; every `get` first checks the queue flag (one Acquire load) and
//! drains it. The hit path takes no lock.
//!
//! # Deferred deregistration
//!
//! Invalidation is eager, deregistration deferred: the callback does the
//! part that protects memory (kill the keys, drop translations, under the
//! provider's lock, before the primary's invalidation returns), and leaves
//! the bookkeeping (unindexing from the hash, provider deregistration) to
//! the owner's next `get`. Why: the callback runs inside the primary's
//! invalidation, possibly non-blockable, on any thread; deregistering a
//! pinned MR or unsubscribing a private chunk from there cannot wait, and
//! touching the owner's hash would need a lock on the hit path. No DMA can reach a freed frame
//! either way, because the translations die in the callback.

pub(crate) mod chunk;
mod index;
mod ordered;
mod windows;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use notifier_core::notifier::NotifierSubscriptions;
use notifier_core::primary::Primary;
use notifier_core::{PageRange, RangeError, PAGE_SHIFT, PAGE_SIZE};

use crate::access::{Access, Advice};
use crate::error::RegError;
use crate::page_vec::PageVec;
use crate::provider::{Provider, ProviderMr};
use crate::region::{Region, RegionInner, DEREGISTERED, MAX_PAGES, VALID};
use crate::slab::{Slab, SlabArc};
use chunk::{Chunk, ChunkOps, Shared, CHUNK_SHIFT, MAX_EMPTY_CHUNKS};
use index::StartHash;
use windows::{ChunkSlot, Windows};

/// Most region records a registry keeps for reuse (with the chunk they
/// last belonged to; their provider state is recycled): the registrations
/// that follow an unmap storm reuse them whole.
const MAX_SPARE: usize = 1024;

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
    /// Puts from other threads that the owner found stale or doubled
    /// ([`SharedRegistry`](crate::SharedRegistry) only).
    pub bad_remote_puts: u64,
}

/// A reference to a registered region, returned by `get`, `register` and
/// `register_implicit`. It is plain data (16 bytes, passed in registers):
/// give it back with `put` (or `deregister` for direct registrations); a
/// handle that outlived its region is rejected with a typed error. The
/// region's bounds are [`Registry::bounds`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct MrHandle {
    /// `registry id << SLOT_BITS | slot index`: a handle of another
    /// registry is recognised (see [`RegError::ForeignHandle`]).
    slot: u32,
    gen: u32,
    lkey: u32,
    rkey: u32,
}

/// Bits of a handle's slot field that index the slot; the bits above hold
/// the issuing registry's id.
const SLOT_BITS: u32 = 24;
const SLOT_INDEX: u32 = (1 << SLOT_BITS) - 1;

/// Ids of registries, from a process-wide counter (1..=255, wrapping):
/// two registries alive at once share an id only after 255 more were
/// created in between.
pub(crate) fn next_registry_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % 255 + 1
}

impl MrHandle {
    #[inline(always)]
    fn index(&self) -> usize {
        (self.slot & SLOT_INDEX) as usize
    }

    /// The id of the registry that issued the handle.
    #[inline]
    pub fn registry_id(&self) -> u32 {
        self.slot >> SLOT_BITS
    }

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
}

/// The part of a slot every `get` and `put` touches, kept dense (32
/// bytes, half a cache line): the handle a hit returns (copied whole, so
/// the caller's 16-byte load of it forwards from one store), the region's
/// start (the hash key, which the hash does not store) with rights and
/// slot state in its page-offset bits, its length in pages and the
/// reference count. The LRU tick lives in a parallel array. The copies are
/// exact: a live region's range, rights, keys and generation never change.
///
/// Aligned to its size: the allocator only promises 16 bytes, and a record
/// straddling two cache lines costs a hit two misses instead of one. (That
/// alignment is why the records live in a [`PageVec`].)
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Hot {
    handle: MrHandle,
    /// `start | access (bits 0-4) | kind (bits 5-6) | linked (bit 7)`.
    start_bits: u64,
    /// Length in pages, `u32::MAX` when longer (such a region is not hashed).
    pages: u32,
    refs: u32,
}

const ACCESS_MASK: u64 = 0x1f;
const KIND_SHIFT: u32 = 5;
const KIND_MASK: u64 = 0x3 << KIND_SHIFT;
/// An orphan or direct region in the invalidation index's `others`.
const LINKED: u64 = 1 << 7;

impl Hot {
    const FREE: Hot = Hot {
        handle: MrHandle {
            slot: 0,
            gen: 0,
            lkey: 0,
            rkey: 0,
        },
        start_bits: 0,
        pages: 0,
        refs: 0,
    };
    #[inline(always)]
    fn gen(&self) -> u32 {
        self.handle.gen
    }
    #[inline(always)]
    fn kind(&self) -> Kind {
        match (self.start_bits & KIND_MASK) >> KIND_SHIFT {
            0 => Kind::Free,
            1 => Kind::Cached,
            2 => Kind::Orphan,
            _ => Kind::Direct,
        }
    }
    #[inline(always)]
    fn set_kind(&mut self, k: Kind) {
        let v = match k {
            Kind::Free => 0,
            Kind::Cached => 1,
            Kind::Orphan => 2,
            Kind::Direct => 3,
        };
        self.start_bits = (self.start_bits & !KIND_MASK) | (v << KIND_SHIFT);
    }
    #[inline(always)]
    fn linked(&self) -> bool {
        self.start_bits & LINKED != 0
    }
    #[inline(always)]
    fn set_linked(&mut self, on: bool) {
        if on {
            self.start_bits |= LINKED;
        } else {
            self.start_bits &= !LINKED;
        }
    }
}

/// The registration cache over one primary and one provider.
pub struct Registry<N: Provider> {
    /// This registry's id, in the top bits of its handles' slot field.
    id: u32,
    provider: N,
    subs: Arc<NotifierSubscriptions>,
    shared: Arc<Shared<N::Mr>>,
    /// The region of each slot (`None` when free): the cold part.
    slots: PageVec<Option<Region<N::Mr>>>,
    /// In its own mapping: see `page_vec.rs` for why not a `Vec`.
    hot: PageVec<Hot>,
    /// Value of the owner's use clock at each slot's last `get` (wrapping;
    /// LRU age is `now - tick`).
    ticks: PageVec<u32>,
    free: Vec<u32>,
    /// Records of destroyed regions nobody else referenced, reused by
    /// `create` (at most [`MAX_SPARE`]): a register/deregister cycle
    /// rebuilds a record in place.
    spare: Vec<Region<N::Mr>>,
    /// Where the region records live (see `slab.rs`). Declared after every
    /// field that holds records; drop order does not matter for safety
    /// (the slab outlives its last record), only for prompt reuse.
    slab: Slab<RegionInner<N::Mr>>,
    /// Shared chunks by window number (`start >> CHUNK_SHIFT`).
    chunks: Windows<N::Mr>,
    /// Shared chunks with no member.
    empty_chunks: usize,
    /// Chunk sequence taken by the last `create`, for `index`'s `publish`.
    seq: u64,
    /// The invalidation index's callback count read before that sequence
    /// (see `chunk::Index::missed`).
    mark: u64,
    hash: StartHash,
    /// Reused buffer of slot indices for merges and invalidations.
    scratch: Vec<u32>,
    /// Reused buffer of region starts for the drain.
    scratch_keys: Vec<u64>,
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
        Self::with_id(
            primary.notifiers().clone(),
            provider,
            cfg,
            next_registry_id(),
        )
    }

    /// A registry over `subs` whose handles carry `id` (1..=255).
    pub(crate) fn with_id(
        subs: Arc<NotifierSubscriptions>,
        provider: N,
        cfg: RegistryConfig,
        id: u32,
    ) -> Self {
        debug_assert!((1..=255).contains(&id));
        Self {
            id: id << SLOT_BITS,
            provider,
            subs,
            shared: Shared::new(),
            slots: PageVec::new(),
            hot: PageVec::new(),
            ticks: PageVec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            slab: Slab::new(),
            chunks: Windows::default(),
            empty_chunks: 0,
            seq: 0,
            mark: 0,
            hash: StartHash::new(),
            scratch: Vec::new(),
            scratch_keys: Vec::new(),
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

    /// The id its handles carry (see [`MrHandle::registry_id`]).
    pub fn id(&self) -> u32 {
        self.id >> SLOT_BITS
    }

    /// Misses so far (the shared registry publishes its counters on a miss).
    #[inline(always)]
    pub(crate) fn stats_misses(&self) -> u64 {
        self.misses
    }

    /// Whether any region still holds a reference.
    pub(crate) fn has_references(&self) -> bool {
        self.hot.iter().any(|x| x.refs > 0)
    }

    /// The invalidation index the callbacks share with the owner.
    pub(crate) fn shared(&self) -> &Arc<Shared<N::Mr>> {
        &self.shared
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
            invalidations: self.shared.index.lock().invalidations + self.invalidations,
            registrations: self.registrations,
            deregistrations: self.deregistrations,
            cached_regions: self.cached,
            cached_bytes: self.cached_bytes,
            bad_remote_puts: 0,
        }
    }

    /// Bytes of the registry's own structures (slots, hot records, hash,
    /// the invalidation index, chunks), excluding the per-region
    /// allocations. Includes [`Self::owner_mapped_bytes`].
    /// The B-trees are estimated (a leaf holds up to 11 entries; counted at
    /// 6, the fill sequential inserts leave).
    pub fn owner_heap_bytes(&self) -> usize {
        let ix = self.shared.index.lock();
        let leaf = |key: usize, val: usize| (11 * (key + val) + 16) / 6;
        let trees = ix.cached.heap_bytes() + ix.others.len() * leaf(16, 8) + self.chunks.len() * 24;
        self.owner_mapped_bytes() - self.slab.mapped_bytes() + self.free.capacity() * 4 + trees
    }

    /// Bytes of the registry's own anonymous mappings (slots, hot records,
    /// LRU ticks, hash, and the region records' huge-page segments), mapped
    /// whether touched or not, which an allocator does not see.
    pub fn owner_mapped_bytes(&self) -> usize {
        self.slots.mapped_bytes()
            + self.hot.mapped_bytes()
            + self.ticks.mapped_bytes()
            + self.hash.mapped_bytes()
            + self.slab.mapped_bytes()
    }

    /// Bytes of one region's record (its slab cell, with the reference count).
    pub const fn region_bytes() -> usize {
        Slab::<RegionInner<N::Mr>>::CELL_BYTES
    }

    /// Interval subscriptions (chunks) this registry holds on the primary.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
            + self
                .slots
                .iter()
                .flatten()
                .filter(|r| !self.is_shared_chunk(r))
                .count()
    }

    fn is_shared_chunk(&self, r: &Region<N::Mr>) -> bool {
        self.chunks
            .get(r.start() >> CHUNK_SHIFT)
            .is_some_and(|c| Arc::ptr_eq(&c.chunk, &r.0.chunk))
    }

    /// The region behind a handle, for providers' DMA tests and diagnostics.
    ///
    /// # Errors
    /// [`RegError::StaleHandle`] if the handle outlived its region.
    pub fn region(&self, h: MrHandle) -> Result<&Region<N::Mr>, RegError> {
        self.check(h)?;
        self.slots[h.index()].as_ref().ok_or(RegError::StaleHandle)
    }

    /// The bounds `[start, end)` of the handle's region (a merge may have
    /// made it larger than the request).
    ///
    /// # Errors
    /// [`RegError::StaleHandle`] if the handle outlived its region.
    pub fn bounds(&self, h: MrHandle) -> Result<(u64, u64), RegError> {
        self.check(h)?;
        let i = self.info(h.index() as u32);
        Ok((i.start, i.end))
    }

    /// The kind of the handle's live slot.
    #[inline]
    fn check(&self, h: MrHandle) -> Result<Kind, RegError> {
        match self.hot.get(h.index()) {
            Some(x) if x.handle == h && x.kind() != Kind::Free => Ok(x.kind()),
            _ => Err(self.bad_handle(h)),
        }
    }

    /// Why `h` names no live slot of this registry.
    #[cold]
    fn bad_handle(&self, h: MrHandle) -> RegError {
        if h.slot & !SLOT_INDEX != self.id {
            RegError::ForeignHandle
        } else {
            RegError::StaleHandle
        }
    }

    #[inline]
    fn handle(&self, idx: u32) -> MrHandle {
        self.hot[idx as usize].handle
    }

    /// Range and rights of a live slot.
    #[inline]
    fn info(&self, idx: u32) -> Info {
        let r = self.slots[idx as usize].as_ref().expect("live slot");
        Info {
            start: r.start(),
            end: r.end(),
        }
    }

    /// Take a reference on a slot (hit or new region).
    #[inline(always)]
    fn take_ref(&mut self, idx: u32) {
        self.tick = self.tick.wrapping_add(1);
        self.hot[idx as usize].refs += 1;
        self.ticks[idx as usize] = self.tick;
    }

    // ------------------------------------------------------------------
    // The cache.

    /// Get a cached region covering `[start, start + len)` (any alignment:
    /// the region covers the pages of the range) with exactly `access`
    /// (normalized: local read is always granted), registering and merging
    /// on a miss; takes a reference.
    ///
    /// Never returns a region that an invalidation has touched, and
    /// respects the application's order: a `get` that starts after a
    /// `munmap` (or `madvise`, `mremap`) of the range returned in any thread
    /// sees that change applied (see the primary's
    /// [`EventGate`](notifier_core::notifier::EventGate)). Rights are never
    /// widened: only regions of the same rights are merged, and the keys
    /// returned allow exactly `access`.
    ///
    /// # Errors
    /// Bad range or access, [`RegError::LimitExceeded`], provider or
    /// notifier failures, [`RegError::Fault`] with
    /// [`PrimaryFault::Unwatchable`](notifier_core::primary::PrimaryFault)
    /// when the primary cannot follow the memory. The cache is unchanged
    /// on error.
    #[inline(always)]
    pub fn get(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        // The application's order: events the primary's monitor has read
        // (a munmap that returned) are applied before the lookup.
        self.subs.event_gate().wait_applied();
        // Acquire pairs with the Release in the callback's queue push: a get
        // ordered after an invalidation sees the flag and drains first.
        let first = start & !(PAGE_SIZE - 1);
        let end = start.wrapping_add(len);
        if !self.shared.pending.load(Ordering::Acquire)
            && len != 0
            && end > start
            && access.validate()
        {
            // The hash holds cached regions only, keyed by their start; a
            // candidate of another start (a tag collision) takes the slow path.
            if let Some(slot) = self.hash.candidate(first >> PAGE_SHIFT) {
                let x = &mut self.hot[slot as usize];
                if x.start_bits & !(PAGE_SIZE - 1) == first
                    && (end - first + PAGE_SIZE - 1) >> PAGE_SHIFT <= u64::from(x.pages)
                    && x.start_bits & ACCESS_MASK == u64::from(access.normalize().bits())
                {
                    self.tick = self.tick.wrapping_add(1);
                    x.refs += 1;
                    self.ticks[slot as usize] = self.tick;
                    self.hits += 1;
                    return Ok(x.handle);
                }
            }
        }
        self.get_slow(start, len, access)
    }

    #[inline(never)]
    fn get_slow(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        self.drain_pending();
        let range = page_cover(start, len)?;
        if !access.validate() {
            return Err(RegError::InvalidAccess(access));
        }
        let access = access.normalize();
        // A region created while an unmap of its own range ran is stale at
        // birth (`publish`): it is never handed out while a fresh attempt
        // may succeed.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let idx = self.lookup_or_create(range, access)?;
            let cacheable = self.slots[idx as usize]
                .as_ref()
                .is_some_and(|r| r.is_cacheable());
            if cacheable || attempt == ATTEMPTS {
                self.take_ref(idx);
                return Ok(self.handle(idx));
            }
            // Queued by `publish`: the drain retires it (no reference yet).
            self.drain_pending();
        }
        unreachable!("the last attempt returns")
    }

    /// The slot of a cached region covering `range` with exactly `access`,
    /// or of a new one that merged the cached regions of the same rights it
    /// overlaps or touches and displaced those of other rights it overlaps.
    /// Takes no reference.
    fn lookup_or_create(&mut self, range: PageRange, access: Access) -> Result<u32, RegError> {
        // One descent serves the covering check and the merge scan: cached
        // regions are disjoint (and regions of the same rights never
        // adjacent), so a region covering the range is found among those
        // starting at or below its end.
        let (mut lo, mut hi) = (range.start(), range.end());
        // A reused buffer: no allocation per miss.
        let mut victims = core::mem::take(&mut self.scratch);
        victims.clear();
        let mut displaced = 0usize;
        let mut covering = None;
        let mark;
        {
            let ix = self.shared.index.lock();
            // Before the new region's `read_begin` (in `create`).
            mark = ix.calls;
            for r in ix.cached.rev_upto(range.end()).map(|(_, r)| r) {
                if r.end() < range.start() {
                    break;
                }
                let overlaps = r.end() > range.start() && r.start() < range.end();
                if r.access() != access {
                    // Other rights: never merged (that would widen someone's
                    // keys); one that overlaps leaves the cache (its holders
                    // keep it), one that only touches stays.
                    if overlaps {
                        victims.push(r.0.slot);
                        displaced += 1;
                    }
                    continue;
                }
                if victims.is_empty() && r.start() <= range.start() && r.end() >= range.end() {
                    covering = Some(r.0.slot);
                    break;
                }
                // Same rights: merged (the displaced ones sort first, see below).
                victims.push(r.0.slot);
                lo = lo.min(r.start());
                hi = hi.max(r.end());
            }
        }
        if let Some(idx) = covering {
            self.hits += 1;
            self.scratch = victims;
            return Ok(idx);
        }
        let r = self.merge_in(&victims, displaced, lo, hi, access, mark);
        self.scratch = victims;
        let idx = r?;
        self.index(idx);
        Ok(idx)
    }

    /// Register `[lo, hi)` with `acc`, replacing the cached `victims`
    /// (`displaced` of them have other rights: they leave the cache without
    /// being merged).
    fn merge_in(
        &mut self,
        victims: &[u32],
        displaced: usize,
        lo: u64,
        hi: u64,
        acc: Access,
        mark: u64,
    ) -> Result<u32, RegError> {
        let merged = PageRange::from_bounds(lo, hi)?;
        // Before any eviction: a failed get leaves the cache as it was.
        check_len(merged, false)?;
        self.provider.ensure_covered(merged)?;
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
        let idx = self.create(merged, acc, Kind::Cached, false, mark)?;
        self.misses += 1;
        self.merges += (victims.len() - displaced) as u64;
        for &v in victims {
            self.unindex(v, true);
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
        let x = match self.hot.get_mut(h.index()) {
            Some(x) if x.handle == h && x.kind() != Kind::Free => x,
            _ => return Err(self.bad_handle(h)),
        };
        if x.refs == 0 || x.kind() == Kind::Direct {
            return Err(RegError::PutWithoutGet);
        }
        x.refs -= 1;
        if x.refs == 0 {
            if x.kind() == Kind::Orphan {
                self.destroy(h.index() as u32);
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
        {
            let mut ix = self.shared.index.lock();
            let mut first = None;
            for r in ix.cached.rev_below(range.end()).map(|(_, r)| r) {
                if r.end() <= range.start() {
                    break;
                }
                if r.kill() {
                    self.invalidations += 1;
                }
                hit.push(r.0.slot);
                first = Some(r.start());
            }
            // Dead regions leave the invalidation index at once: cached
            // regions are disjoint, so the hit ones are the keys from the
            // first hit's start up to the range's end.
            if let Some(lo) = first {
                ix.cached.remove_range(lo, range.end());
            }
        }
        for &idx in &hit {
            if let Some(r) = &self.slots[idx as usize] {
                r.mr().zap();
            }
            self.unhash(idx);
            self.retire_if_idle(idx);
        }
        let n = hit.len();
        self.scratch = hit;
        Ok(n)
    }

    /// Apply the invalidations the notifier callbacks queued.
    #[inline(always)]
    fn drain_pending(&mut self) {
        // Acquire pairs with the Release in the chunk callback.
        if self.shared.pending.load(Ordering::Acquire) {
            self.drain_queued();
        }
    }

    #[inline(never)]
    fn drain_queued(&mut self) {
        let mut q = core::mem::take(&mut self.scratch);
        q.clear();
        let mut dead = Vec::new();
        self.shared.take(&mut dead);
        for (idx, gen) in dead {
            let Some(x) = self.hot.get(idx as usize) else {
                continue;
            };
            if x.gen() != gen || x.kind() == Kind::Free {
                continue;
            }
            q.push(idx);
        }
        // A region can be queued twice (made stale, then killed, before this
        // drain): each is retired once.
        q.sort_unstable();
        q.dedup();
        // Dead or stale cached regions leave the cache together: one index
        // lock, one pass over the ordered index, then the hash. Dead orphans
        // and direct registrations leave the invalidation index (no callback
        // can matter to them any more); stale ones stay in it, as their
        // keys still translate the pages that remain.
        let mut starts = core::mem::take(&mut self.scratch_keys);
        starts.clear();
        for &idx in &q {
            let live = self.slots[idx as usize]
                .as_ref()
                .is_some_and(|r| r.is_valid());
            match self.hot[idx as usize].kind() {
                Kind::Cached => starts.push(self.info(idx).start),
                Kind::Orphan | Kind::Direct if self.hot[idx as usize].linked() && !live => {
                    let r = self.slots[idx as usize].clone().expect("live slot");
                    self.shared.index.lock().unlink_other(&r);
                    self.hot[idx as usize].set_linked(false);
                }
                _ => {}
            }
        }
        if !starts.is_empty() {
            starts.sort_unstable();
            q.retain(|&idx| self.hot[idx as usize].kind() == Kind::Cached);
            {
                let mut ix = self.shared.index.lock();
                ix.cached.remove_sorted(&starts);
                // A stale region someone holds keeps following its memory.
                for &idx in &q {
                    let r = self.slots[idx as usize].as_ref().expect("live slot");
                    if self.hot[idx as usize].refs > 0 && r.is_valid() {
                        ix.link_other(r.clone());
                        self.hot[idx as usize].set_linked(true);
                    }
                }
            }
            self.unhash_many(&q);
            for &idx in &q {
                self.retire_if_idle(idx);
            }
        }
        self.scratch_keys = starts;
        self.scratch = q;
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
        let mark = self.shared.index.lock().calls;
        let idx = self.create(range, access.normalize(), Kind::Direct, false, mark)?;
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
        let mark = self.shared.index.lock().calls;
        let idx = self.create(range, access.normalize(), Kind::Direct, true, mark)?;
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
                self.hot[h.index()].refs = 0;
                self.destroy(h.index() as u32);
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

    /// The chunk for a region over `range`: the shared chunk of its 1 GiB
    /// window (subscribed on first use), or a private one when the region
    /// crosses a window boundary.
    fn chunk_for(&mut self, range: PageRange) -> Result<Arc<Chunk<N::Mr>>, RegError> {
        let w = range.start() >> CHUNK_SHIFT;
        if (range.end() - 1) >> CHUNK_SHIFT != w {
            let ops = ChunkOps {
                shared: self.shared.clone(),
            };
            let c = self
                .subs
                .interval_subscribe(range.start(), range.len(), ops)?;
            return Ok(Arc::new(c));
        }
        if let Some(c) = self.chunks.get_mut(w) {
            // Released chunks stay in the map until their members go.
            if c.chunk.is_live() {
                if c.members == 0 {
                    self.empty_chunks -= 1;
                }
                c.members += 1;
                return Ok(c.chunk.clone());
            }
        }
        let ops = ChunkOps {
            shared: self.shared.clone(),
        };
        let c = Arc::new(
            self.subs
                .interval_subscribe(w << CHUNK_SHIFT, 1 << CHUNK_SHIFT, ops)?,
        );
        if let Some(old) = self.chunks.insert(
            w,
            ChunkSlot {
                chunk: c.clone(),
                members: 1,
            },
        ) {
            // A released chunk: its members keep it until they go.
            if old.members == 0 {
                self.empty_chunks -= 1;
            }
        }
        Ok(c)
    }

    /// A region of `chunk` left; unsubscribe empty shared chunks beyond
    /// [`MAX_EMPTY_CHUNKS`] and private chunks at once.
    ///
    /// # Locking
    /// Must not hold the index lock (unsubscribing waits for callbacks).
    fn leave_chunk(&mut self, region: &Region<N::Mr>) {
        let w = region.start() >> CHUNK_SHIFT;
        match self.chunks.get_mut(w) {
            Some(c) if Arc::ptr_eq(&c.chunk, &region.0.chunk) => {
                c.members -= 1;
                if c.members == 0 {
                    self.empty_chunks += 1;
                    if self.empty_chunks > MAX_EMPTY_CHUNKS {
                        self.sweep_chunks();
                    }
                }
            }
            // NotSubscribed/Released: the address space is gone; nothing to undo.
            _ => {
                let _ = region.0.chunk.unsubscribe();
            }
        }
    }

    fn sweep_chunks(&mut self) {
        let mut gone = Vec::new();
        self.chunks.retain(|c| {
            if c.members == 0 {
                gone.push(c.chunk.clone());
                false
            } else {
                true
            }
        });
        self.empty_chunks = 0;
        for c in gone {
            let _ = c.unsubscribe();
        }
    }

    fn create(
        &mut self,
        range: PageRange,
        access: Access,
        kind: Kind,
        implicit: bool,
        mark: u64,
    ) -> Result<u32, RegError> {
        check_len(range, implicit)?;
        let mr = self.provider.create_mr(range, access, implicit)?;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| i <= SLOT_INDEX)
                    .ok_or(RegError::LimitExceeded)?;
                // The largest array first: when it moves to huge pages, the
                // small pages it gives up serve the others' growth (`huge.rs`).
                self.hot.push(Hot::FREE);
                self.slots.push(None);
                self.ticks.push(0);
                i
            }
        };
        let gen = self.hot[idx as usize].gen();
        let chunk = match self.chunk_for(range) {
            Ok(c) => c,
            Err(e) => {
                self.free.push(idx);
                return Err(e);
            }
        };
        // An invalidation that runs before the region is in the
        // invalidation index cannot find it; `seq` tells (see `publish`).
        let seq = chunk.read_begin();
        let inner = RegionInner {
            start: range.start(),
            // `create` checked the length of a non-implicit range.
            pages: u32::try_from(range.len() >> PAGE_SHIFT).unwrap_or(u32::MAX),
            chunk,
            slot: idx,
            gen,
            state: std::sync::atomic::AtomicU8::new(VALID),
            access,
            implicit,
            mr,
        };
        let region = match self.spare.pop() {
            Some(mut r) => match r.0.get_mut() {
                Some(x) => {
                    *x = inner;
                    r
                }
                None => Region(self.slab.alloc(inner)),
            },
            None => Region(self.slab.alloc(inner)),
        };
        // Visible to the callbacks before it becomes reachable by DMA.
        if kind == Kind::Direct {
            let mut ix = self.shared.index.lock();
            ix.link_other(region.clone());
            self.publish(&mut ix, &region, seq, mark);
        }
        if let Err(e) = self.provider.activate_mr(&region) {
            region.0.state.store(DEREGISTERED, Ordering::Release);
            if kind == Kind::Direct {
                self.shared.index.lock().unlink_other(&region);
            }
            self.leave_chunk(&region);
            self.free.push(idx);
            return Err(e);
        }
        self.registrations += 1;
        self.seq = seq;
        self.mark = mark;
        let (lkey, rkey) = (region.mr().lkey(), region.mr().rkey());
        self.slots[idx as usize] = Some(region);
        let mut x = Hot {
            handle: MrHandle {
                slot: self.id | idx,
                gen,
                lkey,
                rkey,
            },
            start_bits: range.start() | u64::from(access.bits()),
            pages: u32::try_from(range.len() >> PAGE_SHIFT).unwrap_or(u32::MAX),
            refs: 0,
        };
        self.ticks[idx as usize] = self.tick;
        x.set_kind(kind);
        x.set_linked(kind == Kind::Direct);
        self.hot[idx as usize] = x;
        Ok(idx)
    }

    /// Put a new cached region in the invalidation index and the hash.
    ///
    /// A region created for the cache is not in the invalidation index
    /// between `create` and here, but it is not reachable by the owner's
    /// lookups either, and its DMA fills use the chunk's `read_begin`, which
    /// waits out an invalidation in progress; an invalidation that ended
    /// before this point changed the primary before any translation of the
    /// region was built.
    fn index(&mut self, idx: u32) {
        let r = self.slots[idx as usize].as_ref().expect("live slot");
        let (start, end) = (r.start(), r.end());
        {
            let mut ix = self.shared.index.lock();
            ix.cached.insert(start, r.clone());
            self.publish(&mut ix, r, self.seq, self.mark);
        }
        if idx < index::MAX_SLOT && self.hot[idx as usize].pages != u32::MAX {
            let hot = &self.hot;
            if self.hash.is_full() {
                // Every hashed slot (this one included, already cached).
                self.hash.grow_from(hashed(hot));
            }
            self.hash.insert(start >> PAGE_SHIFT, idx, |s| {
                hot[s as usize].start_bits >> PAGE_SHIFT
            });
        }
        self.cached += 1;
        self.cached_bytes += end - start;
    }

    /// The region just entered the invalidation index (whose lock `ix` is):
    /// if an invalidation of its chunk ran since `seq` (taken before the
    /// region was built) over part of its range, it may have missed the
    /// region; do what it would have done: an on-demand region becomes
    /// stale (never served by the cache; `get` retries), a pinned one dies.
    /// An invalidation of other memory in the chunk's window (`mark` tells
    /// which ran) leaves it alone.
    fn publish(&self, ix: &mut chunk::Index<N::Mr>, r: &Region<N::Mr>, seq: u64, mark: u64) {
        // The index lock is the lock the callback holds around `set_seq`.
        if !(r.notifier().read_retry(seq) && ix.missed(mark, r.start(), r.end())) {
            return;
        }
        let queued = if r.mr().on_demand() {
            r.mark_stale()
        } else if r.kill() {
            r.mr().zap();
            true
        } else {
            false
        };
        if queued {
            ix.queue.push((r.0.slot, r.0.gen));
            ix.invalidations += 1;
            self.shared.pending.store(true, Ordering::Release);
        }
    }

    /// Take a cached slot out of the cache; it becomes an orphan. With
    /// `link`, a live orphan that is still referenced moves to the
    /// invalidation index's `others` (a merge superseded it).
    fn unindex(&mut self, idx: u32, link: bool) {
        let r = self.slots[idx as usize].as_ref().expect("live slot");
        {
            let mut ix = self.shared.index.lock();
            ix.cached.remove(r.start());
            if link && self.hot[idx as usize].refs > 0 && r.is_valid() {
                ix.link_other(r.clone());
                self.hot[idx as usize].set_linked(true);
            }
        }
        self.unhash(idx);
    }

    /// Take a cached slot out of the hash and the counts; it becomes an orphan.
    fn unhash(&mut self, idx: u32) {
        let start = self.uncache(idx);
        let hot = &self.hot;
        self.hash.remove(start >> PAGE_SHIFT, |s| {
            hot[s as usize].start_bits >> PAGE_SHIFT
        });
    }

    /// Make a cached slot an orphan and take it out of the counts (not out
    /// of the hash); returns its start.
    fn uncache(&mut self, idx: u32) -> u64 {
        debug_assert_eq!(self.hot[idx as usize].kind(), Kind::Cached);
        self.hot[idx as usize].set_kind(Kind::Orphan);
        let s = self.info(idx);
        self.cached -= 1;
        self.cached_bytes -= s.end - s.start;
        s.start
    }

    /// [`Self::unhash`] of many cached slots: when they are most of the
    /// hash, rebuild it from the cached slots that stay instead of removing
    /// entries one by one.
    fn unhash_many(&mut self, idxs: &[u32]) {
        if idxs.len() * 2 <= self.hash.len() {
            for &idx in idxs {
                self.unhash(idx);
            }
            return;
        }
        for &idx in idxs {
            self.uncache(idx);
        }
        let hot = &self.hot;
        self.hash
            .rebuild(hashed(hot), |s| hot[s as usize].start_bits >> PAGE_SHIFT);
    }

    fn retire_if_idle(&mut self, idx: u32) {
        if self.hot[idx as usize].refs == 0 {
            self.destroy(idx);
        }
    }

    /// Deregister and free a slot with no reference that is not cached.
    fn destroy(&mut self, idx: u32) {
        let x = &mut self.hot[idx as usize];
        debug_assert!(x.refs == 0 && x.kind() != Kind::Cached && x.kind() != Kind::Free);
        let linked = x.linked();
        x.set_kind(Kind::Free);
        x.set_linked(false);
        x.handle.gen = x.handle.gen.wrapping_add(1);
        let region = self.slots[idx as usize].take();
        self.free.push(idx);
        if let Some(region) = region {
            region.0.state.store(DEREGISTERED, Ordering::Release);
            if linked {
                self.shared.index.lock().unlink_other(&region);
            }
            self.provider.dereg_mr(&region);
            self.leave_chunk(&region);
            self.deregistrations += 1;
            // Unique now unless a DMA in flight still holds it.
            if self.spare.len() < MAX_SPARE {
                let mut region = region;
                if let Some(x) = SlabArc::get_mut(&mut region.0) {
                    x.mr.recycle();
                    self.spare.push(region);
                }
            }
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
            .filter(|(i, x)| {
                x.kind() == Kind::Cached && x.refs == 0 && !keep.contains(&(*i as u32))
            })
            .map(|(i, _)| {
                (
                    core::cmp::Reverse(now.wrapping_sub(self.ticks[i])),
                    i as u32,
                )
            })
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
            self.unindex(idx, false);
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

/// The (start page, slot) of every slot the hash holds: the cached ones
/// it can (see `index.rs`), in slot order.
fn hashed(hot: &[Hot]) -> impl Iterator<Item = (u64, u32)> + '_ {
    hot.iter().enumerate().filter_map(|(i, x)| {
        (x.kind() == Kind::Cached && (i as u32) < index::MAX_SLOT && x.pages != u32::MAX)
            .then_some((x.start_bits >> PAGE_SHIFT, i as u32))
    })
}

/// The pages covering `[start, start + len)` (any alignment).
#[inline]
fn page_cover(start: u64, len: u64) -> Result<PageRange, RegError> {
    if len == 0 {
        return Err(RangeError::Empty.into());
    }
    let end = start
        .checked_add(len)
        .and_then(|e| e.checked_add(PAGE_SIZE - 1))
        .ok_or(RangeError::Wraps { start, len })?;
    Ok(PageRange::from_bounds(
        start & !(PAGE_SIZE - 1),
        end & !(PAGE_SIZE - 1),
    )?)
}

/// A registration's length fits [`MAX_PAGES`] (an implicit one needs not).
#[inline]
fn check_len(range: PageRange, implicit: bool) -> Result<(), RegError> {
    if implicit || range.len() >> PAGE_SHIFT <= MAX_PAGES {
        Ok(())
    } else {
        Err(RegError::TooLarge { len: range.len() })
    }
}

impl<N: Provider> Drop for Registry<N> {
    /// Destroy every region (`ucs_rcache_destroy`): held references are
    /// forgotten, every registration is deregistered.
    fn drop(&mut self) {
        // Empty the cache wholesale (no per-region index removal).
        {
            let mut ix = self.shared.index.lock();
            ix.cached.clear();
        }
        self.hash = StartHash::new();
        for idx in 0..self.hot.len() as u32 {
            let x = &mut self.hot[idx as usize];
            if x.kind() == Kind::Free {
                continue;
            }
            x.refs = 0;
            x.set_kind(Kind::Orphan);
            self.destroy(idx);
        }
        self.sweep_chunks();
    }
}
