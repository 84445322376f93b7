//! A frame store wrapper that counts each frame's lifetimes, for the
//! oracle's liveness mode: a translation taken in generation `g` of a frame
//! is stale once the frame was freed (generation `g + 1`), whether or not
//! the frame was reused since.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::{FrameError, FrameStore, Pfn};

/// A [`FrameStore`] that tracks frame generations.
pub struct TrackedFrames<F: FrameStore> {
    inner: F,
    base: u64,
    gens: Box<[AtomicU64]>,
}

impl<F: FrameStore> core::fmt::Debug for TrackedFrames<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TrackedFrames")
            .field("base", &self.base)
            .field("frames", &self.gens.len())
            .finish()
    }
}

impl<F: FrameStore> TrackedFrames<F> {
    /// Track the frames `base..base + count` of `inner`.
    pub fn new(inner: F, base: u64, count: usize) -> Self {
        Self {
            inner,
            base,
            gens: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The current generation of `pfn` (0 for untracked PFNs).
    #[inline]
    pub fn generation(&self, pfn: Pfn) -> u64 {
        pfn.0
            .checked_sub(self.base)
            .and_then(|i| self.gens.get(i as usize))
            .map_or(0, |g| g.load(Ordering::Acquire))
    }
}

impl<F: FrameStore> FrameStore for TrackedFrames<F> {
    fn alloc(&self) -> Result<Pfn, FrameError> {
        self.inner.alloc()
    }
    fn free(&self, pfn: Pfn) {
        let _ = self.try_free(pfn);
    }
    fn try_free(&self, pfn: Pfn) -> Result<(), FrameError> {
        if let Some(g) = pfn
            .0
            .checked_sub(self.base)
            .and_then(|i| self.gens.get(i as usize))
        {
            // Release: a checker that sees the new generation sees the free.
            // Bumped before the free so no reuse runs under the old
            // generation (a refused double free bumps it too: conservative).
            g.fetch_add(1, Ordering::Release);
        }
        self.inner.try_free(pfn)
    }
    fn pfn_valid(&self, pfn: Pfn) -> bool {
        self.inner.pfn_valid(pfn)
    }
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        self.inner.load(pfn, off)
    }
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError> {
        self.inner.store(pfn, off, val)
    }
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError> {
        self.inner.fetch_add(pfn, off, val)
    }
    fn allocated(&self) -> usize {
        self.inner.allocated()
    }
    fn copy(&self, src: Pfn, dst: Pfn) -> Result<(), FrameError> {
        self.inner.copy(src, dst)
    }
    fn zero(&self, pfn: Pfn) -> Result<(), FrameError> {
        self.inner.zero(pfn)
    }
}
