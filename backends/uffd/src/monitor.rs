//! [`UffdMonitor`]: a userfaultfd over real memory ranges, feeding a
//! notifier set and serving faults.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use notifier_core::addr::PageRange;
use notifier_core::notifier::{Event, InvalidateRange, NotifierSubscriptions};
use parking_lot::{Mutex, RwLock};

use crate::announce::Announced;
use crate::dispatch::LoopState;
use crate::error::UffdError;
use crate::handler::{FaultHandler, ZeroHandler};
use crate::open::{self, OpenPath};
use crate::registry::{RegisterMode, Registration, Registry};
use crate::stats::{Counters, Stats};
use crate::sys::{self, feature, Region};

/// What to do with the child's userfaultfd that `UFFD_EVENT_FORK` delivers.
#[derive(Clone, Default)]
pub enum ForkPolicy {
    /// Do not ask for fork events: the kernel drops the registrations in the
    /// child, whose registered memory becomes ordinary memory (missing pages
    /// read as zero).
    #[default]
    Ignore,
    /// Ask for fork events and close the child's userfaultfd at once (counted
    /// in `Stats::forks_refused`). Closing it unregisters the child's ranges
    /// and wakes its faulting threads: the child goes on with ordinary memory.
    Refuse,
    /// Ask for fork events and hand the child's userfaultfd to the callback
    /// as a new monitor (same handler, same registrations as the parent had
    /// at the fork, a new notifier set, fork policy `Refuse`). The callback
    /// runs on the thread driving the parent's monitor, after the event was
    /// read (so the parent's `fork(2)` may already have returned); the
    /// child's faults wait until someone drives the new monitor (e.g.
    /// `spawn` in the callback).
    Handoff(Arc<dyn Fn(UffdMonitor) + Send + Sync>),
}

// # The fork hazard (Refuse and Handoff)
//
// With fork events, the parent's fork(2) sleeps in the kernel until the
// FORK event is read, and glibc holds its allocator locks across that
// system call. The monitor reads and stashes the event without allocating,
// but if the thread driving it is inside the fault handler or a subscriber
// and allocates at that very moment, the two wait for each other. So with
// `Refuse`/`Handoff`, do not fork while registered memory is faulting, or
// use handlers and subscribers that do not allocate. `spawn` returns only
// once the handler thread is up, so its own start-up is never caught.

impl core::fmt::Debug for ForkPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ForkPolicy::Ignore => "Ignore",
            ForkPolicy::Refuse => "Refuse",
            ForkPolicy::Handoff(_) => "Handoff",
        })
    }
}

/// Builds a [`UffdMonitor`].
#[derive(Debug, Default)]
pub struct MonitorBuilder {
    user_mode_only: bool,
    fork: ForkPolicy,
    batch: Option<usize>,
    subs: Option<Arc<NotifierSubscriptions>>,
}

impl MonitorBuilder {
    /// Skip `/dev/userfaultfd` and use the system call with
    /// `UFFD_USER_MODE_ONLY` (what an unprivileged process gets anyway).
    pub fn user_mode_only(mut self, yes: bool) -> Self {
        self.user_mode_only = yes;
        self
    }

    /// What to do on fork (default [`ForkPolicy::Ignore`]).
    pub fn fork_policy(mut self, policy: ForkPolicy) -> Self {
        self.fork = policy;
        self
    }

    /// Messages read per `read(2)` (default 64). It bounds the event path's
    /// buffer; see the crate docs on back-pressure.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = Some(n.clamp(1, 4096));
        self
    }

    /// Feed this notifier set instead of a new one. One monitor per set:
    /// the monitor is the only writer of the set's event gate (see the
    /// `order` module), so two monitors must not feed one set.
    pub fn notifiers(mut self, subs: Arc<NotifierSubscriptions>) -> Self {
        self.subs = Some(subs);
        self
    }

    /// Open the userfaultfd and build the monitor; missing faults are
    /// answered by `handler`.
    ///
    /// # Errors
    /// [`UffdError::Unavailable`] when neither the device nor the system
    /// call works, [`UffdError::MissingFeatures`] on an old kernel.
    pub fn build(self, handler: Arc<dyn FaultHandler>) -> Result<UffdMonitor, UffdError> {
        let extra = if matches!(self.fork, ForkPolicy::Ignore) {
            0
        } else {
            feature::EVENT_FORK
        };
        let (fd, path, features) = open::open(self.user_mode_only, extra)?;
        let subs = self.subs.unwrap_or_else(NotifierSubscriptions::new);
        Ok(UffdMonitor::from_parts(
            fd,
            path,
            features,
            subs,
            handler,
            self.fork,
            self.batch.unwrap_or(64),
            Registry::default(),
        ))
    }
}

/// The shared state of a monitor.
pub(crate) struct Inner {
    pub(crate) uffd: userfaultfd::Uffd,
    pub(crate) path: OpenPath,
    pub(crate) features: u64,
    pub(crate) subs: Arc<NotifierSubscriptions>,
    /// Registered ranges and the dirty log.
    ///
    /// # Locking
    /// Held only briefly, never across a handler call, an ioctl that may
    /// wait, or a notifier callback.
    pub(crate) registry: RwLock<Registry>,
    pub(crate) handler: Arc<dyn FaultHandler>,
    pub(crate) fork: ForkPolicy,
    /// The event loop's buffers. Whoever holds it drives the monitor.
    pub(crate) looper: Mutex<LoopState>,
    pub(crate) counters: Counters,
    pub(crate) last_error: Mutex<Option<String>>,
    /// A handler thread is running.
    pub(crate) running: AtomicBool,
    /// Signalled to stop the handler thread's poll.
    pub(crate) stop: OwnedFd,
    /// Announced zaps in progress (see `announce`).
    pub(crate) announced: Announced,
    /// Stopped for good (see `HandlerThread`): nothing is watched any more.
    pub(crate) retired: AtomicBool,
    /// The SIGBUS userfaultfd holding a retired monitor's fault-serving
    /// ranges.
    pub(crate) sigbus: Mutex<Option<userfaultfd::Uffd>>,
    /// An address on the handler thread's stack (0: none), which the
    /// process-wide scan must not watch.
    pub(crate) monitor_stack: std::sync::atomic::AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The watched address space goes away for our subscribers.
        self.subs.event_gate().close();
        self.subs.release();
    }
}

impl Inner {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    pub(crate) fn report(&self, msg: String) {
        Counters::inc(&self.counters.errors);
        *self.last_error.lock() = Some(msg);
    }
}

/// A userfaultfd monitor over real memory: registered ranges, their events
/// turned into notifier invalidations, and their faults served.
///
/// Cheap to clone (shared state). See the crate docs for the guarantees of
/// each event and the ordering rules.
#[derive(Clone)]
pub struct UffdMonitor {
    pub(crate) inner: Arc<Inner>,
}

impl core::fmt::Debug for UffdMonitor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UffdMonitor")
            .field("fd", &self.inner.uffd.as_raw_fd())
            .field("path", &self.inner.path)
            .field("features", &format_args!("{:#x}", self.inner.features))
            .field("registered", &self.inner.registry.read().len())
            .finish()
    }
}

impl UffdMonitor {
    /// A builder.
    pub fn builder() -> MonitorBuilder {
        MonitorBuilder::default()
    }

    /// A monitor with default settings whose missing pages are zero pages.
    ///
    /// # Errors
    /// As [`MonitorBuilder::build`].
    pub fn new() -> Result<Self, UffdError> {
        Self::builder().build(Arc::new(ZeroHandler))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        fd: OwnedFd,
        path: OpenPath,
        features: u64,
        subs: Arc<NotifierSubscriptions>,
        handler: Arc<dyn FaultHandler>,
        fork: ForkPolicy,
        batch: usize,
        registry: Registry,
    ) -> Self {
        let uffd = to_uffd(fd);
        let stop = sys::eventfd().expect("eventfd");
        let inner = Inner {
            uffd,
            path,
            features,
            subs,
            registry: RwLock::new(registry),
            handler,
            fork,
            looper: Mutex::new(LoopState::new(batch)),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            running: AtomicBool::new(false),
            stop,
            announced: Announced::default(),
            retired: AtomicBool::new(false),
            sigbus: Mutex::new(None),
            monitor_stack: std::sync::atomic::AtomicU64::new(0),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The notifier set this monitor feeds.
    pub fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.inner.subs
    }

    /// How the userfaultfd was opened.
    pub fn open_path(&self) -> OpenPath {
        self.inner.path
    }

    /// The `UFFD_FEATURE_*` bits granted by the kernel.
    pub fn features(&self) -> u64 {
        self.inner.features
    }

    /// Register the whole of `region` with `mode`.
    ///
    /// # Errors
    /// As [`Self::register_range`].
    pub fn register(&self, region: &Region, mode: RegisterMode) -> Result<PageRange, UffdError> {
        self.register_range(region, 0, region.len(), mode)
    }

    /// Register `[off, off + len)` of `region` with `mode`.
    ///
    /// # Errors
    /// [`UffdError::Range`] for a bad range, [`UffdError::OutsideMapping`],
    /// [`UffdError::Overlap`] when it overlaps a registered range,
    /// [`UffdError::UnsupportedMode`] when the kernel refuses the mode for
    /// this memory (e.g. MINOR on anonymous memory). Nothing registered
    /// before is lost.
    pub fn register_range(
        &self,
        region: &Region,
        off: u64,
        len: u64,
        mode: RegisterMode,
    ) -> Result<PageRange, UffdError> {
        let r = PageRange::new(region.addr().wrapping_add(off), len)?;
        if off.checked_add(len).is_none_or(|e| e > region.len()) {
            return Err(UffdError::OutsideMapping);
        }
        self.register_raw(r, mode)?;
        Ok(r)
    }

    /// Register memory that is not a [`Region`] (e.g. a VMM's guest memory).
    ///
    /// Registration only asks the kernel to report faults and changes of the
    /// range; the handler's bytes are written into pages nobody has
    /// populated yet. The caller must make sure no Rust object lives in the
    /// range (the memory is the application's raw memory).
    ///
    /// # Errors
    /// As [`Self::register_range`].
    pub fn register_raw(&self, range: PageRange, mode: RegisterMode) -> Result<(), UffdError> {
        if mode.is_empty() {
            return Err(UffdError::UnsupportedMode(
                userfaultfd::Error::UnsupportedIoctls(userfaultfd::IoctlFlags::empty()),
            ));
        }
        let mut reg = self.inner.registry.write();
        if self
            .inner
            .retired
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(UffdError::Stopped);
        }
        reg.insert(range, mode)?;
        if let Err(e) = self.inner.uffd.register_with_mode(
            range.start() as *mut libc::c_void,
            range.len() as usize,
            mode.to_uffd(),
        ) {
            reg.cut(range.start(), range.end());
            return Err(UffdError::UnsupportedMode(e));
        }
        Ok(())
    }

    /// Unregister `range` (it may be part of a registration, which is split).
    ///
    /// # Errors
    /// [`UffdError::NotRegistered`] when part of it is not registered
    /// (nothing changes then).
    pub fn unregister(&self, range: PageRange) -> Result<(), UffdError> {
        let mut reg = self.inner.registry.write();
        if !reg.covers(range.start(), range.end()) {
            return Err(UffdError::NotRegistered {
                start: range.start(),
                end: range.end(),
            });
        }
        self.inner
            .uffd
            .unregister(range.start() as *mut libc::c_void, range.len() as usize)
            .map_err(|e| UffdError::Ioctl {
                op: "UFFDIO_UNREGISTER",
                source: std::io::Error::other(e),
            })?;
        reg.cut(range.start(), range.end());
        Ok(())
    }

    /// The registered ranges, in address order, in the application's order
    /// (see [`Self::registration`]).
    pub fn registered(&self) -> Vec<Registration> {
        self.inner.wait_applied();
        self.inner.registry.read().all()
    }

    /// The registration containing `addr`.
    ///
    /// In the application's order: every `munmap`, `mremap` or `madvise`
    /// that returned (in any thread) before this call is reflected, since
    /// the call first waits for the monitor to apply the events it has read
    /// ([`Self::sync`]; one load when nothing is pending). So a lookup right
    /// after `munmap` returned sees the registration cut.
    ///
    /// # Locking
    /// Must not be called while holding a lock that the monitor's
    /// subscribers take in their invalidation callbacks (it may wait for
    /// the monitor); a subscriber's callback itself may call it.
    pub fn registration(&self, addr: u64) -> Option<Registration> {
        self.inner.wait_applied();
        self.inner.registry.read().lookup(addr)
    }

    /// Start (or restart) dirty tracking of `range` (registered with
    /// [`RegisterMode::WP`]): write-protect it, forget its dirty pages, and
    /// announce an [`Event::SoftDirty`] invalidation of `range` so that
    /// secondaries drop write permission (the kernel's soft-dirty
    /// `clear_refs` does the same). Writes then raise write-protect faults,
    /// which the monitor logs (see [`Self::take_dirty`]) and un-protects.
    ///
    /// # Errors
    /// [`UffdError::NotRegistered`] unless all of `range` is registered
    /// with WP; [`UffdError::Ioctl`] when the kernel refuses.
    pub fn write_protect(&self, range: PageRange) -> Result<(), UffdError> {
        {
            let reg = self.inner.registry.read();
            let mut at = range.start();
            while at < range.end() {
                match reg.lookup(at) {
                    Some(r) if r.mode.contains(RegisterMode::WP) => at = r.range.end(),
                    _ => {
                        return Err(UffdError::NotRegistered {
                            start: range.start(),
                            end: range.end(),
                        })
                    }
                }
            }
        }
        let inv = self
            .inner
            .subs
            .invalidate_range_start(&InvalidateRange::new(range, Event::SoftDirty))?;
        let r = sys::writeprotect(self.inner.fd(), range.start(), range.len(), true, false);
        self.inner
            .registry
            .write()
            .clear_dirty(range.start(), range.end());
        inv.end();
        Counters::inc(&self.inner.counters.invalidations);
        r.map_err(|e| UffdError::ioctl("UFFDIO_WRITEPROTECT", e))
    }

    /// The pages of `range` written since [`Self::write_protect`], in order;
    /// they are forgotten (the log is read once). The pages stay writable
    /// until the next `write_protect`.
    pub fn take_dirty(&self, range: PageRange) -> Vec<u64> {
        self.inner
            .registry
            .write()
            .clear_dirty(range.start(), range.end())
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// The last failure reported (handler error or panic, subscriber panic,
    /// failed ioctl), if any.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().clone()
    }

    /// The raw userfaultfd, for polling it in the user's own event loop
    /// before calling [`Self::handle_pending`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd()
    }
}

/// Wrap a descriptor in the `userfaultfd` crate's type.
pub(crate) fn to_uffd(fd: OwnedFd) -> userfaultfd::Uffd {
    sys::uffd_from_owned(fd)
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<UffdMonitor>();
}
