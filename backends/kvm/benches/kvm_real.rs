//! Real memory (`RealGuestMemory` over `GuestRam`) against the raw kernel
//! operations, in the same run:
//!
//! - memslot move with the views republished (`move_region` there and
//!   back) against the raw `KVM_SET_USER_MEMORY_REGION` pair;
//! - balloon inflation of 64 MiB (`balloon_inflate`: announced to the
//!   monitor's subscribers, zapped, KVM's mappings dropped by the kernel's
//!   mmu notifier) against a raw `madvise(MADV_DONTNEED)` of 64 MiB of
//!   plain anonymous memory, and against a plain `madvise` of the same
//!   registered RAM (the monitor reads the REMOVE).
//!
//! `cargo bench -p notifier-kvm --bench kvm_real`
//! Restore figures come from the `snapshot_restore` example.

// criterion_group! generates an undocumented fn.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kvm_ioctls::Kvm;
use notifier_kvm::baseline::RawSlot;
use notifier_kvm::{GuestRam, RealGuestMemory};
use notifier_uffd::{HandlerThread, UffdMonitor, ZeroHandler};

const MIB: u64 = 1 << 20;

struct World {
    mem: RealGuestMemory,
    _thread: HandlerThread,
    kvm: Kvm,
}

fn world() -> Option<World> {
    let kvm = Kvm::new().ok()?;
    let monitor = UffdMonitor::builder().build(Arc::new(ZeroHandler)).ok()?;
    let thread = monitor.spawn().ok()?;
    let vm = Arc::new(kvm.create_vm().ok()?);
    let mem = RealGuestMemory::new(vm, monitor, kvm.get_nr_memslots() as u32).ok()?;
    Some(World {
        mem,
        _thread: thread,
        kvm,
    })
}

fn memslot_move(c: &mut Criterion) {
    let Some(w) = world() else {
        eprintln!("SKIP: kvm_real memslot_move: no KVM or userfaultfd");
        return;
    };
    let (a, b) = (0x1000_0000u64, 0x2000_0000u64);
    w.mem
        .add_region(a, GuestRam::anon(MIB).unwrap(), None)
        .unwrap();
    let raw = RawSlot::new(w.mem.vm().clone(), 1000, 0x3000_0000, MIB).unwrap();
    let mut live = raw.add().unwrap();
    let _ = &w.kvm;
    let mut g = c.benchmark_group("kvm_real_memslot_move_1MiB");
    g.bench_function("raw_ioctl_pair_move_there_and_back", |bn| {
        bn.iter(|| {
            live.move_to(0x4000_0000).unwrap();
            live.move_to(0x3000_0000).unwrap();
        })
    });
    g.bench_function("real_move_region_there_and_back_views_republished", |bn| {
        bn.iter(|| {
            w.mem.move_region(a, b).unwrap();
            w.mem.move_region(b, a).unwrap();
        })
    });
    g.finish();
}

fn balloon_64mib(c: &mut Criterion) {
    let Some(w) = world() else {
        eprintln!("SKIP: kvm_real balloon: no KVM or userfaultfd");
        return;
    };
    let len = 64 * MIB;
    let ram = w
        .mem
        .add_region(0, GuestRam::anon(len).unwrap(), None)
        .unwrap();
    let view = w.mem.memory();
    let plain = GuestRam::anon(len).unwrap();
    let mut g = c.benchmark_group("kvm_real_balloon_remove_64MiB");
    g.sample_size(10);
    g.bench_function("raw_madvise_dontneed_plain_anon", |bn| {
        bn.iter_batched(
            || plain.populate(0, len).unwrap(),
            |()| plain.discard(0, len).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("plain_madvise_of_registered_ram_under_memslot", |bn| {
        bn.iter_batched(
            || ram.populate(0, len).unwrap(),
            |()| ram.discard(0, len).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("real_balloon_inflate", |bn| {
        bn.iter_batched(
            || ram.populate(0, len).unwrap(),
            |()| {
                w.mem.balloon_inflate(0, len).unwrap();
                // The device view serves the zeros at once.
                assert!(view.is_current());
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group! {
    // (criterion_group! generates an undocumented fn)
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = memslot_move, balloon_64mib
}
criterion_main!(benches);
