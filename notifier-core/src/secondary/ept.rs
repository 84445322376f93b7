//! The external page table: a secondary's own radix table from external
//! addresses to frames, with 4 KiB and 2 MiB entries.
//!
//! Four levels of 512 entries over a 48-bit external space. Tables are
//! created on demand and kept until the table is dropped or
//! [`ExternalPageTable::clear`]ed, so lookups are lock-free: a lookup is
//! four acquire loads. [`ExternalPageTable::map`] calls may run
//! concurrently with each other (a mirror's 4 KiB fault-ins do, under its
//! lock taken for reading); every other writer (`map_huge`, `unmap_range`,
//! ...) must exclude all writers — a mirror calls them under its lock taken
//! for writing, as its invalidate callback does.
//!
//! # Entry encoding (one `u64`)
//!
//! | bits   | meaning |
//! |--------|---------|
//! | 0      | valid |
//! | 1..=2  | permission (`Perm` bits: read, write) |
//! | 3      | huge (a 2 MiB entry at the PMD level) |
//! | 12..   | PFN |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::ext_addr::{ExternalAddress, Perm};
use crate::frame::Pfn;

const VALID: u64 = 1;
const HUGE: u64 = 1 << 3;
const PERM_SHIFT: u32 = 1;
const PFN_SHIFT: u32 = 12;
/// Bytes mapped by a huge entry.
pub const HUGE_SIZE: u64 = 2 << 20;
/// Pages in a huge entry.
pub const HUGE_PAGES: u64 = 512;
const ENTRIES: usize = 512;

/// A translation held by the external page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtEntry {
    /// The frame of the 4 KiB page asked for (inside a huge entry: the base
    /// frame plus the page index).
    pub pfn: Pfn,
    /// Permission.
    pub perm: Perm,
    /// Whether it came from a 2 MiB entry.
    pub huge: bool,
}

#[inline]
fn encode(pfn: Pfn, perm: Perm, huge: bool) -> u64 {
    VALID
        | ((perm.bits() as u64) << PERM_SHIFT)
        | if huge { HUGE } else { 0 }
        | (pfn.0 << PFN_SHIFT)
}

#[inline]
fn decode(e: u64) -> Option<(Pfn, Perm, bool)> {
    if e & VALID == 0 {
        return None;
    }
    Some((
        Pfn(e >> PFN_SHIFT),
        Perm::from_bits((e >> PERM_SHIFT) as u8),
        e & HUGE != 0,
    ))
}

struct Leaf {
    ptes: [AtomicU64; ENTRIES],
}

struct Pmd {
    /// Huge entries (2 MiB), valid when `HUGE` is set.
    huge: [AtomicU64; ENTRIES],
    leaves: [OnceLock<Box<Leaf>>; ENTRIES],
}

struct Upper<T> {
    next: [OnceLock<Box<T>>; ENTRIES],
}

impl<T> Upper<T> {
    fn new() -> Self {
        Self {
            next: core::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// An error of the external page table.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EptError {
    /// The address is beyond the 48-bit external space.
    #[error("external address {0:#x} beyond the 48-bit space")]
    OutOfRange(u64),
    /// A huge entry needs a 2 MiB aligned address and frame.
    #[error("huge entry at {0:#x} is not 2 MiB aligned")]
    Misaligned(u64),
}

/// A secondary's page table over external addresses `A`.
pub struct ExternalPageTable<A: ExternalAddress> {
    root: Upper<Upper<Pmd>>,
    mapped: AtomicU64,
    tables: AtomicU64,
    _a: core::marker::PhantomData<A>,
}

impl<A: ExternalAddress> Default for ExternalPageTable<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: ExternalAddress> core::fmt::Debug for ExternalPageTable<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ExternalPageTable")
            .field("mapped_pages", &self.mapped_pages())
            .field("tables", &self.tables.load(Ordering::Relaxed))
            .finish()
    }
}

#[inline]
fn idx(raw: u64, level: u32) -> usize {
    ((raw >> (12 + 9 * level)) & 511) as usize
}

impl<A: ExternalAddress> ExternalPageTable<A> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            root: Upper::new(),
            mapped: AtomicU64::new(0),
            tables: AtomicU64::new(1),
            _a: core::marker::PhantomData,
        }
    }

    #[inline]
    fn check(raw: u64) -> Result<(), EptError> {
        if raw >> 48 != 0 {
            Err(EptError::OutOfRange(raw))
        } else {
            Ok(())
        }
    }

    #[inline]
    fn pmd(&self, raw: u64) -> Option<&Pmd> {
        let l3 = self.root.next[idx(raw, 3)].get()?;
        l3.next[idx(raw, 2)].get().map(|b| &**b)
    }

    fn pmd_or_create(&self, raw: u64) -> &Pmd {
        let l3 = self.root.next[idx(raw, 3)].get_or_init(|| {
            self.tables.fetch_add(1, Ordering::Relaxed);
            Box::new(Upper::new())
        });
        l3.next[idx(raw, 2)].get_or_init(|| {
            self.tables.fetch_add(1, Ordering::Relaxed);
            Box::new(Pmd {
                huge: core::array::from_fn(|_| AtomicU64::new(0)),
                leaves: core::array::from_fn(|_| OnceLock::new()),
            })
        })
    }

    /// The translation of the page at `addr`. Lock-free.
    #[inline]
    pub fn lookup(&self, addr: A) -> Option<ExtEntry> {
        let raw = addr.raw();
        let pmd = self.pmd(raw)?;
        let i1 = idx(raw, 1);
        if let Some((pfn, perm, true)) = decode(pmd.huge[i1].load(Ordering::Acquire)) {
            return Some(ExtEntry {
                pfn: Pfn(pfn.0 + idx(raw, 0) as u64),
                perm,
                huge: true,
            });
        }
        let leaf = pmd.leaves[i1].get()?;
        decode(leaf.ptes[idx(raw, 0)].load(Ordering::Acquire)).map(|(pfn, perm, _)| ExtEntry {
            pfn,
            perm,
            huge: false,
        })
    }

    /// Map the 4 KiB page at `addr`. Replaces a previous 4 KiB entry; a huge
    /// entry covering `addr` is split first.
    ///
    /// # Locking
    /// May run concurrently with other `map` calls (each entry is one
    /// atomic swap; tables are created once). Two concurrent maps of one
    /// page, or a map and another's split of the huge entry over it, leave
    /// one of the translations written: callers must only write
    /// translations that are all current (a mirror's fault-ins that passed
    /// `read_retry` under one sequence). Must not run concurrently with the
    /// other writers.
    pub fn map(&self, addr: A, pfn: Pfn, perm: Perm) -> Result<(), EptError> {
        let raw = addr.raw();
        Self::check(raw)?;
        let pmd = self.pmd_or_create(raw);
        let i1 = idx(raw, 1);
        self.split_huge(pmd, i1);
        let leaf = pmd.leaves[i1].get_or_init(|| {
            self.tables.fetch_add(1, Ordering::Relaxed);
            Box::new(Leaf {
                ptes: core::array::from_fn(|_| AtomicU64::new(0)),
            })
        });
        let old = leaf.ptes[idx(raw, 0)].swap(encode(pfn, perm, false), Ordering::Release);
        if old & VALID == 0 {
            self.mapped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Map a 2 MiB entry at `addr` (aligned) to the contiguous frames
    /// starting at `pfn` (aligned to 512). 4 KiB entries underneath are
    /// dropped.
    ///
    /// # Locking
    /// Writers must be serialised by the caller.
    pub fn map_huge(&self, addr: A, pfn: Pfn, perm: Perm) -> Result<(), EptError> {
        let raw = addr.raw();
        Self::check(raw)?;
        if raw % HUGE_SIZE != 0 || pfn.0 % HUGE_PAGES != 0 {
            return Err(EptError::Misaligned(raw));
        }
        let pmd = self.pmd_or_create(raw);
        let i1 = idx(raw, 1);
        if let Some(leaf) = pmd.leaves[i1].get() {
            for p in &leaf.ptes {
                if p.swap(0, Ordering::Release) & VALID != 0 {
                    self.mapped.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let old = pmd.huge[i1].swap(encode(pfn, perm, true), Ordering::Release);
        if old & VALID != 0 {
            self.mapped.fetch_sub(HUGE_PAGES, Ordering::Relaxed);
        }
        self.mapped.fetch_add(HUGE_PAGES, Ordering::Relaxed);
        Ok(())
    }

    /// Replace a huge entry by 512 equivalent 4 KiB entries.
    fn split_huge(&self, pmd: &Pmd, i1: usize) {
        let Some((pfn, perm, true)) = decode(pmd.huge[i1].load(Ordering::Acquire)) else {
            return;
        };
        let leaf = pmd.leaves[i1].get_or_init(|| {
            self.tables.fetch_add(1, Ordering::Relaxed);
            Box::new(Leaf {
                ptes: core::array::from_fn(|_| AtomicU64::new(0)),
            })
        });
        for (i, p) in leaf.ptes.iter().enumerate() {
            p.store(
                encode(Pfn(pfn.0 + i as u64), perm, false),
                Ordering::Release,
            );
        }
        pmd.huge[i1].store(0, Ordering::Release);
    }

    /// Remove the translations of `[start, end)`, or only their write
    /// permission when `keep_readable`. Calls `flushed(addr, bytes)` for
    /// each entry that was valid (4 KiB or 2 MiB) (the caller batches TLB flushes with it). Returns the
    /// number of pages affected.
    ///
    /// # Locking
    /// Writers must be serialised by the caller.
    pub fn unmap_range(
        &self,
        start: A,
        end: A,
        keep_readable: bool,
        mut flushed: impl FnMut(u64, u64),
    ) -> u64 {
        let (mut raw, end) = (start.raw() & !0xfff, end.raw());
        let mut n = 0;
        let mut removed = 0;
        while raw < end {
            let next_pmd_entry = (raw | (HUGE_SIZE - 1)).saturating_add(1);
            let Some(l3) = self.root.next[idx(raw, 3)].get() else {
                // Skip the whole empty 512 GiB region.
                raw = (raw | ((1 << 39) - 1)).saturating_add(1);
                continue;
            };
            let Some(pmd) = l3.next[idx(raw, 2)].get() else {
                // Skip the whole empty 1 GiB region.
                raw = (raw | ((1 << 30) - 1)).saturating_add(1);
                continue;
            };
            let i1 = idx(raw, 1);
            if pmd.huge[i1].load(Ordering::Acquire) & VALID != 0 {
                if raw % HUGE_SIZE == 0 && next_pmd_entry <= end {
                    // Whole huge entry.
                    let e = pmd.huge[i1].load(Ordering::Acquire);
                    if keep_readable {
                        let (pfn, perm, _) = decode(e).expect("valid");
                        pmd.huge[i1].store(
                            encode(pfn, Perm::from_bits(perm.bits() & 1), true),
                            Ordering::Release,
                        );
                    } else {
                        pmd.huge[i1].store(0, Ordering::Release);
                        removed += HUGE_PAGES;
                    }
                    flushed(raw, HUGE_SIZE);
                    n += HUGE_PAGES;
                    raw = next_pmd_entry;
                    continue;
                }
                self.split_huge(pmd, i1);
            }
            let stop = next_pmd_entry.min(end);
            if let Some(leaf) = pmd.leaves[i1].get() {
                while raw < stop {
                    let p = &leaf.ptes[idx(raw, 0)];
                    let e = p.load(Ordering::Acquire);
                    if e & VALID != 0 {
                        if keep_readable {
                            p.store(e & !(2 << PERM_SHIFT), Ordering::Release);
                        } else {
                            p.store(0, Ordering::Release);
                            removed += 1;
                        }
                        flushed(raw, 4096);
                        n += 1;
                    }
                    raw += 4096;
                }
            }
            raw = stop;
        }
        if removed != 0 {
            self.mapped.fetch_sub(removed, Ordering::Relaxed);
        }
        n
    }

    /// Pages currently mapped (a huge entry counts 512).
    pub fn mapped_pages(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Bytes of tables allocated.
    pub fn table_bytes(&self) -> u64 {
        // Upper tables and leaves are 512 slots of 8 or 16 bytes; a PMD has
        // both huge entries and leaf slots. Approximate with 8 KiB per table.
        self.tables.load(Ordering::Relaxed) * 8192
    }

    /// Drop everything.
    pub fn clear(&mut self) {
        self.root = Upper::new();
        self.mapped.store(0, Ordering::Relaxed);
        self.tables.store(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secondary::ext_addr::Iova;

    #[test]
    fn map_lookup_unmap() {
        let t = ExternalPageTable::<Iova>::new();
        assert_eq!(t.lookup(Iova(0x1000)), None);
        t.map(Iova(0x1000), Pfn(7), Perm::READ_WRITE).unwrap();
        assert_eq!(
            t.lookup(Iova(0x1000)),
            Some(ExtEntry {
                pfn: Pfn(7),
                perm: Perm::READ_WRITE,
                huge: false
            })
        );
        let mut seen = vec![];
        assert_eq!(
            t.unmap_range(Iova(0), Iova(0x10000), true, |a, _| seen.push(a)),
            1
        );
        assert_eq!(t.lookup(Iova(0x1000)).unwrap().perm, Perm::READ);
        assert_eq!(
            t.unmap_range(Iova(0), Iova(0x10000), false, |a, _| seen.push(a)),
            1
        );
        assert_eq!(t.lookup(Iova(0x1000)), None);
        assert_eq!(seen, vec![0x1000, 0x1000]);
        assert_eq!(t.mapped_pages(), 0);
        assert_eq!(
            t.map(Iova(1 << 48), Pfn(1), Perm::READ),
            Err(EptError::OutOfRange(1 << 48))
        );
    }

    #[test]
    fn huge_entries_split_on_partial_unmap() {
        let t = ExternalPageTable::<Iova>::new();
        assert_eq!(
            t.map_huge(Iova(0x1000), Pfn(0), Perm::READ),
            Err(EptError::Misaligned(0x1000))
        );
        t.map_huge(Iova(HUGE_SIZE), Pfn(1024), Perm::READ_WRITE)
            .unwrap();
        assert_eq!(
            t.lookup(Iova(HUGE_SIZE + 0x5000)).unwrap(),
            ExtEntry {
                pfn: Pfn(1029),
                perm: Perm::READ_WRITE,
                huge: true
            }
        );
        assert_eq!(t.mapped_pages(), 512);
        let n = t.unmap_range(
            Iova(HUGE_SIZE + 0x5000),
            Iova(HUGE_SIZE + 0x7000),
            false,
            |_, _| {},
        );
        assert_eq!(n, 2);
        assert_eq!(t.lookup(Iova(HUGE_SIZE + 0x5000)), None);
        assert_eq!(t.lookup(Iova(HUGE_SIZE + 0x7000)).unwrap().pfn, Pfn(1031));
        assert_eq!(t.mapped_pages(), 510);
        // Whole-entry unmap of a huge mapping counts 512 pages at once.
        t.map_huge(Iova(2 * HUGE_SIZE), Pfn(2048), Perm::READ)
            .unwrap();
        assert_eq!(
            t.unmap_range(Iova(2 * HUGE_SIZE), Iova(3 * HUGE_SIZE), false, |_, _| {}),
            512
        );
    }

    #[test]
    fn empty_regions_are_skipped() {
        let t = ExternalPageTable::<Iova>::new();
        t.map(Iova(0x7fff_0000_0000), Pfn(1), Perm::READ).unwrap();
        assert_eq!(
            t.unmap_range(Iova(0), Iova(0x7fff_ffff_f000), false, |_, _| {}),
            1
        );
    }
}
