//! An open invalidation bracket (the span between the kernel's
//! `mmu_notifier_invalidate_range_start` and `_end`).

use std::sync::Arc;

use super::guard::{guarded, FirstPanic};
use super::ops::Hooks;
use super::range::InvalidateRange;
use super::range_sub::RangeEntry;
use super::subscriptions::NotifierSubscriptions;
use super::{Hook, NotifierError};
use crate::sync::{CallbackScope, Ordering};

/// An open invalidation bracket, returned by
/// [`NotifierSubscriptions::invalidate_range_start`].
///
/// # Pairing
/// Ends with [`Invalidation::end`] (or [`Invalidation::try_end`]) or on
/// drop, so a panicking primary does not leave readers waiting forever. A
/// subscriber that panics in a hook of the bracket does not stop it either:
/// the other subscribers still get their end, `S` still moves, and
/// [`Invalidation::try_end`] reports the failure.
#[must_use = "the bracket ends when this is dropped; change the PTEs first"]
pub struct Invalidation<'a> {
    pub(crate) subs: &'a NotifierSubscriptions,
    pub(crate) range: InvalidateRange,
    pub(crate) ranges: Option<Arc<[Arc<RangeEntry>]>>,
    /// Range subscribers `[0, started)` of the snapshot got a start.
    pub(crate) started: usize,
    pub(crate) phase: usize,
    /// Whether this bracket is counted in `active` (false after release).
    pub(crate) counted: bool,
    pub(crate) ended: bool,
    /// The first subscriber hook that panicked inside this bracket.
    pub(crate) panicked: FirstPanic,
}

impl Invalidation<'_> {
    /// The range being invalidated.
    #[inline]
    pub fn range(&self) -> &InvalidateRange {
        &self.range
    }

    /// Run `f` on every live range subscriber with `hook`; a panic fails
    /// that subscriber and is remembered for [`Self::try_end`].
    #[inline]
    fn each(&self, want: Hooks, hook: Hook, f: impl Fn(&RangeEntry)) {
        if let Some(rs) = &self.ranges {
            let _scope = CallbackScope::enter();
            for r in rs.iter() {
                if r.hooks.contains(want)
                    && !r.dead.load(Ordering::Acquire)
                    && guarded(|| f(r)).is_none()
                {
                    self.panicked.record(hook);
                    self.subs.fail_range(r);
                }
            }
        }
    }

    /// Seed 003's per-PTE hook: the present PTE at `addr` is about to be
    /// cleared. Call it before clearing, inside the bracket.
    #[inline]
    pub fn clear(&self, addr: u64) {
        self.each(Hooks::CLEAR, Hook::Clear, |r| r.ops.clear(addr));
    }

    /// The primary flushed its TLB for `[start, end)` inside this bracket.
    #[inline]
    pub fn invalidate_secondary_tlbs(&self, start: u64, end: u64) {
        self.each(Hooks::TLB, Hook::InvalidateSecondaryTlbs, |r| {
            r.ops.invalidate_secondary_tlbs(start, end)
        });
    }

    /// End the bracket (`mmu_notifier_invalidate_range_end`): range
    /// subscribers get their end, `S` becomes even when this was the last
    /// overlapping invalidation, deferred subscriptions are applied and
    /// waiting readers wake. A subscriber failure is not reported; use
    /// [`Self::try_end`] to learn of it.
    #[inline]
    pub fn end(mut self) {
        self.finish();
    }

    /// [`Self::end`], reporting a subscriber that panicked in any hook of
    /// this bracket.
    ///
    /// # Errors
    /// [`NotifierError::SubscriberPanicked`] with the first hook that
    /// panicked; the bracket has ended all the same.
    #[inline]
    pub fn try_end(mut self) -> Result<(), NotifierError> {
        self.finish();
        self.panicked.result()
    }

    pub(crate) fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(rs) = self.ranges.take() {
            let _scope = CallbackScope::enter();
            for r in &rs[..self.started] {
                if r.hooks.contains(Hooks::END)
                    && !r.dead.load(Ordering::Acquire)
                    && guarded(|| r.ops.invalidate_range_end(&self.range)).is_none()
                {
                    self.panicked.record(Hook::InvalidateRangeEnd);
                    self.subs.fail_range(r);
                }
            }
        }
        if self.counted {
            self.subs.end_bracket(self.phase);
        }
    }
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}
