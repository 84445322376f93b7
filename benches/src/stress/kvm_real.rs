//! The KVM world over real memory (`--backend kvm --kvm-memory real`): a
//! real VM whose guest RAM is the process's own anonymous memory
//! (`notifier_kvm::GuestRam`) under a KVM memslot, watched by a userfaultfd
//! monitor (`notifier_kvm::RealGuestMemory`). Devices are device-emulation
//! views (`GuestView`, vm-memory `Bytes`) and real-mode vCPUs; mutators make
//! CPU writes, balloon inflations (announced `MADV_DONTNEED`), deflations
//! (`MADV_POPULATE_WRITE`) and remaps of the RAM (`mremap`, memslot
//! re-added, views republished). In the report, inflations count as
//! `madvise_dontneed`, deflations as `reclaim`, remaps as `mremap`.
//!
//! # Checks
//! The first word of every arena page is its *tag*, changed only by
//! mutators holding the page's lock (a CPU write stores a fresh tag, an
//! inflation makes it 0). A device or guest read takes the page lock,
//! reads the word and compares: any difference is a violation (a view or
//! KVM showed bytes the RAM no longer holds). A view refused as stale (a
//! remap published a new layout) refreshes and is counted as denied.
//!
//! # Locking
//! `layout` (read for accesses, write for a remap) keeps a vCPU out of the
//! window in which the memslot is deleted and re-added; page locks are
//! taken inside it in ascending order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use notifier_core::PAGE_SIZE;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{GuestRam, GuestView, RealGuestMemory};
use notifier_uffd::{HandlerThread, UffdMonitor, ZeroHandler};
use parking_lot::{Mutex, RwLock};
use vm_memory::{Bytes, GuestAddress};

use super::timing::Stages;
use super::world::{World, WorldStats};
use super::{OpKind, StressConfig};
use crate::rng::Rng;

/// Guest RAM: the first MiB (what a real-mode guest addresses).
const RAM: u64 = 0x10_0000;
/// Start of the arena (after the guest's program).
const ARENA: u64 = 0x1_0000;
/// Pages of the arena.
const ARENA_PAGES: u64 = 224;
/// One in this many device steps of a vCPU slot is a guest read.
const GUEST_EVERY: u64 = 16;

#[derive(Default)]
struct Counters {
    accesses: AtomicU64,
    denied: AtomicU64,
    ops: AtomicU64,
    rejected: AtomicU64,
    violations: AtomicU64,
    guest_reads: AtomicU64,
    guest_errors: AtomicU64,
}

/// The KVM world over real memory.
pub struct RealKvmWorld {
    mem: RealGuestMemory,
    layout: RwLock<()>,
    views: Vec<Mutex<GuestView>>,
    guests: Vec<Mutex<Option<RealModeGuest>>>,
    next_vcpu: AtomicU64,
    pages: Vec<(Mutex<()>, AtomicU64)>,
    first: Mutex<Vec<String>>,
    counters: Counters,
    _thread: HandlerThread,
}

impl RealKvmWorld {
    /// A VM over 1 MiB of real anonymous guest RAM, `devices` views and
    /// (when a vCPU runs) `devices` real guests.
    ///
    /// # Errors
    /// A message when KVM or userfaultfd is missing or a setup step fails.
    pub fn new(_cfg: &StressConfig, devices: usize) -> Result<Self, String> {
        let e = |what: &str, err: &dyn std::fmt::Display| {
            format!("setting up the real-memory kvm world: {what}: {err}")
        };
        let kvm = Kvm::new().map_err(|x| format!("/dev/kvm is not available: {x}"))?;
        let monitor = UffdMonitor::builder()
            .build(Arc::new(ZeroHandler))
            .map_err(|x| e("userfaultfd", &x))?;
        let thread = monitor.spawn().map_err(|x| e("monitor thread", &x))?;
        let vm = Arc::new(kvm.create_vm().map_err(|x| e("KVM_CREATE_VM", &x))?);
        let mem = RealGuestMemory::new(vm, monitor, kvm.get_nr_memslots() as u32)
            .map_err(|x| e("guest memory", &x))?;
        let ram = GuestRam::anon(RAM).map_err(|x| e("guest RAM", &x))?;
        mem.add_region(0, ram, None).map_err(|x| e("memslot", &x))?;
        let views = (0..devices.max(1))
            .map(|_| Mutex::new(mem.memory()))
            .collect();
        let mut guests = Vec::new();
        let mut next = 0;
        for _ in 0..devices.max(1) {
            match RealModeGuest::new(&mem, next) {
                Ok(g) => guests.push(Mutex::new(Some(g))),
                Err(x) => {
                    eprintln!("notifier stress: kvm real: no real guest ({x}); device views only");
                    break;
                }
            }
            next += 1;
        }
        let pages = (0..ARENA_PAGES)
            .map(|_| (Mutex::new(()), AtomicU64::new(0)))
            .collect();
        Ok(Self {
            mem,
            layout: RwLock::new(()),
            views,
            guests,
            next_vcpu: AtomicU64::new(next),
            pages,
            first: Mutex::new(Vec::new()),
            counters: Counters::default(),
            _thread: thread,
        })
    }

    fn check(&self, who: &str, gpa: u64, got: u32, want: u64) {
        if u64::from(got) != want {
            let n = self.counters.violations.fetch_add(1, Ordering::Relaxed);
            if n < 3 {
                self.first.lock().push(format!(
                    "{who} read {got:#x} at gpa {gpa:#x}, the RAM holds {want:#x}"
                ));
            }
        }
    }

    fn view_step(&self, rng: &mut Rng, d: usize) {
        let i = rng.below(ARENA_PAGES);
        let gpa = ARENA + i * PAGE_SIZE;
        let _l = self.layout.read();
        let mut view = self.views[d % self.views.len()].lock();
        let (lock, tag) = &self.pages[i as usize];
        let write = rng.chance(1, 4);
        let ok = if write {
            // Never the tag word.
            let off = 8 * (1 + rng.below(511));
            view.write_obj(rng.next_u64(), GuestAddress(gpa + off))
                .is_ok()
        } else {
            let _p = lock.lock();
            match view.read_obj::<u32>(GuestAddress(gpa)) {
                Ok(v) => {
                    self.check("device view", gpa, v, tag.load(Ordering::Relaxed));
                    true
                }
                Err(_) => false,
            }
        };
        if !ok && !view.is_current() {
            view.refresh();
        }
        let c = if ok {
            &self.counters.accesses
        } else {
            &self.counters.denied
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn guest_step(&self, rng: &mut Rng, g: usize) {
        let i = rng.below(ARENA_PAGES);
        let gpa = ARENA + i * PAGE_SIZE;
        let _l = self.layout.read();
        let mut guest = self.guests[g].lock();
        let (lock, tag) = &self.pages[i as usize];
        let _p = lock.lock();
        if guest.is_none() {
            let id = self.next_vcpu.fetch_add(1, Ordering::Relaxed);
            *guest = RealModeGuest::new(&self.mem, id).ok();
        }
        let Some(vcpu) = guest.as_mut() else {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match vcpu.read_u32(&self.mem, gpa) {
            Ok(v) => {
                self.counters.accesses.fetch_add(1, Ordering::Relaxed);
                self.counters.guest_reads.fetch_add(1, Ordering::Relaxed);
                self.check("guest", gpa, v, tag.load(Ordering::Relaxed));
            }
            Err(_) => {
                *guest = None;
                self.counters.guest_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for RealKvmWorld {
    fn drop(&mut self) {
        let n = self.counters.guest_errors.load(Ordering::Relaxed);
        if n > 0 {
            eprintln!("notifier stress: kvm real: {n} guest reads failed (vCPUs replaced)");
        }
    }
}

impl World for RealKvmWorld {
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
        let pages = 1 + rng.below(8);
        let first = rng.below(ARENA_PAGES - pages);
        let gpa = ARENA + first * PAGE_SIZE;
        let len = pages * PAGE_SIZE;
        let t0 = Instant::now();
        let pick = rng.below(16);
        let (kind, ok) = if pick == 0 {
            // Remap the RAM: memslot deleted, RAM moved, slot re-added,
            // views republished; no access in between.
            let _w = self.layout.write();
            (OpKind::Mremap, self.mem.remap_region(0).is_ok())
        } else {
            let _l = self.layout.read();
            let locks: Vec<_> = (first..first + pages)
                .map(|i| self.pages[i as usize].0.lock())
                .collect();
            let r = if pick < 6 {
                let ok = self.mem.balloon_inflate(gpa, len).is_ok();
                if ok {
                    for i in first..first + pages {
                        self.pages[i as usize].1.store(0, Ordering::Relaxed);
                    }
                }
                (OpKind::MadviseDontNeed, ok)
            } else if pick < 8 {
                // Deflate: the bytes (zeros) do not change.
                (
                    OpKind::Reclaim,
                    self.mem.balloon_deflate(gpa, len, true).is_ok(),
                )
            } else {
                let tag = rng.next_u64() & 0xffff_ffff;
                let ok = self
                    .mem
                    .translate(gpa)
                    .is_some_and(|(ram, off)| ram.write(off, &(tag as u32).to_le_bytes()).is_ok());
                if ok {
                    self.pages[first as usize].1.store(tag, Ordering::Relaxed);
                }
                (OpKind::CpuWrite, ok)
            };
            drop(locks);
            r
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
        let c = &self.counters;
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        WorldStats {
            accesses: l(&c.accesses),
            denied: l(&c.denied),
            operations: l(&c.ops),
            rejected: l(&c.rejected),
            violations: l(&c.violations),
            checks: l(&c.accesses),
            guest_reads: l(&c.guest_reads),
            first_violations: self.first.lock().clone(),
            ..WorldStats::default()
        }
    }
}
