//! The software backend of the stress benchmark: one `mm::Mm` with an
//! anonymous arena, a shared file window that `remap_file_pages` shuffles
//! and a special mapping served by a fault callback; TLB-based mirrors over
//! all of it; every device access checked by the coherence oracle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use notifier_core::frame::{FrameStore, HeapFrames, Pfn};
use notifier_core::mm::{
    Advice, Mm, MmapRequest, Prot, SpecialFault, SpecialFaultError, SpecialMapping, SpecialSource,
};
use notifier_core::notifier::{Event, IntervalSubscription, InvalidateRange};
use notifier_core::secondary::{FlushPolicy, Mirror, MirrorConfig, MirrorError, TlbConfig, Va};
use notifier_core::verify::{Oracle, TrackedFrames};
use notifier_core::PAGE_SIZE;

use notifier_rdma::soft::{DmaAccess, DmaObserver};
use notifier_rdma::{Access, Registry, RegistryConfig, SoftNic};

use super::timing::{Stages, TimedCheck};
use super::world::{Idle, World, WorldStats};
use super::{Inject, OpKind, StressConfig};
use crate::rng::Rng;

/// Which secondaries the devices of a soft world use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceKinds {
    /// TLB-based mirrors.
    pub mirrors: bool,
    /// RDMA software NICs doing DMA through registrations.
    pub nics: bool,
}

impl DeviceKinds {
    /// Mirrors only.
    pub const MIRRORS: DeviceKinds = DeviceKinds {
        mirrors: true,
        nics: false,
    };
    /// NICs only.
    pub const NICS: DeviceKinds = DeviceKinds {
        mirrors: false,
        nics: true,
    };
    /// Both.
    pub const BOTH: DeviceKinds = DeviceKinds {
        mirrors: true,
        nics: true,
    };
}

/// One NIC device: its registration cache (single owner) and the NIC.
struct NicDevice {
    reg: parking_lot::Mutex<Registry<SoftNic>>,
    nic: SoftNic,
}

/// Pages of the anonymous arena.
const ARENA_PAGES: u64 = 512;
/// Pages of the nonlinear file window (the file has four times as many).
const FILE_PAGES: u64 = 64;
/// Pages of the special mapping.
const SPECIAL_PAGES: u64 = 16;
/// Where the layout starts.
const BASE: u64 = 0x10_0000_0000;
const FRAMES: usize = 16 * 1024;

/// A device that keeps working while a bracket ends: at each
/// `invalidate_range_end` (registered before the mirrors' end flushers, so
/// it runs first) it reads the range's pages through its TLBs without
/// faulting. With end-flushing mirrors that is legitimate exactly as long
/// as the primary frees no frame before the end — the invariant
/// `free-before-end` breaks.
struct DeviceAtEnd {
    mirrors: std::sync::OnceLock<Vec<Arc<Mirror<Mm, Va>>>>,
}

impl notifier_core::notifier::MmuNotifierOps for DeviceAtEnd {
    fn hooks(&self) -> notifier_core::notifier::Hooks {
        notifier_core::notifier::Hooks::END
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        let Some(mirrors) = self.mirrors.get() else {
            return;
        };
        let start = r.start().max(ARENA);
        let end = r.end().min(END).min(start + 8 * PAGE_SIZE);
        for m in mirrors {
            let mut a = start;
            while a < end {
                let _ = m.try_access(0, a, false, |f, pfn| f.load(pfn, 0));
                a += PAGE_SIZE;
            }
        }
    }
}

/// Counters shared by the threads (progress and totals).
#[derive(Default)]
pub struct Counters {
    /// Device accesses completed and checked.
    pub accesses: AtomicU64,
    /// Device accesses refused by the primary (unmapped, read-only, ...).
    pub denied: AtomicU64,
    /// Primary operations applied.
    pub ops: AtomicU64,
    /// Primary operations the primary rejected (a layout race, by design).
    pub rejected: AtomicU64,
}

/// Device accesses and refusals, counted per device thread: device thread
/// `d` serves the slots `s` with `s % devices == d`, so each stripe has one
/// writer and device threads share no counter's cache line.
struct DeviceCounts {
    stripes: Box<[Stripe]>,
}

/// (accesses, denied) of one device thread, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Stripe([AtomicU64; 2]);

impl DeviceCounts {
    fn new(devices: usize) -> Self {
        Self {
            stripes: (0..devices.max(1)).map(|_| Default::default()).collect(),
        }
    }
    #[inline]
    fn count(&self, slot: usize, ok: bool) {
        let s = &self.stripes[slot % self.stripes.len()].0;
        s[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }
    /// (accesses, denied).
    fn totals(&self) -> (u64, u64) {
        self.stripes.iter().fold((0, 0), |(a, d), s| {
            (
                a + s.0[0].load(Ordering::Relaxed),
                d + s.0[1].load(Ordering::Relaxed),
            )
        })
    }
}

/// The software world.
pub struct SoftWorld {
    /// The primary.
    pub mm: Arc<Mm>,
    /// The oracle.
    pub oracle: Arc<Oracle>,
    /// The mirrors.
    pub mirrors: Vec<Arc<Mirror<Mm, Va>>>,
    special: Arc<SpecialMapping>,
    file: Arc<notifier_core::mm::FileObj>,
    _idle: Vec<IntervalSubscription<Idle>>,
    _slow_end: Option<notifier_core::notifier::MmuNotifier>,
    /// Shared counters (primary operations; device accesses are in
    /// `device_counts`).
    pub counters: Counters,
    device_counts: DeviceCounts,
    devices: usize,
    nics: Vec<NicDevice>,
}

/// Start of the arena.
pub const ARENA: u64 = BASE;
/// Start of the file window.
pub const WINDOW: u64 = BASE + ARENA_PAGES * PAGE_SIZE;
/// Start of the special mapping.
pub const SPECIAL: u64 = WINDOW + FILE_PAGES * PAGE_SIZE;
/// End of the layout.
pub const END: u64 = SPECIAL + SPECIAL_PAGES * PAGE_SIZE;

impl SoftWorld {
    /// Build the layout, the mirrors (`mirrors` of them, each with
    /// `devices` devices) and `subscriptions` idle interval subscriptions.
    pub fn new(cfg: &StressConfig, devices: usize, kinds: DeviceKinds) -> Result<Self, String> {
        let heap = HeapFrames::new(0x1000, FRAMES);
        let at_end = cfg.flush_at_end || cfg.inject == Some(Inject::FreeBeforeEnd);
        let (mm, oracle) = if at_end {
            // Liveness mode: mirrors flush at the bracket's end, which is
            // safe only while frames outlive the bracket.
            let tracked = Arc::new(TrackedFrames::new(heap, 0x1000, FRAMES));
            let mm = Mm::new(tracked.clone() as Arc<dyn FrameStore>);
            let oracle = Oracle::liveness(&mm, tracked);
            (mm, oracle)
        } else {
            let mm = Mm::new(Arc::new(heap));
            let oracle = Oracle::for_mm(&mm);
            (mm, oracle)
        };
        let e = |what: &str, err: &dyn std::fmt::Debug| {
            format!("setting up the soft world: {what}: {err:?}")
        };

        mm.mmap(&MmapRequest::anon(ARENA_PAGES * PAGE_SIZE, Prot::RW).at(ARENA))
            .map_err(|x| e("arena", &x))?;
        let file = super::world::map_tagged_window(&mm, WINDOW, FILE_PAGES)
            .map_err(|x| e("file window", &x))?;
        // The special mapping's frames: the callback hands out one per page
        // offset, filled with a recognisable pattern.
        let frames: Vec<Pfn> = (0..SPECIAL_PAGES)
            .map(|_| mm.alloc_page())
            .collect::<Result<_, _>>()
            .map_err(|x| e("special frames", &x))?;
        for (i, f) in frames.iter().enumerate() {
            mm.frames()
                .store(*f, 0, 0x5EC1_0000 + i as u64)
                .map_err(|x| e("special frame", &x))?;
        }
        let special = Arc::new(SpecialMapping {
            name: "[stress]",
            source: SpecialSource::Fault(Box::new(move |f: &SpecialFault| {
                frames
                    .get(f.pgoff as usize)
                    .copied()
                    .ok_or(SpecialFaultError)
            })),
        });
        mm.mmap(
            &MmapRequest::special(special.clone(), SPECIAL_PAGES * PAGE_SIZE, Prot::READ)
                .at(SPECIAL),
        )
        .map_err(|x| e("special mapping", &x))?;

        // With end-flushing mirrors, a device that works during the
        // bracket's end (registered before the mirrors, so its end runs
        // first) falls into the window between "frames freed" and "TLBs
        // flushed" when the primary frees early.
        let at_end_device = Arc::new(DeviceAtEnd {
            mirrors: std::sync::OnceLock::new(),
        });
        let slow_end = if at_end {
            Some(
                mm.notifiers()
                    .register(at_end_device.clone())
                    .map_err(|x| e("device at end", &x))?,
            )
        } else {
            None
        };
        let flush = if at_end {
            FlushPolicy::AtEnd
        } else {
            FlushPolicy::InCallback
        };
        let check = Arc::new(TimedCheck {
            oracle: oracle.clone(),
        });
        let mut mirrors = Vec::new();
        for i in 0..if kinds.mirrors { cfg.mirrors.max(1) } else { 0 } {
            let mcfg = MirrorConfig {
                start: ARENA,
                len: END - ARENA,
                ext_base: 0x1000_0000 * (i as u64 + 1),
                devices,
                tlb: TlbConfig::default(),
                flush_batch: 64,
                flush,
            };
            let m = Mirror::new(
                mm.clone(),
                mcfg,
                Some(check.clone() as Arc<dyn notifier_core::secondary::AccessCheck>),
            )
            .map_err(|x| e("mirror", &x))?;
            m.inject().set_fault_delay(cfg.fault_delay);
            match cfg.inject {
                Some(Inject::SkipInvalidate) => m.inject().set_skip_event(Some(Event::Unmap)),
                Some(Inject::SkipReadRetry) => {
                    m.inject().set_skip_read_retry(true);
                    // A slow device fault path, so the race happens often.
                    m.inject().set_fault_delay(cfg.fault_delay.max(2000));
                }
                Some(Inject::LateFlush) => m.inject().set_flush_after_end(true),
                _ => {}
            }
            mirrors.push(Arc::new(m));
        }
        let _ = at_end_device.mirrors.set(mirrors.clone());
        if cfg.inject == Some(Inject::FreeBeforeEnd) {
            mm.inject().set_free_before_end(true);
        }
        // Idle subscriptions: one page each. The first 64 sit inside the
        // layout (every ninth page), the rest at a two-page stride on both
        // sides of it, so the index is large but an invalidation of the
        // layout meets few of them.
        let mut idle = Vec::with_capacity(cfg.subscriptions);
        for i in 0..cfg.subscriptions as u64 {
            let addr = if i < 64 {
                ARENA + (i * 9 % ((END - ARENA) / PAGE_SIZE)) * PAGE_SIZE
            } else if i % 2 == 0 {
                ARENA - (i + 2) * PAGE_SIZE
            } else {
                END + (i + 1) * PAGE_SIZE
            };
            idle.push(
                mm.notifiers()
                    .interval_subscribe(addr, PAGE_SIZE, Idle)
                    .map_err(|x| e("subscription", &x))?,
            );
        }
        let mut nics = Vec::new();
        if kinds.nics {
            for d in 0..devices.max(1) {
                let observer: DmaObserver = {
                    let oracle = oracle.clone();
                    Arc::new(move |a: &DmaAccess| {
                        oracle.check(d, a.page, a.pfn, a.write);
                    })
                };
                let nic = SoftNic::with_observer(mm.clone(), observer);
                let reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
                nics.push(NicDevice {
                    reg: parking_lot::Mutex::new(reg),
                    nic,
                });
            }
        }
        Ok(Self {
            mm,
            oracle,
            mirrors,
            special,
            file,
            _idle: idle,
            _slow_end: slow_end,
            counters: Counters::default(),
            device_counts: DeviceCounts::new(devices),
            devices,
            nics,
        })
    }

    /// Logical devices: `devices` per mirror, then one NIC per device
    /// thread. Slot `s < mirrors * devices` is device `s % devices` of
    /// mirror `s / devices`, so device thread `d` (slots `d`, `d + devices`,
    /// ...) is always device `d` of each mirror, then NIC `d`.
    pub fn slots(&self) -> usize {
        self.mirrors.len() * self.devices + self.nics.len()
    }

    /// One device access through slot `slot`.
    #[inline]
    pub fn device_step(&self, rng: &mut Rng, slot: usize) {
        let mirror_slots = self.mirrors.len() * self.devices;
        let page = ARENA + rng.below((END - ARENA) / PAGE_SIZE) * PAGE_SIZE;
        let addr = page + 8 * rng.below(512);
        let write = page < SPECIAL && rng.chance(1, 4);
        let ok = if slot < mirror_slots {
            let m = &self.mirrors[slot / self.devices];
            let d = slot % self.devices;
            let r: Result<(), MirrorError> = if write {
                m.write_u64(d, addr, rng.next_u64())
            } else {
                m.read_u64(d, addr).map(|_| ())
            };
            r.is_ok()
        } else {
            self.nic_step(rng, (slot - mirror_slots) % self.nics.len().max(1), write)
        };
        self.device_counts.count(slot, ok);
    }

    /// A NIC work request: get a registration of 1 to 4 arena pages (a
    /// cache hit or a new registration), DMA one word through its lkey,
    /// put it back.
    fn nic_step(&self, rng: &mut Rng, n: usize, write: bool) -> bool {
        let Some(dev) = self.nics.get(n) else {
            return false;
        };
        let pages = 1 + rng.below(4);
        let first = rng.below(ARENA_PAGES - pages) & !3;
        let start = ARENA + first * PAGE_SIZE;
        let len = pages * PAGE_SIZE;
        let a = start + 8 * rng.below(len / 8);
        let mut reg = dev.reg.lock();
        let Ok(h) = reg.get(start, len, Access::ALL) else {
            return false;
        };
        let r = if write {
            dev.nic
                .local_write(h.lkey(), a, &rng.next_u64().to_le_bytes())
        } else {
            let mut b = [0u8; 8];
            dev.nic.local_read(h.lkey(), a, &mut b)
        };
        let _ = reg.put(h);
        r.is_ok()
    }

    /// One primary operation; returns its kind.
    pub fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        let kind = OpKind::pick(rng);
        let pages = 1 + rng.below(8);
        let first = rng.below(ARENA_PAGES - pages);
        let addr = ARENA + first * PAGE_SIZE;
        let len = pages * PAGE_SIZE;
        let t0 = Instant::now();
        let ok = match kind {
            OpKind::Munmap => {
                self.oracle.record_op("munmap", addr, addr + len);
                self.mm.munmap(addr, len).is_ok()
                    && self
                        .mm
                        .mmap(&MmapRequest::anon(len, Prot::RW).at(addr))
                        .is_ok()
            }
            OpKind::Mprotect => {
                self.oracle.record_op("mprotect", addr, addr + len);
                self.mm.mprotect(addr, len, Prot::READ).is_ok()
                    && self.mm.mprotect(addr, len, Prot::RW).is_ok()
            }
            OpKind::Mremap => {
                // Shrink to half (the tail is unmapped), then map the tail again.
                self.oracle.record_op("mremap", addr, addr + len);
                let half = (pages / 2).max(1) * PAGE_SIZE;
                if half == len {
                    self.mm.munmap(addr, len).is_ok()
                        && self
                            .mm
                            .mmap(&MmapRequest::anon(len, Prot::RW).at(addr))
                            .is_ok()
                } else {
                    self.mm.mremap(addr, len, half, Default::default()).is_ok()
                        && self
                            .mm
                            .mmap(&MmapRequest::anon(len - half, Prot::RW).at(addr + half))
                            .is_ok()
                }
            }
            OpKind::MadviseDontNeed => {
                self.oracle.record_op("madvise_dontneed", addr, addr + len);
                self.mm.madvise(addr, len, Advice::DontNeed).is_ok()
            }
            OpKind::MadviseFree => {
                self.oracle.record_op("madvise_free", addr, addr + len);
                self.mm.madvise(addr, len, Advice::Free).is_ok()
            }
            OpKind::RemapFilePages => {
                let p = rng.below(FILE_PAGES);
                let pgoff = rng.below(4 * FILE_PAGES);
                let a = WINDOW + p * PAGE_SIZE;
                self.oracle.record_op("remap_file_pages", a, a + PAGE_SIZE);
                self.mm.remap_file_pages(a, PAGE_SIZE, 0, pgoff, 0).is_ok()
            }
            OpKind::Migrate => {
                self.oracle.record_op("migrate", addr, addr + len);
                self.mm.migrate(addr, len).is_ok()
            }
            OpKind::Reclaim => {
                self.oracle.record_op("reclaim", addr, addr + len);
                self.mm.try_to_unmap(addr, len).is_ok()
            }
            OpKind::Fork => {
                self.oracle.record_op("fork", ARENA, END);
                match self.mm.fork() {
                    Ok(child) => {
                        child.exit();
                        true
                    }
                    Err(_) => false,
                }
            }
            OpKind::SpecialFault => {
                let p = rng.below(SPECIAL_PAGES);
                let a = SPECIAL + p * PAGE_SIZE;
                self.oracle.record_op("special_fault", a, a + PAGE_SIZE);
                // Zap the special page, then touch it: the callback serves it.
                let zapped = self.mm.madvise(a, PAGE_SIZE, Advice::DontNeed).is_ok();
                zapped && self.mm.read_u64(a).is_ok_and(|v| v == 0x5EC1_0000 + p)
            }
            OpKind::CpuWrite => self
                .mm
                .write_u64(addr + 8 * rng.below(512), rng.next_u64())
                .is_ok(),
        };
        stages.finish_op(t0);
        if ok {
            self.counters.ops.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        kind
    }

    /// Sum of the mirrors' counters.
    pub fn mirror_stats(&self) -> notifier_core::secondary::MirrorStats {
        let mut t = notifier_core::secondary::MirrorStats::default();
        for m in &self.mirrors {
            let s = m.stats();
            t.accesses += s.accesses;
            t.faults += s.faults;
            t.retries += s.retries;
            t.invalidations += s.invalidations;
            t.invalidated_pages += s.invalidated_pages;
            t.tlb.add(&s.tlb);
        }
        t
    }

    /// Keep the special mapping and the file alive for the run.
    pub fn keep_alive(&self) -> (usize, u64) {
        (Arc::strong_count(&self.special), self.file.id())
    }
}

impl World for SoftWorld {
    fn device_slots(&self) -> usize {
        self.slots()
    }
    fn device_step(&self, rng: &mut Rng, slot: usize) {
        SoftWorld::device_step(self, rng, slot)
    }
    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        SoftWorld::mutator_step(self, rng, stages)
    }
    fn stats(&self) -> WorldStats {
        let m = self.mirror_stats();
        let c = &self.counters;
        let (mut faults, mut invalidations) = (m.faults, m.invalidations);
        for n in &self.nics {
            let s = n.nic.stats();
            faults += s.faults;
            invalidations += n.reg.lock().stats().invalidations;
        }
        let (accesses, denied) = self.device_counts.totals();
        WorldStats {
            accesses,
            denied,
            operations: c.ops.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            violations: self.oracle.violation_count(),
            checks: self.oracle.checks(),
            faults,
            retries: m.retries,
            invalidations,
            tlb_hits: m.tlb.hits,
            tlb_misses: m.tlb.misses,
            tlb_shootdowns: m.tlb.shootdowns,
            subscriptions: self.mm.notifiers().interval_count(),
            guest_reads: 0,
            first_violations: self
                .oracle
                .violations()
                .iter()
                .take(3)
                .map(super::violation_text)
                .collect(),
        }
    }
}
