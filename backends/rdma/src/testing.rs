//! A minimal primary address space for tests, examples and the parity run:
//! a page table (page to frame) over [`HeapFrames`], with areas made by
//! `mmap` and changes bracketed by the notifiers exactly as the contract
//! demands (invalidate_range_start, change, end, then free frames).
//!
//! It stands in until the project's software primary (`notifier_core::mm`)
//! and the userfaultfd backend plug into the same [`Primary`] trait.
//!
//! # Locking
//! One mutex guards areas and PTEs. It is never held while notifier
//! callbacks run, so a DMA observer may call [`ModelPrimary::lookup_page`]
//! from inside a DMA.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use notifier_core::frame::{FrameStore, HeapFrames, Pfn};
use notifier_core::notifier::{Event, InvalidateRange, NotifierSubscriptions};
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::{PageRange, RangeError, PAGE_SIZE};
use parking_lot::Mutex;

/// An error of the model primary's mapping calls.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Bad range.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// `mmap` over an existing area (no MAP_FIXED here).
    #[error("range overlaps an existing mapping")]
    Overlap,
    /// The notifiers were released or refused.
    #[error("notifier failure")]
    Notifier(
        #[from]
        #[source]
        notifier_core::notifier::NotifierError,
    ),
}

#[derive(Default)]
struct Tables {
    /// Areas: start -> (end, writable).
    areas: BTreeMap<u64, (u64, bool)>,
    ptes: HashMap<u64, Translation>,
}

impl Tables {
    fn area_of(&self, addr: u64) -> Option<(u64, u64, bool)> {
        let (&s, &(e, w)) = self.areas.range(..=addr).next_back()?;
        (addr < e).then_some((s, e, w))
    }
}

/// The model primary.
pub struct ModelPrimary {
    subs: Arc<NotifierSubscriptions>,
    frames: Arc<HeapFrames>,
    tables: Mutex<Tables>,
}

impl core::fmt::Debug for ModelPrimary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let t = self.tables.lock();
        f.debug_struct("ModelPrimary")
            .field("areas", &t.areas.len())
            .field("ptes", &t.ptes.len())
            .finish()
    }
}

impl ModelPrimary {
    /// A primary with a pool of `frames` heap frames.
    pub fn new(frames: usize) -> Arc<Self> {
        Arc::new(Self {
            subs: NotifierSubscriptions::new(),
            frames: Arc::new(HeapFrames::new(0x1000, frames)),
            tables: Mutex::new(Tables::default()),
        })
    }

    /// Create an area (pages fault in on first touch, zeroed).
    ///
    /// # Errors
    /// Bad range, [`ModelError::Overlap`].
    pub fn mmap(&self, start: u64, len: u64, writable: bool) -> Result<(), ModelError> {
        let r = PageRange::new(start, len)?;
        let mut t = self.tables.lock();
        let overlaps = t
            .areas
            .range(..r.end())
            .next_back()
            .is_some_and(|(_, &(e, _))| e > r.start());
        if overlaps {
            return Err(ModelError::Overlap);
        }
        t.areas.insert(r.start(), (r.end(), writable));
        Ok(())
    }

    /// Remove the mappings of a range (splitting areas), bracketed by an
    /// `Unmap` invalidation; frames are freed after the bracket ends.
    ///
    /// # Errors
    /// Bad range, notifier failure.
    pub fn munmap(&self, start: u64, len: u64) -> Result<(), ModelError> {
        self.change(start, len, Event::Unmap, true)
    }

    /// Drop the pages of a range but keep the mapping (`madvise(DONTNEED)`),
    /// bracketed by a `Clear` invalidation.
    ///
    /// # Errors
    /// Bad range, notifier failure.
    pub fn zap(&self, start: u64, len: u64) -> Result<(), ModelError> {
        self.change(start, len, Event::Clear, false)
    }

    fn change(&self, start: u64, len: u64, event: Event, unmap: bool) -> Result<(), ModelError> {
        let r = PageRange::new(start, len)?;
        let inv = self
            .subs
            .invalidate_range_start(&InvalidateRange::new(r, event))?;
        let mut freed: Vec<Pfn> = Vec::new();
        {
            let mut t = self.tables.lock();
            if unmap {
                let hit: Vec<(u64, u64, bool)> = t
                    .areas
                    .range(..r.end())
                    .rev()
                    .take_while(|(_, &(e, _))| e > r.start())
                    .map(|(&s, &(e, w))| (s, e, w))
                    .collect();
                for (s, e, w) in hit {
                    t.areas.remove(&s);
                    if s < r.start() {
                        t.areas.insert(s, (r.start(), w));
                    }
                    if e > r.end() {
                        t.areas.insert(r.end(), (e, w));
                    }
                }
            }
            if (r.pages() as usize) < t.ptes.len() {
                for page in r.iter_pages() {
                    if let Some(pte) = t.ptes.remove(&page) {
                        inv.clear(page);
                        freed.push(pte.pfn);
                    }
                }
            } else {
                let pages: Vec<u64> = t.ptes.keys().copied().filter(|p| r.contains(*p)).collect();
                for page in pages {
                    let pte = t.ptes.remove(&page).expect("just listed");
                    inv.clear(page);
                    freed.push(pte.pfn);
                }
            }
        }
        inv.end();
        for pfn in freed {
            self.frames.free(pfn);
        }
        Ok(())
    }

    /// Present pages.
    pub fn present_pages(&self) -> usize {
        self.tables.lock().ptes.len()
    }

    /// Frames allocated.
    pub fn frames_allocated(&self) -> usize {
        self.frames.allocated()
    }
}

impl Primary for ModelPrimary {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.subs
    }

    fn frames(&self) -> &dyn FrameStore {
        &*self.frames
    }

    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        let page = addr & !(PAGE_SIZE - 1);
        let mut t = self.tables.lock();
        let (_, _, writable) = t.area_of(page).ok_or(PrimaryFault::NoMapping(addr))?;
        if write && !writable {
            return Err(PrimaryFault::Permission(addr));
        }
        if let Some(pte) = t.ptes.get(&page) {
            return Ok(*pte);
        }
        let pfn = self.frames.alloc().map_err(|_| PrimaryFault::OutOfMemory)?;
        let pte = Translation { pfn, writable };
        t.ptes.insert(page, pte);
        Ok(pte)
    }

    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.tables
            .lock()
            .ptes
            .get(&(addr & !(PAGE_SIZE - 1)))
            .copied()
    }
}
