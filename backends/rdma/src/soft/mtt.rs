//! The software NIC's memory translation table (MTT) of one region and its
//! fill path: NIC page faults through the interval notifier's
//! sequence-retry protocol.
//!
//! # Locking
//!
//! `mtt` (a reader-writer lock) is the subscriber lock of the protocol:
//!
//! ```text
//!   DMA (reader)                 NIC fault (writer)             chunk callback
//!   ------------                 ------------------             --------------
//!   mtt.read()                   seq = read_begin()  (chunk)    chunk.set_seq(cur_seq)
//!   state VALID? entry?          t = primary.fault_page()       mtt.write()
//!   touch the frame              mtt.write()                    mark state
//!   unlock                       read_retry(seq)? -> again      remove entries
//!                                state VALID? insert t          unlock
//!                                unlock
//! ```
//!
//! A DMA touches a frame only while holding the read lock with the entry
//! present, and the callback removes entries under the write lock before
//! the primary's invalidation returns, so no DMA reaches a frame after the
//! primary may free it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use notifier_core::notifier::Again;
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::PAGE_SIZE;
use parking_lot::RwLock;

use crate::provider::ProviderMr;
use crate::region::Region;

/// The translations of one region: page address to frame. Allocated on
/// the first fault, so an untouched region costs one pointer (8 bytes
/// instead of an empty map's 24: the box is deliberate).
#[derive(Debug, Default)]
pub(crate) struct Mtt {
    #[allow(clippy::box_collection)]
    pages: Option<Box<BTreeMap<u64, Translation>>>,
}

/// Most pages a region records as gone (`SoftMr::forget`); a larger
/// partial unmap kills the region instead.
const MAX_GONE_PAGES: u64 = 4096;

/// The entry of a page that is gone for good for its region (unmapped
/// under an on-demand registration): DMA there fails, even once new
/// memory appears at that address.
const GONE: Translation = Translation {
    pfn: notifier_core::frame::Pfn(u64::MAX),
    writable: false,
};

/// What the MTT says of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// No translation: fault it in.
    Miss,
    /// A translation.
    Hit(Translation),
    /// Unmapped under the region: a typed error, never a fault.
    Gone,
}

impl Mtt {
    #[inline]
    pub(crate) fn entry(&self, page: u64) -> Entry {
        match self.pages.as_ref().and_then(|p| p.get(&page)) {
            None => Entry::Miss,
            Some(t) if *t == GONE => Entry::Gone,
            Some(t) => Entry::Hit(*t),
        }
    }

    #[inline]
    pub(crate) fn get(&self, page: u64) -> Option<&Translation> {
        self.pages.as_ref()?.get(&page).filter(|t| **t != GONE)
    }

    pub(crate) fn insert(&mut self, page: u64, t: Translation) {
        self.pages.get_or_insert_with(Box::default).insert(page, t);
    }

    /// Translations (pages recorded as gone not counted).
    pub(crate) fn len(&self) -> usize {
        self.pages
            .as_ref()
            .map_or(0, |p| p.values().filter(|t| **t != GONE).count())
    }

    fn remove_range(&mut self, start: u64, end: u64) {
        let Some(pages) = &mut self.pages else { return };
        let keys: Vec<u64> = pages.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            pages.remove(&k);
        }
        if pages.is_empty() {
            self.pages = None;
        }
    }
}

/// The software NIC's state of one region.
#[derive(Debug, Default)]
pub struct SoftMr {
    pub(crate) lkey: AtomicU32,
    pub(crate) rkey: AtomicU32,
    pub(crate) mtt: RwLock<Mtt>,
}

impl SoftMr {
    /// Translations currently in the MTT.
    pub fn mapped_pages(&self) -> usize {
        self.mtt.read().len()
    }

    /// The MTT entry of `page`, if any.
    pub fn translation(&self, page: u64) -> Option<Translation> {
        self.mtt.read().get(page).copied()
    }
}

impl ProviderMr for SoftMr {
    fn lkey(&self) -> u32 {
        self.lkey.load(Ordering::Relaxed)
    }
    fn rkey(&self) -> u32 {
        self.rkey.load(Ordering::Relaxed)
    }
    fn on_demand(&self) -> bool {
        true
    }

    fn invalidate(
        &self,
        start: u64,
        end: u64,
        blockable: bool,
        mark: &mut dyn FnMut() -> bool,
    ) -> Result<(), Again> {
        let mut mtt = if blockable {
            self.mtt.write()
        } else {
            self.mtt.try_write().ok_or(Again)?
        };
        // A dead region's keys are rejected by its state, checked under this
        // lock by every DMA; only the translations of the range must go.
        mark();
        mtt.remove_range(start, end);
        Ok(())
    }

    /// Record the pages of `[start, end)` as gone: DMA there fails with
    /// [`PrimaryFault::NoMapping`] from now on, without faulting (so never
    /// reaching memory mapped there later). At most a few thousand pages;
    /// beyond, `false` (the registry kills the region instead).
    fn forget(&self, start: u64, end: u64) -> bool {
        let pages = (end - start) / PAGE_SIZE;
        if pages > MAX_GONE_PAGES {
            return false;
        }
        let mut mtt = self.mtt.write();
        for p in 0..pages {
            mtt.insert(start + p * PAGE_SIZE, GONE);
        }
        true
    }

    /// Nothing to do: every DMA checks the region's state under the MTT
    /// lock, so a dead region's translations are never used again; they
    /// are freed with the region.
    fn zap(&self) {}

    /// Drop the translations (a dead region may still hold some).
    fn recycle(&mut self) {
        *self.mtt.get_mut() = Mtt::default();
    }
}

/// Why a NIC fault did not produce a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultError {
    Primary(PrimaryFault),
    Invalidated,
}

/// How a fault finds the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultMode {
    /// `fault_page(write = false)`.
    Read,
    /// `fault_page(write = true)`.
    Write,
    /// `lookup_page` only; a missing page is not an error (snapshot mode).
    NoFault,
}

/// Fill the MTT entry of `page` (page aligned, inside the region) with the
/// sequence-retry protocol. Returns whether an entry was written (false
/// only in `NoFault` mode for a page the primary does not have).
///
/// # Locking
/// Takes no lock across the primary's fault; takes the region's MTT write
/// lock for the retry check and the write. May sleep in `read_begin`.
pub(crate) fn fault_in(
    primary: &dyn Primary,
    region: &Region<SoftMr>,
    page: u64,
    mode: FaultMode,
) -> Result<bool, FaultError> {
    debug_assert_eq!(page % PAGE_SIZE, 0);
    let sub = region.notifier();
    // A page gone for this region is never faulted (that could reach, or
    // allocate, memory mapped there since).
    if region.mr().mtt.read().entry(page) == Entry::Gone {
        return Err(FaultError::Primary(PrimaryFault::NoMapping(page)));
    }
    loop {
        let seq = sub.read_begin();
        let t = match mode {
            FaultMode::Read => primary
                .fault_page(page, false)
                .map_err(FaultError::Primary)?,
            FaultMode::Write => {
                let t = primary
                    .fault_page(page, true)
                    .map_err(FaultError::Primary)?;
                if !t.writable {
                    return Err(FaultError::Primary(PrimaryFault::Permission(page)));
                }
                t
            }
            FaultMode::NoFault => match primary.lookup_page(page) {
                Some(t) => t,
                None => return Ok(false),
            },
        };
        let mut mtt = region.mr().mtt.write();
        if sub.read_retry(seq) {
            continue;
        }
        if !region.is_valid() {
            return Err(FaultError::Invalidated);
        }
        if mtt.entry(page) == Entry::Gone {
            return Err(FaultError::Primary(PrimaryFault::NoMapping(page)));
        }
        mtt.insert(page, t);
        return Ok(true);
    }
}
