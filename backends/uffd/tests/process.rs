//! Tests that need their own process: the unprivileged user-mode-only
//! path, fork (refuse and hand-off), and a failing handler killing the
//! faulting thread with SIGBUS.
//!
//! Every test holds one lock for its whole run: a fork is seen by every
//! monitor with fork events in the process, and no other test thread
//! should be inside a monitor (or malloc) critical section at a fork.

mod common;

use std::sync::Arc;

use common::{monitor, wait_until, P};
use notifier_uffd::{
    run_in_child, ChildExit, FaultError, Fill, ForkPolicy, HandlerThread, OpenPath, PageBuf,
    PageFault, Region, RegisterMode, UffdMonitor,
};
use parking_lot::Mutex;

static FORK: Mutex<()> = Mutex::new(());

fn fill_ab() -> Arc<dyn notifier_uffd::FaultHandler> {
    Arc::new(|f: &PageFault, page: &mut PageBuf| {
        page.fill(0xA0 + f.pgoff as u8);
        Ok(Fill::Bytes)
    })
}

/// Body of the unprivileged test: open with UFFD_USER_MODE_ONLY, serve a
/// fault. Returns an exit code naming the step that failed.
fn unprivileged_body() -> i32 {
    let m = match UffdMonitor::builder().build(fill_ab()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("unprivileged open failed: {e}");
            return 10;
        }
    };
    if m.open_path() != OpenPath::UserModeOnly {
        return 11;
    }
    let Ok(_t) = m.spawn() else { return 12 };
    let Ok(region) = Region::anon(4 * P) else {
        return 13;
    };
    if m.register(&region, RegisterMode::MISSING).is_err() {
        return 14;
    }
    match region.read_u8(2 * P) {
        Ok(0xA2) => 0,
        _ => 15,
    }
}

#[test]
fn unprivileged_user_mode_only_serves_a_fault() {
    let _g = FORK.lock();
    if notifier_uffd::geteuid() != 0 {
        // Already unprivileged: run the body here.
        if notifier_uffd::uffd_required() || UffdMonitor::new().is_ok() {
            assert_eq!(unprivileged_body(), 0);
        } else {
            eprintln!("SKIP: userfaultfd unavailable to this user");
        }
        return;
    }
    let exit = run_in_child(|| {
        if let Err(e) = notifier_uffd::drop_privileges(65534, 65534) {
            eprintln!("setresuid: {e}");
            return 20;
        }
        if notifier_uffd::geteuid() != 65534 {
            return 21;
        }
        unprivileged_body()
    })
    .unwrap();
    assert_eq!(
        exit,
        ChildExit::Exited(0),
        "child as uid 65534 (10..15: step that failed)"
    );
}

#[test]
fn failing_handler_kills_the_faulting_thread_with_sigbus() {
    let _g = FORK.lock();
    if common::monitor(UffdMonitor::builder(), fill_ab()).is_none() {
        return;
    }
    let exit = run_in_child(|| {
        let h = Arc::new(
            |_: &PageFault, _: &mut PageBuf| -> Result<Fill, FaultError> {
                Err(FaultError("backing store lost".into()))
            },
        );
        let Ok(m) = UffdMonitor::builder().build(h) else {
            return 30;
        };
        let Ok(_t) = m.spawn() else { return 31 };
        let Ok(region) = Region::anon(P) else {
            return 32;
        };
        if m.register(&region, RegisterMode::MISSING).is_err() {
            return 33;
        }
        // Must not return: SIGBUS kills the child here.
        let _ = region.read_u8(0);
        34
    })
    .unwrap();
    assert_eq!(exit, ChildExit::Signaled(libc::SIGBUS));
}

#[test]
fn panicking_handler_kills_the_faulting_thread_with_sigbus() {
    let _g = FORK.lock();
    if common::monitor(UffdMonitor::builder(), fill_ab()).is_none() {
        return;
    }
    let exit = run_in_child(|| {
        std::panic::set_hook(Box::new(|_| {}));
        let h = Arc::new(
            |_: &PageFault, _: &mut PageBuf| -> Result<Fill, FaultError> { panic!("handler bug") },
        );
        let Ok(m) = UffdMonitor::builder().build(h) else {
            return 40;
        };
        let Ok(_t) = m.spawn() else { return 41 };
        let Ok(region) = Region::anon(P) else {
            return 42;
        };
        if m.register(&region, RegisterMode::MISSING).is_err() {
            return 43;
        }
        let _ = region.read_u8(0);
        44
    })
    .unwrap();
    assert_eq!(exit, ChildExit::Signaled(libc::SIGBUS));
}

#[test]
fn fork_refused_child_gets_ordinary_memory() {
    let _g = FORK.lock();
    let Some(m) = monitor(
        UffdMonitor::builder().fork_policy(ForkPolicy::Refuse),
        fill_ab(),
    ) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    assert_eq!(region.read_u8(0).unwrap(), 0xA0);
    let exit = run_in_child(|| {
        // Populated before the fork: copied. Missing: plain zero page, since
        // the child's userfaultfd was closed by the parent's monitor.
        match (region.read_u8(0), region.read_u8(P)) {
            (Ok(0xA0), Ok(0)) => 0,
            _ => 1,
        }
    })
    .unwrap();
    assert_eq!(exit, ChildExit::Exited(0));
    let st = m.stats();
    assert_eq!((st.forks, st.forks_refused), (1, 1));
}

#[test]
fn fork_handoff_gives_the_child_its_own_monitor() {
    let _g = FORK.lock();
    let children: Arc<Mutex<Vec<(UffdMonitor, HandlerThread)>>> = Arc::default();
    let c2 = children.clone();
    let policy = ForkPolicy::Handoff(Arc::new(move |child: UffdMonitor| {
        let t = child.spawn().expect("spawn child monitor");
        c2.lock().push((child, t));
    }));
    let Some(m) = monitor(UffdMonitor::builder().fork_policy(policy), fill_ab()) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let exit = run_in_child(|| match region.read_u8(P) {
        // Served in the child by the handed-off monitor (same handler).
        Ok(0xA1) => 0,
        _ => 1,
    })
    .unwrap();
    assert_eq!(exit, ChildExit::Exited(0));
    wait_until("child monitor", || !children.lock().is_empty());
    let kids = children.lock();
    let (child, _) = &kids[0];
    assert_eq!(
        child.registered(),
        m.registered(),
        "the child starts with the parent's registrations"
    );
    wait_until("child fault counted", || child.stats().copies == 1);
    assert_eq!(m.stats().forks, 1);
    assert_eq!(m.stats().copies, 0, "the parent served nothing");
}
