//! `notifier stress`: mutator threads change the primary while device
//! threads use secondaries; the coherence oracle checks every access.
//!
//! Two schedulers:
//! * **threads** (default): real OS threads for `--seconds`;
//! * **deterministic** (`--record`, `--replay`, or `--steps`): one OS
//!   thread interleaves the logical mutators and devices from the seed, so
//!   a run (including any violation) replays exactly.

mod kvm;
mod kvm_real;
mod report;
mod soft;
mod timing;
mod uffd;
mod world;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use kvm::{set_memory as set_kvm_memory, KvmMemory, KvmWorld};
pub use report::{progress_line, violation_text, BackendReport, ReplayKey, Report, StageReport};
pub use soft::SoftWorld;
pub use timing::Stages;
pub use uffd::UffdWorld;
pub use world::{Composite, World, WorldStats};

use crate::rng::Rng;

/// A primary operation of the mutators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// munmap a range, then map it again.
    Munmap,
    /// mprotect read-only, then read-write.
    Mprotect,
    /// mremap (shrink, then map the tail again).
    Mremap,
    /// madvise(DONTNEED).
    MadviseDontNeed,
    /// madvise(FREE).
    MadviseFree,
    /// remap_file_pages of one window page.
    RemapFilePages,
    /// migrate a range to new frames.
    Migrate,
    /// reclaim (try_to_unmap) a range.
    Reclaim,
    /// fork, then the child exits.
    Fork,
    /// zap and re-fault a special-mapping page through its callback.
    SpecialFault,
    /// a CPU write (faults, COW).
    CpuWrite,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 11] = [
        OpKind::Munmap,
        OpKind::Mprotect,
        OpKind::Mremap,
        OpKind::MadviseDontNeed,
        OpKind::MadviseFree,
        OpKind::RemapFilePages,
        OpKind::Migrate,
        OpKind::Reclaim,
        OpKind::Fork,
        OpKind::SpecialFault,
        OpKind::CpuWrite,
    ];
    /// Relative weights (fork walks the whole layout: keep it rare).
    const WEIGHTS: [u64; 11] = [10, 8, 6, 10, 4, 10, 10, 8, 1, 6, 27];

    fn pick(rng: &mut Rng) -> OpKind {
        let total: u64 = Self::WEIGHTS.iter().sum();
        let mut x = rng.below(total);
        for (k, w) in Self::ALL.iter().zip(Self::WEIGHTS) {
            if x < w {
                return *k;
            }
            x -= w;
        }
        OpKind::CpuWrite
    }

    /// Stable name.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Munmap => "munmap",
            OpKind::Mprotect => "mprotect",
            OpKind::Mremap => "mremap",
            OpKind::MadviseDontNeed => "madvise_dontneed",
            OpKind::MadviseFree => "madvise_free",
            OpKind::RemapFilePages => "remap_file_pages",
            OpKind::Migrate => "migrate",
            OpKind::Reclaim => "reclaim",
            OpKind::Fork => "fork",
            OpKind::SpecialFault => "special_fault",
            OpKind::CpuWrite => "cpu_write",
        }
    }
}

/// A fault-injection mode (`--inject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Inject {
    /// Mirrors skip their invalidate callback for `Event::Unmap`.
    SkipInvalidate,
    /// Mirrors accept fault-ins without `read_retry`.
    SkipReadRetry,
    /// Mirrors flush device TLBs only after the invalidation ended.
    LateFlush,
    /// The primary frees frames before the bracket ends (checked with
    /// end-flushing mirrors and the oracle's liveness mode).
    FreeBeforeEnd,
}

impl Inject {
    /// Every mode.
    pub const ALL: [Inject; 4] = [
        Inject::SkipInvalidate,
        Inject::SkipReadRetry,
        Inject::LateFlush,
        Inject::FreeBeforeEnd,
    ];

    /// The name `--inject` takes.
    pub fn name(self) -> &'static str {
        match self {
            Inject::SkipInvalidate => "skip-invalidate",
            Inject::SkipReadRetry => "skip-read-retry",
            Inject::LateFlush => "late-flush",
            Inject::FreeBeforeEnd => "free-before-end",
        }
    }

    /// Why a run on one thread (the deterministic scheduler of `--steps`,
    /// `--record` and `--replay`, or `--threads 1`) cannot catch this
    /// mode, or `None` when it can.
    ///
    /// One thread runs each device access, fault-in included, to
    /// completion before a mutator acts, so no invalidation can ever land
    /// between a fault-in's `read_begin` and its fill: skipping
    /// `read_retry` breaks nothing there. The other modes break the order
    /// between whole steps (a callback skipped, a flush or a free moved
    /// past the bracket's end), which one thread reproduces.
    pub fn needs_threads(self) -> Option<&'static str> {
        match self {
            Inject::SkipReadRetry => Some(
                "one thread runs every fault-in to completion before a mutator acts, so no \
                 invalidation can fall inside a read_begin/read_retry window and skipping \
                 read_retry cannot go wrong; run it threaded (--seconds N --threads 2 or more)",
            ),
            Inject::SkipInvalidate | Inject::LateFlush | Inject::FreeBeforeEnd => None,
        }
    }
}

/// Which secondaries the devices use (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The software primary with TLB-based mirrors.
    Soft,
    /// The software primary; devices are RDMA software NICs doing DMA
    /// through registrations of the registry.
    Rdma,
    /// A real VM (needs `/dev/kvm`): guest memory is a software primary
    /// over memfd frames mirrored into KVM; devices are the device-emulation
    /// view (vm-memory) and a real guest vCPU.
    Kvm,
    /// Real process memory (needs userfaultfd): TLB mirrors over a
    /// `UffdPrimary` fed by a userfaultfd monitor, mutators making real
    /// madvise, munmap + mmap, mremap calls and CPU writes.
    Uffd,
    /// Every backend available in this build, at once.
    All,
}

impl Backend {
    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Soft => "soft",
            Backend::Rdma => "rdma",
            Backend::Kvm => "kvm",
            Backend::Uffd => "uffd",
            Backend::All => "all",
        }
    }
}

/// A stress run's parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StressConfig {
    /// Backend.
    pub backend: Backend,
    /// Total threads (mutators + devices); 1 interleaves both on one thread.
    pub threads: usize,
    /// Seed.
    pub seed: u64,
    /// Duration for the threaded scheduler.
    pub seconds: f64,
    /// Steps for the deterministic scheduler (`None`: threaded).
    pub steps: Option<u64>,
    /// Fault injection.
    pub inject: Option<Inject>,
    /// Idle interval subscriptions added to the index.
    pub subscriptions: usize,
    /// Mirrors.
    pub mirrors: usize,
    /// Target rate of primary operations per second over all mutators in
    /// a threaded run (0: as fast as they go).
    #[serde(default)]
    pub ops_per_sec: u64,
    /// Busy-wait spins inside every mirror fault-in (widens the window the
    /// sequence protocol guards; a correct run stays at zero violations).
    #[serde(default)]
    pub fault_delay: u32,
    /// Mirrors flush device TLBs at the bracket's end (an IOMMU that
    /// batches), checked by the oracle's liveness mode, with a device that
    /// keeps working while brackets end. Implied by `free-before-end`.
    #[serde(default)]
    pub flush_at_end: bool,
}

impl StressConfig {
    /// Mutator and device thread counts.
    pub fn split(&self) -> (usize, usize) {
        let t = self.threads.max(1);
        if t == 1 {
            (1, 1)
        } else {
            let m = (t / 2).max(1);
            (m, t - m)
        }
    }
}

/// Check what makes a configuration unusable before running it (a usage
/// error, exit status 2): `--backend kvm` without `/dev/kvm`, `--backend
/// uffd` without userfaultfd, an injection mode the backend's world does
/// not support (`--backend rdma` supports none), or one a run on one
/// thread cannot catch ([`Inject::needs_threads`]).
///
/// # Errors
/// The message to print, which says why and what to use instead.
pub fn preflight(cfg: &StressConfig) -> Result<(), String> {
    // The CLI's value parsers check these too; a replayed recording or a
    // library caller comes here without them.
    if !(cfg.seconds > 0.0 && cfg.seconds <= 86_400.0) && cfg.steps.is_none() {
        return Err(format!(
            "seconds must be in (0, 86400], got {}",
            cfg.seconds
        ));
    }
    if !(1..=256).contains(&cfg.threads) {
        return Err(format!("threads must be in 1..=256, got {}", cfg.threads));
    }
    if !(1..=64).contains(&cfg.mirrors) {
        return Err(format!("mirrors must be in 1..=64, got {}", cfg.mirrors));
    }
    if cfg.subscriptions > 10_000_000 {
        return Err(format!(
            "subscriptions must be at most 10,000,000, got {}",
            cfg.subscriptions
        ));
    }
    if cfg.steps == Some(0) {
        return Err("steps must be positive".into());
    }
    if let Some((i, why)) = cfg.inject.and_then(|i| Some((i, i.needs_threads()?))) {
        if cfg.steps.is_some() {
            return Err(format!(
                "--inject {} cannot be caught in a deterministic run (--steps, --record, \
                 --replay): {why}",
                i.name()
            ));
        }
        if cfg.threads <= 1 {
            return Err(format!(
                "--inject {} cannot be caught with --threads 1: {why}",
                i.name()
            ));
        }
    }
    match cfg.backend {
        Backend::Rdma => {
            if let Some(i) = cfg.inject {
                return Err(format!(
                    "--inject {} breaks the TLB mirrors' protocol, which --backend rdma does not \
                     use (its devices are NICs doing DMA through registrations); use --backend \
                     soft or all",
                    i.name()
                ));
            }
        }
        Backend::Kvm => {
            kvm::available().map_err(|e| format!("--backend kvm: {e}"))?;
            kvm::check_inject(cfg.inject)?;
        }
        Backend::Uffd => {
            uffd::available().map_err(|e| format!("--backend uffd: {e}"))?;
            uffd::check_inject(cfg.inject)?;
        }
        Backend::Soft | Backend::All => {}
    }
    Ok(())
}

/// Progress callback: (elapsed seconds, accesses, ops, violations).
pub type Progress<'a> = &'a (dyn Fn(f64, u64, u64, u64) + Sync);

/// Run a stress and return its report.
pub fn run(cfg: &StressConfig, progress: Progress<'_>) -> Result<Report, String> {
    let (mutators, devices) = cfg.split();
    let world = world::build(cfg, devices)?;
    let world: &dyn World = &*world;
    let slots = world.device_slots().max(1);
    let start = Instant::now();
    let mut stages = Stages::default();
    let mut ops_by_kind = std::collections::BTreeMap::new();
    let mut log_hash: u64 = 0xcbf2_9ce4_8422_2325;
    let report_progress = || {
        let w = world.stats();
        progress(
            start.elapsed().as_secs_f64(),
            w.accesses,
            w.operations,
            w.violations,
        );
    };

    if let Some(steps) = cfg.steps {
        // Deterministic: one thread, the seed picks who acts.
        let mut rng = Rng::new(cfg.seed);
        for step in 0..steps {
            if rng.chance(1, 40) {
                let k = world.mutator_step(&mut rng, &mut stages);
                *ops_by_kind.entry(k).or_insert(0u64) += 1;
                log_hash = (log_hash ^ (k as u64 + 1)).wrapping_mul(0x100_0000_01b3);
            } else {
                let dev = rng.below(slots as u64) as usize;
                world.device_step(&mut rng, dev);
            }
            if step % 65536 == 0 {
                report_progress();
            }
        }
    } else if cfg.threads <= 1 {
        let mut rng = Rng::new(cfg.seed);
        let deadline = start + Duration::from_secs_f64(cfg.seconds);
        let mut n = 0usize;
        while Instant::now() < deadline {
            for _ in 0..1024 {
                if rng.chance(1, 40) {
                    let k = world.mutator_step(&mut rng, &mut stages);
                    *ops_by_kind.entry(k).or_insert(0u64) += 1;
                } else {
                    world.device_step(&mut rng, n % slots);
                }
                n += 1;
            }
            report_progress();
        }
    } else {
        let stop = AtomicBool::new(false);
        type MutatorResult = (Stages, std::collections::BTreeMap<OpKind, u64>);
        let per_mutator: Vec<MutatorResult> = std::thread::scope(|s| {
            let stop = &stop;
            for d in 0..devices {
                let seed = cfg.seed ^ ((0xD0 + d as u64) << 32);
                s.spawn(move || {
                    let mut rng = Rng::new(seed);
                    // Device thread d owns the slots d, d + devices, ...
                    let first = d % slots;
                    let mut k = first;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..256 {
                            world.device_step(&mut rng, k);
                            k += devices;
                            if k >= slots {
                                k = first;
                            }
                        }
                    }
                });
            }
            let handles: Vec<_> = (0..mutators)
                .map(|m| {
                    let seed = cfg.seed ^ ((0x30 + m as u64) << 40);
                    let rate = cfg.ops_per_sec as f64 / mutators as f64;
                    s.spawn(move || {
                        let mut rng = Rng::new(seed);
                        let mut st = Stages::default();
                        let mut kinds = std::collections::BTreeMap::new();
                        let t0 = Instant::now();
                        let mut done = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            if rate > 0.0 {
                                // Pace: stay within the target rate.
                                let due = t0.elapsed().as_secs_f64() * rate;
                                if done as f64 > due + 1.0 {
                                    let ahead = (done as f64 - due) / rate;
                                    std::thread::sleep(Duration::from_secs_f64(ahead.min(0.005)));
                                    continue;
                                }
                            }
                            let k = world.mutator_step(&mut rng, &mut st);
                            *kinds.entry(k).or_insert(0u64) += 1;
                            done += 1;
                        }
                        (st, kinds)
                    })
                })
                .collect();
            let deadline = start + Duration::from_secs_f64(cfg.seconds);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
                report_progress();
            }
            stop.store(true, Ordering::Relaxed);
            handles
                .into_iter()
                .map(|h| h.join().expect("mutator thread"))
                .collect()
        });
        for (st, kinds) in per_mutator {
            stages.merge(&st);
            for (k, n) in kinds {
                *ops_by_kind.entry(k).or_insert(0) += n;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let hash = cfg.steps.map(|_| log_hash);
    let mut parts = world.parts();
    if parts.is_empty() {
        parts.push((cfg.backend.name(), world.stats()));
    }
    Ok(Report::build(
        cfg,
        &world.stats(),
        &parts,
        seconds,
        &stages,
        ops_by_kind,
        hash,
    ))
}
