//! Verification as a feature: the coherence oracle, a small test primary,
//! the conformance suite every backend runs, and latency histograms.
//!
//! Enabled by the `verify` cargo feature. Fault injection lives with the
//! code it breaks ([`crate::secondary::MirrorInject`], the primary's
//! switches) so it cannot drift from it; this module is what detects it.

mod conformance;
mod histogram;
mod oracle;
mod shadow;
mod test_primary;
mod tracked_frames;

pub use conformance::{
    check_concurrent, check_secondary, ConformancePrimary, ConformanceReport, SecondaryUnderTest,
    WRITE_RETRY_FOR,
};
pub use histogram::{LatencyHistogram, Percentiles};
pub use oracle::{HistoryEvent, Oracle, OracleMode, Violation};
pub use shadow::MmShadow;
pub use test_primary::TestPrimary;
pub use tracked_frames::TrackedFrames;

use std::sync::Arc;

use crate::primary::Primary;
use crate::secondary::{ExternalAddress, Mirror, MirrorError};

impl ConformancePrimary for TestPrimary {
    fn cpu_read(&self, addr: u64) -> u64 {
        let t = self
            .fault_page(addr & !0xfff, false)
            .expect("cpu read fault");
        self.frames()
            .load(t.pfn, (addr & 0xff8) as usize)
            .expect("frame")
    }
    fn cpu_write(&self, addr: u64, val: u64) {
        let t = self
            .fault_page(addr & !0xfff, true)
            .expect("cpu write fault");
        self.frames()
            .store(t.pfn, (addr & 0xff8) as usize, val)
            .expect("frame")
    }
    fn zap(&self, addr: u64) {
        self.unmap(addr, addr + crate::PAGE_SIZE);
    }
    fn migrate(&self, addr: u64) -> bool {
        TestPrimary::migrate(self, addr).is_ok()
    }
    fn write_protect(&self, addr: u64) -> bool {
        self.protect(addr, addr + crate::PAGE_SIZE);
        true
    }
}

impl ConformancePrimary for crate::mm::Mm {
    fn cpu_read(&self, addr: u64) -> u64 {
        self.read_u64(addr).expect("cpu read")
    }
    fn cpu_write(&self, addr: u64, val: u64) {
        self.write_u64(addr, val).expect("cpu write")
    }
    fn zap(&self, addr: u64) {
        self.madvise(addr, crate::PAGE_SIZE, crate::mm::Advice::DontNeed)
            .expect("madvise")
    }
    fn migrate(&self, addr: u64) -> bool {
        crate::mm::Mm::migrate(self, addr, crate::PAGE_SIZE).is_ok()
    }
    fn write_protect(&self, addr: u64) -> bool {
        self.mprotect(addr, crate::PAGE_SIZE, crate::mm::Prot::READ)
            .is_ok()
            && self
                .mprotect(addr, crate::PAGE_SIZE, crate::mm::Prot::RW)
                .is_ok()
    }
}

/// A mirror with its oracle, as a [`SecondaryUnderTest`] on device 0.
pub struct CheckedMirror<P: Primary + ?Sized, A: ExternalAddress> {
    /// The mirror.
    pub mirror: Mirror<P, A>,
    /// Its oracle.
    pub oracle: Arc<Oracle>,
}

impl<P: Primary + ?Sized, A: ExternalAddress> core::fmt::Debug for CheckedMirror<P, A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CheckedMirror")
            .field("mirror", &self.mirror)
            .field("oracle", &self.oracle)
            .finish()
    }
}

impl<P: Primary + 'static, A: ExternalAddress> CheckedMirror<P, A> {
    /// Build a mirror of `cfg` over `primary` with a fresh oracle reading
    /// `primary.lookup_page` (see [`Oracle::new`] for when that is safe).
    pub fn new(primary: Arc<P>, cfg: crate::secondary::MirrorConfig) -> Result<Self, MirrorError> {
        let oracle = Oracle::new(primary.clone());
        Self::with_oracle(primary, cfg, oracle)
    }

    /// Build a mirror of `cfg` over `primary` checked by `oracle`.
    pub fn with_oracle(
        primary: Arc<P>,
        cfg: crate::secondary::MirrorConfig,
        oracle: Arc<Oracle>,
    ) -> Result<Self, MirrorError> {
        let mirror = Mirror::new(primary, cfg, Some(oracle.clone()))?;
        Ok(Self { mirror, oracle })
    }
}

impl<P: Primary + ?Sized, A: ExternalAddress> SecondaryUnderTest for CheckedMirror<P, A> {
    fn read(&self, addr: u64) -> Result<u64, String> {
        self.mirror
            .read_u64(0, addr)
            .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    }
    fn write(&self, addr: u64, val: u64) -> Result<(), String> {
        self.mirror
            .write_u64(0, addr, val)
            .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    }
    fn violations(&self) -> u64 {
        self.oracle.violation_count()
    }
}
