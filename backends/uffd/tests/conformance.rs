//! The secondary-MMU conformance suite against a mirror fed by a running
//! monitor, over real memory (anonymous private and memfd shared).
//!
//! # What the adapter's `zap` does, and why
//!
//! The kernel releases the `madvise` caller as soon as the monitor has
//! *read* the REMOVE, so an unannounced zap runs concurrently with the
//! monitor's invalidation, and a device touching the page in between can
//! deadlock with the monitor (crate docs, *Zapping memory that devices
//! use*). The suite's devices run concurrently with zaps, so the adapter
//! zaps through `UffdMonitor::madvise`, which announces the zap with an
//! `Event::Clear` bracket around the real `madvise` (the kernel's REMOVE
//! then causes no second invalidation). An *unannounced* `madvise` is
//! tested single-threaded, with the guarantee the crate documents: a fault
//! raised after the zap is served only once the REMOVE's invalidation has
//! run.
//!
//! # munmap, then mmap again at the same address
//!
//! UNMAP is announced after the unmap; `munmap` returns once the event is
//! read, maybe before subscribers ran. What is guaranteed (and tested):
//! the monitor cuts the registration only after every subscriber's
//! callback for that UNMAP returned, so once `registration(addr)` is
//! `None` the mirror holds no translation of the old mapping, a device
//! access faults in and gets a typed `NoMapping` error instead of the old
//! translation, and re-registering the new mapping at the same address
//! succeeds (before that it fails with `Overlap`). After re-registration
//! the device sees the new mapping's contents through a fresh fault-in.
//! What is not guaranteed: that a device is kept off the range between the
//! unmap and its invalidation; it must not access memory the application
//! is unmapping at that moment (it would touch an unmapped page).

mod common;

use std::sync::Arc;

use common::{monitor, wait_until, P};
use notifier_core::addr::PageRange;
use notifier_core::frame::FrameStore;
use notifier_core::notifier::NotifierSubscriptions;
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::secondary::{MirrorConfig, MirrorError, Va};
use notifier_core::verify::{check_concurrent, check_secondary, CheckedMirror, ConformancePrimary};
use notifier_uffd::{
    Advice, Region, RegisterMode, UffdError, UffdMonitor, UffdPrimary, ZeroHandler,
};

const PAGES: u64 = 32;

/// Real memory registered on a monitor, as the suite's primary.
struct Real {
    prim: UffdPrimary,
    region: Arc<Region>,
    /// `MADV_DONTNEED` for anonymous memory; `MADV_REMOVE` for a memfd
    /// (DONTNEED only drops the PTEs of a shared mapping, the page cache
    /// keeps the contents, so the page would not read as zero).
    zap_advice: Advice,
    /// Registered with `RegisterMode::WP`.
    wp: bool,
}

impl Real {
    fn off(&self, addr: u64) -> u64 {
        addr - self.region.addr()
    }
}

impl Primary for Real {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        self.prim.notifiers()
    }
    fn frames(&self) -> &dyn FrameStore {
        self.prim.frames()
    }
    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        self.prim.fault_page(addr, write)
    }
    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.prim.lookup_page(addr)
    }
}

impl ConformancePrimary for Real {
    fn cpu_read(&self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        self.region.read(self.off(addr), &mut b).expect("cpu read");
        u64::from_le_bytes(b)
    }
    fn cpu_write(&self, addr: u64, val: u64) {
        self.region
            .write(self.off(addr), &val.to_le_bytes())
            .expect("cpu write");
    }
    fn zap(&self, addr: u64) {
        // Announced (see the module docs).
        self.prim
            .monitor()
            .madvise(&self.region, self.off(addr), P, self.zap_advice)
            .expect("announced madvise");
    }
    fn migrate(&self, _addr: u64) -> bool {
        // Real memory cannot be migrated from user space (move_pages keeps
        // the virtual page, which is the "frame" here).
        false
    }
    fn write_protect(&self, addr: u64) -> bool {
        self.wp
            && self
                .prim
                .monitor()
                .write_protect(PageRange::new(addr, P).expect("page"))
                .is_ok()
    }
}

/// Register `region`, with WP if the kernel allows it for this memory.
fn register(m: &UffdMonitor, region: &Region) -> bool {
    match m.register(region, RegisterMode::MISSING | RegisterMode::WP) {
        Ok(_) => true,
        Err(UffdError::UnsupportedMode(_)) => {
            m.register(region, RegisterMode::MISSING).unwrap();
            false
        }
        Err(e) => panic!("register: {e}"),
    }
}

fn real(m: &UffdMonitor, region: Region, zap_advice: Advice) -> Arc<Real> {
    let wp = register(m, &region);
    Arc::new(Real {
        prim: UffdPrimary::new(m).unwrap(),
        region: Arc::new(region),
        zap_advice,
        wp,
    })
}

fn mirror(p: &Arc<Real>) -> CheckedMirror<Real, Va> {
    // `Oracle::new` reads `UffdPrimary::lookup_page` under device locks: it
    // takes only the registry lock, which the monitor never holds while
    // calling subscribers, and reads /proc/self/pagemap.
    CheckedMirror::new(
        p.clone(),
        MirrorConfig::identity(p.region.addr(), p.region.len()),
    )
    .unwrap()
}

fn pages(p: &Real) -> Vec<u64> {
    (0..PAGES).map(|i| p.region.addr() + i * P).collect()
}

fn conformance(region: impl FnOnce() -> Region, advice: Advice) {
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    // Spawned first so that it is dropped last: regions unmapped while the
    // monitor is still driven.
    let thread = m.spawn().unwrap();
    let p = real(&m, region(), advice);
    let cm = mirror(&p);
    let r = check_secondary(&*p, &cm, &pages(&p)).unwrap();
    assert_eq!(r.checks, PAGES * (4 + p.wp as u64));
    assert!(!r.migrated);
    assert_eq!(r.protected, p.wp);
    let accesses = check_concurrent(&*p, &cm, &pages(&p), 600).unwrap();
    assert!(accesses > 0);
    assert!(cm.oracle.checks() > 0);
    assert_eq!(
        cm.oracle.violation_count(),
        0,
        "{:?}",
        cm.oracle.violations()
    );
    let s = m.stats();
    assert!(s.removes > 0, "the kernel's REMOVE events were delivered");
    assert_eq!(m.last_error(), None);
    drop((cm, p));
    thread.stop();
}

/// The tests of this file run one at a time: one unmaps a page and maps it
/// back at the same address, and in between another test's thread could
/// map into the hole (the mapping back would then fail with `EEXIST`, see
/// `Region::map_fixed_over`).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed leaves the lock poisoned; the next still runs.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn conformance_anonymous_private() {
    let _serial = serial();
    conformance(|| Region::anon(PAGES * P).unwrap(), Advice::DontNeed);
}

#[test]
fn conformance_memfd_shared() {
    let _serial = serial();
    conformance(|| Region::memfd(PAGES * P).unwrap(), Advice::Remove);
}

#[test]
fn unannounced_madvise_is_seen_before_a_later_fault_is_served() {
    let _serial = serial();
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    let _thread = m.spawn().unwrap();
    for (region, advice) in [
        (Region::anon(4 * P).unwrap(), Advice::DontNeed),
        (Region::anon(4 * P).unwrap(), Advice::Free),
        (Region::memfd(4 * P).unwrap(), Advice::Remove),
    ] {
        let p = real(&m, region, advice);
        let cm = mirror(&p);
        let a = p.region.addr() + P;
        p.cpu_write(a, 0xabc);
        assert_eq!(cm.mirror.read_u64(0, a).unwrap(), 0xabc);
        let inv = cm.mirror.stats().invalidations;
        // The application's own madvise, no announcement.
        p.region.madvise(P, P, advice).unwrap();
        if advice != Advice::Free {
            // The CPU's missing fault is served only after the REMOVE's
            // invalidation ran.
            assert_eq!(p.cpu_read(a), 0);
            assert!(cm.mirror.stats().invalidations > inv);
            assert_eq!(cm.mirror.read_u64(0, a).unwrap(), 0);
        } else {
            // MADV_FREE may keep the contents until reclaim; the REMOVE is
            // still delivered.
            wait_until("free seen", || cm.mirror.stats().invalidations > inv);
        }
        assert_eq!(cm.mirror.translate(0, a + P), None, "untouched page");
        assert_eq!(
            cm.oracle.violation_count(),
            0,
            "{:?}",
            cm.oracle.violations()
        );
    }
}

#[test]
fn munmap_then_mmap_at_the_same_address_never_serves_the_old_translation() {
    let _serial = serial();
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    let _thread = m.spawn().unwrap();
    let p = real(&m, Region::anon(4 * P).unwrap(), Advice::DontNeed);
    let cm = mirror(&p);
    let base = p.region.addr();
    let a = base + 2 * P;
    for round in 0..20u64 {
        p.cpu_write(a, 0x1000 + round);
        assert_eq!(cm.mirror.read_u64(0, a).unwrap(), 0x1000 + round);
        assert!(cm.mirror.translate(0, a).is_some());
        let faults = cm.mirror.stats().faults;

        // The device is idle while the application unmaps (the hazard).
        p.region.munmap(2 * P, P).unwrap();
        // Registration is cut only after every subscriber ran for the UNMAP.
        wait_until("unmap applied", || m.registration(a).is_none());
        assert_eq!(cm.mirror.translate(0, a), None, "old translation gone");
        assert!(matches!(
            cm.mirror.read_u64(0, a),
            Err(MirrorError::Primary(PrimaryFault::NoMapping(_)))
        ));
        // Neighbours are still registered and mirrored.
        assert!(m.registration(base + P).is_some());
        assert_eq!(cm.mirror.read_u64(0, base + 3 * P).unwrap(), 0);

        // mmap again at the same address, register, use.
        p.region.map_fixed_over(2 * P, P).unwrap();
        let mode = if p.wp {
            RegisterMode::MISSING | RegisterMode::WP
        } else {
            RegisterMode::MISSING
        };
        m.register_range(&p.region, 2 * P, P, mode).unwrap();
        assert_eq!(p.cpu_read(a), 0, "fresh mapping");
        assert_eq!(cm.mirror.read_u64(0, a).unwrap(), 0, "fresh mapping");
        assert!(cm.mirror.stats().faults > faults, "re-faulted, not reused");
    }
    assert!(m.stats().unmaps >= 20);
    assert_eq!(
        cm.oracle.violation_count(),
        0,
        "{:?}",
        cm.oracle.violations()
    );
    assert_eq!(m.last_error(), None);
}
