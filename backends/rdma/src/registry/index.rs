//! The hit-path index: an open-addressing hash from a cached region's
//! first page to its slot (linear probing, backward-shift deletion, load at
//! most 3/4), whose buckets are 4-byte tagged slot numbers.
//!
//! It holds the cached (live, indexed) regions, keyed by start, so a `get`
//! whose start is a region's start finds its slot in one probe; the key
//! itself is not stored: the slot's hot record holds the region's start,
//! which the hit reads anyway (for the handle and the reference count), and
//! an 8-bit tag of the key's hash in each bucket makes a probe of another
//! key's bucket skip that read 255 times in 256. Other starts fall back to
//! the ordered index.
//!
//! The hash is an accelerator: a region whose slot does not fit the 24 bits
//! of a bucket is simply not hashed, and its `get`s take the slow path.

use crate::page_vec::PageVec;

/// A bucket: `tag << 24 | slot`; `EMPTY` is never a valid bucket.
const EMPTY: u32 = u32::MAX;
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// Largest slot the hash can hold (exclusive): slot `SLOT_MASK` with tag
/// 0xff would be `EMPTY`.
pub(crate) const MAX_SLOT: u32 = SLOT_MASK;

/// Page-keyed hash of indexed regions. Every method that needs the key of
/// a stored slot takes `key_of(slot)`, the region start page of that slot.
pub(crate) struct StartHash {
    /// In its own mapping (huge pages once large: see `page_vec.rs`).
    buckets: PageVec<u32>,
    mask: usize,
    len: usize,
}

#[inline(always)]
fn mix(page: u64) -> u64 {
    // Fibonacci hashing: the high bits of the product are well mixed.
    page.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[inline(always)]
fn home(h: u64, mask: usize) -> usize {
    (h >> 32) as usize & mask
}

#[inline(always)]
fn tag(h: u64) -> u32 {
    ((h >> 56) as u32) << SLOT_BITS
}

impl StartHash {
    pub(crate) fn new() -> Self {
        Self::with_buckets(16)
    }

    fn with_buckets(n: usize) -> Self {
        Self {
            buckets: PageVec::zeroed(n),
            mask: n - 1,
            len: 0,
        }
    }

    /// Bucket `i`. The table stores buckets inverted, so that `EMPTY` is
    /// zero in memory and a new table is a fresh mapping, already zero:
    /// no fill pass over it.
    #[inline(always)]
    fn at(&self, i: usize) -> u32 {
        !self.buckets[i]
    }

    #[inline(always)]
    fn put(&mut self, i: usize, b: u32) {
        self.buckets[i] = !b;
    }

    /// Bytes of the buckets' mapping.
    pub(crate) fn mapped_bytes(&self) -> usize {
        self.buckets.mapped_bytes()
    }

    /// The slot of the region starting at `page`.
    #[cfg(test)]
    pub(crate) fn get(&self, page: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let h = mix(page);
        let t = tag(h);
        let mut i = home(h, self.mask);
        loop {
            let b = self.at(i);
            if b == EMPTY {
                return None;
            }
            if b & !SLOT_MASK == t && key_of(b & SLOT_MASK) == page {
                return Some(b & SLOT_MASK);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The first slot in `page`'s probe run whose tag matches: the region
    /// starting at `page` if the caller's check of its start agrees (a
    /// different region in 1 of 256 probes of a present key, when the
    /// caller should fall back to [`Self::get`] or another index).
    #[inline(always)]
    pub(crate) fn candidate(&self, page: u64) -> Option<u32> {
        let h = mix(page);
        let t = tag(h);
        let mut i = home(h, self.mask);
        loop {
            let b = self.at(i);
            if b == EMPTY {
                return None;
            }
            if b & !SLOT_MASK == t {
                return Some(b & SLOT_MASK);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Insert `slot` (below [`MAX_SLOT`]) under `page`, or replace the slot
    /// stored under it.
    pub(crate) fn insert(&mut self, page: u64, slot: u32, key_of: impl Fn(u32) -> u64) {
        debug_assert!(slot < MAX_SLOT);
        if self.is_full() {
            self.resize(self.buckets.len() * 2, &key_of);
        }
        let h = mix(page);
        let t = tag(h);
        let mut i = home(h, self.mask);
        loop {
            let b = self.at(i);
            if b == EMPTY {
                self.put(i, t | slot);
                self.len += 1;
                return;
            }
            if b & !SLOT_MASK == t && key_of(b & SLOT_MASK) == page {
                self.put(i, t | slot);
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Whether the next insert of a new key would grow the table.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        (self.len + 1) * 4 > self.buckets.len() * 3
    }

    /// Double the table, filling it from `entries` (every stored key with
    /// its slot, in any order) instead of the old buckets. The caller reads
    /// them from its records in slot order, which streams through memory
    /// where a rehash of the buckets reads a record at random per entry.
    pub(crate) fn grow_from(&mut self, entries: impl Iterator<Item = (u64, u32)>) {
        let n = self.buckets.len() * 2;
        // In place: the old table's pages are mapped already.
        self.buckets.regrow_zeroed(n);
        self.mask = n - 1;
        self.len = 0;
        for (page, slot) in entries {
            let h = mix(page);
            let mut i = home(h, self.mask);
            while self.at(i) != EMPTY {
                i = (i + 1) & self.mask;
            }
            self.put(i, tag(h) | slot);
            self.len += 1;
        }
    }

    /// Rebuild with `n` buckets (keys are distinct: plain placement).
    fn resize(&mut self, n: usize, key_of: &impl Fn(u32) -> u64) {
        let old = core::mem::replace(&mut self.buckets, PageVec::zeroed(n));
        self.mask = n - 1;
        for b in old.iter().map(|&m| !m).filter(|&b| b != EMPTY) {
            let mut i = home(mix(key_of(b & SLOT_MASK)), self.mask);
            while self.at(i) != EMPTY {
                i = (i + 1) & self.mask;
            }
            self.put(i, b);
        }
    }

    /// Remove `page` if present.
    pub(crate) fn remove(&mut self, page: u64, key_of: impl Fn(u32) -> u64) {
        let h = mix(page);
        let t = tag(h);
        let mut i = home(h, self.mask);
        loop {
            let b = self.at(i);
            if b == EMPTY {
                return;
            }
            if b & !SLOT_MASK == t && key_of(b & SLOT_MASK) == page {
                break;
            }
            i = (i + 1) & self.mask;
        }
        // Backward shift: pull later members of the probe run into the hole
        // unless their home lies cyclically in (hole, j].
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let b = self.at(j);
            if b == EMPTY {
                break;
            }
            let k = home(mix(key_of(b & SLOT_MASK)), self.mask);
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if stays {
                continue;
            }
            self.put(i, b);
            i = j;
        }
        self.put(i, EMPTY);
        self.len -= 1;
        if self.len * 16 < self.buckets.len() && self.buckets.len() > 16 {
            self.resize(self.buckets.len() / 4, &key_of);
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Replace the contents with `entries` (distinct pages, slots below
    /// [`MAX_SLOT`]), as a run of inserts into a new hash would.
    pub(crate) fn rebuild(
        &mut self,
        entries: impl Iterator<Item = (u64, u32)>,
        key_of: impl Fn(u32) -> u64,
    ) {
        *self = Self::new();
        for (page, slot) in entries {
            self.insert(page, slot, &key_of);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn matches_a_hash_map_under_churn() {
        // Slot s holds page keys[s]; pages are reused under new slots.
        let mut h = StartHash::new();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut keys: Vec<u64> = Vec::new();
        let mut x: u64 = 12345;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Pages that collide in their low bits too.
            let page = (x % 5000) << (x % 3 * 16);
            if x % 3 == 0 {
                h.remove(page, |s| keys[s as usize]);
                m.remove(&page);
            } else {
                let slot = keys.len() as u32;
                keys.push(page);
                h.insert(page, slot, |s| keys[s as usize]);
                m.insert(page, slot);
            }
            if step % 1000 == 0 {
                for (&p, &s) in &m {
                    assert_eq!(h.get(p, |s| keys[s as usize]), Some(s));
                }
                assert_eq!(h.get(u64::MAX / 3, |s| keys[s as usize]), None);
            }
        }
        assert_eq!(h.len(), m.len());
        // Rebuilt from the surviving half, it answers as the map does.
        let keep: Vec<(u64, u32)> = m
            .iter()
            .map(|(&p, &s)| (p, s))
            .filter(|e| e.1 % 2 == 0)
            .collect();
        h.rebuild(keep.iter().copied(), |s| keys[s as usize]);
        assert_eq!(h.len(), keep.len());
        for (&p, &s) in &m {
            let want = (s % 2 == 0).then_some(s);
            assert_eq!(h.get(p, |s| keys[s as usize]), want);
        }
    }
}
