//! Panic containment for subscriber callbacks.
//!
//! Every callback into a subscriber runs under [`guarded`]: a panic stops
//! at the boundary, the subscriber is marked failed (unsubscribed, no
//! further callback) and the operation carries on with the machinery
//! consistent, reporting [`NotifierError::SubscriberPanicked`]. Without a
//! panic the guard costs nothing on the path (a landing pad, no branch
//! taken).
//!
//! Why "failed" means "unsubscribed" and not "asked again for a full
//! invalidation": a subscriber that panicked is in an unknown state (a
//! half-updated table, a lock it never released, a poisoned mutex).
//! Calling it again on every later operation would turn one bug into a
//! panic or a deadlock of every operation of the address space. Its owner
//! learns of the failure from the error and from `has_failed` on its handle
//! and must drop every translation it holds (it no longer hears about
//! changes).

use core::sync::atomic::{AtomicU8, Ordering};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::{Hook, NotifierError};

/// Run one subscriber callback; `None` if it panicked.
#[inline(always)]
pub(crate) fn guarded<R>(f: impl FnOnce() -> R) -> Option<R> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// The first hook that panicked during one operation (0: none).
///
/// Plain (not loom) atomic: it is written and read by the thread that runs
/// the operation; it is atomic only so the bracket stays `Sync`.
#[derive(Default)]
pub(crate) struct FirstPanic(AtomicU8);

impl FirstPanic {
    #[inline]
    pub(crate) const fn new() -> Self {
        Self(AtomicU8::new(0))
    }

    /// Remember `hook` unless an earlier one was recorded.
    #[cold]
    pub(crate) fn record(&self, hook: Hook) {
        let _ = self
            .0
            .compare_exchange(0, hook.code(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The recorded failure as an error.
    #[inline]
    pub(crate) fn result(&self) -> Result<(), NotifierError> {
        match Hook::from_code(self.0.load(Ordering::Relaxed)) {
            None => Ok(()),
            Some(hook) => Err(NotifierError::SubscriberPanicked { hook }),
        }
    }
}
