//! An importable libfabric memory monitor (`fi_import_fid` of a
//! `struct fid_mem_monitor`, `rdma/fi_ext.h`, libfabric 1.13 and later).
//!
//! libfabric's MR cache calls our `fi_ops_mem_monitor` (start, stop,
//! subscribe, unsubscribe, valid) with its `mm_lock` (and, for start and
//! stop, its `mm_state_lock` and the write side of `mm_list_rwlock`) held;
//! we call its `notify(addr, len)`, which takes `mm_list_rwlock` and
//! `mm_lock`. So, to never deadlock (libfabric issue 9003):
//!
//! - `notify` is called from the monitor's hook on the monitor's thread,
//!   which holds no lock of ours and allocates nothing (`hooks.rs`);
//! - `subscribe` watches the range (the monitor's registry lock, briefly,
//!   and `UFFDIO_REGISTER`); it never waits for the monitor's thread;
//! - `stop` only clears a flag: it never waits for a `notify` in flight
//!   (which may be waiting for the very locks `stop`'s caller holds);
//! - `valid` reads range generations: no lock, no system call;
//! - `unsubscribe` keeps the range watched (another cache entry may share
//!   its pages; the watch ends when the memory is unmapped).
//!
//! The layouts below mirror `rdma/fabric.h` and `rdma/fi_ext.h`.

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::guard;
use crate::hooks::Shared;
use crate::monitor::{self, notifier_monitor, Monitor};
use crate::status::*;

/// `FI_CLASS_MEM_MONITOR` (`enum` in `rdma/fabric.h`).
pub(crate) const FI_CLASS_MEM_MONITOR: usize = 23;

/// `struct fid`.
#[repr(C)]
struct Fid {
    fclass: usize,
    context: *mut c_void,
    ops: *mut c_void,
}

/// `struct fi_ops_mem_monitor`.
#[repr(C)]
struct OpsMemMonitor {
    size: usize,
    start: unsafe extern "C" fn(*mut FidMemMonitor) -> i32,
    stop: unsafe extern "C" fn(*mut FidMemMonitor),
    subscribe: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> i32,
    unsubscribe: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize),
    valid: unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize) -> bool,
}

/// `struct fi_ops_mem_notify`.
#[repr(C)]
struct OpsMemNotify {
    size: usize,
    notify: Option<unsafe extern "C" fn(*mut FidMemMonitor, *const c_void, usize)>,
}

/// `struct fid_mem_monitor`.
#[repr(C)]
struct FidMemMonitor {
    fid: Fid,
    export_ops: *const OpsMemMonitor,
    import_ops: *mut OpsMemNotify,
}

/// Our exported monitor: libfabric's struct first, so a pointer to it is a
/// pointer to ours.
#[repr(C)]
struct Export {
    mon: FidMemMonitor,
    monitor: Arc<Monitor>,
    shared: Arc<Shared>,
    hook: u32,
    /// Between libfabric's `start` and `stop`: `notify` is delivered.
    started: AtomicBool,
}

static OPS: OpsMemMonitor = OpsMemMonitor {
    size: core::mem::size_of::<OpsMemMonitor>(),
    start: fi_start,
    stop: fi_stop,
    subscribe: fi_subscribe,
    unsubscribe: fi_unsubscribe,
    valid: fi_valid,
};

/// Addresses of the live exported monitors: a pointer is dereferenced by
/// `notifier_fi_monitor_destroy` only once found here.
static LIVE: Mutex<Vec<usize>> = parking_lot::const_mutex(Vec::new());

/// Our `Export` behind libfabric's pointer.
///
/// # Safety
/// `m` is a pointer `notifier_fi_monitor_create` returned, not destroyed
/// (libfabric calls the ops only between import and `fi_close`).
unsafe fn export<'a>(m: *mut FidMemMonitor) -> &'a Export {
    // SAFETY: by the caller's contract `m` points to a live `Export`,
    // whose first field is the `FidMemMonitor`.
    unsafe { &*m.cast::<Export>() }
}

unsafe extern "C" fn fi_start(m: *mut FidMemMonitor) -> i32 {
    // SAFETY: libfabric passes the monitor it imported.
    let e = unsafe { export(m) };
    // Release: the `import_ops` libfabric stored at import are visible to
    // the hook's Acquire load of `started`.
    e.started.store(true, Ordering::Release);
    0
}

unsafe extern "C" fn fi_stop(m: *mut FidMemMonitor) {
    // SAFETY: libfabric passes the monitor it imported.
    let e = unsafe { export(m) };
    // Never waits for a notify in flight: see the module docs.
    e.started.store(false, Ordering::Release);
}

unsafe extern "C" fn fi_subscribe(m: *mut FidMemMonitor, addr: *const c_void, len: usize) -> i32 {
    // SAFETY: libfabric passes the monitor it imported.
    let e = unsafe { export(m) };
    // libfabric holds its mm_lock here, and our notify (on the monitor's
    // thread, inside a batch) takes it: never wait for that batch.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.monitor
            .uffd
            .without_order(|| e.monitor.watch(addr as u64, len as u64))
    }));
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(f)) => {
            set_last(&f.msg);
            -libc::EINVAL
        }
        Err(_) => -libc::EFAULT,
    }
}

unsafe extern "C" fn fi_unsubscribe(_m: *mut FidMemMonitor, _addr: *const c_void, _len: usize) {
    // The watch stays until the memory is unmapped: see the module docs.
}

unsafe extern "C" fn fi_valid(m: *mut FidMemMonitor, addr: *const c_void, len: usize) -> bool {
    // SAFETY: libfabric passes the monitor it imported.
    let e = unsafe { export(m) };
    e.shared.valid(addr as u64, len as u64)
}

/// The monitor's hook: libfabric's `notify`. Allocates nothing, takes no
/// lock of ours.
unsafe extern "C" fn notify_hook(arg: *mut c_void, addr: *mut c_void, len: usize, _ev: u32) {
    let m = arg.cast::<FidMemMonitor>();
    // SAFETY: `arg` is the `Export` that added this hook; it removes the
    // hook (waiting for this call) before it is freed.
    let e = unsafe { export(m) };
    // Acquire pairs with `fi_start`'s Release.
    if !e.started.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: `import_ops` was set by libfabric's import before `start`;
    // it points to libfabric's static ops table (or is NULL before import).
    let ops = unsafe { core::ptr::read_volatile(&raw const (*m).import_ops) };
    if ops.is_null() {
        return;
    }
    // SAFETY: a non-NULL `import_ops` is libfabric's live ops table.
    if let Some(notify) = unsafe { (*ops).notify } {
        // SAFETY: libfabric's notify, called as its contract says: with the
        // monitor it imported, from a thread holding none of its locks.
        unsafe { notify(m, addr, len) };
    }
}

/// Create a libfabric memory monitor driven by `m`, to import with
/// `fi_import(FI_VERSION(1, 13), "mr_cache", NULL, 0, 0, (struct fid *)mon, NULL)`
/// (libfabric then uses it for every MR cache of the process), after
/// libfabric initialised itself (any `fi_getinfo` call: before it, its
/// import monitor's list of caches is not set up and `notify` crashes in
/// libfabric 1.17). `*out`
/// receives a `struct fid_mem_monitor *` (`rdma/fi_ext.h`) as `void *`.
/// Its `subscribe` watches the range on `m`; an invalidation of watched
/// memory calls libfabric's `notify` from the monitor's thread; `valid`
/// takes no lock and makes no system call; `unsubscribe` keeps the watch.
///
/// Thread safety: any thread; the ops may be called by libfabric from any
/// thread.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_fi_monitor_create(
    m: notifier_monitor,
    out: *mut *mut c_void,
) -> notifier_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::new(NOTIFIER_ENULL, "out is NULL"));
        }
        let mon = monitor::lookup(m)?;
        let shared = mon.shared.clone();
        let mut e = Box::new(Export {
            mon: FidMemMonitor {
                fid: Fid {
                    fclass: FI_CLASS_MEM_MONITOR,
                    context: core::ptr::null_mut(),
                    ops: core::ptr::null_mut(),
                },
                export_ops: &OPS,
                import_ops: core::ptr::null_mut(),
            },
            monitor: mon,
            shared,
            hook: u32::MAX,
            started: AtomicBool::new(false),
        });
        let p: *mut Export = &mut *e;
        e.hook = e.shared.add_hook(notify_hook, p as usize)?;
        let p = Box::into_raw(e);
        LIVE.lock().push(p as usize);
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { crate::sys::out(out, p.cast::<c_void>(), "out") }
    })
}

/// Destroy a monitor from `notifier_fi_monitor_create`, after
/// `fi_close(&mon->fid)` (which detaches it from libfabric). A pointer
/// that is not a live exported monitor (NULL, foreign, destroyed) answers
/// `NOTIFIER_EBADHANDLE` without being dereferenced.
///
/// Thread safety: any thread except from inside a hook (`NOTIFIER_EBUSY`);
/// waits for a `notify` in progress.
#[no_mangle]
pub extern "C" fn notifier_fi_monitor_destroy(mon: *mut c_void) -> notifier_status {
    guard(|| {
        if crate::hooks::in_hook() {
            return Err(Failure::new(
                NOTIFIER_EBUSY,
                "cannot destroy a libfabric monitor from inside a hook",
            ));
        }
        {
            let mut live = LIVE.lock();
            let Some(i) = live.iter().position(|&a| a == mon as usize) else {
                return Err(Failure::new(
                    NOTIFIER_EBADHANDLE,
                    format!("{mon:p} is not a live libfabric monitor of this library"),
                ));
            };
            live.swap_remove(i);
        }
        // SAFETY: found in LIVE, so it is a `Box<Export>` from
        // `notifier_fi_monitor_create`, removed from LIVE just now (only
        // one destroy can get here).
        let e = unsafe { Box::from_raw(mon.cast::<Export>()) };
        e.started.store(false, Ordering::Release);
        if let Err(f) = e.shared.remove_hook(e.hook) {
            // The hook may still run: keep its memory.
            Box::leak(e);
            return Err(f);
        }
        drop(e);
        Ok(())
    })
}
