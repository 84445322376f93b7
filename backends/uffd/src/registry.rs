//! The registered ranges of a monitor, kept in step with the kernel's view
//! (UNMAP and REMAP events update it), and the dirty log of write-protect
//! tracking.

use std::collections::{BTreeMap, BTreeSet};

use notifier_core::addr::PageRange;
use notifier_core::PAGE_SIZE;

use crate::error::UffdError;

/// How a range is registered: a set of `UFFDIO_REGISTER_MODE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RegisterMode(u8);

impl RegisterMode {
    /// Missing faults: pages never populated are served by the handler
    /// (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE`).
    pub const MISSING: RegisterMode = RegisterMode(1);
    /// Minor faults (memfd/shmem): the page is in the page cache but not
    /// mapped; served with `UFFDIO_CONTINUE`.
    pub const MINOR: RegisterMode = RegisterMode(2);
    /// Write-protect faults, for dirty tracking.
    pub const WP: RegisterMode = RegisterMode(4);
    /// Events only (REMOVE, UNMAP, REMAP), no fault: the kernel's WP mode
    /// on a range that is never write-protected. First touches run at
    /// kernel speed; see the `watch` module.
    pub const EVENTS: RegisterMode = RegisterMode::WP;

    /// Whether every mode of `other` is in `self`.
    pub const fn contains(self, other: RegisterMode) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a mode.
    pub const fn intersects(self, other: RegisterMode) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no mode is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn to_uffd(self) -> userfaultfd::RegisterMode {
        let mut m = userfaultfd::RegisterMode::empty();
        if self.contains(Self::MISSING) {
            m |= userfaultfd::RegisterMode::MISSING;
        }
        if self.contains(Self::MINOR) {
            m |= userfaultfd::RegisterMode::MINOR;
        }
        if self.contains(Self::WP) {
            m |= userfaultfd::RegisterMode::WRITE_PROTECT;
        }
        m
    }
}

impl core::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

impl core::fmt::Debug for RegisterMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [
            (Self::MISSING, "MISSING"),
            (Self::MINOR, "MINOR"),
            (Self::WP, "WP"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(m, _)| self.contains(*m))
            .map(|(_, n)| *n)
            .collect();
        if set.is_empty() {
            f.write_str("NONE")
        } else {
            f.write_str(&set.join("|"))
        }
    }
}

/// One registered range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The range.
    pub range: PageRange,
    /// Its modes.
    pub mode: RegisterMode,
    /// Page offset of `range.start()` inside the original registration
    /// (like a VMA's `vm_pgoff`: kept on split and move, so a fault's page
    /// offset does not change when part of the range is unmapped).
    pub pgoff: u64,
}

/// The registered ranges (non-overlapping, keyed by start) and dirty pages.
#[derive(Default, Debug)]
pub(crate) struct Registry {
    ranges: BTreeMap<u64, (u64, RegisterMode, u64)>,
    /// Pages written since they were last write-protected.
    dirty: BTreeSet<u64>,
}

impl Registry {
    /// The registration containing `addr`.
    pub(crate) fn lookup(&self, addr: u64) -> Option<Registration> {
        let (&s, &(e, mode, pgoff)) = self.ranges.range(..=addr).next_back()?;
        (addr < e).then(|| Registration {
            range: PageRange::from_bounds(s, e).expect("stored ranges are valid"),
            mode,
            pgoff,
        })
    }

    /// The start of the first registration at or after `addr`.
    pub(crate) fn next_start(&self, addr: u64) -> Option<u64> {
        self.ranges.range(addr..).next().map(|(&s, _)| s)
    }

    /// Whether any registration overlaps `[s, e)`.
    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.ranges
            .range(..e)
            .next_back()
            .is_some_and(|(_, &(re, _, _))| re > s)
    }

    /// Whether `[s, e)` is covered by registrations without a gap.
    pub(crate) fn covers(&self, s: u64, e: u64) -> bool {
        let mut at = s;
        while at < e {
            match self.lookup(at) {
                Some(r) => at = r.range.end(),
                None => return false,
            }
        }
        true
    }

    pub(crate) fn insert(&mut self, range: PageRange, mode: RegisterMode) -> Result<(), UffdError> {
        self.insert_at(range, mode, 0)
    }

    fn insert_at(
        &mut self,
        range: PageRange,
        mode: RegisterMode,
        pgoff: u64,
    ) -> Result<(), UffdError> {
        if self.overlaps(range.start(), range.end()) {
            return Err(UffdError::Overlap {
                start: range.start(),
                end: range.end(),
            });
        }
        self.ranges
            .insert(range.start(), (range.end(), mode, pgoff));
        Ok(())
    }

    /// Remove `[s, e)` from the registrations, splitting partially covered
    /// ones; returns the pieces removed.
    pub(crate) fn cut(&mut self, s: u64, e: u64) -> Vec<Registration> {
        let hit: Vec<(u64, u64, RegisterMode, u64)> = self
            .ranges
            .range(..e)
            .rev()
            .take_while(|(_, &(re, _, _))| re > s)
            .map(|(&rs, &(re, m, o))| (rs, re, m, o))
            .collect();
        let mut removed = Vec::with_capacity(hit.len());
        for (rs, re, m, o) in hit {
            self.ranges.remove(&rs);
            if rs < s {
                self.ranges.insert(rs, (s, m, o));
            }
            if re > e {
                self.ranges.insert(e, (re, m, o + (e - rs) / PAGE_SIZE));
            }
            let (cs, ce) = (rs.max(s), re.min(e));
            let pgoff = o + (cs - rs) / PAGE_SIZE;
            removed.push(Registration {
                range: PageRange::from_bounds(cs, ce).expect("non-empty overlap"),
                mode: m,
                pgoff,
            });
        }
        let gone: Vec<u64> = self.dirty.range(s..e).copied().collect();
        for p in gone {
            self.dirty.remove(&p);
        }
        removed.reverse();
        removed
    }

    /// The kernel moved `[from, from + len)` to `to` (mremap): move the
    /// registrations and dirty pages with it.
    pub(crate) fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved_dirty: Vec<u64> = self.dirty.range(from..from + len).copied().collect();
        let pieces = self.cut(from, from + len);
        for p in pieces {
            let ns = to + (p.range.start() - from);
            if let Ok(r) = PageRange::new(ns, p.range.len()) {
                // The destination was unmapped first (UNMAP) so it is free.
                let _ = self.insert_at(r, p.mode, p.pgoff);
            }
        }
        for d in moved_dirty {
            self.dirty.insert(to + (d - from));
        }
    }

    /// The registrations (not the dirty log), for a forked child's monitor.
    pub(crate) fn fork_copy(&self) -> Registry {
        Registry {
            ranges: self.ranges.clone(),
            dirty: BTreeSet::new(),
        }
    }

    pub(crate) fn all(&self) -> Vec<Registration> {
        self.ranges
            .iter()
            .map(|(&s, &(e, mode, pgoff))| Registration {
                range: PageRange::from_bounds(s, e).expect("valid"),
                mode,
                pgoff,
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    pub(crate) fn mark_dirty(&mut self, page: u64) -> bool {
        self.dirty.insert(page & !(PAGE_SIZE - 1))
    }

    #[cfg(test)]
    pub(crate) fn is_dirty(&self, page: u64) -> bool {
        self.dirty.contains(&(page & !(PAGE_SIZE - 1)))
    }

    pub(crate) fn clear_dirty(&mut self, s: u64, e: u64) -> Vec<u64> {
        let pages: Vec<u64> = self.dirty.range(s..e).copied().collect();
        for p in &pages {
            self.dirty.remove(p);
        }
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> PageRange {
        PageRange::from_bounds(s, e).unwrap()
    }

    #[test]
    fn insert_rejects_overlap_and_keeps_existing() {
        let mut g = Registry::default();
        g.insert(r(0x1000, 0x5000), RegisterMode::MISSING).unwrap();
        assert!(matches!(
            g.insert(r(0x4000, 0x6000), RegisterMode::MISSING),
            Err(UffdError::Overlap { .. })
        ));
        assert!(matches!(
            g.insert(r(0x0, 0x2000), RegisterMode::MISSING),
            Err(UffdError::Overlap { .. })
        ));
        g.insert(r(0x5000, 0x6000), RegisterMode::WP).unwrap();
        assert_eq!(g.len(), 2);
        assert!(g.covers(0x1000, 0x6000));
        assert!(!g.covers(0x1000, 0x7000));
    }

    #[test]
    fn cut_splits_and_remap_moves() {
        let mut g = Registry::default();
        g.insert(r(0x10000, 0x20000), RegisterMode::MISSING)
            .unwrap();
        g.mark_dirty(0x13000);
        let cut = g.cut(0x12000, 0x14000);
        assert_eq!(
            cut,
            vec![Registration {
                range: r(0x12000, 0x14000),
                mode: RegisterMode::MISSING,
                pgoff: 2
            }]
        );
        assert!(!g.is_dirty(0x13000));
        assert_eq!(
            g.all().iter().map(|x| x.range).collect::<Vec<_>>(),
            vec![r(0x10000, 0x12000), r(0x14000, 0x20000)]
        );
        g.mark_dirty(0x15000);
        g.remap(0x14000, 0x80000, 0xc000);
        assert_eq!(
            g.all().iter().map(|x| x.range).collect::<Vec<_>>(),
            vec![r(0x10000, 0x12000), r(0x80000, 0x8c000)]
        );
        assert!(g.is_dirty(0x81000));
        assert_eq!(g.lookup(0x8bfff).unwrap().range, r(0x80000, 0x8c000));
        assert_eq!(
            g.lookup(0x8bfff).unwrap().pgoff,
            4,
            "pgoff survives split and move"
        );
        assert!(g.lookup(0x8c000).is_none());
    }
}
