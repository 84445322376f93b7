//! What a monitor tells C: invalidation hooks, and range generations for a
//! `valid(addr, len)` check that takes no lock and makes no system call.
//!
//! # The notify path allocates nothing and takes no lock
//!
//! The monitor's thread reads a userfaultfd event and runs the notifier
//! set's `invalidate_range_start`, which calls [`Dispatcher`]: it bumps the
//! range's `begun` generations, calls each live hook, and at
//! `invalidate_range_end` bumps `ended`. All of it is atomic loads, stores
//! and increments on fixed arrays: no allocation (a thread inside `free()`
//! holding a malloc arena lock may be waiting for this very event to be
//! read: libfabric issue 5554), and no lock of ours (so a hook may take a
//! lock that a thread calling `subscribe`/`valid` holds, as libfabric's
//! `notify` takes `mm_lock`: libfabric issue 9003). `tests/notify_path.rs`
//! counts allocations on this path.
//!
//! # Hook slots
//!
//! | `state` | meaning |
//! |---|---|
//! | `FREE` | unused; `add` claims it with a compare-exchange to `SETTING` |
//! | `SETTING` | `add` is storing `hook` and `arg` |
//! | `LIVE` | dispatched (`hook`/`arg` published by the Release store of `LIVE`) |
//! | `REMOVING` | `remove` waits until `active` is 0, then stores `FREE` |
//!
//! # Pairing
//! Dispatch increments `active` *before* loading `state`, `remove` stores
//! `REMOVING` *before* loading `active` (all SeqCst): either the dispatcher
//! sees `REMOVING` and skips the hook, or `remove` sees its `active` and
//! waits. After `remove` returns the hook is never called again.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};

use crate::status::{Failure, Res, NOTIFIER_EBUSY, NOTIFIER_EINVAL, NOTIFIER_ELIMIT};
use crate::sys::{self, RawHook};

/// Hooks per monitor.
pub(crate) const MAX_HOOKS: usize = 16;

const FREE: u32 = 0;
const SETTING: u32 = 1;
const LIVE: u32 = 2;
const REMOVING: u32 = 3;

/// Generation buckets: 2 MiB windows, hashed.
pub(crate) const GEN_BUCKETS: usize = 1024;
const GEN_SHIFT: u32 = 21;

thread_local! {
    /// Depth of hook calls on this thread (const-initialised: reading it
    /// allocates nothing).
    static IN_HOOK: Cell<u32> = const { Cell::new(0) };
}

/// Whether this thread is inside one of our hook calls (a call that would
/// wait for the monitor's thread would wait for itself).
pub(crate) fn in_hook() -> bool {
    IN_HOOK.with(|c| c.get() > 0)
}

struct HookSlot {
    state: AtomicU32,
    active: AtomicU32,
    hook: AtomicUsize,
    arg: AtomicUsize,
}

/// The C event code of an invalidation (`NOTIFIER_EVENT_*`).
pub(crate) fn event_code(e: Event) -> u32 {
    match e {
        Event::Unmap => 1,
        Event::Clear => 2,
        Event::ProtectionVma => 3,
        Event::ProtectionPage => 4,
        Event::SoftDirty => 5,
        Event::Release => 6,
        Event::Migrate => 7,
        Event::Exclusive => 8,
        _ => 0,
    }
}

/// What a monitor shares with its dispatcher and its exported libfabric
/// monitors.
pub(crate) struct Shared {
    hooks: [HookSlot; MAX_HOOKS],
    begun: [AtomicU64; GEN_BUCKETS],
    ended: [AtomicU64; GEN_BUCKETS],
    /// Invalidations completed.
    completed: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            hooks: std::array::from_fn(|_| HookSlot {
                state: AtomicU32::new(FREE),
                active: AtomicU32::new(0),
                hook: AtomicUsize::new(0),
                arg: AtomicUsize::new(0),
            }),
            begun: std::array::from_fn(|_| AtomicU64::new(0)),
            ended: std::array::from_fn(|_| AtomicU64::new(0)),
            completed: AtomicU64::new(0),
        }
    }
}

/// Call `f` on each generation bucket of `[start, end)` once (every bucket
/// when the range spans as many windows as there are buckets).
#[inline]
fn for_buckets(start: u64, end: u64, mut f: impl FnMut(usize)) {
    if end <= start {
        return;
    }
    let first = start >> GEN_SHIFT;
    let last = (end - 1) >> GEN_SHIFT;
    if last - first >= GEN_BUCKETS as u64 - 1 {
        (0..GEN_BUCKETS).for_each(f);
    } else {
        (first..=last).for_each(|w| f(w as usize % GEN_BUCKETS));
    }
}

impl Shared {
    /// Add a hook; returns its id.
    ///
    /// The hook may be called from any thread (usually the monitor's)
    /// until [`Self::remove_hook`] returns.
    pub(crate) fn add_hook(&self, hook: RawHook, arg: usize) -> Res<u32> {
        for (i, s) in self.hooks.iter().enumerate() {
            if s.state
                .compare_exchange(FREE, SETTING, SeqCst, Relaxed)
                .is_ok()
            {
                s.hook.store(sys::hook_addr(hook), Relaxed);
                s.arg.store(arg, Relaxed);
                // Release: publishes `hook` and `arg` to the dispatcher's load of `state`.
                s.state.store(LIVE, SeqCst);
                return Ok(i as u32);
            }
        }
        Err(Failure::new(
            NOTIFIER_ELIMIT,
            format!("{MAX_HOOKS} hooks already on this monitor"),
        ))
    }

    /// Remove a hook; when this returns it is not running and will not be
    /// called again. Waits for a call in progress on another thread.
    ///
    /// # Errors
    /// `NOTIFIER_EBUSY` from inside a hook (it would wait for itself),
    /// `NOTIFIER_EINVAL` for an id that is not a live hook.
    pub(crate) fn remove_hook(&self, id: u32) -> Res {
        if in_hook() {
            return Err(Failure::new(
                NOTIFIER_EBUSY,
                "a hook cannot be removed from inside a hook",
            ));
        }
        let Some(s) = self.hooks.get(id as usize) else {
            return Err(Failure::new(NOTIFIER_EINVAL, format!("no hook {id}")));
        };
        if s.state
            .compare_exchange(LIVE, REMOVING, SeqCst, Relaxed)
            .is_err()
        {
            return Err(Failure::new(
                NOTIFIER_EINVAL,
                format!("hook {id} is not live"),
            ));
        }
        // SeqCst: pairs with the dispatcher's increment of `active` before
        // its load of `state` (see the module docs).
        let mut spins = 0u32;
        while s.active.load(SeqCst) != 0 {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        s.state.store(FREE, SeqCst);
        Ok(())
    }

    /// Call every live hook for `[start, end)`.
    #[inline]
    fn dispatch(&self, start: u64, end: u64, event: u32) {
        IN_HOOK.with(|c| c.set(c.get() + 1));
        for s in &self.hooks {
            // Cheap skip of free slots without touching `active`.
            if s.state.load(Relaxed) == FREE {
                continue;
            }
            s.active.fetch_add(1, SeqCst);
            if s.state.load(SeqCst) == LIVE {
                let (h, a) = (s.hook.load(Relaxed), s.arg.load(Relaxed));
                // SAFETY: `h` was stored by `add_hook` from a `RawHook`;
                // its owner keeps `a` valid until `remove_hook` returns,
                // which cannot happen while `active` counts this call.
                unsafe { sys::call_hook(h, a, start, end - start, event) };
            }
            s.active.fetch_sub(1, Release);
        }
        IN_HOOK.with(|c| c.set(c.get() - 1));
    }

    /// Whether no invalidation overlapping `[start, start + len)` has begun
    /// and not ended (its hooks not all returned). Loads only: no lock, no
    /// system call. Buckets are shared by addresses 2 GiB apart, so it may
    /// answer false for a range nothing touched (never true for one that
    /// is being invalidated).
    #[inline]
    pub(crate) fn valid(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len.max(1));
        let mut ok = true;
        for_buckets(start & !0xfff, end, |b| {
            // Acquire pairs with the Release increments of the dispatcher.
            ok &= self.begun[b].load(Acquire) == self.ended[b].load(Acquire);
        });
        ok
    }

    /// Invalidations completed so far.
    pub(crate) fn generation(&self) -> u64 {
        self.completed.load(Acquire)
    }
}

/// The monitor's subscriber on its notifier set: range generations and
/// hooks.
pub(crate) struct Dispatcher(pub(crate) std::sync::Arc<Shared>);

impl MmuNotifierOps for Dispatcher {
    fn hooks(&self) -> Hooks {
        Hooks::START_END
    }

    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        let sh = &*self.0;
        for_buckets(r.start(), r.end(), |b| {
            sh.begun[b].fetch_add(1, SeqCst);
        });
        sh.dispatch(r.start(), r.end(), event_code(r.event()));
        Ok(())
    }

    fn invalidate_range_end(&self, r: &InvalidateRange) {
        let sh = &*self.0;
        for_buckets(r.start(), r.end(), |b| {
            sh.ended[b].fetch_add(1, Release);
        });
        sh.completed.fetch_add(1, Release);
    }
}
