//! The range-notifier subscriber trait (the mature form of seed 003's pte
//! notifiers: the kernel's `struct mmu_notifier_ops`).

use super::range::{Again, InvalidateRange};

/// Which hooks a subscriber implements. The dispatcher calls only these, so
/// an unused hook costs nothing, and registration rejects contradictory sets.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Hooks(u16);

impl Hooks {
    /// No hooks.
    pub const NONE: Hooks = Hooks(0);
    /// `invalidate_range_start`.
    pub const START: Hooks = Hooks(1 << 0);
    /// `invalidate_range_end`.
    pub const END: Hooks = Hooks(1 << 1);
    /// The per-PTE `clear`, called before a present PTE is cleared.
    pub const CLEAR: Hooks = Hooks(1 << 2);
    /// `clear_flush_young`, `clear_young`, `test_young`.
    pub const AGING: Hooks = Hooks(1 << 3);
    /// `invalidate_secondary_tlbs`: for secondaries that share the primary's
    /// page tables and only cache translations in a TLB (IOMMU SVA). Such a
    /// subscriber may not also have `START`/`END`.
    pub const TLB: Hooks = Hooks(1 << 4);
    /// `release`.
    pub const RELEASE: Hooks = Hooks(1 << 5);
    /// `invalidate_range_start` may answer [`Again`] when not blockable. A
    /// subscriber that may refuse cannot know whether its start "counted", so
    /// it may not have `END` (the kernel's rule in `mn_hlist_invalidate_range_start`).
    pub const MAY_REFUSE: Hooks = Hooks(1 << 6);
    /// `START | END`.
    pub const START_END: Hooks = Hooks(Self::START.0 | Self::END.0);

    /// Whether every hook of `other` is in `self`.
    #[inline]
    pub const fn contains(self, other: Hooks) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether any hook of `other` is in `self`.
    #[inline]
    pub const fn intersects(self, other: Hooks) -> bool {
        self.0 & other.0 != 0
    }
    /// The union.
    #[inline]
    pub const fn union(self, other: Hooks) -> Hooks {
        Hooks(self.0 | other.0)
    }
}

impl core::ops::BitOr for Hooks {
    type Output = Hooks;
    fn bitor(self, rhs: Hooks) -> Hooks {
        self.union(rhs)
    }
}

impl core::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: [&str; 7] = [
            "START",
            "END",
            "CLEAR",
            "AGING",
            "TLB",
            "RELEASE",
            "MAY_REFUSE",
        ];
        let mut first = true;
        for (i, n) in NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(n)?;
                first = false;
            }
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

/// A range-notifier subscriber: a secondary MMU that hears about every
/// change of the primary's page table.
///
/// Every hook has a no-op default; [`MmuNotifierOps::hooks`] says which ones
/// are real. Hooks run on the thread that changes the primary, without any
/// lock of the notifier machinery held, so they may take their own locks and
/// (when [`InvalidateRange::blockable`]) sleep. They must not call back into
/// the same primary's mutating operations.
///
/// # Pairing
/// For each invalidation, `invalidate_range_start` returns before any PTE of
/// the range changes; `invalidate_range_end` runs after the change and after
/// the primary's own TLB flush, and before any frame that was mapped in the
/// range is freed or reused. A subscriber registered while an invalidation is
/// in flight sees neither half of it (registration waits it out).
pub trait MmuNotifierOps: Send + Sync {
    /// Which hooks are implemented.
    fn hooks(&self) -> Hooks;

    /// The range is about to change. After this returns the subscriber must
    /// not create new translations for the range until the matching end.
    ///
    /// May answer [`Again`] only when `!range.blockable` and the subscriber
    /// declared [`Hooks::MAY_REFUSE`].
    fn invalidate_range_start(&self, range: &InvalidateRange) -> Result<(), Again> {
        let _ = range;
        Ok(())
    }

    /// The change of the range is complete.
    fn invalidate_range_end(&self, range: &InvalidateRange) {
        let _ = range;
    }

    /// Seed 003's per-PTE `clear`: the present PTE at `addr` is about to be
    /// cleared (reclaim's `try_to_unmap_one` calls it before
    /// `ptep_clear_flush`). Always inside a start/end bracket.
    fn clear(&self, addr: u64) {
        let _ = addr;
    }

    /// Age the secondary's accessed bits in `[start, end)` and flush; true if
    /// any was young.
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        false
    }

    /// Like [`Self::clear_flush_young`] without the flush.
    fn clear_young(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        false
    }

    /// Whether the page at `addr` is young in the secondary.
    fn test_young(&self, addr: u64) -> bool {
        let _ = addr;
        false
    }

    /// The primary flushed its TLB for `[start, end)`; a secondary sharing
    /// the primary's tables flushes its own TLB now.
    fn invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        let _ = (start, end);
    }

    /// The address space goes away. Called once; no callback runs after it
    /// returns.
    fn release(&self) {}
}

impl<T: MmuNotifierOps + ?Sized> MmuNotifierOps for std::sync::Arc<T> {
    fn hooks(&self) -> Hooks {
        (**self).hooks()
    }
    fn invalidate_range_start(&self, range: &InvalidateRange) -> Result<(), Again> {
        (**self).invalidate_range_start(range)
    }
    fn invalidate_range_end(&self, range: &InvalidateRange) {
        (**self).invalidate_range_end(range)
    }
    fn clear(&self, addr: u64) {
        (**self).clear(addr)
    }
    fn clear_flush_young(&self, start: u64, end: u64) -> bool {
        (**self).clear_flush_young(start, end)
    }
    fn clear_young(&self, start: u64, end: u64) -> bool {
        (**self).clear_young(start, end)
    }
    fn test_young(&self, addr: u64) -> bool {
        (**self).test_young(addr)
    }
    fn invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        (**self).invalidate_secondary_tlbs(start, end)
    }
    fn release(&self) {
        (**self).release()
    }
}

/// The interval-notifier subscriber trait (the kernel's
/// `struct mmu_interval_notifier_ops`).
pub trait IntervalNotifierOps: Send + Sync {
    /// An invalidation overlaps the subscription. The subscriber takes the
    /// lock that guards its external page table, calls
    /// [`IntervalNotifier::set_seq`](super::IntervalNotifier::set_seq) with
    /// `cur_seq`, removes its translations of the range, and unlocks.
    ///
    /// Answers [`Again`] only when `!range.blockable` and it would block.
    fn invalidate(
        &self,
        sub: &super::IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again>;

    /// The address space was released. Called at most once.
    fn release(&self, sub: &super::IntervalNotifier) {
        let _ = sub;
    }
}
