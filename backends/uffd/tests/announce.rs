//! The announced madvise (`UffdMonitor::madvise`) keeps a mirror's device
//! access racing the zap of the very page it uses from hanging.
//!
//! Unannounced, the race can deadlock the monitor's handler thread (in the
//! mirror's invalidation callback, waiting for the device lock) with the
//! device thread (holding that lock, in a missing fault only the handler
//! thread serves): see the crate docs. A regression would hang, so the
//! scenario runs in a forked child with a watchdog that aborts it: the
//! test then fails instead of hanging CI.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::P;
use notifier_core::secondary::{Mirror, MirrorConfig, Va};
use notifier_uffd::{
    run_in_child, Advice, ChildExit, Region, RegisterMode, UffdMonitor, UffdPrimary, ZeroHandler,
};

/// How long the child may take before the watchdog aborts it (the
/// scenario takes well under a second when nothing hangs).
const WATCHDOG: Duration = Duration::from_secs(60);
/// The watchdog of the demonstration of the hazard.
const HAZARD_WATCHDOG: Duration = Duration::from_secs(10);
/// Zaps of the page the device is reading.
const ROUNDS: u64 = 3000;

/// Exit codes of the child, naming the step that failed.
const SKIP: i32 = 77;

/// The race, in the child: a device thread reads the page through a
/// mirror in a tight loop while this thread writes it and zaps it, through
/// the announced path when `announced`.
fn race(announced: bool, watchdog: Duration) -> i32 {
    // The watchdog: a hang becomes SIGABRT, which the parent reports.
    std::thread::spawn(move || {
        std::thread::sleep(watchdog);
        eprintln!("watchdog: the scenario hung for {watchdog:?}");
        std::process::abort();
    });
    let m = match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("userfaultfd unavailable in the child: {e}");
            return SKIP;
        }
    };
    let Ok(thread) = m.spawn() else { return 10 };
    let Ok(region) = Region::anon(4 * P) else {
        return 11;
    };
    if m.register(&region, RegisterMode::MISSING).is_err() {
        return 12;
    }
    let Ok(prim) = UffdPrimary::new(&m) else {
        return 13;
    };
    let Ok(mirror) = Mirror::<UffdPrimary, Va>::new(
        Arc::new(prim),
        MirrorConfig::identity(region.addr(), region.len()),
        None,
    ) else {
        return 14;
    };
    let a = region.addr() + P;
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let mut code = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if mirror.read_u64(0, a).is_ok() {
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for round in 0..ROUNDS {
            if region.write(P, &round.to_le_bytes()).is_err() {
                code = 15;
                break;
            }
            let zapped = if announced {
                m.madvise(&region, P, P, Advice::DontNeed).is_ok()
            } else {
                region.madvise(P, P, Advice::DontNeed).is_ok()
            };
            if !zapped {
                code = 16;
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    if code != 0 {
        return code;
    }
    let st = m.stats();
    eprintln!(
        "child: {} device reads, {} mirror invalidations, stats {st:?}",
        reads.load(Ordering::Relaxed),
        mirror.stats().invalidations
    );
    if reads.load(Ordering::Relaxed) == 0 {
        return 17;
    }
    if mirror.stats().invalidations < ROUNDS {
        return 18; // every zap must have invalidated the mirror
    }
    if announced && st.announced_removes == 0 {
        return 19; // the kernel's REMOVEs were all dispatched a second time
    }
    if m.last_error().is_some() {
        return 20;
    }
    drop(mirror);
    drop(region);
    thread.stop();
    0
}

#[test]
fn announced_madvise_keeps_a_racing_device_access_from_hanging() {
    match run_in_child(|| race(true, WATCHDOG)).expect("fork") {
        ChildExit::Exited(0) => {}
        ChildExit::Exited(SKIP) if !notifier_uffd::uffd_required() => {
            eprintln!("SKIP: userfaultfd unavailable");
        }
        ChildExit::Signaled(libc::SIGABRT) => {
            panic!("the device access racing the madvise hung (watchdog fired)")
        }
        other => panic!("child failed: {other:?}"),
    }
}

/// The hazard itself: the same race with a plain `madvise`. It hangs (the
/// watchdog fires) when the race is lost, which depends on scheduling, so
/// it is not run by default: `cargo test --release -p notifier-uffd --test
/// announce -- --ignored`.
#[test]
#[ignore = "demonstrates the documented deadlock; timing-dependent and slow"]
fn unannounced_madvise_racing_a_device_access_can_hang() {
    let r = run_in_child(|| race(false, HAZARD_WATCHDOG)).expect("fork");
    eprintln!("unannounced race: {r:?}");
    assert_eq!(r, ChildExit::Signaled(libc::SIGABRT), "expected the hang");
}
