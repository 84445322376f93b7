//! The event loop: read messages, apply mapping changes as invalidations
//! (coalesced), then serve faults, honouring the kernel's ordering rules.
//!
//! # Ordering
//!
//! ```text
//!   read(2) batch  = [faults..., changes...]   (the kernel hands out queued
//!                                               faults before other events)
//!   1. apply every change of the batch, in order, adjacent same-kind ranges
//!      merged into one bracket  -> REMOVE/UNMAP/REMAP invalidations done
//!      (a REMOVE covered by an announced zap in progress is skipped: its
//!      announcer's bracket already covers it, see `announce`)
//!   2. serve the faults of the batch, in order:
//!        fill ioctl == EAGAIN  -> a mapping change is pending: read more,
//!                                 apply its changes (step 1), ask the
//!                                 handler again, retry
//!        fill ioctl == EEXIST  -> populated meanwhile: UFFDIO_WAKE
//!        page not registered   -> (unmapped meanwhile) UFFDIO_WAKE; a
//!                                 missing page still mapped: zero page
//!        handler fails/panics  -> UFFDIO_POISON + wake (SIGBUS)
//! ```
//!
//! A REMOVE is read before the kernel zaps anything, so a fault on a
//! zapped page is raised after the REMOVE was read, and it is served only
//! after step 1 applied that REMOVE (same batch: step 1 runs first; later
//! batch: trivially). Faults read together with a change are also served
//! after it, and a fill racing a change that is still queued fails with
//! EAGAIN instead of installing a page the change would miss. Every fault
//! read is either filled (which wakes), woken, or poisoned and woken: no
//! faulting thread is left asleep.
//!
//! # Locking
//! The caller holds the monitor's loop lock (`Inner::looper`) throughout;
//! the registry lock is taken briefly and never across a handler call, an
//! ioctl or a notifier callback.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use notifier_core::addr::PageRange;
use notifier_core::notifier::{Event, InvalidateRange, NotifierError, NotifierSubscriptions};
use notifier_core::PAGE_SIZE;
use userfaultfd::{EventBuffer, FaultKind, ReadWrite};

use crate::error::UffdError;
use crate::handler::{Fill, PageBuf, PageFault};
use crate::monitor::{ForkPolicy, Inner, UffdMonitor};
use crate::stats::Counters;
use crate::sys::{self, feature};

const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// A fault read but not yet served.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    addr: u64,
    kind: FaultKind,
    write: bool,
    tid: Option<i32>,
}

/// The loop's buffers: fixed size, so the event path holds bounded memory.
pub(crate) struct LoopState {
    buf: EventBuffer,
    batch: usize,
    /// Faults read and not yet served (at most one per faulting thread: a
    /// faulting thread sleeps until served).
    faults: VecDeque<Fault>,
    /// Child userfaultfds read from FORK events, handed off after the batch
    /// (pre-reserved: nothing is allocated between reading a FORK event and
    /// the end of the batch, see `ForkPolicy`).
    forks: Vec<userfaultfd::Uffd>,
    page: Box<PageBuf>,
}

impl LoopState {
    pub(crate) fn new(batch: usize) -> Self {
        Self {
            buf: EventBuffer::new(batch),
            batch,
            faults: VecDeque::with_capacity(batch),
            forks: Vec::with_capacity(batch),
            page: Box::new([0; PAGE_SIZE as usize]),
        }
    }
}

/// Merges consecutive REMOVE (or UNMAP) ranges that touch or overlap into
/// one invalidation. Only consecutive events of one kind merge, so the
/// order of changes is kept.
#[derive(Default)]
struct Coalescer {
    pending: Option<(Event, u64, u64)>,
}

impl Coalescer {
    fn push(&mut self, inner: &Inner, ev: Event, s: u64, e: u64) {
        let (s, e) = page_bounds(s, e);
        if let Some((pev, ps, pe)) = &mut self.pending {
            if *pev == ev && s <= *pe && *ps <= e {
                *ps = (*ps).min(s);
                *pe = (*pe).max(e);
                Counters::inc(&inner.counters.coalesced);
                return;
            }
        }
        self.flush(inner);
        self.pending = Some((ev, s, e));
    }

    fn flush(&mut self, inner: &Inner) {
        if let Some((ev, s, e)) = self.pending.take() {
            let Ok(range) = PageRange::from_bounds(s, e) else {
                return;
            };
            inner.invalidate(range, ev, || {
                if ev == Event::Unmap {
                    inner.registry.write().cut(s, e);
                }
            });
        }
    }
}

/// `[s, e)` widened to page boundaries.
fn page_bounds(s: u64, e: u64) -> (u64, u64) {
    (s & !PAGE_MASK, e.saturating_add(PAGE_MASK) & !PAGE_MASK)
}

fn panic_msg(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl UffdMonitor {
    /// Read and handle everything pending, without blocking: apply mapping
    /// changes as invalidations, serve faults. Returns the number of
    /// messages handled. Use it from your own event loop (poll
    /// [`UffdMonitor::as_fd`] for input) instead of [`UffdMonitor::spawn`].
    ///
    /// Must not be called from a thread that may itself fault on registered
    /// memory (it would wait for itself).
    ///
    /// # Errors
    /// [`UffdError::Read`] when reading the userfaultfd fails,
    /// [`UffdError::Stopped`] once the monitor was retired.
    ///
    /// # Locking
    /// Takes the monitor's loop lock: one driver at a time.
    pub fn handle_pending(&self) -> Result<usize, UffdError> {
        let mut st = self.inner.looper.lock();
        if self
            .inner
            .retired
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(UffdError::Stopped);
        }
        self.inner.pump(&mut st)
    }
}

impl Inner {
    /// Read batches until the descriptor is drained (or a budget is spent),
    /// applying changes and serving faults.
    pub(crate) fn pump(&self, st: &mut LoopState) -> Result<usize, UffdError> {
        let mut n = 0;
        loop {
            let got = self.read_batch(st)?;
            n += got;
            while let Some(f) = st.faults.pop_front() {
                self.serve(st, f);
            }
            // A short read means the queue was empty at that moment.
            if got < st.batch || n >= 64 * st.batch {
                return Ok(n);
            }
        }
    }

    /// One `read(2)`: changes are applied at once (coalesced), faults queued.
    fn read_batch(&self, st: &mut LoopState) -> Result<usize, UffdError> {
        let LoopState {
            buf,
            faults,
            forks,
            batch,
            ..
        } = st;
        let batch = *batch;
        // The application's order (see `notifier_core::notifier::EventGate`):
        // the gate is odd from before the read that releases an unmapping
        // thread until every change read has been applied. A non-blocking
        // read with nothing queued keeps it odd for one system call only.
        let gate = self.begin_batch();
        let events = self.uffd.read_events(buf).map_err(UffdError::Read)?;
        let mut co = Coalescer::default();
        let mut n = 0;
        let c = &self.counters;
        for ev in events {
            n += 1;
            match ev {
                Ok(userfaultfd::Event::Pagefault {
                    kind,
                    rw,
                    addr,
                    thread_id,
                }) => {
                    Counters::inc(match kind {
                        FaultKind::Missing => &c.missing_faults,
                        FaultKind::Minor => &c.minor_faults,
                        FaultKind::WriteProtected => &c.wp_faults,
                    });
                    let tid = (self.features & feature::THREAD_ID != 0).then(|| thread_id.as_raw());
                    faults.push_back(Fault {
                        addr: addr as u64,
                        kind,
                        write: rw == ReadWrite::Write,
                        tid,
                    });
                }
                Ok(userfaultfd::Event::Remove { start, end }) => {
                    Counters::inc(&c.removes);
                    let (s, e) = page_bounds(start as u64, end as u64);
                    if self.announced.covers(s, e) {
                        // Its announcer's bracket covers the zap (see
                        // `announce`): no second invalidation.
                        Counters::inc(&c.announced_removes);
                    } else {
                        co.push(self, Event::Clear, s, e);
                    }
                }
                Ok(userfaultfd::Event::Unmap { start, end }) => {
                    Counters::inc(&c.unmaps);
                    co.push(self, Event::Unmap, start as u64, end as u64);
                }
                Ok(userfaultfd::Event::Remap { from, to, len }) => {
                    Counters::inc(&c.remaps);
                    co.flush(self);
                    let (from, to, len) = (from as u64, to as u64, len as u64);
                    if let Ok(range) =
                        PageRange::new(from & !PAGE_MASK, (len + PAGE_MASK) & !PAGE_MASK)
                    {
                        self.invalidate(range, Event::Unmap, || {
                            self.registry.write().remap(from, to, len)
                        });
                    }
                }
                Ok(userfaultfd::Event::Fork { uffd }) => {
                    Counters::inc(&c.forks);
                    co.flush(self);
                    forks.push(uffd);
                }
                Err(e) => self.report(format!("bad userfaultfd message: {e}")),
            }
        }
        co.flush(self);
        drop(gate);
        for child in forks.drain(..) {
            self.fork_event(child, batch);
        }
        Ok(n)
    }

    /// Bracket `update` with an invalidation of `range` for `ev`. A failing
    /// subscriber (panic, refusal) is reported; `update` runs regardless.
    pub(crate) fn invalidate(&self, range: PageRange, ev: Event, update: impl FnOnce()) {
        let mut update = Some(update);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let inv = self
                .subs
                .invalidate_range_start(&InvalidateRange::new(range, ev))?;
            if let Some(u) = update.take() {
                u();
            }
            inv.try_end()
        }));
        match r {
            Ok(Ok(())) => Counters::inc(&self.counters.invalidations),
            Ok(Err(e)) => {
                // The core contains subscriber panics and reports them.
                if matches!(e, NotifierError::SubscriberPanicked { .. }) {
                    Counters::inc(&self.counters.subscriber_failures);
                }
                self.report(format!(
                    "invalidation of {range:?} ({}) failed: {e}",
                    ev.name()
                ))
            }
            Err(p) => {
                Counters::inc(&self.counters.subscriber_failures);
                self.report(format!(
                    "subscriber panicked in invalidation of {range:?} ({}): {}",
                    ev.name(),
                    panic_msg(&*p)
                ));
            }
        }
        if let Some(u) = update.take() {
            u();
        }
    }

    /// Serve one fault (see the module docs for the cases).
    fn serve(&self, st: &mut LoopState, f: Fault) {
        let page = f.addr & !PAGE_MASK;
        let fd = self.uffd.as_fd();
        loop {
            let Some(reg) = self.registry.read().lookup(page) else {
                // Unmapped meanwhile (the wake lets the thread see that),
                // or registered in the kernel while our registry lost it
                // (see `watch`: an UNMAP of older memory at this address
                // applied after the new memory was registered): serve it as
                // ordinary memory, a zero page, so the thread never
                // refaults forever.
                Counters::inc(&self.counters.stale_faults);
                if f.kind != FaultKind::Missing || sys::zeropage(fd, page, PAGE_SIZE, true).is_err()
                {
                    let _ = sys::wake(fd, page, PAGE_SIZE);
                }
                return;
            };
            let pf = PageFault {
                range: reg.range,
                pgoff: reg.pgoff + (page - reg.range.start()) / PAGE_SIZE,
                addr: page,
                write: f.write,
                thread_id: f.tid,
            };
            let res = match f.kind {
                FaultKind::Missing => {
                    match catch_unwind(AssertUnwindSafe(|| self.handler.missing(&pf, &mut st.page)))
                    {
                        Ok(Ok(Fill::Bytes)) => sys::copy(fd, page, &st.page, true)
                            .inspect(|_| Counters::inc(&self.counters.copies)),
                        Ok(Ok(Fill::Zero)) => sys::zeropage(fd, page, PAGE_SIZE, true)
                            .inspect(|_| Counters::inc(&self.counters.zeropages)),
                        Ok(Err(e)) => return self.fail(st, page, f.tid, e.to_string()),
                        Err(p) => {
                            Counters::inc(&self.counters.handler_panics);
                            return self.fail(
                                st,
                                page,
                                f.tid,
                                format!("fault handler panicked at {page:#x}: {}", panic_msg(&*p)),
                            );
                        }
                    }
                }
                FaultKind::Minor => {
                    match catch_unwind(AssertUnwindSafe(|| self.handler.minor(&pf))) {
                        Ok(Ok(())) => sys::cont(fd, page, PAGE_SIZE, true)
                            .inspect(|_| Counters::inc(&self.counters.continues)),
                        Ok(Err(e)) => return self.fail(st, page, f.tid, e.to_string()),
                        Err(p) => {
                            Counters::inc(&self.counters.handler_panics);
                            return self.fail(
                                st,
                                page,
                                f.tid,
                                format!("minor handler panicked at {page:#x}: {}", panic_msg(&*p)),
                            );
                        }
                    }
                }
                FaultKind::WriteProtected => {
                    self.registry.write().mark_dirty(page);
                    sys::writeprotect(fd, page, PAGE_SIZE, false, true)
                }
            };
            match res {
                Ok(()) => return,
                Err(libc::EAGAIN) => {
                    Counters::inc(&self.counters.eagain);
                    self.wait_for_changes(st);
                }
                Err(libc::EEXIST) => {
                    Counters::inc(&self.counters.eexist);
                    let _ = sys::wake(fd, page, PAGE_SIZE);
                    return;
                }
                Err(libc::ENOENT | libc::EFAULT | libc::ESRCH) => {
                    // The mapping went away (or the process is exiting).
                    Counters::inc(&self.counters.stale_faults);
                    let _ = sys::wake(fd, page, PAGE_SIZE);
                    return;
                }
                Err(e) => {
                    let msg = format!(
                        "serving fault at {page:#x}: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                    return self.fail(st, page, f.tid, msg);
                }
            }
        }
    }

    /// A fill answered EAGAIN: read the pending change(s) and apply them.
    fn wait_for_changes(&self, st: &mut LoopState) {
        match self.read_batch(st) {
            Ok(0) => {
                // The change is not queued yet (e.g. fork in progress):
                // wait a little for it rather than spin.
                let _ = sys::poll2(self.uffd.as_fd(), self.stop.as_fd(), 1);
            }
            Ok(_) => {}
            Err(e) => {
                self.report(e.to_string());
                let _ = sys::poll2(self.uffd.as_fd(), self.stop.as_fd(), 1);
            }
        }
    }

    /// The fault cannot be served: make the faulting thread get SIGBUS.
    ///
    /// With `UFFD_FEATURE_POISON` the page gets a poison marker and the
    /// thread is woken: its retried access raises SIGBUS, as does any later
    /// access until the page is zapped (MADV_DONTNEED) or unmapped. Without
    /// it, SIGBUS is sent to the faulting thread (`tgkill`, needs
    /// `UFFD_FEATURE_THREAD_ID`) before the wake.
    fn fail(&self, st: &mut LoopState, page: u64, tid: Option<i32>, msg: String) {
        Counters::inc(&self.counters.sigbus);
        self.report(msg);
        let fd = self.uffd.as_fd();
        if self.features & feature::POISON != 0 {
            for _ in 0..1000 {
                match sys::poison(fd, page, PAGE_SIZE, true) {
                    Ok(()) => return,
                    Err(libc::EAGAIN) => self.wait_for_changes(st),
                    Err(_) => break,
                }
            }
        }
        if let Some(tid) = tid {
            let _ = sys::tgkill(tid, libc::SIGBUS);
        }
        let _ = sys::wake(fd, page, PAGE_SIZE);
    }

    /// A `UFFD_EVENT_FORK`: refuse or hand off the child's userfaultfd.
    fn fork_event(&self, child: userfaultfd::Uffd, batch: usize) {
        match &self.fork {
            ForkPolicy::Ignore | ForkPolicy::Refuse => {
                Counters::inc(&self.counters.forks_refused);
                drop(child);
            }
            ForkPolicy::Handoff(cb) => {
                let fd = sys::owned_from_uffd(child);
                if let Err(e) = sys::set_nonblocking(fd.as_fd()) {
                    self.report(format!("fork: child userfaultfd: {e}"));
                }
                let registry = self.registry.read().fork_copy();
                let m = UffdMonitor::from_parts(
                    fd,
                    self.path,
                    self.features,
                    NotifierSubscriptions::new(),
                    Arc::clone(&self.handler),
                    ForkPolicy::Refuse,
                    batch,
                    registry,
                );
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| cb(m))) {
                    self.report(format!(
                        "fork handoff callback panicked: {}",
                        panic_msg(&*p)
                    ));
                }
            }
        }
    }
}
