//! Page-table memory in bytes (not time): the budget is
//! `1.1 × 8 B per mapped page + one 4 KiB table per touched 2 MiB`, plus
//! the directory tables above the leaves, reported separately.

use std::sync::Arc;

use notifier_core::frame::HeapFrames;
use notifier_core::mm::{Mm, MmapRequest, Prot, LEAF_SPAN};

const PAGE: u64 = 4096;

struct Figures {
    mapped: u64,
    leaves: usize,
    dirs: usize,
    bytes: usize,
    leaf_bytes: usize,
    budget: f64,
}

fn measure(len: u64, stride: u64) -> Figures {
    let mm = Mm::new(Arc::new(HeapFrames::new(0x1000, 20_000)));
    let a = mm.mmap(&MmapRequest::anon(len, Prot::RW)).unwrap();
    let mut mapped = 0;
    let mut off = 0;
    while off < len {
        mm.write_u64(a + off, 1).unwrap();
        mapped += 1;
        off += stride;
    }
    let m = mm.page_table_memory();
    let touched_2m = (len.div_ceil(LEAF_SPAN)).min(mapped) as f64;
    let leaf_bytes = m.leaf_bytes;
    let budget = 1.1 * 8.0 * mapped as f64 + 4096.0 * touched_2m;
    let f = Figures {
        mapped,
        leaves: m.leaves,
        dirs: m.dirs,
        bytes: m.bytes,
        leaf_bytes,
        budget,
    };
    eprintln!(
        "len {len:#x} stride {stride:#x}: mapped {} pages, {} leaves, {} dirs, {} B total, {} B in leaves, budget {:.0} B (+ dirs)",
        f.mapped, f.leaves, f.dirs, f.bytes, f.leaf_bytes, f.budget
    );
    f
}

#[test]
fn page_table_memory_dense_is_within_budget_including_directories() {
    let f = measure(64 << 20, PAGE);
    assert_eq!(f.leaves, 32);
    assert!((f.bytes as f64) <= f.budget, "{} > {}", f.bytes, f.budget);
}

#[test]
fn page_table_memory_one_page_per_2mib_leaves_within_budget() {
    let f = measure(64 << 20, LEAF_SPAN);
    assert_eq!(f.leaves, 32);
    assert!(
        (f.leaf_bytes as f64) <= f.budget,
        "{} > {}",
        f.leaf_bytes,
        f.budget
    );
    // Directories: PGD, one PUD, one PMD for a 64 MiB region.
    assert_eq!(f.dirs, 3);
}

#[test]
fn page_table_memory_sparse_gib_skips_empty_subtrees() {
    let f = measure(1 << 30, 64 << 20);
    assert_eq!((f.mapped, f.leaves), (16, 16));
    assert!((f.leaf_bytes as f64) <= f.budget);
    assert!(f.dirs <= 4);
}
