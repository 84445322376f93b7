//! The software primary under a minimal secondary MMU that follows it
//! through an interval subscription (protocol 2): while mutators unmap,
//! reclaim, migrate, write-protect and COW, the mirror never holds a
//! translation that disagrees with the primary once the mutation is done,
//! and concurrent COW races leave every reference balanced.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use notifier_core::mm::{Advice, MmapRequest, Prot};
use notifier_core::notifier::{Again, IntervalNotifier, IntervalNotifierOps, InvalidateRange};
use notifier_core::primary::{Primary, Translation};
use parking_lot::Mutex;

#[derive(Default)]
struct Mirror {
    table: Mutex<HashMap<u64, Translation>>,
}

struct MirrorOps(Arc<Mirror>);

impl IntervalNotifierOps for MirrorOps {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        r: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut t = self.0.table.lock();
        sub.set_seq(cur_seq);
        t.retain(|a, _| !(r.start() <= *a && *a < r.end()));
        Ok(())
    }
}

#[test]
fn interval_mirror_follows_the_primary_through_mutations() {
    let mm = new_mm();
    let n = 32u64;
    let a = mm.mmap(&MmapRequest::anon(n * PAGE, Prot::RW)).unwrap();
    let mirror = Arc::new(Mirror::default());
    let sub = mm
        .notifiers()
        .interval_subscribe(a, n * PAGE, MirrorOps(mirror.clone()))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (mm, mirror, stop) = (mm.clone(), mirror.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let addr = a + (i % n) * PAGE;
                let write = i % 3 == 0;
                loop {
                    let seq = sub.notifier().read_begin();
                    let Ok(t) = mm.fault_page(addr, write) else {
                        break;
                    };
                    let mut tab = mirror.table.lock();
                    if sub.notifier().read_retry(seq) {
                        continue;
                    }
                    tab.insert(addr, t);
                    break;
                }
                i += 1;
            }
            sub
        })
    };
    let mut checked = 0usize;
    for round in 0..300u64 {
        if round % 10 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let p = a + (round * 5 % n) * PAGE;
        match round % 5 {
            0 => mm.madvise(p, PAGE, Advice::DontNeed).unwrap(),
            1 => drop(mm.try_to_unmap(a, n * PAGE).unwrap()),
            2 => drop(mm.migrate(p, 2 * PAGE.min((n * PAGE + a) - p)).unwrap()),
            3 => {
                mm.mprotect(p, PAGE, Prot::READ).unwrap();
                mm.mprotect(p, PAGE, Prot::RW).unwrap();
            }
            _ => drop(mm.fork().unwrap()),
        }
        // Between mutations (no bracket open), every mirrored entry must be
        // what the primary maps now, with no more permission.
        let tab = mirror.table.lock();
        for (addr, t) in tab.iter() {
            checked += 1;
            let cur = mm.lookup_page(*addr);
            assert!(
                cur.is_some_and(|c| c.pfn == t.pfn && (c.writable || !t.writable)),
                "round {round}: stale mirror entry at {addr:#x}: {t:?} vs {cur:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sub = reader.join().unwrap();
    assert!(checked > 0, "the mirror never held an entry");
    eprintln!("checked {checked} mirrored entries");
    sub.unsubscribe().unwrap();
}

#[test]
fn concurrent_cow_races_balance_references() {
    let mm = new_mm();
    let n = 16u64;
    let a = mm.mmap(&MmapRequest::anon(n * PAGE, Prot::RW)).unwrap();
    for i in 0..n {
        mm.write_u64(a + i * PAGE, i).unwrap();
    }
    for _ in 0..20 {
        let child = mm.fork().unwrap();
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let (mm, child) = (mm.clone(), child.clone());
                std::thread::spawn(move || {
                    for i in 0..n {
                        let target = if (i + t) % 2 == 0 { &mm } else { &child };
                        target.write_u64(a + i * PAGE + 8 * (t + 1), t).unwrap();
                        assert_eq!(target.read_u64(a + i * PAGE).unwrap(), i);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        drop(child);
    }
    mm.munmap(a, n * PAGE).unwrap();
    assert_eq!(mm.tracked_pages(), 0);
}

#[test]
fn skipping_an_invalidation_leaves_the_mirror_stale() {
    let mm = new_mm();
    let a = mm.mmap(&MmapRequest::anon(2 * PAGE, Prot::RW)).unwrap();
    let mirror = Arc::new(Mirror::default());
    let sub = mm
        .notifiers()
        .interval_subscribe(a, 2 * PAGE, MirrorOps(mirror.clone()))
        .unwrap();
    let fill = |addr: u64| {
        let seq = sub.notifier().read_begin();
        let t = mm.fault_page(addr, true).unwrap();
        let mut tab = mirror.table.lock();
        assert!(!sub.notifier().read_retry(seq));
        tab.insert(addr, t);
    };
    fill(a);
    fill(a + PAGE);
    mm.madvise(a, PAGE, Advice::DontNeed).unwrap();
    assert!(
        !mirror.table.lock().contains_key(&a),
        "a correct primary invalidates"
    );
    mm.inject()
        .set_skip_event(Some(notifier_core::notifier::Event::Clear));
    mm.madvise(a + PAGE, PAGE, Advice::DontNeed).unwrap();
    let stale = mirror.table.lock().get(&(a + PAGE)).copied().unwrap();
    assert_ne!(
        mm.lookup_page(a + PAGE).map(|t| t.pfn),
        Some(stale.pfn),
        "the mirror is now stale"
    );
}
