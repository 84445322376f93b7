//! A device region: a PFNMAP laid out by `remap_pfn_range` and a MIXEDMAP
//! filled with `insert_pfn` (device memory) and `insert_page` (ordinary
//! frames), showing `vm_normal_page`'s answers (seed 001), copy-on-write of
//! device memory, and the invalidations a subscriber sees.

use notifier_core::frame::Pfn;
use notifier_core::mm::{Backing, MmError, MmapRequest, Prot};
use notifier_examples::{new_mm, PrintingSubscriber, IO_BASE};

fn main() -> Result<(), MmError> {
    let mm = new_mm();
    let sub = PrintingSubscriber::new();
    let _reg = mm.notifiers().register(sub.clone()).expect("register");

    // A shared PFNMAP over device pages IO_BASE..IO_BASE+2.
    let bar = mm.mmap(&MmapRequest::pfnmap(IO_BASE, 2 * 4096, Prot::RW).shared())?;
    mm.write_u64(bar, 0xd0d0)?;
    let d = mm.vm_normal_page(bar)?.expect("present");
    println!(
        "PFNMAP page 0: pfn {:#x}, vm_normal_page -> {:?} ({:?})",
        mm.pte(bar).present().unwrap().pfn.0,
        d.page,
        d.row
    );

    // A private mapping of the same device page: copy-on-write.
    let cow = mm.mmap(&MmapRequest::pfnmap(IO_BASE, 4096, Prot::RW))?;
    println!(
        "private view reads {:#x}; writing breaks COW:",
        mm.read_u64(cow)?
    );
    mm.write_u64(cow + 8, 1)?;
    let d = mm.vm_normal_page(cow)?.expect("present");
    println!(
        "  now a normal page: {:?} ({:?}); device page word 1 = {}",
        d.page,
        d.row,
        mm.read_u64(bar + 8)?
    );

    // A MIXEDMAP: one device page, one ordinary frame.
    let mix = mm.mmap(&MmapRequest::new(2 * 4096, Prot::RW, Backing::MixedMap).shared())?;
    mm.insert_pfn(mix, Pfn(IO_BASE + 1))?;
    let frame = mm.alloc_page()?;
    mm.insert_page(mix + 4096, frame)?;
    for i in 0..2 {
        let d = mm.vm_normal_page(mix + i * 4096)?.expect("present");
        println!(
            "MIXEDMAP page {i}: vm_normal_page -> {:?} ({:?})",
            d.page, d.row
        );
    }
    println!(
        "refcount of the inserted frame: {:?}",
        mm.page_info(frame).map(|i| i.refcount)
    );
    println!(
        "insert_pfn of a valid frame is refused: {:?}",
        mm.insert_pfn(mix, frame)
    );

    println!("munmap everything:");
    mm.munmap(bar, 2 * 4096)?;
    mm.munmap(cow, 4096)?;
    mm.munmap(mix, 2 * 4096)?;
    mm.put_page(frame)?;
    println!("the secondary saw {} callbacks", sub.seen().len());
    Ok(())
}
