//! `SoftNic`: an in-process NIC model with its own translation tables.
//!
//! Every DMA names a key and a virtual address, as a verbs work request
//! does. The NIC resolves the key in its key table, checks the rights and
//! the bounds, and touches each page through the region's MTT while
//! holding the MTT read lock; a missing or read-only entry is a NIC page
//! fault, served through the sequence-retry protocol (see `soft/mtt.rs`). The bytes
//! live in the primary's [`FrameStore`](notifier_core::frame::FrameStore).
//!
//! # Keys
//!
//! `key = (index + 1) << 9 | generation << 1 | remote`: bit 0 tells an
//! rkey (remote initiators) from an lkey (the local side), the 8-bit
//! generation changes every time a key-table entry is reused, and an entry
//! whose generation would wrap is retired, so a key is never reissued.

mod mtt;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier_core::frame::{FrameError, Pfn};
use notifier_core::primary::Primary;
use notifier_core::{PageRange, PAGE_SIZE};
use parking_lot::RwLock;

pub use mtt::SoftMr;
use mtt::{fault_in, FaultError, FaultMode};

use crate::access::{Access, Advice};
use crate::error::{DmaError, ProviderError, RegError};
use crate::page_vec::PageVec;
use crate::provider::Provider;
use crate::region::Region;

const MAX_INDEX: usize = (1 << 23) - 2;

/// One access of a frame by the NIC, reported to the DMA observer at the
/// moment of access (with the MTT read lock held).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    /// The key used.
    pub key: u32,
    /// The page address.
    pub page: u64,
    /// The frame touched.
    pub pfn: Pfn,
    /// Whether the access writes.
    pub write: bool,
}

/// A callback that sees every frame access (the coherence oracle's hook).
pub type DmaObserver = Arc<dyn Fn(&DmaAccess) + Send + Sync>;

/// Counters of the software NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Regions made reachable (activations).
    pub registrations: u64,
    /// Regions made unreachable.
    pub deregistrations: u64,
    /// NIC page faults served.
    pub faults: u64,
    /// Page accesses (one per page touched by a DMA).
    pub page_accesses: u64,
}

/// Key index to region, with the generation of each entry in a parallel
/// byte array (9 bytes per key instead of a padded 16-byte entry).
#[derive(Default)]
struct KeyTable {
    regions: PageVec<Option<Region<SoftMr>>>,
    gens: PageVec<u8>,
    free: Vec<u32>,
    /// Activations and deactivations, counted under the table's write
    /// lock (plain integers: no atomic read-modify-write per registration).
    registrations: u64,
    deregistrations: u64,
}

struct Inner {
    primary: Arc<dyn Primary>,
    keys: RwLock<KeyTable>,
    observer: Option<DmaObserver>,
    faults: AtomicU64,
    page_accesses: AtomicU64,
}

/// The software NIC provider. Cloning shares the NIC.
#[derive(Clone)]
pub struct SoftNic {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for SoftNic {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SoftNic")
            .field("stats", &self.stats())
            .finish()
    }
}

#[inline]
fn split_key(key: u32) -> (usize, u8, bool) {
    (
        ((key >> 9) as usize).wrapping_sub(1),
        ((key >> 1) & 0xff) as u8,
        key & 1 == 1,
    )
}

impl SoftNic {
    /// A NIC whose DMA reaches the memory of `primary`.
    pub fn new(primary: Arc<dyn Primary>) -> Self {
        Self::build(primary, None)
    }

    /// A NIC that reports every frame access to `observer` at the moment of
    /// access (for coherence checks).
    pub fn with_observer(primary: Arc<dyn Primary>, observer: DmaObserver) -> Self {
        Self::build(primary, Some(observer))
    }

    fn build(primary: Arc<dyn Primary>, observer: Option<DmaObserver>) -> Self {
        Self {
            inner: Arc::new(Inner {
                primary,
                keys: RwLock::new(KeyTable::default()),
                observer,
                faults: AtomicU64::new(0),
                page_accesses: AtomicU64::new(0),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> NicStats {
        let i = &self.inner;
        let (registrations, deregistrations) = {
            let t = i.keys.read();
            (t.registrations, t.deregistrations)
        };
        NicStats {
            registrations,
            deregistrations,
            faults: i.faults.load(Ordering::Relaxed),
            page_accesses: i.page_accesses.load(Ordering::Relaxed),
        }
    }

    /// Heap bytes of the key table (its free list).
    pub fn key_table_heap_bytes(&self) -> usize {
        self.inner.keys.read().free.capacity() * 4
    }

    /// Bytes of the key table's own mappings (its region pointers and
    /// generations; see `page_vec.rs`), which an allocator does not see.
    pub fn key_table_mapped_bytes(&self) -> usize {
        let t = self.inner.keys.read();
        t.regions.mapped_bytes() + t.gens.mapped_bytes()
    }

    // ------------------------------------------------------------------
    // DMA.

    /// Local read through an lkey (a send's gather, a CPU-side check).
    ///
    /// # Errors
    /// See [`DmaError`].
    pub fn local_read(&self, lkey: u32, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read(lkey, false, Access::LOCAL_READ, addr, buf)
    }

    /// Local write through an lkey (a receive's scatter, a read response).
    ///
    /// # Errors
    /// See [`DmaError`].
    pub fn local_write(&self, lkey: u32, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.write(lkey, false, Access::LOCAL_WRITE, addr, data)
    }

    /// RDMA read by a remote peer through an rkey.
    ///
    /// # Errors
    /// See [`DmaError`].
    pub fn remote_read(&self, rkey: u32, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read(rkey, true, Access::REMOTE_READ, addr, buf)
    }

    /// RDMA write by a remote peer through an rkey.
    ///
    /// # Errors
    /// See [`DmaError`].
    pub fn remote_write(&self, rkey: u32, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.write(rkey, true, Access::REMOTE_WRITE, addr, data)
    }

    /// Remote atomic fetch-and-add of the 8-byte word at `addr`; returns the old value.
    ///
    /// # Errors
    /// See [`DmaError`]; [`DmaError::Misaligned`] unless `addr` is 8-aligned.
    pub fn remote_fetch_add(&self, rkey: u32, addr: u64, add: u64) -> Result<u64, DmaError> {
        if addr % 8 != 0 {
            return Err(DmaError::Misaligned(addr));
        }
        let region = self.resolve(rkey, true, Access::REMOTE_ATOMIC, addr, 8)?;
        let page = addr & !(PAGE_SIZE - 1);
        let off = (addr - page) as usize;
        self.with_page(&region, rkey, page, true, |frames, pfn| {
            frames.fetch_add(pfn, off, add)
        })
    }

    fn read(
        &self,
        key: u32,
        remote: bool,
        need: Access,
        addr: u64,
        buf: &mut [u8],
    ) -> Result<(), DmaError> {
        let region = self.resolve(key, remote, need, addr, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let a = addr + done as u64;
            let page = a & !(PAGE_SIZE - 1);
            let off = (a - page) as usize;
            let n = (PAGE_SIZE as usize - off).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            self.with_page(&region, key, page, false, |frames, pfn| {
                frames.read(pfn, off, chunk)
            })?;
            done += n;
        }
        Ok(())
    }

    fn write(
        &self,
        key: u32,
        remote: bool,
        need: Access,
        addr: u64,
        data: &[u8],
    ) -> Result<(), DmaError> {
        let region = self.resolve(key, remote, need, addr, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let a = addr + done as u64;
            let page = a & !(PAGE_SIZE - 1);
            let off = (a - page) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let chunk = &data[done..done + n];
            self.with_page(&region, key, page, true, |frames, pfn| {
                frames.write(pfn, off, chunk)
            })?;
            done += n;
        }
        Ok(())
    }

    /// Resolve a key and check kind, state, rights and bounds.
    fn resolve(
        &self,
        key: u32,
        remote: bool,
        need: Access,
        addr: u64,
        len: u64,
    ) -> Result<Region<SoftMr>, DmaError> {
        // The application's order: a DMA that starts after a munmap of its
        // memory returned sees the unmap applied (its translations gone).
        self.inner.primary.notifiers().event_gate().wait_applied();
        let (idx, gen, is_remote) = split_key(key);
        let region = {
            let t = self.inner.keys.read();
            match t.regions.get(idx) {
                Some(r) if t.gens[idx] == gen => r.clone(),
                _ => None,
            }
        }
        .ok_or(DmaError::UnknownKey(key))?;
        if is_remote != remote {
            return Err(DmaError::WrongKeyKind(key));
        }
        if !region.is_valid() {
            return Err(DmaError::Invalidated(key));
        }
        if !region.access().contains(need) {
            return Err(DmaError::AccessDenied {
                granted: region.access(),
                needed: need,
            });
        }
        if len == 0 || !region.covers(addr, len) {
            return Err(DmaError::OutOfBounds { addr, len });
        }
        Ok(region)
    }

    /// Run `f` on the frame of `page` with the MTT read lock held, faulting
    /// the translation in (for writing when `write`) on a miss.
    fn with_page<R>(
        &self,
        region: &Region<SoftMr>,
        key: u32,
        page: u64,
        write: bool,
        f: impl FnOnce(&dyn notifier_core::frame::FrameStore, Pfn) -> Result<R, FrameError>,
    ) -> Result<R, DmaError> {
        let mut f = Some(f);
        loop {
            {
                let mtt = region.mr().mtt.read();
                // Acquire in is_valid pairs with the callback's state change,
                // made under the write lock we now exclude.
                if !region.is_valid() {
                    return Err(DmaError::Invalidated(key));
                }
                if mtt.entry(page) == mtt::Entry::Gone {
                    return Err(DmaError::Fault(
                        notifier_core::primary::PrimaryFault::NoMapping(page),
                    ));
                }
                if let Some(t) = mtt.get(page) {
                    if !write || t.writable {
                        if let Some(obs) = &self.inner.observer {
                            obs(&DmaAccess {
                                key,
                                page,
                                pfn: t.pfn,
                                write,
                            });
                        }
                        self.inner.page_accesses.fetch_add(1, Ordering::Relaxed);
                        let f = f.take().expect("called once");
                        return f(self.inner.primary.frames(), t.pfn).map_err(DmaError::Frame);
                    }
                }
            }
            self.inner.faults.fetch_add(1, Ordering::Relaxed);
            let mode = if write {
                FaultMode::Write
            } else {
                FaultMode::Read
            };
            match fault_in(&*self.inner.primary, region, page, mode) {
                Ok(_) => {}
                Err(FaultError::Primary(e)) => return Err(DmaError::Fault(e)),
                Err(FaultError::Invalidated) => return Err(DmaError::Invalidated(key)),
            }
        }
    }
}

impl Provider for SoftNic {
    type Mr = SoftMr;

    fn name(&self) -> &'static str {
        "softnic"
    }

    fn on_demand(&self) -> bool {
        true
    }

    fn create_mr(
        &self,
        _range: PageRange,
        _access: Access,
        _implicit: bool,
    ) -> Result<SoftMr, ProviderError> {
        Ok(SoftMr::default())
    }

    fn activate_mr(&self, region: &Region<SoftMr>) -> Result<(), RegError> {
        let mut t = self.inner.keys.write();
        let idx = match t.free.pop() {
            Some(i) => i as usize,
            None => {
                if t.regions.len() > MAX_INDEX {
                    return Err(ProviderError::KeysExhausted.into());
                }
                t.regions.push(None);
                t.gens.push(0);
                t.regions.len() - 1
            }
        };
        t.regions[idx] = Some(region.clone());
        let gen = t.gens[idx];
        let lkey = ((idx as u32 + 1) << 9) | (u32::from(gen) << 1);
        region.mr().lkey.store(lkey, Ordering::Relaxed);
        region.mr().rkey.store(lkey | 1, Ordering::Relaxed);
        t.registrations += 1;
        Ok(())
    }

    fn dereg_mr(&self, region: &Region<SoftMr>) {
        let lkey = region.mr().lkey.load(Ordering::Relaxed);
        let (idx, gen, _) = split_key(lkey);
        let old = {
            let mut t = self.inner.keys.write();
            match t.regions.get(idx) {
                Some(Some(_)) if t.gens[idx] == gen => {}
                _ => return,
            }
            let old = t.regions[idx].take();
            let next = gen.wrapping_add(1);
            t.gens[idx] = next;
            // An entry whose generation wrapped is retired (never freed):
            // reusing it would reissue a key that was handed out.
            if next != 0 {
                t.free.push(idx as u32);
            }
            t.deregistrations += 1;
            old
        };
        drop(old);
    }

    fn ensure_covered(&self, range: PageRange) -> Result<(), RegError> {
        self.inner
            .primary
            .ensure_covered(range.start(), range.len())
            .map_err(RegError::Fault)
    }

    fn advise_mr(
        &self,
        region: &Region<SoftMr>,
        advice: Advice,
        range: PageRange,
    ) -> Result<(), RegError> {
        let mode = match advice {
            Advice::Prefetch => FaultMode::Read,
            Advice::PrefetchWrite => FaultMode::Write,
            Advice::PrefetchNoFault => FaultMode::NoFault,
        };
        for page in range.iter_pages() {
            if mode != FaultMode::NoFault {
                self.inner.faults.fetch_add(1, Ordering::Relaxed);
            }
            match fault_in(&*self.inner.primary, region, page, mode) {
                Ok(_) => {}
                Err(FaultError::Primary(e)) => return Err(RegError::Fault(e)),
                Err(FaultError::Invalidated) => return Err(RegError::Invalidated),
            }
        }
        Ok(())
    }
}
