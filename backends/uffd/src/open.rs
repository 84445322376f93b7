//! Opening a userfaultfd: `/dev/userfaultfd` first, then the system call
//! with `UFFD_USER_MODE_ONLY`; and the `UFFDIO_API` feature handshake.
//!
//! The `userfaultfd` crate's builder also tries the device first, but when
//! the device exists and is not accessible (mode 0600 root, the default) it
//! fails instead of falling back, and it does not report which features
//! the kernel supports. So this module opens the descriptor itself and
//! hands it to `userfaultfd::Uffd`.

use std::os::fd::{AsFd, OwnedFd};

use crate::error::UffdError;
use crate::sys::{self, feature};

/// How the monitor's userfaultfd was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenPath {
    /// `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`): kernel-mode faults are
    /// handled too (e.g. a `read(2)` into registered memory).
    Device,
    /// `userfaultfd(2)` with `UFFD_USER_MODE_ONLY`: works unprivileged; a
    /// fault taken by the kernel itself (copy_to_user into a missing page)
    /// fails with EFAULT instead of being served.
    UserModeOnly,
}

/// Features the monitor cannot work without.
pub(crate) const REQUIRED: u64 =
    feature::EVENT_REMOVE | feature::EVENT_UNMAP | feature::EVENT_REMAP;

/// Features used when the kernel has them.
pub(crate) const OPTIONAL: u64 = feature::THREAD_ID
    | feature::MISSING_SHMEM
    | feature::MINOR_SHMEM
    | feature::PAGEFAULT_FLAG_WP
    | feature::WP_HUGETLBFS_SHMEM
    | (1 << 13) // UFFD_FEATURE_WP_UNPOPULATED: unpopulated anon pages are tracked too
    | feature::POISON;

fn open_fd(path: OpenPath) -> std::io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    match path {
        OpenPath::Device => sys::open_device(flags),
        OpenPath::UserModeOnly => sys::open_syscall(flags | sys::UFFD_USER_MODE_ONLY),
    }
}

/// Open a userfaultfd (device first unless `user_mode_only`) and complete
/// the handshake with `REQUIRED | extra` plus whatever of `OPTIONAL` the
/// kernel supports. Returns the descriptor, the path and granted features.
pub(crate) fn open(
    user_mode_only: bool,
    extra: u64,
) -> Result<(OwnedFd, OpenPath, u64), UffdError> {
    let device = if user_mode_only {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "skipped: user-mode-only requested",
        ))
    } else {
        open_fd(OpenPath::Device)
    };
    let (probe, path) = match device {
        Ok(fd) => (fd, OpenPath::Device),
        Err(device) => match open_fd(OpenPath::UserModeOnly) {
            Ok(fd) => (fd, OpenPath::UserModeOnly),
            Err(syscall) => return Err(UffdError::Unavailable { device, syscall }),
        },
    };
    // UFFDIO_API may run once per descriptor: probe on one, use another.
    let (supported, _) = sys::api(probe.as_fd(), 0).map_err(|source| UffdError::Ioctl {
        op: "UFFDIO_API",
        source,
    })?;
    drop(probe);
    let required = REQUIRED | extra;
    if supported & required != required {
        return Err(UffdError::MissingFeatures {
            missing: required & !supported,
        });
    }
    let fd = open_fd(path)?;
    let want = required | (OPTIONAL & supported);
    sys::api(fd.as_fd(), want).map_err(|source| UffdError::Ioctl {
        op: "UFFDIO_API",
        source,
    })?;
    Ok((fd, path, want))
}

/// `UFFD_FEATURE_SIGBUS`: every fault of a registered range raises SIGBUS
/// instead of being queued.
const FEATURE_SIGBUS: u64 = 1 << 7;

/// A userfaultfd (same path as the monitor's) whose faults all raise
/// SIGBUS and that asks for no events: the ranges of a stopped monitor are
/// handed to it, so a fault there fails at once instead of hanging, and a
/// `munmap` there never waits for a reader.
pub(crate) fn open_sigbus(path: OpenPath) -> std::io::Result<userfaultfd::Uffd> {
    let fd = open_fd(path)?;
    sys::api(fd.as_fd(), FEATURE_SIGBUS)?;
    Ok(sys::uffd_from_owned(fd))
}
