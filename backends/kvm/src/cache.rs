//! The device-emulation translation cache: primary address to frame, per
//! region, as an interval subscriber of the primary.
//!
//! It is a secondary MMU of its own (not a view of the KVM mirror's page
//! table), so device emulation keeps working while KVM's host view is being
//! changed, and so its hits cost one uncontended read lock and an index.
//!
//! # Locking
//! `lock` is a read-write lock and the interval protocol's driver lock:
//! the invalidate callback takes it for writing around `set_seq` and the
//! clearing; the fill path takes it for writing around `read_retry` and the
//! insert. Users of a translation hold it for reading for as long as they
//! touch the frame (see [`crate::DeviceView`]), so an invalidation of the
//! page waits until they are done, and the primary frees the frame only
//! after that.
//!
//! # Optimistic reads
//!
//! `gen` is a sequence count for lock-free readers (a seqlock without odd
//! states): the invalidate callback bumps it (Release) before it clears any
//! entry, so before the primary changes a PTE or frees a frame. A reader
//! loads `gen` (Acquire), loads the entry, reads the frame, then (after an
//! Acquire fence) loads `gen` again; if it moved the read may have seen a
//! frame that was being taken away, and is retried under the lock.
//!
//! ```text
//!   reader                              invalidator
//!   g = gen                      (A)
//!   e = entries[i]                      lock.write(); set_seq
//!   copy from frame(e)                  gen += 1            (R)
//!   fence(Acquire); gen == g ?          entries[range] = 0
//!     yes: no invalidation began        unlock
//!          before the copy ended        ... primary changes PTEs, end, frees
//!     no:  discard, retry locked
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};
use notifier_core::primary::{Primary, Translation};
use notifier_core::secondary::AccessCheck;
use notifier_core::PAGE_SHIFT;
use parking_lot::RwLock;

use crate::host_view::{decode, pte};
use crate::KvmError;

/// Counters of a translation cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Fills after a miss (including upgrades for write).
    pub misses: AtomicU64,
    /// Fills that collided with an invalidation and retried.
    pub retries: AtomicU64,
    /// Invalidation callbacks.
    pub invalidations: AtomicU64,
}

/// One region's translation cache.
pub(crate) struct TranslationCache {
    pub(crate) pbase: u64,
    pub(crate) len: u64,
    /// The driver lock; see the module docs.
    pub(crate) lock: RwLock<()>,
    /// Entries (the `host_view` encoding): written under `lock` held for
    /// writing, read under it held for reading or optimistically.
    pub(crate) entries: Box<[AtomicU64]>,
    /// The optimistic readers' sequence; see the module docs.
    pub(crate) gen: AtomicU64,
    pub(crate) stats: CacheStats,
    /// Optional access checker (a coherence oracle) and the device id it
    /// reports accesses as: told of fills and invalidations here, and of
    /// every access under the read lock by the device view.
    pub(crate) check: Option<(std::sync::Arc<dyn AccessCheck>, usize)>,
}

impl TranslationCache {
    pub(crate) fn new(
        pbase: u64,
        len: u64,
        check: Option<(std::sync::Arc<dyn AccessCheck>, usize)>,
    ) -> Self {
        let entries = (0..len >> PAGE_SHIFT).map(|_| AtomicU64::new(0)).collect();
        Self {
            pbase,
            len,
            lock: RwLock::new(()),
            entries,
            gen: AtomicU64::new(0),
            stats: CacheStats::default(),
            check,
        }
    }

    /// Whether entry `e` serves an access (a write needs a writable entry).
    #[inline]
    pub(crate) fn usable(e: u64, write: bool) -> Option<Translation> {
        decode(e).filter(|t| t.writable || !write)
    }

    /// Fill the entry of page `idx` from the primary.
    ///
    /// # Pairing
    /// `read_begin`, `fault_page`, write-lock, `read_retry` (retry on
    /// collision), insert, unlock.
    ///
    /// # Locking
    /// Call with no lock of this cache held (the primary's fault may
    /// invalidate, and the callback takes `entries`).
    pub(crate) fn fill<P: Primary + ?Sized>(
        &self,
        sub: &IntervalNotifier,
        primary: &P,
        idx: usize,
        write: bool,
    ) -> Result<Translation, KvmError> {
        let addr = self.pbase + ((idx as u64) << PAGE_SHIFT);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        loop {
            let seq = sub.read_begin();
            let t = primary.fault_page(addr, write)?;
            let _w = self.lock.write();
            if sub.read_retry(seq) {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Relaxed: readers under the lock are ordered by it; optimistic
            // readers validate with `gen`, and a new entry retires nothing.
            self.entries[idx].store(pte(t), Ordering::Relaxed);
            if let Some((c, _)) = &self.check {
                c.on_fill(addr, t.pfn, t.writable);
            }
            return Ok(t);
        }
    }
}

/// The interval-notifier callbacks of a translation cache.
pub(crate) struct CacheNotifier(pub(crate) std::sync::Arc<TranslationCache>);

impl IntervalNotifierOps for CacheNotifier {
    /// # Locking
    /// Takes `entries` for writing (tries, and answers [`Again`] when
    /// contended, in a non-blockable invalidation): this waits for every
    /// user of a translation to finish touching its frame.
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let c = &self.0;
        let _w = if range.blockable() {
            c.lock.write()
        } else {
            c.lock.try_write().ok_or(Again)?
        };
        sub.set_seq(cur_seq);
        if let Some((chk, _)) = &c.check {
            chk.on_invalidate_begin(range.start(), range.end(), range.event());
        }
        // Release: pairs with the optimistic reader's fence + second load of
        // `gen`; bumped before any entry is cleared.
        c.gen.fetch_add(1, Ordering::Release);
        let s = range.start().max(c.pbase);
        let end = range.end().min(c.pbase + c.len);
        if s < end {
            let (first, last) = (
                ((s - c.pbase) >> PAGE_SHIFT) as usize,
                ((end - c.pbase) >> PAGE_SHIFT) as usize,
            );
            let keep = range.event().keeps_readable();
            for x in &c.entries[first..last] {
                // Bit 1 is the writable bit of the entry encoding.
                if keep {
                    x.fetch_and(!2, Ordering::Relaxed);
                } else {
                    x.store(0, Ordering::Relaxed);
                }
            }
        }
        if let Some((chk, _)) = &c.check {
            chk.on_invalidate(range.start(), range.end(), range.event());
        }
        c.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
