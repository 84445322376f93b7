//! Errors of the notifier machinery.

use crate::addr::RangeError;

/// A subscriber callback, named after the kernel's `mmu_notifier_ops`
/// member (or `mmu_interval_notifier_ops::invalidate`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `invalidate_range_start` of a range subscriber.
    InvalidateRangeStart,
    /// `invalidate` of an interval subscriber.
    Invalidate,
    /// The per-PTE `clear`.
    Clear,
    /// `invalidate_secondary_tlbs`.
    InvalidateSecondaryTlbs,
    /// `invalidate_range_end`.
    InvalidateRangeEnd,
    /// `clear_flush_young`.
    ClearFlushYoung,
    /// `clear_young`.
    ClearYoung,
    /// `test_young`.
    TestYoung,
    /// `release` (range or interval subscriber).
    Release,
}

impl Hook {
    /// The kernel's name of the callback.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::InvalidateRangeStart => "invalidate_range_start",
            Hook::Invalidate => "invalidate",
            Hook::Clear => "clear",
            Hook::InvalidateSecondaryTlbs => "invalidate_secondary_tlbs",
            Hook::InvalidateRangeEnd => "invalidate_range_end",
            Hook::ClearFlushYoung => "clear_flush_young",
            Hook::ClearYoung => "clear_young",
            Hook::TestYoung => "test_young",
            Hook::Release => "release",
        }
    }

    /// Whether the hook runs before the primary changes anything (a panic
    /// there aborts the operation: nothing changed).
    pub const fn before_change(self) -> bool {
        matches!(self, Hook::InvalidateRangeStart | Hook::Invalidate)
    }

    pub(crate) const ALL: [Hook; 9] = [
        Hook::InvalidateRangeStart,
        Hook::Invalidate,
        Hook::Clear,
        Hook::InvalidateSecondaryTlbs,
        Hook::InvalidateRangeEnd,
        Hook::ClearFlushYoung,
        Hook::ClearYoung,
        Hook::TestYoung,
        Hook::Release,
    ];

    pub(crate) fn code(self) -> u8 {
        Self::ALL.iter().position(|h| *h == self).unwrap_or(0) as u8 + 1
    }

    pub(crate) fn from_code(c: u8) -> Option<Hook> {
        Self::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }
}

impl core::fmt::Display for Hook {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// An error of subscribing, unsubscribing or invalidating.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The range argument is bad.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// A subscriber refused a non-blockable invalidation; subscribers that
    /// had accepted were ended, nothing is half done.
    #[error("a subscriber refused a non-blockable invalidation")]
    Again,
    /// The subscriber declares the TLB-only hook together with start/end.
    #[error("a subscriber with the TLB-only hook may not also have start/end")]
    TlbHookWithStartEnd,
    /// The subscriber may refuse an invalidation yet needs its end.
    #[error("a subscriber that may refuse cannot have invalidate_range_end")]
    RefusingSubscriberWithEnd,
    /// The subscription was already removed.
    #[error("not subscribed (already unsubscribed)")]
    NotSubscribed,
    /// The address space was released; nothing can subscribe any more.
    #[error("the address space was released")]
    Released,
    /// A subscriber panicked in `hook`. The machinery is consistent (the
    /// bracket ended, `S` is even when idle, no section stays counted) and
    /// the subscriber is **failed**: it is unsubscribed and gets no further
    /// callback. When [`Hook::before_change`] holds the operation was
    /// abandoned before anything changed; otherwise the change completed.
    #[error("a subscriber panicked in {hook} and was unsubscribed")]
    SubscriberPanicked {
        /// The callback that panicked (the first one, if several did).
        hook: Hook,
    },
}
