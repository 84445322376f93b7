//! What an invalidation announces: the range, why, and whether the caller
//! may sleep.

use crate::addr::{PageRange, RangeError};

/// Why a range is being invalidated (the kernel's `enum mmu_notifier_event`).
///
/// Secondaries use it to be smarter than "drop everything": a
/// [`Event::ProtectionPage`] downgrade can keep read-only entries, a
/// [`Event::SoftDirty`] only needs write permission removed, a
/// [`Event::Release`] can skip per-range work because the whole address
/// space goes away.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// The range is unmapped (`munmap`, `mremap` source, `MAP_FIXED` over).
    Unmap,
    /// PTEs are cleared but the mapping stays (`madvise(DONTNEED)`, reclaim,
    /// nonlinear repopulation, COW break).
    Clear,
    /// The protection of a VMA changes (`mprotect`).
    ProtectionVma,
    /// The protection of single pages changes (write-protect for COW, KSM).
    ProtectionPage,
    /// Soft-dirty tracking write-protects the range.
    SoftDirty,
    /// The whole address space is being torn down (`exit`).
    Release,
    /// Pages move to other frames (`migrate`).
    Migrate,
    /// Pages become exclusive to a device.
    Exclusive,
}

impl Event {
    /// Every event, for tables and tests.
    pub const ALL: [Event; 8] = [
        Event::Unmap,
        Event::Clear,
        Event::ProtectionVma,
        Event::ProtectionPage,
        Event::SoftDirty,
        Event::Release,
        Event::Migrate,
        Event::Exclusive,
    ];

    /// Short lowercase name, stable for CLI and JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Event::Unmap => "unmap",
            Event::Clear => "clear",
            Event::ProtectionVma => "protection_vma",
            Event::ProtectionPage => "protection_page",
            Event::SoftDirty => "soft_dirty",
            Event::Release => "release",
            Event::Migrate => "migrate",
            Event::Exclusive => "exclusive",
        }
    }

    /// Whether a read-only translation of a page stays valid through this
    /// event (only write permission is being taken away).
    pub const fn keeps_readable(self) -> bool {
        matches!(self, Event::ProtectionPage | Event::SoftDirty)
    }
}

/// One invalidation: the kernel's `struct mmu_notifier_range`.
///
/// Built only from a checked [`PageRange`] ([`InvalidateRange::new`] or
/// [`InvalidateRange::from_bounds`]), so `start < end`, both page aligned,
/// holds in every build; the fields are read through accessors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidateRange {
    range: PageRange,
    event: Event,
    blockable: bool,
}

impl InvalidateRange {
    /// A blockable invalidation of `range`.
    #[inline]
    pub const fn new(range: PageRange, event: Event) -> Self {
        Self {
            range,
            event,
            blockable: true,
        }
    }

    /// A blockable invalidation of `[start, end)`.
    ///
    /// # Errors
    /// [`RangeError`] for an empty, misaligned or wrapping range.
    #[inline]
    pub fn from_bounds(start: u64, end: u64, event: Event) -> Result<Self, RangeError> {
        Ok(Self::new(PageRange::from_bounds(start, end)?, event))
    }

    /// The same invalidation in a context that may not sleep (the OOM
    /// reaper's case).
    #[inline]
    pub const fn non_blocking(mut self) -> Self {
        self.blockable = false;
        self
    }

    /// First byte (page aligned).
    #[inline]
    pub const fn start(&self) -> u64 {
        self.range.start()
    }

    /// One past the last byte (page aligned, greater than `start`).
    #[inline]
    pub const fn end(&self) -> u64 {
        self.range.end()
    }

    /// Why.
    #[inline]
    pub const fn event(&self) -> Event {
        self.event
    }

    /// Whether subscribers may sleep. When false a subscriber that would
    /// have to block answers [`Again`] instead.
    #[inline]
    pub const fn blockable(&self) -> bool {
        self.blockable
    }

    /// Whether `[start, end)` shares a byte with this range.
    #[inline]
    pub const fn overlaps(&self, start: u64, end: u64) -> bool {
        self.range.overlaps(start, end)
    }

    /// The range as a [`PageRange`].
    #[inline]
    pub const fn page_range(&self) -> PageRange {
        self.range
    }
}

/// A subscriber's answer when it would have to block in a non-blockable
/// invalidation (the kernel's `-EAGAIN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("subscriber would block in a non-blockable invalidation")]
pub struct Again;
