//! The fault path (`handle_mm_fault`): zero page, copy-on-write, page
//! cache, nonlinear file PTEs, swap-in, special mappings, PFNMAP/MIXEDMAP
//! copy-on-write.
//!
//! # Locking
//! Runs with the mmap lock held **shared**, so many threads fault at once.
//! Missing tables are allocated lock-free; a PTE goes from none to present
//! with a compare-and-swap (the loser of a race gives its frame back); the
//! copy-on-write replacement of a present PTE opens an invalidation bracket
//! (no lock held), then takes the leaf lock to re-check and swap the entry.
//!
//! | PTE     | access | VMA                   | action |
//! |---------|--------|-----------------------|--------|
//! | none    | read   | private anonymous     | map the zero page read-only (special) |
//! | none    | write  | private anonymous     | new zeroed anonymous frame, writable |
//! | none    | any    | shared / file         | page-cache frame; private: read-only, or a copy on write |
//! | none    | any    | special               | page list entry or fault callback (offset relative to the mapping); failure: bus error |
//! | none    | any    | PFNMAP / MIXEDMAP     | bus error (pages are inserted, not faulted) |
//! | file    | any    | nonlinear             | page `pgoff` of the file |
//! | swap    | any    | private anonymous     | new frame with the slot's contents |
//! | present | write, read-only PTE | shared  | upgrade in place (no invalidation) |
//! | present | write, read-only PTE | private | reuse an exclusive anonymous page, else copy (bracket, `Event::Clear`) |

use std::sync::atomic::{AtomicU64, Ordering};

use super::page_table::Leaf;
use super::pte::{bits, PresentPte, Pte};
use super::vma::{SpecialFault, SpecialSource, VmFlags, Vma, VmaKind};
use super::{Mm, MmError, MmState};
use crate::frame::{Pfn, FRAME_WORDS};
use crate::notifier::Event;
use crate::PAGE_SIZE;

impl Mm {
    /// Fault the page at `addr` (page aligned) in for a read or a write and
    /// return its present PTE, with the accessed (and for a write the dirty)
    /// bit set.
    ///
    /// # Locking
    /// Caller holds the mmap lock (shared is enough).
    pub(crate) fn fault_locked(
        &self,
        st: &MmState,
        addr: u64,
        write: bool,
    ) -> Result<PresentPte, MmError> {
        if st.exited {
            return Err(MmError::Exited);
        }
        let vma = st.vma(addr).ok_or(MmError::NoVma { addr })?;
        let need = if write { VmFlags::WRITE } else { VmFlags::READ };
        if !vma.flags.contains(need) {
            return Err(MmError::Permission { addr });
        }
        if let Some(leaf) = st.pt.leaf(addr) {
            let e = leaf.entry(addr);
            let raw = e.load(Ordering::Acquire);
            if let Pte::Present(p) = Pte::decode(raw) {
                if !write || p.write {
                    touch(e, raw, write);
                    return Ok(p);
                }
            }
        }
        let leaf = st.pt.leaf_alloc(addr);
        let e = leaf.entry(addr);
        loop {
            let raw = e.load(Ordering::Acquire);
            match Pte::decode(raw) {
                Pte::Present(p) if !write || p.write => {
                    touch(e, raw, write);
                    return Ok(p);
                }
                Pte::Present(p) => self.do_wp_page(vma, addr, leaf, raw, p)?,
                Pte::None => self.do_none(vma, addr, e, write)?,
                Pte::File { pgoff } => {
                    if !vma.flags.contains(VmFlags::NONLINEAR) {
                        return Err(MmError::Bus { addr });
                    }
                    let file = vma.kind.file().ok_or(MmError::Bus { addr })?;
                    self.file_fault(vma, addr, e, raw, file, pgoff, write)?;
                }
                Pte::Swap { slot } => self.do_swap_page(vma, addr, e, raw, slot)?,
            }
        }
    }

    /// Install a PTE for a frame someone else already holds (page cache,
    /// special list, inserted page): takes the mapping's reference first.
    pub(crate) fn install_existing(
        &self,
        vma: &Vma,
        addr: u64,
        e: &AtomicU64,
        old: u64,
        new: PresentPte,
    ) -> bool {
        let holds = self.holds_ref(vma, addr, new);
        if holds {
            self.mem.map_page(new.pfn);
        }
        let ok = self.cas_pte(vma, e, addr, old, new.encode());
        if !ok && holds {
            self.mem.unmap_page(new.pfn);
            self.mem.put_page(new.pfn);
        }
        ok
    }

    /// Install a PTE for a frame just allocated with one reference (which
    /// becomes the mapping's); the frame is released if the race is lost.
    fn install_new(&self, vma: &Vma, addr: u64, e: &AtomicU64, old: u64, new: PresentPte) -> bool {
        let ok = self.cas_pte(vma, e, addr, old, new.encode());
        if ok {
            self.mem.mapcount_inc(new.pfn);
        } else {
            self.mem.put_page(new.pfn);
        }
        ok
    }

    fn do_none(&self, vma: &Vma, addr: u64, e: &AtomicU64, write: bool) -> Result<(), MmError> {
        match &vma.kind {
            VmaKind::Anon => {
                if write {
                    let pfn = self.mem.alloc_page(true)?;
                    self.install_new(vma, addr, e, 0, PresentPte::new(pfn, true, false));
                } else {
                    let z = PresentPte {
                        pfn: self.mem.zero,
                        write: false,
                        dirty: false,
                        young: true,
                        special: self.pte_special,
                    };
                    self.cas_pte(vma, e, addr, 0, z.encode());
                }
                Ok(())
            }
            VmaKind::SharedAnon(f) | VmaKind::File(f) => {
                self.file_fault(vma, addr, e, 0, f, vma.linear_pgoff(addr), write)
            }
            VmaKind::PfnMap | VmaKind::MixedMap => Err(MmError::Bus { addr }),
            VmaKind::Special(sm) => {
                // Seed 002: `pgoff = vmf->pgoff - vma->vm_pgoff`, the
                // offset relative to the VMA that faults (after a split,
                // relative to that part), for the page list and the
                // callback alike.
                let pgoff = (addr - vma.start) >> crate::PAGE_SHIFT;
                let pfn = match &sm.source {
                    SpecialSource::Pages(list) => usize::try_from(pgoff)
                        .ok()
                        .and_then(|i| list.get(i))
                        .copied()
                        .ok_or(MmError::Bus { addr })?,
                    SpecialSource::Fault(cb) => cb(&SpecialFault { addr, pgoff, write })
                        .map_err(|_| MmError::Bus { addr })?,
                };
                let writable = vma.flags.contains(VmFlags::SHARED.union(VmFlags::WRITE));
                let special = self.pte_special && !self.mem.frames.pfn_valid(pfn);
                self.install_existing(vma, addr, e, 0, PresentPte::new(pfn, writable, special));
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn file_fault(
        &self,
        vma: &Vma,
        addr: u64,
        e: &AtomicU64,
        old: u64,
        file: &super::FileObj,
        pgoff: u64,
        write: bool,
    ) -> Result<(), MmError> {
        let page = file.find_or_create(pgoff, addr)?;
        if vma.flags.contains(VmFlags::SHARED) {
            let writable = vma.flags.contains(VmFlags::WRITE);
            let mut p = PresentPte::new(page, writable, false);
            p.dirty = write;
            self.install_existing(vma, addr, e, old, p);
        } else if write {
            let new = self.mem.alloc_copy(page)?;
            self.install_new(vma, addr, e, old, PresentPte::new(new, true, false));
        } else {
            self.install_existing(vma, addr, e, old, PresentPte::new(page, false, false));
        }
        Ok(())
    }

    fn do_swap_page(
        &self,
        vma: &Vma,
        addr: u64,
        e: &AtomicU64,
        old: u64,
        slot: u64,
    ) -> Result<(), MmError> {
        let new = self.mem.alloc_page(true)?;
        if !self.mem.swap_read(slot, new)? {
            // Another fault swapped this entry in and freed the slot.
            self.mem.put_page(new);
            return Ok(());
        }
        let mut p = PresentPte::new(new, vma.flags.contains(VmFlags::WRITE), false);
        p.dirty = true;
        if self.install_new(vma, addr, e, old, p) {
            self.mem.swap_free(slot);
        }
        Ok(())
    }

    /// Write fault on a present read-only PTE in a writable VMA (`do_wp_page`).
    fn do_wp_page(
        &self,
        vma: &Vma,
        addr: u64,
        leaf: &Leaf,
        raw: u64,
        p: PresentPte,
    ) -> Result<(), MmError> {
        let e = leaf.entry(addr);
        if vma.flags.contains(VmFlags::SHARED) {
            // wp_page_reuse of a shared mapping: a permission upgrade.
            let _g = leaf.lock.lock();
            self.cas_pte(
                vma,
                e,
                addr,
                raw,
                raw | bits::WRITE | bits::DIRTY | bits::YOUNG,
            );
            return Ok(());
        }
        let holds = self.holds_ref(vma, addr, p);
        if holds {
            if let Some(i) = self.mem.info(p.pfn) {
                if i.anon && i.refcount == 1 && i.mapcount == 1 {
                    let _g = leaf.lock.lock();
                    self.cas_pte(
                        vma,
                        e,
                        addr,
                        raw,
                        raw | bits::WRITE | bits::DIRTY | bits::YOUNG,
                    );
                    return Ok(());
                }
            }
        }
        // wp_page_copy: copy the old contents (nothing to copy from the zero
        // page; a raw PFN is read from device memory when there is some).
        let new = if p.pfn != self.mem.zero && self.mem.frames.pfn_valid(p.pfn) {
            self.mem.alloc_copy(p.pfn)?
        } else {
            self.mem.alloc_page(true)?
        };
        if p.pfn != self.mem.zero && !self.mem.frames.pfn_valid(p.pfn) {
            let r = if let Some(io) = self.mem.store_for(p.pfn) {
                (0..FRAME_WORDS)
                    .try_for_each(|w| self.mem.frames.store(new, w * 8, io.load(p.pfn, w * 8)?))
            } else {
                Ok(())
            };
            if let Err(err) = r {
                self.mem.put_page(new);
                return Err(err.into());
            }
        }
        let mut br = match self.begin(addr, addr + PAGE_SIZE, Event::Clear) {
            Ok(b) => b,
            Err(err) => {
                self.mem.put_page(new);
                return Err(err);
            }
        };
        let replaced = {
            let _g = leaf.lock.lock();
            if e.load(Ordering::Acquire) == raw {
                br.clear(addr);
                self.cas_pte(
                    vma,
                    e,
                    addr,
                    raw,
                    PresentPte::new(new, true, false).encode(),
                )
            } else {
                false
            }
        };
        if replaced {
            self.mem.mapcount_inc(new);
            if holds {
                self.mem.unmap_page(p.pfn);
                br.defer_put(p.pfn);
            }
            br.end()
        } else {
            let ended = br.end();
            self.mem.put_page(new);
            ended
        }
    }

    /// Fault in every page of `[start, end)` (`populate` / `mlock`): write
    /// faults in private writable mappings, read faults elsewhere. Pages that
    /// cannot be faulted (bus errors) are skipped.
    pub(crate) fn populate(&self, st: &MmState, start: u64, end: u64) -> Result<(), MmError> {
        let mut a = start;
        while a < end {
            let Some(vma) = st.vma(a) else { break };
            let write = vma.flags.contains(VmFlags::WRITE) && !vma.flags.contains(VmFlags::SHARED);
            match self.fault_locked(st, a, write) {
                Ok(_) | Err(MmError::Bus { .. }) | Err(MmError::Permission { .. }) => {}
                Err(err) => return Err(err),
            }
            a += PAGE_SIZE;
        }
        Ok(())
    }

    /// The PFN in a present PTE at `addr`, for tests and tools.
    pub(crate) fn present_at(&self, st: &MmState, addr: u64) -> Option<Pfn> {
        Pte::decode(st.pt.get(addr)).present().map(|p| p.pfn)
    }
}

/// Set the accessed (and dirty) bits of a present PTE in place.
#[inline]
fn touch(e: &AtomicU64, raw: u64, write: bool) {
    let want = bits::YOUNG | if write { bits::DIRTY } else { 0 };
    if raw & want != want {
        let _ = e.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v & bits::PRESENT != 0 && v & want != want).then_some(v | want)
        });
    }
}
