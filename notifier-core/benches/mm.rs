#![allow(missing_docs)]
//! Criterion benches of the primary address space (`cargo bench -p
//! notifier-core --bench mm`): the fault path, COW, and munmap of a sparse
//! gigabyte. Page-table memory is measured in bytes by the
//! `mm_memory` integration test, not here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use notifier_core::frame::HeapFrames;
use notifier_core::mm::{Mm, MmapRequest, Prot};

const PAGE: u64 = 4096;
const CHUNK: u64 = 4096;

fn mm(frames: usize) -> Arc<Mm> {
    Mm::new(Arc::new(HeapFrames::new(0x1000, frames)))
}

fn anon_read_fault(c: &mut Criterion) {
    let mm = mm(16);
    c.bench_function("mm/anon_read_fault_empty_page", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                let a = mm.mmap(&MmapRequest::anon(n * PAGE, Prot::RW)).unwrap();
                let s = Instant::now();
                for i in 0..n {
                    std::hint::black_box(mm.fault(a + i * PAGE, false).unwrap());
                }
                t += s.elapsed();
                mm.munmap(a, n * PAGE).unwrap();
                left -= n;
            }
            t
        })
    });
}

fn cow_write_fault(c: &mut Criterion) {
    let mut g = c.benchmark_group("mm/cow_write_fault");
    let m = mm(CHUNK as usize + 16);
    g.bench_function("zero_page", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(CHUNK);
                let a = m.mmap(&MmapRequest::anon(n * PAGE, Prot::RW)).unwrap();
                for i in 0..n {
                    m.fault(a + i * PAGE, false).unwrap();
                }
                let s = Instant::now();
                for i in 0..n {
                    std::hint::black_box(m.fault(a + i * PAGE, true).unwrap());
                }
                t += s.elapsed();
                m.munmap(a, n * PAGE).unwrap();
                left -= n;
            }
            t
        })
    });
    // The copy's source pages are cold (16 MiB working set) or cache-warm
    // (1 MiB): the 4 KiB copy from DRAM dominates the cold case.
    for (name, chunk) in [
        ("after_fork_copy_cold_16MiB", CHUNK),
        ("after_fork_copy_warm_1MiB", 256),
    ] {
        let m = mm(2 * chunk as usize + 16);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(chunk);
                    let a = m.mmap(&MmapRequest::anon(n * PAGE, Prot::RW)).unwrap();
                    for i in 0..n {
                        m.write_u64(a + i * PAGE, i).unwrap();
                    }
                    let child = m.fork().unwrap();
                    let s = Instant::now();
                    for i in 0..n {
                        std::hint::black_box(child.fault(a + i * PAGE, true).unwrap());
                    }
                    t += s.elapsed();
                    drop(child);
                    m.munmap(a, n * PAGE).unwrap();
                    left -= n;
                }
                t
            })
        });
    }
    g.finish();
}

fn munmap_sparse_gib(c: &mut Criterion) {
    let m = mm(64);
    c.bench_function("mm/munmap_1gib_16_pages", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let a = m.mmap(&MmapRequest::anon(1 << 30, Prot::RW)).unwrap();
                for i in 0..16u64 {
                    m.write_u64(a + i * (64 << 20), i).unwrap();
                }
                let s = Instant::now();
                m.munmap(a, 1 << 30).unwrap();
                t += s.elapsed();
            }
            t
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = anon_read_fault, cow_write_fault, munmap_sparse_gib
}
criterion_main!(benches);
