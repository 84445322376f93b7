//! Shared helpers of the KVM integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use kvm_ioctls::Kvm;
pub use notifier_kvm::testing::TestPrimary;
use notifier_kvm::{KvmMirror, MemfdFrames};

/// `/dev/kvm`, or a visible skip (a failure with NOTIFIER_REQUIRE_KVM=1).
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            if std::env::var("NOTIFIER_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: /dev/kvm required (NOTIFIER_REQUIRE_KVM=1) but unavailable: {e}");
            }
            eprintln!("SKIP: {test}: /dev/kvm unavailable: {e}");
            None
        }
    }
}

/// A VM with a mirror of a fresh test primary over `frames` memfd frames.
pub fn setup(test: &str, frames: usize) -> Option<(Kvm, Arc<TestPrimary>, KvmMirror<TestPrimary>)> {
    let kvm = kvm_or_skip(test)?;
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let store = Arc::new(MemfdFrames::new(0x1000, frames).unwrap());
    let primary = TestPrimary::new(store.clone());
    let max = kvm.get_nr_memslots() as u32;
    let mirror = KvmMirror::new(vm, primary.clone(), store, max).expect("frames are the primary's");
    Some((kvm, primary, mirror))
}

/// Where guest-physical address 0 sits in the software primary's virtual
/// space: region `[gpa, gpa + len)` is mirrored from `Mm` addresses
/// `[GUEST_BASE + gpa, GUEST_BASE + gpa + len)` (a VMM's guest RAM is one
/// mapping of its own address space, as with a real `mmap`ed RAM block).
pub const GUEST_BASE: u64 = 0x10_0000_0000;

/// A VM with a mirror of a fresh software primary (`mm::Mm`) whose frames
/// are `frames` memfd pages. Nothing is mapped yet (attach an oracle now
/// if the test needs one).
pub fn setup_mm(
    test: &str,
    frames: usize,
) -> Option<(
    Kvm,
    Arc<notifier_core::mm::Mm>,
    KvmMirror<notifier_core::mm::Mm>,
)> {
    let kvm = kvm_or_skip(test)?;
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let store = Arc::new(MemfdFrames::new(0x1000, frames).unwrap());
    let mm = notifier_core::mm::Mm::new(store.clone() as Arc<dyn notifier_core::frame::FrameStore>);
    let max = kvm.get_nr_memslots() as u32;
    let mirror = KvmMirror::new(vm, mm.clone(), store, max).expect("frames are the primary's");
    Some((kvm, mm, mirror))
}

/// A VM over guest RAM the VMM owns: the memory first, so it is dropped
/// (its RAM unmapped) while the monitor's thread still drives the monitor.
pub struct RealWorld {
    pub mem: notifier_kvm::RealGuestMemory,
    pub thread: notifier_uffd::HandlerThread,
    pub kvm: Kvm,
}

/// A monitor with `handler`, or a visible skip (a failure with
/// NOTIFIER_REQUIRE_UFFD=1).
pub fn monitor_or_skip(
    test: &str,
    handler: Arc<dyn notifier_uffd::FaultHandler>,
) -> Option<notifier_uffd::UffdMonitor> {
    match notifier_uffd::UffdMonitor::builder().build(handler) {
        Ok(m) => Some(m),
        Err(e) if notifier_uffd::uffd_required() => {
            panic!("{test}: userfaultfd required (NOTIFIER_REQUIRE_UFFD=1) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: {test}: userfaultfd unavailable: {e}");
            None
        }
    }
}

/// A VM, a monitor with `handler` driven by its own thread, and an empty
/// `RealGuestMemory` over them.
pub fn real_setup(test: &str, handler: Arc<dyn notifier_uffd::FaultHandler>) -> Option<RealWorld> {
    let kvm = kvm_or_skip(test)?;
    let monitor = monitor_or_skip(test, handler)?;
    let thread = monitor.spawn().expect("monitor thread");
    let vm = Arc::new(kvm.create_vm().expect("create VM"));
    let max = kvm.get_nr_memslots() as u32;
    let mem = notifier_kvm::RealGuestMemory::new(vm, monitor, max).expect("real guest memory");
    Some(RealWorld { mem, thread, kvm })
}

/// Read a `u32` through a device view (vm-memory `Bytes`).
pub fn view_u32(
    view: &notifier_kvm::GuestView,
    gpa: u64,
) -> Result<u32, vm_memory::GuestMemoryError> {
    use vm_memory::{Bytes, GuestAddress};
    view.read_obj::<u32>(GuestAddress(gpa))
}
