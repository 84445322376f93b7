//! The secondary-MMU toolkit over the software primary (`mm::Mm`):
//! conformance, and the primary-side fault-injection switches.

use std::sync::Arc;

use notifier_core::frame::{FrameStore, HeapFrames};
use notifier_core::mm::{Mm, MmapRequest, Prot};
use notifier_core::notifier::Event;
use notifier_core::primary::Primary;
use notifier_core::secondary::*;
use notifier_core::verify::*;
use notifier_core::PAGE_SIZE;

const PAGES: u64 = 32;

fn mm_with_anon() -> (Arc<Mm>, u64, Arc<Oracle>) {
    let mm = Mm::new(Arc::new(HeapFrames::new(0x10000, 4096)));
    let oracle = Oracle::for_mm(&mm);
    let base = mm
        .mmap(&MmapRequest::anon(PAGES * PAGE_SIZE, Prot::RW))
        .unwrap();
    (mm, base, oracle)
}

fn checked(mm: &Arc<Mm>, base: u64, oracle: Arc<Oracle>) -> CheckedMirror<Mm, Va> {
    CheckedMirror::with_oracle(
        mm.clone(),
        MirrorConfig::identity(base, PAGES * PAGE_SIZE),
        oracle,
    )
    .unwrap()
}

#[test]
fn conformance_over_mm() {
    let (mm, base, oracle) = mm_with_anon();
    let m = checked(&mm, base, oracle);
    let pages: Vec<u64> = (0..16).map(|i| base + i * PAGE_SIZE).collect();
    let r = check_secondary(&*mm, &m, &pages).unwrap();
    assert!(r.migrated && r.protected);
    let n = check_concurrent(&*mm, &m, &pages, 3_000).unwrap();
    assert!(n > 0);
}

#[test]
fn primary_skipping_a_bracket_is_caught() {
    for inject in [false, true] {
        let (mm, base, oracle) = mm_with_anon();
        let m = checked(&mm, base, oracle);
        mm.write_u64(base, 1).unwrap();
        assert_eq!(m.read(base).unwrap(), 1);
        if inject {
            mm.inject().set_skip_event(Some(Event::Clear));
        }
        mm.zap(base); // madvise(DONTNEED): Event::Clear
        mm.write_u64(base + PAGE_SIZE, 2).unwrap(); // takes the freed frame
        mm.write_u64(base, 3).unwrap();
        let _ = m.read(base);
        assert_eq!(m.oracle.violation_count() >= 1, inject, "inject={inject}");
    }
}

/// `free_before_end` frees frames before the bracket ends. A mirror that
/// flushes its device TLBs at the end (legitimate only because frames
/// outlive the bracket) then touches a freed frame: the liveness oracle
/// must see it. The device access is made from inside the bracket, from a
/// range subscriber's end hook registered before the mirror's.
#[test]
fn freeing_before_end_is_caught() {
    use notifier_core::notifier::{Hooks, InvalidateRange, MmuNotifierOps};
    struct DeviceAtEnd(std::sync::Mutex<Option<Arc<dyn Fn() + Send + Sync>>>);
    impl MmuNotifierOps for DeviceAtEnd {
        fn hooks(&self) -> Hooks {
            Hooks::END
        }
        fn invalidate_range_end(&self, _: &InvalidateRange) {
            if let Some(f) = self.0.lock().unwrap().as_ref() {
                f();
            }
        }
    }
    for inject in [false, true] {
        let frames = Arc::new(TrackedFrames::new(
            HeapFrames::new(0x10000, 4096),
            0x10000,
            4096,
        ));
        let mm = Mm::new(frames.clone() as Arc<dyn FrameStore>);
        let base = mm
            .mmap(&MmapRequest::anon(PAGES * PAGE_SIZE, Prot::RW))
            .unwrap();
        let oracle = Oracle::liveness(&mm, frames.clone());
        let device = Arc::new(DeviceAtEnd(std::sync::Mutex::new(None)));
        let _hook = mm.notifiers().register(device.clone()).unwrap();
        let cfg = MirrorConfig {
            flush: FlushPolicy::AtEnd,
            ..MirrorConfig::identity(base, PAGES * PAGE_SIZE)
        };
        let m = Arc::new(Mirror::<_, Va>::new(mm.clone(), cfg, Some(oracle.clone())).unwrap());
        mm.write_u64(base, 5).unwrap();
        assert_eq!(m.read_u64(0, base).unwrap(), 5);
        // While the bracket is open (before the mirror's end flush), the
        // device still translates through its TLB.
        let m2 = m.clone();
        *device.0.lock().unwrap() = Some(Arc::new(move || {
            let _ = m2.read_u64(0, base);
        }));
        mm.inject()
            .free_before_end
            .store(inject, std::sync::atomic::Ordering::Relaxed);
        mm.munmap(base, PAGE_SIZE).unwrap();
        *device.0.lock().unwrap() = None;
        assert_eq!(
            oracle.violation_count() >= 1,
            inject,
            "inject={inject}: {:?}",
            oracle.violations().first().map(|v| v.to_string())
        );
        assert!(oracle.checks() >= 2);
    }
}

#[test]
fn mirror_follows_fork_cow_and_migration() {
    let (mm, base, oracle) = mm_with_anon();
    let m = checked(&mm, base, oracle);
    mm.write_u64(base, 10).unwrap();
    assert_eq!(m.read(base).unwrap(), 10);
    let child = mm.fork().unwrap();
    // The parent's write breaks COW: the mirror must follow to the new frame.
    m.write(base, 11).unwrap();
    assert_eq!(mm.read_u64(base).unwrap(), 11);
    assert_eq!(child.read_u64(base).unwrap(), 10);
    let before = mm.lookup_page(base).unwrap().pfn;
    mm.migrate(base, PAGE_SIZE).unwrap();
    assert_ne!(mm.lookup_page(base).unwrap().pfn, before);
    assert_eq!(m.read(base).unwrap(), 11);
    child.exit();
    assert_eq!(m.oracle.violation_count(), 0);
}

/// A read-only entry cached in a device TLB, then a permission upgrade the
/// primary makes without an invalidation (mprotect back to RW on an
/// exclusive page): the device's write must fault, drop the stale RO TLB
/// entry and complete — not loop on it.
#[test]
fn permission_upgrade_without_invalidation_does_not_livelock() {
    let (mm, base, oracle) = mm_with_anon();
    let m = checked(&mm, base, oracle);
    mm.write_u64(base, 1).unwrap();
    mm.mprotect(base, PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(m.read(base).unwrap(), 1);
    assert_eq!(m.mirror.ept().lookup(Va(base)).unwrap().perm, Perm::READ);
    mm.mprotect(base, PAGE_SIZE, Prot::RW).unwrap();
    m.write(base, 2).unwrap();
    assert_eq!(mm.read_u64(base).unwrap(), 2);
    assert_eq!(m.oracle.violation_count(), 0);
}
