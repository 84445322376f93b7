//! Page migration: move the contents of a page to a new frame and point
//! the PTE at it, inside an `Event::Migrate` bracket.
//!
//! Only pages this address space maps exclusively move: anonymous pages
//! with one reference, and linear page-cache pages mapped once (the cache
//! entry moves too). Others are skipped.

use super::pte::{PresentPte, Pte};
use super::vma::VmFlags;
use super::{user_range, Mm, MmError};
use crate::frame::Pfn;
use crate::notifier::Event;

impl Mm {
    /// Migrate the pages of `[addr, addr + len)`; returns how many moved.
    ///
    /// # Errors
    /// Range errors; [`MmError::Exited`]; [`MmError::OutOfMemory`] (pages
    /// moved so far stay moved, none is lost).
    ///
    /// # Locking
    /// Mmap lock exclusive; one `Event::Migrate` bracket.
    pub fn migrate(&self, addr: u64, len: u64) -> Result<usize, MmError> {
        let r = user_range(addr, len)?;
        let (start, end) = (r.start(), r.end());
        let st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let mut moved = 0;
        let mut err = None;
        let mut br = self.begin(start, end, Event::Migrate)?;
        for v in st
            .vmas
            .range(..end)
            .map(|(_, v)| v)
            .filter(|v| v.end > start)
        {
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
                    let file = v.kind.file().filter(|_| !info.anon);
                    let ok = if info.anon {
                        info.refcount == 1 && info.mapcount == 1
                    } else {
                        file.is_some()
                            && !v.flags.contains(VmFlags::NONLINEAR)
                            && info.refcount == 2
                            && info.mapcount == 1
                    };
                    if !ok {
                        return;
                    }
                    let new = match self.mem.alloc_page(info.anon) {
                        Ok(n) => n,
                        Err(x) => {
                            err = Some(x);
                            return;
                        }
                    };
                    if let Some(f) = file {
                        if !f.replace(v.linear_pgoff(a), p.pfn, new) {
                            self.mem.put_page(new);
                            return;
                        }
                    }
                    // try_to_migrate: clear, copy, then the new PTE.
                    br.clear(a);
                    self.set_pte(v, e, a, raw, 0);
                    if let Err(x) = self.mem.frames.copy(p.pfn, new) {
                        err = Some(x);
                    }
                    let np = PresentPte { pfn: new, ..p };
                    self.set_pte(v, e, a, 0, np.encode());
                    if info.anon {
                        self.mem.mapcount_inc(new);
                    } else {
                        // The new frame's first reference is the cache's.
                        self.mem.map_page(new);
                        br.defer_put(p.pfn);
                    }
                    self.mem.unmap_page(p.pfn);
                    br.defer_put(p.pfn);
                    moved += 1;
                });
        }
        let ended = br.end();
        match err {
            Some(e) => Err(e.into()),
            None => ended.map(|()| moved),
        }
    }

    /// The PFN at `addr` if present (tests: did the frame move?).
    pub fn present_pfn(&self, addr: u64) -> Option<Pfn> {
        let st = self.state.read();
        self.present_at(&st, addr & !crate::addr::PAGE_MASK)
    }
}
