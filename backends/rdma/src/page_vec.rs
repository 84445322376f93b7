//! A growable array in its own anonymous mapping, grown with `mremap`:
//! the thin sys layer under the registry's per-slot arrays (hot records,
//! regions, LRU ticks), its hash buckets and the software NIC's key table.
//!
//! Why: on a host where a first touch of a page costs microseconds, how an
//! array grows decides much of what a registration costs.
//! - Rust's system allocator has no aligned `realloc`, so a `Vec` of the
//!   32-byte aligned hot records allocates anew and copies the whole array
//!   at every doubling: an eighth of the faults of a registry growing to
//!   65,536 regions. Here a small array grows by moving page-table entries,
//!   not bytes (or by a copy into a spare mapping whose pages are faulted
//!   in already, see `huge.rs`), and the base is page aligned (every record
//!   keeps its alignment).
//! - From [`huge::HUGE_FROM`] bytes on, the array lives on transparent huge
//!   pages (see `huge.rs`): a fifth of the fresh-memory cost of 4 KiB pages.
//!
//! Indexing is a slice's: no extra load on the hit path, which a segmented
//! array costs (measured: +1.5-3 ns per hit).
//!
//! The mapping is private memory of the owner: nothing else holds a
//! pointer into it, so it may move at every growth.

#![allow(unsafe_code)]

use core::marker::PhantomData;
use core::ptr::NonNull;

use notifier_core::PAGE_SIZE;

use crate::huge;

/// A `Vec`-like array in an anonymous mapping (push only; elements are
/// dropped with the array).
pub(crate) struct PageVec<T> {
    /// Base of the mapping (dangling, suitably aligned, while `bytes == 0`).
    ptr: NonNull<T>,
    len: usize,
    /// Bytes mapped.
    bytes: usize,
    _own: PhantomData<T>,
}

// SAFETY: a PageVec owns its elements as a Vec does; sending it sends them.
unsafe impl<T: Send> Send for PageVec<T> {}
// SAFETY: shared access only hands out `&T` (through `Deref`).
unsafe impl<T: Sync> Sync for PageVec<T> {}

impl<T> PageVec<T> {
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

    /// Make room for `n` more elements with at most one growth.
    fn reserve_exact(&mut self, n: usize) {
        let want = self
            .len
            .checked_add(n)
            .and_then(|l| l.checked_mul(core::mem::size_of::<T>()));
        match want {
            Some(w) if w <= self.bytes => {}
            Some(w) => self.grow_to(w),
            None => std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>()),
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
        match self.bytes.checked_mul(2) {
            Some(b) => self.grow_to(b),
            None => std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>()),
        }
    }

    /// Map at least `want > bytes` bytes, keeping the elements.
    fn grow_to(&mut self, want: usize) {
        let new = huge::round(want.max(PAGE_SIZE as usize));
        let Some(new) = new else {
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>());
        };
        let p = match NonNull::new(self.ptr.as_ptr().cast::<u8>()) {
            Some(old) if self.bytes != 0 => {
                // SAFETY: `ptr`/`bytes` describe the mapping this array
                // made and owns; `ptr` is replaced below before any
                // further access.
                unsafe { huge::grow(old, self.bytes, new) }
            }
            _ => huge::map(new),
        };
        let Some(p) = p else {
            let layout = std::alloc::Layout::from_size_align(new, PAGE_SIZE as usize)
                .unwrap_or_else(|_| std::alloc::Layout::new::<u8>());
            std::alloc::handle_alloc_error(layout);
        };
        self.ptr = p.cast();
        self.bytes = new;
    }
}

impl PageVec<u32> {
    /// An array of `n` zeros: a fresh mapping, which the kernel zeroes as
    /// it is first touched, so nothing is written here.
    pub(crate) fn zeroed(n: usize) -> Self {
        let mut a = Self::new();
        a.reserve_exact(n);
        // `reserve_exact` mapped room for `n` elements in a fresh anonymous
        // mapping (this array had none), whose bytes read as zero, a valid
        // `u32`: the elements are initialised.
        a.len = n;
        a
    }

    /// Make this an array of `n >= len` zeros in the mapping it has (grown
    /// when needed), every element written.
    ///
    /// Reusing the mapping saves the faults of fresh pages for the part it
    /// had. Writing the zeros, instead of relying on the kernel's zero fill,
    /// costs a store per element and saves a fault per page: a page whose
    /// first touch is a read maps the shared zero page, and the write that
    /// follows faults again to replace it (a hash table probes before it
    /// stores).
    pub(crate) fn regrow_zeroed(&mut self, n: usize) {
        debug_assert!(n >= self.len);
        self.reserve_exact(n - self.len);
        // SAFETY: the mapping holds at least `n` elements (just reserved);
        // zero bytes are a valid `u32`, so all `n` are initialised. The
        // bytes past `len` may be left over from a spare (see `huge`).
        unsafe { self.ptr.as_ptr().write_bytes(0, n) };
        self.len = n;
    }
}

impl<T> Default for PageVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> core::ops::Deref for PageVec<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` elements are initialised (written by
        // `push`), inside the mapping, aligned; `ptr` is dangling and
        // aligned when `len == 0`.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> core::ops::DerefMut for PageVec<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for PageVec<T> {
    fn drop(&mut self) {
        if self.bytes != 0 {
            // SAFETY: the first `len` elements are initialised and owned
            // by the array; they are dropped once, here.
            unsafe {
                core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                ))
            };
            // SAFETY: the mapping is this array's own, and no reference
            // into it outlives `&mut self`.
            unsafe { huge::unmap(self.ptr.cast(), self.bytes) };
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
        let n = PAGE_SIZE as usize; // elements: several growths
        for i in 0..n as u64 {
            v.push(Rec([i, !i, i * 3, 7]));
            assert_eq!(v.as_ptr() as usize % 32, 0);
        }
        assert_eq!(v.len(), n);
        assert!(v.mapped_bytes() >= n * 32 && v.mapped_bytes() < 2 * n * 32);
        assert!(!huge::is_huge(v.mapped_bytes()));
        for (i, r) in v.iter().enumerate() {
            let i = i as u64;
            assert_eq!(*r, Rec([i, !i, i * 3, 7]));
        }
        v[5].0[3] = 9;
        assert_eq!(v.get(5).map(|r| r.0[3]), Some(9));
        assert_eq!(v.get(n), None);
        // Past the threshold the array moves to huge pages, contents kept.
        let m = 2 * huge::HUGE_PAGE / 32;
        for i in n as u64..m as u64 {
            v.push(Rec([i, !i, i * 3, 7]));
        }
        assert_eq!(v.mapped_bytes(), 2 * huge::HUGE_PAGE);
        assert_eq!(v.as_ptr() as usize % huge::HUGE_PAGE, 0);
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, r)| i == 5 || *r == Rec([i as u64, !(i as u64), i as u64 * 3, 7])));
        assert_eq!(v[5].0[3], 9);
    }

    #[test]
    fn regrow_zeroed_clears_and_grows_across_the_huge_threshold() {
        let mut v = PageVec::zeroed(16);
        assert!(v.iter().all(|&x| x == 0));
        for n in [16usize, 1024, 4096, huge::HUGE_PAGE / 4] {
            v.regrow_zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.mapped_bytes() >= n * 4);
            assert!(v.iter().all(|&x| x == 0), "not zero at {n}");
            // Dirty every element, so the next regrow must clear them.
            v.fill(u32::MAX);
        }
        assert!(huge::is_huge(v.mapped_bytes()));
        v.regrow_zeroed(huge::HUGE_PAGE / 4 + 1);
        assert!(v.iter().all(|&x| x == 0));
    }
}
