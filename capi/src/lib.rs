//! # notifier-capi
//!
//! The C ABI of the workspace (`libnotifier.so`, `libnotifier.a`,
//! `include/notifier.h`, `notifier.pc`): the registration cache and the
//! userfaultfd monitor for C programs, and the plug points of the RDMA
//! middleware that already accept an external memory-event source:
//!
//! - **UCX**: declare `UCM_EVENT_VM_UNMAPPED` external
//!   (`ucm_set_external_event`) and add a monitor hook that calls
//!   `ucm_vm_munmap(addr, len)` (`tests/c/ucx_external_events.c`);
//! - **libfabric**: import the monitor of `notifier_fi_monitor_create`
//!   with `fi_import` (`libfabric.rs`, `tests/c/fi_import_monitor.c`).
//!
//! # Rules of every function
//!
//! - **Errors**: every function returns a `notifier_status` (0 or a
//!   negative code; one code per variant of `RegError`, `ProviderError`,
//!   `DmaError`, `UffdError`, plus the ABI's own). The calling thread's
//!   last message is `notifier_last_error`.
//! - **No panic crosses the boundary**: each entry point runs inside
//!   `catch_unwind`; a panic becomes `NOTIFIER_EPANIC` and poisons the
//!   handle it was about.
//! - **Handles are values, validated**: a registry or monitor handle is a
//!   `{ uint64_t id; }` looked up in a static table (`handle.rs`); a null,
//!   forged, foreign-kind or destroyed handle is `NOTIFIER_EBADHANDLE`,
//!   never a dereference. Pointers the caller passes for its own data
//!   (out parameters, buffers) must be NULL or valid: NULL is
//!   `NOTIFIER_ENULL`.
//! - **Thread safety**: every function may be called from any thread; each
//!   one's doc says what it serialises with and what it may not be called
//!   from (the monitor's hooks).
//!
//! # Unsafe
//! Pointer reads and writes and calls through C function pointers are in
//! `sys.rs`; the libfabric structs and their calls in `libfabric.rs`.
//! Entry points taking pointers are `unsafe extern "C"` with a `# Safety`
//! section.

use core::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

mod handle;
mod hooks;
mod libfabric;
mod monitor;
mod registry;
mod status;
mod sys;
#[cfg(feature = "testing")]
pub mod testing;

pub use libfabric::{notifier_fi_monitor_create, notifier_fi_monitor_destroy};
pub use monitor::*;
pub use registry::*;
pub use status::notifier_status;
pub use status::notifier_status::*;

use status::{copy_last, describe, set_last, Res};

/// An invalidation hook: `hook(arg, addr, len, event)` (see
/// `notifier_monitor_add_hook`).
pub type RawHook = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u32);

/// A nullable [`RawHook`] as C passes it (the same signature).
#[allow(non_camel_case_types)]
pub type notifier_hook_fn =
    Option<unsafe extern "C" fn(arg: *mut c_void, addr: *mut c_void, len: usize, event: u32)>;

/// Local read (always granted).
pub const NOTIFIER_ACCESS_LOCAL_READ: u32 = 1;
/// The local NIC may write.
pub const NOTIFIER_ACCESS_LOCAL_WRITE: u32 = 1 << 1;
/// A remote peer may read.
pub const NOTIFIER_ACCESS_REMOTE_READ: u32 = 1 << 2;
/// A remote peer may write (needs local write).
pub const NOTIFIER_ACCESS_REMOTE_WRITE: u32 = 1 << 3;
/// A remote peer may run atomics (needs local write).
pub const NOTIFIER_ACCESS_REMOTE_ATOMIC: u32 = 1 << 4;

/// `notifier_monitor_create` flag: skip `/dev/userfaultfd`, use the system
/// call with `UFFD_USER_MODE_ONLY` (needs no privilege).
pub const NOTIFIER_MONITOR_USER_MODE_ONLY: u32 = 1;

/// Hook event: the range was unmapped (`munmap`, `mremap` source,
/// `mmap(MAP_FIXED)` over it).
pub const NOTIFIER_EVENT_UNMAP: u32 = 1;
/// Hook event: the pages were zapped, the mapping stays
/// (`madvise(DONTNEED | FREE | REMOVE)`).
pub const NOTIFIER_EVENT_CLEAR: u32 = 2;
/// Hook event: the protection of the mapping changes.
pub const NOTIFIER_EVENT_PROTECTION_VMA: u32 = 3;
/// Hook event: the protection of single pages changes.
pub const NOTIFIER_EVENT_PROTECTION_PAGE: u32 = 4;
/// Hook event: dirty tracking write-protects the range.
pub const NOTIFIER_EVENT_SOFT_DIRTY: u32 = 5;
/// Hook event: the address space goes away.
pub const NOTIFIER_EVENT_RELEASE: u32 = 6;
/// Hook event: pages move to other frames.
pub const NOTIFIER_EVENT_MIGRATE: u32 = 7;
/// Hook event: pages become exclusive to a device.
pub const NOTIFIER_EVENT_EXCLUSIVE: u32 = 8;

/// `notifier_registry_dma`: local read through an lkey.
pub const NOTIFIER_DMA_OP_LOCAL_READ: u32 = 0;
/// `notifier_registry_dma`: local write through an lkey.
pub const NOTIFIER_DMA_OP_LOCAL_WRITE: u32 = 1;
/// `notifier_registry_dma`: RDMA read by a remote peer through an rkey.
pub const NOTIFIER_DMA_OP_REMOTE_READ: u32 = 2;
/// `notifier_registry_dma`: RDMA write by a remote peer through an rkey.
pub const NOTIFIER_DMA_OP_REMOTE_WRITE: u32 = 3;

/// Run an entry point's body: its error becomes the status and this
/// thread's last message; a panic becomes `NOTIFIER_EPANIC`.
#[inline(always)]
pub(crate) fn guard(f: impl FnOnce() -> Res) -> notifier_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => NOTIFIER_OK,
        Ok(Err(e)) => {
            set_last(&e.msg);
            e.code
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            // Formatting could itself panic (a panicking Display); never
            // let that escape either.
            let _ = catch_unwind(|| set_last(&format!("panic caught at the C boundary: {msg}")));
            NOTIFIER_EPANIC
        }
    }
}

/// A static, NUL-terminated description of a status code (never NULL).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_strerror(status: i32) -> *const c_char {
    describe(status).as_ptr()
}

/// Copy the calling thread's last error message into `buf` (at most `cap`
/// bytes, NUL-terminated, truncated if need be). Returns the message's
/// full length (without the NUL); 0 when no call on this thread failed.
///
/// Thread safety: any thread; each thread has its own last message.
///
/// # Safety
/// `buf` is NULL (then only the length is returned) or valid for writes of
/// `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn notifier_last_error(buf: *mut c_char, cap: usize) -> usize {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: NULL or valid for `cap` bytes by the caller's contract.
        match unsafe { sys::bytes_mut(buf.cast(), cap, "buf") } {
            Ok(b) => copy_last(b),
            Err(_) => copy_last(&mut []),
        }
    }));
    r.unwrap_or(0)
}

/// The library's version, `"MAJOR.MINOR.PATCH"` (the crate's).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}
