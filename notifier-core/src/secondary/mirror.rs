//! A generic mirror: an interval subscription, an external page table,
//! per-device TLBs, and the fault-in loop of the sequence protocol (the
//! shape of `hmm_range_fault` users, KVM's EPT and an ODP NIC's MTT).
//!
//! # Locking
//!
//! * `lock` (the "driver lock"), a reader-writer lock, as KVM's `mmu_lock`
//!   is for its TDP MMU: the invalidate callback takes it for writing
//!   (`set_seq`, then clearing the external table); a 4 KiB fault-in takes
//!   it for reading (`read_retry`, then writing its one entry), so faults
//!   on different pages, from different devices, proceed in parallel and
//!   never wait for each other, only for an invalidation. `read_retry`
//!   under the read lock is exact: `set_seq` runs under the write lock, so
//!   it happened entirely before the read section (the retry sees it) or
//!   entirely after (the invalidation clears what the fault wrote). Two
//!   faults of one page may both pass `read_retry` with the same sequence;
//!   both translations are then current, and the later write wins. A huge
//!   (2 MiB) fault-in, which replaces 512 entries, takes the lock for
//!   writing.
//! * one lock per device: held for the whole of an access (TLB lookup,
//!   table walk on a miss, the check, the memory operation). The
//!   invalidate callback takes each device's lock in turn to flush its TLB
//!   (the shootdown IPI), so when the callback returns no device is in the
//!   middle of an access with a translation of the range.
//!
//! Order: `lock` → device lock. An access never takes `lock` while holding
//! its device lock: on a miss it drops the device lock, faults in, and
//! retries. So a device's access path (TLB hit, table walk) takes only its
//! own device lock, which no other device takes; the table walk is
//! lock-free.
//!
//! # The access path
//!
//! ```text
//!   device lock
//!     TLB hit? ─no─> external table hit? ─no─> unlock; fault_in; retry
//!        │                 │ fill TLB
//!        v                 v
//!     permission ok? ─no─> unlock; fault_in(write); retry
//!        │
//!     check hook (the coherence oracle, when installed)
//!     the memory operation on the frame
//!   unlock
//! ```

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::ept::{ExternalPageTable, HUGE_PAGES, HUGE_SIZE};
use super::ext_addr::{ExternalAddress, Perm};
use super::tlb::{FlushBatch, Tlb, TlbConfig, TlbStats};
use crate::frame::{FrameStore, Pfn};
use crate::notifier::{
    Again, Event, Hooks, IntervalNotifier, IntervalNotifierOps, IntervalSubscription,
    InvalidateRange, MmuNotifier, MmuNotifierOps, NotifierError,
};
use crate::primary::{Primary, PrimaryFault, Translation};
use crate::PAGE_SIZE;

/// How a mirror is laid out.
#[derive(Clone, Copy, Debug)]
pub struct MirrorConfig {
    /// First byte of the primary range mirrored (page aligned).
    pub start: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// External address of `start`.
    pub ext_base: u64,
    /// Number of devices (each with its own TLB).
    pub devices: usize,
    /// TLB geometry of each device.
    pub tlb: TlbConfig,
    /// Spans collected before an invalidation flushes TLBs early.
    pub flush_batch: usize,
    /// When device TLBs are flushed.
    pub flush: FlushPolicy,
}

/// When an invalidation flushes the devices' TLBs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FlushPolicy {
    /// In the invalidate callback, before the primary changes any PTE
    /// (what ODP and HMM mirrors do): a device never sees a translation
    /// the primary has already changed.
    #[default]
    InCallback,
    /// The external table is cleared in the callback (no new TLB fills),
    /// but device TLBs are flushed only at the bracket's end, in one batch
    /// (what an IOMMU that batches invalidations does). Devices may use a
    /// stale translation until the end, which is safe only because the
    /// primary frees no frame before the end; check such mirrors with the
    /// oracle's liveness mode.
    AtEnd,
}

impl MirrorConfig {
    /// Mirror `[start, start + len)` 1:1 (external = primary address), one
    /// device, default TLB.
    pub fn identity(start: u64, len: u64) -> Self {
        Self {
            start,
            len,
            ext_base: start,
            devices: 1,
            tlb: TlbConfig::default(),
            flush_batch: 64,
            flush: FlushPolicy::InCallback,
        }
    }
}

/// How `fault_in` obtains a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Fault the page in the primary if needed (ODP `PREFETCH`, a device
    /// page fault).
    Fault,
    /// Map only pages already present in the primary (ODP
    /// `PREFETCH_NO_FAULT`).
    Snapshot,
}

/// An error of a mirror operation.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// The address is outside the mirrored range.
    #[error("address {0:#x} outside the mirrored range")]
    OutOfRange(u64),
    /// No such device.
    #[error("no device {0}")]
    NoDevice(usize),
    /// The primary could not provide the page.
    #[error("primary fault")]
    Primary(
        #[from]
        #[source]
        PrimaryFault,
    ),
    /// Subscribing to the primary failed.
    #[error("subscribing to the primary failed")]
    Notifier(
        #[from]
        #[source]
        NotifierError,
    ),
    /// The frame access failed.
    #[error("frame access failed")]
    Frame(
        #[from]
        #[source]
        crate::frame::FrameError,
    ),
}

/// A hook called at the moment of every device access, under the device
/// lock, and at fills and invalidations: how the coherence oracle plugs in.
pub trait AccessCheck: Send + Sync {
    /// A device is about to touch `pfn` as the page at primary address
    /// `addr`.
    fn check_access(&self, device: usize, addr: u64, pfn: Pfn, write: bool);
    /// A mirror's invalidate callback starts working on `[start, end)`.
    fn on_invalidate_begin(&self, start: u64, end: u64, event: Event) {
        let _ = (start, end, event);
    }
    /// The mirror wrote an external entry for `addr`.
    fn on_fill(&self, addr: u64, pfn: Pfn, writable: bool) {
        let _ = (addr, pfn, writable);
    }
    /// The mirror's invalidate callback finished `[start, end)` (clipped),
    /// its TLB shootdowns done (or queued, with [`FlushPolicy::AtEnd`]).
    fn on_invalidate(&self, start: u64, end: u64, event: Event) {
        let _ = (start, end, event);
    }
}

/// Switches that deliberately break the protocol, so tests can show the
/// coherence oracle fails when it should. All off by default; each costs
/// one relaxed load where it applies.
#[derive(Debug, Default)]
pub struct MirrorInject {
    /// Skip the invalidate callback entirely for this event (`Event` index
    /// + 1; 0 = off).
    skip_event: AtomicU8,
    /// Accept a fault-in without `read_retry`.
    skip_read_retry: AtomicU8,
    /// Clear the external table in the callback but flush device TLBs only
    /// later (at each device's next miss): after the end, when the primary
    /// may already have freed the frame.
    flush_after_end: AtomicU8,
    /// Busy-wait this many spins between asking the primary and taking the
    /// mirror lock in `fault_in`: widens the window `read_retry` guards, so
    /// races that need a slow device fault path happen in short runs.
    fault_delay: std::sync::atomic::AtomicU32,
}

impl MirrorInject {
    /// Skip the invalidate callback for `event` (or stop skipping: `None`).
    pub fn set_skip_event(&self, event: Option<Event>) {
        let v = event.map_or(0, |e| {
            Event::ALL.iter().position(|x| *x == e).unwrap_or(0) as u8 + 1
        });
        self.skip_event.store(v, Ordering::Relaxed);
    }
    /// Accept fault-ins without `read_retry`.
    pub fn set_skip_read_retry(&self, on: bool) {
        self.skip_read_retry.store(on as u8, Ordering::Relaxed);
    }
    /// Defer TLB flushes to after the invalidation.
    pub fn set_flush_after_end(&self, on: bool) {
        self.flush_after_end.store(on as u8, Ordering::Relaxed);
    }
    /// Widen the fault-in window by `spins` busy-wait iterations (0: off).
    pub fn set_fault_delay(&self, spins: u32) {
        self.fault_delay.store(spins, Ordering::Relaxed);
    }
    #[inline]
    fn skips(&self, event: Event) -> bool {
        let v = self.skip_event.load(Ordering::Relaxed);
        v != 0 && Event::ALL[v as usize - 1] == event
    }
}

/// Counters of a mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Accesses completed.
    pub accesses: u64,
    /// Fault-ins completed (fills of the external table).
    pub faults: u64,
    /// Fault-ins that collided with an invalidation and retried.
    pub retries: u64,
    /// Invalidate callbacks that removed or downgraded something or not.
    pub invalidations: u64,
    /// Pages removed or downgraded by invalidations.
    pub invalidated_pages: u64,
    /// TLB counters summed over devices.
    pub tlb: TlbStats,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    retries: AtomicU64,
    invalidations: AtomicU64,
    invalidated_pages: AtomicU64,
}

struct Device {
    tlb: Tlb,
    /// Flushes deferred by the `flush_after_end` injection.
    deferred: Vec<(u64, u64)>,
    accesses: u64,
}

/// The part shared by the mirror handle and its invalidate callback.
pub struct MirrorShared<A: ExternalAddress> {
    cfg: MirrorConfig,
    lock: RwLock<()>,
    ept: ExternalPageTable<A>,
    devices: Box<[crossbeam_utils::CachePadded<Mutex<Device>>]>,
    counters: Counters,
    inject: MirrorInject,
    check: Option<Arc<dyn AccessCheck>>,
    /// Spans waiting for the bracket's end ([`FlushPolicy::AtEnd`]).
    at_end: Mutex<Vec<(u64, u64)>>,
}

impl<A: ExternalAddress> MirrorShared<A> {
    #[inline]
    fn ext(&self, addr: u64) -> u64 {
        addr - self.cfg.start + self.cfg.ext_base
    }

    /// Flush `spans` (external addresses) from every device's TLB, taking
    /// each device's lock: when this returns no device is mid-access with
    /// one of these translations.
    fn shootdown(&self, spans: &[(u64, u64)]) {
        if self.cfg.flush == FlushPolicy::AtEnd {
            self.at_end.lock().extend_from_slice(spans);
            return;
        }
        self.flush_devices(spans);
    }

    fn flush_devices(&self, spans: &[(u64, u64)]) {
        let defer = self.inject.flush_after_end.load(Ordering::Relaxed) != 0;
        for d in self.devices.iter() {
            let mut d = d.lock();
            for &(s, e) in spans {
                if defer {
                    d.deferred.push((s, e));
                } else {
                    d.tlb.flush_range(s, e);
                }
            }
        }
    }
}

impl<A: ExternalAddress> IntervalNotifierOps for MirrorShared<A> {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        range: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        if self.inject.skips(range.event()) {
            return Ok(());
        }
        let _g = if range.blockable() {
            self.lock.write()
        } else {
            self.lock.try_write().ok_or(Again)?
        };
        sub.set_seq(cur_seq);
        let start = range.start().max(self.cfg.start);
        let end = range.end().min(self.cfg.start + self.cfg.len);
        if start >= end {
            return Ok(());
        }
        if let Some(c) = &self.check {
            c.on_invalidate_begin(start, end, range.event());
        }
        let mut batch = FlushBatch::new(self.cfg.flush_batch);
        let n = self.ept.unmap_range(
            A::from_raw(self.ext(start)),
            A::from_raw(self.ext(end)),
            range.event().keeps_readable(),
            |a, len| batch.add(a, len, |p| self.shootdown(p)),
        );
        batch.finish(|p| self.shootdown(p));
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        self.counters
            .invalidated_pages
            .fetch_add(n, Ordering::Relaxed);
        if let Some(c) = &self.check {
            c.on_invalidate(start, end, range.event());
        }
        Ok(())
    }
}

/// The range subscriber of a [`FlushPolicy::AtEnd`] mirror: flushes the
/// queued spans at every bracket's end, before the primary frees frames.
struct EndFlusher<A: ExternalAddress>(std::sync::Weak<IntervalSubscriptionHolder<A>>);

/// Shared ownership of the subscription so the end hook can reach it.
struct IntervalSubscriptionHolder<A: ExternalAddress>(IntervalSubscription<MirrorShared<A>>);

impl<A: ExternalAddress> MmuNotifierOps for EndFlusher<A> {
    fn hooks(&self) -> Hooks {
        Hooks::END
    }
    fn invalidate_range_end(&self, _range: &InvalidateRange) {
        if let Some(h) = self.0.upgrade() {
            let sh = h.0.ops();
            let spans = core::mem::take(&mut *sh.at_end.lock());
            if !spans.is_empty() {
                sh.flush_devices(&spans);
            }
        }
    }
}

/// A secondary MMU mirroring a range of a primary.
pub struct Mirror<P: Primary + ?Sized, A: ExternalAddress> {
    primary: Arc<P>,
    sub: Arc<IntervalSubscriptionHolder<A>>,
    end_hook: Option<MmuNotifier>,
}

impl<P: Primary + ?Sized, A: ExternalAddress> core::fmt::Debug for Mirror<P, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mirror")
            .field("cfg", &self.sub.0.ops().cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<P: Primary + ?Sized, A: ExternalAddress> Mirror<P, A> {
    /// Subscribe a new mirror of `cfg`'s range to `primary`. `check` is the
    /// access hook (the coherence oracle) or `None`.
    ///
    /// # Errors
    /// [`MirrorError::Notifier`] for a bad range or a released primary;
    /// [`MirrorError::OutOfRange`] when `ext_base + len` passes the 48-bit
    /// external space.
    pub fn new(
        primary: Arc<P>,
        cfg: MirrorConfig,
        check: Option<Arc<dyn AccessCheck>>,
    ) -> Result<Self, MirrorError> {
        if !super::ext_addr::ext_span_fits(cfg.ext_base, cfg.len) {
            return Err(MirrorError::OutOfRange(cfg.ext_base));
        }
        let devices = (0..cfg.devices.max(1))
            .map(|_| {
                crossbeam_utils::CachePadded::new(Mutex::new(Device {
                    tlb: Tlb::new(cfg.tlb),
                    deferred: Vec::new(),
                    accesses: 0,
                }))
            })
            .collect();
        let shared = MirrorShared {
            cfg,
            lock: RwLock::new(()),
            ept: ExternalPageTable::new(),
            devices,
            counters: Counters::default(),
            inject: MirrorInject::default(),
            check,
            at_end: Mutex::new(Vec::new()),
        };
        let sub = primary
            .notifiers()
            .interval_subscribe(cfg.start, cfg.len, shared)?;
        let sub = Arc::new(IntervalSubscriptionHolder(sub));
        let end_hook = match cfg.flush {
            FlushPolicy::InCallback => None,
            FlushPolicy::AtEnd => {
                let flusher = Arc::new(EndFlusher(Arc::downgrade(&sub)));
                Some(primary.notifiers().register(flusher)?)
            }
        };
        Ok(Self {
            primary,
            sub,
            end_hook,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MirrorConfig {
        &self.sub.0.ops().cfg
    }

    /// The fault-injection switches.
    pub fn inject(&self) -> &MirrorInject {
        &self.sub.0.ops().inject
    }

    /// The external page table (read-only view).
    pub fn ept(&self) -> &ExternalPageTable<A> {
        &self.sub.0.ops().ept
    }

    /// The primary.
    pub fn primary(&self) -> &Arc<P> {
        &self.primary
    }

    /// The interval subscription.
    pub fn subscription(&self) -> &IntervalNotifier {
        &self.sub.0
    }

    #[inline]
    fn check_addr(&self, addr: u64) -> Result<u64, MirrorError> {
        let c = &self.sub.0.ops().cfg;
        if addr < c.start || addr - c.start >= c.len {
            return Err(MirrorError::OutOfRange(addr));
        }
        Ok(addr & !(PAGE_SIZE - 1))
    }

    /// Make the page at `addr` present in the external table (the sequence
    /// protocol: `read_begin`, ask the primary, take the lock,
    /// `read_retry`, write the entry). Returns the translation written.
    ///
    /// # Locking
    /// Takes the mirror lock for reading (concurrent fault-ins proceed in
    /// parallel); may sleep in `read_begin` and in the primary's fault path.
    /// Must not be called with a device lock held.
    pub fn fault_in(
        &self,
        addr: u64,
        write: bool,
        mode: FaultMode,
    ) -> Result<Translation, MirrorError> {
        let page = self.check_addr(addr)?;
        let sh = self.sub.0.ops();
        loop {
            let seq = self.sub.0.read_begin();
            let t = match mode {
                FaultMode::Fault => self.primary.fault_page(page, write)?,
                FaultMode::Snapshot => self
                    .primary
                    .lookup_page(page)
                    .ok_or(PrimaryFault::NotPresent(page))?,
            };
            let spins = sh.inject.fault_delay.load(Ordering::Relaxed);
            for _ in 0..spins {
                core::hint::spin_loop();
            }
            let g = sh.lock.read();
            // Detached (or failed) meanwhile: no invalidation would ever
            // remove what this fill installs. `detach` unsubscribes before
            // it takes the lock to clear, so a fill under the lock sees it.
            if !self.sub.0.is_live() {
                return Err(MirrorError::Notifier(NotifierError::NotSubscribed));
            }
            if sh.inject.skip_read_retry.load(Ordering::Relaxed) == 0 && self.sub.0.read_retry(seq)
            {
                drop(g);
                sh.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Tell the checker before the entry becomes visible to devices.
            if let Some(c) = &sh.check {
                c.on_fill(page, t.pfn, t.writable);
            }
            let perm = Perm::from_writable(t.writable);
            sh.ept
                .map(A::from_raw(sh.ext(page)), t.pfn, perm)
                .map_err(|_| MirrorError::OutOfRange(page))?;
            drop(g);
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(t);
        }
    }

    /// Fault in every page of `[start, start + len)` (clipped to the
    /// mirror). With `Snapshot`, pages not present are skipped. Returns the
    /// number of pages mapped.
    pub fn prefetch(
        &self,
        start: u64,
        len: u64,
        write: bool,
        mode: FaultMode,
    ) -> Result<u64, MirrorError> {
        let sh = self.sub.0.ops();
        let mut n = 0;
        let mut a = start & !(PAGE_SIZE - 1);
        let end = start.saturating_add(len).min(sh.cfg.start + sh.cfg.len);
        while a < end {
            // A whole 2 MiB block, aligned in both spaces: try one huge entry.
            if a % HUGE_SIZE == 0 && sh.ext(a) % HUGE_SIZE == 0 && end - a >= HUGE_SIZE {
                if let Some(k) = self.fault_in_huge(a, write, mode)? {
                    n += k;
                    a += HUGE_SIZE;
                    continue;
                }
            }
            match self.fault_in(a, write, mode) {
                Ok(_) => n += 1,
                Err(MirrorError::Primary(PrimaryFault::NotPresent(_)))
                    if mode == FaultMode::Snapshot => {}
                Err(e) => return Err(e),
            }
            a += PAGE_SIZE;
        }
        Ok(n)
    }

    /// Fault in the 2 MiB block at `addr` as one unit (`hmm_range_fault`
    /// over a block): one `read_begin`, every page from the primary, then
    /// under the lock one `read_retry`; if the primary backs the block with
    /// 512 contiguous frames, aligned, with one permission, write a single
    /// 2 MiB entry. Returns `None` (nothing written) when the block is not
    /// backed that way, so the caller maps it page by page.
    fn fault_in_huge(
        &self,
        addr: u64,
        write: bool,
        mode: FaultMode,
    ) -> Result<Option<u64>, MirrorError> {
        let sh = self.sub.0.ops();
        loop {
            let seq = self.sub.0.read_begin();
            let mut first: Option<Translation> = None;
            for i in 0..HUGE_PAGES {
                let page = addr + i * PAGE_SIZE;
                let t = match mode {
                    FaultMode::Fault => self.primary.fault_page(page, write)?,
                    FaultMode::Snapshot => match self.primary.lookup_page(page) {
                        Some(t) => t,
                        None => return Ok(None),
                    },
                };
                match first {
                    None if t.pfn.0 % HUGE_PAGES == 0 => first = Some(t),
                    Some(f) if t.pfn.0 == f.pfn.0 + i && t.writable == f.writable => {}
                    _ => return Ok(None),
                }
            }
            let Some(t) = first else { return Ok(None) };
            // Exclusive: the huge entry replaces 512 entries that 4 KiB
            // fault-ins (under the read lock) could be writing.
            let g = sh.lock.write();
            if !self.sub.0.is_live() {
                return Err(MirrorError::Notifier(NotifierError::NotSubscribed));
            }
            if sh.inject.skip_read_retry.load(Ordering::Relaxed) == 0 && self.sub.0.read_retry(seq)
            {
                drop(g);
                sh.counters.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(c) = &sh.check {
                for i in 0..HUGE_PAGES {
                    c.on_fill(addr + i * PAGE_SIZE, Pfn(t.pfn.0 + i), t.writable);
                }
            }
            let perm = Perm::from_writable(t.writable);
            sh.ept
                .map_huge(A::from_raw(sh.ext(addr)), t.pfn, perm)
                .map_err(|_| MirrorError::OutOfRange(addr))?;
            drop(g);
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(HUGE_PAGES));
        }
    }

    /// A device access to the page of `addr`: translate (TLB, then external
    /// table, then fault in), check, and run `op` on the frame while the
    /// device lock is held, so no invalidation of that page can complete
    /// during the operation.
    ///
    /// # Locking
    /// Takes device `dev`'s lock around the operation, and the mirror lock
    /// on a miss (after dropping the device lock).
    pub fn access<R>(
        &self,
        dev: usize,
        addr: u64,
        write: bool,
        op: impl FnOnce(&dyn FrameStore, Pfn) -> R,
    ) -> Result<R, MirrorError> {
        let page = self.check_addr(addr)?;
        let sh = self.sub.0.ops();
        let dev_lock = sh.devices.get(dev).ok_or(MirrorError::NoDevice(dev))?;
        let ext = sh.ext(page);
        let mut op = Some(op);
        loop {
            {
                let mut d = dev_lock.lock();
                let hit = match d.tlb.lookup(ext) {
                    Some(e) => Some((e.pfn, e.perm)),
                    None => {
                        if !d.deferred.is_empty() {
                            // The injected late flushes land now, after the end.
                            let deferred = core::mem::take(&mut d.deferred);
                            for (s, e) in deferred {
                                d.tlb.flush_range(s, e);
                            }
                        }
                        sh.ept.lookup(A::from_raw(ext)).map(|e| {
                            d.tlb.fill(ext, e.pfn, e.perm);
                            (e.pfn, e.perm)
                        })
                    }
                };
                if let Some((pfn, perm)) = hit {
                    if perm.allows(write) {
                        if let Some(c) = &sh.check {
                            c.check_access(dev, page, pfn, write);
                        }
                        d.accesses += 1;
                        let op = op.take().expect("op runs once");
                        return Ok(op(self.primary.frames(), pfn));
                    }
                    // A read-only entry and a write: drop it from this
                    // TLB so the upgraded entry is walked after the fault.
                    d.tlb.flush_page(ext);
                }
            }
            self.fault_in(page, write, FaultMode::Fault)?;
        }
    }

    /// Read the 64-bit word at `addr` (8-aligned) through device `dev`.
    pub fn read_u64(&self, dev: usize, addr: u64) -> Result<u64, MirrorError> {
        let off = (addr & (PAGE_SIZE - 1)) as usize & !7;
        self.access(dev, addr, false, |f, pfn| f.load(pfn, off))?
            .map_err(MirrorError::from)
    }

    /// Write the 64-bit word at `addr` (8-aligned) through device `dev`.
    pub fn write_u64(&self, dev: usize, addr: u64, val: u64) -> Result<(), MirrorError> {
        let off = (addr & (PAGE_SIZE - 1)) as usize & !7;
        self.access(dev, addr, true, |f, pfn| f.store(pfn, off, val))?
            .map_err(MirrorError::from)
    }

    /// A device access that does not fault: like [`Self::access`] when the
    /// TLB or the external table has a translation with the permission,
    /// `Ok(None)` otherwise. Safe to call where faulting in the primary is
    /// not (from inside a notifier callback, for instance).
    ///
    /// # Locking
    /// Takes device `dev`'s lock only.
    pub fn try_access<R>(
        &self,
        dev: usize,
        addr: u64,
        write: bool,
        op: impl FnOnce(&dyn FrameStore, Pfn) -> R,
    ) -> Result<Option<R>, MirrorError> {
        let page = self.check_addr(addr)?;
        let sh = self.sub.0.ops();
        let dev_lock = sh.devices.get(dev).ok_or(MirrorError::NoDevice(dev))?;
        let ext = sh.ext(page);
        let mut d = dev_lock.lock();
        let hit = match d.tlb.lookup(ext) {
            Some(e) => Some((e.pfn, e.perm)),
            None => sh.ept.lookup(A::from_raw(ext)).map(|e| {
                d.tlb.fill(ext, e.pfn, e.perm);
                (e.pfn, e.perm)
            }),
        };
        match hit {
            Some((pfn, perm)) if perm.allows(write) => {
                if let Some(c) = &sh.check {
                    c.check_access(dev, page, pfn, write);
                }
                d.accesses += 1;
                Ok(Some(op(self.primary.frames(), pfn)))
            }
            _ => Ok(None),
        }
    }

    /// Translate `addr` through device `dev`'s TLB and the external table
    /// only (no fault, no check): what a device's address-translation unit
    /// does before it decides to fault.
    pub fn translate(&self, dev: usize, addr: u64) -> Option<(Pfn, Perm)> {
        let page = self.check_addr(addr).ok()?;
        let sh = self.sub.0.ops();
        let ext = sh.ext(page);
        let mut d = sh.devices.get(dev)?.lock();
        if let Some(e) = d.tlb.lookup(ext) {
            return Some((e.pfn, e.perm));
        }
        let e = sh.ept.lookup(A::from_raw(ext))?;
        d.tlb.fill(ext, e.pfn, e.perm);
        Some((e.pfn, e.perm))
    }

    /// Counters, with TLB counters summed over devices.
    pub fn stats(&self) -> MirrorStats {
        let sh = self.sub.0.ops();
        let mut tlb = TlbStats::default();
        let mut accesses = 0;
        for d in sh.devices.iter() {
            let d = d.lock();
            tlb.add(&d.tlb.stats());
            accesses += d.accesses;
        }
        let c = &sh.counters;
        MirrorStats {
            accesses,
            faults: c.faults.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            invalidations: c.invalidations.load(Ordering::Relaxed),
            invalidated_pages: c.invalidated_pages.load(Ordering::Relaxed),
            tlb,
        }
    }

    /// Stop mirroring: unsubscribe, then drop every translation (external
    /// table, device TLBs, queued flushes), since no invalidation reaches
    /// them any more. Afterwards the mirror's callbacks never run again.
    ///
    /// # Errors
    /// [`MirrorError::Notifier`] if already detached.
    pub fn detach(&self) -> Result<(), MirrorError> {
        self.sub.0.unsubscribe()?;
        let unhooked = self
            .end_hook
            .as_ref()
            .map_or(Ok(()), MmuNotifier::unregister);
        let sh = self.sub.0.ops();
        let (s, e) = (sh.ext(sh.cfg.start), sh.ext(sh.cfg.start) + sh.cfg.len);
        let _g = sh.lock.write();
        sh.ept
            .unmap_range(A::from_raw(s), A::from_raw(e), false, |_, _| {});
        sh.at_end.lock().clear();
        for d in sh.devices.iter() {
            let mut d = d.lock();
            d.deferred.clear();
            d.tlb.flush_all();
        }
        Ok(unhooked?)
    }
}
