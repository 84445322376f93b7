//! The multi-threaded hit workloads of the parity bench (`notifier bench
//! rcache --threads N`): hashed get+put from N threads sharing one
//! [`SharedRegistry`], over 4,096 cached 64 KiB regions and over one (every
//! thread on the same hot region). `benches/ucx/ucx_rcache_mt.c` runs the
//! same workload against UCX's shared `ucs_rcache` (docs/BENCHMARKS.md,
//! "Multi-threaded hits").
//!
//! The key sequence: op `i` of thread `t` of `N` uses `g = i * N + t`,
//! region `idx = (g as u32).wrapping_mul(2654435761) & (R - 1)`, so the N
//! threads together walk the single-thread sequence. Each thread first
//! touches every region (its own misses, untimed), runs the warm-up, then
//! each timed loop starts at a barrier; a loop's time is the slowest
//! thread's. The median loop is reported as total throughput, in M ops/s.

use std::hint::black_box;
use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use crate::parity::{addr, Metric, ParityConfig, ParityError, ACCESS, BASE, REGION, STRIDE};
use crate::testing::ModelPrimary;
use crate::{RegError, RegistryConfig, SharedRegistry, SoftNic};

/// Run `mt_hit_getput_r4096` and `mt_hit_getput_r1` for each thread count
/// in `threads`, printing `name VALUE Mops` lines (after a `# threads N`
/// line) to `out`.
///
/// # Errors
/// A registry failure, or a check: no registration may happen during the
/// timed loops, and every get must return a region covering its request.
pub fn run_mt(
    cfg: &ParityConfig,
    threads: &[usize],
    out: &mut dyn Write,
) -> Result<Vec<(usize, Metric)>, ParityError> {
    let mut metrics = Vec::new();
    for &n in threads {
        writeln!(out, "# threads {n}")?;
        for (r, name) in [(4096u32, "mt_hit_getput_r4096"), (1, "mt_hit_getput_r1")] {
            let v = mt_hit(cfg, n.max(1), r)?;
            let m = Metric {
                name,
                value: v,
                unit: "Mops",
            };
            writeln!(out, "{name} {v:.2} Mops")?;
            metrics.push((n, m));
        }
    }
    Ok(metrics)
}

fn mt_hit(cfg: &ParityConfig, n: usize, r: u32) -> Result<f64, ParityError> {
    let mm = ModelPrimary::new(16);
    mm.mmap(BASE, u64::from(r) * STRIDE, true)?;
    let nic = SoftNic::new(mm.clone());
    let reg = SharedRegistry::new(&*mm, nic, RegistryConfig::default());
    let barrier = Arc::new(Barrier::new(n + 1));
    let mask = r - 1;
    let (loops, ops) = (cfg.hit_loops, cfg.hit_ops);
    let warmup = cfg.hit_warmup;
    let results: Vec<Result<Vec<f64>, RegError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|t| {
                let (shared, barrier) = (reg.clone(), barrier.clone());
                let reg = shared.clone();
                s.spawn(move || -> Result<Vec<f64>, RegError> {
                    // The thread's cache, looked up once (as a worker holds its rcache).
                    let reg = reg.local()?;
                    let op = |i: u64| -> Result<(), RegError> {
                        let g = i * n as u64 + t as u64;
                        let idx = (g as u32).wrapping_mul(2_654_435_761) & mask;
                        let h = reg.get(addr(idx), REGION, ACCESS)?;
                        reg.put(black_box(h))
                    };
                    // This thread's cache: one miss per region, untimed.
                    let mut res: Result<(), RegError> = (0..r).try_for_each(|i| {
                        let h = reg.get(addr(i), REGION, ACCESS)?;
                        reg.put(h)
                    });
                    if res.is_ok() {
                        res = (0..warmup).try_for_each(op);
                    }
                    let mut times = Vec::with_capacity(loops);
                    for l in 0..loops {
                        // Every thread meets every barrier, even after an
                        // error, so none waits forever.
                        barrier.wait();
                        if res.is_err() {
                            continue;
                        }
                        let first = warmup + (l as u64) * ops;
                        let t0 = Instant::now();
                        res = (first..first + ops).try_for_each(op);
                        times.push(t0.elapsed().as_secs_f64());
                    }
                    drop(reg);
                    // Publish this thread's counters.
                    let _ = shared.stats();
                    res.map(|()| times)
                })
            })
            .collect();
        // Release each loop once every thread is ready.
        for _ in 0..loops {
            barrier.wait();
        }
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(Err(RegError::Unavailable)))
            .collect()
    });
    let mut per_loop = vec![0f64; loops];
    for res in results {
        for (l, t) in res?.into_iter().enumerate() {
            per_loop[l] = per_loop[l].max(t);
        }
    }
    let s = reg.stats();
    let expect = u64::from(r) * n as u64;
    if s.registrations != expect || s.misses != expect {
        return Err(ParityError::Check(format!(
            "mt r{r} x{n}: {} registrations, {} misses (expected {expect}: one per region per thread)",
            s.registrations, s.misses
        )));
    }
    let mut mops: Vec<f64> = per_loop
        .iter()
        .map(|t| (n as u64 * ops) as f64 / t / 1e6)
        .collect();
    mops.sort_by(|a, b| a.total_cmp(b));
    Ok(mops[mops.len() / 2])
}
