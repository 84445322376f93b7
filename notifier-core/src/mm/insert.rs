//! `insert_pfn` and `insert_page` (`vm_insert_pfn`, `vm_insert_page`) with
//! seed 001's preconditions as typed errors instead of `BUG_ON`s.
//!
//! | precondition (seed 001 `BUG_ON`)                 | error |
//! |--------------------------------------------------|-------|
//! | VMA neither `PFNMAP` nor `MIXEDMAP`              | [`MmError::WrongVmaKind`] |
//! | VMA both `PFNMAP` and `MIXEDMAP`                 | [`MmError::PfnMapAndMixedMap`] |
//! | `PFNMAP` and a COW mapping                       | [`MmError::CowPfnMap`] |
//! | `MIXEDMAP` and `pfn_valid(pfn)`                  | [`MmError::ValidPfnInMixedMap`] |
//!
//! `insert_page` needs a valid frame ([`MmError::InvalidPage`]) and a VMA
//! that is not `PFNMAP` but `MIXEDMAP` ([`MmError::WrongVmaKind`]). Both
//! fail with [`MmError::Busy`] when a PTE is already there (EBUSY).

use std::sync::atomic::Ordering;

use super::pte::{PresentPte, PTE_PFN_MAX};
use super::vma::{VmFlags, Vma};
use super::{Mm, MmError};
use crate::addr::PAGE_MASK;
use crate::frame::Pfn;

impl Mm {
    /// `vm_insert_pfn`: map the raw PFN `pfn` at `addr` (special PTE).
    ///
    /// # Errors
    /// See the module table; [`MmError::Misaligned`], [`MmError::NoVma`],
    /// [`MmError::PfnTooLarge`], [`MmError::Busy`].
    ///
    /// # Locking
    /// Mmap lock exclusive. None-to-present: no invalidation needed.
    pub fn insert_pfn(&self, addr: u64, pfn: Pfn) -> Result<(), MmError> {
        self.insert(addr, pfn, false)
    }

    /// `vm_insert_page`: map the valid frame `pfn` at `addr` as a normal,
    /// refcounted page.
    ///
    /// # Errors
    /// See the module docs.
    ///
    /// # Locking
    /// As [`Mm::insert_pfn`].
    pub fn insert_page(&self, addr: u64, pfn: Pfn) -> Result<(), MmError> {
        self.insert(addr, pfn, true)
    }

    fn insert(&self, addr: u64, pfn: Pfn, page: bool) -> Result<(), MmError> {
        if addr & PAGE_MASK != 0 {
            return Err(MmError::Misaligned { addr });
        }
        if pfn.0 > PTE_PFN_MAX {
            return Err(MmError::PfnTooLarge { pfn: pfn.0 });
        }
        let st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let v = st.vma(addr).ok_or(MmError::NoVma { addr })?;
        let valid = self.mem.frames.pfn_valid(pfn);
        if page {
            check_insert_page(v, addr, pfn, valid)?;
            // The caller lends its reference's frame: a free frame (no
            // metadata) would be mapped and handed out again by the store.
            if pfn != self.mem.zero && self.mem.info(pfn).is_none() {
                return Err(MmError::FrameNotHeld { pfn: pfn.0 });
            }
        } else {
            check_insert_pfn(v, addr, pfn, valid)?;
        }
        let e = st.pt.leaf_alloc(addr).entry(addr);
        if e.load(Ordering::Acquire) != 0 {
            return Err(MmError::Busy { addr });
        }
        let writable = v.flags.contains(VmFlags::SHARED.union(VmFlags::WRITE));
        let special = !page && self.pte_special;
        let p = PresentPte::new(pfn, writable, special);
        if !self.install_existing(v, addr, e, 0, p) {
            return Err(MmError::Busy { addr });
        }
        Ok(())
    }
}

fn check_insert_pfn(v: &Vma, addr: u64, pfn: Pfn, valid: bool) -> Result<(), MmError> {
    let f = v.flags;
    if !f.intersects(VmFlags::PFNMAP | VmFlags::MIXEDMAP) {
        return Err(MmError::WrongVmaKind {
            addr,
            expected: "VM_PFNMAP or VM_MIXEDMAP",
        });
    }
    if f.contains(VmFlags::PFNMAP | VmFlags::MIXEDMAP) {
        return Err(MmError::PfnMapAndMixedMap { addr });
    }
    if f.contains(VmFlags::PFNMAP) && f.is_cow_mapping() {
        return Err(MmError::CowPfnMap { addr });
    }
    if f.contains(VmFlags::MIXEDMAP) && valid {
        return Err(MmError::ValidPfnInMixedMap { pfn: pfn.0 });
    }
    Ok(())
}

fn check_insert_page(v: &Vma, addr: u64, pfn: Pfn, valid: bool) -> Result<(), MmError> {
    if !valid {
        return Err(MmError::InvalidPage { pfn: pfn.0 });
    }
    if v.flags.contains(VmFlags::PFNMAP) || !v.flags.contains(VmFlags::MIXEDMAP) {
        return Err(MmError::WrongVmaKind {
            addr,
            expected: "VM_MIXEDMAP without VM_PFNMAP",
        });
    }
    Ok(())
}

impl Mm {
    /// Set extra flags on the VMA at `addr` (a driver's `vma->vm_flags |=`
    /// in its `mmap` method; tests use it to build the contradictory
    /// `PFNMAP | MIXEDMAP` VMA of seed 001's second `BUG_ON`).
    ///
    /// # Errors
    /// [`MmError::NoVma`].
    pub fn vma_set_flags(&self, addr: u64, flags: VmFlags) -> Result<(), MmError> {
        let mut st = self.state.write();
        let key = st.vma(addr).ok_or(MmError::NoVma { addr })?.start;
        let v = st.vmas.get_mut(&key).expect("found above");
        v.flags = v.flags.union(flags);
        Ok(())
    }
}
