//! Invalidation: a change of the primary kills the affected registrations
//! before any frame is freed, never serves them again, and keeps an in-use
//! region alive until its last put.

mod common;

use common::*;
use notifier_core::notifier::{Event, InvalidateRange};
use notifier_core::primary::Primary;
use notifier_core::PageRange;
use notifier_rdma::{Access, DmaError, RegError, RegistryConfig};

const RW: Access = Access::ALL;

#[test]
fn munmap_then_reallocate_at_the_same_address_gives_a_new_registration() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    nic.local_write(a.lkey(), BASE, b"old data").unwrap();
    reg.put(a).unwrap();

    mm.munmap(BASE, 64 * KIB).unwrap();
    mm.mmap(BASE, 64 * KIB, true).unwrap();

    let b = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(a.lkey(), b.lkey());
    assert_ne!(a.rkey(), b.rkey());
    let s = reg.stats();
    assert_eq!(
        (s.misses, s.hits, s.invalidations, s.deregistrations),
        (2, 0, 1, 1)
    );
    // The new registration sees the new (zeroed) memory, the old key nothing.
    let mut buf = [0xffu8; 8];
    nic.remote_read(b.rkey(), BASE, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
    assert_eq!(
        nic.remote_read(a.rkey(), BASE, &mut buf),
        Err(DmaError::UnknownKey(a.rkey()))
    );
    reg.put(b).unwrap();
}

#[test]
fn a_region_held_during_an_invalidation_lives_until_its_last_put() {
    let (mm, nic, mut reg) = setup(64, 256 * KIB, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    let a2 = reg.get(BASE, 64 * KIB, RW).unwrap();
    nic.local_write(a.lkey(), BASE + 100, b"x").unwrap();
    let frames_before = mm.frames_allocated();

    mm.munmap(BASE, 64 * KIB).unwrap();
    // The frame was freed (the region pinned nothing) ...
    assert_eq!(mm.frames_allocated(), frames_before - 1);
    // ... and the held region's keys died before that.
    assert_eq!(
        nic.local_write(a.lkey(), BASE + 100, b"y"),
        Err(DmaError::Invalidated(a.lkey()))
    );
    assert!(!reg.region(a).unwrap().is_valid());
    assert_eq!(reg.region(a).unwrap().mr().mapped_pages(), 0);

    // A get of the range after the change registers anew.
    mm.mmap(BASE, 64 * KIB, true).unwrap();
    let b = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(b.lkey(), a.lkey());
    // The old region is still allocated: its handle takes its puts, and the
    // last one deregisters it.
    let deregs = nic.stats().deregistrations;
    reg.put(a).unwrap();
    assert_eq!(nic.stats().deregistrations, deregs);
    reg.put(a2).unwrap();
    assert_eq!(nic.stats().deregistrations, deregs + 1);
    assert!(matches!(reg.put(a), Err(RegError::StaleHandle)));
    reg.put(b).unwrap();
}

#[test]
fn a_partial_unmap_kills_the_whole_region_and_spares_others() {
    let (mm, nic, mut reg) = setup(64, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    let b = reg.get(BASE + 128 * KIB, 64 * KIB, RW).unwrap();
    reg.put(a).unwrap();
    reg.put(b).unwrap();
    mm.munmap(BASE + 60 * KIB, 4 * KIB).unwrap();
    let a2 = reg.get(BASE, 16 * KIB, RW).unwrap();
    assert_ne!(a2.lkey(), a.lkey());
    let b2 = reg.get(BASE + 128 * KIB, 64 * KIB, RW).unwrap();
    assert_eq!(b2.lkey(), b.lkey());
    nic.local_write(b2.lkey(), BASE + 128 * KIB, b"alive")
        .unwrap();
    reg.put(a2).unwrap();
    reg.put(b2).unwrap();
}

#[test]
fn a_clear_keeps_the_odp_region_and_refaults_the_new_page() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    nic.local_write(a.lkey(), BASE, b"before").unwrap();
    let old = reg.region(a).unwrap().mr().translation(BASE).unwrap();
    mm.zap(BASE, 64 * KIB).unwrap(); // madvise(DONTNEED)
    assert_eq!(reg.region(a).unwrap().mr().mapped_pages(), 0);
    // Same registration, the NIC faults in the fresh page.
    let mut buf = [1u8; 6];
    nic.local_read(a.lkey(), BASE, &mut buf).unwrap();
    assert_eq!(buf, [0; 6]);
    assert_eq!(
        reg.region(a).unwrap().mr().translation(BASE).unwrap().pfn,
        mm.lookup_page(BASE).unwrap().pfn
    );
    let _ = old;
    reg.put(a).unwrap();
    let b = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_eq!(a, b);
    reg.put(b).unwrap();
    assert_eq!(reg.stats().invalidations, 0);
}

#[test]
fn an_event_delivered_directly_invalidates_before_start_returns() {
    let (mm, nic, mut reg) = setup(64, 64 * KIB, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(a).unwrap();
    let range = InvalidateRange::new(PageRange::new(BASE, 64 * KIB).unwrap(), Event::Unmap);
    let inv = mm.notifiers().invalidate_range_start(&range).unwrap();
    // Inside the bracket: keys already dead, no stale hit.
    assert_eq!(
        nic.local_write(a.lkey(), BASE, b"z"),
        Err(DmaError::Invalidated(a.lkey()))
    );
    inv.end();
    let b = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(a.lkey(), b.lkey());
    reg.put(b).unwrap();
}

#[test]
fn explicit_invalidation_kills_keys_and_defers_busy_deregistration() {
    let (_mm, nic, mut reg) = setup(64, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    let b = reg.get(BASE + 128 * KIB, 64 * KIB, RW).unwrap();
    reg.put(b).unwrap();
    assert_eq!(reg.invalidate(BASE, 1 << 20).unwrap(), 2);
    assert_eq!(nic.stats().deregistrations, 1); // b was idle
    assert_eq!(
        nic.local_write(a.lkey(), BASE, b"q"),
        Err(DmaError::Invalidated(a.lkey()))
    );
    reg.put(a).unwrap();
    assert_eq!(nic.stats().deregistrations, 2);
    assert_eq!(reg.stats().invalidations, 2);
}

#[test]
fn releasing_the_address_space_kills_every_region() {
    let (mm, nic, mut reg) = setup(64, 1 << 20, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    reg.put(a).unwrap();
    mm.notifiers().release();
    assert_eq!(
        nic.local_write(a.lkey(), BASE, b"q"),
        Err(DmaError::Invalidated(a.lkey()))
    );
    // New registrations cannot subscribe any more: a typed error.
    assert!(matches!(
        reg.get(BASE, 64 * KIB, RW),
        Err(RegError::Notifier(_))
    ));
    drop(reg);
    assert_eq!(nic.stats().registrations, nic.stats().deregistrations);
}

#[test]
fn a_non_blockable_invalidation_during_a_dma_answers_again_and_changes_nothing() {
    use notifier_core::notifier::NotifierError;
    use notifier_rdma::soft::DmaAccess;
    use notifier_rdma::{Registry, SoftNic};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mm = notifier_rdma::testing::ModelPrimary::new(16);
    mm.mmap(BASE, 64 * KIB, true).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let answer: Arc<Mutex<Option<Result<(), NotifierError>>>> = Arc::default();
    let observer = {
        let (mm, armed, answer) = (mm.clone(), armed.clone(), answer.clone());
        Arc::new(move |_a: &DmaAccess| {
            if armed.swap(false, Ordering::Relaxed) {
                // The OOM reaper's case: the DMA holds the MTT, the callback
                // may not wait for it.
                let range =
                    InvalidateRange::new(PageRange::new(BASE, 64 * KIB).unwrap(), Event::Unmap)
                        .non_blocking();
                let r = mm
                    .notifiers()
                    .invalidate_range_start(&range)
                    .map(|inv| inv.end());
                *answer.lock().unwrap() = Some(r);
            }
        })
    };
    let nic = SoftNic::with_observer(mm.clone(), observer);
    let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
    let h = reg.get(BASE, 64 * KIB, RW).unwrap();
    armed.store(true, Ordering::Relaxed);
    nic.local_write(h.lkey(), BASE, b"in flight").unwrap();
    assert!(matches!(
        answer.lock().unwrap().take(),
        Some(Err(NotifierError::Again))
    ));
    // Nothing was half done: the region and its translation are intact.
    assert!(reg.region(h).unwrap().is_valid());
    assert_eq!(reg.region(h).unwrap().mr().mapped_pages(), 1);
    assert_eq!(reg.stats().invalidations, 0);
    let mut b = [0u8; 9];
    nic.local_read(h.lkey(), BASE, &mut b).unwrap();
    assert_eq!(&b, b"in flight");
    reg.put(h).unwrap();
}

/// Two buffers merged into one registration; one is freed. The key over
/// the other, still mapped and still held, keeps working (ODP: only the
/// freed pages' translations go), the freed pages fail with a typed error
/// (also once new memory is mapped there), and the cache never serves
/// the merged region again. (The `dead_on_arrival` case of the real-memory
/// tests, on the model primary.)
#[test]
fn freeing_a_merged_neighbour_leaves_the_held_buffer_working() {
    use notifier_core::primary::PrimaryFault;
    let (mm, nic, mut reg) = setup(64, 256 * KIB, RegistryConfig::default());
    let a = reg.get(BASE, 64 * KIB, RW).unwrap();
    let b = reg.get(BASE + 64 * KIB, 64 * KIB, RW).unwrap();
    assert_eq!(reg.bounds(b).unwrap(), (BASE, BASE + 128 * KIB), "merged");
    nic.local_write(b.lkey(), BASE + 64 * KIB, b"mine").unwrap();
    reg.put(a).unwrap();
    // Free the first buffer.
    mm.munmap(BASE, 64 * KIB).unwrap();
    let mut buf = [0u8; 4];
    nic.local_read(b.lkey(), BASE + 64 * KIB, &mut buf).unwrap();
    assert_eq!(&buf, b"mine");
    nic.local_write(b.lkey(), BASE + 100 * KIB, b"more")
        .unwrap();
    assert_eq!(
        nic.local_read(b.lkey(), BASE + 8, &mut buf),
        Err(DmaError::Fault(PrimaryFault::NoMapping(BASE)))
    );
    // New memory at the freed address is never reached through the old key.
    mm.mmap(BASE, 64 * KIB, true).unwrap();
    assert_eq!(
        nic.local_write(b.lkey(), BASE + 8, b"new!"),
        Err(DmaError::Fault(PrimaryFault::NoMapping(BASE)))
    );
    // The cache hands out a new region for either buffer.
    let b2 = reg.get(BASE + 64 * KIB, 64 * KIB, RW).unwrap();
    assert_ne!(b2.lkey(), b.lkey());
    let a2 = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(a2.lkey(), b.lkey());
    // The held region goes at its last put.
    let deregs = nic.stats().deregistrations;
    reg.put(b).unwrap();
    assert_eq!(nic.stats().deregistrations, deregs + 1);
    reg.put(b2).unwrap();
    reg.put(a2).unwrap();
}
