#![allow(missing_docs)]
//! Criterion benches of the notifier hot paths (`cargo bench -p
//! notifier-core --bench notifier`): an invalidation bracket with one range
//! and one interval subscriber, the per-PTE `clear` hook inside a bracket,
//! and an aging hook. They guard the cost of the panic guards around every
//! subscriber callback.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use notifier_core::addr::PageRange;
use notifier_core::notifier::{
    Again, Event, Hooks, IntervalNotifier, IntervalNotifierOps, InvalidateRange, MmuNotifierOps,
    NotifierSubscriptions,
};

struct Range;

impl MmuNotifierOps for Range {
    fn hooks(&self) -> Hooks {
        Hooks::START_END | Hooks::CLEAR | Hooks::AGING
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        std::hint::black_box(r);
        Ok(())
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        std::hint::black_box(r);
    }
    fn clear(&self, addr: u64) {
        std::hint::black_box(addr);
    }
    fn clear_young(&self, start: u64, _end: u64) -> bool {
        std::hint::black_box(start) == 1
    }
}

struct Interval;

impl IntervalNotifierOps for Interval {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        sub.set_seq(cur_seq);
        Ok(())
    }
}

fn hot_paths(c: &mut Criterion) {
    let subs = NotifierSubscriptions::new();
    let _range = subs.register(Arc::new(Range)).unwrap();
    let _interval = subs.interval_subscribe(0x10000, 0x10000, Interval).unwrap();
    let r = InvalidateRange::new(PageRange::new(0x10000, 0x1000).unwrap(), Event::Clear);
    let mut g = c.benchmark_group("notifier");
    g.bench_function("bracket_1range_1interval", |b| {
        b.iter(|| {
            let inv = subs.invalidate_range_start(&r).unwrap();
            inv.end();
        })
    });
    g.bench_function("clear_64_ptes_in_bracket", |b| {
        b.iter(|| {
            let inv = subs.invalidate_range_start(&r).unwrap();
            for i in 0..64u64 {
                inv.clear(0x10000 + i * 0x1000);
            }
            inv.end();
        })
    });
    g.bench_function("clear_young_1range", |b| {
        b.iter(|| std::hint::black_box(subs.clear_young(0x10000, 0x11000)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = hot_paths
}
criterion_main!(benches);
