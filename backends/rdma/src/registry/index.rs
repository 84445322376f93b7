//! The hit-path index: an open-addressing hash from a cached region's
//! first page to its slot (linear probing, backward-shift deletion, load at
//! most 3/4, 16-byte buckets).
//!
//! It holds exactly the cached (live, indexed) regions, keyed by start, so
//! a `get` whose start is a region's start finds its slot in one probe and
//! everything for the handle in the slot's 32-byte hot record, which the
//! reference count update touches anyway; other starts fall back to the
//! ordered index.

const EMPTY: u64 = u64::MAX;

/// A cached region's slot.
pub(crate) type Hit = u32;

#[derive(Clone, Copy)]
struct Bucket {
    page: u64,
    hit: Hit,
}

const NO_HIT: Hit = 0;

/// Page-keyed hash of indexed regions.
pub(crate) struct StartHash {
    buckets: Box<[Bucket]>,
    mask: usize,
    len: usize,
}

#[inline]
fn home(page: u64, mask: usize) -> usize {
    // Fibonacci hashing: the high bits of the product are well mixed.
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask
}

impl StartHash {
    pub(crate) fn new() -> Self {
        Self::with_buckets(16)
    }

    fn with_buckets(n: usize) -> Self {
        Self {
            buckets: vec![
                Bucket {
                    page: EMPTY,
                    hit: NO_HIT
                };
                n
            ]
            .into_boxed_slice(),
            mask: n - 1,
            len: 0,
        }
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.len() * core::mem::size_of::<Bucket>()
    }

    /// The region starting at `page`.
    #[inline(always)]
    pub(crate) fn get(&self, page: u64) -> Option<&Hit> {
        let mut i = home(page, self.mask);
        loop {
            let b = &self.buckets[i];
            if b.page == page {
                return Some(&b.hit);
            }
            if b.page == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Insert or replace.
    pub(crate) fn insert(&mut self, page: u64, hit: Hit) {
        debug_assert_ne!(page, EMPTY);
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            self.grow();
        }
        let mut i = home(page, self.mask);
        loop {
            let b = &mut self.buckets[i];
            if b.page == page {
                b.hit = hit;
                return;
            }
            if b.page == EMPTY {
                *b = Bucket { page, hit };
                self.len += 1;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn grow(&mut self) {
        let mut bigger = Self::with_buckets(self.buckets.len() * 2);
        for b in self.buckets.iter().filter(|b| b.page != EMPTY) {
            bigger.insert(b.page, b.hit);
        }
        *self = bigger;
    }

    /// Remove `page` if present.
    pub(crate) fn remove(&mut self, page: u64) {
        let mut i = home(page, self.mask);
        loop {
            let b = self.buckets[i];
            if b.page == EMPTY {
                return;
            }
            if b.page == page {
                break;
            }
            i = (i + 1) & self.mask;
        }
        // Backward shift: pull later members of the probe run into the hole
        // unless their home lies cyclically in (hole, j].
        let mut j = i;
        loop {
            j = (j + 1) & self.mask;
            let b = self.buckets[j];
            if b.page == EMPTY {
                break;
            }
            let k = home(b.page, self.mask);
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if stays {
                continue;
            }
            self.buckets[i] = b;
            i = j;
        }
        self.buckets[i].page = EMPTY;
        self.len -= 1;
        if self.len * 16 < self.buckets.len() && self.buckets.len() > 16 {
            let mut smaller = Self::with_buckets(self.buckets.len() / 4);
            for b in self.buckets.iter().filter(|b| b.page != EMPTY) {
                smaller.insert(b.page, b.hit);
            }
            *self = smaller;
        }
    }

    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn matches_a_hash_map_under_churn() {
        let mut h = StartHash::new();
        let mut m = HashMap::new();
        let mut x: u64 = 12345;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = x % 5000;
            if x % 3 == 0 {
                h.remove(page);
                m.remove(&page);
            } else {
                let hit = step;
                h.insert(page, hit);
                m.insert(page, hit);
            }
            if step % 1000 == 0 {
                for p in 0..5000 {
                    assert_eq!(h.get(p), m.get(&p));
                }
            }
        }
        assert_eq!(h.len(), m.len());
    }
}
