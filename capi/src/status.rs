//! Status codes: one per variant of the typed errors (`RegError`,
//! `ProviderError`, `DmaError`, `UffdError`), plus the ABI's own (null
//! pointer, bad handle, caught panic, ...), and the calling thread's last
//! error message.

use std::cell::RefCell;

use notifier_rdma::{DmaError, ProviderError, RegError};
use notifier_uffd::UffdError;

/// The result of every `notifier_*` function. `NOTIFIER_OK` (0) is success;
/// every error is negative. The message of the calling thread's last error
/// is `notifier_last_error`.
///
/// Codes `-100..` are the ABI's own, `-200..` `RegError`, `-300..`
/// `ProviderError`, `-400..` `DmaError`, `-500..` `UffdError` (one code per
/// variant, in declaration order). Values never change once released.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum notifier_status {
    /// Success.
    NOTIFIER_OK = 0,
    /// A required pointer argument was NULL.
    NOTIFIER_ENULL = -100,
    /// The handle is not a live handle of this kind: never issued, already
    /// destroyed (double free), or a handle of another kind.
    NOTIFIER_EBADHANDLE = -101,
    /// A panic inside the library was caught at the boundary; the object
    /// the call was about is unchanged or poisoned (further calls on it
    /// fail with this code too).
    NOTIFIER_EPANIC = -102,
    /// The operation is not supported by this build (e.g. the process-wide
    /// monitor mode, not yet in notifier-uffd).
    NOTIFIER_ENOTSUP = -103,
    /// A fixed-size table is full (live handles, hooks).
    NOTIFIER_ELIMIT = -104,
    /// A bad argument the typed errors have no variant for (length 0,
    /// address range wrapping, unknown flags, unknown DMA operation).
    NOTIFIER_EINVAL = -105,
    /// The object is in use: a monitor with registries or exported
    /// libfabric monitors still on it, or a call made from inside one of
    /// its own invalidation hooks that would wait for itself.
    NOTIFIER_EBUSY = -106,
    /// The monitor was stopped: it watches nothing and delivers nothing.
    NOTIFIER_ESTOPPED = -107,
    /// An error of a variant added after this header was generated.
    NOTIFIER_EUNKNOWN = -199,

    /// `RegError::Range`: the range is empty, misaligned or wraps.
    NOTIFIER_REG_RANGE = -200,
    /// `RegError::InvalidAccess`: unknown access bits, or remote write or
    /// atomic without local write.
    NOTIFIER_REG_INVALID_ACCESS = -201,
    /// `RegError::StaleHandle`: the registration handle names no region of
    /// this registry (never issued, or its region was destroyed).
    NOTIFIER_REG_STALE_HANDLE = -202,
    /// `RegError::PutWithoutGet`: put on a region that holds no reference.
    NOTIFIER_REG_PUT_WITHOUT_GET = -203,
    /// `RegError::NotRegistered`: not a live direct registration.
    NOTIFIER_REG_NOT_REGISTERED = -204,
    /// `RegError::TooLarge`: one registration covers at most 16 TiB.
    NOTIFIER_REG_TOO_LARGE = -205,
    /// `RegError::LimitExceeded`: limits reached and every region in use.
    NOTIFIER_REG_LIMIT_EXCEEDED = -206,
    /// `RegError::OutOfRegion`: the advised range is outside the region.
    NOTIFIER_REG_OUT_OF_REGION = -207,
    /// `RegError::PermissionDenied`: write prefetch without write access.
    NOTIFIER_REG_PERMISSION_DENIED = -208,
    /// `RegError::Invalidated`: the region was invalidated.
    NOTIFIER_REG_INVALIDATED = -209,
    /// `RegError::Fault`: the primary could not fault a page in.
    NOTIFIER_REG_FAULT = -210,
    /// `RegError::Notifier`: subscribing to the notifiers failed.
    NOTIFIER_REG_NOTIFIER = -211,
    /// `RegError::Provider` with a provider error of a variant added later
    /// (the known ones have their own codes, `NOTIFIER_PROVIDER_*`).
    NOTIFIER_REG_PROVIDER = -212,
    /// `RegError::ForeignHandle`: the handle was issued by another registry.
    NOTIFIER_REG_FOREIGN_HANDLE = -213,
    /// `RegError::Unavailable`: the calling thread's cache cannot be used
    /// now (called from one of the registry's own callbacks, or while the
    /// thread exits).
    NOTIFIER_REG_UNAVAILABLE = -214,

    /// `ProviderError::NoDevice`: no RDMA device available.
    NOTIFIER_PROVIDER_NO_DEVICE = -300,
    /// `ProviderError::Verbs`: a verbs call failed.
    NOTIFIER_PROVIDER_VERBS = -301,
    /// `ProviderError::KeysExhausted`: out of memory keys.
    NOTIFIER_PROVIDER_KEYS_EXHAUSTED = -302,
    /// `ProviderError::Unsupported`: not supported by this provider.
    NOTIFIER_PROVIDER_UNSUPPORTED = -303,

    /// `DmaError::UnknownKey`: no region has this key.
    NOTIFIER_DMA_UNKNOWN_KEY = -400,
    /// `DmaError::WrongKeyKind`: an lkey used remotely or an rkey locally.
    NOTIFIER_DMA_WRONG_KEY_KIND = -401,
    /// `DmaError::Invalidated`: the key's region was invalidated.
    NOTIFIER_DMA_INVALIDATED = -402,
    /// `DmaError::AccessDenied`: the region does not grant the access.
    NOTIFIER_DMA_ACCESS_DENIED = -403,
    /// `DmaError::OutOfBounds`: the bytes are not all inside the region.
    NOTIFIER_DMA_OUT_OF_BOUNDS = -404,
    /// `DmaError::Misaligned`: an atomic must be 8 bytes, 8-aligned.
    NOTIFIER_DMA_MISALIGNED = -405,
    /// `DmaError::Fault`: the NIC page fault failed.
    NOTIFIER_DMA_FAULT = -406,
    /// `DmaError::Frame`: the frame store refused the access.
    NOTIFIER_DMA_FRAME = -407,

    /// `UffdError::Unavailable`: no userfaultfd (a container, or no
    /// privilege). The message names the fallback.
    NOTIFIER_UFFD_UNAVAILABLE = -500,
    /// `UffdError::MissingFeatures`: the kernel lacks userfaultfd features.
    NOTIFIER_UFFD_MISSING_FEATURES = -501,
    /// `UffdError::Range`: bad range.
    NOTIFIER_UFFD_RANGE = -502,
    /// `UffdError::Overlap`: overlaps a registered range.
    NOTIFIER_UFFD_OVERLAP = -503,
    /// `UffdError::NotRegistered`: the range is not (entirely) watched.
    NOTIFIER_UFFD_NOT_REGISTERED = -504,
    /// `UffdError::OutsideMapping`: the range lies outside the mapping.
    NOTIFIER_UFFD_OUTSIDE_MAPPING = -505,
    /// `UffdError::UnsupportedMode`: the kernel refused to watch this
    /// memory (not mapped, or a kind userfaultfd does not support).
    NOTIFIER_UFFD_UNSUPPORTED_MODE = -506,
    /// `UffdError::Ioctl`: a userfaultfd ioctl failed.
    NOTIFIER_UFFD_IOCTL = -507,
    /// `UffdError::Read`: reading userfaultfd events failed.
    NOTIFIER_UFFD_READ = -508,
    /// `UffdError::Io`: a system call around the userfaultfd failed.
    NOTIFIER_UFFD_IO = -509,
    /// `UffdError::Notifier`: the notifier machinery refused.
    NOTIFIER_UFFD_NOTIFIER = -510,
    /// `UffdError::AlreadyRunning`: a handler thread already runs.
    NOTIFIER_UFFD_ALREADY_RUNNING = -511,
    /// `UffdError::Stopped`: the monitor was stopped (retired for good).
    NOTIFIER_UFFD_STOPPED = -512,
}

pub use notifier_status::*;

/// A failed call: its status code and the message kept for
/// `notifier_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: notifier_status,
    pub(crate) msg: String,
}

impl Failure {
    pub(crate) fn new(code: notifier_status, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

pub(crate) type Res<T = ()> = Result<T, Failure>;

/// The error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The code of a provider error.
pub(crate) fn provider_code(e: &ProviderError) -> notifier_status {
    match e {
        ProviderError::NoDevice(_) => NOTIFIER_PROVIDER_NO_DEVICE,
        ProviderError::Verbs { .. } => NOTIFIER_PROVIDER_VERBS,
        ProviderError::KeysExhausted => NOTIFIER_PROVIDER_KEYS_EXHAUSTED,
        ProviderError::Unsupported(_) => NOTIFIER_PROVIDER_UNSUPPORTED,
        _ => NOTIFIER_REG_PROVIDER,
    }
}

/// The code of a registry error (a provider error gets its own code).
pub(crate) fn reg_code(e: &RegError) -> notifier_status {
    match e {
        RegError::Range(_) => NOTIFIER_REG_RANGE,
        RegError::InvalidAccess(_) => NOTIFIER_REG_INVALID_ACCESS,
        RegError::StaleHandle => NOTIFIER_REG_STALE_HANDLE,
        RegError::PutWithoutGet => NOTIFIER_REG_PUT_WITHOUT_GET,
        RegError::NotRegistered => NOTIFIER_REG_NOT_REGISTERED,
        RegError::TooLarge { .. } => NOTIFIER_REG_TOO_LARGE,
        RegError::LimitExceeded => NOTIFIER_REG_LIMIT_EXCEEDED,
        RegError::OutOfRegion { .. } => NOTIFIER_REG_OUT_OF_REGION,
        RegError::PermissionDenied => NOTIFIER_REG_PERMISSION_DENIED,
        RegError::Invalidated => NOTIFIER_REG_INVALIDATED,
        RegError::Fault(_) => NOTIFIER_REG_FAULT,
        RegError::Notifier(_) => NOTIFIER_REG_NOTIFIER,
        RegError::ForeignHandle => NOTIFIER_REG_FOREIGN_HANDLE,
        RegError::Unavailable => NOTIFIER_REG_UNAVAILABLE,
        RegError::Provider(p) => provider_code(p),
        _ => NOTIFIER_EUNKNOWN,
    }
}

/// The code of a DMA error.
pub(crate) fn dma_code(e: &DmaError) -> notifier_status {
    match e {
        DmaError::UnknownKey(_) => NOTIFIER_DMA_UNKNOWN_KEY,
        DmaError::WrongKeyKind(_) => NOTIFIER_DMA_WRONG_KEY_KIND,
        DmaError::Invalidated(_) => NOTIFIER_DMA_INVALIDATED,
        DmaError::AccessDenied { .. } => NOTIFIER_DMA_ACCESS_DENIED,
        DmaError::OutOfBounds { .. } => NOTIFIER_DMA_OUT_OF_BOUNDS,
        DmaError::Misaligned(_) => NOTIFIER_DMA_MISALIGNED,
        DmaError::Fault(_) => NOTIFIER_DMA_FAULT,
        DmaError::Frame(_) => NOTIFIER_DMA_FRAME,
        _ => NOTIFIER_EUNKNOWN,
    }
}

/// The code of a monitor error.
pub(crate) fn uffd_code(e: &UffdError) -> notifier_status {
    match e {
        UffdError::Unavailable { .. } => NOTIFIER_UFFD_UNAVAILABLE,
        UffdError::MissingFeatures { .. } => NOTIFIER_UFFD_MISSING_FEATURES,
        UffdError::Range(_) => NOTIFIER_UFFD_RANGE,
        UffdError::Overlap { .. } => NOTIFIER_UFFD_OVERLAP,
        UffdError::NotRegistered { .. } => NOTIFIER_UFFD_NOT_REGISTERED,
        UffdError::OutsideMapping => NOTIFIER_UFFD_OUTSIDE_MAPPING,
        UffdError::UnsupportedMode(_) => NOTIFIER_UFFD_UNSUPPORTED_MODE,
        UffdError::Ioctl { .. } => NOTIFIER_UFFD_IOCTL,
        UffdError::Read(_) => NOTIFIER_UFFD_READ,
        UffdError::Io(_) => NOTIFIER_UFFD_IO,
        UffdError::Notifier(_) => NOTIFIER_UFFD_NOTIFIER,
        UffdError::AlreadyRunning => NOTIFIER_UFFD_ALREADY_RUNNING,
        UffdError::Stopped => NOTIFIER_UFFD_STOPPED,
        _ => NOTIFIER_EUNKNOWN,
    }
}

/// What a container without userfaultfd should use instead.
pub(crate) const UFFD_FALLBACK: &str = "fallback: give the process userfaultfd (root or \
     CAP_SYS_PTRACE, read-write access to /dev/userfaultfd, or sysctl \
     vm.unprivileged_userfaultfd=1; in a container, a seccomp profile that allows \
     userfaultfd(2)), or keep the middleware's own memory hooks (UCX: \
     UCX_MEM_MMAP_HOOK_MODE=bistro; libfabric: FI_MR_CACHE_MONITOR=memhooks)";

impl From<RegError> for Failure {
    fn from(e: RegError) -> Self {
        Failure::new(reg_code(&e), chain(&e))
    }
}

impl From<DmaError> for Failure {
    fn from(e: DmaError) -> Self {
        Failure::new(dma_code(&e), chain(&e))
    }
}

impl From<UffdError> for Failure {
    fn from(e: UffdError) -> Self {
        let code = uffd_code(&e);
        let mut msg = chain(&e);
        if code == NOTIFIER_UFFD_UNAVAILABLE {
            msg.push_str("; ");
            msg.push_str(UFFD_FALLBACK);
        }
        Failure::new(code, msg)
    }
}

thread_local! {
    /// The calling thread's last error message (NUL-terminated).
    static LAST: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Keep `msg` as this thread's last error.
pub(crate) fn set_last(msg: &str) {
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        l.clear();
        l.extend(msg.bytes().filter(|&b| b != 0));
        l.push(0);
    });
}

/// Copy this thread's last error message into `buf` (at most `cap` bytes,
/// NUL included); returns the full length without the NUL.
pub(crate) fn copy_last(buf: &mut [u8]) -> usize {
    LAST.with(|l| {
        let l = l.borrow();
        let msg = l.strip_suffix(&[0]).unwrap_or(&l);
        if let Some(room) = buf.len().checked_sub(1) {
            let n = msg.len().min(room);
            buf[..n].copy_from_slice(&msg[..n]);
            buf[n] = 0;
        }
        msg.len()
    })
}

/// A short static description of a status code.
pub(crate) fn describe(code: i32) -> &'static core::ffi::CStr {
    macro_rules! table {
        ($($c:ident => $s:literal,)*) => {
            $(if code == $c as i32 { return $s; })*
        };
    }
    table! {
        NOTIFIER_OK => c"success",
        NOTIFIER_ENULL => c"a required pointer argument was NULL",
        NOTIFIER_EBADHANDLE => c"not a live handle of this kind (never issued, destroyed, or another kind)",
        NOTIFIER_EPANIC => c"internal panic caught at the C boundary",
        NOTIFIER_ENOTSUP => c"not supported by this build",
        NOTIFIER_ELIMIT => c"a fixed-size table (handles, hooks) is full",
        NOTIFIER_EINVAL => c"invalid argument",
        NOTIFIER_EBUSY => c"the object is in use",
        NOTIFIER_ESTOPPED => c"the monitor was stopped",
        NOTIFIER_EUNKNOWN => c"an error of a kind this header does not know",
        NOTIFIER_REG_RANGE => c"bad range",
        NOTIFIER_REG_INVALID_ACCESS => c"invalid access flags",
        NOTIFIER_REG_STALE_HANDLE => c"stale or unknown registration handle",
        NOTIFIER_REG_PUT_WITHOUT_GET => c"put without a matching get",
        NOTIFIER_REG_NOT_REGISTERED => c"not a live direct registration",
        NOTIFIER_REG_TOO_LARGE => c"registration exceeds the 16 TiB limit",
        NOTIFIER_REG_LIMIT_EXCEEDED => c"registration limits reached and every region is in use",
        NOTIFIER_REG_OUT_OF_REGION => c"range outside the region",
        NOTIFIER_REG_PERMISSION_DENIED => c"write prefetch on a region without write access",
        NOTIFIER_REG_INVALIDATED => c"the region was invalidated",
        NOTIFIER_REG_FAULT => c"page fault failed",
        NOTIFIER_REG_NOTIFIER => c"notifier subscription failed",
        NOTIFIER_REG_PROVIDER => c"provider failed",
        NOTIFIER_REG_FOREIGN_HANDLE => c"registration handle of another registry",
        NOTIFIER_REG_UNAVAILABLE => c"the thread's registration cache is unavailable here",
        NOTIFIER_PROVIDER_NO_DEVICE => c"no RDMA device available",
        NOTIFIER_PROVIDER_VERBS => c"a verbs call failed",
        NOTIFIER_PROVIDER_KEYS_EXHAUSTED => c"out of memory keys",
        NOTIFIER_PROVIDER_UNSUPPORTED => c"operation not supported by this provider",
        NOTIFIER_DMA_UNKNOWN_KEY => c"unknown or deregistered key",
        NOTIFIER_DMA_WRONG_KEY_KIND => c"key not valid for this initiator",
        NOTIFIER_DMA_INVALIDATED => c"key names an invalidated region",
        NOTIFIER_DMA_ACCESS_DENIED => c"access denied by the region's rights",
        NOTIFIER_DMA_OUT_OF_BOUNDS => c"outside the region",
        NOTIFIER_DMA_MISALIGNED => c"misaligned atomic",
        NOTIFIER_DMA_FAULT => c"NIC page fault failed",
        NOTIFIER_DMA_FRAME => c"frame access failed",
        NOTIFIER_UFFD_UNAVAILABLE => c"userfaultfd is not available (see notifier_last_error for the fallback)",
        NOTIFIER_UFFD_MISSING_FEATURES => c"the kernel lacks required userfaultfd features",
        NOTIFIER_UFFD_RANGE => c"bad range to watch",
        NOTIFIER_UFFD_OVERLAP => c"range overlaps a watched range",
        NOTIFIER_UFFD_NOT_REGISTERED => c"range is not watched",
        NOTIFIER_UFFD_OUTSIDE_MAPPING => c"range is outside the mapping",
        NOTIFIER_UFFD_UNSUPPORTED_MODE => c"the kernel refused to watch this memory",
        NOTIFIER_UFFD_IOCTL => c"a userfaultfd ioctl failed",
        NOTIFIER_UFFD_READ => c"reading userfaultfd events failed",
        NOTIFIER_UFFD_IO => c"a system call around the userfaultfd failed",
        NOTIFIER_UFFD_NOTIFIER => c"notifier error",
        NOTIFIER_UFFD_ALREADY_RUNNING => c"a handler thread already drives this monitor",
        NOTIFIER_UFFD_STOPPED => c"the monitor was retired by stopping its handler thread",
    }
    c"unknown status code"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_userfaultfd_names_the_fallback() {
        let e = UffdError::Unavailable {
            device: std::io::Error::from_raw_os_error(libc::EACCES),
            syscall: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let f = Failure::from(e);
        assert_eq!(f.code, NOTIFIER_UFFD_UNAVAILABLE);
        assert!(f.msg.contains("fallback"), "{}", f.msg);
        assert!(f.msg.contains("FI_MR_CACHE_MONITOR=memhooks"), "{}", f.msg);
    }

    #[test]
    fn codes_are_distinct_and_described() {
        let mut seen = std::collections::HashSet::new();
        for c in -600..=0 {
            if describe(c) != c"unknown status code" {
                assert!(seen.insert(describe(c)), "{c}: description shared");
            }
        }
        // OK, 9 ABI codes, 15 RegError, 4 ProviderError, 8 DmaError, 13 UffdError.
        assert_eq!(seen.len(), 1 + 9 + 15 + 4 + 8 + 13);
    }
}
