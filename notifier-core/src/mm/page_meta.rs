//! Per-frame metadata: refcount and mapcount of every `pfn_valid` frame
//! (the kernel's `struct page` counters), and the shared memory context
//! (frames, I/O memory, zero page, swap) that address spaces, their forks
//! and files share.
//!
//! Raw PFNs (frames the store does not know: device memory, foreign frames)
//! carry no metadata and are never refcounted (seed 001). The zero page is
//! a valid frame that is never refcounted either: it lives as long as the
//! context.
//!
//! # Locking
//! Metadata lives in 64 shards, each behind its own mutex, taken briefly and
//! innermost: callers may hold the mmap lock and a leaf lock, never another
//! shard. The swap store has its own mutex, also innermost.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::frame::{FrameError, FrameStore, Pfn, FRAME_WORDS};

const SHARDS: usize = 64;

/// A multiplicative hasher for PFN keys.
#[derive(Default)]
pub(crate) struct PfnHasher(u64);

impl Hasher for PfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type PfnMap<V> = HashMap<u64, V, BuildHasherDefault<PfnHasher>>;

/// A snapshot of one frame's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PageInfo {
    /// References: page-table mappings, the page cache, page arrays, special
    /// mapping lists, and transient holders.
    pub refcount: u32,
    /// Present PTEs that map the frame as a normal page.
    pub mapcount: u32,
    /// Anonymous (private to its mappers, swap-backed) rather than page cache.
    pub anon: bool,
}

/// The shared memory context of a family of address spaces.
pub(crate) struct Memory {
    pub(crate) frames: Arc<dyn FrameStore>,
    /// Device memory for raw PFNs (reads and writes of PFNMAP/MIXEDMAP pages
    /// that are not frames of `frames`).
    pub(crate) io: Option<Arc<dyn FrameStore>>,
    pub(crate) zero: Pfn,
    meta: [Mutex<PfnMap<PageInfo>>; SHARDS],
    swap: Mutex<Swap>,
}

#[derive(Default)]
struct Swap {
    next: u64,
    slots: HashMap<u64, (u32, Box<[u64; FRAME_WORDS]>)>,
}

impl Memory {
    pub(crate) fn new(
        frames: Arc<dyn FrameStore>,
        io: Option<Arc<dyn FrameStore>>,
    ) -> Result<Self, FrameError> {
        let zero = frames.alloc()?;
        Ok(Self {
            frames,
            io,
            zero,
            meta: core::array::from_fn(|_| Mutex::new(PfnMap::default())),
            swap: Mutex::new(Swap::default()),
        })
    }

    #[inline]
    fn shard(&self, pfn: Pfn) -> &Mutex<PfnMap<PageInfo>> {
        &self.meta[(pfn.0 as usize) % SHARDS]
    }

    /// Whether `pfn` gets refcounts (valid and not the zero page).
    #[inline]
    pub(crate) fn counted(&self, pfn: Pfn) -> bool {
        pfn != self.zero && self.frames.pfn_valid(pfn)
    }

    /// Allocate a frame with one reference.
    pub(crate) fn alloc_page(&self, anon: bool) -> Result<Pfn, FrameError> {
        let pfn = self.frames.alloc()?;
        self.shard(pfn).lock().insert(
            pfn.0,
            PageInfo {
                refcount: 1,
                mapcount: 0,
                anon,
            },
        );
        Ok(pfn)
    }

    /// Allocate an anonymous frame holding a copy of `src`, with one reference.
    pub(crate) fn alloc_copy(&self, src: Pfn) -> Result<Pfn, FrameError> {
        let pfn = self.frames.alloc_copy(src)?;
        self.shard(pfn).lock().insert(
            pfn.0,
            PageInfo {
                refcount: 1,
                mapcount: 0,
                anon: true,
            },
        );
        Ok(pfn)
    }

    /// Drop a reference (`put_page`); the frame goes back to the store at
    /// zero. The caller guarantees every invalidation that covered a
    /// mapping of this reference has ended.
    #[inline]
    pub(crate) fn put_page(&self, pfn: Pfn) {
        if !self.counted(pfn) {
            return;
        }
        let free = {
            let mut m = self.shard(pfn).lock();
            match m.get_mut(&pfn.0) {
                Some(i) if i.refcount > 1 => {
                    i.refcount -= 1;
                    false
                }
                Some(_) => {
                    m.remove(&pfn.0);
                    true
                }
                None => false,
            }
        };
        if free {
            self.frames.free(pfn);
        }
    }

    /// Drop a reference that no PTE holds (the caller's own); false, and
    /// nothing changes, when the frame is free or every reference it has
    /// belongs to a mapping.
    pub(crate) fn put_unmapped_ref(&self, pfn: Pfn) -> bool {
        let free = {
            let mut m = self.shard(pfn).lock();
            match m.get_mut(&pfn.0) {
                Some(i) if i.refcount <= i.mapcount => return false,
                Some(i) if i.refcount > 1 => {
                    i.refcount -= 1;
                    false
                }
                Some(_) => {
                    m.remove(&pfn.0);
                    true
                }
                None => return false,
            }
        };
        if free {
            self.frames.free(pfn);
        }
        true
    }

    /// A new PTE maps the frame: reference and mapcount
    /// (`get_page` + `page_add_*_rmap`).
    #[inline]
    pub(crate) fn map_page(&self, pfn: Pfn) {
        if self.counted(pfn) {
            let mut m = self.shard(pfn).lock();
            let i = m.entry(pfn.0).or_default();
            i.refcount += 1;
            i.mapcount += 1;
        }
    }

    /// A PTE stops mapping the frame: mapcount only (`page_remove_rmap`);
    /// the reference is dropped with [`Self::put_page`] after the
    /// invalidation ends.
    #[inline]
    pub(crate) fn unmap_page(&self, pfn: Pfn) {
        if self.counted(pfn) {
            if let Some(i) = self.shard(pfn).lock().get_mut(&pfn.0) {
                i.mapcount = i.mapcount.saturating_sub(1);
            }
        }
    }

    /// The counters of a frame, `None` for raw PFNs, the zero page and free
    /// frames.
    pub(crate) fn info(&self, pfn: Pfn) -> Option<PageInfo> {
        if !self.counted(pfn) {
            return None;
        }
        self.shard(pfn).lock().get(&pfn.0).copied()
    }

    /// Frames with metadata (allocated through this context and still held).
    pub(crate) fn tracked(&self) -> usize {
        self.meta.iter().map(|m| m.lock().len()).sum()
    }

    /// The store that holds `pfn`'s bytes: the frame store, else I/O memory.
    #[inline]
    pub(crate) fn store_for(&self, pfn: Pfn) -> Option<&dyn FrameStore> {
        if self.frames.pfn_valid(pfn) {
            Some(&*self.frames)
        } else {
            self.io.as_deref().filter(|io| io.pfn_valid(pfn))
        }
    }

    // ------------------------------------------------------------------
    // Swap.

    /// Save a frame's contents in a new swap slot.
    pub(crate) fn swap_out(&self, pfn: Pfn) -> Result<u64, FrameError> {
        let mut data = Box::new([0u64; FRAME_WORDS]);
        for (w, d) in data.iter_mut().enumerate() {
            *d = self.frames.load(pfn, w * 8)?;
        }
        let mut s = self.swap.lock();
        let slot = s.next;
        s.next += 1;
        s.slots.insert(slot, (1, data));
        Ok(slot)
    }

    /// One more PTE refers to `slot` (fork).
    pub(crate) fn swap_dup(&self, slot: u64) {
        if let Some(e) = self.swap.lock().slots.get_mut(&slot) {
            e.0 += 1;
        }
    }

    /// A PTE stops referring to `slot`.
    pub(crate) fn swap_free(&self, slot: u64) {
        let mut s = self.swap.lock();
        if let Some(e) = s.slots.get_mut(&slot) {
            e.0 -= 1;
            if e.0 == 0 {
                s.slots.remove(&slot);
            }
        }
    }

    /// Copy a slot's contents into `pfn`; false if the slot is gone.
    pub(crate) fn swap_read(&self, slot: u64, pfn: Pfn) -> Result<bool, FrameError> {
        let s = self.swap.lock();
        let Some((_, data)) = s.slots.get(&slot) else {
            return Ok(false);
        };
        for (w, d) in data.iter().enumerate() {
            self.frames.store(pfn, w * 8, *d)?;
        }
        Ok(true)
    }

    /// Swap slots in use.
    pub(crate) fn swap_slots(&self) -> usize {
        self.swap.lock().slots.len()
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.frames.free(self.zero);
    }
}

impl Memory {
    /// A freshly allocated frame (holding one reference) got mapped.
    #[inline]
    pub(crate) fn mapcount_inc(&self, pfn: Pfn) {
        if self.counted(pfn) {
            if let Some(i) = self.shard(pfn).lock().get_mut(&pfn.0) {
                i.mapcount += 1;
            }
        }
    }
}
