//! An application unmapping registered memory in a tight loop: 1,000,000
//! UNMAP events (one 4 KiB page each) through the monitor, with peak RSS
//! reported along the way to show the event path stays bounded.
//!
//! Run: `cargo run --release -p notifier-uffd --example uffd_unmap_storm [N]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifierOps};
use notifier_uffd::{peak_rss_kib, Region, RegisterMode, UffdMonitor, ZeroHandler};

struct Count(AtomicU64, AtomicU64);
impl MmuNotifierOps for Count {
    fn hooks(&self) -> Hooks {
        Hooks::START
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        if r.event() == Event::Unmap {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1
                .fetch_add((r.end() - r.start()) / 4096, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let m = UffdMonitor::builder().build(Arc::new(ZeroHandler))?;
    let _t = m.spawn()?;
    let count = Arc::new(Count(AtomicU64::new(0), AtomicU64::new(0)));
    let _sub = m.notifiers().register(count.clone())?;
    let region = Region::anon(n * 4096)?;
    m.register(&region, RegisterMode::MISSING)?;
    println!("start: peak RSS {} KiB", peak_rss_kib());
    let t = Instant::now();
    for i in 0..n {
        region.munmap(i * 4096, 4096)?;
        if (i + 1) % (n / 10).max(1) == 0 {
            println!(
                "{:>8} unmaps: peak RSS {:>6} KiB, registrations {}",
                i + 1,
                peak_rss_kib(),
                m.registered().len()
            );
        }
    }
    let el = t.elapsed();
    while count.1.load(Ordering::Relaxed) < n {
        std::thread::yield_now();
    }
    let st = m.stats();
    println!(
        "{n} unmap events in {:.2?} ({:.0}/s): {} invalidations covering {} pages, {} coalesced; peak RSS {} KiB",
        el,
        n as f64 / el.as_secs_f64(),
        count.0.load(Ordering::Relaxed),
        count.1.load(Ordering::Relaxed),
        st.coalesced,
        peak_rss_kib()
    );
    assert_eq!(st.unmaps, n);
    assert!(m.registered().is_empty());
    Ok(())
}
