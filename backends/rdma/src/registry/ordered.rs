//! The ordered index of cached regions: a map from start address to value
//! kept as a sorted list of sorted blocks of at most [`B`] entries (a
//! two-level "tiered vector").
//!
//! Why not `BTreeMap`: at tens of thousands of regions its insert, remove
//! and predecessor search each walk four or five nodes of eleven keys with
//! a cache miss per level, and sequential inserts leave its leaves half
//! full. Here a lookup is one binary search over the block minima (8 bytes
//! per block, dense) and one inside a block; an insert or remove moves at
//! most a block's tail; an append past the last key starts a new block
//! instead of splitting, so sequential registration leaves full blocks.

use core::cell::Cell;

/// Entries per block.
const B: usize = 64;

/// A sorted map from `u64` keys to `V`.
pub(crate) struct SortedBlocks<V> {
    /// First key of each block, ascending.
    mins: Vec<u64>,
    /// Non-empty blocks, each sorted, keys between their `mins` and the next.
    blocks: Vec<Vec<(u64, V)>>,
    len: usize,
    /// The block of the last lookup (a finger: registrations tend to be
    /// near each other, so the next lookup usually lands in it).
    finger: Cell<usize>,
    /// The allocation of the last block that emptied (capacity 0 when
    /// none), reused by the next new block: a registry that goes between
    /// zero and one region does not allocate a block each time.
    spare: Vec<(u64, V)>,
}

impl<V> Default for SortedBlocks<V> {
    fn default() -> Self {
        Self {
            mins: Vec::new(),
            blocks: Vec::new(),
            len: 0,
            finger: Cell::new(0),
            spare: Vec::new(),
        }
    }
}

impl<V> SortedBlocks<V> {
    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.mins.capacity() * 8
            + self.spare.capacity() * core::mem::size_of::<(u64, V)>()
            + self.blocks.capacity() * core::mem::size_of::<Vec<(u64, V)>>()
            + self
                .blocks
                .iter()
                .map(|b| b.capacity() * core::mem::size_of::<(u64, V)>())
                .sum::<usize>()
    }

    /// Index of the block that holds or would hold `key`.
    #[inline]
    fn block_of(&self, key: u64) -> usize {
        let f = self.finger.get();
        let n = self.mins.len();
        if f < n && self.mins[f] <= key && (f + 1 == n || self.mins[f + 1] > key) {
            return f;
        }
        let b = self.mins.partition_point(|&m| m <= key).saturating_sub(1);
        self.finger.set(b);
        b
    }

    /// An empty block: the spare allocation if any.
    #[inline]
    fn new_block(&mut self) -> Vec<(u64, V)> {
        if self.spare.capacity() != 0 {
            core::mem::take(&mut self.spare)
        } else {
            Vec::with_capacity(B)
        }
    }

    /// Insert or replace; returns the old value.
    pub(crate) fn insert(&mut self, key: u64, v: V) -> Option<V> {
        if self.blocks.is_empty() {
            let mut blk = self.new_block();
            blk.push((key, v));
            self.blocks.push(blk);
            self.mins.push(key);
            self.len = 1;
            return None;
        }
        let mut b = self.block_of(key);
        let blk = &self.blocks[b];
        // Appending past a block's last key is the common case.
        let pos = if blk[blk.len() - 1].0 < key {
            blk.len()
        } else {
            blk.partition_point(|e| e.0 < key)
        };
        if pos < self.blocks[b].len() && self.blocks[b][pos].0 == key {
            return Some(core::mem::replace(&mut self.blocks[b][pos].1, v));
        }
        let mut pos = pos;
        if self.blocks[b].len() == B {
            if pos == B {
                // Past the block's last key: start a new block (sequential
                // inserts keep full blocks).
                let mut blk = self.new_block();
                blk.push((key, v));
                self.blocks.insert(b + 1, blk);
                self.mins.insert(b + 1, key);
                self.len += 1;
                return None;
            }
            let mut upper = self.new_block();
            upper.extend(self.blocks[b].drain(B / 2..));
            self.mins.insert(b + 1, upper[0].0);
            self.blocks.insert(b + 1, upper);
            if pos > B / 2 {
                b += 1;
                pos -= B / 2;
            }
        }
        let blk = &mut self.blocks[b];
        if pos == blk.len() {
            // An append (the first key is unchanged): no move, no min update.
            blk.push((key, v));
        } else {
            blk.insert(pos, (key, v));
            self.mins[b] = blk[0].0;
        }
        self.len += 1;
        None
    }

    /// Remove `key`; returns its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        if self.blocks.is_empty() {
            return None;
        }
        let b = self.block_of(key);
        let blk = &mut self.blocks[b];
        let pos = blk.partition_point(|e| e.0 < key);
        if pos >= blk.len() || blk[pos].0 != key {
            return None;
        }
        // The newest region is the common one to go: no move for the last.
        let (_, v) = if pos + 1 == blk.len() {
            blk.pop().expect("non-empty")
        } else {
            blk.remove(pos)
        };
        self.len -= 1;
        if blk.is_empty() {
            self.drop_block(b);
        } else {
            self.mins[b] = blk[0].0;
            // Fold a small block into its successor's room to bound waste.
            if blk.len() < B / 4 && b + 1 < self.blocks.len() {
                let next = self.blocks[b + 1].len();
                if self.blocks[b].len() + next <= B {
                    let moved = self.blocks.remove(b + 1);
                    self.mins.remove(b + 1);
                    self.blocks[b].extend(moved);
                }
            }
        }
        Some(v)
    }

    /// Remove every entry with `lo <= key < hi`; returns how many.
    pub(crate) fn remove_range(&mut self, lo: u64, hi: u64) -> usize {
        if self.blocks.is_empty() || lo >= hi {
            return 0;
        }
        let mut b = self.block_of(lo);
        let mut removed = 0;
        while b < self.blocks.len() {
            let blk = &mut self.blocks[b];
            let len = blk.len();
            let from = blk.partition_point(|e| e.0 < lo);
            let to = from + blk[from..].partition_point(|e| e.0 < hi);
            if to == len {
                blk.truncate(from);
            } else {
                blk.drain(from..to);
            }
            removed += to - from;
            if blk.is_empty() {
                self.drop_block(b);
                continue;
            }
            self.mins[b] = blk[0].0;
            if to < len {
                // Keys at or past `hi` remain: nothing further is in range.
                break;
            }
            b += 1;
        }
        self.len -= removed;
        removed
    }

    /// Remove the entries of `keys` (ascending, each present at most once;
    /// absent keys are skipped) in one pass over the blocks they fall in;
    /// returns how many were removed.
    pub(crate) fn remove_sorted(&mut self, keys: &[u64]) -> usize {
        debug_assert!(keys.windows(2).all(|w| w[0] < w[1]));
        let mut removed = 0;
        let mut i = 0;
        while i < keys.len() && !self.blocks.is_empty() {
            let b = self.block_of(keys[i]);
            let hi = self.mins.get(b + 1).copied().unwrap_or(u64::MAX);
            // `block_of` put keys[i] below the next block's minimum.
            let j = i + keys[i..].partition_point(|&k| k < hi).max(1);
            let ks = &keys[i..j];
            let blk = &mut self.blocks[b];
            let before = blk.len();
            let mut p = 0;
            blk.retain(|e| {
                while p < ks.len() && ks[p] < e.0 {
                    p += 1;
                }
                !(p < ks.len() && ks[p] == e.0)
            });
            removed += before - blk.len();
            if blk.is_empty() {
                self.drop_block(b);
            } else {
                self.mins[b] = blk[0].0;
            }
            i = j;
        }
        self.len -= removed;
        removed
    }

    /// Remove the (empty) block `b`, keeping its allocation as the spare.
    fn drop_block(&mut self, b: usize) {
        let old = if b + 1 == self.blocks.len() {
            self.mins.pop();
            self.blocks.pop().expect("block b")
        } else {
            self.mins.remove(b);
            self.blocks.remove(b)
        };
        if self.spare.capacity() == 0 {
            self.spare = old;
        }
    }

    /// Entries with key `<= key`, descending.
    #[inline]
    pub(crate) fn rev_upto(&self, key: u64) -> RevIter<'_, V> {
        if self.blocks.is_empty() || self.mins[0] > key {
            return RevIter {
                map: self,
                b: 0,
                i: 0,
            };
        }
        let b = self.block_of(key);
        let blk = &self.blocks[b];
        let i = if blk[blk.len() - 1].0 <= key {
            blk.len()
        } else {
            blk.partition_point(|e| e.0 <= key)
        };
        RevIter { map: self, b, i }
    }

    /// Entries with key `< key`, descending.
    #[inline]
    pub(crate) fn rev_below(&self, key: u64) -> RevIter<'_, V> {
        match key.checked_sub(1) {
            Some(k) => self.rev_upto(k),
            None => RevIter {
                map: self,
                b: 0,
                i: 0,
            },
        }
    }

    /// Remove every entry.
    pub(crate) fn clear(&mut self) {
        self.blocks.clear();
        self.mins.clear();
        self.len = 0;
    }

    /// All values, ascending.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.blocks.iter().flat_map(|b| b.iter().map(|e| &e.1))
    }
}

/// Descending iterator (see [`SortedBlocks::rev_upto`]).
pub(crate) struct RevIter<'a, V> {
    map: &'a SortedBlocks<V>,
    /// Current block; entries `[0, i)` of it remain.
    b: usize,
    i: usize,
}

impl<'a, V> Iterator for RevIter<'a, V> {
    type Item = (u64, &'a V);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        while self.i == 0 {
            if self.b == 0 {
                return None;
            }
            self.b -= 1;
            self.i = self.map.blocks[self.b].len();
        }
        self.i -= 1;
        let e = &self.map.blocks[self.b][self.i];
        Some((e.0, &e.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn matches_a_btree_map_under_churn() {
        let mut s = SortedBlocks::default();
        let mut m = BTreeMap::new();
        let mut x: u64 = 99;
        for step in 0..100_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = if step % 4 == 0 {
                u64::from(step) + 10_000
            } else {
                x % 3000
            };
            if x % 67 == 0 {
                // A sorted batch of keys, present or not.
                let mut batch: Vec<u64> = (0..(x % 40)).map(|d| (key + d * 7) % 3100).collect();
                batch.sort_unstable();
                batch.dedup();
                let present = batch.iter().filter(|&&k| m.remove(&k).is_some()).count();
                assert_eq!(s.remove_sorted(&batch), present);
            } else if x % 61 == 0 {
                let hi = key + x % 200;
                let want: Vec<u64> = m.range(key..hi).map(|(k, _)| *k).collect();
                for k in &want {
                    m.remove(k);
                }
                assert_eq!(s.remove_range(key, hi), want.len());
            } else if x % 3 == 0 {
                assert_eq!(s.remove(key), m.remove(&key));
            } else {
                assert_eq!(s.insert(key, step), m.insert(key, step));
            }
            if step % 997 == 0 {
                assert_eq!(s.len(), m.len());
                for probe in [0, 1, 1500, 2999, 3000, 20_000, 200_000, u64::MAX] {
                    let a: Vec<_> = s.rev_upto(probe).map(|(k, v)| (k, *v)).collect();
                    let b: Vec<_> = m.range(..=probe).rev().map(|(k, v)| (*k, *v)).collect();
                    assert_eq!(a, b);
                    let a: Vec<_> = s.rev_below(probe).map(|(k, _)| k).collect();
                    let b: Vec<_> = m.range(..probe).rev().map(|(k, _)| *k).collect();
                    assert_eq!(a, b);
                }
                assert!(s.values().copied().eq(m.values().copied()));
            }
        }
    }
}
