//! The thin unsafe layer over libibverbs (rdma-sys). Each wrapper makes one
//! verbs call, checks it and maps errno; everything above is safe.

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;

use rdma_sys::{
    ib_uverbs_advise_mr_advice, ibv_access_flags, ibv_advise_mr, ibv_alloc_pd, ibv_close_device,
    ibv_context, ibv_dealloc_pd, ibv_dereg_mr, ibv_device_attr_ex, ibv_free_device_list,
    ibv_get_device_list, ibv_get_device_name, ibv_mr, ibv_odp_general_caps,
    ibv_odp_transport_cap_bits, ibv_open_device, ibv_pd, ibv_query_device_ex,
    ibv_query_device_ex_input, ibv_reg_mr, ibv_sge,
};

use crate::error::ProviderError;

/// What the device can do on demand.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OdpCaps {
    /// Explicit ODP registrations with RC read and write.
    pub(crate) odp: bool,
    /// Implicit ODP (a whole-address-space registration).
    pub(crate) implicit: bool,
}

/// An open device with one protection domain.
pub(crate) struct Device {
    ctx: NonNull<ibv_context>,
    pd: NonNull<ibv_pd>,
    pub(crate) name: String,
    pub(crate) caps: OdpCaps,
}

// SAFETY: a verbs context and PD may be used from any thread; libibverbs
// serialises what needs it internally. We never hand out the raw pointers.
unsafe impl Send for Device {}
// SAFETY: as above; every method takes `&self` and only makes verbs calls
// that libibverbs documents as thread safe.
unsafe impl Sync for Device {}

fn verbs(call: &'static str) -> ProviderError {
    ProviderError::Verbs {
        call,
        source: io::Error::last_os_error(),
    }
}

impl Device {
    /// Open the device called `name`, or the first one, and allocate a PD.
    ///
    /// # Errors
    /// [`ProviderError::NoDevice`] when the device list cannot be read
    /// (no kernel RDMA: ENOSYS), is empty (ENODEV) or lacks `name`.
    pub(crate) fn open(name: Option<&str>) -> Result<Self, ProviderError> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed below.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(ProviderError::NoDevice(io::Error::last_os_error()));
        }
        let mut chosen = None;
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a valid device; the name is a NUL-terminated
            // string owned by the device, copied out before the list is freed.
            let dname = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if name.is_none_or(|want| want == dname) {
                chosen = Some((dev, dname));
                break;
            }
        }
        let opened = chosen.map(|(dev, dname)| {
            // SAFETY: `dev` comes from the live list; opening it before the
            // list is freed is what the verbs API requires.
            (unsafe { ibv_open_device(dev) }, dname)
        });
        // SAFETY: `list` came from ibv_get_device_list and is freed once.
        unsafe { ibv_free_device_list(list) };
        let Some((ctx, dname)) = opened else {
            return Err(ProviderError::NoDevice(io::Error::from_raw_os_error(
                19, /* ENODEV */
            )));
        };
        let ctx = NonNull::new(ctx).ok_or_else(|| verbs("ibv_open_device"))?;
        // SAFETY: `ctx` is an open context.
        let pd = match NonNull::new(unsafe { ibv_alloc_pd(ctx.as_ptr()) }) {
            Some(pd) => pd,
            None => {
                let e = verbs("ibv_alloc_pd");
                // SAFETY: closing the context we opened, once.
                unsafe { ibv_close_device(ctx.as_ptr()) };
                return Err(e);
            }
        };
        let mut dev = Self {
            ctx,
            pd,
            name: dname,
            caps: OdpCaps::default(),
        };
        dev.caps = dev.query_odp();
        Ok(dev)
    }

    fn query_odp(&self) -> OdpCaps {
        let input = ibv_query_device_ex_input { comp_mask: 0 };
        // SAFETY: an all-zero ibv_device_attr_ex is a valid value (plain
        // integers and nested plain structs).
        let mut attr: ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `input` and `attr` are valid for the call.
        let rc = unsafe { ibv_query_device_ex(self.ctx.as_ptr(), &input, &mut attr) };
        if rc != 0 {
            return OdpCaps::default();
        }
        let general = attr.odp_caps.general_caps;
        let rc_caps = attr.odp_caps.per_transport_caps.rc_odp_caps;
        let rw = ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_READ.0
            | ibv_odp_transport_cap_bits::IBV_ODP_SUPPORT_WRITE.0;
        let odp =
            general & u64::from(ibv_odp_general_caps::IBV_ODP_SUPPORT.0) != 0 && rc_caps & rw == rw;
        OdpCaps {
            odp,
            implicit: odp
                && general & u64::from(ibv_odp_general_caps::IBV_ODP_SUPPORT_IMPLICIT.0) != 0,
        }
    }

    /// Register `[addr, addr + len)` (`ibv_reg_mr`); `addr == 0` with
    /// `len == usize::MAX` and the on-demand flag is implicit ODP.
    ///
    /// # Safety
    /// The range must be process virtual memory that the caller's primary
    /// address space tracks: the device will read and write it by DMA,
    /// outside the Rust memory model, until the returned MR is
    /// deregistered (pinned) or its translations are invalidated (ODP).
    pub(crate) unsafe fn reg_mr(
        &self,
        addr: u64,
        len: usize,
        access: ibv_access_flags,
    ) -> Result<Mr, ProviderError> {
        // SAFETY: the PD is live; the caller guarantees the range contract.
        let mr = unsafe { ibv_reg_mr(self.pd.as_ptr(), addr as *mut _, len, access.0 as i32) };
        NonNull::new(mr).map(Mr).ok_or_else(|| verbs("ibv_reg_mr"))
    }

    /// Register a range of the registry's primary, which for this provider
    /// is the process's own memory (see the module docs of `ibverbs`).
    pub(crate) fn register(
        &self,
        addr: u64,
        len: usize,
        access: ibv_access_flags,
    ) -> Result<Mr, ProviderError> {
        // SAFETY: the provider's contract: the registry's primary is this
        // process's memory, tracked by the kernel; a pinned registration is
        // dropped by the first invalidation of its range.
        unsafe { self.reg_mr(addr, len, access) }
    }

    /// Prefetch `[addr, addr + len)` of `mr` (`ibv_advise_mr`, flushing).
    pub(crate) fn advise_mr(
        &self,
        mr: &Mr,
        advice: ib_uverbs_advise_mr_advice::Type,
        addr: u64,
        len: u32,
    ) -> Result<(), ProviderError> {
        let mut sge = ibv_sge {
            addr,
            length: len,
            lkey: mr.lkey(),
        };
        const IBV_ADVISE_MR_FLAG_FLUSH: u32 = 1;
        // SAFETY: the PD is live, `sge` names a live MR of this PD and is
        // valid for the call; advise only changes the device's translations.
        let rc = unsafe {
            ibv_advise_mr(
                self.pd.as_ptr(),
                advice,
                IBV_ADVISE_MR_FLAG_FLUSH,
                &mut sge,
                1,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(ProviderError::Verbs {
                call: "ibv_advise_mr",
                source: io::Error::from_raw_os_error(rc),
            })
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every MR holds an Arc of the device, so none is left; the
        // PD and the context are released once, in this order.
        unsafe {
            ibv_dealloc_pd(self.pd.as_ptr());
            ibv_close_device(self.ctx.as_ptr());
        }
    }
}

/// A registered memory region of a [`Device`].
pub(crate) struct Mr(NonNull<ibv_mr>);

// SAFETY: an MR handle may be used and deregistered from any thread.
unsafe impl Send for Mr {}
// SAFETY: `&Mr` only reads the immutable key fields.
unsafe impl Sync for Mr {}

impl Mr {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: the MR is live until `dereg` consumes it.
        unsafe { self.0.as_ref().lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.0.as_ref().rkey }
    }

    /// Deregister (`ibv_dereg_mr`).
    pub(crate) fn dereg(self) -> Result<(), ProviderError> {
        // SAFETY: the MR is live and consumed here, so deregistered once.
        let rc = unsafe { ibv_dereg_mr(self.0.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(ProviderError::Verbs {
                call: "ibv_dereg_mr",
                source: io::Error::from_raw_os_error(rc),
            })
        }
    }
}
