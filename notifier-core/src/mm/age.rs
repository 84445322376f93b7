//! Aging: the accessed-bit scan of reclaim (`page_referenced`), which asks
//! the secondaries too (`clear_flush_young`, `clear_young`, `test_young`).
//! Accessed bits are not translations, so no invalidation bracket.

use std::sync::atomic::Ordering;

use super::pte::{bits, Pte};
use super::{user_range, Mm, MmError};
use crate::PAGE_SIZE;

impl Mm {
    /// Clear the accessed bits of the present pages of `[addr, addr + len)`
    /// in the primary and in every secondary (`clear_flush_young`, or
    /// `clear_young` when `!flush`); returns how many pages were young in
    /// either.
    ///
    /// # Errors
    /// Range errors; [`MmError::Exited`]; [`MmError::Notifier`] when a
    /// subscriber's aging hook panicked (it is failed; every page was still
    /// aged in the primary and in the other secondaries).
    ///
    /// # Locking
    /// Mmap lock shared; the aging hooks run with it held.
    pub fn age_range(&self, addr: u64, len: u64, flush: bool) -> Result<usize, MmError> {
        let r = user_range(addr, len)?;
        let st = self.state.read();
        if st.exited {
            return Err(MmError::Exited);
        }
        let mut young = 0;
        let mut failed = None;
        st.pt.for_each_entry(r.start(), r.end(), |a, e, raw| {
            if !matches!(Pte::decode(raw), Pte::Present(_)) {
                return;
            }
            let old = e
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    (v & bits::PRESENT != 0 && v & bits::YOUNG != 0).then_some(v & !bits::YOUNG)
                })
                .unwrap_or(0);
            let secondary = if flush {
                self.notifiers().clear_flush_young(a, a + PAGE_SIZE)
            } else {
                self.notifiers().clear_young(a, a + PAGE_SIZE)
            };
            let y = old & bits::YOUNG != 0 || secondary.as_ref().is_ok_and(|y| *y);
            if let Err(e) = secondary {
                failed.get_or_insert(e);
            }
            young += usize::from(y);
        });
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(young),
        }
    }

    /// Whether the page at `addr` is young in the primary or any secondary
    /// (`mmu_notifier_test_young`); nothing is cleared.
    ///
    /// # Errors
    /// [`MmError::Notifier`] when a subscriber's `test_young` panicked (it
    /// is failed).
    pub fn test_young(&self, addr: u64) -> Result<bool, MmError> {
        let addr = addr & !crate::addr::PAGE_MASK;
        let st = self.state.read();
        let young = Pte::decode(st.pt.get(addr))
            .present()
            .is_some_and(|p| p.young);
        drop(st);
        Ok(self.notifiers().test_young(addr)? | young)
    }
}
