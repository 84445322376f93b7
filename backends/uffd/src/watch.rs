//! Coverage that follows registration: watching byte ranges of any
//! alignment ([`UffdMonitor::watch`]), uniting them with what is watched
//! already, and the events-only mode ([`RegisterMode::EVENTS`]).
//!
//! # Uniting watches
//!
//! A watch is rounded out to whole pages, and only the pages of it that no
//! registration covers yet are registered: a small allocation sharing a
//! page with a watched buffer, or a buffer next to one, simply extends the
//! coverage (the kernel merges the VMAs again). Parts already covered keep
//! their mode: they are registered again with the mode recorded for them
//! (a no-op for the kernel when the memory is the one registered; when it
//! is new memory mapped where an unmap not yet reported freed the old,
//! this is what covers it). [`UffdMonitor::unwatch`] unregisters what is registered in
//! a range and skips the gaps.
//!
//! # Events only
//!
//! Registered with [`RegisterMode::EVENTS`] (the kernel's WP mode, never
//! write-protected), a range reports REMOVE, UNMAP and REMAP but raises no
//! fault: first touches run at kernel speed, without the monitor.
//! `UffdPrimary::fault_page` then populates a page through the kernel
//! (`MADV_POPULATE_READ` / `MADV_POPULATE_WRITE`), and `RealMemory`
//! accesses fault pages in through `process_vm_readv` / `writev`: a device
//! reaching an untouched page gets it faulted in, as ODP does.
//!
//! # Ordering
//! `watch` first waits for the monitor to apply every event it has read
//! (the event gate, see `order`): a registration of memory the application
//! already unmapped is gone before the gaps are computed, so a buffer
//! mapped again at a freed address is registered anew, never mistaken for
//! the old one.

use notifier_core::addr::PageRange;
use notifier_core::PAGE_SIZE;

use crate::error::UffdError;
use crate::monitor::UffdMonitor;
use crate::registry::RegisterMode;

/// `[addr, addr + len)` rounded out to whole pages.
pub(crate) fn page_round(addr: u64, len: u64) -> Result<PageRange, UffdError> {
    let end = addr
        .checked_add(len.max(1))
        .and_then(|e| e.checked_add(PAGE_SIZE - 1))
        .ok_or(UffdError::OutsideMapping)?
        & !(PAGE_SIZE - 1);
    let start = addr & !(PAGE_SIZE - 1);
    Ok(PageRange::from_bounds(start, end)?)
}

impl UffdMonitor {
    /// Watch `[addr, addr + len)` (any alignment; rounded out to pages)
    /// with `mode`, uniting it with what is watched already: only the
    /// pages no registration covers are registered. Returns the page range
    /// now covered. See the `watch` module docs.
    ///
    /// # Errors
    /// [`UffdError::UnsupportedMode`] when the kernel refuses a gap (a hole
    /// in the mapping, memory of a kind userfaultfd cannot watch, or a mode
    /// it refuses for it): the gaps registered before it stay registered.
    /// [`UffdError::Stopped`] once the monitor is retired.
    ///
    /// # Locking
    /// May wait for the monitor (see [`UffdMonitor::sync`]): not from a
    /// lock that subscribers take in their invalidation callbacks.
    pub fn watch(&self, addr: u64, len: u64, mode: RegisterMode) -> Result<PageRange, UffdError> {
        let range = page_round(addr, len)?;
        self.inner.wait_applied();
        for (piece, covered) in self.pieces(range) {
            if let Some(old) = covered {
                // Registered as far as we know; but the memory may be new:
                // mapped where another thread's unmap freed it, whose UNMAP
                // the kernel has not even queued yet (it does so after
                // dropping the mmap lock). Registering again with the
                // recorded mode is a no-op for memory still registered and
                // covers new memory.
                self.inner
                    .uffd
                    .register_with_mode(
                        piece.start() as *mut libc::c_void,
                        piece.len() as usize,
                        old.to_uffd(),
                    )
                    .map_err(UffdError::UnsupportedMode)?;
                continue;
            }
            match self.register_raw(piece, mode) {
                Ok(()) => {}
                // Registered meanwhile by another watcher: covered.
                Err(UffdError::Overlap { .. }) => {
                    for (g, c) in self.pieces(piece) {
                        if c.is_none() {
                            self.register_raw(g, mode)?;
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(range)
    }

    /// Stop watching `[addr, addr + len)` (any alignment; rounded out to
    /// pages): unregister what is registered there, skipping gaps.
    ///
    /// # Errors
    /// [`UffdError::Ioctl`] when the kernel refuses to unregister.
    pub fn unwatch(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = page_round(addr, len)?;
        self.inner.wait_applied();
        let pieces: Vec<PageRange> = {
            let reg = self.inner.registry.read();
            reg.all()
                .into_iter()
                .filter_map(|r| {
                    let (s, e) = (
                        r.range.start().max(range.start()),
                        r.range.end().min(range.end()),
                    );
                    (s < e).then(|| PageRange::from_bounds(s, e).ok()).flatten()
                })
                .collect()
        };
        for p in pieces {
            match self.unregister(p) {
                Ok(()) | Err(UffdError::NotRegistered { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether every page of `[addr, addr + len)` is watched, in the
    /// application's order (as [`UffdMonitor::registration`]).
    pub fn is_watched(&self, addr: u64, len: u64) -> bool {
        let Ok(range) = page_round(addr, len) else {
            return false;
        };
        self.inner.wait_applied();
        self.inner
            .registry
            .read()
            .covers(range.start(), range.end())
    }

    /// `range` cut into registered pieces (with their mode) and gaps
    /// (`None`), in address order.
    fn pieces(&self, range: PageRange) -> Vec<(PageRange, Option<RegisterMode>)> {
        let reg = self.inner.registry.read();
        let mut out = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            let (next, mode) = match reg.lookup(at) {
                Some(r) => (r.range.end().min(range.end()), Some(r.mode)),
                None => (
                    reg.next_start(at).unwrap_or(u64::MAX).min(range.end()),
                    None,
                ),
            };
            if let Ok(p) = PageRange::from_bounds(at, next) {
                out.push((p, mode));
            }
            at = next;
        }
        out
    }
}
