//! A registered range subscriber and its owner's handle
//! (`mmu_notifier_register` / `mmu_notifier_unregister`).

use std::sync::Arc;

use super::ops::{Hooks, MmuNotifierOps};
use super::subscriptions::NotifierSubscriptions;
use super::NotifierError;
use crate::sync::{AtomicBool, Ordering};

pub(crate) struct RangeEntry {
    pub(crate) ops: Arc<dyn MmuNotifierOps>,
    pub(crate) hooks: Hooks,
    /// Set by unregister/release/failure: no new callback starts.
    pub(crate) dead: AtomicBool,
    /// Set when one of its callbacks panicked.
    pub(crate) failed: AtomicBool,
}

impl RangeEntry {
    pub(crate) fn new(ops: Arc<dyn MmuNotifierOps>, hooks: Hooks) -> Self {
        Self {
            ops,
            hooks,
            dead: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }
    }
}

/// A registered range subscriber: the owner's handle.
pub struct MmuNotifier {
    pub(crate) subs: Arc<NotifierSubscriptions>,
    pub(crate) entry: Arc<RangeEntry>,
}

impl MmuNotifier {
    /// Unregister (`mmu_notifier_unregister`). When it returns no callback
    /// of this subscriber runs or will start (from inside a callback: no new
    /// one starts once the current one returns).
    ///
    /// # Errors
    /// [`NotifierError::NotSubscribed`] on a second call or after the
    /// subscriber failed, [`NotifierError::Released`] after release.
    ///
    /// # Locking
    /// Takes the subscriptions lock; may sleep for the grace period.
    pub fn unregister(&self) -> Result<(), NotifierError> {
        self.subs.unregister(&self.entry)
    }

    /// Whether still registered (false after unregister, release, or a
    /// panic in one of its callbacks).
    pub fn is_registered(&self) -> bool {
        !self.entry.dead.load(Ordering::Acquire)
    }

    /// Whether one of its callbacks panicked. A failed subscriber was
    /// unsubscribed at that moment and hears of no later change: its owner
    /// must drop every translation it holds.
    pub fn has_failed(&self) -> bool {
        self.entry.failed.load(Ordering::Acquire)
    }
}

impl Drop for MmuNotifier {
    /// Dropping the handle unregisters the subscriber (errors ignored: it
    /// may already be unregistered or released).
    fn drop(&mut self) {
        if self.is_registered() {
            let _ = self.subs.unregister(&self.entry);
        }
    }
}

impl core::fmt::Debug for MmuNotifier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmuNotifier")
            .field("hooks", &self.entry.hooks)
            .field("registered", &self.is_registered())
            .field("failed", &self.has_failed())
            .finish()
    }
}
