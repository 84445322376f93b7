//! A VMM embedding the mirror over the real software primary
//! (`notifier_core::mm::Mm` on memfd frames): create the VM, map RAM, run
//! a guest, balloon a range out with `madvise(DONTNEED)`, hot-remap a
//! region (`remap_file_pages`, then `munmap` + `mmap` of another file
//! window), move a region, and print what the guest saw.
//!
//! Guest RAM is one ordinary mapping of the VMM's `Mm`: guest-physical
//! `gpa` is `Mm` address `GUEST_BASE + gpa`, as a real VMM `mmap`s its RAM
//! block and hands KVM the host addresses.
//!
//! Run: `cargo run --release -p notifier-kvm --example vmm`

use std::sync::Arc;

use kvm_ioctls::Kvm;
use notifier_core::frame::FrameStore;
use notifier_core::mm::{Advice, FileOptions, Mm, MmapRequest, Prot};
use notifier_core::PAGE_SIZE;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{DeviceView, KvmMirror, MemfdFrames};
use vm_memory::{Bytes, GuestAddress};

/// Where guest-physical 0 sits in the VMM's address space.
const GUEST_BASE: u64 = 0x10_0000_0000;
/// 1 MiB of guest RAM at gpa 0, as two regions (two memslots).
const RAM: u64 = 0x10_0000;
const HALF: u64 = RAM / 2;
const PAGE: u64 = PAGE_SIZE;

/// The VMM address of guest-physical `gpa`.
const fn va(gpa: u64) -> u64 {
    GUEST_BASE + gpa
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm unavailable: {e}");
            return Ok(());
        }
    };
    // The VMM's address space: an `Mm` whose frames are memfd pages. Guest
    // RAM is an anonymous private mapping of it; the mirror follows it into
    // a real VM through two memslots.
    let frames = Arc::new(MemfdFrames::new(0x1000, 1024)?);
    let mm = Mm::new(frames.clone() as Arc<dyn FrameStore>);
    mm.mmap(&MmapRequest::anon(RAM, Prot::RW).at(va(0)))?;
    let mirror = KvmMirror::new(
        Arc::new(kvm.create_vm()?),
        mm.clone(),
        frames.clone(),
        kvm.get_nr_memslots() as u32,
    )?;
    let low = mirror.add_region_at(0, va(0), HALF, 0)?;
    let high = mirror.add_region_at(HALF, va(HALF), HALF, 0)?;
    println!("RAM: {low:?}\n     {high:?}");
    let dev = DeviceView::new(&mirror)?;
    let mut guest = RealModeGuest::new(&mirror, 0)?;

    // A device (virtio, say) writes a buffer; the guest reads it, and the
    // VMM's own view (the `Mm`) agrees.
    dev.write_obj(0xc0ff_ee00u32, GuestAddress(0x2_0000))?;
    println!(
        "guest reads the device's buffer at 0x20000: {:#x} (VMM reads {:#x})",
        guest.read_u32(&mirror, 0x2_0000)?,
        mm.read_u64(va(0x2_0000))? as u32
    );
    guest.write_u32(&mirror, 0x2_0004, 0x600d_f00d)?;
    println!(
        "device reads the guest's write at 0x20004: {:#x}",
        dev.read_obj::<u32>(GuestAddress(0x2_0004))?
    );

    // Balloon 64 KiB out: madvise(DONTNEED) on the VMM's mapping frees the
    // frames, the mirror punches them from the host view (KVM follows),
    // and the guest finds zero pages when it touches them again.
    const BALLOON: u64 = 0x3_0000;
    for a in (BALLOON..BALLOON + 0x1_0000).step_by(PAGE as usize) {
        guest.write_u32(&mirror, a, 0xba11_0000 | (a as u32 >> 12))?;
    }
    let before = frames.allocated();
    let present = mirror.stats(0).map_or(0, |s| s.present);
    mm.madvise(va(BALLOON), 0x1_0000, Advice::DontNeed)?;
    println!(
        "ballooned 64 KiB out: {} frames freed, {} pages punched from the host view; \
         guest reads {:#x} at 0x30000 (was 0xba110030)",
        before - frames.allocated(),
        present - mirror.stats(0).map_or(0, |s| s.present),
        guest.read_u32(&mirror, BALLOON)?
    );

    // Hot-remap: a file (a disk image, a shared buffer) is mapped into
    // guest RAM at 0x90000; the VMM points the window at other file pages.
    const WIN: u64 = 0x9_0000;
    let file = mm.create_file(FileOptions::new(16));
    for i in 0..16u64 {
        file.write(i * PAGE, &(0xf11e_0000u32 + i as u32).to_le_bytes())?;
    }
    mm.mmap(
        &MmapRequest::file(file.clone(), 0, 4 * PAGE, Prot::RW)
            .shared()
            .at(va(WIN)),
    )?;
    println!(
        "file window at 0x90000: guest sees {:#x} (file page 0)",
        guest.read_u32(&mirror, WIN)?
    );
    mm.remap_file_pages(va(WIN), PAGE, 0, 7, 0)?;
    println!(
        "remap_file_pages to page 7: guest sees {:#x}, device sees {:#x}",
        guest.read_u32(&mirror, WIN)?,
        dev.read_obj::<u32>(GuestAddress(WIN))?
    );
    guest.write_u32(&mirror, WIN + 4, 0x7777_7777)?;
    let mut b = [0u8; 4];
    file.read(7 * PAGE + 4, &mut b)?;
    println!(
        "guest wrote 0x77777777 at 0x90004: file page 7 holds {:#x}",
        u32::from_le_bytes(b)
    );
    mm.munmap(va(WIN), 4 * PAGE)?;
    mm.mmap(
        &MmapRequest::file(file.clone(), 12, 4 * PAGE, Prot::RW)
            .shared()
            .at(va(WIN)),
    )?;
    println!(
        "munmap + mmap of file pages 12..16: guest sees {:#x} at 0x90000, {:#x} at 0x93000",
        guest.read_u32(&mirror, WIN)?,
        guest.read_u32(&mirror, WIN + 3 * PAGE)?
    );

    // Move the high region (a BAR relocation): same memory, new address.
    // The device view is a snapshot of the layout: rebuild it after a move.
    drop(dev);
    let moved = mirror.move_region(HALF, 0xc_0000)?;
    println!(
        "high region moved to {:#x} (slot {} in place): guest reads {:#x} at 0xd0000",
        moved.gpa,
        moved.slot,
        guest.read_u32(&mirror, 0xd_0000)?
    );
    let dev = DeviceView::new(&mirror)?;
    println!(
        "rebuilt device view reads {:#x} at 0xd0000",
        dev.read_obj::<u32>(GuestAddress(0xd_0000))?
    );
    println!("guest exits: {:?}", guest.exits());
    for r in mirror.regions() {
        println!("region {:#x}: {:?}", r.gpa, mirror.stats(r.gpa));
    }
    Ok(())
}
