//! Secondary-MMU toolkit: TLB hit and miss, fault-in of a present page
//! through the whole retry protocol, invalidation of a 2 MiB range, and
//! the coherence oracle's cost per access.
//!
//! `cargo bench -p notifier-bench --bench secondary`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use notifier_core::frame::Pfn;
use notifier_core::notifier::{Event, InvalidateRange};
use notifier_core::primary::Primary;
use notifier_core::secondary::*;
use notifier_core::verify::{Oracle, TestPrimary};
use notifier_core::{PageRange, PAGE_SIZE};

const BASE: u64 = 0x4000_0000;

fn bench_tlb(c: &mut Criterion) {
    let mut tlb = Tlb::new(TlbConfig::default());
    for i in 0..256u64 {
        tlb.fill(i << 12, Pfn(i), Perm::READ_WRITE);
    }
    let mut i = 0u64;
    c.bench_function("tlb_hit_translate", |b| {
        b.iter(|| {
            i = (i + 1) & 255;
            black_box(tlb.lookup(black_box(i << 12)))
        })
    });
    // The same lookups, 64 per iteration, so criterion's per-iteration
    // overhead is amortised: divide the time by 64.
    c.bench_function("tlb_hit_translate_x64", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for k in 0..64u64 {
                let a = ((i + k * 5) & 255) << 12;
                acc ^= tlb.lookup(black_box(a)).map_or(0, |e| e.pfn.0);
            }
            i = (i + 1) & 255;
            black_box(acc)
        })
    });

    // A miss in the TLB that hits in the external page table: lookup,
    // walk, fill. The TLB has 512 entries and we cycle over 4096 pages.
    let ept = ExternalPageTable::<Iova>::new();
    for i in 0..4096u64 {
        ept.map(Iova(i << 12), Pfn(i), Perm::READ).unwrap();
    }
    let mut tlb = Tlb::new(TlbConfig::default());
    let mut k = 0u64;
    c.bench_function("tlb_miss_ept_walk_fill", |b| {
        b.iter(|| {
            k = (k + 513) & 4095;
            let a = k << 12;
            match tlb.lookup(a) {
                Some(e) => black_box(e.pfn),
                None => {
                    let e = ept.lookup(Iova(a)).unwrap();
                    tlb.fill(a, e.pfn, e.perm);
                    black_box(e.pfn)
                }
            }
        })
    });
}

fn bench_mirror(c: &mut Criterion) {
    let len = 1024 * PAGE_SIZE;
    let p = TestPrimary::new(PageRange::new(BASE, len).unwrap(), 2048);
    let m = Mirror::<_, Va>::new(p.clone(), MirrorConfig::identity(BASE, len), None).unwrap();
    for i in 0..512 {
        p.fault_page(BASE + i * PAGE_SIZE, true).unwrap();
    }
    let mut i = 0u64;
    c.bench_function("fault_in_present_page", |b| {
        b.iter(|| {
            i = (i + 1) & 511;
            m.fault_in(BASE + i * PAGE_SIZE, false, FaultMode::Fault)
                .unwrap()
        })
    });

    // Invalidate a 2 MiB range that the mirror maps completely (512 pages,
    // 512 TLB entries resident), re-mapping it between iterations.
    let r = InvalidateRange::new(PageRange::new(BASE, 2 << 20).unwrap(), Event::Clear);
    c.bench_function("invalidate_2m_mapped", |b| {
        b.iter_batched(
            || {
                m.prefetch(BASE, 2 << 20, false, FaultMode::Snapshot)
                    .unwrap();
                for i in 0..512 {
                    let _ = m.translate(0, BASE + i * PAGE_SIZE);
                }
            },
            |_| p.notifiers().invalidate_range_start(&r).unwrap().end(),
            criterion::BatchSize::PerIteration,
        )
    });

    // Device reads on a warm TLB, without and with the oracle.
    let plain = Mirror::<_, Va>::new(p.clone(), MirrorConfig::identity(BASE, len), None).unwrap();
    let oracle = Oracle::new(p.clone());
    let checked =
        Mirror::<_, Va>::new(p.clone(), MirrorConfig::identity(BASE, len), Some(oracle)).unwrap();
    for mm in [&plain, &checked] {
        for i in 0..64 {
            mm.read_u64(0, BASE + i * PAGE_SIZE).unwrap();
        }
    }
    let mut g = c.benchmark_group("device_read_warm");
    let mut i = 0u64;
    g.bench_function("no_oracle", |b| {
        b.iter(|| {
            i = (i + 1) & 63;
            plain.read_u64(0, BASE + i * PAGE_SIZE).unwrap()
        })
    });
    g.bench_function("with_oracle", |b| {
        b.iter(|| {
            i = (i + 1) & 63;
            checked.read_u64(0, BASE + i * PAGE_SIZE).unwrap()
        })
    });
    g.finish();
    drop(Arc::clone(&p));
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_tlb, bench_mirror
}
criterion_main!(benches);
