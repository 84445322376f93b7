//! Counters of a monitor, and the last failure it reported.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters (Relaxed atomics: statistics only, no ordering).
        #[derive(Default, Debug)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A snapshot of a monitor's counters.
        #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// UFFD_EVENT_REMOVE events read.
    removes,
    /// REMOVE events covered by an announced zap in progress
    /// (`UffdMonitor::madvise`): no second invalidation dispatched.
    announced_removes,
    /// UFFD_EVENT_UNMAP events read.
    unmaps,
    /// UFFD_EVENT_REMAP events read.
    remaps,
    /// UFFD_EVENT_FORK events read.
    forks,
    /// Child userfaultfds closed by `ForkPolicy::Refuse`.
    forks_refused,
    /// Invalidation brackets delivered to the notifier set.
    invalidations,
    /// Events merged into a neighbour instead of getting their own bracket.
    coalesced,
    /// Missing faults read.
    missing_faults,
    /// Minor faults read.
    minor_faults,
    /// Write-protect faults read.
    wp_faults,
    /// Pages installed with UFFDIO_COPY.
    copies,
    /// Zero pages installed with UFFDIO_ZEROPAGE.
    zeropages,
    /// Pages mapped with UFFDIO_CONTINUE.
    continues,
    /// Fill ioctls answered EAGAIN (a mapping change was pending).
    eagain,
    /// Fill ioctls answered EEXIST (already populated: just woken).
    eexist,
    /// Faults on pages no longer registered (woken so they retry).
    stale_faults,
    /// Faults failed with SIGBUS (handler error or panic).
    sigbus,
    /// Handler panics caught.
    handler_panics,
    /// Subscriber failures (panics) caught during invalidations.
    subscriber_failures,
    /// Other errors (failed ioctls, refused invalidations).
    errors,
}

impl Counters {
    #[inline]
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
