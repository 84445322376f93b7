//! A shadow of a software primary's page table, fed by its PTE observer.
//!
//! The coherence oracle must read "what the primary maps now" from under a
//! device lock, and `Mm::lookup` takes the mmap lock, which the invalidation
//! path holds while it takes device locks: reading it there would invert the
//! lock order. The shadow is updated at every PTE store (the observer runs
//! right after the store, under the page-table lock that serialises stores
//! to that entry) and read lock-free. A store is published before it is
//! reported; `Mm` counts such stores, so a reader can tell "not reported
//! yet" (wait) from "different" (a real mismatch).

use std::sync::Arc;

use crate::mm::{Mm, Pte, VmFlags};
use crate::primary::Translation;
use crate::secondary::{ExternalPageTable, Perm, Va};

/// The shadow page table of one [`Mm`].
pub struct MmShadow {
    table: ExternalPageTable<Va>,
    pending: Arc<std::sync::atomic::AtomicU64>,
}

impl core::fmt::Debug for MmShadow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmShadow")
            .field("mapped", &self.table.mapped_pages())
            .finish()
    }
}

impl MmShadow {
    /// Attach a shadow to `mm` (it takes `mm`'s PTE-observer slot). Attach
    /// before anything is mapped: existing PTEs are not copied.
    pub fn attach(mm: &Mm) -> Arc<Self> {
        let shadow = Arc::new(Self {
            table: ExternalPageTable::new(),
            pending: mm.inject().pending_reports(),
        });
        let s = shadow.clone();
        mm.inject().set_pte_observer(Some(Arc::new(move |c| {
            let page = c.addr & !0xfff;
            match Pte::decode(c.new).present() {
                Some(p) => {
                    let writable = p.write && c.vma_flags.contains(VmFlags::WRITE);
                    let _ = s.table.map(Va(page), p.pfn, Perm::from_writable(writable));
                }
                None => {
                    s.table
                        .unmap_range(Va(page), Va(page + 4096), false, |_, _| {});
                }
            }
        })));
        shadow
    }

    /// Whether some PTE store has been published but not yet reported.
    #[inline]
    pub fn reports_pending(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire) != 0
    }

    /// What the primary maps at `addr` now.
    #[inline]
    pub fn lookup(&self, addr: u64) -> Option<Translation> {
        self.table.lookup(Va(addr & !0xfff)).map(|e| Translation {
            pfn: e.pfn,
            writable: e.perm.writable(),
        })
    }
}
