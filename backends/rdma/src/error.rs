//! Errors of the registry, the providers and DMA.

use notifier_core::notifier::NotifierError;
use notifier_core::primary::PrimaryFault;
use notifier_core::RangeError;

use crate::access::Access;

/// An error of a provider (device, protection domain, registration).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No RDMA device could be opened (no kernel RDMA, no device, or the
    /// named device does not exist).
    #[error("no RDMA device available")]
    NoDevice(#[source] std::io::Error),
    /// A verbs call failed.
    #[error("{call} failed")]
    Verbs {
        /// The verbs call.
        call: &'static str,
        /// The errno it reported.
        #[source]
        source: std::io::Error,
    },
    /// The provider ran out of memory keys.
    #[error("out of memory keys")]
    KeysExhausted,
    /// The provider does not support this operation (e.g. implicit ODP without ODP support).
    #[error("operation not supported by this provider: {0}")]
    Unsupported(&'static str),
}

/// An error of the registry: bad arguments, stale handles, limits, or a
/// provider or notifier failure. The registry is unchanged after any of them.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RegError {
    /// The range is empty, misaligned or wraps.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// The access combination is not valid (unknown bits, or remote write/atomic without local write).
    #[error("invalid access flags {0:?}")]
    InvalidAccess(Access),
    /// The handle names no region of this registry (never issued, or its region was destroyed).
    #[error("stale or unknown handle")]
    StaleHandle,
    /// The calling thread's cache of a shared registry cannot be used now:
    /// called from inside one of its own callbacks, or while the thread exits.
    #[error("the thread's registration cache is unavailable here")]
    Unavailable,
    /// The handle was issued by another registry.
    #[error("handle of another registry")]
    ForeignHandle,
    /// `put` on a handle whose region holds no reference.
    #[error("put without a matching get")]
    PutWithoutGet,
    /// `deregister` on a region that is not a direct registration, or was already deregistered.
    #[error("not a live direct registration (double deregistration?)")]
    NotRegistered,
    /// One registration covers at most [`crate::region::MAX_PAGES`] pages (16 TiB).
    #[error("a registration of {len:#x} bytes exceeds the 16 TiB limit")]
    TooLarge {
        /// Requested (or merged) length.
        len: u64,
    },
    /// The limits are reached and no idle region can be evicted.
    #[error("registration limits reached and every region is in use")]
    LimitExceeded,
    /// The advised range is not inside the region.
    #[error("range {start:#x}+{len:#x} is outside the region")]
    OutOfRegion {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// PREFETCH_WRITE on a region without a write right.
    #[error("write prefetch on a region without write access")]
    PermissionDenied,
    /// The region was invalidated; get a new registration.
    #[error("the region was invalidated")]
    Invalidated,
    /// The primary could not fault a page in.
    #[error("page fault failed")]
    Fault(
        #[from]
        #[source]
        PrimaryFault,
    ),
    /// Subscribing to the primary's notifiers failed (e.g. the address space was released).
    #[error("notifier subscription failed")]
    Notifier(
        #[from]
        #[source]
        NotifierError,
    ),
    /// The provider failed.
    #[error("provider failed")]
    Provider(
        #[from]
        #[source]
        ProviderError,
    ),
}

/// An error of one DMA operation of the software NIC. Nothing was
/// transferred past the first failing page.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// No region has this key (never issued, or deregistered).
    #[error("unknown or deregistered key {0:#x}")]
    UnknownKey(u32),
    /// The key is an lkey used remotely or an rkey used locally.
    #[error("key {0:#x} is not valid for this initiator")]
    WrongKeyKind(u32),
    /// The region of this key was invalidated.
    #[error("key {0:#x} names an invalidated region")]
    Invalidated(u32),
    /// The region does not grant the access.
    #[error("access denied: region grants {granted:?}, operation needs {needed:?}")]
    AccessDenied {
        /// The region's rights.
        granted: Access,
        /// What the operation needs.
        needed: Access,
    },
    /// The bytes are not all inside the region.
    #[error("{addr:#x}+{len:#x} is outside the region")]
    OutOfBounds {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
    },
    /// An atomic must be 8 bytes, 8-aligned.
    #[error("atomic at {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
    /// The NIC page fault failed (no mapping, permission, SIGBUS).
    #[error("NIC page fault failed")]
    Fault(
        #[from]
        #[source]
        PrimaryFault,
    ),
    /// The frame store refused the access.
    #[error("frame access failed")]
    Frame(#[source] notifier_core::frame::FrameError),
}
