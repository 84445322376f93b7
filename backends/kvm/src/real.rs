//! [`RealGuestMemory`]: a VM's guest-physical layout over guest RAM that
//! the VMM owns ([`GuestRam`]), watched through userfaultfd, with
//! versioned device-emulation views ([`GuestView`]).
//!
//! # What follows what
//!
//! - **KVM** reads the VMM's own mapping: each region is one memslot whose
//!   `userspace_addr` is the [`GuestRam`]'s address. KVM follows every host
//!   page-table change (balloon `MADV_DONTNEED` / `MADV_REMOVE`, pages a
//!   userfaultfd handler installs) through the kernel's mmu notifier, so
//!   nothing is mirrored and nothing is pinned.
//! - **Device views** ([`GuestView`], vm-memory's `GuestMemory`) read the
//!   same mapping. They hold no translation, so a zap cannot leave them
//!   stale; what they must not do is read a *layout* that changed. Every
//!   layout change (region add, remove, move, resize, remap) publishes a
//!   new [`Layout`] under a new generation; a view of an older generation is
//!   refused ([`KvmError::StaleView`]), and [`GuestView::refresh`] moves it
//!   to the current one (vm-memory's `GuestMemoryAtomic` pattern).
//! - **userfaultfd events** reach us as invalidations on the monitor's
//!   notifier set: `Unmap` of a region's range (someone `munmap`ed or
//!   `mremap`ed guest RAM behind the VMM's back) marks the RAM gone: views
//!   refuse it from then on (and KVM's `KVM_RUN` fails with `EFAULT` on
//!   it); `Clear` (a `REMOVE`) is counted. Before serving a read, a view
//!   waits on the notifier set's [`EventGate`](notifier_core::notifier::EventGate):
//!   an event the monitor has read is applied before the read proceeds.
//!
//! # Locking
//!
//! `layout` (read-write) is held for reading by a view access for its whole
//! duration and for writing by a layout change across its memslot ioctl and
//! the publication, so no access straddles two layouts. `watch` (a mutex)
//! maps host ranges to RAM for the event callback; it is never held across
//! a syscall that waits for the monitor. The event callback takes only
//! `watch` (a view access may fault on a page the monitor must serve, so the
//! monitor never waits for `layout`). Order: `writer`, then `layout`, then
//! `watch`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use notifier_core::notifier::{
    Again, Event, Hooks, InvalidateRange, MmuNotifier, MmuNotifierOps, NotifierSubscriptions,
};
use notifier_core::{PageRange, PAGE_SHIFT};
use notifier_uffd::{RegisterMode, UffdMonitor};
use parking_lot::{Mutex, RwLock};

use crate::dirty::DirtyBitmap;
use crate::guest_ram::{GuestRam, RamBacking};
use crate::memslot::{slot_error, SlotTable};
use crate::real_view::GuestView;
use crate::sys_ram::RamSlot;
use crate::{KvmError, LOG_DIRTY_PAGES};

/// One region of a [`Layout`]: guest-physical `[gpa, gpa + len)` is the
/// first `len` bytes of `ram`.
#[derive(Debug)]
pub struct RealRegion {
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    pub(crate) slot: u32,
    pub(crate) ram: Arc<GuestRam>,
    /// Pages written through device views (merged into the dirty log).
    pub(crate) dirty: Arc<[AtomicU64]>,
}

impl RealRegion {
    /// Guest-physical base.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The KVM memslot id.
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// The guest RAM behind it.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub(crate) fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }

    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for p in off >> PAGE_SHIFT..=(off + len - 1) >> PAGE_SHIFT {
            if let Some(w) = self.dirty.get((p / 64) as usize) {
                w.fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }
}

/// One published guest-physical layout (immutable; a change publishes a
/// new one under the next generation).
#[derive(Debug, Default)]
pub struct Layout {
    pub(crate) gen: u64,
    /// Sorted by guest-physical address.
    pub(crate) regions: Vec<Arc<RealRegion>>,
}

impl Layout {
    /// The generation (0 for the empty layout at creation).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// The regions, by guest-physical address.
    pub fn regions(&self) -> &[Arc<RealRegion>] {
        &self.regions
    }

    /// The region holding `gpa`.
    pub fn find(&self, gpa: u64) -> Option<&Arc<RealRegion>> {
        let i = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[i];
        r.contains(gpa).then_some(r)
    }
}

/// Counters of a [`RealGuestMemory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RealStats {
    /// Layouts published (one per layout change).
    pub generations: u64,
    /// Pages named by `Clear` invalidations (balloon inflation, REMOVE).
    pub removed_pages: u64,
    /// Regions found unmapped behind the VMM's back (UNMAP / REMAP events).
    pub gone_regions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    removed_pages: AtomicU64,
    gone_regions: AtomicU64,
}

/// The event callback: host ranges of guest RAM, to find the RAM an UNMAP
/// names.
struct Watch {
    /// (host start, host end) -> RAM.
    ranges: Mutex<BTreeMap<u64, (u64, Arc<GuestRam>)>>,
    counters: Arc<Counters>,
}

impl MmuNotifierOps for Watch {
    fn hooks(&self) -> Hooks {
        Hooks::START
    }

    /// # Locking
    /// Takes `watch` only.
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        match r.event() {
            Event::Clear => {
                let w = self.ranges.lock();
                let mut n = 0;
                for (&s, (e, _)) in w.range(..r.end()) {
                    let (a, b) = (s.max(r.start()), (*e).min(r.end()));
                    if a < b {
                        n += (b - a) >> PAGE_SHIFT;
                    }
                }
                self.counters.removed_pages.fetch_add(n, Ordering::Relaxed);
            }
            Event::Unmap | Event::Release => {
                let mut w = self.ranges.lock();
                let hit: Vec<u64> = w
                    .range(..r.end())
                    .filter(|(_, (e, _))| *e > r.start())
                    .map(|(&s, _)| s)
                    .collect();
                for s in hit {
                    if let Some((_, ram)) = w.remove(&s) {
                        ram.map.mark_gone();
                        self.counters.gone_regions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

struct Writer {
    slots: SlotTable,
    /// gpa -> memslot.
    memslots: BTreeMap<u64, RamSlot>,
}

pub(crate) struct Shared {
    pub(crate) layout: RwLock<Arc<Layout>>,
    pub(crate) notifiers: Arc<NotifierSubscriptions>,
}

/// A VM's guest memory over [`GuestRam`] that the VMM owns (see the module
/// docs).
pub struct RealGuestMemory {
    vm: Arc<VmFd>,
    monitor: UffdMonitor,
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
    watch: Arc<Watch>,
    counters: Arc<Counters>,
    _sub: MmuNotifier,
}

impl core::fmt::Debug for RealGuestMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RealGuestMemory")
            .field("layout", &*self.shared.layout.read())
            .finish_non_exhaustive()
    }
}

/// The userfaultfd mode that only watches a range (events, no faults):
/// write-protect for anonymous RAM (no page is write-protected, so no fault
/// is raised), minor for a memfd (a page in the page cache is mapped back
/// with `UFFDIO_CONTINUE`, the kernel's own behaviour).
pub fn watch_mode(backing: RamBacking) -> RegisterMode {
    match backing {
        RamBacking::Memfd => RegisterMode::MINOR,
        _ => RegisterMode::WP,
    }
}

impl RealGuestMemory {
    /// Guest memory of `vm`, watched through `monitor` (which must be
    /// driven, e.g. by [`UffdMonitor::spawn`]), with memslot ids
    /// `0..max_slots` (pass `Kvm::get_nr_memslots()`).
    ///
    /// # Errors
    /// [`KvmError::Notifier`] when the monitor's notifier set was released.
    pub fn new(vm: Arc<VmFd>, monitor: UffdMonitor, max_slots: u32) -> Result<Self, KvmError> {
        let counters = Arc::new(Counters::default());
        let watch = Arc::new(Watch {
            ranges: Mutex::new(BTreeMap::new()),
            counters: counters.clone(),
        });
        let notifiers = monitor.notifiers().clone();
        let sub = notifiers.register(watch.clone())?;
        Ok(Self {
            vm,
            monitor,
            shared: Arc::new(Shared {
                layout: RwLock::new(Arc::new(Layout::default())),
                notifiers,
            }),
            writer: Mutex::new(Writer {
                slots: SlotTable::new(max_slots),
                memslots: BTreeMap::new(),
            }),
            watch,
            counters,
            _sub: sub,
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The monitor watching guest RAM.
    pub fn monitor(&self) -> &UffdMonitor {
        &self.monitor
    }

    /// The current layout.
    pub fn layout(&self) -> Arc<Layout> {
        self.shared.layout.read().clone()
    }

    /// A device-emulation view of the current layout.
    pub fn memory(&self) -> GuestView {
        GuestView::new(self.shared.clone())
    }

    /// Counters.
    pub fn stats(&self) -> RealStats {
        RealStats {
            generations: self.shared.layout.read().gen,
            removed_pages: self.counters.removed_pages.load(Ordering::Relaxed),
            gone_regions: self.counters.gone_regions.load(Ordering::Relaxed),
        }
    }

    /// Publish `regions` as the next generation (`layout` held for writing).
    fn publish(l: &mut Arc<Layout>, mut regions: Vec<Arc<RealRegion>>) {
        regions.sort_by_key(|r| r.gpa);
        *l = Arc::new(Layout {
            gen: l.gen + 1,
            regions,
        });
    }

    fn watch_insert(&self, ram: &Arc<GuestRam>) {
        let a = ram.addr();
        self.watch
            .ranges
            .lock()
            .insert(a, (a + ram.len(), ram.clone()));
    }

    fn watch_remove(&self, ram: &Arc<GuestRam>) {
        let a = ram.addr();
        let mut w = self.watch.ranges.lock();
        if w.get(&a).is_some_and(|(_, r)| Arc::ptr_eq(r, ram)) {
            w.remove(&a);
        }
    }

    /// Make `ram` guest-physical `[gpa, gpa + ram.len())`: register it with
    /// the monitor (`mode`; [`watch_mode`] when `None`), add a memslot over
    /// it and publish the new layout.
    ///
    /// # Errors
    /// [`KvmError::Range`], [`KvmError::Uffd`] (registration refused, e.g.
    /// overlapping), [`KvmError::OutOfSlots`], [`KvmError::Overlap`],
    /// [`KvmError::InvalidSlot`]; on error the layout is unchanged and the
    /// RAM unregistered.
    ///
    /// # Locking
    /// `writer`, then `layout` for writing across the ioctl.
    pub fn add_region(
        &self,
        gpa: u64,
        ram: GuestRam,
        mode: Option<RegisterMode>,
    ) -> Result<Arc<GuestRam>, KvmError> {
        let len = ram.len();
        PageRange::new(gpa, len)?;
        let host = PageRange::new(ram.addr(), len)?;
        let mode = mode.unwrap_or_else(|| watch_mode(ram.backing()));
        self.monitor.register_raw(host, mode)?;
        let ram = Arc::new(ram);
        let mut w = self.writer.lock();
        let id = match w.slots.alloc() {
            Ok(id) => id,
            Err(e) => {
                let _ = self.monitor.unregister(host);
                return Err(e);
            }
        };
        let mut l = self.shared.layout.write();
        let slot = match RamSlot::add(&self.vm, id, gpa, &ram.map, 0, len as usize, 0) {
            Ok(s) => s,
            Err(e) => {
                w.slots.release(id);
                drop(l);
                let _ = self.monitor.unregister(host);
                return Err(slot_error(e, id, gpa, len));
            }
        };
        w.memslots.insert(gpa, slot);
        self.watch_insert(&ram);
        let mut regions = l.regions.clone();
        regions.push(Arc::new(RealRegion {
            gpa,
            len,
            slot: id,
            ram: ram.clone(),
            dirty: new_bitmap(len),
        }));
        Self::publish(&mut l, regions);
        Ok(ram)
    }

    fn region_at(l: &Layout, gpa: u64) -> Result<(usize, Arc<RealRegion>), KvmError> {
        l.regions
            .iter()
            .position(|r| r.gpa == gpa)
            .map(|i| (i, l.regions[i].clone()))
            .ok_or(KvmError::NoRegion(gpa))
    }

    /// Remove the region at `gpa`: delete its memslot, publish the layout
    /// without it, unregister its RAM; returns the RAM.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`].
    pub fn remove_region(&self, gpa: u64) -> Result<Arc<GuestRam>, KvmError> {
        let mut w = self.writer.lock();
        let mut l = self.shared.layout.write();
        let (i, r) = Self::region_at(&l, gpa)?;
        if let Some(s) = w.memslots.remove(&gpa) {
            w.slots.release(s.slot());
            drop(s);
        }
        let mut regions = l.regions.clone();
        regions.remove(i);
        Self::publish(&mut l, regions);
        drop(l);
        self.watch_remove(&r.ram);
        if !r.ram.is_gone() {
            if let Ok(host) = PageRange::new(r.ram.addr(), r.ram.len()) {
                let _ = self.monitor.unregister(host);
            }
        }
        Ok(r.ram.clone())
    }

    /// Move the region at `gpa` to `new_gpa` in place (`KVM_MR_MOVE`: the
    /// RAM and its contents stay) and publish the new layout.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Range`], [`KvmError::Overlap`],
    /// [`KvmError::InvalidSlot`]; on error the layout is unchanged.
    pub fn move_region(&self, gpa: u64, new_gpa: u64) -> Result<(), KvmError> {
        let mut w = self.writer.lock();
        let mut l = self.shared.layout.write();
        let (i, r) = Self::region_at(&l, gpa)?;
        PageRange::new(new_gpa, r.len)?;
        let mut s = w.memslots.remove(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let flags = s.flags();
        if let Err(e) = s.modify(new_gpa, flags) {
            let id = s.slot();
            w.memslots.insert(gpa, s);
            return Err(slot_error(e, id, new_gpa, r.len));
        }
        w.memslots.insert(new_gpa, s);
        let mut regions = l.regions.clone();
        regions[i] = Arc::new(RealRegion {
            gpa: new_gpa,
            len: r.len,
            slot: r.slot,
            ram: r.ram.clone(),
            dirty: r.dirty.clone(),
        });
        Self::publish(&mut l, regions);
        Ok(())
    }

    /// Resize the region at `gpa` to the first `new_len` bytes of its RAM
    /// (memory hotplug inside a RAM reserved at its maximum size). KVM
    /// cannot resize a slot: it is deleted and re-added; on failure the old
    /// slot is re-added.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Range`], [`KvmError::BeyondRam`],
    /// [`KvmError::Overlap`], [`KvmError::InvalidSlot`].
    pub fn resize_region(&self, gpa: u64, new_len: u64) -> Result<(), KvmError> {
        let mut w = self.writer.lock();
        let mut l = self.shared.layout.write();
        let (i, r) = Self::region_at(&l, gpa)?;
        PageRange::new(gpa, new_len)?;
        if new_len > r.ram.len() {
            return Err(KvmError::BeyondRam {
                len: new_len,
                ram: r.ram.len(),
            });
        }
        let old = w.memslots.remove(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let (id, flags) = (old.slot(), old.flags());
        drop(old);
        let map = &r.ram.map;
        let slot = match RamSlot::add(&self.vm, id, gpa, map, 0, new_len as usize, flags) {
            Ok(s) => s,
            Err(e) => {
                if let Ok(s) = RamSlot::add(&self.vm, id, gpa, map, 0, r.len as usize, flags) {
                    w.memslots.insert(gpa, s);
                }
                return Err(slot_error(e, id, gpa, new_len));
            }
        };
        w.memslots.insert(gpa, slot);
        let mut regions = l.regions.clone();
        regions[i] = Arc::new(RealRegion {
            gpa,
            len: new_len,
            slot: id,
            ram: r.ram.clone(),
            dirty: new_bitmap(new_len),
        });
        Self::publish(&mut l, regions);
        Ok(())
    }

    /// Move the RAM of the region at `gpa` to a new host address
    /// (`mremap`), keeping its contents and its guest-physical place: the
    /// slot is deleted, the RAM moved (the monitor's registration follows
    /// the kernel's REMAP event), the slot re-added at the new address and
    /// the new layout published. Returns the new host address.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Os`] when `mremap` fails (the
    /// slot is re-added at the old address), [`KvmError::InvalidSlot`].
    ///
    /// # Locking
    /// `mremap` waits until the monitor has read the REMAP event: never
    /// call it from the thread driving the monitor.
    pub fn remap_region(&self, gpa: u64) -> Result<u64, KvmError> {
        let mut w = self.writer.lock();
        let mut l = self.shared.layout.write();
        let (i, r) = Self::region_at(&l, gpa)?;
        let old = w.memslots.remove(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let (id, flags) = (old.slot(), old.flags());
        drop(old);
        // The REMAP's `Unmap` of the old range is ours: not a loss.
        self.watch_remove(&r.ram);
        let moved = r.ram.map.mremap_move();
        self.watch_insert(&r.ram);
        let slot = RamSlot::add(&self.vm, id, gpa, &r.ram.map, 0, r.len as usize, flags)
            .map_err(|e| slot_error(e, id, gpa, r.len))?;
        w.memslots.insert(gpa, slot);
        let addr = moved.map_err(|e| KvmError::os("mremap guest RAM", e))?;
        let mut regions = l.regions.clone();
        regions[i] = Arc::new(RealRegion {
            gpa,
            len: r.len,
            slot: id,
            ram: r.ram.clone(),
            dirty: r.dirty.clone(),
        });
        Self::publish(&mut l, regions);
        Ok(addr)
    }

    fn locate(&self, gpa: u64, len: u64) -> Result<(Arc<RealRegion>, PageRange), KvmError> {
        let range = PageRange::new(gpa, len)?;
        let l = self.shared.layout.read();
        let r = l.find(gpa).ok_or(KvmError::Unmapped(gpa))?.clone();
        if range.end() > r.gpa + r.len {
            return Err(KvmError::Unmapped(r.gpa + r.len));
        }
        Ok((r, range))
    }

    /// Inflate the balloon over `[gpa, gpa + len)`: the pages go back to the
    /// host (`MADV_DONTNEED` / `MADV_REMOVE`), announced to the monitor's
    /// subscribers (their invalidation runs on this thread before the zap,
    /// see `UffdMonitor::announce_remove`). KVM drops its mappings through
    /// the kernel's mmu notifier; the next read, by the guest or a device,
    /// sees zeros (or what the monitor's handler serves for a missing page).
    ///
    /// # Errors
    /// [`KvmError::Unmapped`], [`KvmError::Range`], [`KvmError::Uffd`],
    /// [`KvmError::Os`].
    ///
    /// # Locking
    /// Never from the thread driving the monitor, nor while holding a lock
    /// a subscriber takes.
    pub fn balloon_inflate(&self, gpa: u64, len: u64) -> Result<(), KvmError> {
        let (r, range) = self.locate(gpa, len)?;
        let off = range.start() - r.gpa;
        let host = PageRange::new(r.ram.addr() + off, len)?;
        self.monitor
            .announce_remove(host, || r.ram.discard(off, len))??;
        Ok(())
    }

    /// Deflate the balloon over `[gpa, gpa + len)`: the guest may use the
    /// pages again. With `prefault`, they are populated now
    /// (`MADV_POPULATE_WRITE`; a userfaultfd handler serves missing ones),
    /// otherwise on first touch.
    ///
    /// # Errors
    /// As [`Self::balloon_inflate`].
    pub fn balloon_deflate(&self, gpa: u64, len: u64, prefault: bool) -> Result<(), KvmError> {
        let (r, range) = self.locate(gpa, len)?;
        if prefault {
            r.ram.populate(range.start() - r.gpa, len)?;
        }
        Ok(())
    }

    /// Turn KVM's dirty logging of the region at `gpa` on or off. Turning it
    /// on starts from a clean log: KVM's bitmap and the device-view writes
    /// recorded so far are discarded, so [`Self::dirty_log`] reports only
    /// writes made after this call (the kernel's semantics).
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::InvalidSlot`], [`KvmError::Kvm`].
    pub fn set_dirty_logging(&self, gpa: u64, on: bool) -> Result<(), KvmError> {
        let mut w = self.writer.lock();
        let l = self.shared.layout.read();
        let (_, r) = Self::region_at(&l, gpa)?;
        let s = w.memslots.get_mut(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let flags = if on {
            s.flags() | LOG_DIRTY_PAGES
        } else {
            s.flags() & !LOG_DIRTY_PAGES
        };
        if flags != s.flags() {
            s.modify(gpa, flags)
                .map_err(|e| slot_error(e, s.slot(), gpa, r.len))?;
        }
        if on {
            s.dirty_log()
                .map_err(|e| KvmError::kvm("KVM_GET_DIRTY_LOG", e))?;
            for d in r.dirty.iter() {
                d.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The dirty pages of the region at `gpa` since the last call (or since
    /// logging was enabled): KVM's dirty log (when on) merged with the
    /// device-view writes. Reading clears both.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Kvm`].
    pub fn dirty_log(&self, gpa: u64) -> Result<DirtyBitmap, KvmError> {
        let w = self.writer.lock();
        let l = self.shared.layout.read();
        let (_, r) = Self::region_at(&l, gpa)?;
        let s = w.memslots.get(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let pages = (r.len >> PAGE_SHIFT) as usize;
        let mut bits = if s.flags() & LOG_DIRTY_PAGES != 0 {
            s.dirty_log()
                .map_err(|e| KvmError::kvm("KVM_GET_DIRTY_LOG", e))?
        } else {
            vec![0; pages.div_ceil(64)]
        };
        for (b, d) in bits.iter_mut().zip(r.dirty.iter()) {
            *b |= d.swap(0, Ordering::Relaxed);
        }
        Ok(DirtyBitmap::new(gpa, pages, bits))
    }

    /// The RAM and offset that back `gpa` in the current layout.
    pub fn translate(&self, gpa: u64) -> Option<(Arc<GuestRam>, u64)> {
        let l = self.shared.layout.read();
        let r = l.find(gpa)?;
        Some((r.ram.clone(), gpa - r.gpa))
    }
}

fn new_bitmap(len: u64) -> Arc<[AtomicU64]> {
    let words = (len >> PAGE_SHIFT).div_ceil(64) as usize;
    (0..words).map(|_| AtomicU64::new(0)).collect()
}
