//! One registered region: its interval subscription to the primary and the
//! state the notifier callback, the provider and the registry share.
//!
//! # States
//!
//! | `state`        | meaning | who sets it |
//! |----------------|---------|-------------|
//! | `VALID`        | cached or registered, keys usable | creation |
//! | `INVALIDATED`  | the primary changed (unmap) or the user invalidated it: keys rejected, translations gone, never served again | notifier callback / `Registry::invalidate` |
//! | `DEREGISTERED` | the registry destroyed it (last put, eviction, deregister) | registry owner |
//!
//! Transitions only go down the table. An invalidated region stays
//! allocated (its handle still accepts `put`) until its last reference is
//! put; its keys are never reissued while it exists.

use std::sync::Arc;

use notifier_core::notifier::{
    Again, Event, IntervalNotifier, IntervalNotifierOps, IntervalSubscription, InvalidateRange,
};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use crate::access::Access;
use crate::provider::ProviderMr;

pub(crate) const VALID: u8 = 0;
pub(crate) const INVALIDATED: u8 = 1;
pub(crate) const DEREGISTERED: u8 = 2;

/// What the notifier callbacks of one registry share with its owner: the
/// queue of regions they invalidated (deferred deregistration) and counters.
///
/// # Pairing
/// The callback pushes `(slot, gen)` and then sets `pending` (Release); the
/// owner loads `pending` (Acquire) at the head of every `get` and drains.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) pending: AtomicBool,
    pub(crate) queue: Mutex<Vec<(u32, u32)>>,
    pub(crate) invalidations: AtomicU64,
}

impl Shared {
    fn invalidated(&self, slot: u32, gen: u32) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue.lock();
        q.push((slot, gen));
        // Release pairs with the owner's Acquire load in `Registry::drain_pending`.
        self.pending.store(true, Ordering::Release);
    }

    /// Take the queued invalidations.
    pub(crate) fn take(&self) -> Vec<(u32, u32)> {
        let mut q = self.queue.lock();
        self.pending.store(false, Ordering::Relaxed);
        core::mem::take(&mut *q)
    }
}

/// The callbacks object of a region's interval subscription.
pub struct RegionCore<M> {
    pub(crate) state: AtomicU8,
    pub(crate) access: Access,
    pub(crate) implicit: bool,
    pub(crate) slot: u32,
    pub(crate) gen: u32,
    pub(crate) shared: Arc<Shared>,
    pub(crate) mr: M,
}

impl<M: ProviderMr> IntervalNotifierOps for RegionCore<M> {
    /// Drop the translations of the range under the provider's lock; an
    /// unmap (or any event for a pinned region) also kills the region: its
    /// keys are rejected from now on and the owner will deregister it.
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let kill = !self.implicit
            && (matches!(range.event, Event::Unmap | Event::Release) || !self.mr.on_demand());
        let mut killed = false;
        let mut mark = || {
            if kill {
                killed = self
                    .state
                    .compare_exchange(VALID, INVALIDATED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            }
            kill
        };
        self.mr.invalidate(
            sub,
            range.start,
            range.end,
            cur_seq,
            range.blockable,
            &mut mark,
        )?;
        if killed {
            self.shared.invalidated(self.slot, self.gen);
        }
        Ok(())
    }

    fn release(&self, _sub: &IntervalNotifier) {
        if self
            .state
            .compare_exchange(VALID, INVALIDATED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.mr.zap();
            self.shared.invalidated(self.slot, self.gen);
        }
    }
}

/// A registered region as providers see it: the interval subscription and
/// its callbacks object. Cloning shares it (the registry and the NIC's key
/// table each hold one).
pub struct Region<M: ProviderMr>(pub(crate) Arc<IntervalSubscription<RegionCore<M>>>);

impl<M: ProviderMr> Clone for Region<M> {
    fn clone(&self) -> Self {
        Region(self.0.clone())
    }
}

impl<M: ProviderMr> Region<M> {
    /// First byte.
    #[inline]
    pub fn start(&self) -> u64 {
        self.0.start()
    }
    /// One past the last byte.
    #[inline]
    pub fn end(&self) -> u64 {
        self.0.end()
    }
    /// The region's rights.
    #[inline]
    pub fn access(&self) -> Access {
        self.0.ops().access
    }
    /// Whether this is an implicit ODP region (whole address space).
    #[inline]
    pub fn is_implicit(&self) -> bool {
        self.0.ops().implicit
    }
    /// Whether keys of this region are usable (not invalidated, not deregistered).
    ///
    /// Acquire pairs with the AcqRel transitions in the callback and the registry.
    #[inline]
    pub fn is_valid(&self) -> bool {
        self.0.ops().state.load(Ordering::Acquire) == VALID
    }
    /// The provider's state.
    #[inline]
    pub fn mr(&self) -> &M {
        &self.0.ops().mr
    }
    /// The interval notifier, for the fault path's `read_begin`/`read_retry`.
    #[inline]
    pub fn notifier(&self) -> &IntervalNotifier {
        &self.0
    }
    /// Whether `[addr, addr + len)` lies inside the region.
    #[inline]
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        addr >= self.start() && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }
    pub(crate) fn core(&self) -> &RegionCore<M> {
        self.0.ops()
    }
}

impl<M: ProviderMr> core::fmt::Debug for Region<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("start", &format_args!("{:#x}", self.start()))
            .field("end", &format_args!("{:#x}", self.end()))
            .field("access", &self.access())
            .field("valid", &self.is_valid())
            .finish()
    }
}
