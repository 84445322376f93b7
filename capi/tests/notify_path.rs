//! The notify path allocates nothing: a counting allocator counts the
//! allocations of this thread while an invalidation runs our dispatcher
//! (range generations and a hook) through the notifier set, and while
//! `valid` runs. A thread inside `free()` may hold a malloc lock while
//! the monitor delivers the event it waits for (libfabric issue 5554).
//!
//! One test per binary: the allocator counts per thread, and nothing else
//! runs on the test's thread meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use notifier_core::addr::PageRange;
use notifier_core::notifier::{Event, InvalidateRange, NotifierSubscriptions};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

static CALLS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn hook(
    _arg: *mut core::ffi::c_void,
    _a: *mut core::ffi::c_void,
    _l: usize,
    _e: u32,
) {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

#[test]
fn dispatch_and_valid_allocate_nothing() {
    let subs = NotifierSubscriptions::new();
    let d = notifier::testing::dispatcher(&subs, hook).expect("register the dispatcher");
    let range = PageRange::new(0x7000_0000, 0x10_0000).unwrap();
    // Warm up (first use of thread-locals and the like).
    subs.invalidate_range_start(&InvalidateRange::new(range, Event::Unmap))
        .unwrap()
        .end();
    let before = allocs();
    for _ in 0..1000 {
        let inv = subs
            .invalidate_range_start(&InvalidateRange::new(range, Event::Unmap))
            .unwrap();
        assert!(!d.valid(0x7000_0000, 4096), "valid during the invalidation");
        inv.end();
        assert!(d.valid(0x7000_0000, 4096), "valid after it");
    }
    let n = allocs() - before;
    assert_eq!(CALLS.load(Ordering::Relaxed), 1001);
    assert_eq!(
        n, 0,
        "{n} allocations on the notify path over 1000 invalidations"
    );
}
