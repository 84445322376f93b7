//! The page table: a 4-level radix tree, 9 bits per level, 4 KiB leaves of
//! 512 atomic PTEs.
//!
//! ```text
//!   addr bits  47..39   38..30   29..21   20..12   11..0
//!              PGD      PUD      PMD      PTE      offset
//! ```
//!
//! Directory slots are `OnceLock<Box<_>>`s: a fault allocates missing tables
//! under the *shared* mmap lock (two racing faults each build a table, one
//! wins, the other's is dropped), and only a holder of the *exclusive* mmap
//! lock (`&mut PageTable`) frees tables. Empty subtrees are `None` and range
//! walks skip them, so unmapping a sparse gigabyte costs in proportion to
//! what is mapped.
//!
//! # Locking
//! Each leaf has its own lock (the kernel's split PTE lock). It orders the
//! check-then-install of the fault path against other faults on the same
//! leaf. Holders of the exclusive mmap lock change PTEs without it (no
//! fault can run). PTE words are atomics, so lock-free readers (`lookup`)
//! see either the old or the new entry, never a torn one.

use std::sync::OnceLock;

use crate::PAGE_SHIFT;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Entries per table.
pub const PTRS_PER_TABLE: usize = 512;
/// Bytes covered by one leaf (2 MiB).
pub const LEAF_SPAN: u64 = (PTRS_PER_TABLE as u64) << PAGE_SHIFT;
/// One past the highest user address (47 bits, as x86-64's `TASK_SIZE`).
pub const TASK_SIZE: u64 = 1 << 47;

/// A last-level table: 512 PTEs and its lock.
pub struct Leaf {
    /// The split PTE lock: see the module's `# Locking`.
    pub(crate) lock: parking_lot::Mutex<()>,
    ptes: [AtomicU64; PTRS_PER_TABLE],
}

impl Leaf {
    fn new() -> Box<Self> {
        Box::new(Self {
            lock: parking_lot::Mutex::new(()),
            ptes: core::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// The PTE word for `addr` (which must lie in this leaf's span).
    #[inline]
    pub fn entry(&self, addr: u64) -> &AtomicU64 {
        &self.ptes[((addr >> PAGE_SHIFT) as usize) & (PTRS_PER_TABLE - 1)]
    }

    fn is_empty(&self) -> bool {
        self.ptes.iter().all(|p| p.load(Ordering::Relaxed) == 0)
    }
}

struct Dir<T> {
    slots: [OnceLock<Box<T>>; PTRS_PER_TABLE],
}

impl<T> Dir<T> {
    fn new() -> Box<Self> {
        Box::new(Self {
            slots: core::array::from_fn(|_| OnceLock::new()),
        })
    }
    fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.get().is_none())
    }
}

type Pmd = Dir<Leaf>;
type Pud = Dir<Pmd>;
type Pgd = Dir<Pud>;

#[inline]
const fn idx(addr: u64, shift: u32) -> usize {
    ((addr >> shift) as usize) & (PTRS_PER_TABLE - 1)
}

const PGD_SHIFT: u32 = 39;
const PUD_SHIFT: u32 = 30;
const PMD_SHIFT: u32 = 21;

/// Memory held by the page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTableMemory {
    /// Leaf tables allocated.
    pub leaves: usize,
    /// Directory tables allocated (PGD included).
    pub dirs: usize,
    /// Bytes of the leaves (512 PTEs and a lock each).
    pub leaf_bytes: usize,
    /// Bytes of the directories (512 slots of 16 bytes each).
    pub dir_bytes: usize,
    /// Bytes of all tables (`size_of` of each, allocator slack excluded).
    pub bytes: usize,
}

/// The radix page table of one address space.
pub struct PageTable {
    pgd: Box<Pgd>,
    leaves: AtomicUsize,
    dirs: AtomicUsize,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTable {
    /// An empty table (just the PGD).
    pub fn new() -> Self {
        Self {
            pgd: Pgd::new(),
            leaves: AtomicUsize::new(0),
            dirs: AtomicUsize::new(1),
        }
    }

    /// The leaf covering `addr`, if allocated.
    #[inline]
    pub fn leaf(&self, addr: u64) -> Option<&Leaf> {
        self.pgd.slots[idx(addr, PGD_SHIFT)].get()?.slots[idx(addr, PUD_SHIFT)]
            .get()?
            .slots[idx(addr, PMD_SHIFT)]
        .get()
        .map(|b| &**b)
    }

    /// The leaf covering `addr`, allocating missing tables (`pte_alloc`).
    /// Safe under the shared mmap lock: racing allocations keep one table.
    #[inline]
    pub fn leaf_alloc(&self, addr: u64) -> &Leaf {
        let pud: &Pud =
            Self::slot_alloc(&self.pgd.slots[idx(addr, PGD_SHIFT)], &self.dirs, Pud::new);
        let pmd = Self::slot_alloc(&pud.slots[idx(addr, PUD_SHIFT)], &self.dirs, Pmd::new);
        Self::slot_alloc(&pmd.slots[idx(addr, PMD_SHIFT)], &self.leaves, Leaf::new)
    }

    #[inline]
    fn slot_alloc<'a, T>(
        slot: &'a OnceLock<Box<T>>,
        count: &AtomicUsize,
        new: fn() -> Box<T>,
    ) -> &'a T {
        if let Some(t) = slot.get() {
            return t;
        }
        if slot.set(new()).is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
        slot.get().expect("slot was just set")
    }

    /// The current raw PTE at `addr` (0 when no table covers it).
    #[inline]
    pub fn get(&self, addr: u64) -> u64 {
        self.leaf(addr)
            .map_or(0, |l| l.entry(addr).load(Ordering::Acquire))
    }

    /// Visit every allocated leaf overlapping `[start, end)` in address
    /// order, with the address of the leaf's first byte. Empty subtrees are
    /// skipped without descending.
    pub fn for_each_leaf(&self, start: u64, end: u64, mut f: impl FnMut(u64, &Leaf)) {
        if start >= end {
            return;
        }
        let last = end - 1;
        for g in idx(start, PGD_SHIFT)..=idx(last, PGD_SHIFT).max(idx(start, PGD_SHIFT)) {
            let gbase = (g as u64) << PGD_SHIFT;
            if gbase > last {
                break;
            }
            let Some(pud) = self.pgd.slots[g].get() else {
                continue;
            };
            let (u0, u1) = sub_range(start, last, gbase, PUD_SHIFT);
            for u in u0..=u1 {
                let ubase = gbase | ((u as u64) << PUD_SHIFT);
                let Some(pmd) = pud.slots[u].get() else {
                    continue;
                };
                let (m0, m1) = sub_range(start, last, ubase, PMD_SHIFT);
                for m in m0..=m1 {
                    if let Some(leaf) = pmd.slots[m].get() {
                        f(ubase | ((m as u64) << PMD_SHIFT), leaf);
                    }
                }
            }
        }
    }

    /// Visit every non-empty PTE in `[start, end)`: `f(addr, entry, raw)`.
    pub fn for_each_entry(&self, start: u64, end: u64, mut f: impl FnMut(u64, &AtomicU64, u64)) {
        self.for_each_leaf(start, end, |base, leaf| {
            let lo = start.max(base);
            let hi = end.min(base + LEAF_SPAN);
            let mut a = lo;
            while a < hi {
                let e = leaf.entry(a);
                let raw = e.load(Ordering::Acquire);
                if raw != 0 {
                    f(a, e, raw);
                }
                a += 1 << PAGE_SHIFT;
            }
        });
    }

    /// Free the tables inside `[start, end)` that hold no entry any more
    /// (`free_pgtables`). Needs the exclusive mmap lock.
    pub fn free_empty(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let last = end - 1;
        let mut freed_leaves = 0;
        let mut freed_dirs = 0;
        for g in idx(start, PGD_SHIFT)..=idx(last, PGD_SHIFT) {
            let gbase = (g as u64) << PGD_SHIFT;
            let gslot = &mut self.pgd.slots[g];
            let Some(pud) = gslot.get_mut() else { continue };
            let (u0, u1) = sub_range(start, last, gbase, PUD_SHIFT);
            for u in u0..=u1 {
                let ubase = gbase | ((u as u64) << PUD_SHIFT);
                let uslot = &mut pud.slots[u];
                let Some(pmd) = uslot.get_mut() else { continue };
                let (m0, m1) = sub_range(start, last, ubase, PMD_SHIFT);
                for m in m0..=m1 {
                    let mslot = &mut pmd.slots[m];
                    if mslot.get().is_some_and(|l| l.is_empty()) {
                        mslot.take();
                        freed_leaves += 1;
                    }
                }
                if pmd.is_empty() {
                    uslot.take();
                    freed_dirs += 1;
                }
            }
            if pud.is_empty() {
                gslot.take();
                freed_dirs += 1;
            }
        }
        self.leaves.fetch_sub(freed_leaves, Ordering::Relaxed);
        self.dirs.fetch_sub(freed_dirs, Ordering::Relaxed);
    }

    /// Free every table (exit).
    pub fn clear(&mut self) {
        self.pgd = Pgd::new();
        self.leaves.store(0, Ordering::Relaxed);
        self.dirs.store(1, Ordering::Relaxed);
    }

    /// Tables held and their bytes.
    pub fn memory(&self) -> PageTableMemory {
        let leaves = self.leaves.load(Ordering::Relaxed);
        let dirs = self.dirs.load(Ordering::Relaxed);
        let leaf_bytes = leaves * core::mem::size_of::<Leaf>();
        let dir_bytes = dirs * core::mem::size_of::<Pmd>();
        PageTableMemory {
            leaves,
            dirs,
            leaf_bytes,
            dir_bytes,
            bytes: leaf_bytes + dir_bytes,
        }
    }
}

/// Indices at level `shift` of the part of `[start, last]` inside the
/// parent table that begins at `base`.
#[inline]
fn sub_range(start: u64, last: u64, base: u64, shift: u32) -> (usize, usize) {
    let span_last = base | ((1u64 << (shift + 9)) - 1);
    let lo = if start > base { idx(start, shift) } else { 0 };
    let hi = if last < span_last {
        idx(last, shift)
    } else {
        PTRS_PER_TABLE - 1
    };
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_walk_and_free() {
        let mut pt = PageTable::new();
        let a = 0x7f00_0000_0000u64;
        let b = a + (1 << 30) + 0x5000;
        pt.leaf_alloc(a).entry(a).store(0x1001, Ordering::Relaxed);
        pt.leaf_alloc(b).entry(b).store(0x2001, Ordering::Relaxed);
        assert_eq!(pt.get(a), 0x1001);
        assert_eq!(pt.get(a + 0x1000), 0);
        let mut seen = Vec::new();
        pt.for_each_entry(a, b + 0x1000, |addr, _, raw| seen.push((addr, raw)));
        assert_eq!(seen, vec![(a, 0x1001), (b, 0x2001)]);
        let m = pt.memory();
        assert_eq!((m.leaves, m.dirs), (2, 1 + 1 + 2));
        pt.leaf(a).unwrap().entry(a).store(0, Ordering::Relaxed);
        pt.free_empty(a, a + LEAF_SPAN);
        assert_eq!(pt.memory().leaves, 1);
        assert!(pt.leaf(a).is_none());
        pt.leaf(b).unwrap().entry(b).store(0, Ordering::Relaxed);
        pt.free_empty(0, TASK_SIZE);
        assert_eq!((pt.memory().leaves, pt.memory().dirs), (0, 1));
    }
}
