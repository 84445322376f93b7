//! Reclaim (`try_to_unmap`): unmap the pages of a range so their frames can
//! be reused. Seed 003's contract: the per-PTE `clear` notifier runs
//! **before** each present PTE is cleared, inside a start/end bracket.
//!
//! | page                                  | what happens |
//! |---------------------------------------|--------------|
//! | anonymous, dirty                      | contents saved to a swap slot, swap PTE |
//! | anonymous, clean (after `MADV_FREE`)  | discarded: PTE none, reads back zeros |
//! | page cache, linear                    | PTE none; the cache keeps the frame |
//! | page cache in a nonlinear VMA, index not linear | file PTE with the page's index |
//! | raw PFN, zero page, page-array page, locked VMA | left alone |
//! | driver page (`insert_page`, special-mapping page) | left alone: no fault handler could bring it back |

use super::pte::Pte;
use super::vma::VmFlags;
use super::{user_range, Mm, MmError};
use crate::notifier::Event;

/// What [`Mm::try_to_unmap`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Anonymous pages written to swap.
    pub swapped: usize,
    /// Clean lazily-freed anonymous pages discarded.
    pub discarded: usize,
    /// Page-cache pages unmapped.
    pub unmapped: usize,
}

impl ReclaimStats {
    /// Pages whose PTE was cleared.
    pub fn total(&self) -> usize {
        self.swapped + self.discarded + self.unmapped
    }
}

impl Mm {
    /// Reclaim the pages of `[addr, addr + len)` (holes are skipped).
    ///
    /// # Errors
    /// Range errors; [`MmError::Exited`]; [`MmError::OutOfMemory`] (the
    /// pages reclaimed so far stay reclaimed, the rest stay mapped).
    ///
    /// # Locking
    /// Mmap lock exclusive; one `Event::Clear` bracket over the range.
    pub fn try_to_unmap(&self, addr: u64, len: u64) -> Result<ReclaimStats, MmError> {
        let r = user_range(addr, len)?;
        let (start, end) = (r.start(), r.end());
        let st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let mut stats = ReclaimStats::default();
        let mut br = self.begin(start, end, Event::Clear)?;
        let mut err = None;
        for v in st
            .vmas
            .range(..end)
            .map(|(_, v)| v)
            .filter(|v| v.end > start)
        {
            if v.flags.contains(VmFlags::LOCKED) {
                continue;
            }
            st.pt
                .for_each_entry(v.start.max(start), v.end.min(end), |a, e, raw| {
                    if err.is_some() {
                        return;
                    }
                    let Pte::Present(p) = Pte::decode(raw) else {
                        return;
                    };
                    if !self.holds_ref(v, a, p) {
                        return;
                    }
                    let Some(info) = self.mem.info(p.pfn) else {
                        return;
                    };
                    // Only pages reclaim can bring back: anonymous (swap)
                    // and page cache (the fault reads it again). A driver's
                    // page is on no LRU in the kernel.
                    if !info.anon && v.kind.file().is_none() {
                        return;
                    }
                    let new = if info.anon && p.dirty {
                        match self.mem.swap_out(p.pfn) {
                            Ok(slot) => {
                                stats.swapped += 1;
                                Pte::Swap { slot }.encode()
                            }
                            Err(x) => {
                                err = Some(x);
                                return;
                            }
                        }
                    } else if info.anon {
                        stats.discarded += 1;
                        0
                    } else {
                        stats.unmapped += 1;
                        self.nonlinear_leftover(v, a, p.pfn)
                    };
                    // try_to_unmap_one: the clear notifier before the PTE goes.
                    br.clear(a);
                    self.set_pte(v, e, a, raw, new);
                    self.mem.unmap_page(p.pfn);
                    br.defer_put(p.pfn);
                });
        }
        let ended = br.end();
        match err {
            Some(e) => Err(e.into()),
            None => ended.map(|()| stats),
        }
    }
}
