//! What a stress backend provides, and the composite of several.

use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};

use super::timing::Stages;
use super::{Backend, OpKind, StressConfig};
use crate::rng::Rng;

/// An interval subscriber that only records the sequence: worlds add
/// `--subscriptions` of them so the index is as large as asked.
pub struct Idle;

impl IntervalNotifierOps for Idle {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        _: &InvalidateRange,
        seq: u64,
    ) -> Result<(), Again> {
        sub.set_seq(seq);
        Ok(())
    }
}

/// Map a shared file window of `window` pages at `addr`, backed by a file
/// four times as large whose page `p` starts with the tag `p + 1`, so
/// `remap_file_pages` has pages to shuffle and a reader can tell them apart.
pub fn map_tagged_window(
    mm: &notifier_core::mm::Mm,
    addr: u64,
    window: u64,
) -> Result<std::sync::Arc<notifier_core::mm::FileObj>, notifier_core::mm::MmError> {
    use notifier_core::mm::{FileOptions, MmapRequest, Prot};
    use notifier_core::PAGE_SIZE;
    let file = mm.create_file(FileOptions::new(4 * window));
    for p in 0..4 * window {
        file.write(p * PAGE_SIZE, &(p + 1).to_le_bytes())?;
    }
    mm.mmap(
        &MmapRequest::file(file.clone(), 0, window * PAGE_SIZE, Prot::RW)
            .shared()
            .at(addr),
    )?;
    Ok(file)
}

/// Totals of a world, for progress lines and the report.
#[derive(Clone, Debug, Default)]
pub struct WorldStats {
    /// Device accesses completed (each checked by an oracle).
    pub accesses: u64,
    /// Device accesses the primary refused.
    pub denied: u64,
    /// Primary operations applied.
    pub operations: u64,
    /// Primary operations the primary rejected.
    pub rejected: u64,
    /// Stale accesses found.
    pub violations: u64,
    /// Oracle checks.
    pub checks: u64,
    /// Secondary fills (fault-ins).
    pub faults: u64,
    /// Fill retries after a collision.
    pub retries: u64,
    /// Invalidate callbacks of the secondaries.
    pub invalidations: u64,
    /// TLB hits and misses (for the hit rate).
    pub tlb_hits: u64,
    /// TLB misses.
    pub tlb_misses: u64,
    /// TLB entries shot down.
    pub tlb_shootdowns: u64,
    /// Interval subscriptions in the primaries' indexes.
    pub subscriptions: usize,
    /// Reads made by real guest vCPUs (`--backend kvm`; included in
    /// `accesses`, each checked by value).
    pub guest_reads: u64,
    /// The first violations, with their page histories.
    pub first_violations: Vec<String>,
}

impl WorldStats {
    fn add(&mut self, o: WorldStats) {
        self.accesses += o.accesses;
        self.denied += o.denied;
        self.operations += o.operations;
        self.rejected += o.rejected;
        self.violations += o.violations;
        self.checks += o.checks;
        self.faults += o.faults;
        self.retries += o.retries;
        self.invalidations += o.invalidations;
        self.tlb_hits += o.tlb_hits;
        self.tlb_misses += o.tlb_misses;
        self.tlb_shootdowns += o.tlb_shootdowns;
        self.subscriptions += o.subscriptions;
        self.guest_reads += o.guest_reads;
        self.first_violations.extend(o.first_violations);
    }
}

/// A primary with its secondaries, driven by the stress scheduler.
pub trait World: Sync {
    /// Logical devices (a device thread serves some of them).
    fn device_slots(&self) -> usize;
    /// One access by device `slot`.
    fn device_step(&self, rng: &mut Rng, slot: usize);
    /// One primary operation.
    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind;
    /// Totals so far.
    fn stats(&self) -> WorldStats;
    /// Totals per backend when this world is several (`--backend all`),
    /// named; empty for a single backend.
    fn parts(&self) -> Vec<(&'static str, WorldStats)> {
        Vec::new()
    }
}

/// Several worlds at once (`--backend all`): devices are spread over them,
/// each mutator step goes to one of them in turn.
pub struct Composite {
    worlds: Vec<Box<dyn World>>,
    /// The backend each world stands for, as the report names it.
    names: Vec<&'static str>,
}

impl World for Composite {
    fn device_slots(&self) -> usize {
        self.worlds.iter().map(|w| w.device_slots()).sum()
    }
    fn device_step(&self, rng: &mut Rng, mut slot: usize) {
        for w in &self.worlds {
            let n = w.device_slots();
            if slot < n {
                return w.device_step(rng, slot);
            }
            slot -= n;
        }
    }
    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        let i = rng.below(self.worlds.len() as u64) as usize;
        self.worlds[i].mutator_step(rng, stages)
    }
    fn stats(&self) -> WorldStats {
        let mut t = WorldStats::default();
        for w in &self.worlds {
            t.add(w.stats());
        }
        t
    }
    fn parts(&self) -> Vec<(&'static str, WorldStats)> {
        self.names
            .iter()
            .zip(&self.worlds)
            .map(|(n, w)| (*n, w.stats()))
            .collect()
    }
}

/// Build the world `cfg.backend` asks for.
pub fn build(cfg: &StressConfig, devices: usize) -> Result<Box<dyn World>, String> {
    use super::soft::{DeviceKinds, SoftWorld};
    match cfg.backend {
        Backend::Soft => Ok(Box::new(SoftWorld::new(
            cfg,
            devices,
            DeviceKinds::MIRRORS,
        )?)),
        Backend::Rdma => {
            if cfg.inject.is_some() {
                return Err(
                    "--inject breaks the mirrors' protocol; use it with --backend soft or all"
                        .into(),
                );
            }
            Ok(Box::new(SoftWorld::new(cfg, devices, DeviceKinds::NICS)?))
        }
        Backend::Kvm => Ok(Box::new(super::kvm::KvmWorld::new(cfg, devices)?)),
        Backend::Uffd => Ok(Box::new(super::uffd::UffdWorld::new(cfg, devices)?)),
        Backend::All => {
            // The NICs' accesses carry no fill record, which the liveness
            // oracle of `free-before-end` needs: that mode runs mirrors only.
            let (kinds, name) = if cfg.inject == Some(super::Inject::FreeBeforeEnd) {
                (DeviceKinds::MIRRORS, "soft")
            } else {
                (DeviceKinds::BOTH, "soft+rdma")
            };
            let mut worlds: Vec<Box<dyn World>> =
                vec![Box::new(SoftWorld::new(cfg, devices, kinds)?)];
            let mut names = vec![name];
            // The KVM world when /dev/kvm opens and the injection mode
            // means something to it; otherwise a note, not an error.
            match super::kvm::available().and_then(|()| super::kvm::check_inject(cfg.inject)) {
                Ok(()) => {
                    worlds.push(Box::new(super::kvm::KvmWorld::new(cfg, devices)?));
                    names.push("kvm");
                }
                Err(e) => eprintln!("notifier stress: --backend all runs without kvm: {e}"),
            }
            // The uffd world likewise, when userfaultfd opens.
            match super::uffd::available().and_then(|()| super::uffd::check_inject(cfg.inject)) {
                Ok(()) => {
                    worlds.push(Box::new(super::uffd::UffdWorld::new(cfg, devices)?));
                    names.push("uffd");
                }
                Err(e) => eprintln!("notifier stress: --backend all runs without uffd: {e}"),
            }
            Ok(Box::new(Composite { worlds, names }))
        }
    }
}
