//! Reference-counted records in a per-owner slab: the thin unsafe layer
//! under the registry's region records (the kernel's `kmem_cache` plus a
//! `kref`, in one type).
//!
//! Why: a region used to be an `Arc` from the system allocator. On a miss
//! that allocation was a sixth of the instructions (glibc `malloc`, about
//! 180 per region in the grow pass) and, at 72 bytes in an 80-byte chunk,
//! half of the fresh memory a registration touched; on a host where a first
//! touch costs microseconds, fresh memory is most of a miss. A [`SlabArc`]
//! is the same shared, counted record in a 64-byte cell carved from a
//! segment: allocation is a pointer bump or a free-list pop by the owner,
//! with no lock. The first segment is 64 KiB from the allocator; the next
//! ones are 2 MiB huge pages (`huge.rs`: a fifth of the fresh-memory cost
//! of 4 KiB pages on the measured host), so a registry of more than ~1,000
//! regions holds its records in huge pages. (Tried first: 1 MiB segments
//! aligned to their size, a record finding its segment by masking its
//! address. A registry of 65,536 regions then held a fifth, nearly empty
//! segment, 16 bytes per region of allocated memory; and 64 KiB aligned
//! segments cost glibc's `memalign` slack, ~390 more page faults over
//! 65,536 regions. Now a cell keeps its index in its segment, in the
//! padding after its count.)
//!
//! # Ownership and lifetime
//!
//! A [`Slab`] has one owner (the registry), which alone allocates. A
//! record may be released on any thread (a DMA in flight can hold the last
//! reference): the releasing thread pushes the cell on the slab's shared
//! free stack (lock-free push; the owner takes the whole stack at once
//! with a swap, so a pop never races with another pop and there is no
//! ABA). The segments are freed when the owner is gone *and* the last
//! record is released: the shared part counts the live records plus one
//! for the owner (which adds ahead for the records it is about to allocate,
//! [`CREDIT`] at a time, so an allocation is no atomic operation), and
//! whoever brings that count to zero frees everything.
//! A record finds its slab through its segment: a cell holds its index in
//! its segment, and a segment starts with a header that points to the
//! shared part.

#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ops::Deref;
use core::ptr::{self, NonNull};
use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::huge;

/// Bytes of a segment.
const SEG_BYTES: usize = 64 << 10;
/// Bytes of small segments (from the allocator) a slab takes before it
/// moves on to huge-page segments: one segment, about a thousand records.
const SMALL_SEGMENTS: usize = SEG_BYTES;
/// Records the owner accounts for with one atomic add.
const CREDIT: usize = 256;
/// Bytes at the head of a segment reserved for its header (a cache line,
/// so the first cell keeps any alignment up to 64).
const HEADER_BYTES: usize = 64;

/// One record: its reference count, then its value. A free cell keeps the
/// next free cell's address in its first value bytes.
#[repr(C)]
struct Cell<T> {
    refs: AtomicU32,
    /// Index of the cell in its segment, written once when it is carved.
    index: u32,
    val: UnsafeCell<MaybeUninit<T>>,
}

/// What the records of a slab share with its owner.
struct Shared {
    /// Cells released since the owner last took them (a Treiber stack
    /// linked through the cells; pushed by anyone, taken whole by the owner).
    released: AtomicPtr<u8>,
    /// Live records, plus one while the owner lives, plus the owner's
    /// unused credit.
    live: AtomicUsize,
    /// Segments (base, bytes), freed with the slab.
    segments: Mutex<Vec<(usize, usize)>>,
}

/// The head of every segment.
#[repr(C)]
struct Header {
    shared: *const Shared,
}

fn seg_layout() -> Layout {
    // Cannot fail: a power of two alignment, a size far below isize::MAX.
    Layout::from_size_align(SEG_BYTES, HEADER_BYTES).expect("segment layout")
}

/// The owner's side of a slab of `T` records.
pub(crate) struct Slab<T> {
    shared: NonNull<Shared>,
    /// Free cells owned by the owner alone (a list through the cells).
    free: *mut Cell<T>,
    /// First cell of the newest segment, its next never-used cell, and its end.
    first: *mut Cell<T>,
    bump: *mut Cell<T>,
    end: *mut Cell<T>,
    /// Bytes of all segments so far (which decides the next one's size).
    seg_bytes: usize,
    /// Bytes of the segments mapped directly (not from the allocator).
    mapped: usize,
    /// Units of `Shared::live` the owner added ahead for records it has
    /// not allocated yet (one atomic add per [`CREDIT`] records).
    credit: usize,
    _own: PhantomData<T>,
}

// SAFETY: the owner's raw pointers name cells no other thread uses (free
// or never used); the records it hands out are `SlabArc`s, which are
// `Send`/`Sync` only when `T` is.
unsafe impl<T: Send + Sync> Send for Slab<T> {}
// SAFETY: `&Slab` gives no access to anything (every method takes `&mut`).
unsafe impl<T: Send + Sync> Sync for Slab<T> {}

impl<T> Slab<T> {
    const CHECKED: () = {
        assert!(core::mem::size_of::<T>() >= core::mem::size_of::<usize>());
        assert!(core::mem::align_of::<Cell<T>>() <= HEADER_BYTES);
        assert!(core::mem::size_of::<Cell<T>>() <= SEG_BYTES - HEADER_BYTES);
        assert!(SEG_BYTES < huge::HUGE_PAGE);
        assert!(core::mem::size_of::<Header>() <= HEADER_BYTES);
    };

    /// An empty slab (no segment until the first record).
    pub(crate) fn new() -> Self {
        #[allow(clippy::let_unit_value)]
        let () = Self::CHECKED;
        let shared = Box::new(Shared {
            released: AtomicPtr::new(ptr::null_mut()),
            live: AtomicUsize::new(1),
            segments: Mutex::new(Vec::new()),
        });
        Self {
            shared: NonNull::from(Box::leak(shared)),
            free: ptr::null_mut(),
            first: ptr::null_mut(),
            bump: ptr::null_mut(),
            end: ptr::null_mut(),
            seg_bytes: 0,
            mapped: 0,
            credit: 0,
            _own: PhantomData,
        }
    }

    /// A new record holding `val`, with one reference.
    #[inline]
    pub(crate) fn alloc(&mut self, val: T) -> SlabArc<T> {
        let cell = self.cell();
        // SAFETY: the cell is free and owned by us alone (popped or never
        // used); writing it makes it a live record with one reference.
        unsafe {
            (*cell).refs.store(1, Ordering::Relaxed);
            (*(*cell).val.get()).write(val);
        }
        if self.credit == 0 {
            // SAFETY: the shared part lives while the owner does.
            unsafe { self.shared.as_ref() }
                .live
                .fetch_add(CREDIT, Ordering::Relaxed);
            self.credit = CREDIT;
        }
        self.credit -= 1;
        SlabArc {
            // SAFETY: `cell` is never null (see `Self::cell`).
            ptr: unsafe { NonNull::new_unchecked(cell) },
            _own: PhantomData,
        }
    }

    /// A free cell: the owner's list, else the released stack, else a bump
    /// of the newest segment, else a new segment.
    #[inline]
    fn cell(&mut self) -> *mut Cell<T> {
        if self.free.is_null() {
            // SAFETY: the shared part lives while the owner does.
            let released = &unsafe { self.shared.as_ref() }.released;
            // A plain load first: a growing slab has nothing released, and
            // an atomic swap would wait for every pending store.
            if !released.load(Ordering::Relaxed).is_null() {
                // Acquire pairs with the Release of the pushes: the links
                // are visible.
                self.free = released.swap(ptr::null_mut(), Ordering::Acquire).cast();
            }
        }
        if !self.free.is_null() {
            let cell = self.free;
            // SAFETY: a free cell's first value bytes hold the next link.
            self.free = unsafe { next_of(cell) };
            return cell;
        }
        if self.bump == self.end {
            self.grow();
        }
        let cell = self.bump;
        // SAFETY: `bump < end`, both inside the newest segment; the cell
        // was never used, so nobody else can see its index yet.
        unsafe {
            self.bump = cell.add(1);
            (*cell).index = cell.offset_from(self.first) as u32;
        }
        cell
    }

    /// A new segment: [`SEG_BYTES`] from the allocator while the slab is
    /// small, then whole huge pages (see `huge.rs`): a registry of 65,536
    /// regions has 4 MiB of cells, which on 4 KiB pages was a thousand page
    /// faults.
    #[cold]
    fn grow(&mut self) {
        let (base, bytes) = if self.seg_bytes < SMALL_SEGMENTS {
            let layout = seg_layout();
            // SAFETY: the layout has a nonzero size.
            let base = unsafe { alloc(layout) };
            if base.is_null() {
                handle_alloc_error(layout);
            }
            (base, SEG_BYTES)
        } else {
            match huge::map(huge::HUGE_PAGE) {
                Some(p) => {
                    self.mapped += huge::HUGE_PAGE;
                    (p.as_ptr(), huge::HUGE_PAGE)
                }
                None => handle_alloc_error(seg_layout()),
            }
        };
        // SAFETY: the header fits at the head of the fresh segment.
        unsafe {
            base.cast::<Header>().write(Header {
                shared: self.shared.as_ptr(),
            })
        };
        // SAFETY: the shared part lives while the owner does.
        unsafe { self.shared.as_ref() }
            .segments
            .lock()
            .push((base as usize, bytes));
        self.seg_bytes += bytes;
        // SAFETY: the header and the cells lie inside the segment.
        unsafe {
            self.first = base.add(HEADER_BYTES).cast();
            self.bump = self.first;
            self.end = self.first.add(Self::cells_in(bytes));
        }
    }

    /// Cells in a segment of `bytes`.
    const fn cells_in(bytes: usize) -> usize {
        (bytes - HEADER_BYTES) / core::mem::size_of::<Cell<T>>()
    }

    /// Bytes of the segments mapped directly rather than taken from the
    /// allocator (the huge-page ones), which an allocator does not see.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.mapped
    }

    /// Bytes of one record's cell.
    pub(crate) const CELL_BYTES: usize = core::mem::size_of::<Cell<T>>();

    /// Bytes of the cells this slab has carved (live, free or released).
    #[cfg(test)]
    pub(crate) fn carved_bytes(&self) -> usize {
        // SAFETY: the shared part lives while the owner does.
        let cells: usize = unsafe { self.shared.as_ref() }
            .segments
            .lock()
            .iter()
            .map(|&(_, bytes)| Self::cells_in(bytes))
            .sum();
        let unused = if self.end.is_null() {
            0
        } else {
            // SAFETY: both inside the newest segment.
            unsafe { self.end.offset_from(self.bump) as usize }
        };
        (cells - unused) * core::mem::size_of::<Cell<T>>()
    }
}

impl<T> Drop for Slab<T> {
    fn drop(&mut self) {
        // The owner's free cells hold no value; hand back the owner's
        // count and its unused credit.
        // SAFETY: the shared part lives until the count reaches zero.
        let last = unsafe { self.shared.as_ref() }
            .live
            .fetch_sub(1 + self.credit, Ordering::AcqRel)
            == 1 + self.credit;
        if last {
            // SAFETY: no record is live and the owner is gone.
            unsafe { free_all(self.shared.as_ptr()) };
        }
    }
}

/// The next link of a free cell.
///
/// # Safety
/// `cell` is a free cell whose link was written by [`set_next`].
#[inline]
unsafe fn next_of<T>(cell: *mut Cell<T>) -> *mut Cell<T> {
    // SAFETY: per the contract; the value area holds at least a pointer
    // (checked in `Slab::CHECKED`), maybe unaligned for it.
    unsafe { (*cell).val.get().cast::<*mut Cell<T>>().read_unaligned() }
}

/// Link a free cell to `next`.
///
/// # Safety
/// `cell` is a free cell nobody else uses.
#[inline]
unsafe fn set_next<T>(cell: *mut Cell<T>, next: *mut Cell<T>) {
    // SAFETY: per the contract, as in `next_of`.
    unsafe {
        (*cell)
            .val
            .get()
            .cast::<*mut Cell<T>>()
            .write_unaligned(next)
    }
}

/// Free every segment and the shared part.
///
/// # Safety
/// No record is live and the owner is gone (the live count reached zero).
unsafe fn free_all(shared: *const Shared) {
    // SAFETY: per the contract, nobody else can reach the shared part.
    let shared = unsafe { Box::from_raw(shared.cast_mut()) };
    for &(base, bytes) in shared.segments.lock().iter() {
        if bytes == SEG_BYTES {
            // SAFETY: allocated in `grow` with this layout.
            unsafe { dealloc(base as *mut u8, seg_layout()) };
        } else if let Some(p) = NonNull::new(base as *mut u8) {
            // SAFETY: mapped in `grow`, unreachable now.
            unsafe { huge::unmap(p, bytes) };
        }
    }
}

/// A counted reference to a record of a [`Slab`]: `Arc`'s semantics (clone
/// shares, the last drop drops the value), in a slab cell.
pub(crate) struct SlabArc<T> {
    ptr: NonNull<Cell<T>>,
    _own: PhantomData<T>,
}

// SAFETY: as `Arc<T>`: the value is shared between threads and dropped by
// whichever releases it last.
unsafe impl<T: Send + Sync> Send for SlabArc<T> {}
// SAFETY: as `Arc<T>`.
unsafe impl<T: Send + Sync> Sync for SlabArc<T> {}

impl<T> SlabArc<T> {
    #[inline]
    fn cell(&self) -> &Cell<T> {
        // SAFETY: a live record's cell stays allocated while referenced.
        unsafe { self.ptr.as_ref() }
    }

    /// Whether both name the same record.
    #[inline]
    pub(crate) fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }

    /// The value, if this is the only reference (as `Arc::get_mut`).
    #[inline]
    pub(crate) fn get_mut(&mut self) -> Option<&mut T> {
        // Acquire pairs with the Release of the other references' drops:
        // their uses of the value happen before ours.
        if self.cell().refs.load(Ordering::Acquire) == 1 {
            // SAFETY: the only reference, borrowed mutably: nobody else
            // can reach the value.
            Some(unsafe { (*self.cell().val.get()).assume_init_mut() })
        } else {
            None
        }
    }
}

impl<T> Deref for SlabArc<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: a live record's value is initialised; shared access only.
        unsafe { (*self.cell().val.get()).assume_init_ref() }
    }
}

impl<T> Clone for SlabArc<T> {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed as `Arc::clone`: a new reference is made from an existing
        // one, which already orders the value.
        let old = self.cell().refs.fetch_add(1, Ordering::Relaxed);
        if old > i32::MAX as u32 {
            // As `Arc`: a leak of two billion references is a bug; never wrap.
            std::process::abort();
        }
        Self {
            ptr: self.ptr,
            _own: PhantomData,
        }
    }
}

impl<T> Drop for SlabArc<T> {
    #[inline]
    fn drop(&mut self) {
        // Release (and the Acquire fence below) as `Arc::drop`: every use
        // of the value happens before it is dropped.
        if self.cell().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        let cell = self.ptr.as_ptr();
        // SAFETY: the last reference: the value is initialised and nobody
        // else can reach it.
        unsafe { (*(*cell).val.get()).assume_init_drop() };
        // SAFETY: the cell lies `index` cells after its segment's header,
        // which names the shared part; the cell's record was live until
        // now, so the shared part still is.
        let shared = unsafe {
            let first = cell.sub((*cell).index as usize);
            let seg = first.cast::<u8>().sub(HEADER_BYTES).cast::<Header>();
            &*(*seg).shared
        };
        let mut head = shared.released.load(Ordering::Relaxed);
        loop {
            // SAFETY: the cell is free and ours until the push succeeds.
            unsafe { set_next(cell, head.cast()) };
            // Release: the link is visible to the owner's Acquire swap.
            match shared.released.compare_exchange_weak(
                head,
                cell.cast(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        if shared.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: the owner is gone and this was the last record.
            unsafe { free_all(shared) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    struct Counted(u64, Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn records_share_and_drop_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slab = Slab::new();
        let a = slab.alloc(Counted(7, drops.clone()));
        let mut b = a.clone();
        assert!(SlabArc::ptr_eq(&a, &b));
        assert!(b.get_mut().is_none(), "shared: no exclusive access");
        drop(a);
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        b.get_mut().expect("unique now").0 = 9;
        assert_eq!(b.0, 9);
        drop(b);
        assert_eq!(drops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn released_cells_are_reused_and_segments_grow() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slab = Slab::new();
        let per = (SEG_BYTES - HEADER_BYTES) / core::mem::size_of::<Cell<Counted>>();
        // Three segments' worth, values intact.
        let recs: Vec<_> = (0..3 * per as u64)
            .map(|i| slab.alloc(Counted(i, drops.clone())))
            .collect();
        assert!(recs.iter().enumerate().all(|(i, r)| r.0 == i as u64));
        assert_eq!(
            slab.carved_bytes(),
            3 * per * core::mem::size_of::<Cell<Counted>>()
        );
        let first = recs[0].ptr;
        drop(recs);
        assert_eq!(drops.load(Ordering::Relaxed), 3 * per);
        // The released cells come back before any new carving.
        let again: Vec<_> = (0..3 * per as u64)
            .map(|i| slab.alloc(Counted(i, drops.clone())))
            .collect();
        assert_eq!(
            slab.carved_bytes(),
            3 * per * core::mem::size_of::<Cell<Counted>>()
        );
        assert!(again.iter().any(|r| r.ptr == first));
    }

    #[test]
    fn a_large_slab_moves_on_to_huge_page_segments() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slab = Slab::new();
        let size = core::mem::size_of::<Cell<Counted>>();
        let n = SMALL_SEGMENTS / size + 2 * Slab::<Counted>::cells_in(huge::HUGE_PAGE);
        let recs: Vec<_> = (0..n as u64)
            .map(|i| slab.alloc(Counted(i, drops.clone())))
            .collect();
        assert!(recs.iter().enumerate().all(|(i, r)| r.0 == i as u64));
        assert_eq!(slab.carved_bytes(), n * size);
        // SAFETY: the shared part lives while the owner does.
        let segs = unsafe { slab.shared.as_ref() }.segments.lock().clone();
        let big: Vec<_> = segs.iter().filter(|s| s.1 == huge::HUGE_PAGE).collect();
        assert!(big.len() >= 2, "{segs:?}");
        assert!(big.iter().all(|s| s.0 % huge::HUGE_PAGE == 0));
        // A record of a huge segment finds its slab when released.
        let last = recs.last().map(|r| r.ptr);
        drop(recs);
        assert_eq!(drops.load(Ordering::Relaxed), n);
        let again = slab.alloc(Counted(1, drops.clone()));
        assert_eq!(
            Some(again.ptr),
            last,
            "the last released cell comes back first"
        );
        assert_eq!(slab.carved_bytes(), n * size);
    }

    #[test]
    fn records_outlive_their_owner_across_threads() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slab = Slab::new();
        let recs: Vec<_> = (0..10_000u64)
            .map(|i| slab.alloc(Counted(i, drops.clone())))
            .collect();
        // Threads hold clones, then the owner goes, then the threads release.
        let held: Vec<Vec<SlabArc<Counted>>> = (0..4)
            .map(|t| recs.iter().skip(t).step_by(4).cloned().collect())
            .collect();
        drop(recs);
        drop(slab);
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        let threads: Vec<_> = held
            .into_iter()
            .map(|h| {
                std::thread::spawn(move || {
                    let sum: u64 = h.iter().map(|r| r.0).sum();
                    drop(h);
                    sum
                })
            })
            .collect();
        let sum: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sum, (0..10_000u64).sum());
        assert_eq!(drops.load(Ordering::Relaxed), 10_000);
    }

    #[test]
    fn concurrent_releases_while_the_owner_allocates() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut slab = Slab::new();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<SlabArc<Counted>>>();
        let releaser = std::thread::spawn(move || {
            for batch in rx {
                drop(batch);
            }
        });
        let mut live = 0u64;
        for round in 0..200u64 {
            let batch: Vec<_> = (0..500)
                .map(|i| slab.alloc(Counted(round * 500 + i, drops.clone())))
                .collect();
            live += batch.len() as u64;
            assert!(batch
                .iter()
                .enumerate()
                .all(|(i, r)| r.0 == round * 500 + i as u64));
            tx.send(batch).unwrap();
        }
        drop(tx);
        releaser.join().unwrap();
        assert_eq!(drops.load(Ordering::Relaxed) as u64, live);
    }
}
