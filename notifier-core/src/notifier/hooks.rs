//! The stand-alone hooks (aging, TLB) and the failing of subscribers whose
//! callbacks panicked.
//!
//! # Locking
//! Each hook call counts itself in the grace-period phase (`Section`) under
//! the subscriptions lock, runs the callbacks unlocked, and uncounts itself
//! on drop, whatever the callbacks did.

use std::sync::Arc;

use super::guard::{guarded, FirstPanic};
use super::interval::{DynEntry, FAILED};
use super::ops::{Hooks, MmuNotifierOps};
use super::range_sub::RangeEntry;
use super::subscriptions::NotifierSubscriptions;
use super::{Hook, NotifierError};
use crate::sync::{self, CallbackScope, Ordering};

impl NotifierSubscriptions {
    // ----------------------------------------------------------------------
    // Stand-alone hooks (aging, TLB).

    /// Run `f` over the live range subscribers that have `want`, inside a
    /// grace-period section; a panicking subscriber is failed and the
    /// others still run.
    #[inline]
    fn for_each_range(
        &self,
        want: Hooks,
        hook: Hook,
        mut f: impl FnMut(&dyn MmuNotifierOps),
    ) -> Result<(), NotifierError> {
        if self.nr_ranges.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let (ranges, section) = {
            let mut st = sync::lock(&self.state);
            let Some(r) = st.ranges.clone() else {
                return Ok(());
            };
            let phase = st.phase;
            st.inflight[phase] += 1;
            (r, Section { subs: self, phase })
        };
        let panicked = FirstPanic::new();
        {
            let _scope = CallbackScope::enter();
            for r in ranges.iter() {
                if r.hooks.contains(want)
                    && !r.dead.load(Ordering::Acquire)
                    && guarded(|| f(&*r.ops)).is_none()
                {
                    panicked.record(hook);
                    self.fail_range(r);
                }
            }
        }
        drop(section);
        panicked.result()
    }

    /// Age the secondaries' accessed bits in `[start, end)` and flush
    /// (`mmu_notifier_clear_flush_young`); true if any subscriber saw a
    /// young page.
    ///
    /// # Errors
    /// [`NotifierError::SubscriberPanicked`]: a subscriber panicked and was
    /// failed (the others were asked).
    pub fn clear_flush_young(&self, start: u64, end: u64) -> Result<bool, NotifierError> {
        let mut young = false;
        self.for_each_range(Hooks::AGING, Hook::ClearFlushYoung, |o| {
            young |= o.clear_flush_young(start, end)
        })?;
        Ok(young)
    }

    /// Like [`Self::clear_flush_young`] without the flush (`mmu_notifier_clear_young`).
    ///
    /// # Errors
    /// As [`Self::clear_flush_young`].
    pub fn clear_young(&self, start: u64, end: u64) -> Result<bool, NotifierError> {
        let mut young = false;
        self.for_each_range(Hooks::AGING, Hook::ClearYoung, |o| {
            young |= o.clear_young(start, end)
        })?;
        Ok(young)
    }

    /// Whether any secondary has the page at `addr` young (`mmu_notifier_test_young`).
    ///
    /// # Errors
    /// As [`Self::clear_flush_young`].
    pub fn test_young(&self, addr: u64) -> Result<bool, NotifierError> {
        let mut young = false;
        self.for_each_range(Hooks::AGING, Hook::TestYoung, |o| {
            young |= o.test_young(addr)
        })?;
        Ok(young)
    }

    /// The primary flushed its TLB for `[start, end)`
    /// (`mmu_notifier_arch_invalidate_secondary_tlbs`).
    ///
    /// # Errors
    /// As [`Self::clear_flush_young`].
    pub fn invalidate_secondary_tlbs(&self, start: u64, end: u64) -> Result<(), NotifierError> {
        self.for_each_range(Hooks::TLB, Hook::InvalidateSecondaryTlbs, |o| {
            o.invalidate_secondary_tlbs(start, end)
        })
    }

    // ----------------------------------------------------------------------
    // Failed subscribers.

    /// A callback of range subscriber `r` panicked: mark it failed and
    /// take it out of the snapshot (no grace period: the caller may be a
    /// bracket, which must not wait for itself).
    #[cold]
    pub(crate) fn fail_range(&self, r: &RangeEntry) {
        r.failed.store(true, Ordering::Release);
        let mut st = sync::lock(&self.state);
        if r.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        let v: Vec<Arc<RangeEntry>> = st
            .ranges
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .filter(|x| !core::ptr::eq(&***x, r))
            .cloned()
            .collect();
        st.ranges = if v.is_empty() { None } else { Some(v.into()) };
        self.nr_ranges.fetch_sub(1, Ordering::Release);
    }

    /// The `invalidate` of interval subscriber `e` panicked: mark it failed
    /// and remove it from the index (deferred while invalidating, never
    /// waiting).
    #[cold]
    pub(super) fn fail_interval(&self, e: &Arc<DynEntry>) {
        let _ = self.detach_interval(e, FAILED);
    }
}

/// A hook section counted in `inflight[phase]`; dropping it uncounts it,
/// so no path out of a hook call (a panic included) leaves it counted.
struct Section<'a> {
    subs: &'a NotifierSubscriptions,
    phase: usize,
}

impl Drop for Section<'_> {
    fn drop(&mut self) {
        let mut st = sync::lock(&self.subs.state);
        st.inflight[self.phase] -= 1;
        drop(st);
        self.subs.wake();
    }
}
