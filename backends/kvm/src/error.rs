//! The crate's error type.

use notifier_core::frame::FrameError;
use notifier_core::notifier::NotifierError;
use notifier_core::primary::PrimaryFault;
use notifier_core::RangeError;

/// An error of the KVM mirror, its memslots, frames or device view.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the memslot change because the guest-physical range
    /// overlaps another slot (EEXIST); the layout is unchanged.
    #[error("guest-physical range {gpa:#x}+{len:#x} overlaps an existing memslot")]
    Overlap {
        /// Requested guest-physical base.
        gpa: u64,
        /// Requested length.
        len: u64,
    },
    /// KVM rejected the memslot arguments (EINVAL); the layout is unchanged.
    #[error("KVM rejected memslot {slot} at {gpa:#x}+{len:#x}")]
    InvalidSlot {
        /// Slot id.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// Length.
        len: u64,
        /// KVM's errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Another KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Every memslot KVM offers (KVM_CAP_NR_MEMSLOTS) is in use.
    #[error("all {0} memslots are in use")]
    OutOfSlots(u32),
    /// No region with that guest-physical base.
    #[error("no region at {0:#x}")]
    NoRegion(u64),
    /// The guest-physical address is in no region.
    #[error("guest-physical address {0:#x} is in no region")]
    Unmapped(u64),
    /// A bad range argument.
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// Subscribing to the primary failed.
    #[error("subscribing to the primary failed")]
    Notifier(
        #[from]
        #[source]
        NotifierError,
    ),
    /// The primary could not fault the page in.
    #[error("primary fault")]
    Fault(
        #[from]
        #[source]
        PrimaryFault,
    ),
    /// A frame access failed.
    #[error("frame access")]
    Frame(
        #[from]
        #[source]
        FrameError,
    ),
    /// The vCPU stopped for a reason the caller did not expect.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The primary mapped a PFN that is not a frame of the memfd store, so
    /// it cannot be mapped into the host view.
    #[error("pfn {0:#x} is not a memfd frame and cannot be mapped for KVM")]
    ForeignPfn(u64),
    /// `KvmMirror::new` was given frames that are not the primary's frame
    /// store: the two would silently disagree about every page.
    #[error("the frames given are not the primary's frame store")]
    FramesMismatch,
    /// A device view of an older layout (memslots were added, removed,
    /// moved or resized since): refresh it.
    #[error("guest-memory view of layout {view} is stale (current: {current})")]
    StaleView {
        /// The view's generation.
        view: u64,
        /// The current generation.
        current: u64,
    },
    /// A region cannot grow beyond the guest RAM behind it.
    #[error("region length {len:#x} exceeds its guest RAM ({ram:#x})")]
    BeyondRam {
        /// Requested length.
        len: u64,
        /// Length of the RAM.
        ram: u64,
    },
    /// The userfaultfd monitor refused (registration, announcement).
    #[error("userfaultfd")]
    Uffd(
        #[from]
        #[source]
        notifier_uffd::UffdError,
    ),
}

impl KvmError {
    pub(crate) fn os(op: &'static str, source: std::io::Error) -> Self {
        Self::Os { op, source }
    }

    pub(crate) fn kvm(op: &'static str, source: kvm_ioctls::Error) -> Self {
        Self::Kvm { op, source }
    }
}
