//! A growable array of plain records in its own anonymous mapping, grown
//! with `mremap`: the thin sys layer under the registry's hot records.
//!
//! Why: the hot records are aligned to 32 bytes so that no hit straddles
//! two cache lines, and Rust's system allocator has no aligned `realloc`,
//! so a `Vec` of them allocates anew and copies the whole array at every
//! doubling (a `Vec` of 16-byte aligned elements is grown by glibc's
//! `realloc`, which moves a large block with `mremap`). On a host where a
//! first touch of a page costs microseconds those copies were an eighth of
//! the faults of a registry growing to 65,536 regions. Here a growth moves
//! page-table entries, not bytes, the base is page aligned (so every record
//! keeps its alignment), and indexing is a slice's: no extra load on the
//! hit path, which a segmented array costs (measured: +1.5-3 ns per hit).
//!
//! The mapping is private memory of the owner: nothing else holds a
//! pointer into it, so it may move at every growth.

#![allow(unsafe_code)]

use core::marker::PhantomData;
use core::ptr::NonNull;

use notifier_core::PAGE_SIZE;

/// A `Vec`-like array of `T: Copy` in an anonymous mapping.
pub(crate) struct PageVec<T: Copy> {
    /// Base of the mapping (dangling, suitably aligned, while `bytes == 0`).
    ptr: NonNull<T>,
    len: usize,
    /// Bytes mapped.
    bytes: usize,
    _own: PhantomData<T>,
}

// SAFETY: a PageVec owns its elements as a Vec does; sending it sends them.
unsafe impl<T: Copy + Send> Send for PageVec<T> {}
// SAFETY: shared access only hands out `&T` (through `Deref`).
unsafe impl<T: Copy + Sync> Sync for PageVec<T> {}

impl<T: Copy> PageVec<T> {
    const OK: () = assert!(
        core::mem::size_of::<T>() != 0 && PAGE_SIZE as usize % core::mem::align_of::<T>() == 0
    );

    pub(crate) const fn new() -> Self {
        let () = Self::OK;
        Self {
            ptr: NonNull::dangling(),
            len: 0,
            bytes: 0,
            _own: PhantomData,
        }
    }

    /// Bytes mapped (what the array costs, touched or not).
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.bytes
    }

    fn capacity(&self) -> usize {
        self.bytes / core::mem::size_of::<T>()
    }

    /// Append `v`.
    ///
    /// # Panics
    /// Through [`std::alloc::handle_alloc_error`] when the kernel refuses
    /// the memory, as a `Vec` does.
    #[inline]
    pub(crate) fn push(&mut self, v: T) {
        if self.len == self.capacity() {
            self.grow();
        }
        // SAFETY: `len < capacity`, so the slot lies inside the mapping,
        // which is readable, writable and aligned for `T` (page aligned
        // base, `size_of::<T>()` a multiple of its alignment).
        unsafe { self.ptr.as_ptr().add(self.len).write(v) };
        self.len += 1;
    }

    #[cold]
    fn grow(&mut self) {
        let Some(new) = self.bytes.checked_mul(2) else {
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>());
        };
        let new = new.max(PAGE_SIZE as usize);
        let layout = || {
            std::alloc::Layout::from_size_align(new, PAGE_SIZE as usize)
                .unwrap_or_else(|_| std::alloc::Layout::new::<u8>())
        };
        let p = if self.bytes == 0 {
            // SAFETY: a fresh private anonymous mapping; no existing memory
            // is affected.
            unsafe {
                libc::mmap(
                    core::ptr::null_mut(),
                    new,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        } else {
            // SAFETY: `ptr`/`bytes` describe the mapping this array made
            // and owns; MREMAP_MAYMOVE moves its pages (contents kept), and
            // `ptr` is replaced below before any further access.
            unsafe {
                libc::mremap(
                    self.ptr.as_ptr().cast(),
                    self.bytes,
                    new,
                    libc::MREMAP_MAYMOVE,
                )
            }
        };
        if p == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout());
        }
        // A mapping at address 0 (only possible with vm.mmap_min_addr = 0)
        // cannot be held; after an mremap the old one is gone already, so
        // there is no consistent state left to unwind into.
        let Some(ptr) = NonNull::new(p.cast()) else {
            std::process::abort();
        };
        self.ptr = ptr;
        self.bytes = new;
    }
}

impl<T: Copy> core::ops::Deref for PageVec<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` elements are initialised (written by
        // `push`), inside the mapping, aligned; `ptr` is dangling and
        // aligned when `len == 0`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> core::ops::DerefMut for PageVec<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for PageVec<T> {
    fn drop(&mut self) {
        if self.bytes != 0 {
            // SAFETY: the mapping is this array's own, and no reference
            // into it outlives `&mut self`. `T: Copy` needs no drop.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    #[repr(C, align(32))]
    struct Rec([u64; 4]);

    #[test]
    fn grows_in_place_keeping_contents_and_alignment() {
        let mut v = PageVec::new();
        assert!(v.is_empty());
        assert_eq!(v.mapped_bytes(), 0);
        let n = 3 * PAGE_SIZE as usize; // elements: several growths
        for i in 0..n as u64 {
            v.push(Rec([i, !i, i * 3, 7]));
            assert_eq!(v.as_ptr() as usize % 32, 0);
        }
        assert_eq!(v.len(), n);
        assert!(v.mapped_bytes() >= n * 32 && v.mapped_bytes() < 2 * n * 32);
        for (i, r) in v.iter().enumerate() {
            let i = i as u64;
            assert_eq!(*r, Rec([i, !i, i * 3, 7]));
        }
        v[5].0[3] = 9;
        assert_eq!(v.get(5).map(|r| r.0[3]), Some(9));
        assert_eq!(v.get(n), None);
    }
}
