//! The thin unsafe layer: reading and writing through the caller's
//! pointers, and calling the caller's function pointers. Every other
//! module is safe code over these.

use core::ffi::c_void;

use crate::status::{Failure, Res, NOTIFIER_ENULL};

fn null(what: &str) -> Failure {
    Failure::new(NOTIFIER_ENULL, format!("{what} is NULL"))
}

/// Write `v` through the caller's out pointer.
///
/// # Safety
/// `p` is NULL or valid for a write of a `T` and suitably aligned.
#[inline]
pub(crate) unsafe fn out<T>(p: *mut T, v: T, what: &str) -> Res {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and valid and aligned by the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// Write `v` through an optional out pointer (NULL: not wanted).
///
/// # Safety
/// As [`out`].
#[inline]
pub(crate) unsafe fn out_opt<T>(p: *mut T, v: T) {
    if !p.is_null() {
        // SAFETY: non-null, and valid and aligned by the caller's contract.
        unsafe { p.write(v) };
    }
}

/// Read a `T` from the caller's pointer.
///
/// # Safety
/// `p` is NULL or valid for a read of a `T` and suitably aligned.
#[inline]
pub(crate) unsafe fn read<T: Copy>(p: *const T, what: &str) -> Res<T> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and valid and aligned by the caller's contract.
    Ok(unsafe { p.read() })
}

/// Read an optional `T` (NULL: `None`).
///
/// # Safety
/// As [`read`].
#[inline]
pub(crate) unsafe fn read_opt<T: Copy>(p: *const T) -> Option<T> {
    // SAFETY: non-null, and valid and aligned by the caller's contract.
    (!p.is_null()).then(|| unsafe { p.read() })
}

/// The caller's buffer as a byte slice (`len == 0`: an empty slice, `p`
/// not read).
///
/// # Safety
/// `p` is NULL or valid for reads and writes of `len` bytes for `'a`, not
/// aliased by another live reference.
#[inline]
pub(crate) unsafe fn bytes_mut<'a>(p: *mut c_void, len: usize, what: &str) -> Res<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, valid for `len` bytes and unaliased by contract.
    Ok(unsafe { core::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
}

pub(crate) use crate::RawHook;

/// The hook stored as an address.
#[inline]
pub(crate) fn hook_addr(f: RawHook) -> usize {
    f as usize
}

/// Call the hook whose address `hook_addr` stored.
///
/// # Safety
/// `addr` came from [`hook_addr`], and the hook's owner promised that it
/// may be called with `arg` until it is removed.
#[inline]
pub(crate) unsafe fn call_hook(addr: usize, arg: usize, start: u64, len: u64, event: u32) {
    // SAFETY: `addr` is a `RawHook` turned into an address by `hook_addr`
    // (function pointers and usize have one size on every Linux target).
    let f: RawHook = unsafe { core::mem::transmute::<usize, RawHook>(addr) };
    // SAFETY: the owner's contract (see the hook registration docs).
    unsafe {
        f(
            arg as *mut c_void,
            start as *mut c_void,
            len as usize,
            event,
        )
    }
}

// The registry's handle crosses the boundary as its raw bytes. `MrHandle`
// has no raw constructor yet (needed from notifier-rdma: `to_raw` /
// `from_raw`); until then its four `u32` fields are carried as they are.
const _: () = assert!(core::mem::size_of::<notifier_rdma::MrHandle>() == 16);
const _: () = assert!(core::mem::align_of::<notifier_rdma::MrHandle>() <= 4);

/// The raw bytes of a registration handle.
#[inline]
pub(crate) fn mr_to_raw(h: notifier_rdma::MrHandle) -> [u32; 4] {
    // SAFETY: same size (asserted above); `MrHandle` is four `u32`s with
    // no padding, so every byte is initialised.
    unsafe { core::mem::transmute::<notifier_rdma::MrHandle, [u32; 4]>(h) }
}

/// A registration handle from raw bytes (possibly forged: the registry
/// rejects a handle that names no live region with `StaleHandle`).
#[inline]
pub(crate) fn mr_from_raw(raw: [u32; 4]) -> notifier_rdma::MrHandle {
    // SAFETY: same size (asserted above); `MrHandle`'s fields are plain
    // `u32`s, for which every bit pattern is valid, so any bytes make a
    // valid (if stale) handle.
    unsafe { core::mem::transmute::<[u32; 4], notifier_rdma::MrHandle>(raw) }
}
