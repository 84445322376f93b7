//! The fault handler: what fills a missing page (the special-mapping fault
//! callback of seed 002, over real memory).

use notifier_core::addr::PageRange;
use notifier_core::PAGE_SIZE;

/// One page of bytes for a handler to fill.
pub type PageBuf = [u8; PAGE_SIZE as usize];

/// A fault the handler is asked to resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The registered range the page belongs to.
    pub range: PageRange,
    /// The page's index inside the range as it was registered:
    /// `registration.pgoff + (addr - range.start()) / PAGE_SIZE` (a special
    /// mapping's `vm_pgoff`-relative fault offset; stable across splits and
    /// moves).
    pub pgoff: u64,
    /// The page address (page aligned).
    pub addr: u64,
    /// Whether the faulting access was a write.
    pub write: bool,
    /// The faulting thread, when the kernel reports it (`UFFD_FEATURE_THREAD_ID`).
    pub thread_id: Option<i32>,
}

/// How the handler filled a missing page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The page buffer holds the bytes: install them (`UFFDIO_COPY`).
    Bytes,
    /// Map the zero page (`UFFDIO_ZEROPAGE`); the buffer is ignored.
    Zero,
}

/// The handler could not provide the page: the faulting thread gets SIGBUS
/// (the kernel's `VM_FAULT_SIGBUS` from a special mapping's fault callback).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("fault handler failed: {0}")]
pub struct FaultError(pub String);

/// Resolves faults in registered ranges.
///
/// Called on the thread that drives the monitor (the handler thread or the
/// caller of `handle_pending`), one fault at a time. A handler must not
/// touch registered memory that may be missing (it would wait on itself).
/// A panic is caught and treated as an error: the faulting thread gets
/// SIGBUS and the failure is counted.
pub trait FaultHandler: Send + Sync {
    /// A missing page: fill `page` and answer [`Fill::Bytes`], or answer
    /// [`Fill::Zero`], or fail.
    fn missing(&self, fault: &PageFault, page: &mut PageBuf) -> Result<Fill, FaultError>;

    /// A minor fault (MINOR registration on memfd/shmem): the page is in the
    /// page cache; answering `Ok` maps it (`UFFDIO_CONTINUE`).
    fn minor(&self, fault: &PageFault) -> Result<(), FaultError> {
        let _ = fault;
        Ok(())
    }
}

/// Serves every missing page as the zero page.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroHandler;

impl FaultHandler for ZeroHandler {
    fn missing(&self, _: &PageFault, _: &mut PageBuf) -> Result<Fill, FaultError> {
        Ok(Fill::Zero)
    }
}

impl<F> FaultHandler for F
where
    F: Fn(&PageFault, &mut PageBuf) -> Result<Fill, FaultError> + Send + Sync,
{
    fn missing(&self, fault: &PageFault, page: &mut PageBuf) -> Result<Fill, FaultError> {
        self(fault, page)
    }
}
