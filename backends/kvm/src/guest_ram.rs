//! [`GuestRam`]: guest RAM that the VMM owns, the way Firecracker and
//! cloud-hypervisor keep it: one ordinary mapping of anonymous memory or of
//! a memfd, with 4 KiB pages or 2 MiB transparent huge pages. KVM memslots
//! point at it directly (see [`crate::RealGuestMemory`]): nothing is
//! pinned, no model address space sits in between, and KVM follows every
//! change of the host page table through the kernel's own mmu notifier.

use std::os::fd::{AsFd, BorrowedFd};

use crate::sys_ram::{RamAdvice, RamMap, HUGE};
use crate::KvmError;

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RamBacking {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`). The balloon
    /// gives pages back with `MADV_DONTNEED`; userfaultfd serves missing
    /// pages with `UFFDIO_COPY`.
    Anon,
    /// A memfd mapped shared: another process (a device backend) or a
    /// second mapping can see the same pages. The balloon punches holes with
    /// `MADV_REMOVE`; userfaultfd serves pages not yet in the page cache
    /// with `UFFDIO_COPY` (missing) and pages in the cache but not mapped
    /// with `UFFDIO_CONTINUE` (minor).
    Memfd,
}

/// The page size guest RAM asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RamPages {
    /// 4 KiB pages.
    Small,
    /// 2 MiB transparent huge pages (`MADV_HUGEPAGE`, 2 MiB aligned; the
    /// length must be a multiple of 2 MiB). Whether the kernel actually
    /// backs a range with huge pages depends on
    /// `/sys/kernel/mm/transparent_hugepage/{enabled,shmem_enabled}`.
    Huge,
}

/// Guest RAM owned by the VMM: one mapping, read and written only through
/// volatile accesses (the guest writes it concurrently).
#[derive(Debug)]
pub struct GuestRam {
    pub(crate) map: std::sync::Arc<RamMap>,
    backing: RamBacking,
    pages: RamPages,
}

impl GuestRam {
    /// Map `len` bytes of guest RAM.
    ///
    /// # Errors
    /// [`KvmError::Os`] when `len` is zero or not a multiple of the page
    /// size (2 MiB for [`RamPages::Huge`]), or when `memfd_create`,
    /// `ftruncate`, `mmap` or `madvise(MADV_HUGEPAGE)` fail.
    pub fn new(len: u64, backing: RamBacking, pages: RamPages) -> Result<Self, KvmError> {
        let len_us = usize::try_from(len)
            .map_err(|_| KvmError::os("mmap", std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let fd = match backing {
            RamBacking::Anon => None,
            RamBacking::Memfd => Some(
                crate::sys::memfd_create("notifier-guest-ram", len)
                    .map_err(|e| KvmError::os("memfd_create", e))?,
            ),
        };
        let map = RamMap::new(len_us, fd, pages == RamPages::Huge)
            .map_err(|e| KvmError::os("mmap guest RAM", e))?;
        Ok(Self {
            map: std::sync::Arc::new(map),
            backing,
            pages,
        })
    }

    /// Anonymous guest RAM with 4 KiB pages.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn anon(len: u64) -> Result<Self, KvmError> {
        Self::new(len, RamBacking::Anon, RamPages::Small)
    }

    /// Memfd-backed guest RAM with 4 KiB pages.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn memfd(len: u64) -> Result<Self, KvmError> {
        Self::new(len, RamBacking::Memfd, RamPages::Small)
    }

    /// The host address of the first byte now (it changes when the region
    /// is remapped, see [`crate::RealGuestMemory::remap_region`]).
    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the RAM is empty (never: construction refuses it).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// What backs it.
    pub fn backing(&self) -> RamBacking {
        self.backing
    }

    /// The page size asked for.
    pub fn pages(&self) -> RamPages {
        self.pages
    }

    /// The huge page size, when [`RamPages::Huge`].
    pub fn huge_page_size(&self) -> Option<u64> {
        (self.pages == RamPages::Huge).then_some(HUGE as u64)
    }

    /// The memfd, for memfd-backed RAM (to share it, or to fill its page
    /// cache with `pwrite` for minor-fault serving).
    pub fn memfd_fd(&self) -> Option<BorrowedFd<'_>> {
        self.map.fd().map(|f| f.as_fd())
    }

    /// Whether the mapping was unmapped behind the owner's back (an UNMAP or
    /// REMAP event seen by [`crate::RealGuestMemory`]).
    pub fn is_gone(&self) -> bool {
        self.map.is_gone()
    }

    /// Volatile copy of `[off, off + buf.len())` out of guest RAM. Faults
    /// in missing pages (which a userfaultfd handler may serve).
    ///
    /// # Errors
    /// [`KvmError::Unmapped`] (with the offset) when out of range or gone.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        let g = self.map.read();
        let s = slice_of(&g, off, buf.len())?;
        s.copy_to(buf);
        Ok(())
    }

    /// Volatile copy of `data` into guest RAM at `off`.
    ///
    /// # Errors
    /// As [`Self::read`].
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), KvmError> {
        let g = self.map.read();
        let s = slice_of(&g, off, data.len())?;
        s.copy_from(data);
        Ok(())
    }

    /// Give `[off, off + len)` back to the host: `MADV_DONTNEED` for
    /// anonymous RAM, `MADV_REMOVE` (hole punch) for a memfd. The next
    /// touch reads zeros (or whatever a userfaultfd handler serves). This is
    /// the raw zap; a VMM whose devices may be reading the range uses
    /// [`crate::RealGuestMemory::balloon_inflate`], which announces it.
    ///
    /// # Errors
    /// [`KvmError::Os`] for a bad range or a failing `madvise`.
    pub fn discard(&self, off: u64, len: u64) -> Result<(), KvmError> {
        let adv = match self.backing {
            RamBacking::Anon => RamAdvice::DontNeed,
            RamBacking::Memfd => RamAdvice::Remove,
        };
        self.madvise(off, len, adv)
    }

    /// Drop this mapping's page-table entries of `[off, off + len)`
    /// (`MADV_DONTNEED`) without giving memfd pages back: a memfd page stays
    /// in the page cache (the next touch is a minor fault), an anonymous
    /// page is freed like [`Self::discard`].
    ///
    /// # Errors
    /// As [`Self::discard`].
    pub fn drop_mappings(&self, off: u64, len: u64) -> Result<(), KvmError> {
        self.madvise(off, len, RamAdvice::DontNeed)
    }

    /// Fault `[off, off + len)` in for writing (`MADV_POPULATE_WRITE`):
    /// a deflated balloon range, or memory to pre-fault before a guest runs.
    ///
    /// # Errors
    /// As [`Self::discard`].
    pub fn populate(&self, off: u64, len: u64) -> Result<(), KvmError> {
        self.madvise(off, len, RamAdvice::PopulateWrite)
    }

    fn madvise(&self, off: u64, len: u64, adv: RamAdvice) -> Result<(), KvmError> {
        let (o, l) = (to_usize(off)?, to_usize(len)?);
        self.map
            .madvise(o, l, adv)
            .map_err(|e| KvmError::os("madvise", e))
    }
}

fn to_usize(v: u64) -> Result<usize, KvmError> {
    usize::try_from(v)
        .map_err(|_| KvmError::os("guest RAM", std::io::Error::from_raw_os_error(libc::EINVAL)))
}

fn slice_of<'a>(
    g: &'a crate::sys_ram::RamGuard<'_>,
    off: u64,
    len: usize,
) -> Result<vm_memory::VolatileSlice<'a>, KvmError> {
    usize::try_from(off)
        .ok()
        .and_then(|o| g.slice(o, len))
        .ok_or(KvmError::Unmapped(off))
}
