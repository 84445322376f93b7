//! A set-associative TLB model with batched flushes and counters.
//!
//! Each device of a secondary (a vCPU, a NIC queue) owns one [`Tlb`] and
//! touches it under its own lock; invalidations shoot entries down by taking
//! that lock, as an IPI would. Entries are tagged by virtual page number.
//!
//! Batched flushes: an invalidation collects the pages it removes with
//! [`FlushBatch::add`]; the batch flushes them when it is full (as one
//! range, or everything when the range is too wide) and at
//! [`FlushBatch::finish`], which runs before the invalidation callback
//! returns — never later, or a device could use a translation of a frame
//! the primary is about to free.

use super::ext_addr::Perm;
use crate::frame::Pfn;

/// Geometry of a TLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbConfig {
    /// Number of sets (a power of two).
    pub sets: usize,
    /// Ways per set.
    pub ways: usize,
}

impl Default for TlbConfig {
    /// 64 sets x 8 ways = 512 entries.
    fn default() -> Self {
        Self { sets: 64, ways: 8 }
    }
}

/// Counters of a TLB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlbStats {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Flush operations (page, range or all).
    pub flushes: u64,
    /// Entries actually removed by flushes.
    pub shootdowns: u64,
}

impl TlbStats {
    /// Add `other` into `self`.
    pub fn add(&mut self, other: &TlbStats) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.flushes += other.flushes;
        self.shootdowns += other.shootdowns;
    }
    /// Hit rate in [0, 1].
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbEntry {
    /// The frame.
    pub pfn: Pfn,
    /// Permission.
    pub perm: Perm,
}

/// A set-associative TLB.
///
/// Tags and data live in separate arrays: the ways of a set share one
/// cache line of tags (8 ways x 8 bytes), which is all a lookup scans.
pub struct Tlb {
    /// Virtual page number + 1 per way; 0 means empty.
    tags: Box<[u64]>,
    /// `pfn << 2 | perm` per way.
    data: Box<[u64]>,
    victim: Box<[u8]>,
    set_mask: u64,
    ways: usize,
    stats: TlbStats,
}

impl core::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tlb")
            .field("sets", &(self.set_mask + 1))
            .field("ways", &self.ways)
            .field("stats", &self.stats)
            .finish()
    }
}

/// A TLB geometry [`Tlb::try_new`] refuses.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TlbError {
    /// More sets than [`Tlb::MAX_SETS`].
    #[error("{sets} TLB sets: at most {max}", max = Tlb::MAX_SETS)]
    TooManySets {
        /// The sets asked for.
        sets: usize,
    },
}

impl Tlb {
    /// The most sets a TLB may have (2^20: with 255 ways, 4 GiB of tags and
    /// data, beyond any device TLB).
    pub const MAX_SETS: usize = 1 << 20;

    /// A TLB of the given geometry. `sets` is rounded up to a power of two
    /// and capped at [`Self::MAX_SETS`]; `ways` is at least 1 and at most
    /// 255. Use [`Self::try_new`] to have a huge `sets` refused instead.
    pub fn new(cfg: TlbConfig) -> Self {
        Self::build(cfg.sets.min(Self::MAX_SETS), cfg.ways)
    }

    /// A TLB of the given geometry, checked.
    ///
    /// # Errors
    /// [`TlbError::TooManySets`] above [`Self::MAX_SETS`].
    pub fn try_new(cfg: TlbConfig) -> Result<Self, TlbError> {
        if cfg.sets > Self::MAX_SETS {
            return Err(TlbError::TooManySets { sets: cfg.sets });
        }
        Ok(Self::build(cfg.sets, cfg.ways))
    }

    fn build(sets: usize, ways: usize) -> Self {
        let cfg = TlbConfig { sets, ways };
        let sets = cfg.sets.max(1).next_power_of_two();
        let ways = cfg.ways.clamp(1, 255);
        Self {
            tags: vec![0; sets * ways].into_boxed_slice(),
            data: vec![0; sets * ways].into_boxed_slice(),
            victim: vec![0; sets].into_boxed_slice(),
            set_mask: sets as u64 - 1,
            ways,
            stats: TlbStats::default(),
        }
    }

    #[inline]
    fn set_of(&self, vpn: u64) -> usize {
        // Fold the upper bits in so strided mappings spread over sets.
        ((vpn ^ (vpn >> 9)) & self.set_mask) as usize * self.ways
    }

    #[inline]
    fn find(&self, base: usize, tag: u64) -> Option<usize> {
        self.tags[base..base + self.ways]
            .iter()
            .position(|&t| t == tag)
            .map(|i| base + i)
    }

    /// Look up the page of `addr`.
    #[inline]
    pub fn lookup(&mut self, addr: u64) -> Option<TlbEntry> {
        let vpn = addr >> 12;
        match self.find(self.set_of(vpn), vpn + 1) {
            Some(i) => {
                self.stats.hits += 1;
                let d = self.data[i];
                Some(TlbEntry {
                    pfn: Pfn(d >> 2),
                    perm: Perm::from_bits(d as u8),
                })
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Insert a translation for the page of `addr`, evicting round-robin.
    #[inline]
    pub fn fill(&mut self, addr: u64, pfn: Pfn, perm: Perm) {
        let vpn = addr >> 12;
        let base = self.set_of(vpn);
        let slot = match self.tags[base..base + self.ways]
            .iter()
            .position(|&t| t == vpn + 1 || t == 0)
        {
            Some(i) => base + i,
            None => {
                let v = &mut self.victim[base / self.ways];
                let i = *v as usize % self.ways;
                *v = v.wrapping_add(1);
                base + i
            }
        };
        self.tags[slot] = vpn + 1;
        self.data[slot] = pfn.0 << 2 | perm.bits() as u64;
    }

    /// Remove the page of `addr`.
    pub fn flush_page(&mut self, addr: u64) {
        self.stats.flushes += 1;
        let vpn = addr >> 12;
        if let Some(i) = self.find(self.set_of(vpn), vpn + 1) {
            self.tags[i] = 0;
            self.stats.shootdowns += 1;
        }
    }

    /// Remove every page of `[start, end)`.
    pub fn flush_range(&mut self, start: u64, end: u64) {
        self.stats.flushes += 1;
        let (lo, hi) = (start >> 12, end.saturating_add(0xfff) >> 12);
        if hi - lo > (self.tags.len() / 4) as u64 {
            // Cheaper to scan every tag once.
            for t in self.tags.iter_mut() {
                if *t != 0 && (lo..hi).contains(&(*t - 1)) {
                    *t = 0;
                    self.stats.shootdowns += 1;
                }
            }
            return;
        }
        for vpn in lo..hi {
            if let Some(i) = self.find(self.set_of(vpn), vpn + 1) {
                self.tags[i] = 0;
                self.stats.shootdowns += 1;
            }
        }
    }

    /// Remove everything.
    pub fn flush_all(&mut self) {
        self.stats.flushes += 1;
        for t in self.tags.iter_mut() {
            if *t != 0 {
                *t = 0;
                self.stats.shootdowns += 1;
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }

    /// Number of entries.
    pub fn capacity(&self) -> usize {
        self.tags.len()
    }
}

/// Spans collected during one invalidation, flushed together.
///
/// Contiguous spans are merged, so invalidating a dense range costs one
/// range flush per device, not one per page.
#[derive(Debug)]
pub struct FlushBatch {
    spans: Vec<(u64, u64)>,
    cap: usize,
}

impl FlushBatch {
    /// A batch that flushes when it holds `cap` separate spans.
    pub fn new(cap: usize) -> Self {
        Self {
            spans: Vec::new(),
            cap: cap.max(1),
        }
    }

    /// Collect `[addr, addr + len)`; when the batch is full, hand it to
    /// `flush`.
    #[inline]
    pub fn add(&mut self, addr: u64, len: u64, flush: impl FnOnce(&[(u64, u64)])) {
        if let Some(last) = self.spans.last_mut() {
            if last.1 == addr {
                last.1 = addr + len;
                return;
            }
        }
        if self.spans.len() >= self.cap {
            flush(&self.spans);
            self.spans.clear();
        }
        self.spans.push((addr, addr + len));
    }

    /// Flush what is left.
    pub fn finish(&mut self, flush: impl FnOnce(&[(u64, u64)])) {
        if !self.spans.is_empty() {
            flush(&self.spans);
            self.spans.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_miss_evict_and_flush() {
        let mut t = Tlb::new(TlbConfig { sets: 2, ways: 2 });
        assert_eq!(t.lookup(0x1000), None);
        t.fill(0x1000, Pfn(1), Perm::READ);
        assert_eq!(
            t.lookup(0x1000),
            Some(TlbEntry {
                pfn: Pfn(1),
                perm: Perm::READ
            })
        );
        // Fill more pages than the TLB holds: something gets evicted.
        for i in 2..10u64 {
            t.fill(i << 12, Pfn(i), Perm::READ);
        }
        let present = (1..10u64).filter(|i| t.lookup(i << 12).is_some()).count();
        assert_eq!(present, 4);
        t.flush_range(0, 10 << 12);
        assert!((1..10u64).all(|i| t.lookup(i << 12).is_none()));
        let s = t.stats();
        assert_eq!(s.shootdowns, 4);
        assert!(s.hits >= 5 && s.misses >= 1);
        t.fill(0x5000, Pfn(5), Perm::READ_WRITE);
        t.flush_page(0x5000);
        assert_eq!(t.lookup(0x5000), None);
        t.fill(0x5000, Pfn(5), Perm::READ_WRITE);
        t.flush_all();
        assert_eq!(t.lookup(0x5000), None);
    }

    #[test]
    fn wide_range_flush_scans_entries() {
        let mut t = Tlb::new(TlbConfig { sets: 4, ways: 2 });
        t.fill(0x10_0000_0000, Pfn(1), Perm::READ);
        t.fill(0x1000, Pfn(2), Perm::READ);
        t.flush_range(0x10_0000_0000, 0x20_0000_0000);
        assert_eq!(t.lookup(0x10_0000_0000), None);
        assert!(t.lookup(0x1000).is_some());
    }

    #[test]
    fn batch_merges_spans_and_flushes_when_full() {
        let mut b = FlushBatch::new(2);
        let mut flushed = vec![];
        for a in [0u64, 1, 2, 5, 6, 9, 12] {
            b.add(a << 12, 4096, |p| flushed.push(p.to_vec()));
        }
        b.finish(|p| flushed.push(p.to_vec()));
        assert_eq!(
            flushed,
            vec![
                vec![(0, 3 << 12), (5 << 12, 7 << 12)],
                vec![(9 << 12, 10 << 12), (12 << 12, 13 << 12)]
            ]
        );
    }
}
