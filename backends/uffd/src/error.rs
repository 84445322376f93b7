//! The crate's error type.

use std::io;

use notifier_core::addr::RangeError;
use notifier_core::notifier::NotifierError;

/// An error of the userfaultfd monitor.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the `userfaultfd(2)` system call
    /// (with `UFFD_USER_MODE_ONLY`) gave a userfaultfd.
    #[error("userfaultfd is not available (device: {device}; syscall: {syscall})")]
    Unavailable {
        /// Why the device path failed.
        device: io::Error,
        /// Why the system call failed.
        #[source]
        syscall: io::Error,
    },
    /// The kernel lacks a feature the monitor needs.
    #[error("the kernel lacks required userfaultfd features {missing:#x}")]
    MissingFeatures {
        /// The `UFFD_FEATURE_*` bits that are missing.
        missing: u64,
    },
    /// The range argument is bad.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// The range overlaps one already registered.
    #[error("range [{start:#x}, {end:#x}) overlaps a registered range")]
    Overlap {
        /// Start of the requested range.
        start: u64,
        /// End of the requested range.
        end: u64,
    },
    /// The range is not (entirely) registered.
    #[error("range [{start:#x}, {end:#x}) is not registered")]
    NotRegistered {
        /// Start of the requested range.
        start: u64,
        /// End of the requested range.
        end: u64,
    },
    /// The range lies outside the given mapping.
    #[error("range is outside the mapping")]
    OutsideMapping,
    /// A registration mode the range's memory does not support, or that
    /// the kernel did not grant (e.g. MINOR on anonymous memory).
    #[error("register mode not supported for this range")]
    UnsupportedMode(#[source] userfaultfd::Error),
    /// A userfaultfd ioctl failed.
    #[error("userfaultfd ioctl {op} failed")]
    Ioctl {
        /// Which operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading events from the userfaultfd failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] userfaultfd::Error),
    /// A system call around the userfaultfd failed (eventfd, poll, thread).
    #[error("system call failed")]
    Io(
        #[from]
        #[source]
        io::Error,
    ),
    /// The notifier machinery refused (e.g. the address space was released).
    #[error("notifier error")]
    Notifier(
        #[from]
        #[source]
        NotifierError,
    ),
    /// The monitor is already driven by a handler thread.
    #[error("a handler thread already drives this monitor")]
    AlreadyRunning,
    /// The monitor was stopped for good (its handler thread stopped or
    /// died): its memory is no longer watched.
    #[error("the monitor has stopped")]
    Stopped,
}

impl UffdError {
    pub(crate) fn ioctl(op: &'static str, errno: i32) -> Self {
        UffdError::Ioctl {
            op,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}
