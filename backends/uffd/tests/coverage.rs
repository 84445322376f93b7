//! Coverage over real memory: device accesses racing a munmap get typed
//! errors (never SIGSEGV), watches of any alignment unite, the events-only
//! mode reports changes without faults, and `UffdPrimary` watches what it
//! is asked to cover.
//!
//! The tests of this file run one at a time (`serial`): one unmaps and
//! maps back at the same address.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{monitor, IRec, P};
use notifier_core::frame::{FrameError, FrameStore, Pfn};
use notifier_core::notifier::Event;
use notifier_core::primary::{Primary, PrimaryFault};
use notifier_uffd::{
    RealMemory, Region, RegisterMode, UffdError, UffdMonitor, UffdPrimary, ZeroHandler,
};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_monitor() -> Option<UffdMonitor> {
    monitor(UffdMonitor::builder(), Arc::new(ZeroHandler))
}

#[test]
fn device_accesses_racing_munmap_get_typed_errors() {
    let _s = serial();
    let Some(m) = new_monitor() else { return };
    let _t = m.spawn().unwrap();
    let mem = RealMemory::new(&m);
    let window = Region::anon(16 * P).unwrap();
    m.watch(window.addr(), window.len(), RegisterMode::EVENTS)
        .unwrap();
    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        // Devices: load, store and fetch_add all over the window.
        for d in 0..2u64 {
            let (mem, stop, ok, failed, base) = (&mem, &stop, &ok, &failed, window.addr());
            s.spawn(move || {
                let mut i = d;
                while !stop.load(Ordering::Relaxed) {
                    let pfn = Pfn((base >> 12) + i % 16);
                    let off = ((i * 8) % 4096) as usize;
                    let r = match i % 3 {
                        0 => mem.load(pfn, off).map(drop),
                        1 => mem.store(pfn, off, i).map(drop),
                        _ => mem.fetch_add(pfn, off, 1).map(drop),
                    };
                    match r {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(FrameError::InvalidPfn(_)) => failed.fetch_add(1, Ordering::Relaxed),
                        Err(e) => panic!("unexpected error {e:?}"),
                    };
                    i += 1;
                }
            });
        }
        // The application: unmaps pages and maps them back, in a loop.
        for round in 0..2000u64 {
            let off = (round * 5 % 15) * P;
            window.munmap(off, P).unwrap();
            window.map_fixed_over(off, P).unwrap();
            m.watch(window.addr() + off, P, RegisterMode::EVENTS)
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    eprintln!("{ok} device accesses succeeded, {failed} failed with a typed error");
    assert!(ok > 0);
    assert!(failed > 0, "some accesses raced an unmap");
}

#[test]
fn fetch_add_is_atomic_among_device_accesses() {
    let _s = serial();
    let Some(m) = new_monitor() else { return };
    let _t = m.spawn().unwrap();
    let mem = RealMemory::new(&m);
    let region = Region::anon(P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let pfn = Pfn(region.addr() >> 12);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..5_000 {
                    mem.fetch_add(pfn, 64, 1).unwrap();
                }
            });
        }
    });
    assert_eq!(mem.load(pfn, 64).unwrap(), 20_000);
}

#[test]
fn watches_of_any_alignment_unite_and_unwatch_splits() {
    let _s = serial();
    let Some(m) = new_monitor() else { return };
    let _t = m.spawn().unwrap();
    let region = Region::anon(8 * P).unwrap();
    let a = region.addr();
    // A malloc-style buffer in page 0, then one sharing that page and
    // running into page 3, then an adjacent one: no Overlap.
    assert_eq!(
        m.watch(a + 100, 200, RegisterMode::EVENTS).unwrap().start(),
        a
    );
    m.watch(a + 1000, 3 * P, RegisterMode::EVENTS).unwrap();
    m.watch(a + 4 * P, P, RegisterMode::EVENTS).unwrap();
    assert!(m.is_watched(a, 5 * P));
    assert!(!m.is_watched(a, 6 * P));
    // Registering over it the old way still refuses.
    assert!(matches!(
        m.register(&region, RegisterMode::EVENTS),
        Err(UffdError::Overlap { .. })
    ));
    m.unwatch(a + P + 1, 10).unwrap();
    assert!(!m.is_watched(a + P, 1));
    assert!(m.is_watched(a, 1) && m.is_watched(a + 2 * P, 3 * P));
    let sub = m
        .notifiers()
        .interval_subscribe(a, 8 * P, IRec::default())
        .unwrap();
    region.munmap(0, 8 * P).unwrap();
    // The subscriber's own log is not a monitor query: order it after the
    // munmap explicitly.
    m.sync();
    let log = sub.ops().log.lock().clone();
    // The kernel reports the unmap (its whole range, once per monitor).
    assert!(log
        .iter()
        .any(|&(e, s, end)| e == Event::Unmap && s <= a && end >= a + 5 * P));
    assert!(m.registered().is_empty());
}

#[test]
fn events_only_watch_raises_no_fault_and_still_reports_changes() {
    let _s = serial();
    let Some(m) = new_monitor() else { return };
    let _t = m.spawn().unwrap();
    let region = Region::anon(64 * P).unwrap();
    m.watch(region.addr(), region.len(), RegisterMode::EVENTS)
        .unwrap();
    let sub = m
        .notifiers()
        .interval_subscribe(region.addr(), region.len(), IRec::default())
        .unwrap();
    for p in 0..64 {
        region.write(p * P, &[7]).unwrap();
    }
    let st = m.stats();
    assert_eq!(
        st.missing_faults + st.wp_faults,
        0,
        "first touches ran in the kernel"
    );
    region
        .madvise(0, 4 * P, notifier_uffd::Advice::DontNeed)
        .unwrap();
    region.munmap(8 * P, 8 * P).unwrap();
    m.sync();
    let log = sub.ops().log.lock().clone();
    let a = region.addr();
    assert!(log.contains(&(Event::Clear, a, a + 4 * P)), "{log:?}");
    assert!(
        log.contains(&(Event::Unmap, a + 8 * P, a + 16 * P)),
        "{log:?}"
    );
}

#[test]
fn primary_covers_on_demand_and_faults_untouched_pages_in_through_the_kernel() {
    let _s = serial();
    let Some(m) = new_monitor() else { return };
    let _t = m.spawn().unwrap();
    let prim = UffdPrimary::new(&m).unwrap();
    let region = Region::anon(4 * P).unwrap();
    let a = region.addr();
    // Not watched: no translation is handed out.
    assert_eq!(prim.fault_page(a, false), Err(PrimaryFault::NoMapping(a)));
    prim.ensure_covered(a + 10, 2 * P).unwrap();
    assert!(m.is_watched(a, 3 * P));
    // Untouched page, events-only: faulted in, readable and writable.
    assert!(prim.lookup_page(a + P).is_none());
    let t = prim.fault_page(a + P, true).unwrap();
    assert!(t.writable);
    assert!(prim.lookup_page(a + P).is_some());
    prim.frames().store(t.pfn, 8, 42).unwrap();
    let mut b = [0u8; 8];
    region.read(P + 8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 42);
    // Memory nobody can watch: a typed error.
    assert!(matches!(
        prim.ensure_covered(0x1000, P),
        Err(PrimaryFault::Unwatchable(_))
    ));
    // Unmapped: gone in the application's order.
    region.munmap(0, 4 * P).unwrap();
    assert_eq!(
        prim.fault_page(a + P, false),
        Err(PrimaryFault::NoMapping(a + P))
    );
}
