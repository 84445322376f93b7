//! [`KvmMirror`]: a secondary MMU whose "external page table" is a set of
//! KVM memslots over host views of the primary's frames.
//!
//! # Layout
//!
//! A region maps guest-physical `[gpa, gpa + len)` to primary addresses
//! `[pbase, pbase + len)` (by default `pbase == gpa`: the primary *is* the
//! guest-physical space). Each region owns a host view (see
//! [`crate::host_view`]), one KVM memslot over it, and one interval
//! subscription to `[pbase, pbase + len)`.
//!
//! # Demand faults
//!
//! A guest access to a hole comes back to the VMM. How depends on how KVM
//! runs the guest:
//!
//! - **emulated guests** (real mode on KVM-on-PVM, any instruction KVM
//!   emulates): the emulator cannot read the hva and completes the access as
//!   MMIO, so `KVM_RUN` returns `KVM_EXIT_MMIO` with the exact gpa, size and
//!   (for a write) data. [`KvmMirror::mmio_read`]/[`KvmMirror::mmio_write`]
//!   fault the page in and complete the access on the current frame. A write
//!   to a read-only page exits the same way. An instruction fetch from a hole
//!   fails emulation (`KVM_EXIT_INTERNAL_ERROR`): fault in the page at CS:IP
//!   and re-enter (see [`crate::guest`]).
//! - **hardware-virtualized guests**: `KVM_RUN` fails with `EFAULT`; where
//!   the kernel fills `KVM_EXIT_MEMORY_FAULT` the gpa comes with it
//!   ([`KvmMirror::handle_fault`] then re-enter); otherwise the VMM must know
//!   the gpa (or populate the region with [`KvmMirror::populate`]).
//!
//! # Locking
//!
//! `layout` (a read-write lock) guards the region map and the slot table; it
//! is held for writing across memslot ioctls and only for reading (to clone
//! a region's `Arc`) on the fault path. Each host view's `pt` mutex is the
//! interval protocol's driver lock. Order: `layout` before `pt`; the primary
//! is never called with either held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use notifier_core::addr::PAGE_MASK;
use notifier_core::frame::{FrameStore, Pfn};
use notifier_core::notifier::IntervalSubscription;
use notifier_core::primary::{Primary, Translation};
use notifier_core::{PageRange, PAGE_SHIFT, PAGE_SIZE};
use parking_lot::RwLock;

use crate::dirty::DirtyBitmap;
use crate::host_view::{decode, HostView, ViewNotifier, ViewPool};
use crate::memfd::MemfdFrames;
use crate::memslot::{slot_error, SlotTable};
use crate::sys::UserMemslot;
use crate::KvmError;

/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const LOG_DIRTY_PAGES: u32 = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

/// A region as the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical base.
    pub gpa: u64,
    /// Primary address of the first page.
    pub pbase: u64,
    /// Length in bytes.
    pub len: u64,
    /// KVM memslot id.
    pub slot: u32,
    /// Memslot flags.
    pub flags: u32,
}

/// Counters of one region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Pages mapped in by faults.
    pub faults: u64,
    /// Invalidation callbacks.
    pub invalidations: u64,
    /// Pages punched back to holes.
    pub punched: u64,
    /// Pages write-protected in place.
    pub write_protected: u64,
    /// Pages present in the host view now.
    pub present: usize,
}

/// One region. Field order is drop order, and it matters on removal: the
/// memslot is deleted first (KVM can no longer reach the view), then the
/// subscription is removed (no invalidation reaches the view any more),
/// then the view is unmapped.
pub(crate) struct Region {
    pub(crate) gpa: u64,
    pub(crate) slot: Arc<parking_lot::Mutex<UserMemslot>>,
    pub(crate) sub: Arc<IntervalSubscription<ViewNotifier>>,
    pub(crate) view: Arc<HostView>,
}

impl Region {
    fn info(&self) -> RegionInfo {
        let s = self.slot.lock();
        RegionInfo {
            gpa: self.gpa,
            pbase: self.view.pbase,
            len: self.view.len,
            slot: s.slot(),
            flags: s.flags(),
        }
    }

    #[inline]
    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.view.len
    }
}

struct Layout {
    regions: BTreeMap<u64, Arc<Region>>,
    slots: SlotTable,
}

/// The KVM guest-memory mirror of a primary `P`.
///
/// The primary's frames must be `frames` (the memfd store): every PFN the
/// primary maps into a mirrored range must be a frame of it, or the fault
/// fails with [`KvmError::ForeignPfn`].
pub struct KvmMirror<P: Primary + ?Sized + 'static> {
    vm: Arc<VmFd>,
    primary: Arc<P>,
    frames: Arc<MemfdFrames>,
    layout: RwLock<Layout>,
    pool: ViewPool,
    /// Layout generation: bumped (under `layout`'s write lock) by every
    /// region add, remove, move and resize; a [`crate::DeviceView`] of an
    /// older generation is refused.
    pub(crate) gen: Arc<AtomicU64>,
}

impl<P: Primary + ?Sized + 'static> core::fmt::Debug for KvmMirror<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KvmMirror")
            .field("regions", &self.regions())
            .finish()
    }
}

impl<P: Primary + ?Sized + 'static> KvmMirror<P> {
    /// A mirror of `primary` into `vm`, with memslot ids `0..max_slots`
    /// (pass `Kvm::get_nr_memslots()`).
    ///
    /// # Errors
    /// [`KvmError::FramesMismatch`] when `frames` is not the primary's own
    /// frame store (`primary.frames()`): the mirror maps the memfd pages of
    /// `frames`, so a primary over other frames would be mirrored wrongly.
    pub fn new(
        vm: Arc<VmFd>,
        primary: Arc<P>,
        frames: Arc<MemfdFrames>,
        max_slots: u32,
    ) -> Result<Self, KvmError> {
        let theirs: *const dyn FrameStore = primary.frames();
        if !std::ptr::addr_eq(theirs, Arc::as_ptr(&frames)) {
            return Err(KvmError::FramesMismatch);
        }
        Ok(Self {
            vm,
            primary,
            frames,
            layout: RwLock::new(Layout {
                regions: BTreeMap::new(),
                slots: SlotTable::new(max_slots),
            }),
            pool: ViewPool::default(),
            gen: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The primary.
    pub fn primary(&self) -> &Arc<P> {
        &self.primary
    }

    /// The memfd frames.
    pub fn frames(&self) -> &Arc<MemfdFrames> {
        &self.frames
    }

    /// The layout generation (see [`crate::DeviceView::is_current`]).
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Memslots in use and the limit.
    pub fn slots_used(&self) -> (u32, u32) {
        let l = self.layout.read();
        (l.slots.used(), l.slots.max())
    }

    /// Mirror guest-physical `[gpa, gpa + len)` as primary `[gpa, gpa + len)`.
    ///
    /// # Errors
    /// See [`Self::add_region_at`].
    pub fn add_region(&self, gpa: u64, len: u64) -> Result<RegionInfo, KvmError> {
        self.add_region_at(gpa, gpa, len, 0)
    }

    /// Mirror guest-physical `[gpa, gpa + len)` as primary
    /// `[pbase, pbase + len)` with memslot `flags`. Every page starts as a
    /// hole and is faulted in on demand.
    ///
    /// # Errors
    /// [`KvmError::Range`] for a bad range, [`KvmError::OutOfSlots`],
    /// [`KvmError::Overlap`] (KVM's EEXIST), [`KvmError::InvalidSlot`]
    /// (EINVAL), [`KvmError::Notifier`] if the primary was released. On any
    /// error the layout is unchanged.
    ///
    /// # Locking
    /// Takes `layout` for writing.
    pub fn add_region_at(
        &self,
        gpa: u64,
        pbase: u64,
        len: u64,
        flags: u32,
    ) -> Result<RegionInfo, KvmError> {
        PageRange::new(gpa, len)?;
        PageRange::new(pbase, len)?;
        let view = Arc::new(HostView::new(pbase, len, self.frames.clone(), &self.pool)?);
        let sub =
            self.primary
                .notifiers()
                .interval_subscribe(pbase, len, ViewNotifier(view.clone()))?;
        let mut l = self.layout.write();
        let id = l.slots.alloc()?;
        let slot = match UserMemslot::add(&self.vm, id, gpa, view.view.clone(), flags) {
            Ok(s) => s,
            Err(e) => {
                l.slots.release(id);
                return Err(slot_error(e, id, gpa, len));
            }
        };
        let r = Region {
            gpa,
            view,
            sub: Arc::new(sub),
            slot: Arc::new(parking_lot::Mutex::new(slot)),
        };
        let info = r.info();
        l.regions.insert(gpa, Arc::new(r));
        self.gen.fetch_add(1, Ordering::Release);
        Ok(info)
    }

    /// Remove the region at `gpa`: the memslot is deleted, the subscription
    /// removed and the host view unmapped.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`].
    pub fn remove_region(&self, gpa: u64) -> Result<(), KvmError> {
        let r = {
            let mut l = self.layout.write();
            let r = l.regions.remove(&gpa).ok_or(KvmError::NoRegion(gpa))?;
            let id = r.slot.lock().slot();
            l.slots.release(id);
            self.gen.fetch_add(1, Ordering::Release);
            r
        };
        // Delete the slot, then unsubscribe (which may wait out an
        // invalidation: done without `layout` held), then give the view's
        // VA range back to the pool. If someone still holds the region (a
        // fault in flight), the last holder drops it the same way instead.
        self.retire(r);
        Ok(())
    }

    /// Move the region at `gpa` to `new_gpa` in place (KVM's
    /// `KVM_MR_MOVE`); the host view and its present pages stay.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Range`], [`KvmError::Overlap`],
    /// [`KvmError::InvalidSlot`]; on error the layout is unchanged.
    pub fn move_region(&self, gpa: u64, new_gpa: u64) -> Result<RegionInfo, KvmError> {
        let mut l = self.layout.write();
        let r = l.regions.get(&gpa).ok_or(KvmError::NoRegion(gpa))?.clone();
        PageRange::new(new_gpa, r.view.len)?;
        {
            let mut s = r.slot.lock();
            let flags = s.flags();
            s.modify(new_gpa, flags)
                .map_err(|e| slot_error(e, s.slot(), new_gpa, r.view.len))?;
        }
        l.regions.remove(&gpa);
        let moved = Region {
            gpa: new_gpa,
            view: r.view.clone(),
            sub: r.sub.clone(),
            slot: r.slot.clone(),
        };
        let info = moved.info();
        l.regions.insert(new_gpa, Arc::new(moved));
        self.gen.fetch_add(1, Ordering::Release);
        Ok(info)
    }

    /// Resize the region at `gpa` to `new_len` (KVM cannot resize a slot in
    /// place: the slot is deleted and re-added over a new host view, whose
    /// pages fault back in on demand).
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Range`], [`KvmError::Overlap`],
    /// [`KvmError::InvalidSlot`]; on error the old slot is restored and the
    /// layout is unchanged.
    pub fn resize_region(&self, gpa: u64, new_len: u64) -> Result<RegionInfo, KvmError> {
        let mut l = self.layout.write();
        let r = l.regions.get(&gpa).ok_or(KvmError::NoRegion(gpa))?.clone();
        PageRange::new(gpa, new_len)?;
        PageRange::new(r.view.pbase, new_len)?;
        let view = Arc::new(HostView::new(
            r.view.pbase,
            new_len,
            self.frames.clone(),
            &self.pool,
        )?);
        let sub = self.primary.notifiers().interval_subscribe(
            r.view.pbase,
            new_len,
            ViewNotifier(view.clone()),
        )?;
        {
            let mut s = r.slot.lock();
            let flags = s.flags();
            s.replace(gpa, view.view.clone(), flags)
                .map_err(|e| slot_error(e, s.slot(), gpa, new_len))?;
        }
        let resized = Region {
            gpa,
            view,
            sub: Arc::new(sub),
            slot: r.slot.clone(),
        };
        let info = resized.info();
        let old = l.regions.insert(gpa, Arc::new(resized));
        self.gen.fetch_add(1, Ordering::Release);
        drop(l);
        if let Some(old) = old {
            self.retire(old);
        }
        Ok(info)
    }

    /// Drop a region taken out of the layout: its slot (deleted unless
    /// another region shares it), then its subscription, then its view,
    /// whose VA range goes back to the pool when nothing else holds it.
    ///
    /// # Locking
    /// Call without `layout` held (unsubscribing may wait out an
    /// invalidation).
    fn retire(&self, r: Arc<Region>) {
        match Arc::try_unwrap(r) {
            Ok(Region {
                slot, sub, view, ..
            }) => {
                drop(slot);
                drop(sub);
                self.pool.recycle(view);
            }
            Err(r) => drop(r),
        }
    }

    /// Turn KVM's dirty logging of the region on or off (in place). The
    /// path is the one `KVM_SET_USER_MEMORY_REGION` plus a map lookup and
    /// two uncontended locks (no allocation); a call that changes nothing
    /// issues no slot ioctl. Turning it on starts a clean log:
    /// [`Self::dirty_log`] then reports only writes made after the call
    /// (one `KVM_GET_DIRTY_LOG` discards KVM's bits, the mirror's own are
    /// cleared).
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::InvalidSlot`].
    ///
    /// # Locking
    /// `layout` for reading, then the region's slot mutex, across the ioctl.
    pub fn set_dirty_logging(&self, gpa: u64, on: bool) -> Result<(), KvmError> {
        let l = self.layout.read();
        let r = l.regions.get(&gpa).ok_or(KvmError::NoRegion(gpa))?;
        let mut s = r.slot.lock();
        let flags = if on {
            s.flags() | LOG_DIRTY_PAGES
        } else {
            s.flags() & !LOG_DIRTY_PAGES
        };
        if flags != s.flags() {
            s.modify(r.gpa, flags)
                .map_err(|e| slot_error(e, s.slot(), r.gpa, r.view.len))?;
        }
        if on {
            // Start from a clean log: drop what KVM and the mirror recorded
            // before logging was enabled (the kernel's semantics).
            s.dirty_log()
                .map_err(|e| KvmError::kvm("KVM_GET_DIRTY_LOG", e))?;
            for d in &r.view.dirty {
                d.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The regions, by guest-physical address.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.layout
            .read()
            .regions
            .values()
            .map(|r| r.info())
            .collect()
    }

    /// Counters of the region at `gpa`.
    pub fn stats(&self, gpa: u64) -> Option<RegionStats> {
        let r = self.layout.read().regions.get(&gpa)?.clone();
        let s = &r.view.stats;
        Some(RegionStats {
            faults: s.faults.load(Ordering::Relaxed),
            invalidations: s.invalidations.load(Ordering::Relaxed),
            punched: s.punched.load(Ordering::Relaxed),
            write_protected: s.write_protected.load(Ordering::Relaxed),
            present: r.view.present(),
        })
    }

    pub(crate) fn region_of(&self, gpa: u64) -> Option<Arc<Region>> {
        let l = self.layout.read();
        let (_, r) = l.regions.range(..=gpa).next_back()?;
        r.contains(gpa).then(|| r.clone())
    }

    pub(crate) fn region_snapshot(&self) -> Vec<Arc<Region>> {
        self.layout.read().regions.values().cloned().collect()
    }

    /// What the host view maps at `gpa` now (`None`: a hole).
    pub fn translation(&self, gpa: u64) -> Option<Translation> {
        let r = self.region_of(gpa)?;
        let idx = ((gpa - r.gpa) >> PAGE_SHIFT) as usize;
        let e = r.view.pt.lock()[idx];
        decode(e)
    }

    /// Fault the page of `gpa` in through the primary and map it into the
    /// host view, then run `f` on its translation with the view's lock
    /// held, so no invalidation of the page can complete while `f` runs.
    /// A write fault marks the page dirty.
    ///
    /// # Pairing
    /// The interval protocol: `read_begin`, `fault_page`, lock,
    /// `read_retry` (retry on collision), map, run `f`, unlock.
    ///
    /// # Locking
    /// Takes `layout` for reading (briefly), then the view's `pt`. `f` must
    /// not call into the primary or the mirror.
    ///
    /// # Errors
    /// [`KvmError::Unmapped`] outside every region, [`KvmError::Fault`]
    /// when the primary fails, [`KvmError::ForeignPfn`], [`KvmError::Os`].
    pub fn with_page<R>(
        &self,
        gpa: u64,
        write: bool,
        f: impl FnOnce(Translation) -> R,
    ) -> Result<R, KvmError> {
        let r = self.region_of(gpa).ok_or(KvmError::Unmapped(gpa))?;
        let idx = ((gpa - r.gpa) >> PAGE_SHIFT) as usize;
        let addr = r.view.pbase + ((idx as u64) << PAGE_SHIFT);
        loop {
            let seq = r.sub.read_begin();
            let t = self.primary.fault_page(addr, write)?;
            let mut pt = r.view.pt.lock();
            if r.sub.read_retry(seq) {
                continue;
            }
            r.view.install(&mut pt, idx, t)?;
            if write {
                r.view.mark_dirty(idx);
            }
            return Ok(f(t));
        }
    }

    /// Fault the page of `gpa` in (for a write when `write`) and map it into
    /// the host view; the guest can then be re-entered.
    ///
    /// # Errors
    /// As [`Self::with_page`].
    pub fn handle_fault(&self, gpa: u64, write: bool) -> Result<Translation, KvmError> {
        self.with_page(gpa, write, |t| t)
    }

    /// Fault in every page of `[gpa, gpa + len)`.
    ///
    /// # Errors
    /// As [`Self::with_page`], plus [`KvmError::Range`].
    pub fn populate(&self, gpa: u64, len: u64, write: bool) -> Result<(), KvmError> {
        let range = PageRange::new(gpa, len)?;
        for page in range.iter_pages() {
            self.handle_fault(page, write)?;
        }
        Ok(())
    }

    /// Complete an emulated read the guest made at `gpa` (a `KVM_EXIT_MMIO`
    /// read): if `gpa` is in a region, fault its page(s) in and fill `data`
    /// from the current frame(s). Returns false (nothing done) when `gpa` is
    /// in no region (real MMIO for the VMM's devices).
    ///
    /// # Errors
    /// As [`Self::with_page`].
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> Result<bool, KvmError> {
        if self.region_of(gpa).is_none() {
            return Ok(false);
        }
        let mut done = 0;
        while done < data.len() {
            let a = gpa + done as u64;
            let n = (PAGE_SIZE - (a & PAGE_MASK)).min((data.len() - done) as u64) as usize;
            let off = (a & PAGE_MASK) as usize;
            self.with_page(a, false, |t| {
                self.frames.read(t.pfn, off, &mut data[done..done + n])
            })??;
            done += n;
        }
        Ok(true)
    }

    /// Complete an emulated write the guest made at `gpa` (a `KVM_EXIT_MMIO`
    /// write, also what a write to a read-only page becomes): fault the
    /// page(s) in for write (COW break in the primary) and store `data` in
    /// the frame(s) the primary maps now. Returns false when `gpa` is in no
    /// region.
    ///
    /// # Errors
    /// As [`Self::with_page`].
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) -> Result<bool, KvmError> {
        if self.region_of(gpa).is_none() {
            return Ok(false);
        }
        let mut done = 0;
        while done < data.len() {
            let a = gpa + done as u64;
            let n = (PAGE_SIZE - (a & PAGE_MASK)).min((data.len() - done) as u64) as usize;
            let off = (a & PAGE_MASK) as usize;
            self.with_page(a, true, |t| {
                self.frames.write(t.pfn, off, &data[done..done + n])
            })??;
            done += n;
        }
        Ok(true)
    }

    /// The dirty pages of the region at `gpa` since the last call: KVM's
    /// dirty log (when logging is on) merged with the pages the mirror saw
    /// written (write faults, emulated writes, VMM writes through a
    /// [`crate::DeviceView`]). Reading clears both.
    ///
    /// # Errors
    /// [`KvmError::NoRegion`], [`KvmError::Kvm`] when KVM_GET_DIRTY_LOG fails.
    pub fn dirty_log(&self, gpa: u64) -> Result<DirtyBitmap, KvmError> {
        let r = self
            .layout
            .read()
            .regions
            .get(&gpa)
            .ok_or(KvmError::NoRegion(gpa))?
            .clone();
        let pages = (r.view.len >> PAGE_SHIFT) as usize;
        let mut bits = {
            let s = r.slot.lock();
            if s.flags() & LOG_DIRTY_PAGES != 0 {
                s.dirty_log()
                    .map_err(|e| KvmError::kvm("KVM_GET_DIRTY_LOG", e))?
            } else {
                vec![0; pages.div_ceil(64)]
            }
        };
        for (w, d) in bits.iter_mut().zip(&r.view.dirty) {
            *w |= d.swap(0, Ordering::Relaxed);
        }
        Ok(DirtyBitmap::new(r.gpa, pages, bits))
    }

    /// The frame the primary maps at `gpa` now, without faulting.
    pub fn primary_frame(&self, gpa: u64) -> Option<Pfn> {
        let r = self.region_of(gpa)?;
        self.primary
            .lookup_page(r.view.pbase + ((gpa - r.gpa) & !PAGE_MASK))
            .map(|t| t.pfn)
    }
}
