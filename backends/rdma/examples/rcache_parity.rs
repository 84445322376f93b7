//! The registration-cache parity workloads: prints `NAME VALUE UNIT` lines
//! (and `#` diagnostics) to pair with UCX's `ucs_rcache` figures.
//!
//! `cargo run --release -p notifier-rdma --example rcache_parity`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes, to report registry memory per region.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let cfg = notifier_rdma::parity::ParityConfig {
        alloc_probe: Some(|| LIVE.load(Ordering::Relaxed)),
        ..Default::default()
    };
    if let Err(e) = notifier_rdma::parity::run(&cfg) {
        eprintln!("rcache parity: {e}");
        std::process::exit(1);
    }
}
