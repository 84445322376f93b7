//! The registration cache for C: a `Registry<SoftNic>` over the memory a
//! monitor watches.
//!
//! # Thread safety (every `notifier_registry_*` function)
//! Callable from any thread. Calls on one registry are serialised: the
//! registry sits behind its handle slot's mutex (`handle.rs`), taken for
//! the duration of each call. Invalidations from the monitor's thread run
//! concurrently with the calls and never wait for that mutex. Different
//! registries never contend.
//!
//! # When the shared registry lands
//! `notifier_rdma::Registry` is single-owner (`&mut self`) today, so the
//! slot mutex is what makes it callable from any thread. A `Sync` registry
//! replaces `RegistryObj::reg`'s type and the two `REGISTRIES.with` calls
//! on the hit path (`get`, `put`) by a lock-free handle check: the rest of
//! this file, the header and the tests stay as they are.

use core::ffi::c_void;
use std::sync::Arc;

use notifier_rdma::{Access, Registry, RegistryConfig, SoftNic};
use notifier_uffd::UffdPrimary;

use crate::guard;
use crate::handle::{Kind, Table};
use crate::monitor::{self, notifier_monitor, Monitor};
use crate::status::*;
use crate::sys;

/// A registry handle (a value; `id == 0` is never a live handle).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct notifier_registry {
    /// Opaque.
    pub id: u64,
}

/// Limits of a registry; 0 means unlimited. Exceeding one evicts idle
/// regions in LRU order.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct notifier_registry_config {
    /// Most cached regions.
    pub max_regions: u64,
    /// Most cached bytes.
    pub max_bytes: u64,
}

/// A registration: its keys, and the handle to give back with
/// `notifier_registry_put`. Plain data; copying it is fine.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct notifier_mr {
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// Opaque.
    pub handle: [u32; 4],
}

/// Counters of a registry.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct notifier_stats {
    /// Gets served by an existing region.
    pub hits: u64,
    /// Gets that registered a new region.
    pub misses: u64,
    /// Regions folded into a new one.
    pub merges: u64,
    /// Idle regions evicted by the limits.
    pub evictions: u64,
    /// Regions invalidated (by the monitor or explicitly).
    pub invalidations: u64,
    /// Regions registered with the NIC.
    pub registrations: u64,
    /// Regions deregistered from the NIC.
    pub deregistrations: u64,
    /// Cached regions now.
    pub cached_regions: u64,
    /// Bytes of the cached regions.
    pub cached_bytes: u64,
}

/// A live registry (drop order: the registry before its NIC and primary).
pub(crate) struct RegistryObj {
    reg: Registry<SoftNic>,
    nic: SoftNic,
    _primary: Arc<UffdPrimary>,
    _monitor: Arc<Monitor>,
}

static REGISTRIES: Table<RegistryObj> = Table::new(Kind::Registry);

/// `[addr, addr + len)` widened to pages; an empty or wrapping range is
/// passed on as it is, for the registry's typed error.
#[inline(always)]
fn pages(addr: u64, len: u64) -> (u64, u64) {
    match monitor::page_range(addr, len) {
        Ok(r) => (r.start(), r.len()),
        Err(_) => (addr, len),
    }
}

/// Access flags from C: unknown bits stay set, so the registry rejects them.
#[inline(always)]
fn access(bits: u32) -> Access {
    Access::from_bits(u8::try_from(bits).unwrap_or(0xff))
}

/// Create a registry whose regions follow the memory `m` watches.
/// `cfg` may be NULL (unlimited).
///
/// Thread safety: any thread.
///
/// # Safety
/// `cfg` is NULL or valid for a read; `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_create(
    m: notifier_monitor,
    cfg: *const notifier_registry_config,
    out: *mut notifier_registry,
) -> notifier_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::new(NOTIFIER_ENULL, "out is NULL"));
        }
        // SAFETY: NULL or valid by the caller's contract.
        let c = unsafe { sys::read_opt(cfg) }.unwrap_or_default();
        let mon = monitor::lookup(m)?;
        let primary = Arc::new(UffdPrimary::new(&mon.uffd).map_err(|e| {
            Failure::new(NOTIFIER_UFFD_IO, format!("opening /proc/self/pagemap: {e}"))
        })?);
        let nic = SoftNic::new(primary.clone());
        let limits = RegistryConfig {
            max_regions: match c.max_regions {
                0 => usize::MAX,
                n => usize::try_from(n).unwrap_or(usize::MAX),
            },
            max_bytes: match c.max_bytes {
                0 => u64::MAX,
                n => n,
            },
        };
        let reg = Registry::new(&*primary, nic.clone(), limits);
        let id = REGISTRIES.insert(RegistryObj {
            reg,
            nic,
            _primary: primary,
            _monitor: mon,
        })?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { sys::out(out, notifier_registry { id }, "out") }
    })
}

/// Get a registration covering `[addr, addr + len)` (any alignment: the
/// pages around it are registered) with at least `access`
/// (`NOTIFIER_ACCESS_*`), registering on a miss; takes a reference. Never
/// returns a registration an invalidation has touched.
///
/// Thread safety: any thread (serialised per registry).
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_get(
    r: notifier_registry,
    addr: *const c_void,
    len: usize,
    access_flags: u32,
    out: *mut notifier_mr,
) -> notifier_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::new(NOTIFIER_ENULL, "out is NULL"));
        }
        let (start, len) = pages(addr as u64, len as u64);
        let h = REGISTRIES.with(r.id, |o| Ok(o.reg.get(start, len, access(access_flags))?))?;
        let mr = notifier_mr {
            lkey: h.lkey(),
            rkey: h.rkey(),
            handle: sys::mr_to_raw(h),
        };
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { sys::out(out, mr, "out") }
    })
}

/// Give back a reference taken by `notifier_registry_get`.
/// `NOTIFIER_REG_STALE_HANDLE` for a registration whose region is gone,
/// `NOTIFIER_REG_PUT_WITHOUT_GET` for one put more often than got.
///
/// Thread safety: any thread (serialised per registry).
///
/// # Safety
/// `mr` is NULL or valid for a read.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_put(
    r: notifier_registry,
    mr: *const notifier_mr,
) -> notifier_status {
    guard(|| {
        // SAFETY: NULL or valid by the caller's contract.
        let mr = unsafe { sys::read(mr, "mr") }?;
        let h = sys::mr_from_raw(mr.handle);
        REGISTRIES.with(r.id, |o| Ok(o.reg.put(h)?))
    })
}

/// Invalidate every cached region overlapping the pages of
/// `[addr, addr + len)`: their keys die now, idle ones are deregistered
/// now, busy ones at their last put. `*count` (may be NULL) receives how
/// many.
///
/// Thread safety: any thread (serialised per registry).
///
/// # Safety
/// `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_invalidate(
    r: notifier_registry,
    addr: *const c_void,
    len: usize,
    count: *mut usize,
) -> notifier_status {
    guard(|| {
        let (start, len) = pages(addr as u64, len as u64);
        let n = REGISTRIES.with(r.id, |o| Ok(o.reg.invalidate(start, len)?))?;
        // SAFETY: NULL or valid by the caller's contract.
        unsafe { sys::out_opt(count, n) };
        Ok(())
    })
}

/// The bounds `[*start, *end)` of a registration's region (a merge may
/// have made it larger than the request).
///
/// Thread safety: any thread (serialised per registry).
///
/// # Safety
/// `mr` is NULL or valid for a read; `start` and `end` are NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_bounds(
    r: notifier_registry,
    mr: *const notifier_mr,
    start: *mut u64,
    end: *mut u64,
) -> notifier_status {
    guard(|| {
        // SAFETY: NULL or valid by the caller's contract.
        let mr = unsafe { sys::read(mr, "mr") }?;
        let h = sys::mr_from_raw(mr.handle);
        let (s, e) = REGISTRIES.with(r.id, |o| Ok(o.reg.bounds(h)?))?;
        // SAFETY: NULL or valid by the caller's contract.
        unsafe {
            sys::out_opt(start, s);
            sys::out_opt(end, e);
        }
        Ok(())
    })
}

/// The registry's counters.
///
/// Thread safety: any thread (serialised per registry).
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_stats(
    r: notifier_registry,
    out: *mut notifier_stats,
) -> notifier_status {
    guard(|| {
        let s = REGISTRIES.with(r.id, |o| Ok(o.reg.stats()))?;
        let st = notifier_stats {
            hits: s.hits,
            misses: s.misses,
            merges: s.merges,
            evictions: s.evictions,
            invalidations: s.invalidations,
            registrations: s.registrations,
            deregistrations: s.deregistrations,
            cached_regions: s.cached_regions,
            cached_bytes: s.cached_bytes,
        };
        // SAFETY: NULL or valid by the caller's contract.
        unsafe { sys::out(out, st, "out") }
    })
}

/// A DMA of the registry's software NIC through a key: `op` is one of
/// `NOTIFIER_DMA_OP_*`; reads fill `buf`, writes copy it to memory at
/// `addr`. A key of a region that was invalidated answers
/// `NOTIFIER_DMA_INVALIDATED` or `NOTIFIER_DMA_UNKNOWN_KEY`.
///
/// Thread safety: any thread, concurrently with every registry call (the
/// NIC has its own locks).
///
/// # Safety
/// `buf` is NULL or valid for reads and writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn notifier_registry_dma(
    r: notifier_registry,
    op: u32,
    key: u32,
    addr: u64,
    buf: *mut c_void,
    len: usize,
) -> notifier_status {
    guard(|| {
        // SAFETY: NULL or valid by the caller's contract.
        let buf = unsafe { sys::bytes_mut(buf, len, "buf") }?;
        let nic = REGISTRIES.with(r.id, |o| Ok(o.nic.clone()))?;
        match op {
            crate::NOTIFIER_DMA_OP_LOCAL_READ => nic.local_read(key, addr, buf)?,
            crate::NOTIFIER_DMA_OP_LOCAL_WRITE => nic.local_write(key, addr, buf)?,
            crate::NOTIFIER_DMA_OP_REMOTE_READ => nic.remote_read(key, addr, buf)?,
            crate::NOTIFIER_DMA_OP_REMOTE_WRITE => nic.remote_write(key, addr, buf)?,
            _ => {
                return Err(Failure::new(
                    NOTIFIER_EINVAL,
                    format!("unknown DMA op {op}"),
                ))
            }
        }
        Ok(())
    })
}

/// Destroy a registry: every region is deregistered; its handle dies (a
/// second destroy answers `NOTIFIER_EBADHANDLE`).
///
/// Thread safety: any thread; calls in progress on the handle finish first.
#[no_mangle]
pub extern "C" fn notifier_registry_destroy(r: notifier_registry) -> notifier_status {
    guard(|| {
        let obj = REGISTRIES.remove(r.id, |_| Ok(()))?;
        drop(obj);
        Ok(())
    })
}

/// Panic inside `r`'s slot (fault injection for the tests).
#[cfg(feature = "testing")]
pub(crate) fn panic_inside(r: notifier_registry) -> notifier_status {
    guard(|| REGISTRIES.with(r.id, |_| -> Res { panic!("injected inside a registry") }))
}
