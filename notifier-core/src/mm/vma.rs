//! Virtual memory areas: flags, kinds, the seed 000 page array, and split.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::file::FileObj;
use crate::frame::Pfn;
use crate::PAGE_SHIFT;

/// VMA flags (`vm_flags`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmFlags(u32);

impl VmFlags {
    /// No flags.
    pub const NONE: VmFlags = VmFlags(0);
    /// Readable.
    pub const READ: VmFlags = VmFlags(1 << 0);
    /// Writable.
    pub const WRITE: VmFlags = VmFlags(1 << 1);
    /// Executable.
    pub const EXEC: VmFlags = VmFlags(1 << 2);
    /// Shared: writes reach the backing object, no copy-on-write.
    pub const SHARED: VmFlags = VmFlags(1 << 3);
    /// May be made writable by `mprotect` (`VM_MAYWRITE`).
    pub const MAYWRITE: VmFlags = VmFlags(1 << 4);
    /// Raw PFN mapping (`remap_pfn_range`, `insert_pfn`).
    pub const PFNMAP: VmFlags = VmFlags(1 << 5);
    /// Mixed mapping: valid frames refcounted, raw PFNs not (seed 001).
    pub const MIXEDMAP: VmFlags = VmFlags(1 << 6);
    /// Nonlinear file mapping (seed 004).
    pub const NONLINEAR: VmFlags = VmFlags(1 << 7);
    /// The file supports nonlinear mapping (`VM_CAN_NONLINEAR`).
    pub const CAN_NONLINEAR: VmFlags = VmFlags(1 << 8);
    /// Locked in memory: populated at creation and kept present.
    pub const LOCKED: VmFlags = VmFlags(1 << 9);
    /// Device I/O memory.
    pub const IO: VmFlags = VmFlags(1 << 10);

    /// Whether every flag of `o` is set.
    #[inline]
    pub const fn contains(self, o: VmFlags) -> bool {
        self.0 & o.0 == o.0
    }
    /// Whether any flag of `o` is set.
    #[inline]
    pub const fn intersects(self, o: VmFlags) -> bool {
        self.0 & o.0 != 0
    }
    /// Union.
    #[inline]
    pub const fn union(self, o: VmFlags) -> VmFlags {
        VmFlags(self.0 | o.0)
    }
    /// `self` without the flags of `o`.
    #[inline]
    pub const fn without(self, o: VmFlags) -> VmFlags {
        VmFlags(self.0 & !o.0)
    }
    /// The kernel's `is_cow_mapping`: private and possibly writable.
    #[inline]
    pub const fn is_cow_mapping(self) -> bool {
        self.0 & (Self::SHARED.0 | Self::MAYWRITE.0) == Self::MAYWRITE.0
    }
}

impl core::ops::BitOr for VmFlags {
    type Output = VmFlags;
    fn bitor(self, rhs: VmFlags) -> VmFlags {
        self.union(rhs)
    }
}

impl core::fmt::Debug for VmFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const N: [&str; 11] = [
            "READ",
            "WRITE",
            "EXEC",
            "SHARED",
            "MAYWRITE",
            "PFNMAP",
            "MIXEDMAP",
            "NONLINEAR",
            "CAN_NONLINEAR",
            "LOCKED",
            "IO",
        ];
        let v: Vec<&str> = N
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect();
        if v.is_empty() {
            f.write_str("NONE")
        } else {
            f.write_str(&v.join("|"))
        }
    }
}

/// Protection bits (`PROT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// `PROT_READ`.
    pub read: bool,
    /// `PROT_WRITE`.
    pub write: bool,
    /// `PROT_EXEC`.
    pub exec: bool,
}

impl Prot {
    /// `PROT_NONE`.
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
        exec: false,
    };
    /// `PROT_READ`.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
        exec: false,
    };
    /// `PROT_READ | PROT_WRITE`.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
        exec: false,
    };

    /// The VMA flags of this protection.
    pub const fn flags(self) -> VmFlags {
        let mut f = VmFlags::NONE;
        if self.read {
            f = f.union(VmFlags::READ);
        }
        if self.write {
            f = f.union(VmFlags::WRITE);
        }
        if self.exec {
            f = f.union(VmFlags::EXEC);
        }
        f
    }
}

/// What a special mapping's fault callback is asked (the kernel's
/// `struct vm_fault`, seed 002).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialFault {
    /// The faulting page address.
    pub addr: u64,
    /// The page offset relative to the mapping (0 for its first page).
    pub pgoff: u64,
    /// Whether the fault is a write.
    pub write: bool,
}

/// A special mapping's fault callback failed (`VM_FAULT_SIGBUS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("special mapping fault handler failed")]
pub struct SpecialFaultError;

/// A special mapping's fault callback: the PFN that backs the page. A
/// valid frame is mapped as a normal (refcounted) page, a raw PFN as a
/// special one.
pub type SpecialFaultFn = dyn Fn(&SpecialFault) -> Result<Pfn, SpecialFaultError> + Send + Sync;

/// Where a special mapping's pages come from (seed 002).
pub enum SpecialSource {
    /// A page list; a fault past its end is a bus error.
    Pages(Vec<Pfn>),
    /// A fault callback; its failure is a bus error.
    Fault(Box<SpecialFaultFn>),
}

/// A special mapping (`struct vm_special_mapping`): a vdso-like region.
pub struct SpecialMapping {
    /// The name, e.g. `"[vdso]"`.
    pub name: &'static str,
    /// The page source.
    pub source: SpecialSource,
}

impl core::fmt::Debug for SpecialMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let src = match &self.source {
            SpecialSource::Pages(p) => format!("pages({})", p.len()),
            SpecialSource::Fault(_) => "fault".to_string(),
        };
        f.debug_struct("SpecialMapping")
            .field("name", &self.name)
            .field("source", &src)
            .finish()
    }
}

/// The release callback of a [`PageArray`].
pub type OnFree = dyn FnOnce(&[Pfn]) + Send;

/// Seed 000's page array: the pages that `vm_normal_page` returns for the
/// special PTEs of a mapping, whatever PFN the PTE holds (Xen's foreign
/// frames).
///
/// # Lifetime
/// Each VMA that refers to the array counts as one opener
/// (`vm_ops->open`/`close`). The array is created with one opener (the
/// creating VMA); splitting and forking open, unmapping closes; the
/// release callback runs when the last opener closes.
pub struct PageArray {
    pages: Vec<Pfn>,
    openers: AtomicUsize,
    freed: AtomicBool,
    on_free: parking_lot::Mutex<Option<Box<OnFree>>>,
}

impl core::fmt::Debug for PageArray {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageArray")
            .field("pages", &self.pages.len())
            .field("openers", &self.openers())
            .field("freed", &self.is_freed())
            .finish()
    }
}

impl PageArray {
    /// An array over `pages`; `on_free` runs once when the last VMA using
    /// it closes.
    pub fn new(pages: Vec<Pfn>, on_free: impl FnOnce(&[Pfn]) + Send + 'static) -> Arc<Self> {
        Arc::new(Self {
            pages,
            openers: AtomicUsize::new(0),
            freed: AtomicBool::new(false),
            on_free: parking_lot::Mutex::new(Some(Box::new(on_free))),
        })
    }
    /// The pages.
    pub fn pages(&self) -> &[Pfn] {
        &self.pages
    }
    /// VMAs currently open on the array.
    pub fn openers(&self) -> usize {
        self.openers.load(Ordering::Acquire)
    }
    /// Whether the last opener closed and the array was released.
    pub fn is_freed(&self) -> bool {
        self.freed.load(Ordering::Acquire)
    }
    pub(crate) fn open(&self) {
        self.openers.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn close(&self) {
        if self.openers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.freed.store(true, Ordering::Release);
            if let Some(f) = self.on_free.lock().take() {
                f(&self.pages);
            }
        }
    }
}

/// A VMA's reference into a [`PageArray`]: `vma->pages`, an array plus the
/// index of the VMA's first page in it.
#[derive(Clone, Debug)]
pub struct PagesRef {
    /// The array.
    pub array: Arc<PageArray>,
    /// Index in the array of the VMA's first page.
    pub offset: usize,
}

impl PagesRef {
    /// The page for the VMA's `index`-th page, if the array is long enough.
    #[inline]
    pub fn page(&self, index: u64) -> Option<Pfn> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.array.pages.get(self.offset.checked_add(i)?).copied())
    }
}

/// What backs a VMA.
#[derive(Clone, Debug)]
pub enum VmaKind {
    /// Private anonymous memory (zero page, then copy on write).
    Anon,
    /// Shared anonymous memory (a shmem object private to the mapping).
    SharedAnon(Arc<FileObj>),
    /// A file: shared or private per the VMA's `SHARED` flag.
    File(Arc<FileObj>),
    /// Raw PFNs laid out by `remap_pfn_range` or inserted by `insert_pfn`.
    PfnMap,
    /// Frames and raw PFNs inserted by `insert_page` / `insert_pfn`.
    MixedMap,
    /// A special mapping (page list or fault callback).
    Special(Arc<SpecialMapping>),
}

impl VmaKind {
    /// The file object, for file and shared anonymous mappings.
    pub fn file(&self) -> Option<&Arc<FileObj>> {
        match self {
            VmaKind::File(f) | VmaKind::SharedAnon(f) => Some(f),
            _ => None,
        }
    }
}

/// A virtual memory area `[start, end)` (`struct vm_area_struct`).
#[derive(Clone, Debug)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Flags.
    pub flags: VmFlags,
    /// Page offset of `start` in the backing object (for PFNMAP: the first
    /// PFN, the `remap_pfn_range` linearity rule).
    pub pgoff: u64,
    /// What backs it.
    pub kind: VmaKind,
    /// Seed 000's page array, consulted for special PTEs only.
    pub pages: Option<PagesRef>,
}

impl Vma {
    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        (self.end - self.start) >> PAGE_SHIFT
    }

    /// The page index of `addr` inside the VMA.
    #[inline]
    pub fn index_of(&self, addr: u64) -> u64 {
        (addr - self.start) >> PAGE_SHIFT
    }

    /// `linear_page_index`: the backing-object page offset of `addr`.
    #[inline]
    pub fn linear_pgoff(&self, addr: u64) -> u64 {
        self.pgoff.wrapping_add(self.index_of(addr))
    }

    /// Whether `addr` lies inside.
    #[inline]
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// `__split_vma(vma, addr, new_below)`: cut the VMA at `addr` and
    /// return the new part. With `new_below` the new VMA is the lower part
    /// `[start, addr)` and `self` keeps `[addr, end)` (its `pgoff` and page
    /// array advance by the pages cut off); otherwise the new VMA is the
    /// upper part and its `pgoff` and page array advance (seed 000). The
    /// new VMA opens the page array (`vm_ops->open`).
    ///
    /// `addr` must be page aligned and strictly inside; the callers check.
    pub fn split(&mut self, addr: u64, new_below: bool) -> Vma {
        debug_assert!(self.start < addr && addr < self.end);
        let delta = self.index_of(addr);
        let mut new = self.clone();
        if new_below {
            new.end = addr;
            self.start = addr;
            self.pgoff = self.pgoff.wrapping_add(delta);
            if let Some(p) = &mut self.pages {
                p.offset += delta as usize;
            }
        } else {
            self.end = addr;
            new.start = addr;
            new.pgoff = new.pgoff.wrapping_add(delta);
            if let Some(p) = &mut new.pages {
                p.offset += delta as usize;
            }
        }
        new.open();
        new
    }

    /// `vm_ops->open`: a new VMA refers to the same objects.
    pub(crate) fn open(&self) {
        if let Some(p) = &self.pages {
            p.array.open();
        }
    }

    /// `vm_ops->close`: the VMA goes away.
    pub(crate) fn close(&self) {
        if let Some(p) = &self.pages {
            p.array.close();
        }
    }
}
