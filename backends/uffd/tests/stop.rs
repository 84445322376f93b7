//! Never hang, never crash: stopping the handler thread while memory is
//! still watched retires the monitor, so a later `munmap` (or a thread
//! blocked in one) returns, a fault in a fault-serving range raises SIGBUS
//! instead of sleeping forever, and queries see nothing watched.
//!
//! Each scenario runs in a forked child with a watchdog thread that aborts
//! it: a regression fails the test (SIGABRT) instead of hanging it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::P;
use notifier_uffd::{
    run_in_child, ChildExit, Region, RegisterMode, UffdError, UffdMonitor, ZeroHandler,
};

const WATCHDOG: Duration = Duration::from_secs(20);
const SKIP: i32 = 77;

fn child(f: impl FnOnce(UffdMonitor) -> i32) -> ChildExit {
    run_in_child(move || {
        std::thread::spawn(|| {
            std::thread::sleep(WATCHDOG);
            eprintln!("watchdog: the scenario hung for {WATCHDOG:?}");
            std::process::abort();
        });
        match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
            Ok(m) => f(m),
            Err(e) => {
                eprintln!("userfaultfd unavailable in the child: {e}");
                SKIP
            }
        }
    })
    .expect("fork")
}

fn expect(r: ChildExit, want: ChildExit) {
    match r {
        ChildExit::Exited(SKIP) if !notifier_uffd::uffd_required() => {
            eprintln!("SKIP: userfaultfd unavailable");
        }
        ChildExit::Signaled(libc::SIGABRT) => panic!("the scenario hung (watchdog fired)"),
        r => assert_eq!(r, want),
    }
}

#[test]
fn munmap_after_stop_returns_and_queries_see_nothing_watched() {
    let r = child(|m| {
        let region = Region::anon(8 * P).unwrap();
        let t = m.spawn().unwrap();
        m.register(&region, RegisterMode::MISSING).unwrap();
        t.stop();
        if m.registration(region.addr()).is_some() {
            return 2;
        }
        if !matches!(m.spawn(), Err(UffdError::Stopped)) {
            return 3;
        }
        if !matches!(m.handle_pending(), Err(UffdError::Stopped)) {
            return 4;
        }
        if !matches!(
            m.register(&Region::anon(P).unwrap(), RegisterMode::EVENTS),
            Err(UffdError::Stopped)
        ) {
            return 5;
        }
        // The watched memory goes away: returns at once.
        region.munmap(0, 8 * P).unwrap();
        drop(region);
        0
    });
    expect(r, ChildExit::Exited(0));
}

#[test]
fn dropping_the_handler_thread_releases_a_blocked_munmap() {
    let r = child(|m| {
        let region = Arc::new(Region::anon(64 * P).unwrap());
        let t = m.spawn().unwrap();
        m.register(&region, RegisterMode::EVENTS).unwrap();
        // Threads unmapping watched memory while the handler goes away.
        let unmappers: Vec<_> = (0..4)
            .map(|i| {
                let region = region.clone();
                std::thread::spawn(move || {
                    for k in 0..8u64 {
                        let _ = region.munmap((i * 16 + k * 2) * P, P);
                    }
                })
            })
            .collect();
        drop(t);
        for u in unmappers {
            if u.join().is_err() {
                return 2;
            }
        }
        0
    });
    expect(r, ChildExit::Exited(0));
}

#[test]
fn a_fault_after_stop_raises_sigbus_instead_of_hanging() {
    let r = child(|m| {
        let region = Region::anon(4 * P).unwrap();
        let t = m.spawn().unwrap();
        m.register(&region, RegisterMode::MISSING).unwrap();
        // Served while the handler runs.
        if region.read_u8(0).unwrap() != 0 {
            return 2;
        }
        t.stop();
        // Page 1 was never populated and nobody serves it any more.
        let _ = region.read_u8(P);
        3
    });
    expect(r, ChildExit::Signaled(libc::SIGBUS));
}

/// Process-wide mode: a malloc'd buffer that existed at the scan is
/// watched and its `free` (an `munmap` of the chunk) is reported; one
/// allocated after the scan is covered on demand by `ensure_covered`.
#[test]
fn process_wide_mode_watches_malloc_chunks() {
    use notifier_core::notifier::Event;
    use notifier_core::primary::Primary;
    let r = child(|m| {
        let _t = m.spawn().unwrap();
        let before = vec![1u8; 1 << 20]; // above M_MMAP_THRESHOLD: mmap'd
        let (a, len) = (before.as_ptr() as u64, before.len() as u64);
        let scan = match m.watch_process() {
            Ok(s) => s,
            Err(_) => return 2,
        };
        eprintln!(
            "scan: {} watched, {} skipped, {} refused",
            scan.watched,
            scan.skipped.len(),
            scan.refused.len()
        );
        if scan.watched == 0 || !m.is_watched(a, len) {
            return 3;
        }
        if scan
            .skipped
            .iter()
            .all(|(_, why)| *why != "the monitor thread's stack")
        {
            return 4;
        }
        let (pa, pe) = (a & !(P - 1), (a + len + P - 1) & !(P - 1));
        let Ok(sub) = m
            .notifiers()
            .interval_subscribe(pa, pe - pa, common::IRec::default())
        else {
            return 9;
        };
        drop(before);
        m.sync();
        if !sub
            .ops()
            .log
            .lock()
            .iter()
            .any(|&(e, _, _)| e == Event::Unmap)
        {
            return 5;
        }
        let after = vec![2u8; 1 << 20];
        let (b, blen) = (after.as_ptr() as u64, after.len() as u64);
        if m.is_watched(b, blen) {
            return 6; // made after the scan: not covered yet
        }
        let prim = notifier_uffd::UffdPrimary::new(&m).unwrap();
        if prim.ensure_covered(b, blen).is_err() || !m.is_watched(b, blen) {
            return 7;
        }
        // A second scan registers nothing it already watches.
        match m.watch_process() {
            Ok(s) if s.already > 0 => {}
            _ => return 8,
        }
        drop(after);
        0
    });
    expect(r, ChildExit::Exited(0));
}
