//! The host view of one region: the VA range KVM reads the region's guest
//! memory through, its external page table, and the interval-notifier
//! callback that punches invalidated pages back to holes.
//!
//! # The mechanism
//!
//! A region of `len` bytes owns a `PROT_NONE` reservation of `len` bytes
//! (the memslot's `userspace_addr`). Page `i` of it is in one of three
//! states, recorded in the external page table `pt[i]`:
//!
//! | `pt[i]`                 | host view page                                   | KVM/guest                    |
//! |-------------------------|--------------------------------------------------|------------------------------|
//! | `0` (hole)              | anonymous `PROT_NONE`                            | access exits to the VMM      |
//! | `pfn << 2 \| P`         | memfd page of `pfn`, `MAP_SHARED`, `PROT_READ`   | reads; a write exits         |
//! | `pfn << 2 \| P \| W`    | memfd page of `pfn`, `MAP_SHARED`, read-write    | reads and writes             |
//!
//! KVM follows host remaps (the host kernel's own mmu notifier zaps KVM's
//! SPTEs when the host view changes), so changing the host view is enough
//! to change what the guest sees. Invalidation replaces each run of present
//! pages with one `mmap(MAP_FIXED, PROT_NONE)`; a soft-dirty or page
//! write-protect event only `mprotect`s the run read-only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier_core::frame::Pfn;
use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};
use notifier_core::primary::Translation;
use notifier_core::{PAGE_SHIFT, PAGE_SIZE};
use parking_lot::Mutex;

use crate::memfd::MemfdFrames;
use crate::sys::Reservation;
use crate::KvmError;

const P: u64 = 1;
const W: u64 = 2;

/// Encode a present entry.
#[inline]
pub(crate) fn pte(t: Translation) -> u64 {
    (t.pfn.0 << 2) | P | if t.writable { W } else { 0 }
}

/// Decode an entry.
#[inline]
pub(crate) fn decode(e: u64) -> Option<Translation> {
    (e & P != 0).then_some(Translation {
        pfn: Pfn(e >> 2),
        writable: e & W != 0,
    })
}

/// Counters of one host view.
#[derive(Debug, Default)]
pub struct ViewStats {
    /// Pages mapped in by faults.
    pub faults: AtomicU64,
    /// Invalidation callbacks that touched this view.
    pub invalidations: AtomicU64,
    /// Pages punched back to holes.
    pub punched: AtomicU64,
    /// Pages write-protected in place.
    pub write_protected: AtomicU64,
}

/// One region's host view and external page table.
///
/// # Locking
/// `pt` is the driver lock of the interval protocol: the invalidate callback
/// takes it around `set_seq` and the host-view change; the fault path takes
/// it around `read_retry` and the host-view change. Nothing else is taken
/// under it, and the primary is never called with it held.
pub(crate) struct HostView {
    /// Primary address of the first page.
    pub(crate) pbase: u64,
    pub(crate) len: u64,
    pub(crate) view: Arc<Reservation>,
    pub(crate) frames: Arc<MemfdFrames>,
    pub(crate) pt: Mutex<Vec<u64>>,
    /// Pages written through the mirror (write faults, VMM writes), one bit
    /// per page, taken by the dirty log.
    pub(crate) dirty: Vec<AtomicU64>,
    pub(crate) stats: ViewStats,
}

/// Reserved host-view VA ranges of removed regions, all holes, kept for
/// reuse: adding a region then costs no `mmap` and removing one no `munmap`
/// (the pair is a third of a memslot add+remove's overhead).
///
/// # Locking
/// `free` is a leaf lock, never held across a syscall.
#[derive(Debug, Default)]
pub(crate) struct ViewPool {
    free: Mutex<Vec<Arc<Reservation>>>,
}

/// Reservations kept at most.
const POOL_MAX: usize = 32;

impl ViewPool {
    /// A hole-only reservation of `len` bytes: a pooled one or a new one.
    fn take(&self, len: u64) -> Result<Arc<Reservation>, KvmError> {
        let mut free = self.free.lock();
        if let Some(i) = free.iter().position(|r| r.len() as u64 == len) {
            return Ok(free.swap_remove(i));
        }
        drop(free);
        let r = Reservation::new(len as usize).map_err(|e| KvmError::os("reserve host view", e))?;
        Ok(Arc::new(r))
    }

    /// Take back `view`'s reservation if nothing else (no memslot) holds it:
    /// its present pages are punched first (one `mmap` per run), so it is
    /// all holes again. Otherwise, or when the pool is full, it is simply
    /// dropped (unmapped by its last holder).
    pub(crate) fn recycle(&self, view: Arc<HostView>) {
        let Ok(v) = Arc::try_unwrap(view) else {
            return;
        };
        if Arc::strong_count(&v.view) != 1 || self.free.lock().len() >= POOL_MAX {
            return;
        }
        let mut pt = std::mem::take(&mut *v.pt.lock());
        v.zap(&mut pt, v.pbase, v.pbase + v.len, false);
        self.free.lock().push(v.view);
    }
}

impl HostView {
    /// A view of `len` bytes at primary `pbase`, all holes, its VA range
    /// taken from `pool`.
    pub(crate) fn new(
        pbase: u64,
        len: u64,
        frames: Arc<MemfdFrames>,
        pool: &ViewPool,
    ) -> Result<Self, KvmError> {
        let pages = (len >> PAGE_SHIFT) as usize;
        let view = pool.take(len)?;
        Ok(Self {
            pbase,
            len,
            view,
            frames,
            pt: Mutex::new(vec![0; pages]),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            stats: ViewStats::default(),
        })
    }

    /// Page index of primary address `addr` (inside the region).
    #[inline]
    pub(crate) fn index(&self, addr: u64) -> usize {
        ((addr - self.pbase) >> PAGE_SHIFT) as usize
    }

    /// Map `t` at page `idx` of the view and record it.
    ///
    /// # Locking
    /// Call with `pt` locked, after `read_retry` said no collision.
    pub(crate) fn install(
        &self,
        pt: &mut [u64],
        idx: usize,
        t: Translation,
    ) -> Result<(), KvmError> {
        let off = self
            .frames
            .file_offset(t.pfn)
            .ok_or(KvmError::ForeignPfn(t.pfn.0))?;
        if pt[idx] != pte(t) {
            self.view
                .map(
                    idx << PAGE_SHIFT,
                    PAGE_SIZE as usize,
                    self.frames.fd(),
                    off,
                    t.writable,
                )
                .map_err(|e| KvmError::os("map page into host view", e))?;
            pt[idx] = pte(t);
        }
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Record a write to page `idx`.
    #[inline]
    pub(crate) fn mark_dirty(&self, idx: usize) {
        self.dirty[idx / 64].fetch_or(1 << (idx % 64), Ordering::Relaxed);
    }

    /// Drop the translations of `[start, end)` (primary addresses, clipped
    /// to the region): punch runs of present pages to holes, or only
    /// write-protect them when `keep_readable`.
    ///
    /// # Locking
    /// Call with `pt` locked.
    pub(crate) fn zap(&self, pt: &mut [u64], start: u64, end: u64, keep_readable: bool) {
        let s = start.max(self.pbase);
        let e = end.min(self.pbase + self.len);
        if s >= e {
            return;
        }
        let (first, last) = (self.index(s), self.index(e - 1) + 1);
        let mut i = first;
        while i < last {
            let wanted = |x: u64| {
                if keep_readable {
                    x & W != 0
                } else {
                    x & P != 0
                }
            };
            if !wanted(pt[i]) {
                i += 1;
                continue;
            }
            let run = i;
            while i < last && wanted(pt[i]) {
                pt[i] = if keep_readable { pt[i] & !W } else { 0 };
                i += 1;
            }
            let (off, len) = (run << PAGE_SHIFT, (i - run) << PAGE_SHIFT);
            let r = if keep_readable {
                self.view.write_protect(off, len)
            } else {
                self.view.punch(off, len)
            };
            // A failed punch would leave the guest able to reach a frame the
            // primary is about to free: there is no safe way to continue.
            if let Err(err) = r {
                panic!("host view: cannot drop pages {off:#x}+{len:#x}: {err}");
            }
            let n = (i - run) as u64;
            if keep_readable {
                self.stats.write_protected.fetch_add(n, Ordering::Relaxed);
            } else {
                self.stats.punched.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Number of present pages.
    pub(crate) fn present(&self) -> usize {
        self.pt.lock().iter().filter(|&&e| e & P != 0).count()
    }
}

/// The interval-notifier callbacks of a host view.
pub(crate) struct ViewNotifier(pub(crate) Arc<HostView>);

impl IntervalNotifierOps for ViewNotifier {
    /// # Locking
    /// Takes `pt` (or, in a non-blockable invalidation, tries it and answers
    /// [`Again`] when it is contended), records `cur_seq`, zaps, unlocks.
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let v = &self.0;
        let mut pt = if range.blockable() {
            v.pt.lock()
        } else {
            v.pt.try_lock().ok_or(Again)?
        };
        sub.set_seq(cur_seq);
        let keep = range.event().keeps_readable();
        v.zap(&mut pt, range.start(), range.end(), keep);
        v.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
