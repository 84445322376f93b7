//! The ibverbs provider (feature `ibverbs`): real RDMA devices through
//! rdma-sys.
//!
//! Regions are registered with `IBV_ACCESS_ON_DEMAND` when the device's
//! `odp_caps` support RC read and write on demand: the device then follows
//! the process's page tables through the kernel's own mmu notifiers, and
//! an invalidation only has to kill the region's keys in the registry.
//! Otherwise registrations are pinned: the registration is made under
//! `read_begin`/`read_retry` (retried when an invalidation collides) and
//! deregistered from the device inside the notifier callback, before the
//! primary's invalidation returns.
//!
//! Addresses are process virtual addresses: use this provider with a
//! primary that is the process's real memory (the userfaultfd backend).
//! Without a device (no kernel RDMA: `ibv_get_device_list` fails with
//! ENOSYS) [`Ibverbs::open`] returns [`ProviderError::NoDevice`].

#[allow(unsafe_code)]
mod sys;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use notifier_core::notifier::Again;
use notifier_core::PageRange;
use parking_lot::Mutex;
use rdma_sys::{ib_uverbs_advise_mr_advice, ibv_access_flags};

use crate::access::{Access, Advice};
use crate::error::{ProviderError, RegError};
use crate::provider::{Provider, ProviderMr};
use crate::region::Region;

/// The ibverbs provider: one device, one protection domain.
#[derive(Clone)]
pub struct Ibverbs {
    dev: Arc<sys::Device>,
}

impl core::fmt::Debug for Ibverbs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ibverbs")
            .field("device", &self.dev.name)
            .field("odp", &self.dev.caps)
            .finish()
    }
}

impl Ibverbs {
    /// Open the device called `name` (or the first device) and allocate a PD.
    ///
    /// # Errors
    /// [`ProviderError::NoDevice`] without a usable device,
    /// [`ProviderError::Verbs`] when opening or allocating fails.
    pub fn open(name: Option<&str>) -> Result<Self, ProviderError> {
        Ok(Self {
            dev: Arc::new(sys::Device::open(name)?),
        })
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// Whether registrations are on demand (else pinned).
    pub fn odp(&self) -> bool {
        self.dev.caps.odp
    }

    /// Whether implicit ODP is supported.
    pub fn implicit_odp(&self) -> bool {
        self.dev.caps.implicit
    }
}

fn verbs_access(a: Access, odp: bool) -> ibv_access_flags {
    let mut f = 0u32;
    if a.contains(Access::LOCAL_WRITE) {
        f |= ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if a.contains(Access::REMOTE_READ) {
        f |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    }
    if a.contains(Access::REMOTE_WRITE) {
        f |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if a.contains(Access::REMOTE_ATOMIC) {
        f |= ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0;
    }
    if odp {
        f |= ibv_access_flags::IBV_ACCESS_ON_DEMAND.0;
    }
    ibv_access_flags(f)
}

/// The ibverbs state of one region.
pub struct IbvMr {
    range: PageRange,
    access: Access,
    implicit: bool,
    odp: bool,
    /// The device MR; the subscriber lock of the retry protocol for pinned
    /// registrations. `None` before activation and after a pinned
    /// registration was invalidated.
    mr: Mutex<Option<sys::Mr>>,
    lkey: AtomicU32,
    rkey: AtomicU32,
}

impl ProviderMr for IbvMr {
    fn lkey(&self) -> u32 {
        self.lkey.load(Ordering::Relaxed)
    }
    fn rkey(&self) -> u32 {
        self.rkey.load(Ordering::Relaxed)
    }
    fn on_demand(&self) -> bool {
        self.odp
    }

    fn invalidate(
        &self,
        _start: u64,
        _end: u64,
        blockable: bool,
        mark: &mut dyn FnMut() -> bool,
    ) -> Result<(), Again> {
        let mut mr = if blockable {
            self.mr.lock()
        } else {
            self.mr.try_lock().ok_or(Again)?
        };
        let died = mark();
        // A pinned registration cannot follow the change, and a dead ODP
        // region's rkey must stop working (otherwise it would reach the new
        // memory at the old address): the device loses it now. A live ODP
        // region's translations are invalidated by the kernel itself.
        if died || !self.odp {
            if let Some(m) = mr.take() {
                let _ = m.dereg();
            }
        }
        Ok(())
    }

    fn zap(&self) {
        if let Some(m) = self.mr.lock().take() {
            let _ = m.dereg();
        }
    }
}

impl Provider for Ibverbs {
    type Mr = IbvMr;

    fn name(&self) -> &'static str {
        "ibverbs"
    }

    fn on_demand(&self) -> bool {
        self.dev.caps.odp
    }

    fn create_mr(
        &self,
        range: PageRange,
        access: Access,
        implicit: bool,
    ) -> Result<IbvMr, ProviderError> {
        if implicit && !self.dev.caps.implicit {
            return Err(ProviderError::Unsupported("implicit ODP"));
        }
        Ok(IbvMr {
            range,
            access,
            implicit,
            odp: self.dev.caps.odp,
            mr: Mutex::new(None),
            lkey: AtomicU32::new(0),
            rkey: AtomicU32::new(0),
        })
    }

    fn activate_mr(&self, region: &Region<IbvMr>) -> Result<(), RegError> {
        let m = region.mr();
        let access = verbs_access(m.access, m.odp);
        let (addr, len) = if m.implicit {
            (0, usize::MAX)
        } else {
            (m.range.start(), m.range.len() as usize)
        };
        let sub = region.notifier();
        loop {
            let seq = sub.read_begin();
            let mr = self.dev.register(addr, len, access)?;
            let mut slot = m.mr.lock();
            if !m.odp && sub.read_retry(seq) {
                drop(slot);
                let _ = mr.dereg();
                continue;
            }
            m.lkey.store(mr.lkey(), Ordering::Relaxed);
            m.rkey.store(mr.rkey(), Ordering::Relaxed);
            *slot = Some(mr);
            return Ok(());
        }
    }

    fn dereg_mr(&self, region: &Region<IbvMr>) {
        if let Some(m) = region.mr().mr.lock().take() {
            let _ = m.dereg();
        }
    }

    fn advise_mr(
        &self,
        region: &Region<IbvMr>,
        advice: Advice,
        range: PageRange,
    ) -> Result<(), RegError> {
        let m = region.mr();
        if !m.odp {
            // Pinned pages are always present: nothing to prefetch.
            return Ok(());
        }
        let advice = match advice {
            Advice::Prefetch => ib_uverbs_advise_mr_advice::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH,
            Advice::PrefetchWrite => {
                ib_uverbs_advise_mr_advice::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_WRITE
            }
            Advice::PrefetchNoFault => {
                ib_uverbs_advise_mr_advice::IB_UVERBS_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT
            }
        };
        let guard = m.mr.lock();
        let mr = guard.as_ref().ok_or(RegError::Invalidated)?;
        // One SGE covers at most 4 GiB - 1; split larger ranges.
        let mut start = range.start();
        while start < range.end() {
            let len = (range.end() - start).min(1 << 31) as u32;
            self.dev.advise_mr(mr, advice, start, len)?;
            start += u64::from(len);
        }
        Ok(())
    }
}
