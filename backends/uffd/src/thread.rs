//! The handler thread and its clean shutdown.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::UffdError;
use crate::monitor::{Inner, UffdMonitor};
use crate::sys;

/// A thread driving a monitor: polls the userfaultfd and a stop eventfd,
/// and runs the event loop (`handle_pending`) whenever messages arrive.
///
/// # Pairing
/// [`HandlerThread::stop`] (or dropping it) signals the eventfd and joins
/// the thread. Faulting threads never depend on the stop: a fault read is
/// always answered before the loop looks at the stop signal again, and
/// faults raised after the stop wait until the monitor is driven again or
/// dropped (closing the userfaultfd wakes them; they then see ordinary
/// memory).
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
                let _ = up_tx.send(());
                drop(up_tx);
                run(&inner)
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

fn run(inner: &Inner) {
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
        if let Some(j) = self.join.take() {
            sys::eventfd_signal(self.inner.stop.as_fd());
            let _ = j.join();
            sys::eventfd_clear(self.inner.stop.as_fd());
            self.inner.running.store(false, Ordering::Release);
        }
    }
}

impl Drop for HandlerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}
