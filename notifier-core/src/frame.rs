//! Frames that hold real bytes, behind the [`FrameStore`] seam.
//!
//! The primary address space allocates, copies and frees frames through a
//! `FrameStore`. The default [`HeapFrames`] keeps them in process memory; a
//! backend supplies its own (memfd-backed, so KVM and a NIC see the very
//! same memory). Frames are named by a [`Pfn`]; `pfn_valid` tells frames the
//! store manages (they get refcount and mapcount in the primary) from raw
//! PFNs (device memory, foreign frames) that are never refcounted.
//!
//! Contents are accessed in 64-bit words (atomics), so CPU threads and
//! device threads may touch a frame at once without undefined behaviour;
//! byte-granular reads and writes are built on them.

use crate::PAGE_SIZE;
use std::sync::atomic::{AtomicU64, Ordering};

/// A page frame number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Pfn(pub u64);

/// Words in a frame.
pub const FRAME_WORDS: usize = (PAGE_SIZE / 8) as usize;

/// A frame-store error.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No free frame (the kernel's ENOMEM).
    #[error("out of frames")]
    OutOfMemory,
    /// The PFN is not a frame of this store.
    #[error("pfn {0:#x} is not a frame of this store")]
    InvalidPfn(u64),
    /// The frame is not allocated (a second free, or a free of a frame
    /// never handed out).
    #[error("pfn {0:#x} is not allocated")]
    NotAllocated(u64),
    /// Offset plus length goes past the end of the frame.
    #[error("access at offset {offset} of {len} bytes crosses the frame end")]
    OutOfBounds {
        /// Byte offset in the frame.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
}

/// Where a primary's frames live.
///
/// # Contract
/// `alloc` returns a zeroed frame that nobody else holds. `free` is called
/// only when no PTE maps the frame and every invalidation that covered a
/// mapping of it has ended. Word accesses are atomic per word.
pub trait FrameStore: Send + Sync {
    /// Allocate a zeroed frame.
    fn alloc(&self) -> Result<Pfn, FrameError>;
    /// Give a frame back. A store that can tell rejects a frame it does not
    /// have out (see [`FrameStore::try_free`]) and ignores it here.
    fn free(&self, pfn: Pfn);
    /// Give a frame back, reporting a frame that is not allocated.
    ///
    /// # Errors
    /// [`FrameError::NotAllocated`] for a second free (or a frame never
    /// handed out), [`FrameError::InvalidPfn`] for a PFN of another store;
    /// nothing changes then. The default cannot tell and always frees.
    fn try_free(&self, pfn: Pfn) -> Result<(), FrameError> {
        self.free(pfn);
        Ok(())
    }
    /// Whether `pfn` is a frame of this store (the kernel's `pfn_valid`).
    fn pfn_valid(&self, pfn: Pfn) -> bool;
    /// Load the word at byte offset `off` (8-aligned).
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError>;
    /// Store the word at byte offset `off` (8-aligned).
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError>;
    /// Atomically add to the word at `off`, returning the old value.
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError>;
    /// Frames currently allocated.
    fn allocated(&self) -> usize;

    /// Allocate a frame holding a copy of `src` (copy-on-write). The
    /// default allocates a zeroed frame and copies; a store may skip the
    /// zeroing.
    fn alloc_copy(&self, src: Pfn) -> Result<Pfn, FrameError> {
        let dst = self.alloc()?;
        if let Err(e) = self.copy(src, dst) {
            self.free(dst);
            return Err(e);
        }
        Ok(dst)
    }

    /// Copy the whole frame `src` into `dst`.
    fn copy(&self, src: Pfn, dst: Pfn) -> Result<(), FrameError> {
        for w in 0..FRAME_WORDS {
            let v = self.load(src, w * 8)?;
            self.store(dst, w * 8, v)?;
        }
        Ok(())
    }

    /// Zero the frame.
    fn zero(&self, pfn: Pfn) -> Result<(), FrameError> {
        for w in 0..FRAME_WORDS {
            self.store(pfn, w * 8, 0)?;
        }
        Ok(())
    }

    /// Read bytes at `offset`.
    fn read(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) -> Result<(), FrameError> {
        check_bounds(offset, buf.len())?;
        let mut i = 0;
        while i < buf.len() {
            let pos = offset + i;
            let word = pos & !7;
            let within = pos - word;
            let n = (8 - within).min(buf.len() - i);
            let bytes = self.load(pfn, word)?.to_le_bytes();
            buf[i..i + n].copy_from_slice(&bytes[within..within + n]);
            i += n;
        }
        Ok(())
    }

    /// Write bytes at `offset` (partial words are read-modify-written; not
    /// atomic against a concurrent writer of the same word).
    fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        check_bounds(offset, data.len())?;
        let mut i = 0;
        while i < data.len() {
            let pos = offset + i;
            let word = pos & !7;
            let within = pos - word;
            let n = (8 - within).min(data.len() - i);
            let mut bytes = if n == 8 {
                [0; 8]
            } else {
                self.load(pfn, word)?.to_le_bytes()
            };
            bytes[within..within + n].copy_from_slice(&data[i..i + n]);
            self.store(pfn, word, u64::from_le_bytes(bytes))?;
            i += n;
        }
        Ok(())
    }
}

/// Check that `[offset, offset + len)` lies inside one frame.
pub fn check_bounds(offset: usize, len: usize) -> Result<(), FrameError> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_SIZE as usize => Ok(()),
        _ => Err(FrameError::OutOfBounds { offset, len }),
    }
}

impl<T: FrameStore + ?Sized> FrameStore for std::sync::Arc<T> {
    fn alloc(&self) -> Result<Pfn, FrameError> {
        (**self).alloc()
    }
    fn free(&self, pfn: Pfn) {
        (**self).free(pfn)
    }
    fn try_free(&self, pfn: Pfn) -> Result<(), FrameError> {
        (**self).try_free(pfn)
    }
    fn pfn_valid(&self, pfn: Pfn) -> bool {
        (**self).pfn_valid(pfn)
    }
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        (**self).load(pfn, off)
    }
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError> {
        (**self).store(pfn, off, val)
    }
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError> {
        (**self).fetch_add(pfn, off, val)
    }
    fn allocated(&self) -> usize {
        (**self).allocated()
    }
    fn copy(&self, src: Pfn, dst: Pfn) -> Result<(), FrameError> {
        (**self).copy(src, dst)
    }
    fn alloc_copy(&self, src: Pfn) -> Result<Pfn, FrameError> {
        (**self).alloc_copy(src)
    }
    fn zero(&self, pfn: Pfn) -> Result<(), FrameError> {
        (**self).zero(pfn)
    }
}

type Frame = Box<[AtomicU64; FRAME_WORDS]>;

/// Frames in process memory: a fixed pool of `capacity` frames starting at
/// PFN `base`, with a free list. PFNs outside `[base, base + capacity)` are
/// not `pfn_valid` and so can model device memory.
pub struct HeapFrames {
    base: u64,
    frames: Vec<Frame>,
    free: parking_lot::Mutex<FreeList>,
    allocated: std::sync::atomic::AtomicUsize,
}

/// The free frames and which frames are handed out (so a second free is
/// refused instead of handing one frame out twice).
struct FreeList {
    stack: Vec<u64>,
    out: Vec<bool>,
}

impl FreeList {
    fn pop(&mut self, base: u64) -> Option<u64> {
        let pfn = self.stack.pop()?;
        if let Some(o) = self.out.get_mut((pfn - base) as usize) {
            *o = true;
        }
        Some(pfn)
    }
}

impl HeapFrames {
    /// A pool of `capacity` frames, PFNs `base..base + capacity`. Frame
    /// memory is allocated up front.
    pub fn new(base: u64, capacity: usize) -> Self {
        let frames = (0..capacity)
            .map(|_| Box::new(core::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        let stack = (0..capacity as u64).rev().map(|i| base + i).collect();
        Self {
            base,
            frames,
            free: parking_lot::Mutex::new(FreeList {
                stack,
                out: vec![false; capacity],
            }),
            allocated: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    #[inline]
    fn frame(&self, pfn: Pfn) -> Result<&Frame, FrameError> {
        let i = pfn.0.wrapping_sub(self.base);
        self.frames
            .get(i as usize)
            .filter(|_| i < self.frames.len() as u64)
            .ok_or(FrameError::InvalidPfn(pfn.0))
    }

    #[inline]
    fn word(&self, pfn: Pfn, off: usize) -> Result<&AtomicU64, FrameError> {
        let i = pfn.0.wrapping_sub(self.base);
        let frame = self
            .frames
            .get(i as usize)
            .filter(|_| i < self.frames.len() as u64)
            .ok_or(FrameError::InvalidPfn(pfn.0))?;
        if off % 8 != 0 {
            return Err(FrameError::OutOfBounds {
                offset: off,
                len: 8,
            });
        }
        frame.get(off / 8).ok_or(FrameError::OutOfBounds {
            offset: off,
            len: 8,
        })
    }
}

impl core::fmt::Debug for HeapFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeapFrames")
            .field("base", &self.base)
            .field("capacity", &self.frames.len())
            .field("allocated", &self.allocated())
            .finish()
    }
}

impl FrameStore for HeapFrames {
    fn alloc(&self) -> Result<Pfn, FrameError> {
        let pfn = self
            .free
            .lock()
            .pop(self.base)
            .ok_or(FrameError::OutOfMemory)?;
        self.allocated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pfn = Pfn(pfn);
        self.zero(pfn)?;
        Ok(pfn)
    }

    fn free(&self, pfn: Pfn) {
        let _ = self.try_free(pfn);
    }

    fn try_free(&self, pfn: Pfn) -> Result<(), FrameError> {
        if !self.pfn_valid(pfn) {
            return Err(FrameError::InvalidPfn(pfn.0));
        }
        let mut fl = self.free.lock();
        let out = &mut fl.out[(pfn.0 - self.base) as usize];
        if !*out {
            return Err(FrameError::NotAllocated(pfn.0));
        }
        *out = false;
        fl.stack.push(pfn.0);
        drop(fl);
        self.allocated
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn pfn_valid(&self, pfn: Pfn) -> bool {
        pfn.0 >= self.base && pfn.0 - self.base < self.frames.len() as u64
    }

    #[inline]
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        Ok(self.word(pfn, off)?.load(Ordering::Relaxed))
    }

    #[inline]
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError> {
        self.word(pfn, off)?.store(val, Ordering::Relaxed);
        Ok(())
    }

    #[inline]
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError> {
        Ok(self.word(pfn, off)?.fetch_add(val, Ordering::Relaxed))
    }

    fn allocated(&self) -> usize {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Pop a frame and fill it from `src` directly (no zeroing first).
    fn alloc_copy(&self, src: Pfn) -> Result<Pfn, FrameError> {
        let s = self.frame(src)?;
        let pfn = self
            .free
            .lock()
            .pop(self.base)
            .ok_or(FrameError::OutOfMemory)?;
        self.allocated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = self.frame(Pfn(pfn))?;
        for (a, b) in s.iter().zip(d.iter()) {
            b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(Pfn(pfn))
    }

    /// Whole-frame copy without per-word dispatch and bounds checks.
    fn copy(&self, src: Pfn, dst: Pfn) -> Result<(), FrameError> {
        let (s, d) = (self.frame(src)?, self.frame(dst)?);
        for (a, b) in s.iter().zip(d.iter()) {
            b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whole-frame zeroing without per-word dispatch and bounds checks.
    fn zero(&self, pfn: Pfn) -> Result<(), FrameError> {
        for w in self.frame(pfn)?.iter() {
            w.store(0, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_across_words() {
        let f = HeapFrames::new(100, 2);
        let p = f.alloc().unwrap();
        f.write(p, 5, b"hello, frames").unwrap();
        let mut b = [0u8; 13];
        f.read(p, 5, &mut b).unwrap();
        assert_eq!(&b, b"hello, frames");
        assert_eq!(
            f.write(p, 4090, b"too long"),
            Err(FrameError::OutOfBounds {
                offset: 4090,
                len: 8
            })
        );
        assert_eq!(f.load(Pfn(7), 0), Err(FrameError::InvalidPfn(7)));
        assert!(!f.pfn_valid(Pfn(102)));
    }

    #[test]
    fn alloc_zeroes_and_exhausts() {
        let f = HeapFrames::new(0, 1);
        let p = f.alloc().unwrap();
        f.store(p, 8, 42).unwrap();
        assert_eq!(f.alloc(), Err(FrameError::OutOfMemory));
        f.free(p);
        let q = f.alloc().unwrap();
        assert_eq!(f.load(q, 8).unwrap(), 0);
        assert_eq!(f.allocated(), 1);
    }
}
