//! `mmap`: create a VMA (anonymous, shared anonymous, file, PFN map via
//! `remap_pfn_range`, mixed map, special mapping), optionally at a fixed
//! address (replacing what was there), locked or populated.

use std::sync::Arc;

use super::file::{FileObj, FileOptions};
use super::pte::{PresentPte, PTE_PFN_MAX};
use super::vma::{PageArray, PagesRef, Prot, SpecialMapping, SpecialSource, VmFlags, Vma, VmaKind};
use super::{page_len, pages, user_range, Mm, MmError, MmState, TASK_SIZE};
use crate::frame::Pfn;
use crate::notifier::Event;
use crate::PAGE_SIZE;

/// Lowest address `mmap` picks on its own.
pub const MMAP_MIN: u64 = 1 << 32;

/// What backs a new mapping.
#[derive(Clone, Debug)]
pub enum Backing {
    /// Anonymous memory (shared anonymous when the request is shared).
    Anon,
    /// A file from page `pgoff` on.
    File {
        /// The file.
        file: Arc<FileObj>,
        /// Page offset of the mapping's first page.
        pgoff: u64,
    },
    /// `remap_pfn_range`: raw PFNs `pfn..pfn + pages`, populated at once,
    /// `vm_pgoff = pfn` (the linearity rule).
    PfnMap {
        /// The first PFN.
        pfn: u64,
    },
    /// An empty `VM_PFNMAP` region filled by [`Mm::insert_pfn`].
    PfnMapEmpty,
    /// An empty `VM_MIXEDMAP` region filled by [`Mm::insert_pfn`] and
    /// [`Mm::insert_page`].
    MixedMap,
    /// A special mapping (seed 002).
    Special(Arc<SpecialMapping>),
}

/// An `mmap` request; build it with the constructors and modifiers.
#[derive(Clone, Debug)]
pub struct MmapRequest {
    /// `MAP_FIXED` address, or `None` to let `mmap` choose.
    pub addr: Option<u64>,
    /// Length in bytes (rounded up to pages).
    pub len: u64,
    /// Protection.
    pub prot: Prot,
    /// `MAP_SHARED`.
    pub shared: bool,
    /// `MAP_LOCKED`: populate now, never reclaim.
    pub locked: bool,
    /// `MAP_POPULATE`: populate now.
    pub populate: bool,
    /// The backing.
    pub backing: Backing,
    /// Seed 000's page array for the special PTEs of the mapping.
    pub pages: Option<Arc<PageArray>>,
}

impl MmapRequest {
    /// A request for `len` bytes with `backing`.
    pub fn new(len: u64, prot: Prot, backing: Backing) -> Self {
        Self {
            addr: None,
            len,
            prot,
            shared: false,
            locked: false,
            populate: false,
            backing,
            pages: None,
        }
    }
    /// Private anonymous memory.
    pub fn anon(len: u64, prot: Prot) -> Self {
        Self::new(len, prot, Backing::Anon)
    }
    /// A file mapping (private unless [`Self::shared`]).
    pub fn file(file: Arc<FileObj>, pgoff: u64, len: u64, prot: Prot) -> Self {
        Self::new(len, prot, Backing::File { file, pgoff })
    }
    /// `remap_pfn_range` of `pfn..` (private unless [`Self::shared`]).
    pub fn pfnmap(pfn: u64, len: u64, prot: Prot) -> Self {
        Self::new(len, prot, Backing::PfnMap { pfn })
    }
    /// A special mapping.
    pub fn special(sm: Arc<SpecialMapping>, len: u64, prot: Prot) -> Self {
        Self::new(len, prot, Backing::Special(sm))
    }
    /// At a fixed address (`MAP_FIXED`).
    pub fn at(mut self, addr: u64) -> Self {
        self.addr = Some(addr);
        self
    }
    /// `MAP_SHARED`.
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }
    /// `MAP_LOCKED`.
    pub fn locked(mut self) -> Self {
        self.locked = true;
        self
    }
    /// `MAP_POPULATE`.
    pub fn populate(mut self) -> Self {
        self.populate = true;
        self
    }
    /// Attach seed 000's page array.
    pub fn with_pages(mut self, pages: Arc<PageArray>) -> Self {
        self.pages = Some(pages);
        self
    }
}

impl Mm {
    /// `mmap`: create a mapping and return its address.
    ///
    /// # Errors
    /// [`MmError::Misaligned`], [`MmError::Range`],
    /// [`MmError::BeyondTaskSize`] for a bad fixed range;
    /// [`MmError::NoSpace`]; [`MmError::PfnTooLarge`]; [`MmError::Exited`];
    /// fault errors other than bus errors while populating a locked or
    /// populated mapping (the mapping then stays). Nothing existing changes
    /// on an argument error.
    ///
    /// # Locking
    /// Takes the mmap lock exclusively. A fixed mapping over existing ones
    /// unmaps them first inside an `Event::Unmap` bracket.
    pub fn mmap(&self, req: &MmapRequest) -> Result<u64, MmError> {
        let len = page_len(req.len)
            .filter(|l| *l != 0)
            .ok_or(MmError::Range(crate::RangeError::Empty))?;
        if let Some(a) = req.addr {
            user_range(a, len)?;
        }
        let npages = pages(len);
        let mut flags = req.prot.flags().union(VmFlags::MAYWRITE);
        if req.shared {
            flags = flags.union(VmFlags::SHARED);
        }
        if req.locked {
            flags = flags.union(VmFlags::LOCKED);
        }
        let (kind, pgoff) = match &req.backing {
            Backing::Anon if req.shared => (
                VmaKind::SharedAnon(self.create_file(FileOptions::new(npages))),
                0,
            ),
            Backing::Anon => (VmaKind::Anon, 0),
            Backing::File { file, pgoff } => {
                pgoff
                    .checked_add(npages)
                    .ok_or(MmError::Range(crate::RangeError::Wraps {
                        start: *pgoff,
                        len,
                    }))?;
                (VmaKind::File(file.clone()), *pgoff)
            }
            Backing::PfnMap { pfn } => {
                if pfn.checked_add(npages - 1).is_none_or(|l| l > PTE_PFN_MAX) {
                    return Err(MmError::PfnTooLarge { pfn: *pfn });
                }
                (VmaKind::PfnMap, *pfn)
            }
            Backing::PfnMapEmpty => (VmaKind::PfnMap, 0),
            Backing::MixedMap => (VmaKind::MixedMap, 0),
            Backing::Special(sm) => (VmaKind::Special(sm.clone()), 0),
        };
        match &kind {
            VmaKind::File(f) | VmaKind::SharedAnon(f) if f.can_nonlinear() => {
                flags = flags.union(VmFlags::CAN_NONLINEAR)
            }
            VmaKind::PfnMap => flags = flags.union(VmFlags::PFNMAP | VmFlags::IO),
            VmaKind::MixedMap => flags = flags.union(VmFlags::MIXEDMAP),
            // A fault callback may install valid frames (refcounted) or raw
            // PFNs (I/O memory, the vvar/hpet case): the kernel gives such
            // mappings VM_PFNMAP/VM_MIXEDMAP so `vm_normal_page` classifies
            // the raw ones without a bad-PTE report; MIXEDMAP keeps the
            // valid frames refcounted.
            VmaKind::Special(sm) if matches!(sm.source, SpecialSource::Fault(_)) => {
                flags = flags.union(VmFlags::MIXEDMAP)
            }
            _ => {}
        }
        let mut st = self.state.write();
        if st.exited {
            return Err(MmError::Exited);
        }
        let start = match req.addr {
            Some(a) => {
                self.do_munmap(&mut st, a, a + len, Event::Unmap)?;
                a
            }
            None => find_gap(&st, len)?,
        };
        let end = start + len;
        let pages_ref = req.pages.clone().map(|array| {
            array.open();
            PagesRef { array, offset: 0 }
        });
        let vma = Vma {
            start,
            end,
            flags,
            pgoff,
            kind,
            pages: pages_ref,
        };
        if let Backing::PfnMap { pfn } = req.backing {
            // remap_pfn_range: raw, special PTEs; COW mappings read-only.
            let writable = flags.contains(VmFlags::SHARED.union(VmFlags::WRITE));
            for i in 0..npages {
                let a = start + i * PAGE_SIZE;
                let p = PresentPte::new(Pfn(pfn + i), writable, self.pte_special);
                let e = st.pt.leaf_alloc(a).entry(a);
                if self.holds_ref(&vma, a, p) {
                    self.mem.map_page(p.pfn);
                }
                self.set_pte(&vma, e, a, 0, p.encode());
            }
        }
        st.vmas.insert(start, vma);
        if req.locked || req.populate {
            self.populate(&st, start, end)?;
        }
        Ok(start)
    }
}

/// The lowest free range of `len` bytes at or above [`MMAP_MIN`].
pub(crate) fn find_gap(st: &MmState, len: u64) -> Result<u64, MmError> {
    let mut cand = MMAP_MIN;
    for v in st
        .vmas
        .range(MMAP_MIN.saturating_sub(TASK_SIZE)..)
        .map(|(_, v)| v)
    {
        if v.end <= cand {
            continue;
        }
        if v.start >= cand.saturating_add(len) {
            break;
        }
        cand = v.end;
    }
    match cand.checked_add(len) {
        Some(e) if e <= TASK_SIZE => Ok(cand),
        _ => Err(MmError::NoSpace { len }),
    }
}
