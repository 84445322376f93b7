//! A `get` that misses while the primary unmaps an *unrelated* range of
//! the same 1 GiB chunk window: the new registration must come back alive.
//!
//! The registry takes the chunk's `read_begin` sequence before it builds a
//! region and, when the region enters the invalidation index (`publish`),
//! kills it if the chunk's sequence moved meanwhile. The sequence is the
//! whole window's, so an unmap anywhere in the window kills the new region
//! although nothing it covers changed: `get` returns a handle whose keys
//! are already dead. Safe (nothing stale is reachable), but a spurious
//! failure for the application; `tests/uffd.rs` hits it with real memory
//! when DMA threads get buffers while another thread frees its neighbours.
//!
//! The provider below wraps the software NIC and runs the unrelated unmap
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

#[test]
#[ignore = "registry bug: publish kills a new region on any invalidation of its chunk window"]
fn a_miss_racing_an_unrelated_unmap_in_the_window_returns_a_live_region() {
    let (mm, nic, _) = setup(64, 256 * KIB, RegistryConfig::default());
    let provider = Hooked {
        nic: nic.clone(),
        hook: Mutex::new(None),
    };
    let mut reg = Registry::new(&*mm, provider, RegistryConfig::default());
    // A first region makes the window's chunk exist.
    let first = reg.get(BASE, 16 * KIB, Access::ALL).unwrap();
    reg.put(first).unwrap();

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
