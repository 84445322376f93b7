//! The provider seam: what a NIC (software or real) must do for the registry.
//!
//! The registry owns the policy (caching, merging, limits, invalidation
//! bookkeeping); a provider owns the translations and the keys. The split
//! follows the kernel's ODP layering: the registry is the `ib_umem_odp`
//! owner, the provider the driver that programs the MTT.

use std::sync::Arc;

use notifier_core::notifier::Again;
use notifier_core::PageRange;

use crate::access::{Access, Advice};
use crate::error::{ProviderError, RegError};
use crate::region::Region;

/// A NIC that registers memory regions.
pub trait Provider: Send + Sync + 'static {
    /// The provider's per-region state (keys, translation table or device MR).
    type Mr: ProviderMr;

    /// Short name for diagnostics.
    fn name(&self) -> &'static str;

    /// Whether the provider translates on demand (ODP). When false every
    /// registration is pinned and dies on any invalidation.
    fn on_demand(&self) -> bool;

    /// Create the per-region state for `range` with `access`: allocate keys,
    /// build no translation. `implicit` asks for an implicit ODP region over
    /// the whole address space.
    fn create_mr(
        &self,
        range: PageRange,
        access: Access,
        implicit: bool,
    ) -> Result<Self::Mr, ProviderError>;

    /// Make the region reachable by DMA (publish its keys, or register it
    /// with the device). Called after the region joined its chunk subscription,
    /// so a pinning provider can detect a racing invalidation with
    /// `read_begin`/`read_retry`.
    fn activate_mr(&self, region: &Region<Self::Mr>) -> Result<(), RegError>;

    /// Make the region unreachable and free its keys (deregister it from
    /// the device). Called once, after the region's state became
    /// deregistered, so the registry already rejects its keys.
    fn dereg_mr(&self, region: &Region<Self::Mr>);

    /// Make sure the memory of `range` is followed, so that translations
    /// of it are invalidated when it changes: a provider whose translations
    /// come from a primary that watches real memory asks it to watch the
    /// range ([`Primary::ensure_covered`](notifier_core::primary::Primary::ensure_covered)).
    /// The registry calls it before it caches a region. The default: the
    /// memory is always followed (a device whose ODP the kernel drives).
    ///
    /// # Errors
    /// [`RegError::Fault`] when the memory cannot be followed.
    fn ensure_covered(&self, range: PageRange) -> Result<(), RegError> {
        let _ = range;
        Ok(())
    }

    /// Prefetch translations of `range` (inside the region) according to `advice`.
    fn advise_mr(
        &self,
        region: &Region<Self::Mr>,
        advice: Advice,
        range: PageRange,
    ) -> Result<(), RegError>;
}

/// The provider's state of one region, reached from the notifier callback.
pub trait ProviderMr: Send + Sync + 'static {
    /// The local key (0 before activation).
    fn lkey(&self) -> u32;
    /// The remote key (0 before activation).
    fn rkey(&self) -> u32;
    /// Whether this region translates on demand; a pinned region must be
    /// deregistered by the first invalidation that touches it.
    fn on_demand(&self) -> bool;

    /// The chunk callback's provider half, for one region.
    ///
    /// The region's chunk already recorded the new sequence (`set_seq`).
    /// Take the lock that guards the translations, the subscriber lock of
    /// the fill path's `read_retry` (or `try` it and answer [`Again`] when
    /// `!blockable`), call `mark()` (the registry's bookkeeping; it returns
    /// whether the region died), drop the translations of `[start, end)`,
    /// and when the region died or is pinned make the device stop honouring
    /// its keys (deregister it); unlock. When it returns, no DMA through
    /// this region reaches a frame of the range until it faults again.
    ///
    /// # Locking
    /// Runs from the primary's invalidation with the registry's index lock
    /// held; must not take the provider's key table.
    fn invalidate(
        &self,
        start: u64,
        end: u64,
        blockable: bool,
        mark: &mut dyn FnMut() -> bool,
    ) -> Result<(), Again>;

    /// The pages of `[start, end)` (inside the region) were unmapped while
    /// the rest of the region stays: record them as gone, so that DMA there
    /// fails with a typed error from now on instead of faulting in memory
    /// mapped at those addresses later. Called from the chunk callback
    /// after [`Self::invalidate`] dropped their translations (no fill can
    /// complete in between: the bracket is open). Returns `false` when the
    /// provider cannot, and the registry then kills the whole region. The
    /// default cannot.
    fn forget(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        false
    }

    /// The region died outside a notifier callback (explicit invalidation,
    /// release of the address space): make the device stop honouring its
    /// keys now. A provider that checks the region's state on every access
    /// (the software NIC) has nothing to do.
    fn zap(&self);

    /// The region was destroyed and its allocation is kept for reuse by a
    /// later registration: free what it still holds (translations, device
    /// buffers) so a kept allocation stays small. Called with exclusive
    /// access, after [`Provider::dereg_mr`]. The default keeps everything.
    fn recycle(&mut self) {}
}

impl<T: Provider + ?Sized> Provider for Arc<T> {
    type Mr = T::Mr;
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn ensure_covered(&self, range: PageRange) -> Result<(), RegError> {
        (**self).ensure_covered(range)
    }
    fn on_demand(&self) -> bool {
        (**self).on_demand()
    }
    fn create_mr(
        &self,
        range: PageRange,
        access: Access,
        implicit: bool,
    ) -> Result<Self::Mr, ProviderError> {
        (**self).create_mr(range, access, implicit)
    }
    fn activate_mr(&self, region: &Region<Self::Mr>) -> Result<(), RegError> {
        (**self).activate_mr(region)
    }
    fn dereg_mr(&self, region: &Region<Self::Mr>) {
        (**self).dereg_mr(region)
    }
    fn advise_mr(
        &self,
        region: &Region<Self::Mr>,
        advice: Advice,
        range: PageRange,
    ) -> Result<(), RegError> {
        (**self).advise_mr(region, advice, range)
    }
}
