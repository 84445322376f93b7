//! A `get` that misses while the primary invalidates memory of the same
//! 1 GiB chunk window, between the new region's `read_begin` and its entry
//! into the invalidation index (`publish`).
//!
//! The chunk's sequence is the whole window's, so it moves on any
//! invalidation in the window; `publish` kills the new region only when an
//! invalidation that ran meanwhile overlapped it (the callbacks log their
//! ranges), or when more ran than the log holds. Found with real memory by
//! `tests/uffd.rs`: DMA threads getting buffers while another thread freed
//! their neighbours got registrations whose keys were already dead.
//!
//! The provider below wraps the software NIC and runs the racing unmaps
//! inside `activate_mr`, i.e. between `read_begin` and `publish`, to make
//! the interleaving deterministic.

mod common;

use std::sync::Arc;

use common::*;
use notifier_core::PageRange;
use notifier_rdma::{
    Access, Advice, Provider, ProviderError, RegError, Region, Registry, RegistryConfig, SoftMr,
    SoftNic,
};
use parking_lot::Mutex;

type Hook = Box<dyn FnOnce() + Send>;

/// The software NIC, running a hook once inside the next `activate_mr`.
struct Hooked {
    nic: SoftNic,
    hook: Mutex<Option<Hook>>,
}

impl Provider for Hooked {
    type Mr = SoftMr;
    fn name(&self) -> &'static str {
        "hooked-softnic"
    }
    fn on_demand(&self) -> bool {
        self.nic.on_demand()
    }
    fn create_mr(
        &self,
        range: PageRange,
        access: Access,
        implicit: bool,
    ) -> Result<SoftMr, ProviderError> {
        self.nic.create_mr(range, access, implicit)
    }
    fn activate_mr(&self, region: &Region<SoftMr>) -> Result<(), RegError> {
        let hook = self.hook.lock().take();
        if let Some(h) = hook {
            h();
        }
        self.nic.activate_mr(region)
    }
    fn dereg_mr(&self, region: &Region<SoftMr>) {
        self.nic.dereg_mr(region)
    }
    fn advise_mr(
        &self,
        region: &Region<SoftMr>,
        advice: Advice,
        range: PageRange,
    ) -> Result<(), RegError> {
        self.nic.advise_mr(region, advice, range)
    }
}

/// A registry over `Hooked` with one region making the window's chunk exist.
fn hooked() -> (
    Arc<notifier_rdma::testing::ModelPrimary>,
    SoftNic,
    Registry<Hooked>,
) {
    let (mm, nic, _) = setup(64, 256 * KIB, RegistryConfig::default());
    let provider = Hooked {
        nic: nic.clone(),
        hook: Mutex::new(None),
    };
    let mut reg = Registry::new(&*mm, provider, RegistryConfig::default());
    let first = reg.get(BASE, 16 * KIB, Access::ALL).unwrap();
    reg.put(first).unwrap();
    (mm, nic, reg)
}

#[test]
fn a_miss_racing_an_unmap_of_its_own_range_is_never_handed_out() {
    // The publish check must still catch what the callback could not see:
    // the unmap of the new region's own memory while it was being built.
    // That region is stale at birth; `get` retires it and builds another.
    let (mm, nic, mut reg) = hooked();
    let mm2 = Arc::clone(&mm);
    *reg.provider().hook.lock() = Some(Box::new(move || {
        mm2.munmap(BASE + 128 * KIB, 4 * KIB).unwrap();
    }));
    let h = reg.get(BASE + 128 * KIB, 16 * KIB, Access::ALL).unwrap();
    assert!(reg.provider().hook.lock().is_none(), "the hook ran");
    assert!(
        reg.region(h).unwrap().is_cacheable(),
        "a stale region was served"
    );
    assert_eq!(
        reg.stats().registrations,
        3,
        "the first, the stale one, the retry"
    );
    // The unmapped page is a typed fault, never the old frame; the rest works.
    assert!(matches!(
        nic.local_write(h.lkey(), BASE + 128 * KIB, b"stale"),
        Err(notifier_rdma::DmaError::Fault(_))
    ));
    nic.local_write(h.lkey(), BASE + 132 * KIB, b"live")
        .unwrap();
    assert_eq!(reg.stats().invalidations, 1);
    reg.put(h).unwrap();
    // Its range is served anew.
    mm.mmap(BASE + 128 * KIB, 4 * KIB, true).unwrap();
    let again = reg.get(BASE + 128 * KIB, 16 * KIB, Access::ALL).unwrap();
    assert!(reg.region(again).unwrap().is_valid());
    reg.put(again).unwrap();
}

#[test]
fn a_miss_racing_more_unrelated_unmaps_than_the_log_holds_is_retried_safely() {
    // Past the callbacks' range log the registry cannot tell what changed
    // and takes the new region for stale: spurious, never stale; `get`
    // retries and returns a fresh one.
    let (mm, nic, mut reg) = hooked();
    let mm2 = Arc::clone(&mm);
    *reg.provider().hook.lock() = Some(Box::new(move || {
        for i in 0..100 {
            mm2.munmap(BASE + 64 * KIB + (i % 16) * 4 * KIB, 4 * KIB)
                .ok();
        }
    }));
    let h = reg.get(BASE + 128 * KIB, 16 * KIB, Access::ALL).unwrap();
    assert!(reg.region(h).unwrap().is_cacheable());
    assert_eq!(
        reg.stats().registrations,
        3,
        "the first, the stale one, the retry"
    );
    nic.local_write(h.lkey(), BASE + 128 * KIB, b"x").unwrap();
    reg.put(h).unwrap();
    let again = reg.get(BASE + 128 * KIB, 16 * KIB, Access::ALL).unwrap();
    assert!(reg.region(again).unwrap().is_valid());
    reg.put(again).unwrap();
}

#[test]
fn a_miss_racing_an_unrelated_unmap_in_the_window_returns_a_live_region() {
    let (mm, nic, mut reg) = hooked();
    // While the next miss (at BASE + 128 KiB) is being built, the primary
    // unmaps [BASE + 64 KiB, + 16 KiB): disjoint from it, same window.
    let mm2 = Arc::clone(&mm);
    *reg.provider().hook.lock() = Some(Box::new(move || {
        mm2.munmap(BASE + 64 * KIB, 16 * KIB).unwrap();
    }));
    let h = reg.get(BASE + 128 * KIB, 16 * KIB, Access::ALL).unwrap();
    assert!(reg.provider().hook.lock().is_none(), "the hook ran");
    assert!(
        reg.region(h).unwrap().is_valid(),
        "a fresh registration of untouched memory came back dead"
    );
    nic.local_write(h.lkey(), BASE + 128 * KIB, b"alive")
        .unwrap();
    assert_eq!(reg.stats().invalidations, 0, "{:?}", reg.stats());
    reg.put(h).unwrap();
}
