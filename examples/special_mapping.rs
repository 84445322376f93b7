//! A special mapping served by a fault callback (seed 002): each page is
//! produced on first touch, with the offset relative to the mapping; a
//! failing callback is a bus error. A subscriber prints what it sees when
//! the mapping is reclaimed and unmapped.

use std::sync::Arc;

use notifier_core::mm::{
    MmError, MmapRequest, Prot, SpecialFault, SpecialFaultError, SpecialMapping, SpecialSource,
};
use notifier_examples::{new_mm, PrintingSubscriber};

fn main() -> Result<(), MmError> {
    let mm = new_mm();
    let sub = PrintingSubscriber::new();
    let _reg = mm.notifiers().register(sub.clone()).expect("register");

    // Three backing frames, filled with a recognisable word each.
    let pages: Vec<_> = (0..3).map(|_| mm.alloc_page()).collect::<Result<_, _>>()?;
    for (i, p) in pages.iter().enumerate() {
        mm.frames().store(*p, 0, 0x1000 + i as u64).expect("store");
    }
    let backing = pages.clone();
    let sm = Arc::new(SpecialMapping {
        name: "[vvar]",
        source: SpecialSource::Fault(Box::new(move |f: &SpecialFault| {
            println!(
                "  fault callback: addr {:#x} pgoff {} write {}",
                f.addr, f.pgoff, f.write
            );
            backing
                .get(f.pgoff as usize)
                .copied()
                .ok_or(SpecialFaultError)
        })),
    });
    let a = mm.mmap(&MmapRequest::special(sm, 4 * 4096, Prot::READ))?;
    println!("special mapping at {a:#x}");
    for i in 0..3 {
        println!("page {i} reads {:#x}", mm.read_u64(a + i * 4096)?);
    }
    println!("page 3 (no backing): {:?}", mm.read_u64(a + 3 * 4096));
    println!("munmap:");
    mm.munmap(a, 4 * 4096)?;
    for p in pages {
        mm.put_page(p)?;
    }
    println!("the secondary saw {} callbacks", sub.seen().len());
    Ok(())
}
