//! get+put hit through the C ABI against the Rust call, single thread, and
//! through the ABI from several threads.
//!
//! `cargo bench -p notifier-capi --bench capi_hit`
//!
//! - `rust_get_put`: `Registry<SoftNic>::get` + `put`, same memory, same
//!   setup (a userfaultfd monitor over the buffer);
//! - `rust_mutex_get_put`: the same behind a `parking_lot::Mutex` locked
//!   per call, as the C layer does today (single-owner registry);
//! - `c_abi_get_put`: `notifier_registry_get` + `notifier_registry_put`,
//!   called through their `extern "C"` symbols (handle check, rounding to
//!   pages, catch_unwind, the slot mutex);
//! - `c_abi_get_put_threads/N`: N threads, each on its own buffer of one
//!   registry, time per get+put pair per thread.
//!
//! Without userfaultfd it prints `SKIP:` and measures nothing.

use core::ffi::c_void;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use notifier::*;
use notifier_rdma::{Access, Registry, RegistryConfig, SoftNic};
use notifier_uffd::{Region, RegisterMode, UffdMonitor, UffdPrimary, ZeroHandler};
use parking_lot::Mutex;

const BUF: usize = 64 << 10;
const THREADS: usize = 2;

fn bench(c: &mut Criterion) {
    let m = match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            return;
        }
    };
    let _thread = m.spawn().expect("handler thread");
    let region = Region::anon(BUF as u64).expect("mmap");
    m.register(&region, RegisterMode::MISSING)
        .expect("register");
    let prim = Arc::new(UffdPrimary::new(&m).expect("pagemap"));
    let nic = SoftNic::new(prim.clone());
    let mut reg = Registry::new(&*prim, nic, RegistryConfig::default());
    let rw = Access::LOCAL_RW;
    let a = region.addr();
    let h = reg.get(a, BUF as u64, rw).unwrap();
    reg.put(h).unwrap();

    let mut g = c.benchmark_group("capi_hit");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("rust_get_put", |b| {
        b.iter(|| {
            let h = reg.get(black_box(a), BUF as u64, rw).unwrap();
            reg.put(black_box(h)).unwrap();
        })
    });
    let locked = Mutex::new(reg);
    g.bench_function("rust_mutex_get_put", |b| {
        b.iter(|| {
            let h = locked.lock().get(black_box(a), BUF as u64, rw).unwrap();
            locked.lock().put(black_box(h)).unwrap();
        })
    });

    // The same through the C ABI: its own monitor and registry.
    let mut cm = notifier_monitor { id: 0 };
    let mut cr = notifier_registry { id: 0 };
    // SAFETY: valid out pointers.
    unsafe {
        assert_eq!(notifier_monitor_create(0, &mut cm), NOTIFIER_OK);
        assert_eq!(
            notifier_registry_create(cm, core::ptr::null(), &mut cr),
            NOTIFIER_OK
        );
    }
    let bufs: Vec<Region> = (0..THREADS)
        .map(|_| Region::anon(BUF as u64).unwrap())
        .collect();
    for b in &bufs {
        assert_eq!(
            notifier_monitor_watch(cm, b.addr() as *const c_void, BUF),
            NOTIFIER_OK
        );
    }
    let flags = NOTIFIER_ACCESS_LOCAL_WRITE;
    let getput = |p: *const c_void| {
        let mut mr = notifier_mr::default();
        // SAFETY: valid pointers.
        unsafe {
            let st = notifier_registry_get(cr, black_box(p), BUF, flags, &mut mr);
            debug_assert_eq!(st, NOTIFIER_OK);
            let st = notifier_registry_put(cr, black_box(&mr));
            debug_assert_eq!(st, NOTIFIER_OK);
        }
    };
    let p0 = bufs[0].addr() as *const c_void;
    getput(p0);
    g.bench_function("c_abi_get_put", |b| b.iter(|| getput(p0)));
    let addrs: Vec<u64> = bufs.iter().map(|b| b.addr()).collect();
    g.bench_function(format!("c_abi_get_put_threads/{THREADS}"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for &a in &addrs {
                    s.spawn(move || {
                        for _ in 0..iters {
                            getput(a as *const c_void);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
    assert_eq!(notifier_registry_destroy(cr), NOTIFIER_OK);
    drop(bufs);
    assert_eq!(notifier_monitor_destroy(cm), NOTIFIER_OK);
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, bench);
}
use group::benches;
criterion_main!(benches);
