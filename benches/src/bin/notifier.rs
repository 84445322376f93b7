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
//! Exit status: 0 clean; 1 violations found (or a replay diverged from its
//! recording, or a parity check failed); 2 bad usage, found before
//! anything runs; 3 the run itself failed (an error, not a finding).
//! `docs/guide/stress.md` walks through it.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use notifier_bench::stress::{self, Backend, Inject, Report, StressConfig};

/// The exit statuses, as `--help` and the README state them.
const EXIT_STATUS: &str = "Exit status:
  0  clean: no violation found
  1  violations found (or a replay diverged, or a parity check failed)
  2  bad usage, reported before anything runs
  3  the run failed (an error, not a finding)";

#[derive(Parser, Debug)]
#[command(
    name = "notifier",
    version,
    about = "Userspace secondary-MMU framework: stress with verified coherence, parity benches",
    after_help = EXIT_STATUS
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Mutators change the primary while devices use secondaries; every
    /// device access is checked by the coherence oracle.
    #[command(after_help = EXIT_STATUS)]
    Stress(StressArgs),
    /// Peer-parity benches (`notifier bench` lists them).
    #[command(after_help = EXIT_STATUS)]
    Bench {
        /// The bench to run.
        name: Option<String>,
        /// `rcache` only: run the multi-threaded hit workloads at these
        /// thread counts (comma separated, e.g. `1,2,4`) instead of the
        /// single-thread parity set.
        #[arg(long, value_delimiter = ',')]
        threads: Vec<usize>,
    },
}

/// `--seconds`: a duration in (0, 86400].
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 86_400.0 => Ok(x),
        _ => Err("expected seconds, more than 0 and at most 86400".into()),
    }
}

/// A whole number in `LO..=HI`.
fn count<const LO: u64, const HI: u64>(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(x) if (LO..=HI).contains(&x) => Ok(x),
        _ if HI == u64::MAX => Err(format!("expected a whole number, at least {LO}")),
        _ => Err(format!("expected a whole number from {LO} to {HI}")),
    }
}

/// `--seed`: a whole number, decimal or `0x` hex.
fn seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    };
    r.map_err(|_| "expected a whole number from 0 to 2^64 - 1 (decimal or 0x hex)".into())
}

#[derive(clap::Args, Debug)]
struct StressArgs {
    /// Duration of a threaded run, in seconds (0 < s <= 86400).
    #[arg(long, default_value_t = 10.0, value_parser = seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// Threads (1..=256): half mutators (at least one), the rest devices;
    /// 1 runs both on one thread.
    #[arg(long, default_value_t = 2, value_parser = count::<1, 256>, allow_negative_numbers = true)]
    threads: u64,
    /// Seed of the random choices (decimal or 0x hex).
    #[arg(long, default_value = "0x5eed", value_parser = seed, allow_negative_numbers = true)]
    seed: u64,
    /// Which secondaries the devices use.
    #[arg(long, value_enum, default_value_t = Backend::Soft)]
    backend: Backend,
    /// Idle interval subscriptions added to the index (at most 10,000,000).
    #[arg(long, default_value_t = 1000, value_parser = count::<0, 10_000_000>, allow_negative_numbers = true)]
    subscriptions: u64,
    /// Mirrors (1..=64), each with one device per device thread.
    #[arg(long, default_value_t = 2, value_parser = count::<1, 64>, allow_negative_numbers = true)]
    mirrors: u64,
    /// Target primary operations per second over all mutators (threaded
    /// runs; 0: unpaced).
    #[arg(long, default_value_t = 100_000, value_parser = count::<0, { u64::MAX }>, allow_negative_numbers = true)]
    ops_per_sec: u64,
    /// Busy-wait spins inside every mirror fault-in: widens the race window
    /// the sequence protocol guards (a correct run still finds nothing).
    #[arg(long, default_value_t = 0, value_parser = count::<0, { u32::MAX as u64 }>, allow_negative_numbers = true)]
    fault_delay: u64,
    /// Mirrors flush TLBs at the bracket's end (checked for frame liveness).
    #[arg(long)]
    flush_at_end: bool,
    /// Guest memory of --backend kvm: the model primary or real process memory.
    #[arg(long, value_enum, default_value = "model")]
    kvm_memory: stress::KvmMemory,
    /// Break the protocol on purpose: the run must then find violations.
    /// With --steps, --record or --replay only the modes the
    /// deterministic scheduler can catch are accepted.
    #[arg(long, value_enum)]
    inject: Option<Inject>,
    /// Deterministic scheduler: this many steps on one thread.
    #[arg(long, value_parser = count::<1, { u64::MAX }>, allow_negative_numbers = true)]
    steps: Option<u64>,
    /// Record a deterministic run (implies --steps, default 200000) to PATH.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Replay a recorded run and check it reproduces exactly.
    #[arg(long, conflicts_with_all = ["record", "steps", "inject", "seed", "threads"])]
    replay: Option<PathBuf>,
    /// Write the report as JSON (created or checked writable before the
    /// run).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency histograms as SVG (created or checked writable
    /// before the run).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// Exit 0: no violation.
const CLEAN: u8 = 0;
/// Exit 1: violations found.
const VIOLATIONS: u8 = 1;
/// Exit 2: bad usage.
const USAGE: u8 = 2;
/// Exit 3: the run failed.
const FAILED: u8 = 3;

fn usage(msg: &str) -> ExitCode {
    eprintln!("notifier: {msg}");
    ExitCode::from(USAGE)
}

fn failed(msg: &str) -> ExitCode {
    eprintln!("notifier: {msg}");
    ExitCode::from(FAILED)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let code = if e.use_stderr() { USAGE } else { CLEAN };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.cmd {
        Cmd::Stress(a) => stress_cmd(a),
        Cmd::Bench { name, threads } => bench_cmd(name.as_deref(), &threads),
    }
}

fn bench_cmd(name: Option<&str>, threads: &[usize]) -> ExitCode {
    use notifier_rdma::parity::{self, ParityConfig, ParityError};
    match name {
        None => {
            println!("available benches:");
            println!("  rcache   RDMA registration-cache parity workloads (docs/rcache-parity.md)");
            println!("criterion benches: cargo bench -p notifier-bench (machinery, secondary),");
            println!("  -p notifier-core (mm), -p notifier-rdma, -p notifier-kvm");
            ExitCode::from(CLEAN)
        }
        Some("rcache") if !threads.is_empty() => {
            if threads.iter().any(|&t| t == 0 || t > 255) {
                return usage("--threads: each count must be in 1..=255");
            }
            let cfg = ParityConfig::default();
            match notifier_rdma::parity_mt::run_mt(&cfg, threads, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::from(CLEAN),
                Err(e @ ParityError::Check(_)) => {
                    eprintln!("notifier bench rcache: {e}");
                    ExitCode::from(VIOLATIONS)
                }
                Err(e) => failed(&format!("bench rcache: {e}")),
            }
        }
        Some("rcache") => match parity::run(&ParityConfig::default()) {
            Ok(_) => ExitCode::from(CLEAN),
            Err(e @ ParityError::Check(_)) => {
                eprintln!("notifier bench rcache: {e}");
                ExitCode::from(VIOLATIONS)
            }
            Err(e) => failed(&format!("bench rcache: {e}")),
        },
        Some(other) => usage(&format!(
            "unknown bench {other:?}; `notifier bench` lists them"
        )),
    }
}

/// An output file, opened before the run so that a bad path is a usage
/// error rather than a lost run. Opened without truncation; removed again
/// if this run created it and then failed.
struct Output {
    path: PathBuf,
    file: File,
    created: bool,
}

impl Output {
    fn open(flag: &str, path: &Path) -> Result<Self, String> {
        let created = !path.exists();
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(|file| Self {
                path: path.to_path_buf(),
                file,
                created,
            })
            .map_err(|e| format!("{flag} {}: cannot write there: {e}", path.display()))
    }

    fn write(mut self, bytes: &[u8]) -> Result<(), String> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all(bytes))
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    fn abandon(self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The outputs a stress run writes.
#[derive(Default)]
struct Outputs {
    json: Option<Output>,
    record: Option<Output>,
    plot: Option<Output>,
}

impl Outputs {
    fn open(a: &StressArgs) -> Result<Self, String> {
        let mut o = Outputs::default();
        match o.open_each(a) {
            Ok(()) => Ok(o),
            Err(e) => {
                // Remove what this run created before the failing one.
                o.abandon();
                Err(e)
            }
        }
    }

    fn open_each(&mut self, a: &StressArgs) -> Result<(), String> {
        let open = |flag: &str, p: &Option<PathBuf>| {
            p.as_deref().map(|p| Output::open(flag, p)).transpose()
        };
        self.json = open("--json", &a.json)?;
        self.record = open("--record", &a.record)?;
        self.plot = open("--plot", &a.plot)?;
        Ok(())
    }

    fn abandon(self) {
        for f in [self.json, self.record, self.plot].into_iter().flatten() {
            f.abandon();
        }
    }
}

fn stress_cmd(a: StressArgs) -> ExitCode {
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
            // Bounded by the value parsers.
            threads: a.threads as usize,
            seed: a.seed,
            seconds: a.seconds,
            steps: a.steps.or(a.record.as_ref().map(|_| 200_000)),
            inject: a.inject,
            subscriptions: a.subscriptions as usize,
            mirrors: a.mirrors as usize,
            ops_per_sec: a.ops_per_sec,
            fault_delay: u32::try_from(a.fault_delay).unwrap_or(u32::MAX),
            flush_at_end: a.flush_at_end,
        },
    };
    stress::set_kvm_memory(a.kvm_memory);
    if let Err(e) = stress::preflight(&cfg) {
        return usage(&e);
    }
    let outputs = match Outputs::open(&a) {
        Ok(o) => o,
        Err(e) => return usage(&e),
    };

    let tty = std::io::stderr().is_terminal() && !a.quiet;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("template"));
        b
    });
    let last_line = parking_lot::Mutex::new(0.0f64);
    let quiet = a.quiet;
    let progress = |t: f64, acc: u64, ops: u64, viol: u64| {
        let fraction = cfg.steps.is_none().then(|| t / cfg.seconds);
        let line = stress::progress_line(t, fraction, acc, ops, viol);
        if let Some(b) = &bar {
            b.set_message(line);
        } else if !quiet {
            let mut l = last_line.lock();
            if t - *l >= 1.0 {
                *l = t;
                eprintln!("{line}");
            }
        }
    };
    let report = match stress::run(&cfg, &progress) {
        Ok(r) => r,
        Err(e) => {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            outputs.abandon();
            return failed(&format!("stress: {e}"));
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    print!("{}", report.table());
    let text = match serde_json::to_string_pretty(&report) {
        Ok(t) => t,
        Err(e) => return failed(&format!("stress: encoding the report: {e}")),
    };
    let Outputs { json, record, plot } = outputs;
    if let Some(o) = json {
        if let Err(e) = o.write(text.as_bytes()) {
            return failed(&e);
        }
    }
    if let Some(o) = record {
        let path = o.path.clone();
        if let Err(e) = o.write(text.as_bytes()) {
            return failed(&e);
        }
        println!("recorded to {}", path.display());
    }
    if let Some(o) = plot {
        // The plotter writes the file itself.
        let Output { path, file, .. } = o;
        drop(file);
        if let Err(e) = report.plot(&path) {
            return failed(&format!("plotting {}: {e}", path.display()));
        }
    }
    if let Some(r) = &recorded {
        if r.replay_key() != report.replay_key() {
            println!(
                "replay DIVERGED from {}:",
                a.replay
                    .as_ref()
                    .map_or(Path::new(""), |p| p.as_path())
                    .display()
            );
            println!("  recorded: {:?}", r.replay_key());
            println!("  replayed: {:?}", report.replay_key());
            return ExitCode::from(VIOLATIONS);
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
            Some(i) => println!("violations found, as expected with --inject {}", i.name()),
            None => println!("COHERENCE VIOLATIONS FOUND"),
        }
        return ExitCode::from(VIOLATIONS);
    }
    if let Some(i) = cfg.inject {
        println!(
            "no violation found although --inject {} broke the protocol",
            i.name()
        );
    }
    ExitCode::from(CLEAN)
}
