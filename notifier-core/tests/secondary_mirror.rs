//! The secondary-MMU toolkit against the test primary: conformance, the
//! fault-injection switches (each must make the oracle fail, and the same
//! scenario without it must not), snapshot mode and permissions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notifier_core::frame::FrameStore;
use notifier_core::notifier::{Event, NotifierSubscriptions};
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::secondary::*;
use notifier_core::verify::*;
use notifier_core::{PageRange, PAGE_SIZE};

const BASE: u64 = 0x4000_0000;
const LEN: u64 = 64 * PAGE_SIZE;

fn setup() -> (Arc<TestPrimary>, CheckedMirror<TestPrimary, Va>) {
    let p = TestPrimary::new(PageRange::new(BASE, LEN).unwrap(), 1024);
    let m = CheckedMirror::new(p.clone(), MirrorConfig::identity(BASE, LEN)).unwrap();
    (p, m)
}

fn pages(n: u64) -> Vec<u64> {
    (0..n).map(|i| BASE + i * PAGE_SIZE).collect()
}

#[test]
fn conformance_single_threaded() {
    let (p, m) = setup();
    let r = check_secondary(&*p, &m, &pages(16)).unwrap();
    assert!(r.migrated && r.protected && r.checks >= 16 * 6);
    assert!(m.oracle.checks() > 0);
}

#[test]
fn conformance_concurrent() {
    let (p, m) = setup();
    let n = check_concurrent(&*p, &m, &pages(8), 5_000).unwrap();
    assert!(n > 0);
    let s = m.mirror.stats();
    assert!(s.invalidations > 0 && s.faults > 0);
}

/// Map a page into the device, then unmap and re-fault it in the primary.
fn unmap_scenario(m: &CheckedMirror<TestPrimary, Va>, p: &TestPrimary) {
    let a = BASE;
    p.cpu_write(a, 1);
    assert_eq!(m.read(a).unwrap(), 1);
    p.unmap(a, a + PAGE_SIZE);
    // Another page takes the freed frame; `a` gets a new one.
    p.cpu_write(a + PAGE_SIZE, 3);
    p.cpu_write(a, 2);
    let _ = m.read(a);
}

#[test]
fn skipping_an_event_kind_is_caught() {
    let (p, m) = setup();
    unmap_scenario(&m, &p);
    assert_eq!(m.oracle.violation_count(), 0, "clean run must be clean");

    let (p, m) = setup();
    m.mirror.inject().set_skip_event(Some(Event::Unmap));
    unmap_scenario(&m, &p);
    assert!(m.oracle.violation_count() >= 1);
    let v = &m.oracle.violations()[0];
    assert_eq!(v.addr, BASE);
    assert!(
        v.history
            .iter()
            .any(|h| matches!(h, HistoryEvent::Fill { .. })),
        "history names the fill: {v}"
    );
}

#[test]
fn late_tlb_flush_is_caught() {
    let scenario = |m: &CheckedMirror<TestPrimary, Va>, p: &TestPrimary| {
        p.cpu_write(BASE, 7);
        assert_eq!(m.read(BASE).unwrap(), 7); // fills the TLB
        p.migrate(BASE).unwrap();
        let _ = m.read(BASE); // TLB hit on the old frame if not flushed
    };
    let (p, m) = setup();
    scenario(&m, &p);
    assert_eq!(m.oracle.violation_count(), 0);

    let (p, m) = setup();
    m.mirror.inject().set_flush_after_end(true);
    scenario(&m, &p);
    assert!(m.oracle.violation_count() >= 1);
}

/// A primary that runs an invalidation of the page right after computing a
/// translation for a secondary: the window `read_retry` exists for.
struct RacyPrimary {
    inner: Arc<TestPrimary>,
    armed: AtomicBool,
}

impl Primary for RacyPrimary {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        self.inner.notifiers()
    }
    fn frames(&self) -> &dyn FrameStore {
        self.inner.frames()
    }
    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        let t = self.inner.fault_page(addr, write)?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.inner.migrate(addr)?;
        }
        Ok(t)
    }
    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.inner.lookup_page(addr)
    }
}

#[test]
fn skipping_read_retry_is_caught() {
    for inject in [false, true] {
        let inner = TestPrimary::new(PageRange::new(BASE, LEN).unwrap(), 1024);
        let p = Arc::new(RacyPrimary {
            inner,
            armed: AtomicBool::new(true),
        });
        let oracle = Oracle::new(p.clone());
        let m: Mirror<RacyPrimary, Va> = Mirror::new(
            p.clone(),
            MirrorConfig::identity(BASE, LEN),
            Some(oracle.clone()),
        )
        .unwrap();
        m.inject().set_skip_read_retry(inject);
        let _ = m.read_u64(0, BASE).unwrap();
        if inject {
            assert!(oracle.violation_count() >= 1, "stale fill not caught");
        } else {
            assert_eq!(oracle.violation_count(), 0);
            assert!(
                m.stats().retries >= 1,
                "the collision must have been retried"
            );
        }
    }
}

#[test]
fn snapshot_mode_maps_only_present_pages() {
    let (p, m) = setup();
    p.cpu_write(BASE + PAGE_SIZE, 5);
    let n = m
        .mirror
        .prefetch(BASE, 4 * PAGE_SIZE, false, FaultMode::Snapshot)
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(p.mapped(), 1, "snapshot mode must not fault pages in");
    assert!(m.mirror.ept().lookup(Va(BASE + PAGE_SIZE)).is_some());
    assert!(m.mirror.ept().lookup(Va(BASE)).is_none());
    assert_eq!(
        m.mirror.fault_in(BASE, false, FaultMode::Snapshot),
        Err(MirrorError::Primary(PrimaryFault::NotPresent(BASE)))
    );
}

#[test]
fn read_only_entries_upgrade_through_a_write_fault() {
    let p = TestPrimary::new_cow(PageRange::new(BASE, LEN).unwrap(), 64);
    let m = CheckedMirror::<_, Va>::new(p.clone(), MirrorConfig::identity(BASE, LEN)).unwrap();
    assert_eq!(m.read(BASE).unwrap(), 0);
    let ro = m.mirror.ept().lookup(Va(BASE)).unwrap();
    assert_eq!(ro.perm, Perm::READ);
    m.write(BASE, 9).unwrap();
    let rw = m.mirror.ept().lookup(Va(BASE)).unwrap();
    assert_eq!(rw.perm, Perm::READ_WRITE);
    assert_ne!(rw.pfn, ro.pfn, "the COW break moved the page");
    assert_eq!(p.cpu_read(BASE), 9);
    assert_eq!(m.oracle.violation_count(), 0);
}

#[test]
fn bad_addresses_and_devices_are_typed_errors() {
    let (_p, m) = setup();
    assert_eq!(
        m.mirror.read_u64(0, BASE - PAGE_SIZE),
        Err(MirrorError::OutOfRange(BASE - PAGE_SIZE))
    );
    assert_eq!(
        m.mirror.read_u64(0, BASE + LEN),
        Err(MirrorError::OutOfRange(BASE + LEN))
    );
    assert_eq!(m.mirror.read_u64(3, BASE), Err(MirrorError::NoDevice(3)));
    let p = TestPrimary::new(PageRange::new(BASE, PAGE_SIZE).unwrap(), 4);
    let m2 = CheckedMirror::<_, Va>::new(p, MirrorConfig::identity(BASE, 2 * PAGE_SIZE)).unwrap();
    assert!(matches!(
        m2.mirror.read_u64(0, BASE + PAGE_SIZE),
        Err(MirrorError::Primary(PrimaryFault::NoMapping(_)))
    ));
    m2.mirror.detach().unwrap();
    assert!(m2.mirror.detach().is_err());
}

#[test]
fn external_addresses_are_offset() {
    let p = TestPrimary::new(PageRange::new(BASE, LEN).unwrap(), 64);
    let cfg = MirrorConfig {
        ext_base: 0x10_0000,
        ..MirrorConfig::identity(BASE, LEN)
    };
    let m = Mirror::<_, Iova>::new(p.clone(), cfg, None).unwrap();
    m.write_u64(0, BASE + 8, 3).unwrap();
    assert!(m.ept().lookup(Iova(0x10_0000)).is_some());
    p.unmap(BASE, BASE + PAGE_SIZE);
    assert!(m.ept().lookup(Iova(0x10_0000)).is_none());
}

#[test]
fn multi_threaded_million_accesses_zero_violations() {
    // Release builds run a million accesses; debug builds a tenth.
    let target: u64 = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let p = TestPrimary::new(PageRange::new(BASE, LEN).unwrap(), 4096);
    let oracle = Oracle::new(p.clone());
    let cfg = MirrorConfig {
        devices: 2,
        ..MirrorConfig::identity(BASE, LEN)
    };
    let m = Arc::new(Mirror::<_, Va>::new(p.clone(), cfg, Some(oracle.clone())).unwrap());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for dev in 0..2 {
            let m = m.clone();
            let stop = &stop;
            s.spawn(move || {
                let mut i = 0u64;
                while i < target / 2 {
                    let a = BASE + (i * 2654435761 % 64) * PAGE_SIZE;
                    if i % 4 == 0 {
                        m.write_u64(dev, a, i).unwrap();
                    } else {
                        m.read_u64(dev, a).unwrap();
                    }
                    i += 1;
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let a = BASE + (k * 7 % 64) * PAGE_SIZE;
            match k % 3 {
                0 => p.unmap(a, a + PAGE_SIZE),
                1 => p.migrate(a).unwrap(),
                _ => p.protect(a, a + 4 * PAGE_SIZE),
            }
            k += 1;
        }
    });
    assert!(oracle.checks() >= target);
    assert_eq!(
        oracle.violation_count(),
        0,
        "{:?}",
        oracle.violations().first().map(|v| v.to_string())
    );
}

#[test]
fn contiguous_blocks_get_2m_entries_and_split_on_invalidation() {
    use notifier_core::secondary::HUGE_SIZE;
    let base = 0x8000_0000u64; // 2 MiB aligned
    let p = TestPrimary::new(PageRange::new(base, 2 * HUGE_SIZE).unwrap(), 2048);
    let m = CheckedMirror::<_, Va>::new(p.clone(), MirrorConfig::identity(base, 2 * HUGE_SIZE))
        .unwrap();
    // Fresh frames come out contiguous and aligned: one huge entry.
    assert_eq!(
        m.mirror
            .prefetch(base, HUGE_SIZE, true, FaultMode::Fault)
            .unwrap(),
        512
    );
    let e = m.mirror.ept().lookup(Va(base + 5 * PAGE_SIZE)).unwrap();
    assert!(e.huge);
    assert_eq!(m.mirror.ept().mapped_pages(), 512);
    p.cpu_write(base + 5 * PAGE_SIZE, 42);
    assert_eq!(m.read(base + 5 * PAGE_SIZE).unwrap(), 42);
    // Invalidating one page splits the entry and drops only that page.
    p.unmap(base + 7 * PAGE_SIZE, base + 8 * PAGE_SIZE);
    assert!(m.mirror.ept().lookup(Va(base + 7 * PAGE_SIZE)).is_none());
    let e = m.mirror.ept().lookup(Va(base + 6 * PAGE_SIZE)).unwrap();
    assert!(!e.huge);
    assert_eq!(m.mirror.ept().mapped_pages(), 511);
    assert_eq!(m.read(base + 5 * PAGE_SIZE).unwrap(), 42);
    // A block whose frames are not contiguous is mapped page by page.
    p.cpu_write(base + HUGE_SIZE + 3 * PAGE_SIZE, 1); // takes a frame out of order
    assert_eq!(
        m.mirror
            .prefetch(base + HUGE_SIZE, HUGE_SIZE, true, FaultMode::Fault)
            .unwrap(),
        512
    );
    assert!(!m.mirror.ept().lookup(Va(base + HUGE_SIZE)).unwrap().huge);
    assert_eq!(m.oracle.violation_count(), 0);
}
