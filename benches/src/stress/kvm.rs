//! The KVM backend of the stress benchmark (`--backend kvm`): a real VM
//! whose guest-physical memory is an `mm::Mm` over memfd frames, mirrored
//! into KVM by a `KvmMirror` (memslot over a host view that follows every
//! invalidation), with two kinds of devices:
//!
//! - **device emulation**: one `DeviceView` per device thread (vm-memory
//!   `Bytes` reads and writes of a `u64`, through the region's translation
//!   cache), every access checked by the coherence oracle under the
//!   cache's lock at the moment the frame is touched
//!   (`DeviceView::with_access_check`);
//! - **a real guest** (when a vCPU can be created): one `RealModeGuest` per
//!   device thread reads the first 4 bytes of a guest page through KVM (the
//!   host view, or a demand fault served by the mirror). It is checked by
//!   value: see "Guest checks".
//!
//! # Layout
//!
//! Guest-physical `gpa` is `Mm` address [`GUEST_BASE`]` + gpa`; one region
//! (one memslot) covers the first MiB (what a real-mode guest can address):
//! `[0, 64 KiB)` firmware (the guest's program at `guest::CODE_GPA`; never
//! mutated), then an anonymous arena, then a shared file window that
//! `remap_file_pages` shuffles among four times as many file pages (file
//! page `p` holds the tag `p + 1` in its first word).
//!
//! # Guest checks
//!
//! The first word of every arena and window page is its *tag*, which only
//! mutators change, each while holding that page's lock: `cpu_write`
//! stores a fresh random tag, `munmap` (+ `mmap`) and `madvise(DONTNEED)`
//! make it 0, `remap_file_pages` makes it the new file page's tag. The
//! other operations (`migrate`, `mprotect` RO then RW, `reclaim`, `fork`
//! then exit) keep the bytes and run without page locks, so concurrently
//! with guest reads. Device-emulation writes never touch the first word. A
//! guest read takes the page lock, has the guest read the word, and
//! compares it with the tag: any difference means KVM showed the guest a
//! frame the primary no longer maps there (a violation, reported with the
//! page's history).
//!
//! # Locking
//! Page locks are taken in ascending page order and released before the
//! next operation; nothing that holds an `Mm`, mirror or cache lock waits
//! for one (guest reads hold one page lock while the vCPU runs and the
//! mirror faults through the `Mm`; mutators take theirs before calling the
//! `Mm`).
//!
//! # Fault injection
//! `--inject skip-invalidate` makes the primary skip the invalidation
//! brackets of `Event::Unmap` (munmap): the device views' caches and the
//! host view keep the old frames and both checks must find it. The other
//! modes break the TLB mirrors' protocol, which this world does not use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use notifier_core::frame::FrameStore;
use notifier_core::mm::{Advice, FileObj, Mm, MmapRequest, Prot};
use notifier_core::notifier::{Event, IntervalSubscription};
use notifier_core::secondary::AccessCheck;
use notifier_core::verify::Oracle;
use notifier_core::PAGE_SIZE;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{DeviceView, KvmMirror, MemfdFrames};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::timing::{Stages, TimedCheck};
use super::world::{Idle, World, WorldStats};
use super::{Inject, OpKind, StressConfig};
use crate::rng::Rng;

/// Where guest-physical 0 sits in the `Mm`'s address space.
pub const GUEST_BASE: u64 = 0x10_0000_0000;
/// Guest RAM: one region, the first MiB.
const RAM: u64 = 0x10_0000;
/// Start of the arena (after the firmware pages).
const ARENA: u64 = 0x1_0000;
/// Pages of the arena.
const ARENA_PAGES: u64 = 176;
/// Start of the file window.
const WINDOW: u64 = ARENA + ARENA_PAGES * PAGE_SIZE;
/// Pages of the window (the file has four times as many).
const FILE_PAGES: u64 = 64;
/// Memfd frames (guest RAM, file, fork copies, swap-ins).
const FRAMES: usize = 8192;
/// One in this many steps of a vCPU slot is a guest read (about 35 us
/// each); the others are device-emulation accesses of the same thread.
const GUEST_EVERY: u64 = 16;
/// A page whose tag is not known (unmapped after a failed operation).
const UNKNOWN: u64 = u64::MAX;

/// A page's tag and the lock of the mutators that change it.
struct Page {
    lock: Mutex<()>,
    /// Expected low 32 bits of the first word, or [`UNKNOWN`].
    tag: AtomicU64,
}

/// One real guest (`None` after an error left its vCPU inside an exit).
struct Guest {
    vcpu: Option<RealModeGuest>,
}

#[derive(Default)]
struct Counters {
    accesses: AtomicU64,
    denied: AtomicU64,
    ops: AtomicU64,
    rejected: AtomicU64,
    guest_reads: AtomicU64,
    guest_violations: AtomicU64,
    guest_errors: AtomicU64,
}

/// The KVM world over the model primary (`--kvm-memory model`).
pub struct ModelKvmWorld {
    mm: Arc<Mm>,
    oracle: Arc<Oracle>,
    mirror: KvmMirror<Mm>,
    /// One device-emulation view per device thread (device id = index).
    views: Vec<DeviceView<Mm>>,
    /// One real guest per device thread (empty when no vCPU could run).
    guests: Vec<Mutex<Guest>>,
    next_vcpu: AtomicU64,
    /// Arena pages, then window pages.
    pages: Vec<Page>,
    first_guest_violations: Mutex<Vec<String>>,
    _file: Arc<FileObj>,
    _idle: Vec<IntervalSubscription<Idle>>,
    counters: Counters,
}

/// What guest memory the KVM world runs over (`--kvm-memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvmMemory {
    /// The model primary (`mm::Mm` over memfd frames) mirrored by `KvmMirror`.
    #[default]
    Model,
    /// The process's own memory (`GuestRam`) under the memslot, watched by
    /// userfaultfd (`RealGuestMemory`): see `kvm_real.rs`.
    Real,
}

static MEMORY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Choose the guest memory of the KVM worlds built from now on.
pub fn set_memory(m: KvmMemory) {
    MEMORY.store(m as u8, Ordering::Relaxed);
}

/// The KVM world: over the model primary or over real memory.
pub enum KvmWorld {
    /// `--kvm-memory model`.
    Model(ModelKvmWorld),
    /// `--kvm-memory real`.
    Real(super::kvm_real::RealKvmWorld),
}

impl KvmWorld {
    /// A KVM world of the kind chosen with [`set_memory`].
    ///
    /// # Errors
    /// A message when `/dev/kvm` (or, for real memory, userfaultfd) is
    /// missing or any setup step fails.
    pub fn new(cfg: &StressConfig, devices: usize) -> Result<Self, String> {
        if MEMORY.load(Ordering::Relaxed) == KvmMemory::Real as u8 {
            check_inject(cfg.inject)?;
            if cfg.inject.is_some() {
                return Err("--inject is not supported with --kvm-memory real".into());
            }
            super::kvm_real::RealKvmWorld::new(cfg, devices).map(Self::Real)
        } else {
            ModelKvmWorld::new(cfg, devices).map(Self::Model)
        }
    }

    fn world(&self) -> &dyn World {
        match self {
            Self::Model(w) => w,
            Self::Real(w) => w,
        }
    }
}

impl World for KvmWorld {
    fn device_slots(&self) -> usize {
        self.world().device_slots()
    }
    fn device_step(&self, rng: &mut Rng, slot: usize) {
        self.world().device_step(rng, slot)
    }
    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        self.world().mutator_step(rng, stages)
    }
    fn stats(&self) -> WorldStats {
        self.world().stats()
    }
}

/// Whether `/dev/kvm` opens here (`Err` says why not).
pub fn available() -> Result<(), String> {
    Kvm::new()
        .map(drop)
        .map_err(|e| format!("/dev/kvm is not available: {e}"))
}

/// The injection modes this world supports (`Err`: a usage message).
pub fn check_inject(inject: Option<Inject>) -> Result<(), String> {
    match inject {
        None | Some(Inject::SkipInvalidate) => Ok(()),
        Some(other) => Err(format!(
            "--inject {} breaks the TLB mirrors' protocol, which --backend kvm does not use; \
             with kvm use --inject skip-invalidate (or --backend soft)",
            clap::ValueEnum::to_possible_value(&other)
                .map_or_else(|| format!("{other:?}"), |v| v.get_name().to_string())
        )),
    }
}

impl ModelKvmWorld {
    /// A VM with one mirrored region, `devices` device views and (when a
    /// vCPU runs) `devices` real guests.
    ///
    /// # Errors
    /// A message when `/dev/kvm` is missing or any setup step fails.
    pub fn new(cfg: &StressConfig, devices: usize) -> Result<Self, String> {
        check_inject(cfg.inject)?;
        let e = |what: &str, err: &dyn std::fmt::Display| {
            format!("setting up the kvm world: {what}: {err}")
        };
        let kvm = Kvm::new().map_err(|x| format!("/dev/kvm is not available: {x}"))?;
        let vm = Arc::new(kvm.create_vm().map_err(|x| e("KVM_CREATE_VM", &x))?);
        let store = Arc::new(MemfdFrames::new(0x1000, FRAMES).map_err(|x| e("memfd", &x))?);
        let mm = Mm::new(store.clone() as Arc<dyn FrameStore>);
        // Before anything is mapped: the oracle shadows every PTE store.
        let oracle = Oracle::for_mm(&mm);
        let va = |gpa: u64| GUEST_BASE + gpa;

        mm.mmap(&MmapRequest::anon(WINDOW, Prot::RW).at(va(0)))
            .map_err(|x| e("guest RAM", &x))?;
        let file = super::world::map_tagged_window(&mm, va(WINDOW), FILE_PAGES)
            .map_err(|x| e("file window", &x))?;
        let max = kvm.get_nr_memslots() as u32;
        let mirror = KvmMirror::new(vm, mm.clone(), store, max).map_err(|x| e("mirror", &x))?;
        mirror
            .add_region_at(0, GUEST_BASE, RAM, 0)
            .map_err(|x| e("memslot", &x))?;

        let check = Arc::new(TimedCheck {
            oracle: oracle.clone(),
        }) as Arc<dyn AccessCheck>;
        let views = (0..devices.max(1))
            .map(|d| DeviceView::with_access_check(&mirror, check.clone(), d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|x| e("device view", &x))?;
        // Real guests: best effort (a host may open /dev/kvm but refuse to
        // run a vCPU); the device views still run without them.
        let mut guests = Vec::new();
        let mut next = 0u64;
        for _ in 0..devices.max(1) {
            match RealModeGuest::new(&mirror, next) {
                Ok(mut g) => match g.read_u32(&mirror, ARENA) {
                    Ok(_) => guests.push(Mutex::new(Guest { vcpu: Some(g) })),
                    Err(x) => {
                        eprintln!("notifier stress: kvm: no real guest ({x}); device views only");
                        break;
                    }
                },
                Err(x) => {
                    eprintln!("notifier stress: kvm: no real guest ({x}); device views only");
                    break;
                }
            }
            next += 1;
        }

        let pages = (0..ARENA_PAGES + FILE_PAGES)
            .map(|i| Page {
                lock: Mutex::new(()),
                tag: AtomicU64::new(if i < ARENA_PAGES {
                    0
                } else {
                    i - ARENA_PAGES + 1
                }),
            })
            .collect();
        // Idle subscriptions around guest RAM (none inside it, so they only
        // make the index larger).
        let mut idle = Vec::with_capacity(cfg.subscriptions);
        for i in 0..cfg.subscriptions as u64 {
            let addr = va(RAM) + (2 * i + 1) * PAGE_SIZE;
            idle.push(
                mm.notifiers()
                    .interval_subscribe(addr, PAGE_SIZE, Idle)
                    .map_err(|x| e("subscription", &x))?,
            );
        }
        if cfg.inject == Some(Inject::SkipInvalidate) {
            mm.inject().set_skip_event(Some(Event::Unmap));
        }
        Ok(Self {
            mm,
            oracle,
            mirror,
            views,
            guests,
            next_vcpu: AtomicU64::new(next),
            pages,
            first_guest_violations: Mutex::new(Vec::new()),
            _file: file,
            _idle: idle,
            counters: Counters::default(),
        })
    }

    /// Whether real guests run (else device views only).
    pub fn has_guests(&self) -> bool {
        !self.guests.is_empty()
    }

    /// A device-emulation access by view `d`: a `u64` read or (1 in 4) write
    /// at a random word of a random arena or window page, through the
    /// region's `Bytes` or (1 in 8) vm-memory's blanket `GuestMemory` path.
    fn view_step(&self, rng: &mut Rng, d: usize) {
        let view = &self.views[d % self.views.len()];
        let page = ARENA + rng.below(ARENA_PAGES + FILE_PAGES) * PAGE_SIZE;
        let write = rng.chance(1, 4);
        // Writes never touch the tag word.
        let word = if write {
            1 + rng.below(511)
        } else {
            rng.below(512)
        };
        let gpa = page + 8 * word;
        let blanket = rng.chance(1, 8);
        let ok = match (write, blanket) {
            (false, true) => view.read_obj::<u64>(GuestAddress(gpa)).is_ok(),
            (true, true) => view.write_obj(rng.next_u64(), GuestAddress(gpa)).is_ok(),
            (w, false) => match view.region(gpa) {
                None => false,
                Some(r) => {
                    let off = MemoryRegionAddress(gpa - r.start_addr().0);
                    if w {
                        r.write_obj(rng.next_u64(), off).is_ok()
                    } else {
                        r.read_obj::<u64>(off).is_ok()
                    }
                }
            },
        };
        let c = if ok {
            &self.counters.accesses
        } else {
            &self.counters.denied
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A guest read by vCPU `g`: lock a random page, have the guest read its
    /// tag word, compare (see "Guest checks").
    fn guest_step(&self, rng: &mut Rng, g: usize) {
        let i = rng.below(ARENA_PAGES + FILE_PAGES);
        let gpa = ARENA + i * PAGE_SIZE;
        let page = &self.pages[i as usize];
        let mut guest = self.guests[g].lock();
        let _l = page.lock.lock();
        let tag = page.tag.load(Ordering::Relaxed);
        if tag == UNKNOWN {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if guest.vcpu.is_none() {
            // Replace a vCPU left mid-exit by an error.
            let id = self.next_vcpu.fetch_add(1, Ordering::Relaxed);
            guest.vcpu = RealModeGuest::new(&self.mirror, id).ok();
        }
        let Some(vcpu) = guest.vcpu.as_mut() else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match vcpu.read_u32(&self.mirror, gpa) {
            Ok(v) => {
                self.counters.guest_reads.fetch_add(1, Ordering::Relaxed);
                self.counters.accesses.fetch_add(1, Ordering::Relaxed);
                if u64::from(v) != tag & 0xffff_ffff {
                    let n = self
                        .counters
                        .guest_violations
                        .fetch_add(1, Ordering::Relaxed);
                    if n < 3 {
                        let addr = GUEST_BASE + gpa;
                        let host = self.mirror.translation(gpa);
                        let primary = self.mirror.primary_frame(gpa);
                        self.first_guest_violations.lock().push(format!(
                            "guest (vCPU slot {g}) read {v:#x} at gpa {gpa:#x} (mm {addr:#x}), \
                             the primary holds {:#x}; host view {host:?}, primary frame {primary:?}\n",
                            tag & 0xffff_ffff
                        ));
                    }
                }
            }
            Err(_) => {
                // The vCPU may be stopped inside an exit: drop it.
                guest.vcpu = None;
                self.counters.guest_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lock the pages `[first, first + n)` (ascending).
    fn lock_pages(&self, first: u64, n: u64) -> Vec<parking_lot::MutexGuard<'_, ()>> {
        (first..first + n)
            .map(|i| self.pages[i as usize].lock.lock())
            .collect()
    }

    fn set_tags(&self, first: u64, n: u64, tag: u64) {
        for i in first..first + n {
            self.pages[i as usize].tag.store(tag, Ordering::Relaxed);
        }
    }

    /// One primary operation on guest RAM; returns its kind.
    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        let kind = loop {
            let k = OpKind::pick(rng);
            if !matches!(
                k,
                OpKind::Mremap | OpKind::MadviseFree | OpKind::SpecialFault
            ) {
                break k;
            }
        };
        let pages = 1 + rng.below(8);
        let first = rng.below(ARENA_PAGES - pages);
        let gpa = ARENA + first * PAGE_SIZE;
        let addr = GUEST_BASE + gpa;
        let len = pages * PAGE_SIZE;
        // remap_file_pages: window page `p` to file page `pgoff`.
        let (p, pgoff) = (rng.below(FILE_PAGES), rng.below(4 * FILE_PAGES));
        // The page locks of the operations that change tags, taken before
        // the clock starts (waiting for a guest read is the harness's cost,
        // not the primary's).
        let _locks = match kind {
            OpKind::Munmap | OpKind::MadviseDontNeed => self.lock_pages(first, pages),
            OpKind::RemapFilePages => self.lock_pages(ARENA_PAGES + p, 1),
            OpKind::CpuWrite => self.lock_pages(first, 1),
            _ => Vec::new(),
        };
        let t0 = Instant::now();
        let ok = match kind {
            OpKind::Munmap => {
                self.oracle.record_op("munmap", addr, addr + len);
                let unmapped = self.mm.munmap(addr, len).is_ok();
                let mapped = unmapped
                    && self
                        .mm
                        .mmap(&MmapRequest::anon(len, Prot::RW).at(addr))
                        .is_ok();
                if unmapped {
                    self.set_tags(first, pages, if mapped { 0 } else { UNKNOWN });
                }
                mapped
            }
            OpKind::Mprotect => {
                self.oracle.record_op("mprotect", addr, addr + len);
                self.mm.mprotect(addr, len, Prot::READ).is_ok()
                    && self.mm.mprotect(addr, len, Prot::RW).is_ok()
            }
            OpKind::MadviseDontNeed => {
                self.oracle.record_op("madvise_dontneed", addr, addr + len);
                let ok = self.mm.madvise(addr, len, Advice::DontNeed).is_ok();
                if ok {
                    self.set_tags(first, pages, 0);
                }
                ok
            }
            OpKind::RemapFilePages => {
                let a = GUEST_BASE + WINDOW + p * PAGE_SIZE;
                self.oracle.record_op("remap_file_pages", a, a + PAGE_SIZE);
                let ok = self.mm.remap_file_pages(a, PAGE_SIZE, 0, pgoff, 0).is_ok();
                if ok {
                    self.set_tags(ARENA_PAGES + p, 1, pgoff + 1);
                }
                ok
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
                self.oracle.record_op("fork", GUEST_BASE, GUEST_BASE + RAM);
                match self.mm.fork() {
                    Ok(child) => {
                        child.exit();
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => {
                // A CPU write of a fresh tag (faults, breaks COW after fork).
                let tag = rng.next_u64() | 1;
                let ok = self.mm.write_u64(addr, tag).is_ok();
                if ok {
                    self.set_tags(first, 1, tag & 0xffff_ffff);
                }
                ok
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
}

impl Drop for ModelKvmWorld {
    fn drop(&mut self) {
        let n = self.counters.guest_errors.load(Ordering::Relaxed);
        if n > 0 {
            eprintln!(
                "notifier stress: kvm: {n} guest reads failed (counted as denied; vCPUs replaced)"
            );
        }
    }
}

impl World for ModelKvmWorld {
    /// One device-view slot per device thread, then one vCPU slot per
    /// device thread (device thread `d` serves view `d` and vCPU `d`).
    fn device_slots(&self) -> usize {
        self.views.len() + self.guests.len()
    }

    fn device_step(&self, rng: &mut Rng, slot: usize) {
        let v = self.views.len();
        if slot < v {
            self.view_step(rng, slot);
        } else if rng.chance(1, GUEST_EVERY) {
            self.guest_step(rng, (slot - v) % self.guests.len());
        } else {
            self.view_step(rng, (slot - v) % v);
        }
    }

    fn mutator_step(&self, rng: &mut Rng, stages: &mut Stages) -> OpKind {
        ModelKvmWorld::mutator_step(self, rng, stages)
    }

    fn stats(&self) -> WorldStats {
        let c = &self.counters;
        let (mut misses, mut retries, mut invalidations) = (0, 0, 0);
        for v in &self.views {
            for r in v.regions().iter() {
                let (m, rt, i) = r.cache_stats();
                misses += m;
                retries += rt;
                invalidations += i;
            }
        }
        let region = self.mirror.stats(0).unwrap_or_default();
        let checks = self.oracle.checks();
        let mut first: Vec<String> = self.first_guest_violations.lock().clone();
        first.extend(
            self.oracle
                .violations()
                .iter()
                .take(3)
                .map(super::violation_text),
        );
        WorldStats {
            accesses: c.accesses.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            operations: c.ops.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            violations: self.oracle.violation_count() + c.guest_violations.load(Ordering::Relaxed),
            checks: checks + c.guest_reads.load(Ordering::Relaxed),
            faults: misses + region.faults,
            retries,
            invalidations: invalidations + region.invalidations,
            // The translation caches are the devices' TLBs: a check is a
            // hit (after any fill), a fill a miss.
            tlb_hits: checks.saturating_sub(misses),
            tlb_misses: misses,
            tlb_shootdowns: region.punched,
            subscriptions: self.mm.notifiers().interval_count(),
            guest_reads: c.guest_reads.load(Ordering::Relaxed),
            first_violations: first,
        }
    }
}
