//! The device-emulation view (vm-memory traits) stays coherent with the
//! primary and with what the guest sees.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use common::setup;
use notifier_core::frame::FrameStore;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::DeviceView;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    Permissions,
};

#[test]
fn vmm_and_guest_see_the_same_current_frame() {
    let Some((_kvm, primary, mirror)) = setup("vmm_and_guest_see_the_same_current_frame", 512)
    else {
        return;
    };
    primary.mmap_anon(0, 0x40000);
    mirror.add_region(0, 0x20000).unwrap();
    mirror.add_region(0x20000, 0x20000).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    assert_eq!(dev.regions().num_regions(), 2);

    // A VMM write (virtio filling a buffer) is what the guest and the primary read.
    dev.write_obj(0x1234_5678u32, GuestAddress(0x9000)).unwrap();
    assert_eq!(primary.read_u32(0x9000), 0x1234_5678);
    let mut g = RealModeGuest::new(&mirror, 0).unwrap();
    assert_eq!(g.read_u32(&mirror, 0x9000).unwrap(), 0x1234_5678);

    // A guest write is what the VMM reads.
    g.write_u32(&mirror, 0x9004, 0x0bad_cafe).unwrap();
    assert_eq!(
        dev.read_obj::<u32>(GuestAddress(0x9004)).unwrap(),
        0x0bad_cafe
    );

    // After a remap the cached translation is gone: the VMM reads the new frame.
    let f = primary.memfd().alloc().unwrap();
    primary
        .memfd()
        .write(f, 0, &0x7777_7777u32.to_le_bytes())
        .unwrap();
    primary.remap(0x9000, f, true);
    assert_eq!(
        dev.read_obj::<u32>(GuestAddress(0x9000)).unwrap(),
        0x7777_7777
    );
    let (_, _, invs) = dev
        .regions()
        .find_region(GuestAddress(0x9000))
        .unwrap()
        .cache_stats();
    assert!(invs >= 1);

    // Accesses across pages and across regions, with different frames.
    let data: Vec<u8> = (0..64u8).collect();
    dev.write_slice(&data, GuestAddress(0x1ffe0)).unwrap();
    let mut back = [0u8; 64];
    dev.read_slice(&mut back, GuestAddress(0x1ffe0)).unwrap();
    assert_eq!(&back[..], &data[..]);
    assert_eq!(
        g.read_u32(&mirror, 0x20000).unwrap(),
        u32::from_le_bytes([32, 33, 34, 35])
    );
    primary.migrate(0x20000);
    dev.read_slice(&mut back, GuestAddress(0x1ffe0)).unwrap();
    assert_eq!(&back[..], &data[..], "migration keeps the bytes");

    // Region-relative Bytes and atomics.
    let r = dev.regions().find_region(GuestAddress(0x20000)).unwrap();
    assert_eq!(r.start_addr(), GuestAddress(0x20000));
    r.write_slice(b"region", MemoryRegionAddress(0x100))
        .unwrap();
    let mut b = [0u8; 6];
    dev.read_slice(&mut b, GuestAddress(0x20100)).unwrap();
    assert_eq!(&b, b"region");
    dev.store(0x55u64, GuestAddress(0x20108), Ordering::SeqCst)
        .unwrap();
    assert_eq!(
        r.load::<u64>(MemoryRegionAddress(0x108), Ordering::SeqCst)
            .unwrap(),
        0x55
    );

    // Out of every region: typed errors, nothing touched.
    assert!(dev.read_obj::<u32>(GuestAddress(0x40000)).is_err());
    assert!(!dev.check_range(GuestAddress(0x3fff0), 0x20, Permissions::Read));
    assert!(dev.check_range(GuestAddress(0x1fff0), 0x20, Permissions::Read));
    // An unmapped primary range is an invalid guest address.
    primary.munmap(0x30000, 0x1000);
    assert!(matches!(
        dev.read_obj::<u32>(GuestAddress(0x30000)),
        Err(vm_memory::GuestMemoryError::InvalidGuestAddress(_))
    ));
}

#[test]
fn device_reads_never_see_a_freed_frame_under_concurrent_remaps() {
    let Some((_kvm, primary, mirror)) = setup(
        "device_reads_never_see_a_freed_frame_under_concurrent_remaps",
        512,
    ) else {
        return;
    };
    primary.mmap_anon(0, 0x10000);
    mirror.add_region(0, 0x10000).unwrap();
    let dev = DeviceView::new(&mirror).unwrap();
    let region = dev.region(0).unwrap();
    let frames = primary.memfd().clone();
    let first = frames.alloc().unwrap();
    frames.write(first, 0, &1u32.to_le_bytes()).unwrap();
    primary.remap(0x4000, first, true);
    let current = AtomicU32::new(1);
    let done = AtomicBool::new(false);
    const POISON: u32 = 0xdead_dead;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut old = first;
            for v in 2..3000u32 {
                let f = frames.alloc().unwrap();
                frames.write(f, 0, &v.to_le_bytes()).unwrap();
                primary.remap(0x4000, f, true);
                current.store(v, Ordering::SeqCst);
                frames.write(old, 0, &POISON.to_le_bytes()).unwrap();
                frames.free(old);
                old = f;
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut reads = 0u64;
        while !done.load(Ordering::SeqCst) {
            let floor = current.load(Ordering::SeqCst);
            // Alternate the locked (GuestMemory) and optimistic (region) paths.
            let v: u32 = if reads % 2 == 0 {
                dev.read_obj(GuestAddress(0x4000)).unwrap()
            } else {
                region.read_obj(MemoryRegionAddress(0x4000)).unwrap()
            };
            assert_ne!(v, POISON, "device read a freed frame");
            assert!(v >= floor, "device read {v}, older than {floor}");
            reads += 1;
        }
        assert!(reads > 0);
    });
}
