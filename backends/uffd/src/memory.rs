//! Real memory as a primary: [`RealMemory`] (a `FrameStore` whose frames
//! are the process's own pages) and [`UffdPrimary`] (a `Primary` over a
//! monitor's registered ranges), so the secondary-MMU toolkit can mirror
//! real memory.
//!
//! # Frame numbers
//! A "pfn" here is the host **virtual** page number: `pfn = va >> 12`. A
//! secondary reaching a frame through it accesses the process's memory at
//! that virtual address through the kernel (below): copy-on-write, the
//! zero page and write protection are handled by the kernel's fault path,
//! and a missing page of a MISSING range is served by the monitor's
//! handler (so a monitor must be driven, e.g. by [`UffdMonitor::spawn`]).
//!
//! # Accesses never fault in this process
//! A device access ([`FrameStore::load`], [`FrameStore::store`],
//! [`FrameStore::fetch_add`]) goes through the kernel:
//! `process_vm_readv` / `process_vm_writev` on this very process. A page
//! the application unmapped meanwhile (UNMAP is announced only after the
//! fact) gives a typed error ([`FrameError::InvalidPfn`], the frame is not
//! one of this store any more) instead of SIGSEGV, and a page not yet
//! populated is faulted in by the kernel, through the monitor's handler
//! when the range is registered for MISSING faults (as an ODP device's
//! page request would be). One access costs a system call (see
//! docs/BENCHMARKS.md, `real_memory`).
//!
//! `fetch_add` reads and writes through the same path under a striped
//! lock: it is atomic with respect to every other `fetch_add` of this
//! process's `RealMemory` stores (the word's stripe), **not** with
//! respect to a CPU thread storing to the same word at the same time.
//! That is the guarantee RDMA gives its atomics with `IBV_ATOMIC_HCA`
//! (atomic among the HCA's own atomics only); a CPU that must race a
//! device's atomics uses atomics itself on memory nobody unmaps.
//!
//! A `madvise` zap of pages a secondary is accessing must be announced
//! ([`UffdMonitor::madvise`]): unannounced, a device access under its lock
//! can take a missing fault that only the monitor serves while the monitor
//! waits for that lock (see the crate docs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use notifier_core::frame::{FrameError, FrameStore, Pfn};
use notifier_core::notifier::NotifierSubscriptions;
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::{PAGE_SHIFT, PAGE_SIZE};

use crate::handler::{Fill, PageFault};
use crate::monitor::{Inner, UffdMonitor};
use crate::registry::RegisterMode;
use crate::{sys, sys_vm};

/// The stripes serialising `fetch_add` (per word address hash).
static ATOMICS: [parking_lot::Mutex<()>; 64] = [const { parking_lot::Mutex::new(()) }; 64];

/// The process's own pages as frames: `pfn = va >> 12`, valid when inside
/// a range registered on the monitor.
#[derive(Clone)]
pub struct RealMemory {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for RealMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RealMemory").finish_non_exhaustive()
    }
}

impl RealMemory {
    /// The frames of `monitor`'s registered ranges.
    pub fn new(monitor: &UffdMonitor) -> Self {
        Self {
            inner: Arc::clone(&monitor.inner),
        }
    }

    fn word_addr(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        if off % 8 != 0 || off + 8 > PAGE_SIZE as usize {
            return Err(FrameError::OutOfBounds {
                offset: off,
                len: 8,
            });
        }
        if !self.pfn_valid(pfn) {
            return Err(FrameError::InvalidPfn(pfn.0));
        }
        Ok((pfn.0 << PAGE_SHIFT) + off as u64)
    }
}

impl FrameStore for RealMemory {
    /// Frames are the process's own pages: nothing to allocate.
    fn alloc(&self) -> Result<Pfn, FrameError> {
        Err(FrameError::OutOfMemory)
    }
    fn free(&self, _pfn: Pfn) {}
    fn pfn_valid(&self, pfn: Pfn) -> bool {
        pfn.0
            .checked_shl(PAGE_SHIFT)
            .filter(|a| a >> PAGE_SHIFT == pfn.0)
            .is_some_and(|a| self.inner.registry.read().lookup(a).is_some())
    }
    fn load(&self, pfn: Pfn, off: usize) -> Result<u64, FrameError> {
        sys_vm::read_word(self.word_addr(pfn, off)?).map_err(|_| FrameError::InvalidPfn(pfn.0))
    }
    fn store(&self, pfn: Pfn, off: usize, val: u64) -> Result<(), FrameError> {
        sys_vm::write_word(self.word_addr(pfn, off)?, val)
            .map_err(|_| FrameError::InvalidPfn(pfn.0))
    }
    fn fetch_add(&self, pfn: Pfn, off: usize, val: u64) -> Result<u64, FrameError> {
        let addr = self.word_addr(pfn, off)?;
        let _stripe = ATOMICS[((addr >> 3) as usize) % ATOMICS.len()].lock();
        let old = sys_vm::read_word(addr).map_err(|_| FrameError::InvalidPfn(pfn.0))?;
        sys_vm::write_word(addr, old.wrapping_add(val))
            .map_err(|_| FrameError::InvalidPfn(pfn.0))?;
        Ok(old)
    }
    fn allocated(&self) -> usize {
        0
    }
}

/// A monitor's registered ranges as a [`Primary`].
///
/// `fault_page` populates the page (asking the handler directly for a
/// missing page, `UFFDIO_CONTINUE` for a minor one, un-write-protecting
/// for a write to a tracked page, which logs it dirty; in an events-only
/// range through the kernel, `MADV_POPULATE_READ` / `WRITE`) and then
/// makes the kernel fault it in for the access (never a CPU access, so a
/// racing `munmap` gives [`PrimaryFault::NoMapping`], not SIGSEGV);
/// `lookup_page` reads the present and uffd-wp bits of `/proc/self/pagemap`
/// (readable unprivileged: only the PFN field is hidden) without faulting.
///
/// `ensure_covered` watches the range ([`UffdMonitor::watch`]) with the
/// primary's watch mode ([`RegisterMode::EVENTS`] unless
/// [`Self::with_watch_mode`] says otherwise).
pub struct UffdPrimary {
    monitor: UffdMonitor,
    frames: RealMemory,
    pagemap: File,
    watch_mode: RegisterMode,
}

impl core::fmt::Debug for UffdPrimary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UffdPrimary")
            .field("monitor", &self.monitor)
            .finish()
    }
}

const PM_PRESENT: u64 = 1 << 63;
const PM_UFFD_WP: u64 = 1 << 57;

impl UffdPrimary {
    /// A primary over `monitor`'s registered ranges.
    ///
    /// # Errors
    /// When `/proc/self/pagemap` cannot be opened.
    pub fn new(monitor: &UffdMonitor) -> std::io::Result<Self> {
        Ok(Self {
            monitor: monitor.clone(),
            frames: RealMemory::new(monitor),
            pagemap: File::open("/proc/self/pagemap")?,
            watch_mode: RegisterMode::EVENTS,
        })
    }

    /// The mode `ensure_covered` watches new ranges with (default
    /// [`RegisterMode::EVENTS`]; [`RegisterMode::MISSING`] sends first
    /// touches to the monitor's handler).
    pub fn with_watch_mode(mut self, mode: RegisterMode) -> Self {
        self.watch_mode = mode;
        self
    }

    /// The monitor.
    pub fn monitor(&self) -> &UffdMonitor {
        &self.monitor
    }

    fn pagemap_entry(&self, page: u64) -> u64 {
        let mut b = [0u8; 8];
        match self.pagemap.read_exact_at(&mut b, (page >> PAGE_SHIFT) * 8) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    /// Populate a missing page from the handler on this thread.
    fn populate(&self, inner: &Inner, pf: &PageFault) -> Result<(), PrimaryFault> {
        let mut buf = Box::new([0u8; PAGE_SIZE as usize]);
        let fd = std::os::fd::AsFd::as_fd(&inner.uffd);
        for _ in 0..1000 {
            let fill = match catch_unwind(AssertUnwindSafe(|| inner.handler.missing(pf, &mut buf)))
            {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    inner.report(format!("fault_page: {e}"));
                    return Err(PrimaryFault::Bus(pf.addr));
                }
                Err(_) => {
                    inner.report(format!("fault_page: handler panicked at {:#x}", pf.addr));
                    return Err(PrimaryFault::Bus(pf.addr));
                }
            };
            let r = match fill {
                Fill::Bytes => sys::copy(fd, pf.addr, &buf, true),
                Fill::Zero => sys::zeropage(fd, pf.addr, PAGE_SIZE, true),
            };
            match r {
                Ok(()) | Err(libc::EEXIST) | Err(libc::ENOENT) => return Ok(()),
                // A mapping change is pending; the monitor's driver applies it.
                Err(libc::EAGAIN) => std::thread::yield_now(),
                Err(_) => return Err(PrimaryFault::Bus(pf.addr)),
            }
        }
        Ok(())
    }
}

impl Primary for UffdPrimary {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        self.monitor.notifiers()
    }

    fn frames(&self) -> &dyn FrameStore {
        &self.frames
    }

    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        let page = addr & !(PAGE_SIZE - 1);
        let inner = &self.monitor.inner;
        for _ in 0..16 {
            // In the application's order: a page unmapped before this call
            // has no registration any more.
            let Some(reg) = self.monitor.registration(page) else {
                return Err(PrimaryFault::NoMapping(addr));
            };
            let pm = self.pagemap_entry(page);
            let present = pm & PM_PRESENT != 0;
            if present && (!write || pm & PM_UFFD_WP == 0) {
                return Ok(Translation {
                    pfn: Pfn(page >> PAGE_SHIFT),
                    writable: pm & PM_UFFD_WP == 0,
                });
            }
            let fd = std::os::fd::AsFd::as_fd(&inner.uffd);
            if !present && reg.mode.contains(RegisterMode::MISSING) {
                let pf = PageFault {
                    range: reg.range,
                    pgoff: reg.pgoff + (page - reg.range.start()) / PAGE_SIZE,
                    addr: page,
                    write,
                    thread_id: None,
                };
                self.populate(inner, &pf)?;
            } else if !present && reg.mode.contains(RegisterMode::MINOR) {
                let _ = sys::cont(fd, page, PAGE_SIZE, true);
            }
            if write && reg.mode.contains(RegisterMode::WP) {
                inner.registry.write().mark_dirty(page);
                let _ = sys::writeprotect(fd, page, PAGE_SIZE, false, true);
            }
            // The kernel faults the page in for the access (events-only
            // ranges: their first touch; others: what the steps above left,
            // e.g. COW on a write to the zero page). EFAULT / ENOMEM: the
            // page is not mapped (any more).
            match sys_vm::populate(page, PAGE_SIZE, write) {
                Ok(()) | Err(libc::EINTR) | Err(libc::EAGAIN) => {}
                Err(libc::EFAULT) | Err(libc::ENOMEM) => return Err(PrimaryFault::NoMapping(addr)),
                Err(_) => return Err(PrimaryFault::Bus(addr)),
            }
        }
        Err(PrimaryFault::NotPresent(addr))
    }

    fn ensure_covered(&self, start: u64, len: u64) -> Result<(), PrimaryFault> {
        self.monitor
            .watch(start, len, self.watch_mode)
            .map(drop)
            .map_err(|_| PrimaryFault::Unwatchable(start))
    }

    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        let page = addr & !(PAGE_SIZE - 1);
        // No wait on the event gate: called under device locks.
        self.monitor.inner.registry.read().lookup(page)?;
        let pm = self.pagemap_entry(page);
        (pm & PM_PRESENT != 0).then_some(Translation {
            pfn: Pfn(page >> PAGE_SHIFT),
            writable: pm & PM_UFFD_WP == 0,
        })
    }
}
