//! A nonlinear `remap_file_pages` window (seed 004): a shared file mapping
//! whose pages are rearranged with file PTEs, the population bracketed by
//! an invalidation the subscriber prints.

use notifier_core::mm::{FileOptions, MmError, MmapRequest, Prot, Pte, VmFlags, MAP_NONBLOCK};
use notifier_examples::{new_mm, PrintingSubscriber};

fn main() -> Result<(), MmError> {
    let mm = new_mm();
    let sub = PrintingSubscriber::new();
    let _reg = mm.notifiers().register(sub.clone()).expect("register");

    let file = mm.create_file(FileOptions::new(8));
    for i in 0..8u64 {
        file.write(i * 4096, &(100 + i).to_le_bytes())?;
    }
    let a = mm.mmap(&MmapRequest::file(file, 0, 4 * 4096, Prot::RW).shared())?;
    println!("window at {a:#x}, linear: page 0 reads {}", mm.read_u64(a)?);

    println!("remap_file_pages(window page 0..2 -> file pages 6..8, MAP_NONBLOCK):");
    mm.remap_file_pages(a, 2 * 4096, 0, 6, MAP_NONBLOCK)?;
    assert!(mm
        .vma_at(a)
        .is_some_and(|v| v.flags.contains(VmFlags::NONLINEAR)));
    for i in 0..2 {
        match mm.pte(a + i * 4096) {
            Pte::File { pgoff } => println!("  page {i}: file PTE -> pgoff {pgoff}"),
            other => println!("  page {i}: {other:?}"),
        }
    }
    for i in 0..4 {
        println!("page {i} reads {}", mm.read_u64(a + i * 4096)?);
    }
    println!(
        "once nonlinear there is no linear shortcut: mapping page 2 to pgoff 2 repopulates it:"
    );
    mm.remap_file_pages(a + 2 * 4096, 4096, 0, 2, 0)?;
    println!("exit:");
    mm.exit();
    println!("the secondary saw {} callbacks", sub.seen().len());
    Ok(())
}
