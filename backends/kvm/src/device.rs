//! [`DeviceView`]: vm-memory's guest-memory traits over the mirror, for
//! device emulation (virtio queues, DMA models), through a translation
//! cache that follows the primary.
//!
//! # Which traits
//!
//! - [`DeviceView`] implements [`GuestMemory`] directly, the way an IOMMU
//!   view does (vm-memory 0.18): `get_slices` yields one slice per page,
//!   pointing into the memfd frame the primary maps *now*, and vm-memory's
//!   blanket impl gives it `Bytes<GuestAddress>` (`read_slice`,
//!   `write_obj`, `read_volatile_from`, atomics ...).
//! - [`DeviceRegions`] implements [`GuestMemoryBackend`] over
//!   [`DeviceRegion`]s, which implement [`GuestMemoryRegion`] and
//!   `Bytes<MemoryRegionAddress>`.
//!
//! # Coherence, and its limit
//!
//! The slice iterator holds the current region's cache read lock while the
//! caller works on the slice it yielded, and the cache's invalidate callback
//! takes that lock for writing: an invalidation of the page waits until the
//! caller asks for the next slice or drops the iterator, and only then can
//! the primary free the frame. Every `Bytes` method (the blanket one and
//! the region's) copies each slice before taking the next, so they never
//! touch a stale frame. A caller that keeps a `VolatileSlice` after the
//! iterator moved on or was dropped loses this guarantee: vm-memory's
//! slices cannot carry the lock. A miss drops the lock, faults the page in
//! through the primary (which may itself invalidate), and takes it again.
//!
//! A `DeviceView` is a snapshot of the mirror's layout (vm-memory's
//! `GuestMemoryBackend` is immutable), versioned: every region add, move,
//! resize or removal bumps the mirror's generation, and a view of an older
//! generation refuses every access (`InvalidGuestAddress`; the typed
//! [`KvmError::StaleView`] from [`DeviceView::translate`]) instead of
//! serving the bytes of a layout that is gone. Build a new one, as with
//! `GuestMemoryAtomic`.

use std::iter::FusedIterator;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier_core::addr::PAGE_MASK;
use notifier_core::notifier::IntervalSubscription;
use notifier_core::primary::{Primary, Translation};
use notifier_core::secondary::AccessCheck;
use notifier_core::{PAGE_SHIFT, PAGE_SIZE};
use parking_lot::RwLockReadGuard;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{Error as GmError, GuestMemorySliceIterator, Result as GmResult};
use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
    GuestUsize, MemoryRegionAddress, Permissions, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::cache::{CacheNotifier, TranslationCache};
use crate::host_view::HostView;
use crate::memfd::MemfdFrames;
use crate::{KvmError, KvmMirror};

fn gm_err(gpa: u64, e: KvmError) -> GmError {
    match e {
        KvmError::Fault(_) | KvmError::Unmapped(_) | KvmError::StaleView { .. } => {
            GmError::InvalidGuestAddress(GuestAddress(gpa))
        }
        other => GmError::IOError(std::io::Error::other(other)),
    }
}

/// One region of a [`DeviceView`].
pub struct DeviceRegion<P: Primary + ?Sized + 'static> {
    gpa: u64,
    primary: Arc<P>,
    frames: Arc<MemfdFrames>,
    cache: Arc<TranslationCache>,
    sub: IntervalSubscription<CacheNotifier>,
    /// The mirror's view of this region: VMM writes are marked dirty there.
    view: Arc<HostView>,
    /// The mirror's layout generation, and the one this view was built at.
    gen: Arc<AtomicU64>,
    built: u64,
}

impl<P: Primary + ?Sized + 'static> core::fmt::Debug for DeviceRegion<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceRegion")
            .field("gpa", &self.gpa)
            .field("len", &self.cache.len)
            .finish()
    }
}

/// A page translation with the cache's read lock held: the frame stays the
/// primary's until the guard is dropped.
pub struct PageGuard<'a> {
    _lock: RwLockReadGuard<'a, ()>,
    /// The translation.
    pub translation: Translation,
}

impl<P: Primary + ?Sized + 'static> DeviceRegion<P> {
    /// Translate the page at region offset `off`, filling the cache on a
    /// miss, and return it with the cache lock held for reading.
    ///
    /// # Locking
    /// Takes the cache's read lock (and on a miss, first the write lock
    /// inside the fill). Do not call into the primary while holding the
    /// guard: an invalidation would wait for it.
    ///
    /// # Errors
    /// The primary's fault.
    #[inline]
    pub fn translate(&self, off: u64, write: bool) -> Result<PageGuard<'_>, KvmError> {
        let idx = (off >> PAGE_SHIFT) as usize;
        self.check_current()?;
        loop {
            let l = self.cache.lock.read();
            if let Some(t) =
                TranslationCache::usable(self.cache.entries[idx].load(Ordering::Relaxed), write)
            {
                if let Some((c, device)) = &self.cache.check {
                    // Under the read lock: exact (see `AccessCheck`).
                    let addr = self.cache.pbase + ((idx as u64) << PAGE_SHIFT);
                    c.check_access(*device, addr, t.pfn, write);
                }
                return Ok(PageGuard {
                    _lock: l,
                    translation: t,
                });
            }
            drop(l);
            self.cache.fill(&self.sub, &*self.primary, idx, write)?;
        }
    }

    /// Refuse a view of an older layout of the mirror.
    #[inline]
    fn check_current(&self) -> Result<(), KvmError> {
        let cur = self.gen.load(Ordering::Acquire);
        if cur == self.built {
            Ok(())
        } else {
            Err(KvmError::StaleView {
                view: self.built,
                current: cur,
            })
        }
    }

    /// Optimistic lookup (no lock, no fault): the cached translation of the
    /// page at region offset `off` and the sequence to validate a read of
    /// its frame with [`Self::lookup_retry`]. `None` on a miss, and always
    /// `None` when the view has an access check (an optimistic read cannot
    /// be checked at the moment it happens).
    ///
    /// # Pairing
    /// `lookup`, read the frame, `lookup_retry`; discard what was read when
    /// it returns true. Never write through an optimistic translation: use
    /// [`Self::translate`].
    #[inline]
    pub fn lookup(&self, off: u64) -> Option<(Translation, u64)> {
        if self.cache.check.is_some() || self.check_current().is_err() {
            return None;
        }
        let g = self.cache.gen.load(Ordering::Acquire);
        let e = self
            .cache
            .entries
            .get((off >> PAGE_SHIFT) as usize)?
            .load(Ordering::Acquire);
        TranslationCache::usable(e, false).map(|t| (t, g))
    }

    /// Whether a read done under the optimistic translation from
    /// [`Self::lookup`] may have seen a frame being taken away.
    #[inline]
    pub fn lookup_retry(&self, seq: u64) -> bool {
        // The fence orders the caller's frame reads before the load; pairs
        // with the Release bump in the invalidate callback.
        std::sync::atomic::fence(Ordering::Acquire);
        self.cache.gen.load(Ordering::Relaxed) != seq
    }

    /// Run `f` on each page slice of `[off, off + len)` with the page's
    /// translation guarded; stops at the first error.
    fn for_each_slice(
        &self,
        off: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(usize, VolatileSlice<'_>) -> GmResult<()>,
    ) -> GmResult<()> {
        let mut done = 0usize;
        while done < len {
            let a = off + done as u64;
            let n = ((PAGE_SIZE - (a & PAGE_MASK)) as usize).min(len - done);
            let g = self
                .translate(a & !PAGE_MASK, write)
                .map_err(|e| gm_err(self.gpa + a, e))?;
            if write {
                self.view.mark_dirty((a >> PAGE_SHIFT) as usize);
            }
            let s = self
                .frames
                .slice(g.translation.pfn, (a & PAGE_MASK) as usize, n)
                .map_err(|_| GmError::InvalidBackendAddress)?;
            f(done, s)?;
            drop(g);
            done += n;
        }
        Ok(())
    }

    fn clip(&self, addr: MemoryRegionAddress, len: usize) -> GmResult<usize> {
        let a = addr.0;
        if a >= self.cache.len {
            return Err(GmError::InvalidBackendAddress);
        }
        Ok(len.min((self.cache.len - a) as usize))
    }

    /// Counters of this region's cache: (misses, retries, invalidations).
    pub fn cache_stats(&self) -> (u64, u64, u64) {
        let s = &self.cache.stats;
        let l = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
        (l(&s.misses), l(&s.retries), l(&s.invalidations))
    }
}

impl<P: Primary + ?Sized + 'static> GuestMemoryRegion for DeviceRegion<P> {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.cache.len
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.gpa)
    }

    fn bitmap(&self) -> BS<'_, ()> {}
}

fn partial(expected: usize, completed: usize) -> GmResult<()> {
    if expected == completed {
        Ok(())
    } else {
        Err(GmError::PartialBuffer {
            expected,
            completed,
        })
    }
}

impl<P: Primary + ?Sized + 'static> Bytes<MemoryRegionAddress> for DeviceRegion<P> {
    type E = GmError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> GmResult<usize> {
        let n = self.clip(addr, buf.len())?;
        self.for_each_slice(addr.0, n, true, |d, s| {
            s.copy_from(&buf[d..d + s.len()]);
            Ok(())
        })?;
        Ok(n)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GmResult<usize> {
        let n = self.clip(addr, buf.len())?;
        // One page: try the optimistic path first.
        if n > 0 && (addr.0 & PAGE_MASK) as usize + n <= PAGE_SIZE as usize {
            if let Some((t, seq)) = self.lookup(addr.0) {
                if let Ok(s) = self.frames.slice(t.pfn, (addr.0 & PAGE_MASK) as usize, n) {
                    s.copy_to(&mut buf[..n]);
                    if !self.lookup_retry(seq) {
                        return Ok(n);
                    }
                }
            }
        }
        self.for_each_slice(addr.0, n, false, |d, s| {
            s.copy_to(&mut buf[d..d + s.len()]);
            Ok(())
        })?;
        Ok(n)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> GmResult<()> {
        partial(buf.len(), Bytes::write(self, buf, addr)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GmResult<()> {
        let n = buf.len();
        partial(n, Bytes::read(self, buf, addr)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GmResult<usize> {
        let n = self.clip(addr, count)?;
        let mut total = 0;
        let mut eof = false;
        self.for_each_slice(addr.0, n, true, |_, mut s| {
            if eof {
                return Ok(());
            }
            let r = src.read_volatile(&mut s)?;
            total += r;
            eof = r < s.len();
            Ok(())
        })?;
        Ok(total)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GmResult<()> {
        partial(count, self.read_volatile_from(addr, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GmResult<usize> {
        let n = self.clip(addr, count)?;
        self.for_each_slice(addr.0, n, false, |_, s| Ok(dst.write_all_volatile(&s)?))?;
        Ok(n)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GmResult<()> {
        partial(count, self.write_volatile_to(addr, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> GmResult<()> {
        let n = size_of::<T>();
        if self.clip(addr, n)? != n || (addr.0 & PAGE_MASK) as usize + n > PAGE_SIZE as usize {
            return Err(GmError::InvalidBackendAddress);
        }
        let mut val = Some(val);
        self.for_each_slice(addr.0, n, true, |_, s| {
            Ok(s.store(val.take().expect("one page"), 0, order)?)
        })
    }

    fn load<T: AtomicAccess>(&self, addr: MemoryRegionAddress, order: Ordering) -> GmResult<T> {
        let n = size_of::<T>();
        if self.clip(addr, n)? != n || (addr.0 & PAGE_MASK) as usize + n > PAGE_SIZE as usize {
            return Err(GmError::InvalidBackendAddress);
        }
        let mut out = None;
        self.for_each_slice(addr.0, n, false, |_, s| {
            out = Some(s.load(0, order)?);
            Ok(())
        })?;
        out.ok_or(GmError::InvalidBackendAddress)
    }
}

/// The regions of a [`DeviceView`], sorted by guest-physical address.
pub struct DeviceRegions<P: Primary + ?Sized + 'static>(Vec<DeviceRegion<P>>);

impl<P: Primary + ?Sized + 'static> core::fmt::Debug for DeviceRegions<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl<P: Primary + ?Sized + 'static> GuestMemoryBackend for DeviceRegions<P> {
    type R = DeviceRegion<P>;

    fn num_regions(&self) -> usize {
        self.0.len()
    }

    #[inline]
    fn find_region(&self, addr: GuestAddress) -> Option<&DeviceRegion<P>> {
        let i = self.0.partition_point(|r| r.gpa <= addr.0).checked_sub(1)?;
        let r = &self.0[i];
        (addr.0 - r.gpa < r.cache.len).then_some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &DeviceRegion<P>> {
        self.0.iter()
    }
}

/// Device emulation's view of guest memory: vm-memory's [`GuestMemory`]
/// over the mirror's regions, coherent with the primary.
#[derive(Debug)]
pub struct DeviceView<P: Primary + ?Sized + 'static> {
    regions: DeviceRegions<P>,
}

impl<P: Primary + ?Sized + 'static> DeviceView<P> {
    /// A view of the mirror's current regions, each with its own
    /// translation cache subscribed to the primary.
    ///
    /// # Errors
    /// [`KvmError::Notifier`] when the primary was released.
    pub fn new(mirror: &KvmMirror<P>) -> Result<Self, KvmError> {
        Self::build(mirror, None)
    }

    /// As [`Self::new`], with every access checked: `check.check_access`
    /// runs (as `device`, with the primary address of the page) under the
    /// page's cache lock right before the frame is touched, so a coherence
    /// oracle's answer is exact; fills and invalidations are reported too.
    /// The optimistic read path is off in such a view.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_access_check(
        mirror: &KvmMirror<P>,
        check: Arc<dyn AccessCheck>,
        device: usize,
    ) -> Result<Self, KvmError> {
        Self::build(mirror, Some((check, device)))
    }

    fn build(
        mirror: &KvmMirror<P>,
        check: Option<(Arc<dyn AccessCheck>, usize)>,
    ) -> Result<Self, KvmError> {
        let mut regions = Vec::new();
        // Read before the snapshot: a change in between makes the view
        // stale at once rather than current with an old layout.
        let built = mirror.gen.load(Ordering::Acquire);
        for r in mirror.region_snapshot() {
            let cache = Arc::new(TranslationCache::new(
                r.view.pbase,
                r.view.len,
                check.clone(),
            ));
            let sub = mirror.primary().notifiers().interval_subscribe(
                r.view.pbase,
                r.view.len,
                CacheNotifier(cache.clone()),
            )?;
            regions.push(DeviceRegion {
                gpa: r.gpa,
                primary: mirror.primary().clone(),
                frames: mirror.frames().clone(),
                cache,
                sub,
                view: r.view.clone(),
                gen: mirror.gen.clone(),
                built,
            });
        }
        Ok(Self {
            regions: DeviceRegions(regions),
        })
    }

    /// Whether the view's layout is still the mirror's current one.
    pub fn is_current(&self) -> bool {
        self.regions
            .0
            .first()
            .is_none_or(|r| r.check_current().is_ok())
    }

    /// The regions.
    pub fn regions(&self) -> &DeviceRegions<P> {
        &self.regions
    }

    /// The region holding `gpa`.
    #[inline]
    pub fn region(&self, gpa: u64) -> Option<&DeviceRegion<P>> {
        self.regions.find_region(GuestAddress(gpa))
    }

    /// Optimistic lookup of `gpa` (see [`DeviceRegion::lookup`]): the
    /// cached translation and the sequence to validate a read with
    /// [`DeviceRegion::lookup_retry`] on the same region.
    #[inline]
    pub fn lookup(&self, gpa: u64) -> Option<(Translation, u64)> {
        let r = self.region(gpa)?;
        r.lookup(gpa - r.gpa)
    }

    /// Translate the page of `gpa` (filling the cache on a miss) and return
    /// it guarded: the frame stays the primary's until the guard drops.
    ///
    /// # Errors
    /// [`KvmError::Unmapped`], the primary's fault.
    #[inline]
    pub fn translate(&self, gpa: u64, write: bool) -> Result<PageGuard<'_>, KvmError> {
        let r = self
            .regions
            .find_region(GuestAddress(gpa))
            .ok_or(KvmError::Unmapped(gpa))?;
        r.translate(gpa - r.gpa, write)
    }
}

/// The slices of a [`DeviceView`] access, one per page, each guarded until
/// the next call to `next` (see the module docs).
pub struct DeviceSlices<'a, P: Primary + ?Sized + 'static> {
    view: &'a DeviceView<P>,
    addr: u64,
    count: usize,
    write: bool,
    guard: Option<PageGuard<'a>>,
}

impl<'a, P: Primary + ?Sized + 'static> Iterator for DeviceSlices<'a, P> {
    type Item = GmResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        // The previous slice's protection ends here.
        self.guard = None;
        if self.count == 0 {
            return None;
        }
        let a = self.addr;
        let Some(r) = self.view.regions.find_region(GuestAddress(a)) else {
            self.count = 0;
            return Some(Err(GmError::InvalidGuestAddress(GuestAddress(a))));
        };
        let off = a - r.gpa;
        let n = ((PAGE_SIZE - (a & PAGE_MASK)) as usize).min(self.count);
        let g = match r.translate(off & !PAGE_MASK, self.write) {
            Ok(g) => g,
            Err(e) => {
                self.count = 0;
                return Some(Err(gm_err(a, e)));
            }
        };
        if self.write {
            r.view.mark_dirty((off >> PAGE_SHIFT) as usize);
        }
        let s = match r
            .frames
            .slice(g.translation.pfn, (a & PAGE_MASK) as usize, n)
        {
            Ok(s) => s,
            Err(_) => {
                self.count = 0;
                return Some(Err(GmError::InvalidBackendAddress));
            }
        };
        self.guard = Some(g);
        self.addr += n as u64;
        self.count -= n;
        Some(Ok(s))
    }
}

impl<P: Primary + ?Sized + 'static> FusedIterator for DeviceSlices<'_, P> {}
impl<'a, P: Primary + ?Sized + 'static> GuestMemorySliceIterator<'a, ()> for DeviceSlices<'a, P> {}

impl<P: Primary + ?Sized + 'static> GuestMemory for DeviceView<P> {
    type PhysicalMemory = DeviceRegions<P>;
    type Bitmap = ();

    /// Whether regions cover the range. Whether the primary will grant the
    /// access is only known when a page is faulted in.
    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        let mut a = addr.0;
        let Some(end) = a.checked_add(count as u64) else {
            return false;
        };
        while a < end {
            let Some(r) = self.regions.find_region(GuestAddress(a)) else {
                return false;
            };
            a = (r.gpa + r.cache.len).min(end);
        }
        true
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GmResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        Ok(DeviceSlices {
            view: self,
            addr: addr.0,
            count,
            write: access.has_write(),
            guard: None,
        })
    }
}
