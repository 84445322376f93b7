//! Fault injection for the ABI's own tests (feature `testing`): a panic
//! inside an entry point, with and without a registry slot held.

use crate::registry::notifier_registry;
use crate::status::notifier_status;

/// An entry point whose body panics: the panic must come back as
/// `NOTIFIER_EPANIC`, never unwind into C.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn notifier_testing_panic() -> notifier_status {
    crate::guard(|| panic!("injected by notifier_testing_panic"))
}

/// Panic while holding `r`'s slot: later calls on `r` must answer
/// `NOTIFIER_EPANIC` (poisoned), destroy must still free it.
///
/// Thread safety: any thread (serialised per registry).
#[no_mangle]
pub extern "C" fn notifier_testing_panic_in_registry(r: notifier_registry) -> notifier_status {
    crate::registry::panic_inside(r)
}

/// A dispatcher (range generations and one hook, as a monitor has) on a
/// notifier set, for tests of the notify path without userfaultfd.
pub struct TestDispatcher {
    shared: std::sync::Arc<crate::hooks::Shared>,
    _sub: notifier_core::notifier::MmuNotifier,
}

impl TestDispatcher {
    /// The `valid` check of the monitor's range generations.
    pub fn valid(&self, addr: u64, len: u64) -> bool {
        self.shared.valid(addr, len)
    }
}

/// Register a dispatcher with `hook` (arg NULL) on `subs`.
///
/// # Errors
/// When the notifier set refuses the subscriber.
pub fn dispatcher(
    subs: &std::sync::Arc<notifier_core::notifier::NotifierSubscriptions>,
    hook: crate::RawHook,
) -> Result<TestDispatcher, String> {
    let shared = std::sync::Arc::new(crate::hooks::Shared::default());
    shared.add_hook(hook, 0).map_err(|f| f.msg)?;
    let sub = subs
        .register(std::sync::Arc::new(crate::hooks::Dispatcher(
            shared.clone(),
        )))
        .map_err(|e| e.to_string())?;
    Ok(TestDispatcher { shared, _sub: sub })
}
