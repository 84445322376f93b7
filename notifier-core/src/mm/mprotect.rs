//! `mprotect`: change the protection of a range, splitting VMAs; a
//! downgrade invalidates secondaries with `Event::ProtectionVma`.

use super::munmap::split_at;
use super::pte::{bits, Pte};
use super::vma::{Prot, VmFlags};
use super::{user_range, Mm, MmError};
use crate::notifier::Event;

impl Mm {
    /// `mprotect`: set the protection of `[addr, addr + len)`.
    ///
    /// Removing write permission write-protects every present PTE inside
    /// one `Event::ProtectionVma` bracket; removing read permission also
    /// opens it (secondaries drop their entries; [`Mm::lookup`] no longer
    /// answers for the range). Adding permissions changes no PTE.
    ///
    /// # Errors
    /// Range errors; [`MmError::NoVma`] at the first hole (nothing
    /// changes); [`MmError::Permission`] when write is asked of a VMA that
    /// may not become writable.
    ///
    /// # Locking
    /// Mmap lock exclusive.
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<(), MmError> {
        let r = user_range(addr, len)?;
        let (start, end) = (r.start(), r.end());
        let mut st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let mut a = start;
        let mut downgrade = false;
        let rwx = VmFlags::READ | VmFlags::WRITE | VmFlags::EXEC;
        let newf = prot.flags();
        while a < end {
            let v = st.vma(a).ok_or(MmError::NoVma { addr: a })?;
            if prot.write && !v.flags.contains(VmFlags::MAYWRITE) {
                return Err(MmError::Permission { addr: a });
            }
            let old = v.flags;
            downgrade |= (old.contains(VmFlags::WRITE) && !prot.write)
                || (old.contains(VmFlags::READ) && !prot.read);
            a = v.end;
        }
        split_at(&mut st, start, true);
        split_at(&mut st, end, false);
        let keys: Vec<u64> = st.vmas.range(start..end).map(|(k, _)| *k).collect();
        let br = if downgrade {
            Some(self.begin(start, end, Event::ProtectionVma)?)
        } else {
            None
        };
        for k in &keys {
            let v = st.vmas.get_mut(k).expect("collected above");
            v.flags = v.flags.without(rwx).union(newf);
        }
        if downgrade && !prot.write {
            for k in &keys {
                let v = &st.vmas[k];
                st.pt.for_each_entry(v.start, v.end, |addr, e, raw| {
                    if matches!(Pte::decode(raw), Pte::Present(p) if p.write) {
                        self.set_pte(v, e, addr, raw, raw & !bits::WRITE);
                    }
                });
            }
        }
        if let Some(br) = br {
            br.end()?;
        }
        Ok(())
    }
}
