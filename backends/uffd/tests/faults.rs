//! Serving faults: missing (bytes, zero page), minor (CONTINUE), write
//! protect (dirty log), a REMOVE racing faults on the same page, and a
//! failing handler seen by a kernel-mode access.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{monitor, wait_until, Rec, P};
use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};
use notifier_uffd::{
    Advice, FaultError, Fill, OpenPath, PageBuf, PageFault, Region, RegisterMode, UffdMonitor,
    ZeroHandler,
};

#[test]
fn missing_fault_is_served_with_the_handlers_bytes_and_offset() {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = Arc::new(move |f: &PageFault, page: &mut PageBuf| {
        s2.lock().push((f.pgoff, f.addr, f.write, f.range));
        for (i, b) in page.iter_mut().enumerate() {
            *b = (f.pgoff as u8).wrapping_mul(16).wrapping_add(i as u8);
        }
        Ok(Fill::Bytes)
    });
    let Some(m) = monitor(UffdMonitor::builder(), h) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let region = Region::anon(4 * P).unwrap();
    let range = m.register(&region, RegisterMode::MISSING).unwrap();
    let mut buf = [0u8; 8];
    region.read(2 * P + 3, &mut buf).unwrap();
    assert_eq!(buf, [35, 36, 37, 38, 39, 40, 41, 42]);
    region.write(3 * P, &[7]).unwrap();
    assert_eq!(region.read_u8(3 * P + 1).unwrap(), 49);
    assert_eq!(
        *seen.lock(),
        vec![
            (2, region.addr() + 2 * P, false, range),
            (3, region.addr() + 3 * P, true, range)
        ]
    );
    // Counters are bumped after the fill ioctl woke the faulting thread.
    wait_until("copies counted", || m.stats().copies == 2);
    let st = m.stats();
    assert_eq!((st.missing_faults, st.copies, st.sigbus), (2, 2, 0));
}

#[test]
fn zero_answer_maps_the_zero_page() {
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let mut buf = [1u8; 64];
    region.read(P, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 64]);
    region.write(P, &[5]).unwrap();
    assert_eq!(region.read_u8(P).unwrap(), 5);
    wait_until("zero page counted", || m.stats().zeropages == 1);
    assert_eq!(m.stats().copies, 0);
}

#[test]
fn minor_fault_on_memfd_is_served_with_continue() {
    let Some(m) = monitor(UffdMonitor::builder(), Arc::new(ZeroHandler)) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let region = Region::memfd(4 * P).unwrap();
    let alias = region.alias().unwrap();
    // Fill the page cache through the alias (not registered).
    alias.write(P, b"page cache bytes").unwrap();
    m.register(&region, RegisterMode::MINOR).unwrap();
    let mut buf = [0u8; 16];
    region.read(P, &mut buf).unwrap();
    assert_eq!(&buf, b"page cache bytes");
    wait_until("continue counted", || m.stats().continues == 1);
    assert_eq!(m.stats().minor_faults, 1);
    // Writes through the registered mapping reach the shared page.
    region.write(P, b"X").unwrap();
    assert_eq!(alias.read_u8(P).unwrap(), b'X');
}

#[test]
fn write_protect_announces_soft_dirty_and_logs_written_pages() {
    let h = Arc::new(|f: &PageFault, page: &mut PageBuf| {
        page.fill(f.pgoff as u8);
        Ok(Fill::Bytes)
    });
    let Some(m) = monitor(UffdMonitor::builder(), h) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let rec = Arc::new(Rec::default());
    let _r = m.notifiers().register(rec.clone()).unwrap();
    let region = Region::anon(8 * P).unwrap();
    let range = m
        .register(&region, RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    for p in 0..8 {
        region.read_u8(p * P).unwrap();
    }
    m.write_protect(range).unwrap();
    assert_eq!(
        *rec.log.lock(),
        vec![(Event::SoftDirty, range.start(), range.end())]
    );
    region.write(P + 10, &[0xEE]).unwrap();
    region.write(5 * P, &[0xDD, 0xDC]).unwrap();
    region.write(5 * P + 100, &[0xDB]).unwrap();
    assert_eq!(region.read_u8(6 * P).unwrap(), 6, "reads do not dirty");
    assert_eq!(
        m.take_dirty(range),
        vec![range.start() + P, range.start() + 5 * P]
    );
    assert_eq!(
        m.take_dirty(range),
        Vec::<u64>::new(),
        "the log is read once"
    );
    assert_eq!(region.read_u8(P + 10).unwrap(), 0xEE);
    wait_until("wp faults counted", || m.stats().wp_faults == 2);
    // Re-arming catches the next write of the same page.
    m.write_protect(range).unwrap();
    region.write(P, &[1]).unwrap();
    assert_eq!(m.take_dirty(range), vec![range.start() + P]);
    // Only WP-registered ranges can be tracked.
    let other = Region::anon(P).unwrap();
    let r2 = m.register(&other, RegisterMode::MISSING).unwrap();
    assert!(matches!(
        m.write_protect(r2),
        Err(notifier_uffd::UffdError::NotRegistered { .. })
    ));
}

/// Counts REMOVE invalidations; the handler serves the count it has seen.
struct Removes(Arc<AtomicU64>);
impl MmuNotifierOps for Removes {
    fn hooks(&self) -> Hooks {
        Hooks::START
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        if r.event() == Event::Clear {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[test]
fn remove_racing_faults_on_the_same_page_is_applied_before_later_faults() {
    const ROUNDS: u64 = 2000;
    let applied = Arc::new(AtomicU64::new(0));
    let a2 = applied.clone();
    let h = Arc::new(move |_: &PageFault, page: &mut PageBuf| {
        page[..8].copy_from_slice(&a2.load(Ordering::SeqCst).to_le_bytes());
        Ok(Fill::Bytes)
    });
    let Some(m) = monitor(UffdMonitor::builder(), h) else {
        return;
    };
    let _t = m.spawn().unwrap();
    let _sub = m
        .notifiers()
        .register(Arc::new(Removes(applied.clone())))
        .unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    let read = |r: &Region| {
        let mut b = [0u8; 8];
        r.read(0, &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    let stop = AtomicU64::new(0);
    std::thread::scope(|sc| {
        // Racing reader: faults on the page while it is being removed. (Its
        // 8-byte reads are byte by byte, so a zap in the middle of one can
        // mix two fills' bytes: it checks nothing about the value, only
        // that every fault it takes is served.)
        sc.spawn(|| {
            while stop.load(Ordering::Relaxed) == 0 {
                region.read_u8(0).unwrap();
            }
        });
        for k in 1..=ROUNDS {
            region.madvise(0, P, Advice::DontNeed).unwrap();
            // This fault happens after REMOVE k was raised: it must be served
            // by a handler that already saw REMOVE k applied.
            let v = read(&region);
            assert!(
                v >= k,
                "round {k}: fault served with {v} before REMOVE {k} was applied"
            );
        }
        stop.store(1, Ordering::Relaxed);
    });
    let st = m.stats();
    assert_eq!(st.removes, ROUNDS);
    assert_eq!(
        applied.load(Ordering::SeqCst) + st.coalesced,
        ROUNDS,
        "every REMOVE invalidated (merged ones once)"
    );
    assert_eq!(st.sigbus, 0);
    eprintln!("race stats: {st:?}");
}

#[test]
fn failing_handler_poisons_the_page_for_a_kernel_mode_access() {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let h = Arc::new(move |f: &PageFault, page: &mut PageBuf| {
        if f.pgoff == 1 && !failed.swap(true, Ordering::SeqCst) {
            return Err(FaultError("no backing for page 1".into()));
        }
        page.fill(0x11);
        Ok(Fill::Bytes)
    });
    let Some(m) = monitor(UffdMonitor::builder(), h) else {
        return;
    };
    if m.open_path() != OpenPath::Device {
        eprintln!("SKIP: kernel-mode faults need /dev/userfaultfd");
        return;
    }
    let _t = m.spawn().unwrap();
    let region = Region::anon(2 * P).unwrap();
    m.register(&region, RegisterMode::MISSING).unwrap();
    // read(2) into the missing page: the kernel faults, our handler fails,
    // the page is poisoned and the copy fails with EFAULT (a user access
    // would get SIGBUS: see tests/process.rs).
    let file = std::fs::File::open("/proc/self/cmdline").unwrap();
    let err = region.read_from(P, 16, &file).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
    wait_until("failure counted", || m.stats().sigbus == 1);
    assert!(m.last_error().unwrap().contains("no backing for page 1"));
    // Page 0 is still served.
    assert_eq!(region.read_u8(0).unwrap(), 0x11);
    // MADV_DONTNEED clears the poison; the handler is asked again.
    region.madvise(P, P, Advice::DontNeed).unwrap();
    assert_eq!(region.read_u8(P).unwrap(), 0x11);
    assert_eq!(m.stats().sigbus, 1);
}
