//! The registration-cache parity workloads (`shared/bench/rcache-parity.md`):
//! the same workloads UCX's `ucs_rcache` runs, against [`Registry`] with the
//! [`SoftNic`] provider over the [`ModelPrimary`].
//!
//! [`run`] prints one `NAME VALUE UNIT` line per metric, with exactly the
//! document's names, and `#` diagnostics; every correctness check of the
//! document failing makes the run fail with [`ParityError::Check`].

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use notifier_core::notifier::{Event, InvalidateRange, NotifierError};
use notifier_core::primary::Primary;
use notifier_core::{PageRange, PAGE_SIZE};

use crate::testing::{ModelError, ModelPrimary};
use crate::{Access, RegError, Registry, RegistryConfig, SoftNic};

pub(crate) const REGION: u64 = 64 << 10;
pub(crate) const STRIDE: u64 = 128 << 10;
pub(crate) const BASE: u64 = 0x1000_0000_0000;
pub(crate) const ACCESS: Access = Access::from_bits(
    Access::LOCAL_READ.bits()
        | Access::LOCAL_WRITE.bits()
        | Access::REMOTE_READ.bits()
        | Access::REMOTE_WRITE.bits(),
);

/// The workload sizes (defaults are the document's).
#[derive(Clone, Debug)]
pub struct ParityConfig {
    /// Untimed warm-up ops of the hit workloads (100,000).
    pub hit_warmup: u64,
    /// Ops per timed hit loop (1,000,000).
    pub hit_ops: u64,
    /// Timed hit loops; the median is reported (5).
    pub hit_loops: usize,
    /// Regions of the miss, destroy and cycle workloads (65,536).
    pub regions: u32,
    /// Slots of the unmap-event workloads (4,096).
    pub unmap_slots: u32,
    /// Repetitions of the unmap-event workloads; the median is reported (5).
    pub unmap_reps: usize,
    /// Bytes currently allocated by the process (a counting global
    /// allocator), to report registry memory per region; `None` skips it.
    pub alloc_probe: Option<fn() -> usize>,
}

impl Default for ParityConfig {
    fn default() -> Self {
        Self {
            hit_warmup: 100_000,
            hit_ops: 1_000_000,
            hit_loops: 5,
            regions: 65_536,
            unmap_slots: 4_096,
            unmap_reps: 5,
            alloc_probe: None,
        }
    }
}

/// One result line.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// The document's metric name.
    pub name: &'static str,
    /// The value.
    pub value: f64,
    /// `ns/op` or `ns/region`.
    pub unit: &'static str,
}

impl core::fmt::Display for Metric {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} {:.2} {}", self.name, self.value, self.unit)
    }
}

/// Why a parity run failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A correctness check of the document failed.
    #[error("parity check failed: {0}")]
    Check(String),
    /// The registry failed.
    #[error("registry failed")]
    Registry(
        #[from]
        #[source]
        RegError,
    ),
    /// The model primary failed.
    #[error("model primary failed")]
    Model(
        #[from]
        #[source]
        ModelError,
    ),
    /// Delivering an event failed.
    #[error("notifier failed")]
    Notifier(
        #[from]
        #[source]
        NotifierError,
    ),
    /// Writing the report failed.
    #[error("writing the report failed")]
    Io(
        #[from]
        #[source]
        std::io::Error,
    ),
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), ParityError> {
    if ok {
        Ok(())
    } else {
        Err(ParityError::Check(what()))
    }
}

/// Minor page faults of this process so far (`/proc/self/stat` field 10),
/// `None` where that file is unavailable.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(7)?.parse().ok()
}

/// Nanoseconds one first touch of a fresh 4 KiB page costs on this host
/// (16 MiB of untouched zero-filled memory, one write per page): the price
/// of every new page a workload's data structures grow into.
fn first_touch_ns() -> f64 {
    const BYTES: usize = 16 << 20;
    // Large zeroed allocations come straight from the kernel, untouched.
    let mut v = vec![0u8; BYTES];
    let t = Instant::now();
    for i in (0..BYTES).step_by(PAGE_SIZE as usize) {
        v[i] = 1;
    }
    black_box(&v);
    t.elapsed().as_nanos() as f64 / (BYTES as u64 / PAGE_SIZE) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Bench {
    mm: Arc<ModelPrimary>,
    nic: SoftNic,
    reg: Registry<SoftNic>,
}

fn fresh(arena: u64) -> Result<Bench, ParityError> {
    let mm = ModelPrimary::new(16);
    mm.mmap(BASE, arena, true)?;
    let nic = SoftNic::new(mm.clone());
    let reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
    Ok(Bench { mm, nic, reg })
}

#[inline]
pub(crate) fn addr(i: u32) -> u64 {
    BASE + u64::from(i) * STRIDE
}

/// Run every workload, print the report to stdout, return the metrics.
///
/// # Errors
/// See [`ParityError`].
pub fn run(cfg: &ParityConfig) -> Result<Vec<Metric>, ParityError> {
    run_to(cfg, &mut std::io::stdout().lock())
}

/// [`run`], printing to `out`.
///
/// # Errors
/// See [`ParityError`].
pub fn run_to(cfg: &ParityConfig, out: &mut dyn Write) -> Result<Vec<Metric>, ParityError> {
    let mut metrics = Vec::new();
    let mut emit = |out: &mut dyn Write, m: Metric| -> Result<(), ParityError> {
        writeln!(out, "{m}")?;
        metrics.push(m);
        Ok(())
    };
    writeln!(out, "# notifier-rdma registry, provider softnic, model primary; region 64 KiB at 128 KiB stride, access {ACCESS:?}")?;
    for (r, name) in [
        (1u32, "hit_getput_r1"),
        (64, "hit_getput_r64"),
        (4096, "hit_getput_r4096"),
    ] {
        let v = hit(cfg, r, out)?;
        emit(
            out,
            Metric {
                name,
                value: v,
                unit: "ns/op",
            },
        )?;
    }
    let (grow, destroy) = miss_grow_and_destroy(cfg, out)?;
    emit(
        out,
        Metric {
            name: "miss_getput_grow",
            value: grow,
            unit: "ns/op",
        },
    )?;
    emit(
        out,
        Metric {
            name: "destroy_dereg",
            value: destroy,
            unit: "ns/region",
        },
    )?;
    let cycle = reg_dereg_cycle(cfg, out)?;
    emit(
        out,
        Metric {
            name: "reg_dereg_cycle",
            value: cycle,
            unit: "ns/op",
        },
    )?;
    let (unreg, reg, drain) = unmap_events(cfg, out)?;
    emit(
        out,
        Metric {
            name: "vm_unmap_event_unregistered",
            value: unreg,
            unit: "ns/region",
        },
    )?;
    emit(
        out,
        Metric {
            name: "vm_unmap_event_registered",
            value: reg,
            unit: "ns/region",
        },
    )?;
    emit(
        out,
        Metric {
            name: "vm_unmap_event_invalidate_overhead",
            value: reg - unreg,
            unit: "ns/region",
        },
    )?;
    writeln!(
        out,
        "# deregistration is deferred: the callback kills keys and translations, the next get (or put) drains the queue"
    )?;
    emit(
        out,
        Metric {
            name: "deferred_dereg_drain",
            value: drain,
            unit: "ns/region",
        },
    )?;
    Ok(metrics)
}

fn hit(cfg: &ParityConfig, r: u32, out: &mut dyn Write) -> Result<f64, ParityError> {
    let mut b = fresh(u64::from(r) * STRIDE)?;
    for i in 0..r {
        let h = b.reg.get(addr(i), REGION, ACCESS)?;
        b.reg.put(h)?;
    }
    let regs = b.reg.stats().registrations;
    check(regs == u64::from(r), || {
        format!("r{r}: {regs} registrations for {r} regions")
    })?;
    let mask = r - 1;
    let reg = &mut b.reg;
    let mut op = |i: u64| -> Result<(), RegError> {
        let idx = (i as u32).wrapping_mul(2_654_435_761) & mask;
        let h = reg.get(addr(idx), REGION, ACCESS)?;
        reg.put(black_box(h))
    };
    for i in 0..cfg.hit_warmup {
        op(i)?;
    }
    let mut loops = Vec::new();
    for l in 0..cfg.hit_loops {
        let first = cfg.hit_warmup + l as u64 * cfg.hit_ops;
        let t = Instant::now();
        for i in first..first + cfg.hit_ops {
            op(i)?;
        }
        loops.push(t.elapsed().as_nanos() as f64 / cfg.hit_ops as f64);
    }
    let s = b.reg.stats();
    check(s.registrations == regs && s.misses == u64::from(r), || {
        format!(
            "r{r}: registration during the hit loops ({} registrations, {} misses)",
            s.registrations, s.misses
        )
    })?;
    writeln!(
        out,
        "# hit r{r}: loops {:?} ns/op, {} hits, 0 registrations in the loops",
        loops
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        s.hits
    )?;
    Ok(median(loops))
}

fn miss_grow_and_destroy(
    cfg: &ParityConfig,
    out: &mut dyn Write,
) -> Result<(f64, f64), ParityError> {
    let n = cfg.regions;
    let mut b = fresh(8 << 30)?;
    let before = cfg.alloc_probe.map(|p| p());
    let faults = minor_faults();
    let t = Instant::now();
    for i in 0..n {
        let h = b.reg.get(addr(i), REGION, ACCESS)?;
        b.reg.put(h)?;
    }
    let grow = t.elapsed().as_nanos() as f64 / f64::from(n);
    if let (Some(a), Some(z)) = (faults, minor_faults()) {
        let touch = first_touch_ns();
        writeln!(
            out,
            "# miss_getput_grow: {} minor page faults in the pass; a first touch of a fresh page costs {touch:.0} ns on this host, so about {:.0} ns/op of the figure is page faults",
            z - a,
            (z - a) as f64 * touch / f64::from(n)
        )?;
    }
    let after = cfg.alloc_probe.map(|p| p());
    let s = b.reg.stats();
    let nic = b.nic.stats();
    check(
        s.misses == u64::from(n) && nic.registrations == u64::from(n) && nic.deregistrations == 0,
        || {
            format!(
                "miss_getput_grow: {} misses, {} registrations, {} deregistrations for {n} regions",
                s.misses, nic.registrations, nic.deregistrations
            )
        },
    )?;
    if let (Some(a), Some(z)) = (before, after) {
        writeln!(
            out,
            "# registry memory per cached region: {} bytes (counting allocator plus the registry's and the SoftNic key table's own mappings, {n} regions; includes the region, its share of the chunk subscriptions, the invalidation index, the hash and the SoftNic key table)",
            (z.saturating_sub(a) + b.reg.owner_mapped_bytes() + b.nic.key_table_mapped_bytes())
                / n as usize
        )?;
    }
    writeln!(
        out,
        "# spare small mappings kept process-wide after the pass: {} KiB (at most {} KiB; \
         pages arrays gave up, reused by the next growth; not in the figure above, as a heap's \
         free lists are not)",
        crate::huge::spare_bytes() >> 10,
        crate::huge::SPARE_MAX >> 10,
    )?;
    let subs = b.mm.notifiers();
    writeln!(
        out,
        "# per region: region allocation {} B, registry structures {} B (slots, hot records, hash, \
         invalidation index, chunks), softnic key table {} B; {} chunk subscriptions in total \
         (core index {} B)",
        Registry::<SoftNic>::region_bytes(),
        b.reg.owner_heap_bytes() / n as usize,
        (b.nic.key_table_heap_bytes() + b.nic.key_table_mapped_bytes()) / n as usize,
        b.reg.chunk_count(),
        subs.index_heap_bytes(),
    )?;
    let Bench { mm, nic, reg } = b;
    let t = Instant::now();
    drop(reg);
    let destroy = t.elapsed().as_nanos() as f64 / f64::from(n);
    let s = nic.stats();
    check(s.deregistrations == u64::from(n), || {
        format!(
            "destroy_dereg: {} deregistrations for {n} regions",
            s.deregistrations
        )
    })?;
    check(mm.notifiers().interval_count() == 0, || {
        "destroy_dereg: subscriptions left behind".into()
    })?;
    // Diagnostic: the same pass again on the heap the destroyed caches left
    // (the allocator keeps some of it mapped): what the figure costs without
    // first touches. The last of two passes is reported.
    for pass in 0..2 {
        let mut b = fresh(8 << 30)?;
        let faults = minor_faults();
        let t = Instant::now();
        for i in 0..n {
            let h = b.reg.get(addr(i), REGION, ACCESS)?;
            b.reg.put(h)?;
        }
        let warm = t.elapsed().as_nanos() as f64 / f64::from(n);
        if let (1, Some(a), Some(z)) = (pass, faults, minor_faults()) {
            writeln!(
                out,
                "# miss_getput_grow on a reused heap (third pass, new cache): {warm:.2} ns/op with {} minor page faults",
                z - a
            )?;
        }
    }
    Ok((grow, destroy))
}

fn reg_dereg_cycle(cfg: &ParityConfig, _out: &mut dyn Write) -> Result<f64, ParityError> {
    let n = cfg.regions;
    let mut b = fresh(8 << 30)?;
    let t = Instant::now();
    for i in 0..n {
        let h = b.reg.get(addr(i), REGION, ACCESS)?;
        b.reg.invalidate(addr(i), REGION)?;
        b.reg.put(h)?;
    }
    let v = t.elapsed().as_nanos() as f64 / f64::from(n);
    let s = b.nic.stats();
    check(
        s.registrations == u64::from(n) && s.deregistrations == u64::from(n),
        || {
            format!(
                "reg_dereg_cycle: {} registrations, {} deregistrations for {n} regions",
                s.registrations, s.deregistrations
            )
        },
    )?;
    Ok(v)
}

fn unmap_events(cfg: &ParityConfig, out: &mut dyn Write) -> Result<(f64, f64, f64), ParityError> {
    let k = cfg.unmap_slots;
    let range = |i: u32| {
        InvalidateRange::new(
            PageRange::new(addr(i), REGION).expect("aligned"),
            Event::Unmap,
        )
    };
    let deliver = |b: &Bench| -> Result<f64, ParityError> {
        let subs = b.mm.notifiers();
        let t = Instant::now();
        for i in 0..k {
            subs.invalidate_range_start(&range(i))?.end();
        }
        Ok(t.elapsed().as_nanos() as f64 / f64::from(k))
    };
    // Nothing registered.
    let b = fresh(u64::from(k) * STRIDE)?;
    let unreg: Vec<f64> = (0..cfg.unmap_reps)
        .map(|_| deliver(&b))
        .collect::<Result<_, _>>()?;
    drop(b);

    let mut b = fresh(u64::from(k) * STRIDE)?;
    let mut keys = Vec::with_capacity(k as usize);
    for i in 0..k {
        let h = b.reg.get(addr(i), REGION, ACCESS)?;
        b.reg.put(h)?;
        keys.push(h.lkey());
    }
    let (mut reg, mut drain) = (Vec::new(), Vec::new());
    for rep in 0..cfg.unmap_reps {
        let regs = b.reg.stats().registrations;
        reg.push(deliver(&b)?);
        // The first get drains the K invalidations (and registers anew).
        let t = Instant::now();
        let h = b.reg.get(addr(0), REGION, ACCESS)?;
        drain.push(t.elapsed().as_nanos() as f64 / f64::from(k));
        b.reg.put(h)?;
        // No stale hit: every slot registers anew, with a new key.
        for i in 0..k {
            let h = b.reg.get(addr(i), REGION, ACCESS)?;
            b.reg.put(h)?;
            check(h.lkey() != keys[i as usize], || {
                format!("rep {rep}: stale hit on slot {i} after its unmap event")
            })?;
            keys[i as usize] = h.lkey();
        }
        let s = b.reg.stats();
        check(s.registrations == regs + u64::from(k), || {
            format!(
                "rep {rep}: {} new registrations after {k} invalidations",
                s.registrations - regs
            )
        })?;
        check(s.invalidations == (rep as u64 + 1) * u64::from(k), || {
            format!("rep {rep}: {} invalidations", s.invalidations)
        })?;
    }
    let Bench {
        nic, reg: registry, ..
    } = b;
    drop(registry);
    let s = nic.stats();
    check(s.registrations == s.deregistrations, || {
        format!(
            "{} registrations but {} deregistrations at the end",
            s.registrations, s.deregistrations
        )
    })?;
    writeln!(
        out,
        "# unmap events: {k} slots x {} reps; registrations == deregistrations == {} at the end",
        cfg.unmap_reps, s.registrations
    )?;
    Ok((median(unreg), median(reg), median(drain)))
}
