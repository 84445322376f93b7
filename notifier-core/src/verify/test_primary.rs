//! A small primary address space for tests of secondaries: a page map over
//! a [`FrameStore`], whose changes are bracketed by invalidations and whose
//! frames are freed only after the bracket ends.
//!
//! It is deliberately simple (no VMAs, no COW): the conformance suite and
//! backend tests use it where the full `mm::Mm` would only add noise.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::addr::PageRange;
use crate::frame::{FrameStore, HeapFrames, Pfn};
use crate::notifier::{Event, InvalidateRange, NotifierSubscriptions};
use crate::primary::{Primary, PrimaryFault, Translation};
use crate::PAGE_SIZE;

#[derive(Clone, Copy)]
struct Pte {
    pfn: Pfn,
    writable: bool,
}

/// A page-map primary for tests.
pub struct TestPrimary {
    notifiers: Arc<NotifierSubscriptions>,
    frames: Arc<dyn FrameStore>,
    /// Mapped window: faults outside it fail with `NoMapping`.
    window: PageRange,
    table: Mutex<HashMap<u64, Pte>>,
    /// Frames of pages faulted in read-only stay read-only until a write
    /// fault (a COW-like upgrade with an invalidation).
    read_only_first: bool,
}

impl core::fmt::Debug for TestPrimary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TestPrimary")
            .field("window", &self.window)
            .field("mapped", &self.table.lock().len())
            .finish()
    }
}

impl TestPrimary {
    /// A primary whose `window` faults in zeroed frames from a pool of
    /// `frames` heap frames.
    pub fn new(window: PageRange, frames: usize) -> Arc<Self> {
        Self::with_frames(window, Arc::new(HeapFrames::new(0x1000, frames)))
    }

    /// The same over a given frame store.
    pub fn with_frames(window: PageRange, frames: Arc<dyn FrameStore>) -> Arc<Self> {
        Arc::new(Self {
            notifiers: NotifierSubscriptions::new(),
            frames,
            window,
            table: Mutex::new(HashMap::new()),
            read_only_first: false,
        })
    }

    /// Like [`Self::new`], but read faults map pages read-only and a write
    /// fault upgrades them by moving to a new frame (a COW break).
    pub fn new_cow(window: PageRange, frames: usize) -> Arc<Self> {
        Arc::new(Self {
            notifiers: NotifierSubscriptions::new(),
            frames: Arc::new(HeapFrames::new(0x1000, frames)),
            window,
            table: Mutex::new(HashMap::new()),
            read_only_first: true,
        })
    }

    /// The mapped window.
    pub fn window(&self) -> PageRange {
        self.window
    }

    fn bracket(
        &self,
        start: u64,
        end: u64,
        event: Event,
        f: impl FnOnce(&mut HashMap<u64, Pte>) -> Vec<Pfn>,
    ) {
        let r = InvalidateRange::new(
            PageRange::from_bounds(start, end).expect("page range"),
            event,
        );
        let inv = self
            .notifiers
            .invalidate_range_start(&r)
            .expect("blockable");
        let freed = {
            let mut t = self.table.lock();
            f(&mut t)
        };
        inv.end();
        for p in freed {
            self.frames.free(p);
        }
    }

    /// Unmap `[start, end)`: bracket, clear PTEs, free frames after the end.
    pub fn unmap(&self, start: u64, end: u64) {
        self.bracket(start, end, Event::Unmap, |t| {
            let mut freed = vec![];
            let mut a = start;
            while a < end {
                if let Some(p) = t.remove(&a) {
                    freed.push(p.pfn);
                }
                a += PAGE_SIZE;
            }
            freed
        });
    }

    /// Move the page at `addr` to a new frame with the same contents.
    pub fn migrate(&self, addr: u64) -> Result<(), PrimaryFault> {
        let new = self.frames.alloc().map_err(|_| PrimaryFault::OutOfMemory)?;
        let mut unused = Some(new);
        self.bracket(addr, addr + PAGE_SIZE, Event::Migrate, |t| {
            match t.get_mut(&addr) {
                Some(p) => {
                    let _ = self.frames.copy(p.pfn, new);
                    let old = p.pfn;
                    p.pfn = new;
                    unused = None;
                    vec![old]
                }
                None => vec![],
            }
        });
        if let Some(n) = unused {
            self.frames.free(n);
        }
        Ok(())
    }

    /// Write-protect `[start, end)` (a soft-dirty style downgrade).
    pub fn protect(&self, start: u64, end: u64) {
        self.bracket(start, end, Event::ProtectionPage, |t| {
            let mut a = start;
            while a < end {
                if let Some(p) = t.get_mut(&a) {
                    p.writable = false;
                }
                a += PAGE_SIZE;
            }
            vec![]
        });
    }

    /// Number of mapped pages.
    pub fn mapped(&self) -> usize {
        self.table.lock().len()
    }
}

impl Primary for TestPrimary {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.notifiers
    }

    fn frames(&self) -> &dyn FrameStore {
        &*self.frames
    }

    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        if !self.window.contains(addr) {
            return Err(PrimaryFault::NoMapping(addr));
        }
        {
            let t = self.table.lock();
            if let Some(p) = t.get(&addr) {
                if p.writable || !write {
                    return Ok(Translation {
                        pfn: p.pfn,
                        writable: p.writable,
                    });
                }
            }
        }
        let new = self.frames.alloc().map_err(|_| PrimaryFault::OutOfMemory)?;
        let existing = self.table.lock().get(&addr).copied();
        match existing {
            None => {
                let mut t = self.table.lock();
                match t.get(&addr) {
                    // Lost a race with another fault: use theirs.
                    Some(p) if p.writable || !write => {
                        let p = *p;
                        drop(t);
                        self.frames.free(new);
                        Ok(Translation {
                            pfn: p.pfn,
                            writable: p.writable,
                        })
                    }
                    Some(_) => {
                        drop(t);
                        self.frames.free(new);
                        self.fault_page(addr, write)
                    }
                    None => {
                        let writable = write || !self.read_only_first;
                        t.insert(addr, Pte { pfn: new, writable });
                        Ok(Translation { pfn: new, writable })
                    }
                }
            }
            Some(_) => {
                // Write to a read-only page: break COW into the new frame.
                let mut out = None;
                self.bracket(addr, addr + PAGE_SIZE, Event::Clear, |t| {
                    match t.get_mut(&addr) {
                        Some(p) if !p.writable => {
                            let _ = self.frames.copy(p.pfn, new);
                            let old = p.pfn;
                            *p = Pte {
                                pfn: new,
                                writable: true,
                            };
                            out = Some(Translation {
                                pfn: new,
                                writable: true,
                            });
                            vec![old]
                        }
                        _ => vec![],
                    }
                });
                match out {
                    Some(t) => Ok(t),
                    None => {
                        self.frames.free(new);
                        self.fault_page(addr, write)
                    }
                }
            }
        }
    }

    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.table.lock().get(&addr).map(|p| Translation {
            pfn: p.pfn,
            writable: p.writable,
        })
    }
}
