//! The device-emulation translation cache: primary address to frame, per
//! region, as an interval subscriber of the primary.
//!
//! It is a secondary MMU of its own (not a view of the KVM mirror's page
//! table), so device emulation keeps working while KVM's host view is being
//! changed, and so its hits cost one uncontended read lock and an index.
//!
//! # Locking
//! `entries` is a read-write lock and the interval protocol's driver lock:
//! the invalidate callback takes it for writing around `set_seq` and the
//! clearing; the fill path takes it for writing around `read_retry` and the
//! insert. Users of a translation hold it for reading for as long as they
//! touch the frame (see [`crate::DeviceView`]), so an invalidation of the
//! page waits until they are done, and the primary frees the frame only
//! after that.

use std::sync::atomic::{AtomicU64, Ordering};

use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};
use notifier_core::primary::{Primary, Translation};
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
    pub(crate) entries: RwLock<Vec<u64>>,
    pub(crate) stats: CacheStats,
}

impl TranslationCache {
    pub(crate) fn new(pbase: u64, len: u64) -> Self {
        Self { pbase, len, entries: RwLock::new(vec![0; (len >> PAGE_SHIFT) as usize]), stats: CacheStats::default() }
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
    pub(crate) fn fill<P: Primary + ?Sized>(&self, sub: &IntervalNotifier, primary: &P, idx: usize, write: bool) -> Result<Translation, KvmError> {
        let addr = self.pbase + ((idx as u64) << PAGE_SHIFT);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        loop {
            let seq = sub.read_begin();
            let t = primary.fault_page(addr, write)?;
            let mut e = self.entries.write();
            if sub.read_retry(seq) {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            e[idx] = pte(t);
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
    fn invalidate(&self, sub: &IntervalNotifier, range: &InvalidateRange, cur_seq: u64) -> Result<(), Again> {
        let c = &self.0;
        let mut e = if range.blockable { c.entries.write() } else { c.entries.try_write().ok_or(Again)? };
        sub.set_seq(cur_seq);
        let s = range.start.max(c.pbase);
        let end = range.end.min(c.pbase + c.len);
        if s < end {
            let (first, last) = (((s - c.pbase) >> PAGE_SHIFT) as usize, ((end - c.pbase) >> PAGE_SHIFT) as usize);
            let keep = range.event.keeps_readable();
            for x in &mut e[first..last] {
                // Bit 1 is the writable bit of the entry encoding.
                *x = if keep { *x & !2 } else { 0 };
            }
        }
        c.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
