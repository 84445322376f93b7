//! Real memory, watched: device accesses through the kernel (`RealMemory`),
//! first touch of 16 MiB (unwatched, events-only, MISSING), `munmap` of a
//! watched 64 KiB buffer against a raw one, and a monitor query right
//! after a `munmap` (the event gate). Figures in docs/BENCHMARKS.md.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use notifier_core::frame::{FrameStore, Pfn};
use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};
use notifier_uffd::{RealMemory, Region, RegisterMode, UffdMonitor, ZeroHandler};

const P: u64 = 4096;
const MIB16: u64 = 16 << 20;
const KIB64: u64 = 64 << 10;

struct Nop;
impl IntervalNotifierOps for Nop {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        sub.set_seq(cur_seq);
        Ok(())
    }
}

fn touch_all(r: &Region) {
    for p in 0..r.len() / P {
        r.write(p * P, &[1]).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let m = UffdMonitor::builder()
        .build(Arc::new(ZeroHandler))
        .expect("userfaultfd");
    let _t = m.spawn().unwrap();

    let mut g = c.benchmark_group("real_memory");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let mem = RealMemory::new(&m);
    let region = Region::anon(P).unwrap();
    m.watch(region.addr(), P, RegisterMode::EVENTS).unwrap();
    touch_all(&region);
    let pfn = Pfn(region.addr() >> 12);
    g.bench_function("load", |b| b.iter(|| mem.load(pfn, 8).unwrap()));
    g.bench_function("store", |b| b.iter(|| mem.store(pfn, 8, 5).unwrap()));
    g.bench_function("fetch_add", |b| {
        b.iter(|| mem.fetch_add(pfn, 8, 1).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("first_touch_16MiB");
    g.throughput(Throughput::Bytes(MIB16))
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(300));
    for (name, mode) in [
        ("unwatched", None),
        ("events_only", Some(RegisterMode::EVENTS)),
        ("missing", Some(RegisterMode::MISSING)),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = Region::anon(MIB16).unwrap();
                    if let Some(mode) = mode {
                        m.watch(r.addr(), r.len(), mode).unwrap();
                    }
                    let t = Instant::now();
                    touch_all(&r);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("munmap_64KiB");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(300));
    for (name, watched) in [("raw", false), ("watched_registered", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = Region::anon(KIB64).unwrap();
                    let sub = watched.then(|| {
                        m.watch(r.addr(), r.len(), RegisterMode::EVENTS).unwrap();
                        m.notifiers()
                            .interval_subscribe(r.addr(), r.len(), Nop)
                            .unwrap()
                    });
                    touch_all(&r);
                    let t = Instant::now();
                    r.munmap(0, KIB64).unwrap();
                    total += t.elapsed();
                    drop(sub);
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("query_after_munmap");
    g.throughput(Throughput::Elements(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    g.bench_function("registration", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = Region::anon(KIB64).unwrap();
                m.watch(r.addr(), r.len(), RegisterMode::EVENTS).unwrap();
                r.munmap(0, KIB64).unwrap();
                let t = Instant::now();
                assert!(m.registration(r.addr()).is_none());
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
