//! Notifier machinery: invalidation dispatch over a large interval index,
//! the read side of the sequence protocol, subscribe/unsubscribe.
//!
//! `cargo bench -p notifier-bench --bench machinery`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use notifier_core::notifier::*;
use notifier_core::{PageRange, PAGE_SIZE};

/// A realistic subscriber: takes its lock, records the sequence, counts.
struct Sub {
    lock: parking_lot::Mutex<u64>,
}

impl IntervalNotifierOps for Sub {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _r: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut g = self.lock.lock();
        sub.set_seq(cur_seq);
        *g += 1;
        Ok(())
    }
}

const N: u64 = 100_000;

/// `N` one-page subscriptions at a two-page stride: page `2i` is
/// subscribed, page `2i + 1` is a gap.
fn populate(subs: &Arc<NotifierSubscriptions>) -> Vec<IntervalSubscription<Sub>> {
    (0..N)
        .map(|i| {
            subs.interval_subscribe(
                2 * i * PAGE_SIZE,
                PAGE_SIZE,
                Sub {
                    lock: parking_lot::Mutex::new(0),
                },
            )
            .unwrap()
        })
        .collect()
}

fn bench_invalidate(c: &mut Criterion) {
    let subs = NotifierSubscriptions::new();
    let held = populate(&subs);
    eprintln!(
        "# index: {} subscriptions, {} bytes of index heap ({:.1} B/subscription), node {} B, subscription allocation {} B",
        subs.interval_count(),
        subs.index_heap_bytes(),
        subs.index_heap_bytes() as f64 / N as f64,
        NotifierSubscriptions::index_node_bytes(),
        NotifierSubscriptions::subscription_bytes::<Sub>(),
    );
    let mut g = c.benchmark_group("invalidate_100k");
    let mut i = 0u64;
    let none: Vec<InvalidateRange> = (0..1024u64)
        .map(|k| {
            InvalidateRange::new(
                PageRange::new((2 * (k * 97 % N) + 1) * PAGE_SIZE, PAGE_SIZE).unwrap(),
                Event::Clear,
            )
        })
        .collect();
    let one: Vec<InvalidateRange> = (0..1024u64)
        .map(|k| {
            InvalidateRange::new(
                PageRange::new(2 * (k * 97 % N) * PAGE_SIZE, PAGE_SIZE).unwrap(),
                Event::Clear,
            )
        })
        .collect();
    g.bench_function("overlap_none", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            subs.invalidate_range_start(black_box(&none[i as usize]))
                .unwrap()
                .end();
        })
    });
    g.bench_function("overlap_one", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            subs.invalidate_range_start(black_box(&one[i as usize]))
                .unwrap()
                .end();
        })
    });
    g.finish();
    drop(held);
}

fn bench_empty(c: &mut Criterion) {
    let subs = NotifierSubscriptions::new();
    let r = InvalidateRange::new(PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap(), Event::Clear);
    c.bench_function("invalidate_empty_set", |b| {
        b.iter(|| subs.invalidate_range_start(black_box(&r)).unwrap().end())
    });
}

fn bench_read_side(c: &mut Criterion) {
    let subs = NotifierSubscriptions::new();
    let sub = subs
        .interval_subscribe(
            0,
            PAGE_SIZE,
            Sub {
                lock: parking_lot::Mutex::new(0),
            },
        )
        .unwrap();
    c.bench_function("read_begin_read_retry", |b| {
        b.iter(|| {
            let s = black_box(&sub).read_begin();
            black_box(sub.read_retry(s))
        })
    });
}

fn bench_subscribe(c: &mut Criterion) {
    let subs = NotifierSubscriptions::new();
    let _held = populate(&subs);
    let k = AtomicU64::new(0);
    c.bench_function("subscribe_unsubscribe_100k", |b| {
        b.iter(|| {
            let n = k.fetch_add(1, Ordering::Relaxed) % N;
            let s = subs
                .interval_subscribe(
                    (2 * n + 1) * PAGE_SIZE,
                    PAGE_SIZE,
                    Sub {
                        lock: parking_lot::Mutex::new(0),
                    },
                )
                .unwrap();
            s.unsubscribe().unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_empty, bench_invalidate, bench_read_side, bench_subscribe
}
criterion_main!(benches);
