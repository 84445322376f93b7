//! Criterion benches of the KVM mirror, with the raw syscalls and ioctls
//! measured beside it in the same run.
//!
//! Run: `cargo bench -p notifier-kvm --bench kvm_mirror`
//! (skips with a message when /dev/kvm is missing).
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kvm_ioctls::{Kvm, VcpuExit};
use notifier_core::frame::FrameStore;
use notifier_core::mm::{Advice, FileOptions, Mm, MmapRequest, Prot};
use notifier_core::notifier::{Event, InvalidateRange};
use notifier_core::primary::Primary;
use notifier_core::PageRange;
use notifier_kvm::baseline::{RawSlot, RawView, UffdCopy};
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::testing::TestPrimary;
use notifier_kvm::{DeviceView, KvmMirror, MemfdFrames, LOG_DIRTY_PAGES};
use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};

type Env = (Kvm, Arc<TestPrimary>, KvmMirror<TestPrimary>);

fn env(frames: usize) -> Option<Env> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: kvm benches: /dev/kvm unavailable: {e}");
            return None;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let store = Arc::new(MemfdFrames::new(0x1000, frames).unwrap());
    let primary = TestPrimary::new(store.clone());
    let max = kvm.get_nr_memslots() as u32;
    let mirror = KvmMirror::new(vm, primary.clone(), store, max).ok()?;
    Some((kvm, primary, mirror))
}

const MIB: u64 = 1 << 20;

/// Raw and mirror updates run interleaved in every iteration (each bench
/// times one of the two), so both see the same KVM state and machine noise.
fn memslot_update(c: &mut Criterion) {
    let Some((_kvm, primary, mirror)) = env(64) else {
        return;
    };
    let mut g = c.benchmark_group("kvm_memslot_update_1MiB");
    let (a, b) = (0x1000_0000u64, 0x2000_0000u64);
    primary.mmap_anon(a, MIB);
    let raw = RawSlot::new(mirror.vm().clone(), 1000, 0x3000_0000, MIB).unwrap();
    let mirror_pair = || {
        mirror.add_region(a, MIB).unwrap();
        mirror.remove_region(a).unwrap();
    };
    let raw_pair = || raw.add_delete().unwrap();
    g.bench_function("raw_ioctl_pair_add_delete", |bn| {
        bn.iter_custom(|n| interleaved(n, raw_pair, mirror_pair))
    });
    g.bench_function("mirror_add_remove_region", |bn| {
        bn.iter_custom(|n| interleaved(n, mirror_pair, raw_pair))
    });
    let live = std::cell::RefCell::new(raw.add().unwrap());
    mirror.add_region(a, MIB).unwrap();
    let raw_move = || {
        let mut l = live.borrow_mut();
        l.move_to(0x4000_0000).unwrap();
        l.move_to(0x3000_0000).unwrap();
    };
    let mirror_move = || {
        mirror.move_region(a, b).unwrap();
        mirror.move_region(b, a).unwrap();
    };
    let raw_flags = || {
        let mut l = live.borrow_mut();
        l.set_flags(LOG_DIRTY_PAGES).unwrap();
        l.set_flags(0).unwrap();
    };
    let mirror_flags = || {
        mirror.set_dirty_logging(a, true).unwrap();
        mirror.set_dirty_logging(a, false).unwrap();
    };
    g.bench_function("raw_ioctl_pair_dirty_log_on_off", |bn| {
        bn.iter_custom(|n| interleaved(n, raw_flags, mirror_flags))
    });
    g.bench_function("mirror_dirty_logging_on_off", |bn| {
        bn.iter_custom(|n| interleaved(n, mirror_flags, raw_flags))
    });
    g.bench_function("raw_ioctl_pair_move_there_and_back", |bn| {
        bn.iter_custom(|n| interleaved(n, raw_move, mirror_move))
    });
    g.bench_function("mirror_move_region_there_and_back", |bn| {
        bn.iter_custom(|n| interleaved(n, mirror_move, raw_move))
    });
    g.finish();
    // All three cases side by side with raw in one run, paired.
    paired("dirty_log_on_off", 10_000, mirror_flags, raw_flags);
    paired("move_there_and_back", 4_000, mirror_move, raw_move);
    drop(live.into_inner()); // raw slot deleted: add + delete reuse it
    mirror.remove_region(a).unwrap();
    paired("add_remove", 4_000, mirror_pair, raw_pair);
}

/// Time `timed` over `n` iterations, running `other` (untimed) beside it
/// in every iteration: after it on even iterations, before it on odd ones,
/// so neither side always runs first.
fn interleaved(n: u64, timed: impl Fn(), other: impl Fn()) -> Duration {
    let mut t = Duration::ZERO;
    for i in 0..n {
        if i % 2 == 1 {
            other();
        }
        let s = Instant::now();
        timed();
        t += s.elapsed();
        if i % 2 == 0 {
            other();
        }
    }
    t
}

/// A paired side-by-side measurement (printed, not a criterion bench): `n`
/// iterations each timing `ours` and `raw` back to back, alternating which
/// goes first. Both sides see the same moment's load on a noisy shared
/// machine, so the median of the per-iteration differences is the
/// bookkeeping cost even when whole-run medians drift by 10%.
fn paired(name: &str, n: usize, ours: impl Fn(), raw: impl Fn()) {
    let time = |f: &dyn Fn()| {
        let s = Instant::now();
        f();
        s.elapsed().as_nanos() as i64
    };
    let (mut o, mut r, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (a, b) = if i % 2 == 0 {
            let a = time(&ours);
            (a, time(&raw))
        } else {
            let b = time(&raw);
            (time(&ours), b)
        };
        o.push(a);
        r.push(b);
        d.push(a - b);
    }
    for v in [&mut o, &mut r, &mut d] {
        v.sort_unstable();
    }
    let q = |v: &[i64], f: f64| v[((v.len() - 1) as f64 * f) as usize];
    let us = |x: i64| x as f64 / 1000.0;
    eprintln!(
        "paired {name} (n={n}): ours p10 {:.2} us p50 {:.2} us | raw p10 {:.2} us p50 {:.2} us | \
         ours-raw p25 {:+.3} p50 {:+.3} p75 {:+.3} us | median ratio {:.3}",
        us(q(&o, 0.1)),
        us(q(&o, 0.5)),
        us(q(&r, 0.1)),
        us(q(&r, 0.5)),
        us(q(&d, 0.25)),
        us(q(&d, 0.5)),
        us(q(&d, 0.75)),
        q(&o, 0.5) as f64 / q(&r, 0.5) as f64
    );
}

fn device_translation(c: &mut Criterion) {
    let Some((_kvm, primary, mirror)) = env(64) else {
        return;
    };
    primary.mmap_anon(0, MIB);
    mirror.add_region(0, MIB).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    dev.write_obj(7u64, GuestAddress(0x9000)).unwrap();
    let mut g = c.benchmark_group("kvm_device_view_hit");
    g.bench_function("translate_hit", |bn| {
        bn.iter(|| black_box(dev.translate(black_box(0x9008), false).unwrap().translation))
    });
    g.bench_function("lookup_hit_optimistic", |bn| {
        bn.iter(|| {
            let (t, seq) = dev.lookup(black_box(0x9008)).unwrap();
            black_box((t, seq))
        })
    });
    let region = dev.region(0).unwrap();
    g.bench_function("region_read_u64_hit_optimistic", |bn| {
        bn.iter(|| {
            black_box(
                region
                    .read_obj::<u64>(MemoryRegionAddress(black_box(0x9008)))
                    .unwrap(),
            )
        })
    });
    g.bench_function("read_obj_u64_hit", |bn| {
        bn.iter(|| {
            black_box(
                dev.read_obj::<u64>(GuestAddress(black_box(0x9008)))
                    .unwrap(),
            )
        })
    });
    g.bench_function("write_obj_u64_hit", |bn| {
        bn.iter(|| {
            dev.write_obj(black_box(5u64), GuestAddress(black_box(0x9010)))
                .unwrap()
        })
    });
    g.finish();
}

fn invalidate_2mib(c: &mut Criterion) {
    let Some((_kvm, primary, mirror)) = env(1024) else {
        return;
    };
    let base = 0x20_0000u64;
    let len = 2 * MIB;
    primary.mmap_anon(base, len);
    mirror.add_region(base, len).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    let range = InvalidateRange::new(PageRange::new(base, len).unwrap(), Event::Clear);
    let mut g = c.benchmark_group("kvm_invalidate_2MiB");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    g.bench_function("mirror_and_cache_invalidate", |bn| {
        bn.iter_batched(
            || {
                mirror.populate(base, len, true).unwrap();
                for p in (base..base + len).step_by(4096) {
                    dev.translate(p, false).unwrap();
                }
            },
            |()| {
                primary
                    .notifiers()
                    .invalidate_range_start(&range)
                    .unwrap()
                    .end()
            },
            BatchSize::PerIteration,
        )
    });
    let raw = RawView::new(len, mirror.frames().clone()).unwrap();
    g.bench_function("raw_mmap_prot_none_2MiB", |bn| {
        bn.iter_batched(
            || raw.map_all().unwrap(),
            |()| raw.punch_all().unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Where guest-physical 0 sits in the `Mm`'s address space (guest RAM is
/// one mapping of the VMM's `Mm`, as in `tests/kvm_guest_mm.rs`).
const GUEST_BASE: u64 = 0x10_0000_0000;

/// A VM with a mirror of the real software primary (`mm::Mm`) over
/// `frames` memfd frames.
fn env_mm(frames: usize) -> Option<(Kvm, Arc<Mm>, KvmMirror<Mm>)> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: kvm benches: /dev/kvm unavailable: {e}");
            return None;
        }
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let store = Arc::new(MemfdFrames::new(0x1000, frames).unwrap());
    let mm = Mm::new(store.clone() as Arc<dyn FrameStore>);
    let max = kvm.get_nr_memslots() as u32;
    let mirror = KvmMirror::new(vm, mm.clone(), store, max).ok()?;
    Some((kvm, mm, mirror))
}

/// Demand faults served end to end on the real primary: the guest reads a
/// page whose PTE `madvise(DONTNEED)` dropped (untimed), the read exits,
/// `Mm::fault_page` faults it back (the file page from the page cache: a
/// snapshot restore; the zero page for anonymous memory: lazy population),
/// the host view maps it and the guest resumes.
fn demand_fault(c: &mut Criterion) {
    let Some((_kvm, mm, mirror)) = env_mm(256) else {
        return;
    };
    mm.mmap(&MmapRequest::anon(MIB, Prot::RW).at(GUEST_BASE))
        .unwrap();
    let (anon, filep) = (0x8000u64, 0x1_0000u64);
    let file = mm.create_file(FileOptions::new(1));
    file.write(0, &0xf11eu32.to_le_bytes()).unwrap();
    mm.mmap(
        &MmapRequest::file(file, 0, 4096, Prot::RW)
            .shared()
            .at(GUEST_BASE + filep),
    )
    .unwrap();
    mirror.add_region_at(0, GUEST_BASE, MIB, 0).unwrap();
    let mut guest = RealModeGuest::new(&mirror, 0).unwrap();
    guest.read_u32(&mirror, anon).unwrap();
    let mut g = c.benchmark_group("kvm_guest_fault");
    g.bench_function("guest_read_present_4_exits", |bn| {
        bn.iter(|| black_box(guest.read_u32(&mirror, anon).unwrap()))
    });
    // The same fault after a bare `Event::Clear` bracket (the PTE stays:
    // the primary's fault is a lookup), to split the primary's share out.
    let range = InvalidateRange::new(
        PageRange::new(GUEST_BASE + anon, 4096).unwrap(),
        Event::Clear,
    );
    g.bench_function("guest_read_demand_fault_after_clear", |bn| {
        bn.iter_batched(
            || mm.notifiers().invalidate_range_start(&range).unwrap().end(),
            |()| black_box(guest.read_u32(&mirror, anon).unwrap()),
            BatchSize::PerIteration,
        )
    });
    for (name, gpa) in [
        ("guest_read_demand_fault_file_page", filep),
        ("guest_read_demand_fault_anon_zero_page", anon),
    ] {
        g.bench_function(name, |bn| {
            bn.iter_batched(
                || {
                    mm.madvise(GUEST_BASE + gpa, 4096, Advice::DontNeed)
                        .unwrap()
                },
                |()| black_box(guest.read_u32(&mirror, gpa).unwrap()),
                BatchSize::PerIteration,
            )
        });
    }
    // A raw exit round trip: `mov dx, 0x13; l: out dx, al; jmp l` at 0x3000.
    mirror
        .mmio_write(0x3000, &[0xBA, 0x13, 0x00, 0xEE, 0xEB, 0xFD])
        .unwrap();
    let mut vcpu = mirror.vm().create_vcpu(1).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x3000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    g.bench_function("raw_kvm_exit_round_trip", |bn| {
        bn.iter(|| loop {
            if let VcpuExit::IoOut(..) = vcpu.run().unwrap() {
                break;
            }
        })
    });
    // The raw userfaultfd round trip: fault, helper thread's UFFDIO_COPY,
    // resume; and the MADV_DONTNEED reset it needs, alone.
    match UffdCopy::new() {
        Ok(u) => {
            g.bench_function("raw_uffd_copy_round_trip_incl_reset", |bn| {
                bn.iter(|| {
                    u.reset().unwrap();
                    black_box(u.touch())
                })
            });
            g.bench_function("raw_madv_dontneed_reset_only", |bn| {
                bn.iter(|| u.reset().unwrap())
            });
        }
        Err(e) => eprintln!("SKIP: raw userfaultfd baseline: {e}"),
    }
    g.finish();
}

criterion_group! {
    // (criterion_group! generates an undocumented fn)
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = memslot_update, device_translation, invalidate_2mib, demand_fault
}
criterion_main!(benches);
