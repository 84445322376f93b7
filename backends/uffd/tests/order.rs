//! The application's order over real memory: once `munmap` returned in a
//! thread, that thread's next query of the monitor (`registration`,
//! `is_watched`) and every interval subscriber see the unmap, without
//! polling. Many threads allocate, watch, unmap and check at once.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{monitor, IRec, P};
use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};
use notifier_uffd::{Region, RegisterMode, UffdMonitor, ZeroHandler};

const THREADS: usize = 4;

/// A range subscriber that spends ~20 µs in every invalidation start.
struct Slow;

impl MmuNotifierOps for Slow {
    fn hooks(&self) -> Hooks {
        Hooks::START_END
    }
    fn invalidate_range_start(&self, _: &InvalidateRange) -> Result<(), Again> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

const ROUNDS: usize = 2_500;

/// Pages of each thread's window.
const WINDOW: u64 = 16;

/// One thread's rounds; returns (stale registrations, missed invalidations,
/// rounds skipped because another mapping took the hole).
///
/// Each thread unmaps and maps back inside its own window (a `Region`), so
/// that no other thread of the test is handed the freed addresses: a
/// registration found there after the unmap can only be a stale one.
fn rounds(m: &UffdMonitor, t: usize, window: Region) -> (u64, u64, u64) {
    let (mut stale, mut missed, mut skipped) = (0, 0, 0);
    for i in 0..ROUNDS {
        let pages = 1 + ((i * 7 + t) % 8) as u64;
        let off = ((i * 5 + t * 3) as u64 % (WINDOW - pages)) * P;
        let (base, len) = (window.addr() + off, pages * P);
        // Unaligned watches of the buffer (malloc-style pointers), united.
        let mode = if i % 2 == 0 {
            RegisterMode::EVENTS
        } else {
            RegisterMode::MISSING
        };
        m.watch(base + 24, len / 2, mode).expect("watch head");
        m.watch(base + len / 2 - 8, len / 2 + 8, mode)
            .expect("watch tail");
        assert!(m.is_watched(base, len), "united watches cover the buffer");
        let sub = m
            .notifiers()
            .interval_subscribe(base, len, IRec::default())
            .expect("subscribe");
        window.write(off, &[1]).expect("first touch");
        window.munmap(off, len).expect("munmap");
        // Right after munmap returned: no polling.
        if m.registration(base).is_some() || m.registration(base + len - 1).is_some() {
            stale += 1;
        }
        let saw = sub
            .ops()
            .log
            .lock()
            .iter()
            .any(|&(ev, s, e)| ev == Event::Unmap && s <= base && e >= base + len);
        if !saw {
            missed += 1;
        }
        drop(sub);
        if window.map_fixed_over(off, len).is_err() {
            // Someone else's mapping took the hole: leave the window.
            skipped += (ROUNDS - i) as u64;
            break;
        }
    }
    m.unwatch(window.addr(), window.len()).expect("unwatch");
    (stale, missed, skipped)
}

#[test]
fn a_query_after_munmap_sees_the_unmap_in_every_thread() {
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    let _t = m.spawn().unwrap();
    // A subscriber whose invalidations take a while (a device flushing its
    // translations), so the monitor's apply visibly lags its read.
    let _slow = m.notifiers().register(Arc::new(Slow)).unwrap();
    let stale = AtomicU64::new(0);
    let missed = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    // The windows are mapped before the threads start (whose stacks could
    // otherwise land in a hole).
    let windows: Vec<Region> = (0..THREADS)
        .map(|_| Region::anon(WINDOW * P).expect("mmap"))
        .collect();
    std::thread::scope(|s| {
        for (t, window) in windows.into_iter().enumerate() {
            let (m, stale, missed, skipped) = (&m, &stale, &missed, &skipped);
            s.spawn(move || {
                let (a, b, c) = rounds(m, t, window);
                stale.fetch_add(a, Ordering::Relaxed);
                missed.fetch_add(b, Ordering::Relaxed);
                skipped.fetch_add(c, Ordering::Relaxed);
            });
        }
    });
    let st = m.stats();
    eprintln!(
        "{} rounds ({} skipped): {} stale registrations, {} missed invalidations; stats {st:?}",
        THREADS * ROUNDS,
        skipped.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed),
        missed.load(Ordering::Relaxed)
    );
    assert_eq!(stale.load(Ordering::Relaxed), 0, "stale registrations");
    assert_eq!(missed.load(Ordering::Relaxed), 0, "missed invalidations");
    let done = (THREADS * ROUNDS) as u64 - skipped.load(Ordering::Relaxed);
    assert!(done >= (THREADS * ROUNDS / 2) as u64, "most rounds ran");
    assert!(st.unmaps + st.coalesced >= done);
    assert!(
        m.registered().is_empty(),
        "every watch was cut by its unmap"
    );
    assert_eq!(m.last_error(), None);
}
