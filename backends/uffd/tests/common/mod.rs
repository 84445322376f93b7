//! Helpers shared by the real-kernel tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use notifier_core::notifier::{
    Again, Event, Hooks, IntervalNotifier, IntervalNotifierOps, InvalidateRange, MmuNotifierOps,
};
use notifier_uffd::{FaultHandler, MonitorBuilder, UffdMonitor};
use parking_lot::Mutex;

pub const P: u64 = 4096;

/// Build a monitor, or print a visible SKIP and return None (fail instead
/// when NOTIFIER_REQUIRE_UFFD=1).
pub fn monitor(b: MonitorBuilder, h: Arc<dyn FaultHandler>) -> Option<UffdMonitor> {
    match b.build(h) {
        Ok(m) => Some(m),
        Err(e) if notifier_uffd::uffd_required() => {
            panic!("userfaultfd required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            None
        }
    }
}

/// Wait (bounded) until `cond` holds; panics with `what` if it never does.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A range subscriber that records every invalidation start.
#[derive(Default)]
pub struct Rec {
    pub log: Mutex<Vec<(Event, u64, u64)>>,
}

impl MmuNotifierOps for Rec {
    fn hooks(&self) -> Hooks {
        Hooks::START_END
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        self.log.lock().push((r.event(), r.start(), r.end()));
        Ok(())
    }
}

/// An interval subscriber that records what overlapped it.
#[derive(Default)]
pub struct IRec {
    pub log: Mutex<Vec<(Event, u64, u64)>>,
}

impl IntervalNotifierOps for IRec {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        r: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut log = self.log.lock();
        sub.set_seq(cur_seq);
        log.push((r.event(), r.start(), r.end()));
        Ok(())
    }
}
