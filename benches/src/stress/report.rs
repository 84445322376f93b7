//! The stress report: the final table, JSON, and SVG latency plots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::timing::Stages;
use super::world::WorldStats;
use super::{OpKind, StressConfig};
use notifier_core::verify::{HistoryEvent, LatencyHistogram, Percentiles, Violation};

/// Percentiles of one latency stage, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

impl From<Percentiles> for StageReport {
    fn from(p: Percentiles) -> Self {
        Self {
            count: p.count,
            p50: p.p50,
            p99: p.p99,
            p999: p.p999,
            max: p.max,
        }
    }
}

/// The totals of one backend of a run (`--backend all` runs several).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    /// The backend: `soft`, `rdma`, `kvm`, `uffd`, or `soft+rdma` (one
    /// software primary whose devices are TLB mirrors and RDMA NICs).
    pub name: String,
    /// Device accesses completed (each checked).
    pub accesses: u64,
    /// Device accesses the primary refused.
    pub denied: u64,
    /// Primary operations applied.
    pub operations: u64,
    /// Primary operations rejected.
    pub rejected: u64,
    /// Secondary fills (fault-ins).
    pub faults: u64,
    /// Fill retries after a collision.
    pub retries: u64,
    /// Invalidate callbacks of the secondaries.
    pub invalidations: u64,
    /// Reads by real guest vCPUs, part of `accesses`.
    pub guest_reads: u64,
    /// Stale accesses found.
    pub violations: u64,
}

impl BackendReport {
    fn new(name: &str, w: &WorldStats) -> Self {
        Self {
            name: name.to_string(),
            accesses: w.accesses,
            denied: w.denied,
            operations: w.operations,
            rejected: w.rejected,
            faults: w.faults,
            retries: w.retries,
            invalidations: w.invalidations,
            guest_reads: w.guest_reads,
            violations: w.violations,
        }
    }
}

/// What a deterministic replay must reproduce exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayKey {
    /// Violations.
    pub violations: u64,
    /// Accesses.
    pub accesses: u64,
    /// Denied accesses.
    pub denied: u64,
    /// Operations.
    pub operations: u64,
    /// Fault-ins.
    pub faults: u64,
    /// Retries.
    pub retries: u64,
    /// Invalidations.
    pub invalidations: u64,
    /// Hash of the operation sequence.
    pub op_log_hash: Option<u64>,
    /// Operations by kind.
    pub ops_by_kind: BTreeMap<String, u64>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The configuration.
    pub config: StressConfig,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Stale accesses found by the oracle.
    pub violations: u64,
    /// Device accesses completed (each checked by the oracle).
    pub accesses: u64,
    /// Device accesses the primary refused (unmapped or read-only pages).
    pub denied: u64,
    /// Oracle checks.
    pub checks: u64,
    /// Primary operations applied.
    pub operations: u64,
    /// Primary operations rejected by the primary.
    pub rejected: u64,
    /// Operations by kind.
    pub ops_by_kind: BTreeMap<String, u64>,
    /// Mirror fault-ins (external-table fills).
    pub faults: u64,
    /// Fault-ins retried after a collision.
    pub retries: u64,
    /// Mirror invalidate callbacks.
    pub invalidations: u64,
    /// TLB hit rate over all devices.
    pub tlb_hit_rate: f64,
    /// TLB shootdowns.
    pub tlb_shootdowns: u64,
    /// Accesses per second.
    pub accesses_per_sec: f64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Latency stages.
    pub latency: BTreeMap<String, StageReport>,
    /// Interval subscriptions in the index at the end.
    pub subscriptions: usize,
    /// Reads by real guest vCPUs (`--backend kvm`), part of `accesses`.
    #[serde(default)]
    pub guest_reads: u64,
    /// The backends that ran, each with its totals (one entry unless
    /// `--backend all`).
    #[serde(default)]
    pub backends: Vec<BackendReport>,
    /// Deterministic runs: a hash of the operation sequence.
    pub op_log_hash: Option<u64>,
    /// The first violations, with their page histories.
    pub first_violations: Vec<String>,
    /// Histogram buckets per stage for plots: (upper bound ns, count).
    #[serde(skip)]
    pub buckets: BTreeMap<String, Vec<(u64, u64)>>,
}

impl Report {
    pub(super) fn build(
        cfg: &StressConfig,
        w: &WorldStats,
        parts: &[(&str, WorldStats)],
        seconds: f64,
        stages: &Stages,
        ops: BTreeMap<OpKind, u64>,
        op_log_hash: Option<u64>,
    ) -> Self {
        let mut latency = BTreeMap::new();
        let mut buckets = BTreeMap::new();
        let named: [(&str, &LatencyHistogram); 3] = [
            ("event_to_start", &stages.event_to_start),
            ("start_to_flushed", &stages.start_to_flushed),
            ("stale_window", &stages.stale_window),
        ];
        for (n, h) in named {
            latency.insert(n.to_string(), StageReport::from(h.percentiles()));
            buckets.insert(n.to_string(), h.buckets());
        }
        let lookups = w.tlb_hits + w.tlb_misses;
        Self {
            config: cfg.clone(),
            seconds,
            violations: w.violations,
            accesses: w.accesses,
            denied: w.denied,
            checks: w.checks,
            operations: w.operations,
            rejected: w.rejected,
            ops_by_kind: ops
                .into_iter()
                .map(|(k, n)| (k.name().to_string(), n))
                .collect(),
            faults: w.faults,
            retries: w.retries,
            invalidations: w.invalidations,
            tlb_hit_rate: if lookups == 0 {
                0.0
            } else {
                w.tlb_hits as f64 / lookups as f64
            },
            tlb_shootdowns: w.tlb_shootdowns,
            accesses_per_sec: w.accesses as f64 / seconds.max(1e-9),
            ops_per_sec: w.operations as f64 / seconds.max(1e-9),
            latency,
            subscriptions: w.subscriptions,
            guest_reads: w.guest_reads,
            backends: parts
                .iter()
                .map(|(n, w)| BackendReport::new(n, w))
                .collect(),
            op_log_hash,
            first_violations: w.first_violations.iter().take(3).cloned().collect(),
            buckets,
        }
    }

    /// The counts a replay must reproduce exactly.
    pub fn replay_key(&self) -> ReplayKey {
        ReplayKey {
            violations: self.violations,
            accesses: self.accesses,
            denied: self.denied,
            operations: self.operations,
            faults: self.faults,
            retries: self.retries,
            invalidations: self.invalidations,
            op_log_hash: self.op_log_hash,
            ops_by_kind: self.ops_by_kind.clone(),
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.config;
        let sched = match c.steps {
            Some(n) => format!("deterministic, {n} steps"),
            None => format!("{} thread(s)", c.threads),
        };
        let ran: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        let ran = if c.backend == super::Backend::All {
            format!(" ({})", ran.join(", "))
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "notifier stress: backend {}{ran}, {sched}, seed {:#x}, {:.2} s{}",
            c.backend.name(),
            c.seed,
            self.seconds,
            c.inject
                .map_or(String::new(), |i| format!(", inject {}", i.name()))
        );
        let _ = writeln!(s, "  {:<28}{:>14}", "verified accesses", self.accesses);
        let _ = writeln!(s, "  {:<28}{:>14.0}", "accesses / s", self.accesses_per_sec);
        if self.guest_reads > 0 {
            let _ = writeln!(s, "    {:<26}{:>14}", "by real guests", self.guest_reads);
        }
        let _ = writeln!(s, "  {:<28}{:>14}", "denied accesses", self.denied);
        let _ = writeln!(s, "  {:<28}{:>14}", "primary operations", self.operations);
        let _ = writeln!(s, "  {:<28}{:>14.0}", "operations / s", self.ops_per_sec);
        let _ = writeln!(s, "  {:<28}{:>14}", "rejected operations", self.rejected);
        for (k, n) in &self.ops_by_kind {
            let _ = writeln!(s, "    {:<26}{:>14}", k, n);
        }
        let _ = writeln!(s, "  {:<28}{:>14}", "faults (fills)", self.faults);
        let _ = writeln!(s, "  {:<28}{:>14}", "retries", self.retries);
        let _ = writeln!(s, "  {:<28}{:>14}", "invalidations", self.invalidations);
        let _ = writeln!(
            s,
            "  {:<28}{:>13.1}%",
            "TLB hit rate",
            100.0 * self.tlb_hit_rate
        );
        let _ = writeln!(
            s,
            "  {:<28}{:>14}",
            "interval subscriptions", self.subscriptions
        );
        let _ = writeln!(
            s,
            "  latency (ns)                      p50       p99     p99.9       max   samples"
        );
        for (n, l) in &self.latency {
            let _ = writeln!(
                s,
                "    {:<26}{:>10}{:>10}{:>10}{:>10}{:>10}",
                n, l.p50, l.p99, l.p999, l.max, l.count
            );
        }
        if self.backends.len() > 1 {
            let _ = writeln!(
                s,
                "  per backend             accesses  operations invalidations  violations"
            );
            for b in &self.backends {
                let _ = writeln!(
                    s,
                    "    {:<18}{:>12}{:>12}{:>14}{:>12}",
                    b.name, b.accesses, b.operations, b.invalidations, b.violations
                );
            }
        }
        let _ = writeln!(s, "  {:<28}{:>14}", "violations", self.violations);
        s
    }

    /// Write the latency histograms as an SVG.
    pub fn plot(&self, path: &std::path::Path) -> Result<(), String> {
        use plotters::prelude::*;
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let max_x = self
            .buckets
            .values()
            .flat_map(|b| b.iter().map(|x| x.0))
            .max()
            .unwrap_or(1)
            .max(2);
        let max_y = self
            .buckets
            .values()
            .flat_map(|b| b.iter().map(|x| x.1))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption("notifier stress: invalidation latency", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((1u64..max_x).log_scale(), 0u64..max_y + max_y / 10)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (ns, log)")
            .y_desc("operations")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, b)) in self.buckets.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    b.iter().map(|&(x, y)| (x.max(1), y)),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

/// A count or rate in at most six characters: `999`, `12.3k`, `4.5M`, ...
fn short(x: f64) -> String {
    const UNITS: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut x = x.max(0.0);
    let mut u = 0;
    while x >= 999.95 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}{}", UNITS[u])
    }
}

/// The progress line of a run, at most 78 columns (the terminal's 80 less
/// a spinner): elapsed time, a bar when `fraction` is known (threaded
/// runs), access and operation rates, violations.
pub fn progress_line(
    elapsed: f64,
    fraction: Option<f64>,
    accesses: u64,
    ops: u64,
    violations: u64,
) -> String {
    const BAR: usize = 20;
    let t = elapsed.clamp(0.0, 999_999.0);
    let bar = match fraction {
        Some(f) => {
            let n = (f.clamp(0.0, 1.0) * BAR as f64) as usize;
            format!(" [{}{}]", "#".repeat(n), " ".repeat(BAR - n))
        }
        None => String::new(),
    };
    format!(
        "{t:>8.1} s{bar} {:>6} acc/s {:>6} ops/s {:>6} violations",
        short(accesses as f64 / t.max(1e-9)),
        short(ops as f64 / t.max(1e-9)),
        short(violations as f64),
    )
}

/// A violation as the report prints it: [`Violation`]'s text with every
/// address, range and frame number in hex.
pub fn violation_text(v: &Violation) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "stale {} by device {} at {:#x}: used pfn {:#x}, primary maps {}",
        if v.write { "write" } else { "read" },
        v.device,
        v.addr,
        v.used.0,
        match v.primary {
            None => "nothing".to_string(),
            Some(t) => format!(
                "pfn {:#x} {}",
                t.pfn.0,
                if t.writable { "rw" } else { "ro" }
            ),
        }
    );
    for h in &v.history {
        let _ = match h {
            HistoryEvent::Op {
                seq,
                op,
                start,
                end,
            } => writeln!(s, "    #{seq} op {op} [{start:#x}, {end:#x})"),
            HistoryEvent::Invalidate {
                seq,
                start,
                end,
                event,
            } => writeln!(s, "    #{seq} invalidate [{start:#x}, {end:#x}) {event:?}"),
            HistoryEvent::Fill {
                seq,
                addr,
                pfn,
                writable,
            } => writeln!(
                s,
                "    #{seq} fill {addr:#x} -> pfn {:#x} {}",
                pfn.0,
                if *writable { "rw" } else { "ro" }
            ),
        };
    }
    s
}
