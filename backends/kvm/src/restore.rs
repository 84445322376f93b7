//! [`SnapshotRestore`]: lazy restore of guest RAM from a snapshot file
//! through userfaultfd, the way Firecracker's uffd handler does it, with
//! the balloon taken into account.
//!
//! Guest RAM is registered with `MISSING` (and `MINOR` for a memfd, see
//! [`restore_mode`]) on a monitor whose handler is a `SnapshotRestore`:
//!
//! - a **missing** page (never populated, by the vCPU through KVM, by a
//!   device view, by the VMM) is read from the snapshot at
//!   `page index * 4096` and installed with `UFFDIO_COPY`: each page is
//!   served from the snapshot **at most once** (a bitmap of served pages);
//! - a page the balloon **removed** (a `Clear` invalidation: `REMOVE` from
//!   `MADV_DONTNEED` / `MADV_REMOVE`, announced or not) and touched again
//!   is served as the zero page, never the snapshot: the guest gave that
//!   page away and must see zeros, as after a kernel balloon deflation;
//! - a **minor** fault (a memfd page in the page cache but not mapped here,
//!   e.g. after `MADV_DONTNEED` of the shared mapping) is answered with
//!   `UFFDIO_CONTINUE`: the page keeps its bytes and is not served again;
//! - a snapshot that cannot be read (a dead or truncated source, an I/O
//!   error) fails the fault: the monitor poisons the page
//!   (`UFFDIO_POISON`) and wakes the faulting thread, so the vCPU's
//!   `KVM_RUN` returns an error instead of hanging (a CPU access by the VMM
//!   would get SIGBUS, so a VMM reads restored memory through KVM or only
//!   after the restore succeeded).
//!
//! # Ordering
//! The monitor applies a `REMOVE` before it serves any later fault on its
//! range (`notifier-uffd`'s dispatch), and an announced zap runs its
//! `Clear` on the zapping thread before the zap: so the removed bit is set
//! before any fault that follows the zap asks for the page.
//!
//! # Locking
//! Lock-free: bitmaps of atomic words; the snapshot is read with `pread`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};
use notifier_core::{PAGE_SHIFT, PAGE_SIZE};
use notifier_uffd::{FaultError, FaultHandler, Fill, PageBuf, PageFault, RegisterMode};

use crate::guest_ram::RamBacking;

/// The registration mode for lazy restore: `MISSING` for anonymous RAM,
/// `MISSING | MINOR` for a memfd.
pub fn restore_mode(backing: RamBacking) -> RegisterMode {
    match backing {
        RamBacking::Memfd => RegisterMode::MISSING | RegisterMode::MINOR,
        _ => RegisterMode::MISSING,
    }
}

/// Counters of a [`SnapshotRestore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages copied in from the snapshot (`UFFDIO_COPY`).
    pub served: u64,
    /// Missing faults on removed pages, served as zeros.
    pub zero_after_remove: u64,
    /// Minor faults answered with `UFFDIO_CONTINUE`.
    pub continued: u64,
    /// Missing faults on a page already served once (served as zeros and
    /// counted: a second copy would resurrect old bytes).
    pub refaults: u64,
    /// Faults that failed (snapshot unreadable, out of range).
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    served: AtomicU64,
    zero_after_remove: AtomicU64,
    continued: AtomicU64,
    refaults: AtomicU64,
    failed: AtomicU64,
}

/// The restore handler: a `FaultHandler` for the monitor and (through
/// [`SnapshotRestore::balloon_watch`]) a range notifier that records pages
/// the balloon removed. Page `i` of the registration is byte `i * 4096` of
/// the snapshot.
#[derive(Debug)]
pub struct SnapshotRestore {
    file: File,
    pages: u64,
    /// Host address of page 0 of the RAM being restored (for `Clear`
    /// ranges, which name host addresses).
    base: AtomicU64,
    served: Box<[AtomicU64]>,
    removed: Box<[AtomicU64]>,
    counters: Counters,
}

fn bitmap(pages: u64) -> Box<[AtomicU64]> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn set(bits: &[AtomicU64], p: u64) -> bool {
    let m = 1u64 << (p % 64);
    bits[(p / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
}

fn get(bits: &[AtomicU64], p: u64) -> bool {
    bits[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
}

impl SnapshotRestore {
    /// A restorer of `pages` pages from `file`.
    pub fn new(file: File, pages: u64) -> Arc<Self> {
        Arc::new(Self {
            file,
            pages,
            base: AtomicU64::new(0),
            served: bitmap(pages),
            removed: bitmap(pages),
            counters: Counters::default(),
        })
    }

    /// Say where the RAM being restored is mapped now (before registering
    /// it, and again after moving it).
    pub fn set_base(&self, addr: u64) {
        self.base.store(addr, Ordering::Release);
    }

    /// The notifier to register on the monitor's notifier set so that
    /// balloon removals are recorded.
    pub fn balloon_watch(self: &Arc<Self>) -> Arc<dyn MmuNotifierOps> {
        Arc::new(BalloonWatch(self.clone()))
    }

    /// Whether page `i` was served from the snapshot.
    pub fn is_served(&self, i: u64) -> bool {
        i < self.pages && get(&self.served, i)
    }

    /// Whether page `i` was removed by the balloon.
    pub fn is_removed(&self, i: u64) -> bool {
        i < self.pages && get(&self.removed, i)
    }

    /// Counters.
    pub fn stats(&self) -> RestoreStats {
        let c = &self.counters;
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        RestoreStats {
            served: l(&c.served),
            zero_after_remove: l(&c.zero_after_remove),
            continued: l(&c.continued),
            refaults: l(&c.refaults),
            failed: l(&c.failed),
        }
    }

    fn fail(&self, msg: String) -> FaultError {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        FaultError(msg)
    }
}

impl FaultHandler for SnapshotRestore {
    fn missing(&self, f: &PageFault, page: &mut PageBuf) -> Result<Fill, FaultError> {
        let i = f.pgoff;
        if i >= self.pages {
            return Err(self.fail(format!("page {i} beyond the snapshot")));
        }
        if get(&self.removed, i) {
            self.counters
                .zero_after_remove
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Fill::Zero);
        }
        if set(&self.served, i) {
            self.counters.refaults.fetch_add(1, Ordering::Relaxed);
            return Ok(Fill::Zero);
        }
        match self.file.read_exact_at(page, i * PAGE_SIZE) {
            Ok(()) => {
                self.counters.served.fetch_add(1, Ordering::Relaxed);
                Ok(Fill::Bytes)
            }
            Err(e) => {
                // Not served after all: a later fault may try again.
                self.served[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
                Err(self.fail(format!("snapshot read of page {i}: {e}")))
            }
        }
    }

    fn minor(&self, _f: &PageFault) -> Result<(), FaultError> {
        self.counters.continued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Records the pages a `Clear` names as removed.
struct BalloonWatch(Arc<SnapshotRestore>);

impl MmuNotifierOps for BalloonWatch {
    fn hooks(&self) -> Hooks {
        Hooks::START
    }

    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        if r.event() != Event::Clear {
            return Ok(());
        }
        let s = &self.0;
        let base = s.base.load(Ordering::Acquire);
        let end = base + (s.pages << PAGE_SHIFT);
        let (a, b) = (r.start().max(base), r.end().min(end));
        if a < b {
            for p in (a - base) >> PAGE_SHIFT..(b - base) >> PAGE_SHIFT {
                set(&s.removed, p);
            }
        }
        Ok(())
    }
}
