//! A missing fault served through our handler, beside the raw
//! UFFDIO_COPY round trip (a bare userfaultfd and a thread that reads the
//! fault and copies one page).

#![allow(missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use notifier_uffd::{Advice, Fill, PageBuf, PageFault, Region, RegisterMode, UffdMonitor};
use userfaultfd::{Event as UEvent, UffdBuilder};

const P: u64 = 4096;
const PAGES: u64 = 4096;

/// Touch `iters` missing pages, re-zapping the region (untimed) when all
/// pages were touched.
fn touch_missing(region: &Region, next: &mut u64, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        if *next == PAGES {
            region.madvise(0, PAGES * P, Advice::DontNeed).unwrap();
            *next = 0;
        }
        let n = left.min(PAGES - *next);
        let t = Instant::now();
        for i in *next..*next + n {
            std::hint::black_box(region.read_u8(i * P).unwrap());
        }
        total += t.elapsed();
        *next += n;
        left -= n;
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("uffd_fault");
    g.sample_size(20).measurement_time(Duration::from_secs(4));

    let raw = match UffdBuilder::new()
        .user_mode_only(false)
        .close_on_exec(true)
        .create()
    {
        Ok(u) => Arc::new(u),
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            return;
        }
    };
    let region = Region::anon(PAGES * P).unwrap();
    raw.register(region.addr() as *mut libc::c_void, (PAGES * P) as usize)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (raw, stop) = (raw.clone(), stop.clone());
        std::thread::spawn(move || {
            let src = Box::new([0x5au8; P as usize]);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(UEvent::Pagefault { addr, .. })) = raw.read_event() {
                    let page = (addr as u64) & !(P - 1);
                    // SAFETY: `src` is a live page-sized buffer; the kernel
                    // installs a copy at a missing page of the registered range.
                    let _ = unsafe {
                        raw.copy(
                            src.as_ptr().cast(),
                            page as *mut libc::c_void,
                            P as usize,
                            true,
                        )
                    };
                }
            }
        })
    };
    let mut next = 0;
    g.bench_function("raw_uffdio_copy_round_trip", |b| {
        b.iter_custom(|iters| touch_missing(&region, &mut next, iters))
    });
    stop.store(true, Ordering::Relaxed);
    // One more fault wakes the server so it sees the stop flag.
    if next == PAGES {
        region.madvise(0, P, Advice::DontNeed).unwrap();
        next = 0;
    }
    region.read_u8(next * P).unwrap();
    server.join().unwrap();
    raw.unregister(region.addr() as *mut libc::c_void, (PAGES * P) as usize)
        .unwrap();
    drop(region);

    let h = Arc::new(|_: &PageFault, page: &mut PageBuf| {
        page.fill(0x5a);
        Ok(Fill::Bytes)
    });
    let m = UffdMonitor::builder().build(h).unwrap();
    let _t = m.spawn().unwrap();
    let region = Region::anon(PAGES * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let mut next = 0;
    g.bench_function("monitor_missing_fault", |b| {
        b.iter_custom(|iters| touch_missing(&region, &mut next, iters))
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
