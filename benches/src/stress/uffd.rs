//! The userfaultfd backend of the stress benchmark (`--backend uffd`):
//! real process memory (two anonymous private regions and one memfd
//! shared region) registered with a running `UffdMonitor`, TLB mirrors
//! over a `UffdPrimary` fed only by the monitor's kernel events, every
//! device access checked by the strict coherence oracle (which reads
//! `/proc/self/pagemap`).
//!
//! # Mutators (real system calls on the real memory)
//!
//! - `madvise(DONTNEED)`: announced, through `UffdMonitor::madvise` (an
//!   `Event::Clear` bracket around the `madvise`; the kernel's REMOVE then
//!   causes no second invalidation). Announcing is required: the kernel
//!   runs an unannounced REMOVE's invalidation concurrently with the zap,
//!   and a device touching a zapped page while holding its lock takes a
//!   missing fault the monitor cannot serve while it waits for that lock.
//! - `madvise(FREE)` (anonymous regions): not announced; the pages stay
//!   present until reclaim, so the REMOVE's invalidation may arrive late.
//!   On the memfd region (where FREE is refused) an announced DONTNEED.
//! - `munmap` + `mmap(MAP_FIXED)` again at the same address, and `mremap`
//!   of a whole region to a new address: UNMAP/REMAP are announced after
//!   the fact, so, as the crate documents, the application keeps devices
//!   off the region meanwhile (a per-region lock, devices share it), waits
//!   until the monitor applied the event (registration cut or moved: this
//!   happens only after every subscriber's callback returned), then
//!   re-registers (munmap) or rebuilds the region's mirrors at the new
//!   address (mremap, after checking the old mirrors kept no translation).
//!   One anonymous region is the one that moves and is never munmapped:
//!   the kernel refuses to move a range spanning several VMAs.
//!   A hole (munmap until the map back) and a move exclude each other (the
//!   `holes` lock): the kernel picks the move's destination, and when it
//!   picked another region's hole (next to the gap a former move left),
//!   the moved region's registration covered that hole, the munmapping
//!   thread waited in vain for its registration to go, gave up after
//!   `APPLY_TIMEOUT` and let devices back into memory that now belonged
//!   to the moving region: a SIGSEGV when that moved again (and a stall
//!   of every thread meanwhile, the reported hang). Found with
//!   `diagnose`, which prints the registration and `/proc/self/maps`.
//! - CPU writes of random words (missing faults served by the monitor).
//!
//! # Fault injection
//! Rejected: over real memory a broken mirror protocol makes devices
//! touch zapped or unmapped pages, which deadlocks the monitor or raises
//! SIGSEGV instead of being reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notifier_core::secondary::{AccessCheck, Mirror, MirrorConfig, MirrorStats, TlbConfig, Va};
use notifier_core::verify::Oracle;
use notifier_core::PAGE_SIZE;
use notifier_uffd::{
    Advice, HandlerThread, Region, RegisterMode, UffdMonitor, UffdPrimary, ZeroHandler,
};
use parking_lot::{Mutex, RwLock};

use super::soft::Counters;
use super::timing::{Stages, TimedCheck};
use super::world::{World, WorldStats};
use super::{Inject, OpKind, StressConfig};
use crate::rng::Rng;

/// Pages of each anonymous region.
const ANON_PAGES: u64 = 256;
/// Pages of the memfd region.
const MEMFD_PAGES: u64 = 128;
/// The region that `mremap` moves (and `munmap` leaves alone).
const MOVING: usize = 1;
/// How long a mutator waits for the monitor to apply an UNMAP or REMAP.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether userfaultfd opens here (`Err`: why not).
pub fn available() -> Result<(), String> {
    UffdMonitor::new()
        .map(drop)
        .map_err(|e| format!("userfaultfd is not available: {e}"))
}

/// The injection modes this world supports (none; `Err`: a usage message).
pub fn check_inject(inject: Option<Inject>) -> Result<(), String> {
    match inject {
        None => Ok(()),
        Some(other) => Err(format!(
            "--inject {} does not apply to --backend uffd: over real memory a broken mirror \
             protocol makes devices touch zapped or unmapped pages, which deadlocks or crashes \
             instead of being reported; use --backend soft",
            clap::ValueEnum::to_possible_value(&other)
                .map_or_else(|| format!("{other:?}"), |v| v.get_name().to_string())
        )),
    }
}

/// One region and the mirrors over it. Devices hold the slot's lock shared
/// for an access; munmap and mremap hold it exclusively.
struct Slot {
    region: Region,
    shared: bool,
    mirrors: Vec<Mirror<UffdPrimary, Va>>,
}

/// The uffd world.
pub struct UffdWorld {
    // Field order is drop order: the slots (mirrors, then regions, whose
    // munmap raises UNMAP events) go before the handler thread stops.
    slots: Vec<RwLock<Slot>>,
    prim: Arc<UffdPrimary>,
    monitor: UffdMonitor,
    oracle: Arc<Oracle>,
    check: Arc<TimedCheck>,
    mirrors: usize,
    devices: usize,
    counters: Counters,
    /// Translations found in a mirror after the monitor applied the
    /// REMAP that removed them.
    stale_after_remap: AtomicU64,
    /// Counters of mirrors dropped after an mremap.
    retired: Mutex<MirrorStats>,
    /// Held while a region has a hole (munmap until mapped back) and while
    /// one moves (mremap, whose destination the kernel picks): the
    /// destination must never be another region's hole. Taken before a
    /// slot lock.
    holes: Mutex<()>,
    thread: Option<HandlerThread>,
}

impl Drop for UffdWorld {
    fn drop(&mut self) {
        self.slots.clear();
        if let Some(t) = self.thread.take() {
            t.stop();
        }
    }
}

impl UffdWorld {
    /// Real memory, a running monitor, `cfg.mirrors` mirrors of `devices`
    /// devices over each region.
    ///
    /// # Errors
    /// A message when userfaultfd is unavailable, an injection mode is
    /// asked for, or a setup step fails.
    pub fn new(cfg: &StressConfig, devices: usize) -> Result<Self, String> {
        check_inject(cfg.inject)?;
        let e = |what: &str, err: &dyn std::fmt::Display| {
            format!("setting up the uffd world: {what}: {err}")
        };
        let monitor = UffdMonitor::builder()
            .build(Arc::new(ZeroHandler))
            .map_err(|x| e("userfaultfd", &x))?;
        let thread = monitor.spawn().map_err(|x| e("handler thread", &x))?;
        let prim = Arc::new(UffdPrimary::new(&monitor).map_err(|x| e("pagemap", &x))?);
        // `UffdPrimary::lookup_page` takes only the registry lock, which the
        // monitor never holds while calling subscribers: safe under device
        // locks.
        let oracle = Oracle::new(prim.clone());
        let check = Arc::new(TimedCheck {
            oracle: oracle.clone(),
        });
        let mut w = Self {
            slots: Vec::new(),
            prim,
            monitor,
            oracle,
            check,
            mirrors: cfg.mirrors.max(1),
            devices: devices.max(1),
            counters: Counters::default(),
            stale_after_remap: AtomicU64::new(0),
            retired: Mutex::new(MirrorStats::default()),
            holes: Mutex::new(()),
            thread: Some(thread),
        };
        for (pages, shared) in [
            (ANON_PAGES, false),
            (ANON_PAGES, false),
            (MEMFD_PAGES, true),
        ] {
            let region = if shared {
                Region::memfd(pages * PAGE_SIZE)
            } else {
                Region::anon(pages * PAGE_SIZE)
            }
            .map_err(|x| e("mmap", &x))?;
            w.monitor
                .register(&region, RegisterMode::MISSING)
                .map_err(|x| e("register", &x))?;
            let mirrors = w.mirrors_over(&region)?;
            w.slots.push(RwLock::new(Slot {
                region,
                shared,
                mirrors,
            }));
        }
        Ok(w)
    }

    fn mirrors_over(&self, region: &Region) -> Result<Vec<Mirror<UffdPrimary, Va>>, String> {
        (0..self.mirrors)
            .map(|_| {
                let mut mcfg = MirrorConfig::identity(region.addr(), region.len());
                mcfg.devices = self.devices;
                mcfg.tlb = TlbConfig::default();
                Mirror::new(
                    self.prim.clone(),
                    mcfg,
                    Some(self.check.clone() as Arc<dyn AccessCheck>),
                )
                .map_err(|x| format!("setting up the uffd world: mirror: {x}"))
            })
            .collect()
    }

    /// Wait (bounded) until `cond` holds.
    fn wait_applied(cond: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while !cond() {
            if t.elapsed() > APPLY_TIMEOUT {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    fn munmap_remap(&self, i: usize, first: u64, pages: u64) -> bool {
        let _holes = self.holes.lock();
        let slot = self.slots[i].write();
        let (off, len) = (first * PAGE_SIZE, pages * PAGE_SIZE);
        let addr = slot.region.addr() + off;
        self.oracle.record_op("munmap", addr, addr + len);
        if slot.region.munmap(off, len).is_err() {
            return false;
        }
        // The UNMAP was read; the registration is cut after every
        // subscriber ran for it.
        if !Self::wait_applied(|| self.monitor.registration(addr).is_none()) {
            self.diagnose("munmap", addr, len);
            return false;
        }
        slot.region.map_fixed_over(off, len).is_ok()
            && self
                .monitor
                .register_range(&slot.region, off, len, RegisterMode::MISSING)
                .is_ok()
    }

    /// Why the monitor did not apply an event in time (stderr, once per
    /// failed operation): what it holds and what the kernel maps there.
    fn diagnose(&self, op: &str, addr: u64, len: u64) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let near: Vec<&str> = maps
            .lines()
            .filter(|l| {
                let Some((a, b)) = l.split(' ').next().and_then(|r| r.split_once('-')) else {
                    return false;
                };
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap_or(0),
                    u64::from_str_radix(b, 16).unwrap_or(0),
                );
                a < addr + len + (1 << 20) && addr < b + (1 << 20)
            })
            .collect();
        eprintln!(
            "uffd stress: {op} of [{addr:#x}, {:#x}) not applied after {APPLY_TIMEOUT:?}: \
             registration {:?}, stats {:?}, last error {:?}, maps near:\n{}",
            addr + len,
            self.monitor.registration(addr),
            self.monitor.stats(),
            self.monitor.last_error(),
            near.join("\n")
        );
    }

    fn mremap(&self, i: usize) -> bool {
        let _holes = self.holes.lock();
        let mut slot = self.slots[i].write();
        let old = slot.region.addr();
        let len = slot.region.len();
        self.oracle.record_op("mremap", old, old + len);
        let Ok(new) = slot.region.mremap_move() else {
            return false;
        };
        if !Self::wait_applied(|| self.monitor.registration(new).is_some()) {
            self.diagnose("mremap", new, len);
            return false;
        }
        // The REMAP's invalidation ran: the old mirrors must hold nothing.
        let mut retired = self.retired.lock();
        for m in &slot.mirrors {
            for p in 0..len / PAGE_SIZE {
                for d in 0..self.devices {
                    if m.translate(d, old + p * PAGE_SIZE).is_some() {
                        self.stale_after_remap.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            add(&mut retired, &m.stats());
        }
        drop(retired);
        match self.mirrors_over(&slot.region) {
            Ok(ms) => {
                slot.mirrors = ms;
                true
            }
            Err(_) => false,
        }
    }
}

fn add(t: &mut MirrorStats, s: &MirrorStats) {
    t.accesses += s.accesses;
    t.faults += s.faults;
    t.retries += s.retries;
    t.invalidations += s.invalidations;
    t.invalidated_pages += s.invalidated_pages;
    t.tlb.add(&s.tlb);
}

impl World for UffdWorld {
    /// Device thread `d` is device `d` of every mirror.
    fn device_slots(&self) -> usize {
        self.devices
    }

    fn device_step(&self, rng: &mut Rng, slot: usize) {
        let i = rng.below(self.slots.len() as u64) as usize;
        let s = self.slots[i].read();
        let m = &s.mirrors[rng.below(s.mirrors.len() as u64) as usize];
        let page = s.region.addr() + rng.below(s.region.len() / PAGE_SIZE) * PAGE_SIZE;
        let addr = page + 8 * rng.below(512);
        let d = slot % self.devices;
        let ok = if rng.chance(1, 4) {
            m.write_u64(d, addr, rng.next_u64()).is_ok()
        } else {
            m.read_u64(d, addr).is_ok()
        };
        let c = if ok {
            &self.counters.accesses
        } else {
            &self.counters.denied
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        let kind = match rng.below(100) {
            0..=1 => OpKind::Mremap,
            2..=11 => OpKind::Munmap,
            12..=31 => OpKind::MadviseDontNeed,
            32..=41 => OpKind::MadviseFree,
            _ => OpKind::CpuWrite,
        };
        let mut i = rng.below(self.slots.len() as u64) as usize;
        // mremap moves a whole region, which the kernel refuses once it
        // spans several VMAs (as munmap + mmap leaves it): region 1 is the
        // one that moves and is never munmapped.
        match kind {
            OpKind::Mremap => i = MOVING,
            OpKind::Munmap if i == MOVING => i = 0,
            _ => {}
        }
        let pages = 1 + rng.below(8);
        let t0 = Instant::now();
        let ok = match kind {
            OpKind::Mremap => self.mremap(i),
            OpKind::Munmap => {
                let total = self.slots[i].read().region.len() / PAGE_SIZE;
                self.munmap_remap(i, rng.below(total - pages), pages)
            }
            _ => {
                let s = self.slots[i].read();
                let total = s.region.len() / PAGE_SIZE;
                let off = rng.below(total - pages) * PAGE_SIZE;
                let addr = s.region.addr() + off;
                let len = pages * PAGE_SIZE;
                match kind {
                    OpKind::MadviseFree if !s.shared => {
                        self.oracle.record_op("madvise_free", addr, addr + len);
                        s.region.madvise(off, len, Advice::Free).is_ok()
                    }
                    OpKind::MadviseDontNeed | OpKind::MadviseFree => {
                        self.oracle.record_op("madvise_dontneed", addr, addr + len);
                        self.monitor
                            .madvise(&s.region, off, len, Advice::DontNeed)
                            .is_ok()
                    }
                    _ => {
                        let w = off + 8 * rng.below(len / 8);
                        s.region.write(w, &rng.next_u64().to_le_bytes()).is_ok()
                    }
                }
            }
        };
        stages.finish_op(t0);
        let c = if ok {
            &self.counters.ops
        } else {
            &self.counters.rejected
        };
        c.fetch_add(1, Ordering::Relaxed);
        kind
    }

    fn stats(&self) -> WorldStats {
        let mut m = *self.retired.lock();
        for s in &self.slots {
            for mi in &s.read().mirrors {
                add(&mut m, &mi.stats());
            }
        }
        let c = &self.counters;
        let stale = self.stale_after_remap.load(Ordering::Relaxed);
        let mut first: Vec<String> = self
            .oracle
            .violations()
            .iter()
            .take(3)
            .map(super::violation_text)
            .collect();
        if stale > 0 {
            first.push(format!(
                "{stale} translations left in mirrors after the monitor applied an mremap"
            ));
        }
        WorldStats {
            accesses: c.accesses.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            operations: c.ops.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            violations: self.oracle.violation_count() + stale,
            checks: self.oracle.checks(),
            faults: m.faults,
            retries: m.retries,
            invalidations: m.invalidations,
            tlb_hits: m.tlb.hits,
            tlb_misses: m.tlb.misses,
            tlb_shootdowns: m.tlb.shootdowns,
            subscriptions: self.monitor.notifiers().interval_count(),
            guest_reads: 0,
            first_violations: first,
        }
    }
}
