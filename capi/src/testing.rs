//! Fault injection for the ABI's own tests (feature `testing`): a panic
//! inside an entry point, with and without a registry slot held.

use crate::registry::notifier_registry;
use crate::status::notifier_status;

/// An entry point whose body panics: the panic must come back as
/// `NOTIFIER_EPANIC`, never unwind into C.
#[no_mangle]
pub extern "C" fn notifier_testing_panic() -> notifier_status {
    crate::guard(|| panic!("injected by notifier_testing_panic"))
}

/// Panic while holding `r`'s slot: later calls on `r` must answer
/// `NOTIFIER_EPANIC` (poisoned), destroy must still free it.
#[no_mangle]
pub extern "C" fn notifier_testing_panic_in_registry(r: notifier_registry) -> notifier_status {
    crate::registry::panic_inside(r)
}
