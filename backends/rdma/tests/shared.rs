//! The shared registry (`SharedRegistry`): threads share one cache API,
//! each with its own cache; puts cross threads; invalidations reach every
//! thread's cache; exited threads' caches are adopted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use notifier_rdma::{Access, DmaError, RegError, RegistryConfig, SharedRegistry, SoftNic};

const RW: Access = Access::LOCAL_RW;

fn shared(
    len: u64,
) -> (
    Arc<notifier_rdma::testing::ModelPrimary>,
    SoftNic,
    SharedRegistry<SoftNic>,
) {
    let (mm, nic, _) = setup(1024, len, RegistryConfig::default());
    let reg = SharedRegistry::new(&*mm, nic.clone(), RegistryConfig::default());
    (mm, nic, reg)
}

#[test]
fn each_thread_hits_its_own_cache_and_stats_add_up() {
    let (_mm, _nic, reg) = shared(1 << 20);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..100 {
                    let h = reg.get(BASE, 64 * KIB, RW).unwrap();
                    reg.put(h).unwrap();
                }
                let _ = reg.stats(); // publish this thread's counters
            });
        }
    });
    // The exited threads' caches were adopted (a later thread may have
    // reaped an earlier one's already).
    assert!((1..=3).contains(&reg.caches()));
    let s = reg.stats();
    // One miss per thread, the rest hits.
    assert_eq!((s.misses, s.hits), (3, 297));
    // At most the three (exiting threads hand theirs over asynchronously)
    // and this thread's.
    assert!(reg.caches() <= 4);
}

#[test]
fn a_put_on_another_thread_reaches_the_owner() {
    let (_mm, nic, reg) = shared(1 << 20);
    let h = std::thread::scope(|s| {
        s.spawn(|| reg.get(BASE, 64 * KIB, RW).unwrap())
            .join()
            .unwrap()
    });
    // The owner thread has exited: its cache was adopted, the handle lives.
    nic.local_write(h.lkey(), BASE, b"live").unwrap();
    reg.put(h).unwrap();
    // The orphan holds no reference any more: the next slow path reaps it.
    let h2 = reg.get(BASE + 128 * KIB, 64 * KIB, RW).unwrap();
    reg.put(h2).unwrap();
    // A slow path of any thread reaps it (the exited thread hands its
    // cache over asynchronously: retry for a while).
    let t0 = std::time::Instant::now();
    loop {
        let h3 = std::thread::scope(|s| {
            s.spawn(|| reg.get(BASE + 256 * KIB, 4 * KIB, RW).unwrap())
                .join()
                .unwrap()
        });
        reg.put(h3).unwrap();
        if nic.local_write(h.lkey(), BASE, b"dead") == Err(DmaError::UnknownKey(h.lkey())) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 10, "the orphan was never reaped");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_handle_of_another_registry_is_a_typed_error() {
    let (_mm, _nic, a) = shared(1 << 20);
    let (_mm2, _nic2, b) = shared(1 << 20);
    let h = b.get(BASE, 64 * KIB, RW).unwrap();
    // `a` has no cache with that id on this thread, nor anywhere.
    assert!(matches!(a.put(h), Err(RegError::ForeignHandle)));
    b.put(h).unwrap();
}

#[test]
fn an_explicit_invalidation_from_any_thread_kills_every_threads_region() {
    let (_mm, nic, reg) = shared(1 << 20);
    let mine = reg.get(BASE, 64 * KIB, RW).unwrap();
    let theirs = std::thread::scope(|s| {
        s.spawn(|| {
            let h = reg.get(BASE, 64 * KIB, RW).unwrap();
            let _ = reg.stats();
            h
        })
        .join()
        .unwrap()
    });
    assert_ne!(mine.lkey(), theirs.lkey(), "one registration per thread");
    assert_eq!(reg.invalidate(BASE, 64 * KIB).unwrap(), 2);
    for h in [mine, theirs] {
        assert_eq!(
            nic.local_write(h.lkey(), BASE, b"x"),
            Err(DmaError::Invalidated(h.lkey()))
        );
    }
    // A get after it never returns the killed region.
    let again = reg.get(BASE, 64 * KIB, RW).unwrap();
    assert_ne!(again.lkey(), mine.lkey());
    reg.put(again).unwrap();
    reg.put(mine).unwrap();
    reg.put(theirs).unwrap();
}

/// Threads get, DMA and put (half of the puts on another thread) while a
/// mutator unmaps and maps back buffers: no DMA ever reads a buffer's old
/// incarnation, every key is rejected or reaches the current memory.
#[test]
fn threads_against_an_unmapping_mutator_never_see_a_stale_buffer() {
    const BUFS: u64 = 8;
    let (mm, nic, reg) = shared(BUFS * 64 * KIB);
    let gens: Arc<Vec<parking_lot::RwLock<u8>>> =
        Arc::new((0..BUFS).map(|_| parking_lot::RwLock::new(1)).collect());
    // The mutator writes each incarnation's byte through its own cache.
    let fill = |a: u64, g: u8| {
        let h = reg.get(a, 64 * KIB, RW).unwrap();
        nic.local_write(h.lkey(), a, &[g; 64]).unwrap();
        reg.put(h).unwrap();
    };
    for k in 0..BUFS {
        fill(BASE + k * 64 * KIB, 1);
    }
    let stop = AtomicBool::new(false);
    let (stale, ok) = (AtomicU64::new(0), AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<notifier_rdma::MrHandle>();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let tx = tx.clone();
            let (reg, nic, gens, stop, stale, ok) = (&reg, &nic, &gens, &stop, &stale, &ok);
            s.spawn(move || {
                let mut seed = 0x9e37_79b9 * (t + 1);
                while !stop.load(Ordering::Relaxed) {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = (seed >> 33) % BUFS;
                    let a = BASE + k * 64 * KIB;
                    let g = gens[k as usize].read();
                    let h = reg.get(a, 64 * KIB, RW).unwrap();
                    let mut b = [0u8; 64];
                    match nic.local_read(h.lkey(), a, &mut b) {
                        Ok(()) if b.iter().all(|&x| x == *g) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("DMA through a fresh get failed: {e}"),
                    }
                    drop(g);
                    if seed & 1 == 0 {
                        reg.put(h).unwrap();
                    } else {
                        tx.send(h).unwrap();
                    }
                }
            });
        }
        drop(tx);
        // A putter thread: the other half of the puts.
        let reg2 = &reg;
        s.spawn(move || {
            for h in rx {
                reg2.put(h).unwrap();
            }
        });
        // Let the readers start, then keep mutating while they run.
        let t0 = std::time::Instant::now();
        while ok.load(Ordering::Relaxed) < 100 && t0.elapsed().as_secs() < 10 {
            std::thread::yield_now();
        }
        for round in 0..300u64 {
            if round % 16 == 0 {
                std::thread::yield_now();
            }
            let k = round % BUFS;
            let a = BASE + k * 64 * KIB;
            let mut g = gens[k as usize].write();
            mm.munmap(a, 64 * KIB).unwrap();
            mm.mmap(a, 64 * KIB, true).unwrap();
            *g = g.wrapping_add(1).max(1);
            fill(a, *g);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(stale.load(Ordering::Relaxed), 0, "a stale buffer was read");
    assert!(ok.load(Ordering::Relaxed) > 0);
}
