//! The handler thread and its clean shutdown.
//!
//! # Two ways to wait
//!
//! - **Blocking read, stopped by a sentinel fault** (monitors of this
//!   process's own memory, the usual case). While the thread runs, the
//!   userfaultfd is switched to blocking mode and the thread sleeps in
//!   `read(2)` itself: a fault costs `read` + the fill ioctl, as in a bare
//!   userfaultfd server, not `poll` + `read` + fill. A blocked `read` is not
//!   woken reliably by closing the descriptor from another thread, so the
//!   thread is stopped through the descriptor itself: `spawn` registers a
//!   private one-page *sentinel* mapping (MISSING, outside the registry),
//!   and `stop` touches it. The thread reads that fault like any other,
//!   serves the faults read with it, unregisters the sentinel (which wakes
//!   the stopper: its access retries on ordinary memory and reads zero) and
//!   exits. On any other exit (an unreadable descriptor, an unwinding
//!   panic) the thread unregisters the sentinel too, so the stopper never
//!   waits for a thread that is gone.
//! - **poll on the userfaultfd and a stop eventfd** (a monitor handed off
//!   at fork, whose memory belongs to the child, so no sentinel of ours can
//!   fault into it; or if the sentinel cannot be set up). The descriptor
//!   stays non-blocking.
//!
//! # Locking
//! The thread holds the monitor's loop lock (`Inner::looper`) for as long
//! as it runs (also while blocked in `read`): it is the monitor's only
//! driver, and [`UffdMonitor::handle_pending`] refuses with
//! `AlreadyRunning` meanwhile. `spawn` and `stop` switch the descriptor's
//! blocking mode under that lock or after the thread released it.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use notifier_core::PAGE_SIZE;

use crate::dispatch::LoopState;
use crate::error::UffdError;
use crate::monitor::{Inner, UffdMonitor};
use crate::sys::{self, Region};

/// A thread driving a monitor: reads the userfaultfd and runs the event
/// loop (as `handle_pending` does) whenever messages arrive.
///
/// # Pairing
/// [`HandlerThread::stop`] (or dropping it) wakes the thread (a sentinel
/// fault, or a stop eventfd, see the module docs) and joins it. Faulting
/// threads never depend on the stop: a fault read is always answered
/// before the loop looks at the stop signal again, and faults raised after
/// the stop wait until the monitor is driven again or dropped (closing the
/// userfaultfd wakes them; they then see ordinary memory).
pub struct HandlerThread {
    inner: Arc<Inner>,
    join: Option<JoinHandle<()>>,
    /// The sentinel page of the blocking mode; `None` in poll mode.
    sentinel: Option<Region>,
}

impl core::fmt::Debug for HandlerThread {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandlerThread")
            .field("running", &self.join.is_some())
            .field("blocking_read", &self.sentinel.is_some())
            .finish()
    }
}

/// Unregisters the sentinel when the thread leaves its loop, also on
/// unwind: that wakes a stopper touching it.
struct Unregister<'a>(&'a Inner, u64);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        unregister(self.0, self.1);
    }
}

fn unregister(inner: &Inner, sentinel: u64) {
    let _ = inner
        .uffd
        .unregister(sentinel as *mut libc::c_void, PAGE_SIZE as usize);
}

impl UffdMonitor {
    /// Start a handler thread.
    ///
    /// # Errors
    /// [`UffdError::AlreadyRunning`] if one runs already,
    /// [`UffdError::Io`] if the thread cannot be created.
    pub fn spawn(&self) -> Result<HandlerThread, UffdError> {
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(UffdError::AlreadyRunning);
        }
        // Waits for a `handle_pending` in progress; later ones see `running`.
        let st = self.inner.looper.lock();
        let sentinel = if self.inner.own_mm {
            self.sentinel()
        } else {
            None
        };
        if sentinel.is_none() {
            sys::eventfd_clear(self.inner.stop.as_fd());
        }
        let sentinel_addr = sentinel.as_ref().map(Region::addr);
        drop(st);
        let inner = Arc::clone(&self.inner);
        let (up_tx, up_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("uffd-monitor".into())
            .spawn(move || {
                // Finish thread start-up (and its allocations) before `spawn`
                // returns: see the fork hazard in `ForkPolicy`.
                let _ = up_tx.send(());
                drop(up_tx);
                match sentinel_addr {
                    Some(addr) => run_blocking(&inner, addr),
                    None => run_poll(&inner),
                }
            });
        match spawned {
            Ok(join) => {
                let _ = up_rx.recv();
                Ok(HandlerThread {
                    inner: Arc::clone(&self.inner),
                    join: Some(join),
                    sentinel,
                })
            }
            Err(e) => {
                if let Some(s) = &sentinel {
                    unregister(&self.inner, s.addr());
                    let _ = sys::set_nonblocking(self.inner.fd(), true);
                }
                self.inner.running.store(false, Ordering::Release);
                Err(UffdError::Io(e))
            }
        }
    }

    /// Map and register the sentinel page and make the descriptor blocking;
    /// `None` (poll mode) if any step fails. The caller holds the loop lock.
    fn sentinel(&self) -> Option<Region> {
        let page = Region::anon(PAGE_SIZE).ok()?;
        self.inner
            .uffd
            .register(page.addr() as *mut libc::c_void, PAGE_SIZE as usize)
            .ok()?;
        if sys::set_nonblocking(self.inner.fd(), false).is_err() {
            unregister(&self.inner, page.addr());
            return None;
        }
        Some(page)
    }
}

/// The blocking mode (see the module docs).
fn run_blocking(inner: &Inner, sentinel: u64) {
    let _unregister = Unregister(inner, sentinel);
    let mut st = inner.looper.lock();
    st.sentinel = Some(sentinel);
    st.stop_seen = false;
    loop {
        if let Err(e) = inner.pump(&mut st) {
            let eof = matches!(e, UffdError::Read(userfaultfd::Error::ReadEof));
            inner.report(format!("handler thread: {e}"));
            if eof {
                break;
            }
            // Do not spin on a persistent error.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if st.stop_seen {
            break;
        }
    }
    clear(&mut st);
}

fn clear(st: &mut LoopState) {
    st.sentinel = None;
    st.stop_seen = false;
}

/// The poll mode (see the module docs).
fn run_poll(inner: &Inner) {
    loop {
        match sys::poll2(inner.fd(), inner.stop.as_fd(), -1) {
            Ok((_, true)) => return,
            Ok((true, false)) => {
                let mut st = inner.looper.lock();
                if let Err(e) = inner.pump(&mut st) {
                    let eof = matches!(e, UffdError::Read(userfaultfd::Error::ReadEof));
                    inner.report(format!("handler thread: {e}"));
                    if eof {
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                inner.report(format!("handler thread: poll: {e}"));
                return;
            }
        }
    }
}

impl HandlerThread {
    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(j) = self.join.take() else { return };
        match &self.sentinel {
            // The thread unregisters the sentinel before it exits, whatever
            // the reason, so this access returns once it is gone.
            Some(page) if !j.is_finished() => {
                let _ = page.read_u8(0);
            }
            Some(_) => {}
            None => sys::eventfd_signal(self.inner.stop.as_fd()),
        }
        let _ = j.join();
        if self.sentinel.take().is_some() {
            // The thread released the loop lock: no driver reads now.
            if let Err(e) = sys::set_nonblocking(self.inner.fd(), true) {
                self.inner.report(format!("handler thread stop: {e}"));
            }
        } else {
            sys::eventfd_clear(self.inner.stop.as_fd());
        }
        self.inner.running.store(false, Ordering::Release);
    }
}

impl Drop for HandlerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}
