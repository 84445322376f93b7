//! Criterion benches of the registry: the hit path (get+put), the miss
//! path (register and deregister), an unmap event on a cached region, and
//! a SoftNic DMA through a warm MTT.
//!
//! `cargo bench -p notifier-rdma --bench rdma_registry`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use notifier_core::notifier::{Event, InvalidateRange};
use notifier_core::primary::Primary;
use notifier_core::PageRange;
use notifier_rdma::testing::ModelPrimary;
use notifier_rdma::{Access, Registry, RegistryConfig, SoftNic};

const BASE: u64 = 0x1000_0000_0000;
const REGION: u64 = 64 << 10;
const STRIDE: u64 = 128 << 10;

fn setup(regions: u32) -> (std::sync::Arc<ModelPrimary>, SoftNic, Registry<SoftNic>) {
    let mm = ModelPrimary::new(64);
    mm.mmap(BASE, u64::from(regions.max(1)) * STRIDE, true)
        .unwrap();
    let nic = SoftNic::new(mm.clone());
    let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
    for i in 0..regions {
        let h = reg
            .get(BASE + u64::from(i) * STRIDE, REGION, Access::LOCAL_RW)
            .unwrap();
        reg.put(h).unwrap();
    }
    (mm, nic, reg)
}

fn hit(c: &mut Criterion) {
    for r in [1u32, 64, 4096] {
        let (_mm, _nic, mut reg) = setup(r);
        let mut i = 0u32;
        c.bench_function(&format!("rdma_hit_getput_r{r}"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let idx = i.wrapping_mul(2_654_435_761) & (r - 1);
                let h = reg
                    .get(BASE + u64::from(idx) * STRIDE, REGION, Access::LOCAL_RW)
                    .unwrap();
                reg.put(black_box(h)).unwrap();
            })
        });
    }
}

fn miss(c: &mut Criterion) {
    let (_mm, _nic, mut reg) = setup(0);
    c.bench_function("rdma_reg_invalidate_dereg", |b| {
        b.iter(|| {
            let h = reg.get(BASE, REGION, Access::LOCAL_RW).unwrap();
            reg.invalidate(BASE, REGION).unwrap();
            reg.put(black_box(h)).unwrap();
        })
    });
}

fn unmap_event(c: &mut Criterion) {
    let range = InvalidateRange::new(PageRange::new(BASE, REGION).unwrap(), Event::Unmap);
    c.bench_function("rdma_unmap_event_cached_region", |b| {
        b.iter_batched(
            || setup(1),
            |(mm, nic, reg)| {
                mm.notifiers().invalidate_range_start(&range).unwrap().end();
                (mm, nic, reg)
            },
            BatchSize::SmallInput,
        )
    });
}

fn dma(c: &mut Criterion) {
    let (_mm, nic, mut reg) = setup(1);
    let h = reg.get(BASE, REGION, Access::ALL).unwrap();
    let mut buf = [0u8; 64];
    nic.remote_read(h.rkey(), BASE, &mut buf).unwrap();
    c.bench_function("rdma_softnic_remote_read_64b_warm", |b| {
        b.iter(|| {
            nic.remote_read(h.rkey(), BASE + 128, black_box(&mut buf))
                .unwrap()
        })
    });
    reg.put(h).unwrap();
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, hit, miss, unmap_event, dma);
}
use group::benches;
criterion_main!(benches);
