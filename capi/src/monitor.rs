//! The monitor: a userfaultfd over ranges of the process's memory, its
//! handler thread, and the hooks C code hangs on its invalidations.
//!
//! # Thread safety (every `notifier_monitor_*` function)
//! Callable from any thread, concurrently on one handle. Calls on one
//! handle are serialised by its slot for their handle check only; watching,
//! hooks and `valid` run concurrently. `notifier_monitor_sync` and
//! `notifier_monitor_remove_hook` answer `NOTIFIER_EBUSY` from inside a
//! hook of the same process (they would wait for the hook's own thread).

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notifier_core::addr::PageRange;
use notifier_core::notifier::MmuNotifier;
use notifier_core::PAGE_SIZE;
use notifier_uffd::{HandlerThread, RegisterMode, UffdError, UffdMonitor, ZeroHandler};
use parking_lot::Mutex;

use crate::handle::{Kind, Table};
use crate::hooks::{in_hook, Dispatcher, Shared};
use crate::status::*;
use crate::sys;
use crate::{guard, notifier_hook_fn, NOTIFIER_MONITOR_USER_MODE_ONLY};

/// A monitor handle (a value; `id == 0` is never a live handle).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct notifier_monitor {
    /// Opaque.
    pub id: u64,
}

/// A live monitor.
pub(crate) struct Monitor {
    pub(crate) uffd: UffdMonitor,
    pub(crate) shared: Arc<Shared>,
    thread: Mutex<Option<HandlerThread>>,
    sub: Mutex<Option<MmuNotifier>>,
    stopped: AtomicBool,
}

pub(crate) static MONITORS: Table<Arc<Monitor>> = Table::new(Kind::Monitor);

/// The live monitor of `m`.
pub(crate) fn lookup(m: notifier_monitor) -> Res<Arc<Monitor>> {
    MONITORS.with(m.id, |x| Ok(x.clone()))
}

/// `[addr, addr + len)` widened to pages.
pub(crate) fn page_range(addr: u64, len: u64) -> Res<PageRange> {
    let end = addr
        .checked_add(len)
        .filter(|_| len > 0)
        .and_then(|e| e.checked_add(PAGE_SIZE - 1))
        .ok_or_else(|| {
            Failure::new(
                NOTIFIER_EINVAL,
                format!("range {addr:#x}+{len:#x} is empty or wraps"),
            )
        })?;
    let start = addr & !(PAGE_SIZE - 1);
    PageRange::from_bounds(start, end & !(PAGE_SIZE - 1))
        .map_err(|e| Failure::new(NOTIFIER_EINVAL, e.to_string()))
}

impl Monitor {
    fn create(flags: u32) -> Res<Arc<Monitor>> {
        if flags & !NOTIFIER_MONITOR_USER_MODE_ONLY != 0 {
            return Err(Failure::new(
                NOTIFIER_EINVAL,
                format!("unknown monitor flags {flags:#x}"),
            ));
        }
        let uffd = UffdMonitor::builder()
            .user_mode_only(flags & NOTIFIER_MONITOR_USER_MODE_ONLY != 0)
            .build(Arc::new(ZeroHandler))?;
        let shared = Arc::new(Shared::default());
        let sub = uffd
            .notifiers()
            .register(Arc::new(Dispatcher(shared.clone())))
            .map_err(UffdError::Notifier)?;
        let thread = uffd.spawn()?;
        Ok(Arc::new(Monitor {
            uffd,
            shared,
            thread: Mutex::new(Some(thread)),
            sub: Mutex::new(Some(sub)),
            stopped: AtomicBool::new(false),
        }))
    }

    fn check_running(&self) -> Res {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Failure::new(NOTIFIER_ESTOPPED, "the monitor was stopped"));
        }
        Ok(())
    }

    /// Watch the pages of `[addr, addr + len)`, uniting with what is
    /// watched already (overlapping and adjacent watches are fine).
    pub(crate) fn watch(&self, addr: u64, len: u64) -> Res {
        self.check_running()?;
        let r = page_range(addr, len)?;
        // A concurrent watch of the same pages makes ours answer Overlap:
        // look at the gaps again.
        for _ in 0..64 {
            let mut at = r.start();
            let mut raced = false;
            while at < r.end() {
                if let Some(reg) = self.uffd.registration(at) {
                    at = reg.range.end();
                    continue;
                }
                let next = self
                    .uffd
                    .registered()
                    .iter()
                    .map(|x| x.range.start())
                    .find(|&s| s > at)
                    .map_or(r.end(), |s| s.min(r.end()));
                let gap = PageRange::from_bounds(at, next)
                    .map_err(|e| Failure::new(NOTIFIER_EINVAL, e.to_string()))?;
                match self.uffd.register_raw(gap, RegisterMode::MISSING) {
                    Ok(()) => at = next,
                    Err(UffdError::Overlap { .. }) => {
                        raced = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !raced {
                return Ok(());
            }
        }
        Err(Failure::new(
            NOTIFIER_UFFD_OVERLAP,
            "watch kept racing with concurrent watches of the same pages",
        ))
    }

    /// Stop watching the watched parts of the pages of `[addr, addr + len)`.
    fn unwatch(&self, addr: u64, len: u64) -> Res {
        self.check_running()?;
        let r = page_range(addr, len)?;
        let mut any = false;
        for reg in self.uffd.registered() {
            let s = reg.range.start().max(r.start());
            let e = reg.range.end().min(r.end());
            if s < e {
                let piece = PageRange::from_bounds(s, e)
                    .map_err(|e| Failure::new(NOTIFIER_EINVAL, e.to_string()))?;
                match self.uffd.unregister(piece) {
                    // Unmapped meanwhile: nothing left to unwatch.
                    Ok(()) | Err(UffdError::NotRegistered { .. }) => any = true,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !any {
            return Err(UffdError::NotRegistered {
                start: r.start(),
                end: r.end(),
            }
            .into());
        }
        Ok(())
    }

    /// Wait until every event the kernel has handed out so far is applied.
    fn sync(&self) -> Res {
        if in_hook() {
            return Err(Failure::new(
                NOTIFIER_EBUSY,
                "notifier_monitor_sync from inside a hook would wait for itself",
            ));
        }
        self.uffd.handle_pending()?;
        Ok(())
    }

    /// Unwatch everything, stop the thread, drain what was queued.
    fn stop(&self) -> Res {
        if in_hook() {
            return Err(Failure::new(
                NOTIFIER_EBUSY,
                "a monitor cannot be stopped from inside its hook",
            ));
        }
        if self.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first_err = None;
        for reg in self.uffd.registered() {
            if let Err(e) = self.uffd.unregister(reg.range) {
                if !matches!(e, UffdError::NotRegistered { .. }) {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(t) = self.thread.lock().take() {
            t.stop();
        }
        // Events queued before the unwatch: their unmappers sleep until
        // they are read. (Stopping the handler thread retired the monitor,
        // which applied them already: `Stopped` then.)
        match self.uffd.handle_pending() {
            Ok(_) | Err(UffdError::Stopped) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(s) = self.sub.lock().take() {
            let _ = s.unregister();
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Create a monitor: open a userfaultfd and start its handler thread.
/// `flags`: 0, or `NOTIFIER_MONITOR_USER_MODE_ONLY` (skip
/// `/dev/userfaultfd`).
///
/// Without userfaultfd (a container that blocks it, no privilege) it
/// answers `NOTIFIER_UFFD_UNAVAILABLE`; `notifier_last_error` names the
/// fallback.
///
/// Thread safety: any thread.
///
/// # Safety
/// `out` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn notifier_monitor_create(
    flags: u32,
    out: *mut notifier_monitor,
) -> notifier_status {
    guard(|| {
        if out.is_null() {
            return Err(Failure::new(NOTIFIER_ENULL, "out is NULL"));
        }
        let m = Monitor::create(flags)?;
        let id = MONITORS.insert(m)?;
        // SAFETY: checked non-null; valid by the caller's contract.
        unsafe { sys::out(out, notifier_monitor { id }, "out") }
    })
}

/// Watch the pages of `[addr, addr + len)` (any alignment: widened to
/// pages; overlapping or adjacent watches unite). The memory must be
/// mapped private anonymous, shmem or hugetlb memory. Pages never touched
/// are zero-filled by the monitor's thread on first touch. A watch ends at
/// `notifier_monitor_unwatch`, or when the memory is unmapped.
///
/// Thread safety: any thread, concurrently with every other call.
#[no_mangle]
pub extern "C" fn notifier_monitor_watch(
    m: notifier_monitor,
    addr: *const c_void,
    len: usize,
) -> notifier_status {
    guard(|| lookup(m)?.watch(addr as u64, len as u64))
}

/// Stop watching the watched parts of the pages of `[addr, addr + len)`.
/// `NOTIFIER_UFFD_NOT_REGISTERED` when none of it was watched.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_monitor_unwatch(
    m: notifier_monitor,
    addr: *const c_void,
    len: usize,
) -> notifier_status {
    guard(|| lookup(m)?.unwatch(addr as u64, len as u64))
}

/// The process-wide mode (every anonymous mapping of the process watched,
/// no per-allocation call). notifier-uffd has it (`watch_process`), but
/// its path through this ABI is not proven yet: answers `NOTIFIER_ENOTSUP`;
/// watch ranges with `notifier_monitor_watch`.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_monitor_watch_process(
    m: notifier_monitor,
    flags: u32,
) -> notifier_status {
    guard(|| {
        lookup(m)?.check_running()?;
        let _ = flags;
        Err(Failure::new(
            NOTIFIER_ENOTSUP,
            "the process-wide mode is not available through the C ABI yet; \
             watch each range with notifier_monitor_watch",
        ))
    })
}

/// Wait until every event the kernel has reported so far is applied: after
/// `munmap`/`madvise`/`free` returned on any thread, a call to this
/// function returns only once their invalidations (and hooks) have run.
///
/// Thread safety: any thread except from inside a hook (`NOTIFIER_EBUSY`).
#[no_mangle]
pub extern "C" fn notifier_monitor_sync(m: notifier_monitor) -> notifier_status {
    guard(|| lookup(m)?.sync())
}

/// Add a hook called for every invalidation of watched memory:
/// `hook(arg, addr, len, event)`, `event` one of `NOTIFIER_EVENT_*`. It
/// runs on the monitor's thread (or the thread calling
/// `notifier_monitor_sync`), after the kernel reported the change (an
/// unmap is over; a `madvise` zap may still be in progress), and may be
/// called concurrently with any call of the application. It must not
/// block on anything the application may hold while it unmaps memory,
/// and should not allocate (a thread in `free()` may hold a malloc lock
/// while it waits for this event). It must not call `notifier_registry_*`
/// functions: a registry call may be waiting, under the registry's lock,
/// for the monitor's thread to serve a page fault. `*id_out` receives the
/// hook's id.
///
/// Thread safety: any thread.
///
/// # Safety
/// `hook` may be called with `arg` from any thread until
/// `notifier_monitor_remove_hook` returns; `id_out` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn notifier_monitor_add_hook(
    m: notifier_monitor,
    hook: notifier_hook_fn,
    arg: *mut c_void,
    id_out: *mut u32,
) -> notifier_status {
    guard(|| {
        let hook = hook.ok_or_else(|| Failure::new(NOTIFIER_ENULL, "hook is NULL"))?;
        let mon = lookup(m)?;
        let id = mon.shared.add_hook(hook, arg as usize)?;
        // SAFETY: valid or NULL by the caller's contract.
        unsafe { sys::out_opt(id_out, id) };
        Ok(())
    })
}

/// Remove a hook. When it returns the hook is not running on any thread
/// and is never called again, so its `arg` may be freed.
///
/// Thread safety: any thread except from inside a hook (`NOTIFIER_EBUSY`).
#[no_mangle]
pub extern "C" fn notifier_monitor_remove_hook(m: notifier_monitor, id: u32) -> notifier_status {
    guard(|| lookup(m)?.shared.remove_hook(id))
}

/// 1 if no invalidation overlapping `[addr, addr + len)` is in progress
/// (begun, its hooks not all returned), 0 otherwise, or a negative status.
/// Makes no system call; the handle check takes the handle's slot lock
/// briefly (the libfabric monitor's `valid` takes none).
///
/// Thread safety: any thread, including from inside a hook.
#[no_mangle]
pub extern "C" fn notifier_monitor_valid(
    m: notifier_monitor,
    addr: *const c_void,
    len: usize,
) -> i32 {
    let mut v = 0;
    let st = guard(|| {
        v = i32::from(lookup(m)?.shared.valid(addr as u64, len as u64));
        Ok(())
    });
    if st == NOTIFIER_OK {
        v
    } else {
        st as i32
    }
}

/// The number of invalidations completed so far (a generation: it grows
/// with every invalidation of watched memory). 0 for a bad handle.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_monitor_generation(m: notifier_monitor) -> u64 {
    let mut g = 0;
    guard(|| {
        g = lookup(m)?.shared.generation();
        Ok(())
    });
    g
}

/// Stop: unwatch everything, stop the handler thread, apply the events
/// already queued. Hooks are no longer called; watch answers
/// `NOTIFIER_ESTOPPED`. Idempotent. Memory stays usable (unwatched, it
/// behaves as ordinary memory; `munmap` never waits for a stopped monitor).
///
/// Thread safety: any thread except from inside a hook (`NOTIFIER_EBUSY`).
#[no_mangle]
pub extern "C" fn notifier_monitor_stop(m: notifier_monitor) -> notifier_status {
    guard(|| lookup(m)?.stop())
}

/// Stop and free the monitor; its handle dies. `NOTIFIER_EBUSY` while
/// registries or exported libfabric monitors still use it (destroy them
/// first), or while another thread's call on it is in progress. A second
/// destroy answers `NOTIFIER_EBADHANDLE`.
///
/// Thread safety: any thread except from inside a hook.
#[no_mangle]
pub extern "C" fn notifier_monitor_destroy(m: notifier_monitor) -> notifier_status {
    guard(|| {
        if in_hook() {
            return Err(Failure::new(
                NOTIFIER_EBUSY,
                "a monitor cannot be destroyed from inside its hook",
            ));
        }
        let mon = MONITORS.remove(m.id, |x| {
            if Arc::strong_count(x) > 1 {
                return Err(Failure::new(
                    NOTIFIER_EBUSY,
                    "registries or libfabric monitors still use this monitor",
                ));
            }
            Ok(())
        })?;
        mon.stop()
    })
}
