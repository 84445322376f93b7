//! One registered region: its range, rights and state, the provider's
//! per-region state, and the chunk subscription that watches its memory.
//!
//! # States
//!
//! | `state`        | meaning | who sets it |
//! |----------------|---------|-------------|
//! | `VALID`        | cached or registered, keys usable | creation |
//! | `STALE`        | part of its memory changed under an on-demand (ODP) registration: the translations of the changed pages are gone, keys stay usable (DMA faults pages in again, or fails with a typed error where memory is gone), never served by the cache again | chunk callback |
//! | `INVALIDATED`  | the user invalidated it, a pinned registration's memory changed, or the address space went away: keys rejected, translations unusable, never served again | chunk callback / `Registry::invalidate` |
//! | `DEREGISTERED` | the registry destroyed it (last put, eviction, deregister) | registry owner |
//!
//! Transitions only go down the table. An invalidated region stays
//! allocated (its handle still accepts `put`) until its last reference is
//! put; its keys are never reissued while it exists.
//!
//! # Chunks
//!
//! A region does not subscribe to the primary itself: it joins a *chunk*,
//! one interval subscription shared by every region inside a 1 GiB aligned
//! window (a region crossing a window boundary, and an implicit region, get
//! a private chunk of exactly their range). The chunk's callback finds the
//! affected regions in the registry's index (see `registry/chunk.rs`). The
//! fill path's `read_begin`/`read_retry` run on the chunk's notifier,
//! [`Region::notifier`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use notifier_core::notifier::IntervalNotifier;

use crate::access::Access;
use crate::provider::ProviderMr;
use crate::registry::chunk::Chunk;
use crate::slab::SlabArc;

pub(crate) const VALID: u8 = 0;
pub(crate) const STALE: u8 = 1;
pub(crate) const INVALIDATED: u8 = 2;
pub(crate) const DEREGISTERED: u8 = 3;

/// Most pages of one registration (16 TiB): the length is stored in 32
/// bits, which keeps a region's allocation at 72 bytes instead of 80.
pub const MAX_PAGES: u64 = u32::MAX as u64;

/// End of an implicit region: the last page of the address space.
const IMPLICIT_END: u64 = !(notifier_core::PAGE_SIZE - 1);

/// The shared allocation of a region.
pub(crate) struct RegionInner<M: ProviderMr> {
    pub(crate) start: u64,
    /// Length in pages (a registration is at most [`MAX_PAGES`] pages); an
    /// implicit region ends at the top of the address space instead.
    pub(crate) pages: u32,
    pub(crate) chunk: Arc<Chunk<M>>,
    pub(crate) slot: u32,
    pub(crate) gen: u32,
    pub(crate) state: AtomicU8,
    pub(crate) access: Access,
    pub(crate) implicit: bool,
    pub(crate) mr: M,
}

/// A registered region as providers see it. Cloning shares it (the
/// registry, its invalidation index and the NIC's key table each hold one):
/// a counted record in the registry's slab (`slab.rs`), not a heap `Arc`.
pub struct Region<M: ProviderMr>(pub(crate) SlabArc<RegionInner<M>>);

impl<M: ProviderMr> Clone for Region<M> {
    fn clone(&self) -> Self {
        Region(self.0.clone())
    }
}

impl<M: ProviderMr> Region<M> {
    /// First byte.
    #[inline]
    pub fn start(&self) -> u64 {
        self.0.start
    }
    /// One past the last byte.
    #[inline]
    pub fn end(&self) -> u64 {
        if self.0.implicit {
            IMPLICIT_END
        } else {
            self.0.start + (u64::from(self.0.pages) << notifier_core::PAGE_SHIFT)
        }
    }
    /// The region's rights.
    #[inline]
    pub fn access(&self) -> Access {
        self.0.access
    }
    /// Whether this is an implicit ODP region (whole address space).
    #[inline]
    pub fn is_implicit(&self) -> bool {
        self.0.implicit
    }
    /// Whether keys of this region are usable (not invalidated, not
    /// deregistered; a stale ODP region's keys are).
    ///
    /// Acquire pairs with the AcqRel transitions in the callback and the registry.
    #[inline]
    pub fn is_valid(&self) -> bool {
        self.0.state.load(Ordering::Acquire) <= STALE
    }

    /// Whether the cache may hand this region out: no part of its memory
    /// changed since it was registered.
    #[inline]
    pub fn is_cacheable(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == VALID
    }
    /// The provider's state.
    #[inline]
    pub fn mr(&self) -> &M {
        &self.0.mr
    }
    /// The interval notifier of the region's chunk, for the fill path's
    /// `read_begin`/`read_retry`. Its range covers the region (and, for a
    /// shared chunk, its neighbours: an invalidation of a neighbour makes a
    /// racing fill retry, which is harmless).
    #[inline]
    pub fn notifier(&self) -> &IntervalNotifier {
        self.0.chunk.notifier()
    }
    /// Whether `[addr, addr + len)` lies inside the region.
    #[inline]
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        addr >= self.start() && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }
    /// Kill the region (VALID or STALE -> INVALIDATED); returns whether
    /// this call did.
    #[inline]
    pub(crate) fn kill(&self) -> bool {
        let mut cur = self.0.state.load(Ordering::Acquire);
        while cur <= STALE {
            match self.0.state.compare_exchange(
                cur,
                INVALIDATED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// Take the region out of the cache's reach (VALID -> STALE) while its
    /// keys stay usable; returns whether this call did.
    #[inline]
    pub(crate) fn mark_stale(&self) -> bool {
        self.0
            .state
            .compare_exchange(VALID, STALE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl<M: ProviderMr> core::fmt::Debug for Region<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("start", &format_args!("{:#x}", self.start()))
            .field("end", &format_args!("{:#x}", self.end()))
            .field("access", &self.access())
            .field("valid", &self.is_valid())
            .field("cacheable", &self.is_cacheable())
            .finish()
    }
}
