//! Errors of the primary address space: one typed variant per kernel error
//! case (EINVAL, ENOMEM, EFAULT, EBUSY, EAGAIN, SIGSEGV, SIGBUS).

use crate::addr::RangeError;
use crate::frame::FrameError;
use crate::notifier::NotifierError;
use crate::primary::PrimaryFault;

/// Why an operation of the address space failed. Nothing already mapped
/// is lost when one of these is returned.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// The range argument is empty, misaligned or wraps (EINVAL).
    #[error("bad range")]
    Range(
        #[from]
        #[source]
        RangeError,
    ),
    /// The address is not page aligned (EINVAL).
    #[error("address {addr:#x} is not page aligned")]
    Misaligned {
        /// The address.
        addr: u64,
    },
    /// The range reaches beyond the user address space (EINVAL / ENOMEM).
    #[error("range reaches beyond the user address space at {addr:#x}")]
    BeyondTaskSize {
        /// The start of the range.
        addr: u64,
    },
    /// No VMA maps the address (SIGSEGV / EFAULT / ENOMEM for a hole).
    #[error("no mapping at {addr:#x}")]
    NoVma {
        /// The address.
        addr: u64,
    },
    /// The operation needs another kind of VMA (a seed 001 `BUG_ON`).
    #[error("the mapping at {addr:#x} is not {expected}")]
    WrongVmaKind {
        /// The address.
        addr: u64,
        /// What was needed, e.g. "VM_PFNMAP or VM_MIXEDMAP".
        expected: &'static str,
    },
    /// The VMA has both `VM_PFNMAP` and `VM_MIXEDMAP` (a seed 001 `BUG_ON`).
    #[error("the mapping at {addr:#x} is both VM_PFNMAP and VM_MIXEDMAP")]
    PfnMapAndMixedMap {
        /// The address.
        addr: u64,
    },
    /// `insert_pfn` into a copy-on-write `VM_PFNMAP` (a seed 001 `BUG_ON`).
    #[error("insert_pfn into a copy-on-write VM_PFNMAP mapping at {addr:#x}")]
    CowPfnMap {
        /// The address.
        addr: u64,
    },
    /// `insert_pfn` of a valid frame into a `VM_MIXEDMAP` (a seed 001
    /// `BUG_ON`: valid frames go through `insert_page`).
    #[error("insert_pfn of valid frame {pfn:#x} into a VM_MIXEDMAP mapping")]
    ValidPfnInMixedMap {
        /// The frame.
        pfn: u64,
    },
    /// `insert_page` of a PFN that is not a valid frame.
    #[error("pfn {pfn:#x} is not a valid frame")]
    InvalidPage {
        /// The PFN.
        pfn: u64,
    },
    /// A PFN too large for a PTE.
    #[error("pfn {pfn:#x} does not fit in a PTE")]
    PfnTooLarge {
        /// The PFN.
        pfn: u64,
    },
    /// The PTE is already populated (EBUSY).
    #[error("a page is already mapped at {addr:#x}")]
    Busy {
        /// The address.
        addr: u64,
    },
    /// The mapping does not allow the access or the protection change
    /// (SIGSEGV, EACCES).
    #[error("access not permitted at {addr:#x}")]
    Permission {
        /// The address.
        addr: u64,
    },
    /// The fault could not be served: beyond the end of a file, a special
    /// mapping's callback failed or its page list is too short, a PFN map
    /// without the page (SIGBUS).
    #[error("bus error at {addr:#x}")]
    Bus {
        /// The address.
        addr: u64,
    },
    /// No frame left (ENOMEM).
    #[error("out of memory")]
    OutOfMemory,
    /// A frame-store access failed.
    #[error("frame store error")]
    Frame(#[source] FrameError),
    /// No free virtual range of that size (ENOMEM).
    #[error("no free virtual range of {len:#x} bytes")]
    NoSpace {
        /// The length asked for.
        len: u64,
    },
    /// A subscriber refused a non-blockable invalidation (EAGAIN); nothing
    /// changed.
    #[error("a subscriber refused the invalidation; nothing changed")]
    Again,
    /// The frame holds no reference the caller could use or give back:
    /// `insert_page` of a free frame, or `put_page` of a free frame or of
    /// one whose every reference belongs to a page table.
    #[error("frame {pfn:#x} holds no reference of the caller")]
    FrameNotHeld {
        /// The frame.
        pfn: u64,
    },
    /// The notifier machinery failed.
    #[error("notifier error")]
    Notifier(#[source] NotifierError),
    /// The address space has exited.
    #[error("the address space has exited")]
    Exited,
    /// `mremap`: the old range is not inside one VMA (EFAULT).
    #[error("mremap source {addr:#x} is not inside one mapping")]
    MremapSpansVmas {
        /// The old address.
        addr: u64,
    },
    /// `mremap`: cannot grow in place and moving was not allowed (ENOMEM).
    #[error("cannot grow the mapping at {addr:#x} in place")]
    CannotGrow {
        /// The old address.
        addr: u64,
    },
    /// `remap_file_pages`: `prot` must be zero (EINVAL).
    #[error("remap_file_pages: prot must be zero")]
    RemapProtNotZero,
    /// `remap_file_pages`: the size is zero or the range wraps (EINVAL).
    #[error("remap_file_pages: zero size or wrapping range")]
    RemapSizeZeroOrWraps,
    /// `remap_file_pages`: `pgoff + pages` wraps (EINVAL).
    #[error("remap_file_pages: page offset wraps")]
    RemapPgoffWraps,
    /// `remap_file_pages`: the offset does not fit in a file PTE (EINVAL).
    #[error("remap_file_pages: page offset beyond what a file PTE holds")]
    RemapPgoffTooLarge,
    /// `remap_file_pages`: no VMA at or after the start (EINVAL).
    #[error("remap_file_pages: no mapping at {addr:#x}")]
    RemapNoVma {
        /// The start.
        addr: u64,
    },
    /// `remap_file_pages`: the VMA is not `VM_SHARED` (EINVAL).
    #[error("remap_file_pages: the mapping is not shared")]
    RemapNotShared,
    /// `remap_file_pages`: the VMA's file cannot be mapped nonlinearly
    /// (no `VM_CAN_NONLINEAR`) (EINVAL).
    #[error("remap_file_pages: the mapping does not support nonlinear pages")]
    RemapNoNonlinear,
    /// `remap_file_pages`: the range is not inside one VMA (EINVAL).
    #[error("remap_file_pages: the range is not inside one mapping")]
    RemapNotInOneVma,
}

impl From<FrameError> for MmError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::OutOfMemory => MmError::OutOfMemory,
            e => MmError::Frame(e),
        }
    }
}

impl From<NotifierError> for MmError {
    fn from(e: NotifierError) -> Self {
        match e {
            NotifierError::Again => MmError::Again,
            e => MmError::Notifier(e),
        }
    }
}

impl MmError {
    /// The secondary-facing form of a fault error at `addr`.
    pub fn to_primary_fault(self, addr: u64) -> PrimaryFault {
        match self {
            MmError::NoVma { addr } => PrimaryFault::NoMapping(addr),
            MmError::Permission { addr } => PrimaryFault::Permission(addr),
            MmError::OutOfMemory => PrimaryFault::OutOfMemory,
            MmError::Exited => PrimaryFault::NoMapping(addr),
            _ => PrimaryFault::Bus(addr),
        }
    }
}
