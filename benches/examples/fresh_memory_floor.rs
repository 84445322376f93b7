//! What fresh memory costs a registration cache on this host, and the floor
//! of a leaner region layout: the evidence behind the `miss_getput_grow`
//! analysis in `docs/BENCHMARKS.md`.
//!
//! 1. Growing a `Vec` by B bytes per region over 65,536 regions (nothing
//!    else): the price of B bytes of never-touched memory per registration.
//! 2. One `Arc` of 64 bytes per region (what a per-region allocation costs).
//! 3. The fused layout the registry's next storage design would have: a
//!    64-byte record per region in never-moving 1,024-record segments, a
//!    4-byte open-addressing hash bucket (doubling, rehash reading the
//!    records), a 12-byte ordered-index entry (64-entry blocks, keys and
//!    slots apart), two uncontended mutex round trips and the sequence
//!    loads of `read_begin`/`read_retry`, and none of the registry's other
//!    logic: a floor, not an implementation.
//!
//! `cargo run --release -p notifier-bench --example fresh_memory_floor`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use notifier_rdma::parity::minor_faults as faults;

const REGIONS: usize = 65_536;
const SEG: usize = 1024;
const EMPTY: u32 = u32::MAX;

fn report(what: &str, t: Instant, f0: Option<u64>) {
    let ns = t.elapsed().as_nanos() as f64 / REGIONS as f64;
    match (f0, faults()) {
        (Some(a), Some(z)) => println!("{what}: {ns:.1} ns/region, {} page faults", z - a),
        _ => println!("{what}: {ns:.1} ns/region"),
    }
}

/// The fused layout's per-region record (64 bytes, one cache line).
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Record {
    start: u64,
    pages: u32,
    gen: u32,
    lkey: u32,
    rkey: u32,
    refs: u32,
    tick: u32,
    state: u64,
    mtt: u64,
    chunk: u64,
}

fn home(page: u64, mask: usize) -> usize {
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & mask
}

fn fused() {
    let f0 = faults();
    let t = Instant::now();
    let mut segs: Vec<Box<[Record]>> = Vec::new();
    let mut buckets: Vec<u32> = vec![EMPTY; 16];
    let mut keys: Vec<Vec<u64>> = Vec::new();
    let mut slots: Vec<Vec<u32>> = Vec::new();
    let lock = Mutex::new(());
    let seq = AtomicU64::new(0);
    for i in 0..REGIONS {
        let start = 0x1000_0000_0000u64 + (i as u64) * (128 << 10);
        drop(black_box(lock.lock()));
        let s = seq.load(Ordering::Acquire);
        if i % SEG == 0 {
            segs.push(vec![Record::default(); SEG].into_boxed_slice());
        }
        segs[i / SEG][i % SEG] = Record {
            start,
            pages: 16,
            gen: 1,
            lkey: i as u32,
            rkey: i as u32 | 1,
            refs: 1,
            tick: i as u32,
            ..Record::default()
        };
        {
            let _g = lock.lock();
            if keys.last().is_none_or(|b| b.len() == 64) {
                keys.push(Vec::with_capacity(64));
                slots.push(Vec::with_capacity(64));
            }
            keys.last_mut().expect("a block").push(start);
            slots.last_mut().expect("a block").push(i as u32);
            black_box(seq.load(Ordering::Relaxed) != s);
        }
        if (i + 1) * 4 > buckets.len() * 3 {
            let grown = vec![EMPTY; 2 * buckets.len()];
            let old = std::mem::replace(&mut buckets, grown);
            let mask = buckets.len() - 1;
            for b in old.into_iter().filter(|&b| b != EMPTY) {
                let page = segs[b as usize / SEG][b as usize % SEG].start >> 12;
                let mut j = home(page, mask);
                while buckets[j] != EMPTY {
                    j = (j + 1) & mask;
                }
                buckets[j] = b;
            }
        }
        let mask = buckets.len() - 1;
        let mut j = home(start >> 12, mask);
        while buckets[j] != EMPTY {
            j = (j + 1) & mask;
        }
        buckets[j] = i as u32;
        segs[i / SEG][i % SEG].refs -= 1;
    }
    black_box((&segs, &buckets, &keys, &slots));
    // Kept, like every row's memory: the next row must grow into fresh pages.
    std::mem::forget((segs, buckets, keys, slots));
    report(
        "fused layout floor (64 B record + 4 B bucket + 12 B index entry)",
        t,
        f0,
    );
}

fn main() {
    // First, on an untouched heap.
    fused();
    for bytes in [16usize, 32, 64, 96, 128, 160] {
        let f0 = faults();
        let t = Instant::now();
        let mut v: Vec<u64> = Vec::new();
        for i in 0..REGIONS {
            for w in 0..bytes / 8 {
                v.push((i + w) as u64);
            }
        }
        black_box(&v);
        report(&format!("Vec growth, {bytes:>3} B per region"), t, f0);
        // Kept: freed memory would make the next row's pages warm.
        std::mem::forget(v);
    }
    let f0 = faults();
    let t = Instant::now();
    let v: Vec<Arc<[u64; 8]>> = (0..REGIONS).map(|i| Arc::new([i as u64; 8])).collect();
    black_box(&v);
    report("one Arc<[u64; 8]> per region", t, f0);
    std::mem::forget(v);
}
