//! # notifier-uffd
//!
//! Real process memory as a primary address space, watched through
//! userfaultfd: mapping changes of registered ranges become notifier
//! invalidations on a [`NotifierSubscriptions`], missing pages are served
//! by a [`FaultHandler`], and [`UffdPrimary`] lets the secondary-MMU
//! toolkit mirror the memory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use notifier_uffd::{Fill, RegisterMode, Region, UffdMonitor};
//!
//! let monitor = UffdMonitor::builder().build(Arc::new(|f: &notifier_uffd::PageFault, page: &mut notifier_uffd::PageBuf| {
//!     page.fill(f.pgoff as u8);
//!     Ok(Fill::Bytes)
//! }))?;
//! let region = Region::anon(16 * 4096)?;
//! monitor.register(&region, RegisterMode::MISSING)?;
//! let _thread = monitor.spawn()?;
//! assert_eq!(region.read_u8(3 * 4096)?, 3); // served by the handler
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What each kernel event guarantees, and what a subscriber may assume
//!
//! | kernel event | raised by | when the kernel announces it | our invalidation |
//! |---|---|---|---|
//! | `UFFD_EVENT_REMOVE` | `madvise(DONTNEED / FREE / REMOVE)` | **before** the zap; the madvise caller sleeps only until the event is **read**, then zaps | [`Event::Clear`] of the range |
//! | `UFFD_EVENT_UNMAP` | `munmap`, `mmap(MAP_FIXED)` over, `mremap` shrinking | **after** the pages are unmapped (the caller sleeps until the event is read) | [`Event::Unmap`] of the range; the registration is cut |
//! | `UFFD_EVENT_REMAP` | `mremap` moving a range | **after** the move | [`Event::Unmap`] of the **old** range; the registration moves to the new address |
//! | `UFFD_EVENT_FORK` | `fork` | during fork; the parent's fork waits until it is read | none: see [`ForkPolicy`] |
//!
//! What follows for a subscriber:
//!
//! - **REMOVE**: we read the event, and only then run the invalidation. By
//!   then the kernel has let madvise go on, so our `invalidate_range_start`
//!   **runs concurrently with the zap** (it may start before, during or after
//!   it). A subscriber therefore cannot rely on the old contents being there
//!   while it invalidates; what it gets is the promise that any fault on the
//!   range raised after the zap is served only after its invalidation has
//!   run (see *Ordering*), so it never mixes a translation made before the
//!   REMOVE with data served after it. With the VA-as-PFN model of
//!   [`RealMemory`] no frame is freed under a secondary: a stale
//!   translation reads the new (zero or re-served) contents.
//!   Secondaries that may touch the range *while* it is zapped must be
//!   told first: see *Zapping memory that devices use* below.
//! - **UNMAP / REMAP**: the memory is **already gone** when subscribers hear
//!   of it. A secondary must never touch a range except between its
//!   registration and the invalidation that removes it; a device access
//!   through [`RealMemory`] that races the unmap gets a typed error (the
//!   access goes through `process_vm_readv`/`writev`, never a CPU load),
//!   or, after `MAP_FIXED`, reaches the new mapping's memory.
//!
//! # The application's order
//!
//! Once `munmap`, `mremap` or `madvise` of watched memory has returned in
//! any thread, every monitor query that starts afterwards
//! ([`UffdMonitor::registration`], [`UffdMonitor::is_watched`],
//! [`UffdMonitor::sync`], [`UffdMonitor::watch`], `UffdPrimary::fault_page`
//! and `ensure_covered`) sees it applied: the monitor brackets every batch
//! it reads with the notifier set's event gate
//! ([`EventGate`](notifier_core::notifier::EventGate)) and queries wait on
//! it (one load when nothing is pending). See docs/DESIGN.md, "Real
//! memory: the application's order", for the diagram per event kind.
//!
//! # Coverage and the events-only mode
//!
//! [`UffdMonitor::watch`] watches byte ranges of any alignment, uniting
//! them with what is watched (no `Overlap` for a buffer sharing a page),
//! [`UffdMonitor::unwatch`] undoes it; [`RegisterMode::EVENTS`] reports
//! REMOVE, UNMAP and REMAP without any fault, so first touches run at
//! kernel speed. [`UffdPrimary`] implements `Primary::ensure_covered` with
//! it, and [`UffdMonitor::watch_process`] watches every anonymous mapping
//! of the process (see its docs for what it cannot cover).
//!
//! # Stopping never hangs
//!
//! Stopping the [`HandlerThread`] retires the monitor: its fault-serving
//! ranges move to a `UFFD_FEATURE_SIGBUS` userfaultfd (a fault there
//! raises SIGBUS instead of sleeping), its descriptor is closed in place
//! (every thread sleeping in a fault or an unmap wakes), its registrations
//! are dropped with invalidations and the event gate is closed.
//! - Hole punching a memfd (`fallocate(PUNCH_HOLE)`) raises **no** event; use
//!   `madvise(MADV_REMOVE)` on the mapping.
//!
//! # Zapping memory that devices use: announce the madvise
//!
//! A mirror over real memory ([`UffdPrimary`]) accesses a page with a CPU
//! load or store under the mirror's device lock. If the application zaps
//! that page with a plain `madvise(DONTNEED / FREE / REMOVE)` while a
//! device is using it, this can happen:
//!
//! ```text
//!   application          monitor driver              device thread
//!   madvise(page)
//!     REMOVE queued  -->  read(REMOVE)
//!     (released by        invalidate_range_start
//!      the read) zap        mirror callback:          lock(device)
//!                           lock(device) ... waits    load(page): zapped ->
//!                                                     missing fault, which
//!                                                     only the driver serves
//! ```
//!
//! The driver waits for the device lock, the device waits for the driver:
//! both hang for good, and since the driver serves every fault of the
//! monitor, so does every later fault on registered memory (the `madvise`
//! caller itself returns). Nothing reports it.
//!
//! **What an application must do**: zap memory that a device may be
//! accessing concurrently with [`UffdMonitor::madvise`] (for a [`Region`])
//! or [`UffdMonitor::announce_remove`] (for other memory). They bracket the
//! zap with an [`Event::Clear`] invalidation on the calling thread, so
//! devices drop the translations before any page goes and cannot take them
//! again until the zap is done; the monitor then dispatches no second
//! invalidation for the kernel's REMOVE. A plain `madvise` is fine when no
//! device can access the range at that moment (devices idle, or no mirror
//! over it): its REMOVE still becomes an invalidation with the ordering
//! guarantee above. (UNMAP and REMAP cannot be announced usefully, since
//! the memory is gone either way: keep devices off a range while
//! unmapping it.)
//!
//! # Keep the monitor driven
//!
//! While the userfaultfd is open, a `munmap`, `madvise`, `mremap` or `fork`
//! touching registered memory **sleeps until its event is read**, and a
//! fault until it is served. So keep the monitor driven (a
//! [`HandlerThread`] from [`UffdMonitor::spawn`], or your own loop calling
//! [`UffdMonitor::handle_pending`]) until the memory is unregistered or the
//! monitor is dropped (closing the descriptor wakes everyone). In Rust
//! terms: create the handler thread before the [`Region`]s it watches, so
//! that they are dropped (unmapped) first.
//!
//! # Ordering (causality)
//!
//! See the `dispatch` module: within every `read(2)` batch the mapping
//! changes are applied before the faults are served; a fill ioctl answering
//! `EAGAIN` (a change is pending) makes us read and apply the pending
//! changes, ask the handler again and retry; `EEXIST` (populated
//! meanwhile) just wakes the faulting threads; a fault on a page no longer
//! registered is woken. Hence a REMOVE is applied before any later fault on
//! its range is served, and no fault read is left unanswered.
//!
//! # Failures
//!
//! A handler that fails or panics (caught), or an unexpected ioctl error,
//! never leaves the faulting thread asleep: the page is poisoned with
//! `UFFDIO_POISON` and the thread woken, so its access raises **SIGBUS**
//! (without `UFFD_FEATURE_POISON`, SIGBUS is sent to the faulting thread
//! with `tgkill`). The monitor's own descriptor does not use
//! `UFFD_FEATURE_SIGBUS` (it turns *every* missing fault into SIGBUS); a
//! retired monitor hands its ranges to a second descriptor that does. A
//! subscriber that panics during an invalidation is caught too; the
//! bracket still ends and the registry is still updated. Every failure is
//! counted ([`Stats`]) and the last one kept ([`UffdMonitor::last_error`]).
//!
//! # Privileges
//!
//! [`MonitorBuilder::build`] tries `/dev/userfaultfd` first (root-only by
//! default; serves kernel-mode faults too), then `userfaultfd(2)` with
//! `UFFD_USER_MODE_ONLY` (works unprivileged), and returns
//! [`UffdError::Unavailable`] with both causes when neither works.
//!
//! # A bounded event path
//!
//! The kernel itself applies back-pressure: a thread that unmaps, madvises,
//! remaps or forks sleeps until its event is read, so at most one event
//! per application thread is queued. We read into a fixed buffer of
//! `batch` messages, merge consecutive same-kind ranges that touch or
//! overlap into one invalidation, and apply them before reading on. The
//! queue of faults read but not served holds at most one entry per
//! faulting thread. The registry only shrinks on unmap. So memory stays
//! bounded however fast the application unmaps (see the
//! `uffd_unmap_storm` example for the peak RSS over 1,000,000 unmaps).
//!
//! # Unsafe
//!
//! Only in the `sys` and `sys_vm` modules, every block with a `SAFETY`
//! comment.
//!
//! Guide (repository `docs/guide/rdma-real-memory.md`): the monitor
//! driving an RDMA registration cache over real memory.
//!
//! # Stability
//!
//! Pre-1.0: any 0.x release may change the API; breaking changes bump the
//! minor version and are listed in the commit log.
//! The monitor, the primary and the fault handlers are the product; the
//! process helpers (`run_in_child`, `drop_privileges`, `peak_rss_kib`) are
//! test scaffolding and may move behind a feature or out of the crate.
//!
//! [`NotifierSubscriptions`]: notifier_core::notifier::NotifierSubscriptions
//! [`Event::Clear`]: notifier_core::notifier::Event::Clear
//! [`Event::Unmap`]: notifier_core::notifier::Event::Unmap

mod announce;
mod dispatch;
mod error;
mod handler;
mod memory;
mod monitor;
mod open;
mod order;
mod process;
mod registry;
mod stats;
mod sys;
mod sys_vm;
mod thread;
mod watch;

pub use error::UffdError;
pub use handler::{FaultError, FaultHandler, Fill, PageBuf, PageFault, ZeroHandler};
pub use memory::{RealMemory, UffdPrimary};
pub use monitor::{ForkPolicy, MonitorBuilder, UffdMonitor};
pub use open::OpenPath;
pub use process::ProcessScan;
pub use registry::{RegisterMode, Registration};
pub use stats::Stats;
pub use sys::{drop_privileges, geteuid, peak_rss_kib, run_in_child, Advice, ChildExit, Region};
pub use thread::HandlerThread;

/// Whether real-kernel tests must fail instead of skipping when userfaultfd
/// is unavailable (`NOTIFIER_REQUIRE_UFFD=1`).
pub fn uffd_required() -> bool {
    std::env::var("NOTIFIER_REQUIRE_UFFD").is_ok_and(|v| v == "1")
}
