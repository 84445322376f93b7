//! Real memory as a `Primary` and a `FrameStore`.

mod common;

use std::sync::Arc;

use common::{monitor, P};
use notifier_core::frame::{FrameError, Pfn};
use notifier_core::notifier::{
    Again, Event, IntervalNotifier, IntervalNotifierOps, InvalidateRange,
};
use notifier_core::primary::{Primary, PrimaryFault};
use notifier_uffd::{
    Advice, FaultError, Fill, PageBuf, PageFault, Region, RegisterMode, UffdMonitor, UffdPrimary,
};
use parking_lot::Mutex;

fn handler() -> Arc<dyn notifier_uffd::FaultHandler> {
    Arc::new(|f: &PageFault, page: &mut PageBuf| {
        if f.pgoff == 7 {
            return Err(FaultError("page 7 has no backing".into()));
        }
        page[..8].copy_from_slice(&(0x1000 + f.pgoff).to_le_bytes());
        Ok(Fill::Bytes)
    })
}

#[test]
fn fault_page_populates_and_translates_to_the_virtual_page() {
    let Some(m) = monitor(UffdMonitor::builder(), handler()) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let prim = UffdPrimary::new(&m).unwrap();
    let region = Region::anon(8 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let a = region.addr() + 3 * P;
    assert_eq!(prim.lookup_page(a), None, "not populated yet");
    let t = prim.fault_page(a + 5, false).unwrap();
    assert_eq!(t.pfn, Pfn(a >> 12));
    assert!(t.writable);
    assert_eq!(prim.lookup_page(a), Some(t));
    assert_eq!(prim.frames().load(t.pfn, 0).unwrap(), 0x1003);
    // Writes through the frame store are the process's memory.
    prim.frames().store(t.pfn, 8, 0xfeed).unwrap();
    assert_eq!(prim.frames().fetch_add(t.pfn, 8, 1).unwrap(), 0xfeed);
    let mut b = [0u8; 8];
    region.read(3 * P + 8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xfeee);
    // Errors are typed.
    assert_eq!(
        prim.fault_page(region.addr() + 7 * P, false),
        Err(PrimaryFault::Bus(region.addr() + 7 * P))
    );
    assert!(m.last_error().unwrap().contains("page 7"));
    assert_eq!(
        prim.fault_page(0x1000, false),
        Err(PrimaryFault::NoMapping(0x1000))
    );
    assert!(Arc::ptr_eq(prim.notifiers(), m.notifiers()));
}

#[test]
fn real_memory_frame_store_contract() {
    let Some(m) = monitor(UffdMonitor::builder(), handler()) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let prim = UffdPrimary::new(&m).unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let f = prim.frames();
    let pfn = Pfn(region.addr() >> 12);
    assert!(f.pfn_valid(pfn));
    assert!(!f.pfn_valid(Pfn(pfn.0 + 2)));
    assert_eq!(f.alloc(), Err(FrameError::OutOfMemory));
    assert_eq!(f.allocated(), 0);
    assert_eq!(
        f.load(Pfn(pfn.0 + 2), 0),
        Err(FrameError::InvalidPfn(pfn.0 + 2))
    );
    assert_eq!(
        f.load(pfn, 4),
        Err(FrameError::OutOfBounds { offset: 4, len: 8 })
    );
    // A load of a missing page faults it in through the handler.
    assert_eq!(f.load(Pfn(pfn.0 + 1), 0).unwrap(), 0x1001);
    f.write(pfn, 100, b"real bytes").unwrap();
    let mut b = [0u8; 10];
    region.read(100, &mut b).unwrap();
    assert_eq!(&b, b"real bytes");
}

#[test]
fn write_fault_on_tracked_page_upgrades_and_logs_dirty() {
    let Some(m) = monitor(UffdMonitor::builder(), handler()) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let prim = UffdPrimary::new(&m).unwrap();
    let region = Region::anon(4 * P).unwrap();
    let range = m
        .register(&region, RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    let a = region.addr() + P;
    prim.fault_page(a, true).unwrap();
    m.write_protect(range).unwrap();
    let ro = prim.lookup_page(a).unwrap();
    assert!(!ro.writable, "write-protected page translates read-only");
    assert_eq!(prim.fault_page(a, false).unwrap(), ro);
    let rw = prim.fault_page(a, true).unwrap();
    assert!(rw.writable);
    assert_eq!(m.take_dirty(range), vec![a]);
}

/// A minimal mirror: interval subscription + one-entry-per-page table,
/// filled by the reader protocol from the uffd primary.
struct Mirror {
    table: Mutex<std::collections::BTreeMap<u64, Pfn>>,
    events: Mutex<Vec<(Event, u64, u64)>>,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(
        &self,
        sub: &IntervalNotifier,
        r: &InvalidateRange,
        cur_seq: u64,
    ) -> Result<(), Again> {
        let mut t = self.table.lock();
        sub.set_seq(cur_seq);
        let gone: Vec<u64> = t.range(r.start()..r.end()).map(|(k, _)| *k).collect();
        for k in gone {
            t.remove(&k);
        }
        self.events.lock().push((r.event(), r.start(), r.end()));
        Ok(())
    }
}

#[test]
fn a_mirror_fed_by_the_monitor_drops_entries_on_remove_and_unmap() {
    let Some(m) = monitor(UffdMonitor::builder(), handler()) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let prim = UffdPrimary::new(&m).unwrap();
    let region = Region::anon(4 * P).unwrap();
    let base = region.addr();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let sub = m
        .notifiers()
        .interval_subscribe(
            base,
            4 * P,
            Mirror {
                table: Mutex::default(),
                events: Mutex::default(),
            },
        )
        .unwrap();
    let map = |addr: u64| loop {
        let seq = sub.read_begin();
        let t = prim.fault_page(addr, false).unwrap();
        let mut table = sub.ops().table.lock();
        if sub.read_retry(seq) {
            continue;
        }
        table.insert(addr, t.pfn);
        break;
    };
    for p in 0..4 {
        map(base + p * P);
    }
    assert_eq!(sub.ops().table.lock().len(), 4);
    region.madvise(P, P, Advice::DontNeed).unwrap();
    common::wait_until("remove seen", || !sub.ops().events.lock().is_empty());
    assert!(!sub.ops().table.lock().contains_key(&(base + P)));
    region.munmap(2 * P, 2 * P).unwrap();
    common::wait_until("unmap seen", || sub.ops().events.lock().len() == 2);
    assert_eq!(
        *sub.ops().events.lock(),
        vec![
            (Event::Clear, base + P, base + 2 * P),
            (Event::Unmap, base + 2 * P, base + 4 * P)
        ]
    );
    assert_eq!(
        sub.ops().table.lock().keys().copied().collect::<Vec<_>>(),
        vec![base]
    );
    // The mirror's remaining entry still reads the real bytes.
    assert_eq!(prim.frames().load(Pfn(base >> 12), 0).unwrap(), 0x1000);
}
