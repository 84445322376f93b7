//! The application's order over real memory (issue 15): once `munmap` or
//! `free()` returned in a thread, no `get` that starts afterwards returns a
//! registration of the freed pages, and no DMA that starts afterwards,
//! through any key, reaches them. Four threads, 100,000 alloc/get/DMA/free
//! rounds, mmap'd and malloc'd buffers mixed, over one shared registry
//! whose coverage follows registration (nothing is watched beforehand).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use notifier_rdma::{Access, DmaError, RegistryConfig, SharedRegistry, SoftNic};
use notifier_uffd::{HandlerThread, UffdMonitor, UffdPrimary, ZeroHandler};

const ROUNDS: u64 = 25_000;
const THREADS: u64 = 4;
const MAPPED: usize = 64 << 10;

fn monitor() -> Option<UffdMonitor> {
    match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
        Ok(m) => Some(m),
        Err(e) if notifier_uffd::uffd_required() => {
            panic!("userfaultfd required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            None
        }
    }
}

#[derive(Default)]
struct Tally {
    rounds: AtomicU64,
    stale_gets: AtomicU64,
    stale_dma: AtomicU64,
    wrong_bytes: AtomicU64,
    /// A fresh key hit by another thread's unmap of an address this
    /// thread's new buffer reused before the monitor read that unmap (the
    /// kernel reports UNMAP after the fact and lets the address be reused
    /// meanwhile): a spurious invalidation, never a stale access.
    spurious: AtomicU64,
}

/// One buffer: mmap'd (unmapped on free) or malloc'd (freed).
fn alloc(mapped: bool, len: usize) -> *mut u8 {
    // SAFETY: plain allocations owned by the caller until `free_buf`.
    unsafe {
        if mapped {
            let p = libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            p.cast()
        } else {
            let p = libc::malloc(len);
            assert!(!p.is_null());
            p.cast()
        }
    }
}

fn free_buf(p: *mut u8, mapped: bool, len: usize) {
    // SAFETY: `p` came from `alloc` with the same `mapped` and `len`.
    unsafe {
        if mapped {
            assert_eq!(libc::munmap(p.cast(), len), 0);
        } else {
            libc::free(p.cast());
        }
    }
}

#[test]
fn a_get_or_dma_after_free_returned_never_reaches_the_freed_pages() {
    let Some(m) = monitor() else { return };
    let thread: HandlerThread = m.spawn().unwrap();
    let prim = Arc::new(UffdPrimary::new(&m).unwrap());
    let nic = SoftNic::new(prim.clone());
    let reg = SharedRegistry::new(&*prim, nic.clone(), RegistryConfig::default());
    let tally = Tally::default();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (reg, nic, tally) = (&reg, &nic, &tally);
            s.spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t + 1);
                for round in 0..ROUNDS {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let mapped = round % 2 == 0;
                    let len = if mapped {
                        MAPPED
                    } else {
                        64 + (seed >> 40) as usize % 8192
                    };
                    let p = alloc(mapped, len);
                    let tag = (round as u8).wrapping_add(t as u8) | 1;
                    // SAFETY: the buffer just allocated, `len` bytes.
                    unsafe { core::ptr::write_bytes(p, tag, len) };
                    let a = p as u64;
                    let h = reg.get(a, len as u64, Access::LOCAL_RW).unwrap();
                    let mut b = [0u8; 16];
                    let off = (seed as usize >> 3) % (len - 16);
                    match nic.local_read(h.lkey(), a + off as u64, &mut b) {
                        Ok(()) if b.iter().any(|&x| x != tag) => {
                            tally.wrong_bytes.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {}
                        Err(DmaError::Invalidated(_) | DmaError::Fault(_)) => {
                            tally.spurious.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("t{t} round {round}: DMA failed: {e}"),
                    }
                    reg.put(h).unwrap();
                    free_buf(p, mapped, len);
                    if mapped {
                        // The pages are gone: no DMA through the old key.
                        if nic.local_read(h.lkey(), a, &mut b).is_ok() {
                            tally.stale_dma.fetch_add(1, Ordering::Relaxed);
                        }
                        // A new mapping, often at the same address: a get
                        // must never return the old registration.
                        let q = alloc(true, MAPPED);
                        // SAFETY: as above.
                        unsafe { core::ptr::write_bytes(q, tag ^ 0xff, MAPPED) };
                        let h2 = reg.get(q as u64, MAPPED as u64, Access::LOCAL_RW).unwrap();
                        if q as u64 == a && h2.lkey() == h.lkey() {
                            tally.stale_gets.fetch_add(1, Ordering::Relaxed);
                        }
                        match nic.local_read(h2.lkey(), q as u64, &mut b) {
                            Ok(()) if b.iter().all(|&x| x == tag ^ 0xff) => {}
                            Ok(()) => {
                                tally.wrong_bytes.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(DmaError::Invalidated(_) | DmaError::Fault(_)) => {
                                tally.spurious.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("DMA failed: {e}"),
                        }
                        reg.put(h2).unwrap();
                        free_buf(q, true, MAPPED);
                    }
                    tally.rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let r = tally.rounds.load(Ordering::Relaxed);
    eprintln!(
        "{r} rounds; {:?}; stale gets {}, stale DMA {}, wrong bytes {}, spurious {}",
        reg.stats(),
        tally.stale_gets.load(Ordering::Relaxed),
        tally.stale_dma.load(Ordering::Relaxed),
        tally.wrong_bytes.load(Ordering::Relaxed),
        tally.spurious.load(Ordering::Relaxed)
    );
    assert_eq!(r, ROUNDS * THREADS);
    assert_eq!(tally.stale_gets.load(Ordering::Relaxed), 0, "a stale get");
    assert_eq!(
        tally.stale_dma.load(Ordering::Relaxed),
        0,
        "a DMA reached a freed page"
    );
    assert_eq!(
        tally.wrong_bytes.load(Ordering::Relaxed),
        0,
        "a DMA read other bytes"
    );
    drop(reg);
    thread.stop();
}
