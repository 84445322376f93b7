//! `notifier`: the stress benchmark with verified coherence, and the peer
//! parity benches.
//!
//! ```text
//! notifier stress [--seconds 10] [--threads 2] [--seed N] [--backend soft]
//!                 [--json PATH] [--plot PATH] [--inject MODE]
//!                 [--record PATH] [--replay PATH] [--steps N]
//! notifier bench            # list the benches
//! notifier bench rcache     # RDMA registration-cache parity workloads
//! ```
//!
//! Exit status: 0 when no violation was found, 1 when any was (or a replay
//! diverged), 2 for bad usage.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use notifier_bench::stress::{self, Backend, Inject, Report, StressConfig};

#[derive(Parser, Debug)]
#[command(
    name = "notifier",
    version,
    about = "Userspace secondary-MMU framework: stress with verified coherence, parity benches"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mutators change the primary while devices use secondaries; every
    /// device access is checked by the coherence oracle.
    Stress(StressArgs),
    /// Peer-parity benches (`notifier bench` lists them).
    Bench {
        /// The bench to run.
        name: Option<String>,
    },
}

#[derive(clap::Args, Debug)]
struct StressArgs {
    /// Duration of a threaded run, in seconds (0 < s <= 86400).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Threads: half mutators (at least one), the rest devices; 1 runs both
    /// on one thread.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Which secondaries the devices use.
    #[arg(long, value_enum, default_value_t = Backend::Soft)]
    backend: Backend,
    /// Idle interval subscriptions added to the index.
    #[arg(long, default_value_t = 1000)]
    subscriptions: usize,
    /// Mirrors (each with one device per device thread).
    #[arg(long, default_value_t = 2)]
    mirrors: usize,
    /// Target primary operations per second over all mutators (threaded
    /// runs; 0: unpaced).
    #[arg(long, default_value_t = 100_000)]
    ops_per_sec: u64,
    /// Busy-wait spins inside every mirror fault-in: widens the race window
    /// the sequence protocol guards (a correct run still finds nothing).
    #[arg(long, default_value_t = 0)]
    fault_delay: u32,
    /// Mirrors flush TLBs at the bracket's end (checked for frame liveness).
    #[arg(long)]
    flush_at_end: bool,
    /// Guest memory of --backend kvm: the model primary or real process memory.
    #[arg(long, value_enum, default_value = "model")]
    kvm_memory: stress::KvmMemory,
    /// Break the protocol on purpose: the run must then find violations.
    #[arg(long, value_enum)]
    inject: Option<Inject>,
    /// Deterministic scheduler: this many steps on one thread.
    #[arg(long)]
    steps: Option<u64>,
    /// Record a deterministic run (implies --steps, default 200000) to PATH.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Replay a recorded run and check it reproduces exactly.
    #[arg(long, conflicts_with_all = ["record", "steps", "inject", "seed", "threads"])]
    replay: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency histograms as SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("notifier: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.cmd {
        Cmd::Stress(a) => stress_cmd(a),
        Cmd::Bench { name } => bench_cmd(name.as_deref()),
    }
}

fn bench_cmd(name: Option<&str>) -> ExitCode {
    match name {
        None => {
            println!("available benches:");
            println!("  rcache   RDMA registration-cache parity workloads (../shared/bench/rcache-parity.md)");
            println!("criterion benches: cargo bench -p notifier-bench (machinery, secondary), -p notifier-core (mm), -p notifier-rdma, -p notifier-kvm");
            ExitCode::SUCCESS
        }
        Some("rcache") => {
            match notifier_rdma::parity::run(&notifier_rdma::parity::ParityConfig::default()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("notifier bench rcache: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Some(other) => usage(&format!(
            "unknown bench {other:?}; `notifier bench` lists them"
        )),
    }
}

fn stress_cmd(a: StressArgs) -> ExitCode {
    if !(a.seconds > 0.0 && a.seconds <= 86_400.0) {
        return usage(&format!(
            "--seconds must be in (0, 86400], got {}",
            a.seconds
        ));
    }
    if a.threads == 0 || a.threads > 256 {
        return usage(&format!("--threads must be in 1..=256, got {}", a.threads));
    }
    if a.subscriptions > 10_000_000 {
        return usage("--subscriptions must be at most 10,000,000");
    }
    if a.mirrors == 0 || a.mirrors > 64 {
        return usage("--mirrors must be in 1..=64");
    }
    if a.steps == Some(0) {
        return usage("--steps must be positive");
    }
    let recorded: Option<Report> = match &a.replay {
        None => None,
        Some(p) => match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Report>(&s).map_err(|e| e.to_string()))
        {
            Ok(r) if r.config.steps.is_some() => Some(r),
            Ok(_) => {
                return usage(&format!(
                    "{}: not a recorded (deterministic) run",
                    p.display()
                ))
            }
            Err(e) => return usage(&format!("cannot read replay file {}: {e}", p.display())),
        },
    };
    let cfg = match &recorded {
        Some(r) => r.config.clone(),
        None => StressConfig {
            backend: a.backend,
            threads: a.threads,
            seed: a.seed,
            seconds: a.seconds,
            steps: a.steps.or(a.record.as_ref().map(|_| 200_000)),
            inject: a.inject,
            subscriptions: a.subscriptions,
            mirrors: a.mirrors,
            ops_per_sec: a.ops_per_sec,
            fault_delay: a.fault_delay,
            flush_at_end: a.flush_at_end,
        },
    };
    stress::set_kvm_memory(a.kvm_memory);
    if let Err(e) = stress::preflight(&cfg) {
        return usage(&e);
    }

    let tty = std::io::stderr().is_terminal() && !a.quiet;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(match cfg.steps {
            Some(_) => 100,
            None => (cfg.seconds * 10.0) as u64,
        });
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg}")
                .expect("template"),
        );
        b
    });
    let last_line = parking_lot::Mutex::new(0.0f64);
    let quiet = a.quiet;
    let progress = |t: f64, acc: u64, ops: u64, viol: u64| {
        let msg = format!(
            "{:.1} M accesses/s, {:.0} ops/s, {viol} violations",
            acc as f64 / t.max(1e-9) / 1e6,
            ops as f64 / t.max(1e-9)
        );
        if let Some(b) = &bar {
            if cfg.steps.is_none() {
                b.set_position((t * 10.0) as u64);
            }
            b.set_message(msg);
        } else if !quiet {
            let mut l = last_line.lock();
            if t - *l >= 1.0 {
                *l = t;
                eprintln!("[{t:6.1} s] {msg}");
            }
        }
    };
    let report = match stress::run(&cfg, &progress) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("notifier stress: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    print!("{}", report.table());
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(
            p,
            serde_json::to_string_pretty(&report).expect("serialisable"),
        ) {
            eprintln!("notifier stress: writing {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if let Some(p) = &a.record {
        if let Err(e) = std::fs::write(
            p,
            serde_json::to_string_pretty(&report).expect("serialisable"),
        ) {
            eprintln!("notifier stress: writing {}: {e}", p.display());
            return ExitCode::from(2);
        }
        println!("recorded to {}", p.display());
    }
    if let Some(p) = &a.plot {
        if let Err(e) = report.plot(p) {
            eprintln!("notifier stress: plotting {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if let Some(r) = &recorded {
        if r.replay_key() != report.replay_key() {
            println!(
                "replay DIVERGED from {}:",
                a.replay.as_ref().expect("replay path").display()
            );
            println!("  recorded: {:?}", r.replay_key());
            println!("  replayed: {:?}", report.replay_key());
            return ExitCode::from(1);
        }
        println!(
            "replay matches the recording exactly ({} violations, {} accesses, {} operations)",
            report.violations, report.accesses, report.operations
        );
    }
    if report.violations > 0 {
        for v in &report.first_violations {
            print!("{v}");
        }
        match cfg.inject {
            Some(i) => println!("violations found, as expected with --inject {i:?}"),
            None => println!("COHERENCE VIOLATIONS FOUND"),
        }
        return ExitCode::from(1);
    }
    if let Some(i) = cfg.inject {
        println!("no violation found although --inject {i:?} broke the protocol");
    }
    ExitCode::SUCCESS
}
