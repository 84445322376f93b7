//! The handler thread and its clean shutdown.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use std::panic::{catch_unwind, AssertUnwindSafe};

use notifier_core::notifier::Event;

use crate::error::UffdError;
use crate::monitor::{Inner, UffdMonitor};
use crate::open;
use crate::registry::RegisterMode;
use crate::{sys, sys_vm};

/// A thread driving a monitor: polls the userfaultfd and a stop eventfd,
/// and runs the event loop (`handle_pending`) whenever messages arrive.
///
/// # Stopping retires the monitor
/// [`HandlerThread::stop`] (or dropping it) signals the eventfd and joins
/// the thread, which **retires** the monitor for good before it exits (its
/// own exit frees memory that the process-wide mode watches), so that
/// nothing that touches the memory can hang once nobody reads its events:
///
/// 1. the events already queued are read and applied;
/// 2. the ranges registered for MISSING or MINOR faults are handed to a
///    second userfaultfd opened with `UFFD_FEATURE_SIGBUS` and no events:
///    a fault there raises SIGBUS at once (the handler that would have
///    filled the page is gone), and a `munmap` there never waits;
/// 3. the monitor's descriptor is closed in place (pointed at
///    `/dev/null`): the kernel's release wakes every thread still waiting
///    for a fault or for an event to be read;
/// 4. every registration is dropped with an [`Event::Unmap`] invalidation
///    (subscribers forget the memory: it is no longer followed) and the
///    notifier set's event gate is closed.
///
/// A handler thread that dies (its poll fails, the descriptor reports end
/// of file, or it panics) retires the monitor the same way. Afterwards
/// [`UffdMonitor::spawn`] and [`UffdMonitor::handle_pending`] fail with
/// [`UffdError::Stopped`] and registering fails the same way.
///
/// [`Event::Unmap`]: notifier_core::notifier::Event::Unmap
pub struct HandlerThread {
    inner: Arc<Inner>,
    join: Option<JoinHandle<()>>,
}

impl core::fmt::Debug for HandlerThread {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandlerThread")
            .field("running", &self.join.is_some())
            .finish()
    }
}

impl UffdMonitor {
    /// Start a handler thread.
    ///
    /// # Errors
    /// [`UffdError::AlreadyRunning`] if one runs already,
    /// [`UffdError::Io`] if the thread cannot be created.
    pub fn spawn(&self) -> Result<HandlerThread, UffdError> {
        if self.inner.retired.load(Ordering::Acquire) {
            return Err(UffdError::Stopped);
        }
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(UffdError::AlreadyRunning);
        }
        sys::eventfd_clear(self.inner.stop.as_fd());
        let inner = Arc::clone(&self.inner);
        let (up_tx, up_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("uffd-monitor".into())
            .spawn(move || {
                // Finish thread start-up (and its allocations) before `spawn`
                // returns: see the fork hazard in `ForkPolicy`.
                let here = 0u8;
                inner
                    .monitor_stack
                    .store(&here as *const u8 as u64, Ordering::Release);
                let _ = up_tx.send(());
                drop(up_tx);
                let r = catch_unwind(AssertUnwindSafe(|| run(&inner)));
                // Retire on this thread, before it exits: its exit frees
                // memory (thread locals, its malloc arena), which in the
                // process-wide mode is watched memory whose REMOVE or
                // UNMAP only this thread would read.
                if r.is_err() {
                    inner.report("handler thread panicked".into());
                }
                inner.retire();
            });
        match spawned {
            Ok(join) => {
                let _ = up_rx.recv();
                Ok(HandlerThread {
                    inner: Arc::clone(&self.inner),
                    join: Some(join),
                })
            }
            Err(e) => {
                self.inner.running.store(false, Ordering::Release);
                Err(UffdError::Io(e))
            }
        }
    }
}

/// Why the handler thread's loop ended.
enum Exit {
    /// The stop eventfd was signalled.
    Stopped,
    /// The descriptor or the poll failed: nobody reads events any more.
    Died,
}

fn run(inner: &Inner) -> Exit {
    loop {
        match sys::poll2(inner.fd(), inner.stop.as_fd(), -1) {
            Ok((_, true)) => return Exit::Stopped,
            Ok((true, false)) => {
                let mut st = inner.looper.lock();
                if let Err(e) = inner.pump(&mut st) {
                    let eof = matches!(e, UffdError::Read(userfaultfd::Error::ReadEof));
                    inner.report(format!("handler thread: {e}"));
                    if eof {
                        return Exit::Died;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                inner.report(format!("handler thread: poll: {e}"));
                return Exit::Died;
            }
        }
    }
}

impl Inner {
    /// Retire the monitor for good (see [`HandlerThread`]): apply what is
    /// queued, hand fault-serving ranges to a SIGBUS userfaultfd, close the
    /// descriptor, drop every registration, close the event gate.
    ///
    /// # Locking
    /// Takes the loop lock (no other driver meanwhile), then the registry
    /// lock briefly per step; invalidations run without either lock but
    /// the loop lock.
    pub(crate) fn retire(&self) {
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut st = self.looper.lock();
        // 1. What the kernel queued until now.
        if let Err(e) = self.pump(&mut st) {
            self.report(format!("retiring: {e}"));
        }
        // 2. Faults in fault-serving ranges must fail, not hang or read
        //    zeros the handler would not have served.
        let regs = self.registry.read().all();
        let serving: Vec<_> = regs
            .iter()
            .filter(|r| {
                r.mode
                    .intersects(RegisterMode::MISSING | RegisterMode::MINOR)
            })
            .collect();
        if !serving.is_empty() {
            match open::open_sigbus(self.path) {
                Ok(sb) => {
                    for r in serving {
                        let (a, n) = (r.range.start() as *mut libc::c_void, r.range.len() as usize);
                        let _ = self.uffd.unregister(a, n);
                        if let Err(e) = sb.register_with_mode(a, n, RegisterMode::MISSING.to_uffd())
                        {
                            self.report(format!(
                                "retiring: SIGBUS registration of {:?}: {e}",
                                r.range
                            ));
                        }
                    }
                    *self.sigbus.lock() = Some(sb);
                }
                Err(e) => self.report(format!("retiring: SIGBUS userfaultfd: {e}")),
            }
        }
        // 3. Wake everyone waiting on the descriptor (faults, unmaps).
        if let Err(e) = sys_vm::close_in_place(self.fd()) {
            self.report(format!("retiring: closing the userfaultfd: {e}"));
        }
        // 4. Nothing is followed any more.
        for r in regs {
            let (s, e) = (r.range.start(), r.range.end());
            self.invalidate(r.range, Event::Unmap, || {
                self.registry.write().cut(s, e);
            });
        }
        self.subs.event_gate().close();
        drop(st);
    }
}

impl HandlerThread {
    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(j) = self.join.take() {
            sys::eventfd_signal(self.inner.stop.as_fd());
            let _ = j.join();
            sys::eventfd_clear(self.inner.stop.as_fd());
            self.inner.retire();
            self.inner.running.store(false, Ordering::Release);
        }
    }
}

impl Drop for HandlerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}
