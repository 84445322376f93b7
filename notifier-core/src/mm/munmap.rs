//! `munmap`: remove mappings, splitting the VMAs at the edges.

use super::vma::Vma;
use super::{user_range, Mm, MmError, MmState};
use crate::notifier::Event;

impl Mm {
    /// `munmap`: unmap `[addr, addr + len)` (length rounded up to pages).
    /// Partially covered VMAs are split; unmapping nothing succeeds.
    ///
    /// # Errors
    /// [`MmError::Misaligned`], [`MmError::Range`],
    /// [`MmError::BeyondTaskSize`]; [`MmError::Exited`].
    ///
    /// # Locking
    /// Mmap lock exclusive. One `Event::Unmap` bracket covers the range;
    /// `clear` runs before each present PTE is cleared; frames are released
    /// after the bracket ends, page arrays closed after that.
    pub fn munmap(&self, addr: u64, len: u64) -> Result<(), MmError> {
        let r = user_range(addr, len)?;
        let mut st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        self.do_munmap(&mut st, r.start(), r.end(), Event::Unmap)
    }

    /// Unmap `[start, end)` under the exclusive mmap lock.
    pub(crate) fn do_munmap(
        &self,
        st: &mut MmState,
        start: u64,
        end: u64,
        event: Event,
    ) -> Result<(), MmError> {
        if !st.overlaps(start, end) {
            return Ok(());
        }
        split_at(st, start, false);
        split_at(st, end, true);
        let mut br = self.begin(start, end, event)?;
        let keys: Vec<u64> = st.vmas.range(start..end).map(|(k, _)| *k).collect();
        for k in &keys {
            let v = &st.vmas[k];
            self.zap_range(st, v, v.start, v.end, &mut br);
        }
        let ended = br.end();
        for k in keys {
            if let Some(v) = st.vmas.remove(&k) {
                v.close();
            }
        }
        st.pt.free_empty(start, end);
        ended
    }
}

/// Split the VMA that strictly contains `addr` (`__split_vma`); both halves
/// stay in the tree.
pub(crate) fn split_at(st: &mut MmState, addr: u64, new_below: bool) {
    let Some(key) = st.vma(addr).filter(|v| v.start < addr).map(|v| v.start) else {
        return;
    };
    let mut v: Vma = st.vmas.remove(&key).expect("found above");
    let new = v.split(addr, new_below);
    st.vmas.insert(new.start, new);
    st.vmas.insert(v.start, v);
}
