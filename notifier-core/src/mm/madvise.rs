//! `madvise`: `MADV_DONTNEED` (drop pages now) and `MADV_FREE` (lazily
//! freeable: clean pages may be discarded by reclaim).

use super::pte::{bits, Pte};
use super::vma::{VmFlags, VmaKind};
use super::{user_range, Mm, MmError};
use crate::notifier::Event;

/// `madvise` advice.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: zap the PTEs; private anonymous pages read back as
    /// zeros, file and shared pages from the page cache.
    DontNeed,
    /// `MADV_FREE` (private anonymous only): the pages' dirty bits are
    /// cleared; reclaim discards a page still clean, a write keeps it.
    Free,
}

impl Mm {
    /// `madvise(addr, len, advice)`.
    ///
    /// # Errors
    /// Range errors; [`MmError::NoVma`] at the first hole (nothing changes);
    /// [`MmError::WrongVmaKind`] for `DontNeed` on locked or PFN-mapped
    /// VMAs and `Free` on anything but private anonymous memory (EINVAL).
    ///
    /// # Locking
    /// Mmap lock exclusive; one `Event::Clear` bracket over the range.
    pub fn madvise(&self, addr: u64, len: u64, advice: Advice) -> Result<(), MmError> {
        let r = user_range(addr, len)?;
        let (start, end) = (r.start(), r.end());
        let st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let mut a = start;
        while a < end {
            let v = st.vma(a).ok_or(MmError::NoVma { addr: a })?;
            match advice {
                Advice::DontNeed if v.flags.intersects(VmFlags::LOCKED | VmFlags::PFNMAP) => {
                    return Err(MmError::WrongVmaKind {
                        addr: a,
                        expected: "not VM_LOCKED or VM_PFNMAP",
                    })
                }
                Advice::Free if !matches!(v.kind, VmaKind::Anon) => {
                    return Err(MmError::WrongVmaKind {
                        addr: a,
                        expected: "private anonymous",
                    })
                }
                _ => {}
            }
            a = v.end;
        }
        let mut br = self.begin(start, end, Event::Clear)?;
        for v in st
            .vmas
            .range(..end)
            .map(|(_, v)| v)
            .filter(|v| v.end > start)
        {
            let (s, e) = (v.start.max(start), v.end.min(end));
            match advice {
                Advice::DontNeed if v.flags.contains(VmFlags::NONLINEAR) => {
                    self.zap_range_nonlinear(&st, v, s, e, &mut br)
                }
                Advice::DontNeed => self.zap_range(&st, v, s, e, &mut br),
                Advice::Free => st.pt.for_each_entry(s, e, |addr, entry, raw| {
                    let Pte::Present(p) = Pte::decode(raw) else {
                        return;
                    };
                    if !self.holds_ref(v, addr, p) {
                        return;
                    }
                    let exclusive = self
                        .mem
                        .info(p.pfn)
                        .is_some_and(|i| i.anon && i.mapcount == 1);
                    if exclusive && raw & (bits::DIRTY | bits::YOUNG) != 0 {
                        self.set_pte(v, entry, addr, raw, raw & !(bits::DIRTY | bits::YOUNG));
                    }
                }),
            }
        }
        br.end()
    }
}
