//! REMOVE-driven invalidations delivered to a subscriber, beside the raw
//! rate of reading REMOVE events from a bare userfaultfd (4 KiB madvise
//! DONTNEED calls, one thread).

#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};
use notifier_uffd::{Advice, Region, RegisterMode, UffdMonitor, ZeroHandler};
use userfaultfd::{Event as UEvent, FeatureFlags, UffdBuilder};

const P: u64 = 4096;

fn wait_for(c: &AtomicU64, n: u64) {
    while c.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
}

struct Count(Arc<AtomicU64>);
impl MmuNotifierOps for Count {
    fn hooks(&self) -> Hooks {
        Hooks::START
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        if r.event() == Event::Clear {
            self.0.fetch_add(1, Ordering::Release);
        }
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("uffd_remove");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));

    // Raw: a bare userfaultfd, a thread doing blocking reads.
    let raw = match UffdBuilder::new()
        .user_mode_only(false)
        .close_on_exec(true)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
    {
        Ok(u) => Arc::new(u),
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            return;
        }
    };
    let region = Region::anon(P).unwrap();
    raw.register(region.addr() as *mut libc::c_void, P as usize)
        .unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (raw, seen, stop) = (raw.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = userfaultfd::EventBuffer::new(64);
            while !stop.load(Ordering::Relaxed) {
                for ev in raw.read_events(&mut buf).unwrap() {
                    if let Ok(UEvent::Remove { .. }) = ev {
                        seen.fetch_add(1, Ordering::Release);
                    }
                }
            }
        })
    };
    g.bench_function("raw_read_remove_events", |b| {
        b.iter_custom(|iters| {
            let base = seen.load(Ordering::Acquire);
            let t = Instant::now();
            for _ in 0..iters {
                region.madvise(0, P, Advice::DontNeed).unwrap();
            }
            wait_for(&seen, base + iters);
            t.elapsed()
        })
    });
    stop.store(true, Ordering::Relaxed);
    region.madvise(0, P, Advice::DontNeed).unwrap();
    reader.join().unwrap();
    raw.unregister(region.addr() as *mut libc::c_void, P as usize)
        .unwrap();
    drop(region);

    // Ours: the monitor's handler thread delivers Clear invalidations.
    let m = UffdMonitor::builder().build(Arc::new(ZeroHandler)).unwrap();
    let _t = m.spawn().unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let _sub = m
        .notifiers()
        .register(Arc::new(Count(delivered.clone())))
        .unwrap();
    let region = Region::anon(P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    g.bench_function("monitor_remove_invalidations", |b| {
        b.iter_custom(|iters| {
            let target = m.stats().removes + iters;
            let t = Instant::now();
            for _ in 0..iters {
                region.madvise(0, P, Advice::DontNeed).unwrap();
            }
            // Every REMOVE read is either delivered in its own invalidation
            // or merged into the previous one (same page, same batch).
            loop {
                let st = m.stats();
                if st.removes >= target
                    && delivered.load(Ordering::Acquire) + st.coalesced >= st.removes
                {
                    break;
                }
                std::hint::spin_loop();
            }
            t.elapsed()
        })
    });
    g.finish();
    eprintln!("monitor stats: {:?}", m.stats());
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench
}
criterion_main!(benches);
