//! `fork`: a child address space with copy-on-write sharing of private
//! pages. The parent's writable private PTEs are write-protected inside an
//! `Event::ProtectionPage` bracket (`copy_page_range`); the child gets its
//! own notifier set, so the parent's subscribers do not follow it.

use std::sync::Arc;

use super::pte::{bits, Pte};
use super::vma::VmFlags;
use super::{Mm, MmError};
use crate::notifier::Event;

impl Mm {
    /// `fork`: the child address space.
    ///
    /// # Errors
    /// [`MmError::Exited`]; [`MmError::Again`] if a subscriber refuses.
    ///
    /// # Locking
    /// The parent's mmap lock exclusive, then the child's (a fresh lock no
    /// one else can hold yet).
    pub fn fork(&self) -> Result<Arc<Mm>, MmError> {
        let st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let child = Mm::from_memory(self.mem.clone(), self.pte_special);
        {
            let mut cst = child.state.write();
            for v in st.vmas.values() {
                let cow = v.flags.is_cow_mapping();
                let br = if cow {
                    Some(self.begin(v.start, v.end, Event::ProtectionPage)?)
                } else {
                    None
                };
                let mut cv = v.clone();
                cv.flags = cv.flags.without(VmFlags::LOCKED);
                cv.open();
                st.pt.for_each_entry(v.start, v.end, |a, e, raw| {
                    let mut craw = raw;
                    match Pte::decode(raw) {
                        Pte::Present(p) => {
                            if self.holds_ref(v, a, p) {
                                self.mem.map_page(p.pfn);
                            }
                            if cow && p.write {
                                self.set_pte(v, e, a, raw, raw & !bits::WRITE);
                                craw = raw & !bits::WRITE;
                            }
                        }
                        Pte::Swap { slot } => self.mem.swap_dup(slot),
                        Pte::File { .. } | Pte::None => {}
                    }
                    let ce = cst.pt.leaf_alloc(a).entry(a);
                    child.set_pte(&cv, ce, a, 0, craw);
                });
                let ended = br.map_or(Ok(()), |br| br.end());
                cst.vmas.insert(cv.start, cv);
                ended?;
            }
        }
        Ok(child)
    }
}
