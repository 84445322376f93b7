//! DMA threads against unmapping threads: every frame the NIC touches is
//! checked, at the moment of access, against the primary's current
//! mapping (the coherence oracle). Zero violations allowed.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use notifier_core::primary::Primary;
use notifier_rdma::soft::{DmaAccess, DmaObserver};
use notifier_rdma::testing::ModelPrimary;
use notifier_rdma::{Access, DmaError, Registry, RegistryConfig, SoftNic};
use parking_lot::Mutex;

const BUFS: u64 = 8;
const BUF_LEN: u64 = 16 * KIB;
const STRIDE: u64 = 64 * KIB;

#[derive(Default)]
struct Oracle {
    checked: AtomicU64,
    violations: AtomicU64,
}

impl Oracle {
    fn check(&self, mm: &ModelPrimary, a: &DmaAccess) {
        self.checked.fetch_add(1, Ordering::Relaxed);
        let ok =
            matches!(mm.lookup_page(a.page), Some(t) if t.pfn == a.pfn && (t.writable || !a.write));
        if !ok {
            self.violations.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "VIOLATION: {a:?} but the primary maps {:?}",
                mm.lookup_page(a.page)
            );
        }
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn dma_threads_never_touch_a_frame_the_primary_does_not_map_there() {
    let mm = ModelPrimary::new(512);
    for k in 0..BUFS {
        mm.mmap(BASE + k * STRIDE, BUF_LEN, true).unwrap();
    }
    let oracle = Arc::new(Oracle::default());
    let observer: DmaObserver = {
        let (mm, oracle) = (mm.clone(), oracle.clone());
        Arc::new(move |a: &DmaAccess| oracle.check(&mm, a))
    };
    // The oracle can fail: a made-up access is a violation.
    observer(&DmaAccess {
        key: 0,
        page: BASE,
        pfn: notifier_core::frame::Pfn(1),
        write: false,
    });
    assert_eq!(oracle.violations.swap(0, Ordering::Relaxed), 1);

    let nic = SoftNic::with_observer(mm.clone(), observer);
    let reg = Mutex::new(Registry::new(
        &*mm,
        nic.clone(),
        RegistryConfig {
            max_regions: 6,
            ..Default::default()
        },
    ));
    let ok = AtomicU64::new(0);
    let refused = AtomicU64::new(0);

    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (reg, nic, ok, refused) = (&reg, &nic, &ok, &refused);
            s.spawn(move || {
                let mut seed = 0x9e37_79b9 + t;
                for _ in 0..3000 {
                    let r = rng(&mut seed);
                    let k = r % BUFS;
                    let base = BASE + k * STRIDE;
                    let Ok(h) = reg.lock().get(base, BUF_LEN, Access::ALL) else {
                        continue;
                    };
                    let addr = base + (r >> 8) % (BUF_LEN - 64) / 8 * 8;
                    let mut buf = [0u8; 48];
                    let res = match (r >> 4) % 4 {
                        0 => nic.remote_write(h.rkey(), addr, &[t as u8; 48]),
                        1 => nic.remote_read(h.rkey(), addr, &mut buf),
                        2 => nic.remote_fetch_add(h.rkey(), addr, 1).map(|_| ()),
                        _ => nic.local_write(h.lkey(), addr, &[7; 48]),
                    };
                    match res {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(
                            DmaError::Invalidated(_) | DmaError::Fault(_) | DmaError::UnknownKey(_),
                        ) => refused.fetch_add(1, Ordering::Relaxed),
                        Err(e) => panic!("unexpected DMA error {e}"),
                    };
                    reg.lock().put(h).unwrap();
                }
            });
        }
        for t in 0..2u64 {
            let mm = &mm;
            s.spawn(move || {
                let mut seed = 0x1234_5678 + t;
                for i in 0..600 {
                    let k = (rng(&mut seed) % (BUFS / 2)) * 2 + t;
                    let base = BASE + k * STRIDE;
                    if i % 3 == 0 {
                        mm.zap(base, BUF_LEN).unwrap();
                    } else {
                        mm.munmap(base, BUF_LEN).unwrap();
                        std::thread::yield_now();
                        mm.mmap(base, BUF_LEN, true).unwrap();
                    }
                }
            });
        }
    });

    let checked = oracle.checked.load(Ordering::Relaxed);
    let violations = oracle.violations.load(Ordering::Relaxed);
    eprintln!(
        "checked {checked} frame accesses, {} DMAs done, {} refused, {violations} violations",
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(violations, 0);
    assert!(checked > 1000, "the DMA threads must really touch memory");
    let reg = reg.into_inner();
    assert!(reg.stats().invalidations > 0);
    drop(reg);
    let s = nic.stats();
    assert_eq!(s.registrations, s.deregistrations);
    // No frame leaked: every allocated frame is mapped by the primary.
    assert_eq!(mm.frames_allocated(), mm.present_pages());
}
