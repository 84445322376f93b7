//! `remap_file_pages` (seed 004, `mm/fremap.c`): map arbitrary pages of a
//! shared file into a window of an existing shared VMA with file PTEs,
//! making the VMA nonlinear.
//!
//! | check (in order)                                   | error |
//! |----------------------------------------------------|-------|
//! | `prot != 0`                                        | [`MmError::RemapProtNotZero`] |
//! | after masking to pages: `start + size <= start` (zero size or wrap) | [`MmError::RemapSizeZeroOrWraps`] |
//! | `pgoff + pages` wraps                              | [`MmError::RemapPgoffWraps`] |
//! | `pgoff + pages >= 1 << PTE_FILE_MAX_BITS`          | [`MmError::RemapPgoffTooLarge`] |
//! | no VMA at or after `start`                         | [`MmError::RemapNoVma`] |
//! | VMA not `VM_SHARED`                                | [`MmError::RemapNotShared`] |
//! | VMA without `VM_CAN_NONLINEAR`                     | [`MmError::RemapNoNonlinear`] |
//! | range not inside that VMA                          | [`MmError::RemapNotInOneVma`] |
//!
//! Then: a linear VMA asked for its own linear offset returns at once (the
//! linear shortcut); otherwise `VM_NONLINEAR` is set **before** any PTE is
//! populated; the population runs inside one invalidation bracket
//! (`Event::Clear`), zapping what was mapped (with `clear`) and installing
//! file PTEs; afterwards, unless `MAP_NONBLOCK`, the range is prefaulted
//! (`mlock_vma_pages_range` for a locked VMA, `make_pages_present`
//! otherwise).
//!
//! The window survives what unmaps its pages without removing the VMA:
//! reclaim and `madvise(DONTNEED)` leave a file PTE with the page's index
//! where it differs from the linear one (see `nonlinear_leftover`).
//!
//! Not modelled: the `vm_private_data` swap-out cursor check and the
//! dirty-accounting emulation through `mmap_region` (our files do no dirty
//! accounting).

use super::pte::{Pte, PTE_FILE_MAX_BITS};
use super::vma::{VmFlags, Vma};
use super::{Bracket, Mm, MmError, MmState};
use crate::addr::PAGE_MASK;
use crate::frame::Pfn;
use crate::notifier::Event;
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// `MAP_NONBLOCK`: populate the file PTEs only, do not prefault.
pub const MAP_NONBLOCK: u64 = 0x10000;

impl Mm {
    /// What unmapping the present page-cache page `pfn` at `addr` leaves in
    /// the PTE: in a nonlinear VMA, a file PTE carrying the page's index
    /// when it differs from the linear one (`try_to_unmap_one`, and
    /// `zap_pte_range` with `details->nonlinear_vma`), so the next fault
    /// reads the same page; otherwise none.
    pub(crate) fn nonlinear_leftover(&self, v: &Vma, addr: u64, pfn: Pfn) -> u64 {
        if !v.flags.contains(VmFlags::NONLINEAR) {
            return 0;
        }
        match v.kind.file().and_then(|f| f.index_of(pfn)) {
            Some(index) if index != v.linear_pgoff(addr) => Pte::File { pgoff: index }.encode(),
            _ => 0,
        }
    }

    /// `madvise(DONTNEED)` of a nonlinear VMA (`zap_page_range` with
    /// `details.nonlinear_vma`): present pages become file PTEs carrying
    /// their index (none when linear); non-present entries (file PTEs)
    /// stay, so the window survives.
    pub(crate) fn zap_range_nonlinear(
        &self,
        st: &MmState,
        v: &Vma,
        start: u64,
        end: u64,
        br: &mut Bracket<'_>,
    ) {
        st.pt.for_each_entry(start, end, |addr, e, raw| {
            let Pte::Present(p) = Pte::decode(raw) else {
                return;
            };
            br.clear(addr);
            let left = self.nonlinear_leftover(v, addr, p.pfn);
            self.set_pte(v, e, addr, raw, left);
            if self.holds_ref(v, addr, p) {
                self.mem.unmap_page(p.pfn);
                br.defer_put(p.pfn);
            }
        });
    }

    /// `remap_file_pages(start, size, prot, pgoff, flags)`. See the module
    /// docs for the checks and their errors.
    ///
    /// # Errors
    /// The `Remap*` variants of [`MmError`]; [`MmError::Exited`]; fault
    /// errors other than bus errors while prefaulting.
    ///
    /// # Locking
    /// Mmap lock exclusive (the kernel retakes it for writing to change
    /// `vm_flags`).
    pub fn remap_file_pages(
        &self,
        start: u64,
        size: u64,
        prot: u64,
        pgoff: u64,
        flags: u64,
    ) -> Result<(), MmError> {
        if prot != 0 {
            return Err(MmError::RemapProtNotZero);
        }
        let start = start & !PAGE_MASK;
        let size = size & !PAGE_MASK;
        let end = match start.checked_add(size) {
            Some(e) if e > start => e,
            _ => return Err(MmError::RemapSizeZeroOrWraps),
        };
        let npages = size >> PAGE_SHIFT;
        let last = pgoff.checked_add(npages).ok_or(MmError::RemapPgoffWraps)?;
        if last >= 1u64 << PTE_FILE_MAX_BITS {
            return Err(MmError::RemapPgoffTooLarge);
        }
        let mut st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let v = st
            .find_vma(start)
            .ok_or(MmError::RemapNoVma { addr: start })?;
        if !v.flags.contains(VmFlags::SHARED) {
            return Err(MmError::RemapNotShared);
        }
        if !v.flags.contains(VmFlags::CAN_NONLINEAR) {
            return Err(MmError::RemapNoNonlinear);
        }
        if start < v.start || end > v.end {
            return Err(MmError::RemapNotInOneVma);
        }
        let key = v.start;
        if !v.flags.contains(VmFlags::NONLINEAR) {
            if pgoff == v.linear_pgoff(start) {
                return Ok(());
            }
            // Must set VM_NONLINEAR before any pages are populated.
            let vm = st.vmas.get_mut(&key).expect("found above");
            vm.flags = vm.flags.union(VmFlags::NONLINEAR);
        }
        let v = &st.vmas[&key];
        let mut br = self.begin(start, end, Event::Clear)?;
        let mut a = start;
        let mut off = pgoff;
        while a < end {
            let e = st.pt.leaf_alloc(a).entry(a);
            let raw = e.load(std::sync::atomic::Ordering::Acquire);
            if raw != 0 {
                self.zap_pte(v, a, e, raw, &mut br);
            }
            self.set_pte(v, e, a, 0, Pte::File { pgoff: off }.encode());
            a += PAGE_SIZE;
            off += 1;
        }
        let ended = br.end();
        if flags & MAP_NONBLOCK == 0 {
            // Locked or not, the range is made present now.
            self.populate(&st, start, end)?;
        }
        ended
    }
}
