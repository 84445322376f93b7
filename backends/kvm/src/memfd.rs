//! [`MemfdFrames`]: a [`FrameStore`] whose frames are the pages of one
//! memfd, so the primary, KVM (through the host view), device emulation and
//! a NIC all see the very same memory.
//!
//! Frame `pfn` is the memfd page at byte offset `(pfn - base) * PAGE_SIZE`.
//! The memfd is mapped once, shared and read-write, for the word accesses
//! of the `FrameStore` contract; host views map single pages of it again.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use notifier_core::frame::{check_bounds, FrameError, FrameStore, Pfn, FRAME_WORDS};
use notifier_core::PAGE_SIZE;
use parking_lot::Mutex;

use crate::sys::SharedMap;
use crate::KvmError;

/// Frames in one memfd: PFNs `base..base + capacity`, a free list, and a
/// shared mapping of the whole file for word access.
///
/// # Locking
/// The free list has its own mutex, held only to push or pop. Frame
/// contents are accessed without locks, word-atomically.
pub struct MemfdFrames {
    fd: OwnedFd,
    map: SharedMap,
    base: u64,
    capacity: usize,
    free: Mutex<Vec<u64>>,
    allocated: AtomicUsize,
}

impl core::fmt::Debug for MemfdFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemfdFrames")
            .field("base", &self.base)
            .field("capacity", &self.capacity)
            .field("allocated", &self.allocated())
            .finish()
    }
}

impl MemfdFrames {
    /// A memfd of `capacity` pages whose frames are PFNs
    /// `base..base + capacity`.
    ///
    /// # Errors
    /// [`KvmError::Os`] when memfd_create, ftruncate or mmap fail (and
    /// [`KvmError::Os`] with EINVAL for a capacity of 0 or one that overflows).
    pub fn new(base: u64, capacity: usize) -> Result<Self, KvmError> {
        let len = (capacity as u64)
            .checked_mul(PAGE_SIZE)
            .filter(|&l| l > 0 && base.checked_add(capacity as u64).is_some())
            .ok_or_else(|| {
                KvmError::os(
                    "memfd frames",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                )
            })?;
        let fd = crate::sys::memfd_create("notifier-frames", len)
            .map_err(|e| KvmError::os("memfd_create", e))?;
        let map = SharedMap::new(&fd, len as usize).map_err(|e| KvmError::os("mmap memfd", e))?;
        let free = (0..capacity as u64).rev().map(|i| base + i).collect();
        Ok(Self {
            fd,
            map,
            base,
            capacity,
            free: Mutex::new(free),
            allocated: AtomicUsize::new(0),
        })
    }

    /// The memfd (for mapping frames into host views).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Number of frames.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Byte offset of frame `pfn` in the memfd, or `None` for a PFN that is
    /// not a frame of this store.
    #[inline]
    pub fn file_offset(&self, pfn: Pfn) -> Option<u64> {
        self.index(pfn).map(|i| i as u64 * PAGE_SIZE)
    }

    /// Host address of frame `pfn` in this store's own mapping.
    pub fn host_addr(&self, pfn: Pfn) -> Option<u64> {
        self.index(pfn)
            .map(|i| self.map.addr(i * PAGE_SIZE as usize))
    }

    /// A volatile slice of `len` bytes at `offset` in frame `pfn`.
    ///
    /// # Errors
    /// [`FrameError::InvalidPfn`], [`FrameError::OutOfBounds`].
    pub fn slice(
        &self,
        pfn: Pfn,
        offset: usize,
        len: usize,
    ) -> Result<vm_memory::VolatileSlice<'_>, FrameError> {
        let i = self.index(pfn).ok_or(FrameError::InvalidPfn(pfn.0))?;
        check_bounds(offset, len)?;
        Ok(self.map.slice(i * PAGE_SIZE as usize + offset, len))
    }

    #[inline]
    fn index(&self, pfn: Pfn) -> Option<usize> {
        let i = pfn.0.wrapping_sub(self.base);
        (i < self.capacity as u64).then_some(i as usize)
    }

    #[inline]
    fn word_off(&self, pfn: Pfn, off: usize) -> Result<usize, FrameError> {
        let i = self.index(pfn).ok_or(FrameError::InvalidPfn(pfn.0))?;
        if off % 8 != 0 || off >= PAGE_SIZE as usize {
            return Err(FrameError::OutOfBounds {
                offset: off,
                len: 8,
            });
        }
        Ok(i * PAGE_SIZE as usize + off)
    }
}

impl FrameStore for MemfdFrames {
    fn alloc(&self) -> Result<Pfn, FrameError> {
        let pfn = Pfn(self.free.lock().pop().ok_or(FrameError::OutOfMemory)?);
        self.allocated.fetch_add(1, Ordering::Relaxed);
        self.zero(pfn)?;
        Ok(pfn)
    }

    fn free(&self, pfn: Pfn) {
        if self.pfn_valid(pfn) {
            self.allocated.fetch_sub(1, Ordering::Relaxed);
            self.free.lock().push(pfn.0);
        }
    }

    #[inline]
    fn pfn_valid(&self, pfn: Pfn) -> bool {
        self.index(pfn).is_some()
    }

    #[inline]
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        // Relaxed, as HeapFrames: frame words carry data, not
        // synchronisation; the primary's locks order the mappings.
        Ok(self
            .map
            .word(self.word_off(pfn, off)?)
            .load(Ordering::Relaxed))
    }

    #[inline]
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError> {
        self.map
            .word(self.word_off(pfn, off)?)
            .store(val, Ordering::Relaxed);
        Ok(())
    }

    #[inline]
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError> {
        Ok(self
            .map
            .word(self.word_off(pfn, off)?)
            .fetch_add(val, Ordering::Relaxed))
    }

    fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    fn copy(&self, src: Pfn, dst: Pfn) -> Result<(), FrameError> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.read(src, 0, &mut buf)?;
        FrameStore::write(self, dst, 0, &buf)
    }

    fn zero(&self, pfn: Pfn) -> Result<(), FrameError> {
        for w in 0..FRAME_WORDS {
            self.store(pfn, w * 8, 0)?;
        }
        Ok(())
    }

    fn read(&self, pfn: Pfn, offset: usize, buf: &mut [u8]) -> Result<(), FrameError> {
        let i = self.index(pfn).ok_or(FrameError::InvalidPfn(pfn.0))?;
        check_bounds(offset, buf.len())?;
        self.map.read(i * PAGE_SIZE as usize + offset, buf);
        Ok(())
    }

    fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        let i = self.index(pfn).ok_or(FrameError::InvalidPfn(pfn.0))?;
        check_bounds(offset, data.len())?;
        self.map.write(i * PAGE_SIZE as usize + offset, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_bytes_and_free_list() {
        let f = MemfdFrames::new(0x100, 2).unwrap();
        let p = f.alloc().unwrap();
        f.store(p, 8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(f.fetch_add(p, 8, 1).unwrap(), 0x1122_3344_5566_7788);
        FrameStore::write(&f, p, 5, b"hello, memfd").unwrap();
        let mut b = [0u8; 12];
        FrameStore::read(&f, p, 5, &mut b).unwrap();
        assert_eq!(&b, b"hello, memfd");
        assert_eq!(f.load(Pfn(7), 0), Err(FrameError::InvalidPfn(7)));
        assert_eq!(
            f.load(p, 4),
            Err(FrameError::OutOfBounds { offset: 4, len: 8 })
        );
        assert_eq!(
            FrameStore::write(&f, p, 4090, b"too long"),
            Err(FrameError::OutOfBounds {
                offset: 4090,
                len: 8
            })
        );
        let q = f.alloc().unwrap();
        f.copy(p, q).unwrap();
        assert_eq!(f.load(q, 8).unwrap(), f.load(p, 8).unwrap());
        assert_eq!(f.alloc(), Err(FrameError::OutOfMemory));
        f.free(p);
        let r = f.alloc().unwrap();
        assert_eq!(r, p);
        assert_eq!(f.load(r, 8).unwrap(), 0, "alloc zeroes");
        assert_eq!(f.file_offset(Pfn(0x101)), Some(PAGE_SIZE));
        assert_eq!(f.allocated(), 2);
    }

    #[test]
    fn zero_capacity_is_an_error() {
        assert!(MemfdFrames::new(0, 0).is_err());
        assert!(MemfdFrames::new(u64::MAX, 2).is_err());
    }
}
