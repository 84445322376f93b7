//! A VMM embedding the mirror: create the VM, map RAM, run a guest, balloon
//! a range out, hot-remap a region, and print what the guest saw.
//!
//! Run: `cargo run -p notifier-kvm --example vmm`

use std::sync::Arc;

use kvm_ioctls::Kvm;
use notifier_core::frame::FrameStore;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::testing::TestPrimary;
use notifier_kvm::{DeviceView, KvmMirror, MemfdFrames};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 0x10_0000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: /dev/kvm unavailable: {e}");
            return Ok(());
        }
    };
    // Guest memory: memfd frames behind a primary address space that is
    // the guest-physical space; the mirror follows it into a real VM.
    let frames = Arc::new(MemfdFrames::new(0x1000, 1024)?);
    let primary = TestPrimary::new(frames.clone());
    primary.mmap_anon(0, RAM);
    let mirror = KvmMirror::new(
        Arc::new(kvm.create_vm()?),
        primary.clone(),
        frames.clone(),
        kvm.get_nr_memslots() as u32,
    );
    let low = mirror.add_region(0, 0x8_0000)?;
    let high = mirror.add_region(0x8_0000, 0x8_0000)?;
    println!("RAM: {low:?}\n     {high:?}");
    let dev = DeviceView::new(&mirror)?;
    let mut guest = RealModeGuest::new(&mirror, 0)?;

    // A device (virtio, say) writes a buffer; the guest reads it.
    dev.write_obj(0xc0ff_ee00u32, GuestAddress(0x2_0000))?;
    println!(
        "guest reads the device's buffer at 0x20000: {:#x}",
        guest.read_u32(&mirror, 0x2_0000)?
    );
    guest.write_u32(&mirror, 0x2_0004, 0x600d_f00d)?;
    println!(
        "device reads the guest's write at 0x20004: {:#x}",
        dev.read_obj::<u32>(GuestAddress(0x2_0004))?
    );

    // Balloon 64 KiB out: the primary drops the pages, the mirror punches
    // them, and the guest finds zero pages when it touches them again.
    for a in (0x3_0000..0x4_0000).step_by(0x1000) {
        guest.write_u32(&mirror, a, 0xba11_0000 | (a as u32 >> 12))?;
    }
    let before = frames.allocated();
    primary.dontneed(0x3_0000, 0x1_0000);
    println!(
        "ballooned 64 KiB out: {} frames freed; guest reads {:#x} at 0x30000 (was 0xba110030)",
        before - frames.allocated(),
        guest.read_u32(&mirror, 0x3_0000)?
    );

    // Hot-remap: point a page at a different frame (a shared buffer,
    // another file page): the guest and the device both see the new frame.
    let shared = frames.alloc()?;
    frames.write(shared, 0, &0x5ba7_ed00u32.to_le_bytes())?;
    guest.read_u32(&mirror, 0x9_0000)?;
    primary.remap(0x9_0000, shared, true);
    println!(
        "hot-remapped 0x90000: guest sees {:#x}, device sees {:#x}",
        guest.read_u32(&mirror, 0x9_0000)?,
        dev.read_obj::<u32>(GuestAddress(0x9_0000))?
    );

    // Move the high region (a BAR relocation): same memory, new address.
    // The device view is a snapshot of the layout: rebuild it after a move.
    drop(dev);
    let moved = mirror.move_region(0x8_0000, 0xc_0000)?;
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
