//! The seam between a primary address space and the secondaries that
//! follow it.
//!
//! A secondary MMU needs three things from its primary: the notifier set
//! to subscribe to, a way to fault a page in (or look one up without
//! faulting, for snapshot mode), and the frames to touch. The software
//! primary (`mm::Mm`) implements [`Primary`]; so can a backend over real
//! memory.

use std::sync::Arc;

use crate::frame::{FrameStore, Pfn};
use crate::notifier::NotifierSubscriptions;

/// What a secondary may cache for one page: the frame and whether writes
/// are allowed through this translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The frame (or raw PFN for PFNMAP/MIXEDMAP device memory).
    pub pfn: Pfn,
    /// Whether the primary's PTE allows writes.
    pub writable: bool,
}

/// Why a primary could not provide a translation.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrimaryFault {
    /// No mapping at that address (SIGSEGV, EFAULT).
    #[error("no mapping at {0:#x}")]
    NoMapping(u64),
    /// The mapping does not allow the access (SIGSEGV on a permission fault).
    #[error("access not permitted at {0:#x}")]
    Permission(u64),
    /// The fault handler failed (SIGBUS, e.g. a special mapping's callback).
    #[error("fault handler failed at {0:#x}")]
    Bus(u64),
    /// Out of memory.
    #[error("out of memory")]
    OutOfMemory,
    /// The range cannot be watched: its changes would not be announced
    /// (memory of a kind the primary cannot follow, or the primary's
    /// monitor is gone).
    #[error("changes at {0:#x} cannot be followed")]
    Unwatchable(u64),
    /// Snapshot mode: the page is not present and faulting was not allowed.
    #[error("page {0:#x} not present")]
    NotPresent(u64),
}

/// A primary address space as secondaries see it.
pub trait Primary: Send + Sync {
    /// The notifier set of this address space.
    fn notifiers(&self) -> &Arc<NotifierSubscriptions>;

    /// The frames behind this address space.
    fn frames(&self) -> &dyn FrameStore;

    /// Fault the page at `addr` (page aligned) in for a read, or for a write
    /// when `write` (breaking COW as needed), and return its translation
    /// (`handle_mm_fault` followed by a page-table walk, as `hmm_range_fault`
    /// does).
    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault>;

    /// The current translation of `addr` without faulting, or `None` when no
    /// present PTE maps it (`PREFETCH_NO_FAULT`).
    fn lookup_page(&self, addr: u64) -> Option<Translation>;

    /// Make sure every change to `[start, start + len)` (any alignment;
    /// page rounding is the primary's) will be announced to
    /// [`Self::notifiers`]: a primary over real memory starts watching the
    /// range, uniting it with what it already watches. A secondary calls it
    /// before it first trusts a translation of the range (a registration
    /// cache on a miss), so it never caches what nobody follows.
    ///
    /// The default covers everything: a model primary announces every
    /// change of its whole address space.
    fn ensure_covered(&self, start: u64, len: u64) -> Result<(), PrimaryFault> {
        let _ = (start, len);
        Ok(())
    }
}
