//! `mremap`: shrink, grow in place, or move a mapping.

use super::mmap::find_gap;
use super::munmap::split_at;
use super::vma::VmaKind;
use super::{page_len, user_range, Mm, MmError, MmState};
use crate::notifier::Event;

/// `mremap` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapFlags {
    /// `MREMAP_MAYMOVE`.
    pub may_move: bool,
    /// `MREMAP_FIXED` destination (needs `may_move`).
    pub fixed: Option<u64>,
}

impl Mm {
    /// `mremap(old_addr, old_len, new_len, flags)`: returns the new address.
    ///
    /// Shrinking unmaps the tail. Growing extends in place when the space
    /// after is free, else moves (with `may_move`). Moving carries the PTEs
    /// (and so the frames, unchanged) to the new range inside an
    /// `Event::Unmap` bracket over the old one, calling `clear` for each
    /// present PTE.
    ///
    /// # Errors
    /// Range errors; [`MmError::NoVma`]; [`MmError::MremapSpansVmas`] when
    /// the old range is not inside one VMA; [`MmError::CannotGrow`];
    /// [`MmError::WrongVmaKind`] when growing a PFN, mixed, special or
    /// shared anonymous mapping; [`MmError::Busy`] for a fixed destination overlapping the
    /// source or without `may_move`; [`MmError::NoSpace`].
    ///
    /// # Locking
    /// Mmap lock exclusive.
    pub fn mremap(
        &self,
        old_addr: u64,
        old_len: u64,
        new_len: u64,
        flags: MremapFlags,
    ) -> Result<u64, MmError> {
        let old = user_range(old_addr, old_len)?;
        let new_len = page_len(new_len)
            .filter(|l| *l != 0)
            .ok_or(MmError::Range(crate::RangeError::Empty))?;
        let (os, oe) = (old.start(), old.end());
        let mut st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let v = st.vma(os).ok_or(MmError::NoVma { addr: os })?;
        if oe > v.end {
            return Err(MmError::MremapSpansVmas { addr: os });
        }
        let growable = matches!(v.kind, VmaKind::Anon | VmaKind::File(_));
        let vend = v.end;
        if new_len > old.len() && !growable {
            return Err(MmError::WrongVmaKind {
                addr: os,
                expected: "an expandable (anonymous or file) mapping",
            });
        }
        if let Some(dst) = flags.fixed {
            let d = user_range(dst, new_len)?;
            if !flags.may_move || d.overlaps(os, oe) {
                return Err(MmError::Busy { addr: dst });
            }
            self.do_munmap(&mut st, d.start(), d.end(), Event::Unmap)?;
            let oe = if new_len < old.len() {
                self.do_munmap(&mut st, os + new_len, oe, Event::Unmap)?;
                os + new_len
            } else {
                oe
            };
            self.move_vma(&mut st, os, oe, dst, new_len)?;
            return Ok(dst);
        }
        if new_len <= old.len() {
            if new_len < old.len() {
                self.do_munmap(&mut st, os + new_len, oe, Event::Unmap)?;
            }
            return Ok(os);
        }
        let grow_end = os.checked_add(new_len).filter(|e| *e <= super::TASK_SIZE);
        if let Some(ge) = grow_end {
            if oe == vend && !st.overlaps(oe, ge) {
                split_at(&mut st, os, true);
                let key = st.vma(os).map(|v| v.start).expect("still mapped");
                st.vmas.get_mut(&key).expect("present").end = ge;
                return Ok(os);
            }
        }
        if !flags.may_move {
            return Err(MmError::CannotGrow { addr: os });
        }
        let dst = find_gap(&st, new_len)?;
        self.move_vma(&mut st, os, oe, dst, new_len)?;
        Ok(dst)
    }

    /// Move `[os, oe)` (inside one VMA) to `dst`, growing it to `new_len`.
    fn move_vma(
        &self,
        st: &mut MmState,
        os: u64,
        oe: u64,
        dst: u64,
        new_len: u64,
    ) -> Result<(), MmError> {
        split_at(st, os, true);
        split_at(st, oe, false);
        let br = self.begin(os, oe, Event::Unmap)?;
        let mut v = st.vmas.remove(&os).expect("split above");
        let delta = dst.wrapping_sub(os);
        let mut moved = Vec::new();
        st.pt.for_each_entry(os, oe, |addr, e, raw| {
            if raw & super::pte::bits::PRESENT != 0 {
                br.clear(addr);
            }
            self.set_pte(&v, e, addr, raw, 0);
            moved.push((addr.wrapping_add(delta), raw));
        });
        v.start = dst;
        v.end = dst + new_len;
        for (a, raw) in moved {
            let e = st.pt.leaf_alloc(a).entry(a);
            self.set_pte(&v, e, a, 0, raw);
        }
        let ended = br.end();
        st.vmas.insert(dst, v);
        st.pt.free_empty(os, oe);
        ended
    }
}
