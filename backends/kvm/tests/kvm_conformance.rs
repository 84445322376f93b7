//! The secondary-MMU conformance suite (`notifier_core::verify`) run
//! against the device-emulation view, over the real software primary, with
//! the coherence oracle checking every device access at the moment it
//! happens (under the translation cache's lock, through
//! `DeviceView::with_access_check`).
//!
//! Devices address guest-physical memory; the suite addresses the primary:
//! the adapters translate with `gpa = addr - GUEST_BASE`.
//!
//! Two allowances, both for the harness rather than the view:
//!
//! - `MmShadow` (the oracle's picture of the `Mm` page table) is updated by
//!   the PTE observer *after* the PTE store, while a concurrent fault walks
//!   the table lock-free: a fault can hand the view a translation a moment
//!   before the shadow has it. [`LagTolerant`] waits (bounded) for the
//!   shadow to catch up before judging. While the view's cache lock is held
//!   no invalidation of the page can complete, so the primary's entry can
//!   only gain (install, upgrade) in that wait, which is exactly the lag.
//! - The suite write-protects with `mprotect(READ)` then `mprotect(RW)`: a
//!   device write in between is refused by the primary (as a DMA write to a
//!   read-only page would be); `check_concurrent` retries it, as a device
//!   retries a faulted DMA.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{setup_mm, GUEST_BASE};
use notifier_core::frame::Pfn;
use notifier_core::mm::{Mm, MmapRequest, Prot};
use notifier_core::notifier::Event;
use notifier_core::secondary::AccessCheck;
use notifier_core::verify::{
    check_concurrent, check_secondary, MmShadow, Oracle, OracleMode, SecondaryUnderTest,
};
use notifier_core::PAGE_SIZE;
use notifier_kvm::{DeviceView, KvmMirror};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MemoryRegionAddress};

const LEN: u64 = 64 * PAGE_SIZE;

/// A strict oracle over an `MmShadow` that first waits (up to 100 ms) for
/// the shadow to show what the device is about to use (see the module docs).
struct LagTolerant {
    shadow: Arc<MmShadow>,
    oracle: Arc<Oracle>,
}

impl LagTolerant {
    /// Attach to `mm` (takes its PTE-observer slot): before mapping.
    fn attach(mm: &Mm) -> Arc<Self> {
        let shadow = MmShadow::attach(mm);
        let s = shadow.clone();
        let oracle = Oracle::with_mode(Box::new(move |a| s.lookup(a)), OracleMode::Strict);
        Arc::new(Self { shadow, oracle })
    }
}

impl AccessCheck for LagTolerant {
    fn check_access(&self, device: usize, addr: u64, pfn: Pfn, write: bool) {
        let deadline = Instant::now() + Duration::from_millis(100);
        while !matches!(self.shadow.lookup(addr), Some(t) if t.pfn == pfn && (t.writable || !write))
            && Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        self.oracle.check_access(device, addr, pfn, write);
    }
    fn on_fill(&self, addr: u64, pfn: Pfn, writable: bool) {
        self.oracle.on_fill(addr, pfn, writable);
    }
    fn on_invalidate(&self, start: u64, end: u64, event: Event) {
        self.oracle.on_invalidate(start, end, event);
    }
}

/// Which `Bytes` implementation the adapter goes through.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// `Bytes<GuestAddress>` of `DeviceView` (vm-memory's blanket impl over
    /// `GuestMemory::get_slices`).
    View,
    /// `Bytes<MemoryRegionAddress>` of the region (`GuestMemoryBackend`).
    Region,
}

/// The device-emulation view as the suite drives it.
struct DeviceUnderTest {
    view: DeviceView<Mm>,
    oracle: Arc<Oracle>,
    path: Path,
}

impl DeviceUnderTest {
    fn gpa(addr: u64) -> u64 {
        addr - GUEST_BASE
    }
}

impl SecondaryUnderTest for DeviceUnderTest {
    fn read(&self, addr: u64) -> Result<u64, String> {
        let gpa = Self::gpa(addr);
        match self.path {
            Path::View => self.view.read_obj::<u64>(GuestAddress(gpa)),
            Path::Region => {
                let r = self
                    .view
                    .regions()
                    .find_region(GuestAddress(gpa))
                    .ok_or("no region")?;
                let off = gpa - vm_memory::GuestMemoryRegion::start_addr(r).0;
                r.read_obj::<u64>(MemoryRegionAddress(off))
            }
        }
        .map_err(|e| format!("device read at gpa {gpa:#x}: {e}"))
    }

    fn write(&self, addr: u64, val: u64) -> Result<(), String> {
        self.write_once(addr, val)
            .map_err(|e| format!("device write at {addr:#x}: {e}"))
    }

    fn violations(&self) -> u64 {
        self.oracle.violation_count()
    }
}

impl DeviceUnderTest {
    fn write_once(&self, addr: u64, val: u64) -> Result<(), vm_memory::GuestMemoryError> {
        let gpa = Self::gpa(addr);
        match self.path {
            Path::View => self.view.write_obj(val, GuestAddress(gpa)),
            Path::Region => {
                let r = self.view.regions().find_region(GuestAddress(gpa)).ok_or(
                    vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)),
                )?;
                let off = gpa - vm_memory::GuestMemoryRegion::start_addr(r).0;
                r.write_obj(val, MemoryRegionAddress(off))
            }
        }
    }
}

/// A mirror of `LEN` bytes of anonymous memory at gpa 0, its device view
/// checked by an oracle that was attached before anything was mapped.
fn setup(test: &str, path: Path) -> Option<(Arc<Mm>, KvmMirror<Mm>, DeviceUnderTest)> {
    let (_kvm, mm, mirror) = setup_mm(test, 1024)?;
    let check = LagTolerant::attach(&mm);
    let oracle = check.oracle.clone();
    mm.mmap(&MmapRequest::anon(LEN, Prot::RW).at(GUEST_BASE))
        .unwrap();
    mirror.add_region_at(0, GUEST_BASE, LEN, 0).unwrap();
    let view = DeviceView::with_access_check(&mirror, check, 0).unwrap();
    Some((mm, mirror, DeviceUnderTest { view, oracle, path }))
}

fn pages(n: u64) -> Vec<u64> {
    (0..n).map(|i| GUEST_BASE + i * PAGE_SIZE).collect()
}

#[test]
fn device_view_passes_the_conformance_suite() {
    for path in [Path::View, Path::Region] {
        let Some((mm, _mirror, dev)) = setup("device_view_passes_the_conformance_suite", path)
        else {
            return;
        };
        let r = check_secondary(&*mm, &dev, &pages(32)).unwrap_or_else(|e| {
            panic!("{path:?}: {e}\n{:#?}", dev.oracle.violations());
        });
        assert!(r.migrated && r.protected, "{path:?}: {r:?}");
        assert!(
            dev.oracle.checks() >= r.checks,
            "{path:?}: accesses were checked"
        );
    }
}

#[test]
fn device_view_stays_coherent_under_concurrent_primary_changes() {
    for path in [Path::Region, Path::View] {
        let Some((mm, _mirror, dev)) = setup(
            "device_view_stays_coherent_under_concurrent_primary_changes",
            path,
        ) else {
            return;
        };
        // The device thread may start late on a loaded machine: run rounds
        // until it has made a fair number of accesses (bounded).
        let mut n = 0;
        // (1,500 rounds take 1-4 ms here, shorter than a thread start under
        // load.)
        for _ in 0..10 {
            n += check_concurrent(&*mm, &dev, &pages(16), 20_000).unwrap_or_else(|e| {
                panic!("{path:?}: {e}\n{:#?}", dev.oracle.violations());
            });
            if n >= 10_000 {
                break;
            }
        }
        assert!(n > 0, "{path:?}: the device made no access in 10 runs");
        eprintln!(
            "{path:?}: {n} device accesses, {} checked",
            dev.oracle.checks()
        );
    }
}

/// The adapter's oracle is live: a primary that skips the invalidation of
/// `madvise(DONTNEED)` leaves the cache stale, and the next device read is
/// reported.
#[test]
fn oracle_catches_a_primary_that_skips_an_invalidation() {
    for inject in [false, true] {
        let Some((mm, _mirror, dev)) = setup(
            "oracle_catches_a_primary_that_skips_an_invalidation",
            Path::View,
        ) else {
            return;
        };
        mm.write_u64(GUEST_BASE, 1).unwrap();
        assert_eq!(dev.read(GUEST_BASE).unwrap(), 1);
        if inject {
            mm.inject().set_skip_event(Some(Event::Clear));
        }
        mm.madvise(GUEST_BASE, PAGE_SIZE, notifier_core::mm::Advice::DontNeed)
            .unwrap();
        mm.write_u64(GUEST_BASE + PAGE_SIZE, 2).unwrap();
        let _ = dev.read(GUEST_BASE);
        assert_eq!(dev.violations() >= 1, inject, "inject={inject}");
    }
}
