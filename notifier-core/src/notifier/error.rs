//! Errors of the notifier machinery.

use crate::addr::RangeError;

/// An error of subscribing, unsubscribing or invalidating.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The range argument is bad.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// A subscriber refused a non-blockable invalidation; subscribers that
    /// had accepted were ended, nothing is half done.
    #[error("a subscriber refused a non-blockable invalidation")]
    Again,
    /// The subscriber declares the TLB-only hook together with start/end.
    #[error("a subscriber with the TLB-only hook may not also have start/end")]
    TlbHookWithStartEnd,
    /// The subscriber may refuse an invalidation yet needs its end.
    #[error("a subscriber that may refuse cannot have invalidate_range_end")]
    RefusingSubscriberWithEnd,
    /// The subscription was already removed.
    #[error("not subscribed (already unsubscribed)")]
    NotSubscribed,
    /// The address space was released; nothing can subscribe any more.
    #[error("the address space was released")]
    Released,
}
