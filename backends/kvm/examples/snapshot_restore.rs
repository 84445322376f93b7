//! A VMM restoring a guest from a snapshot file lazily, the way
//! Firecracker's userfaultfd handler does, over guest RAM it owns.
//!
//! `cargo run --release -p notifier-kvm --example snapshot_restore -- [MiB] [anon|memfd] [rounds]`
//! (defaults: 256 MiB, anon, 3 rounds)
//!
//! Each round:
//! 1. **ours**: guest RAM registered `MISSING` (`MISSING | MINOR` for a
//!    memfd) on a monitor whose handler is a `SnapshotRestore`; a real vCPU
//!    starts at once (time to its first instruction's result, the program
//!    page and the page it reads being faulted in from the snapshot), a
//!    device view reads, then the rest of RAM is faulted in
//!    (`MADV_POPULATE_WRITE` from a VMM thread: every page a missing fault
//!    served by `UFFDIO_COPY`): pages/s. Then checks: every page served
//!    exactly once; a page the balloon removed reads zeros (guest and
//!    device), never the snapshot.
//! 2. **plain**: the same RAM size and file, a plain handler (a closure
//!    doing `pread` + `UFFDIO_COPY`) on the same monitor machinery: pages/s.
//!
//! A dead handler (unreadable snapshot) is shown by
//! `tests/kvm_real_snapshot_restore.rs` (the vCPU thread gets SIGBUS for
//! the poisoned page, or `KVM_RUN` fails: never a hang).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;
use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{
    restore_mode, GuestRam, RamBacking, RamPages, RealGuestMemory, SnapshotRestore,
};
use notifier_uffd::{FaultError, Fill, PageBuf, PageFault, UffdMonitor};
use vm_memory::{Bytes, GuestAddress};

const P: u64 = 4096;

fn tag(i: u64) -> u32 {
    0x5000_0000 | i as u32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map_or(Ok(256), |s| s.parse())?;
    let backing = match args.get(2).map(String::as_str) {
        Some("memfd") => RamBacking::Memfd,
        _ => RamBacking::Anon,
    };
    let rounds: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let len = mib << 20;
    let pages = len / P;

    let path = std::env::temp_dir().join(format!("snapshot-restore-{}.snap", std::process::id()));
    {
        let mut f = File::create(&path)?;
        let mut chunk = vec![0u8; 1 << 20];
        for c in 0..mib {
            for p in 0..256u64 {
                let i = c * 256 + p;
                chunk[(p * P) as usize..(p * P) as usize + 4]
                    .copy_from_slice(&tag(i).to_le_bytes());
            }
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
    }
    println!("snapshot: {mib} MiB ({pages} pages), {backing:?} guest RAM, {rounds} rounds");
    let kvm = Kvm::new()?;
    let mut ours_rates = Vec::new();
    let mut plain_rates = Vec::new();
    for round in 0..rounds {
        let (first, rate) = ours(&kvm, &path, len, backing)?;
        let plain = plain(&path, len, backing)?;
        println!(
            "round {round}: ours: first instruction after {:.1} us, {:.0} pages/s; plain handler: {:.0} pages/s; ratio {:.3}",
            first * 1e6,
            rate,
            plain,
            rate / plain
        );
        ours_rates.push(rate);
        plain_rates.push(plain);
    }
    ours_rates.sort_by(f64::total_cmp);
    plain_rates.sort_by(f64::total_cmp);
    let (o, p) = (ours_rates[rounds / 2], plain_rates[rounds / 2]);
    println!(
        "median: ours {o:.0} pages/s, plain {p:.0} pages/s, ratio {:.3} (goal >= 0.9)",
        o / p
    );
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Restore through `RealGuestMemory` + `SnapshotRestore`; returns (seconds
/// to the vCPU's first result, pages/s for the rest).
fn ours(
    kvm: &Kvm,
    path: &std::path::Path,
    len: u64,
    backing: RamBacking,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let pages = len / P;
    let r = SnapshotRestore::new(File::open(path)?, pages);
    let monitor = UffdMonitor::builder().build(r.clone())?;
    let _thread = monitor.spawn()?;
    let _watch = monitor.notifiers().register(r.balloon_watch())?;
    let vm = Arc::new(kvm.create_vm()?);
    let mem = RealGuestMemory::new(vm, monitor, kvm.get_nr_memslots() as u32)?;
    let ram = GuestRam::new(len, backing, RamPages::Small)?;
    r.set_base(ram.addr());

    let t0 = Instant::now();
    let ram = mem.add_region(0, ram, Some(restore_mode(backing)))?;
    let mut guest = RealModeGuest::new(&mem, 0)?;
    let v = guest.read_u32(&mem, 0x8000)?;
    let first = t0.elapsed().as_secs_f64();
    assert_eq!(v, tag(8), "the guest reads the snapshot");
    let view = mem.memory();
    assert_eq!(
        view.read_obj::<u32>(GuestAddress(0x9000))?,
        tag(9),
        "the device reads it"
    );

    let before = r.stats().served;
    let t1 = Instant::now();
    ram.populate(0, len)?;
    let dt = t1.elapsed().as_secs_f64();
    let st = r.stats();
    let rate = (st.served - before) as f64 / dt;
    assert_eq!(st.served, pages, "every page served exactly once: {st:?}");
    assert_eq!(st.refaults + st.failed, 0, "{st:?}");
    let last = pages - 1;
    assert_eq!(view.read_obj::<u32>(GuestAddress(last * P))?, tag(last));

    // Balloon out 64 KiB the guest had restored; it reads zeros after.
    mem.balloon_inflate(0x10_000, 16 * P)?;
    assert_eq!(
        guest.read_u32(&mem, 0x10_000)?,
        0,
        "removed: zeros, never the snapshot"
    );
    assert_eq!(view.read_obj::<u32>(GuestAddress(0x1F_000))?, 0);
    assert_eq!(r.stats().served, pages, "nothing served again");
    drop(guest);
    drop(mem);
    Ok((first, rate))
}

/// A plain handler: `pread` the page and `UFFDIO_COPY` it.
fn plain(
    path: &std::path::Path,
    len: u64,
    backing: RamBacking,
) -> Result<f64, Box<dyn std::error::Error>> {
    let file = File::open(path)?;
    let served = Arc::new(AtomicU64::new(0));
    let s2 = served.clone();
    let handler = move |f: &PageFault, page: &mut PageBuf| -> Result<Fill, FaultError> {
        file.read_exact_at(page, f.pgoff * P)
            .map_err(|e| FaultError(e.to_string()))?;
        s2.fetch_add(1, Ordering::Relaxed);
        Ok(Fill::Bytes)
    };
    let monitor = UffdMonitor::builder().build(Arc::new(handler))?;
    let _thread = monitor.spawn()?;
    let ram = GuestRam::new(len, backing, RamPages::Small)?;
    let range = notifier_core::PageRange::new(ram.addr(), len)?;
    monitor.register_raw(range, restore_mode(backing))?;
    let t = Instant::now();
    ram.populate(0, len)?;
    let dt = t.elapsed().as_secs_f64();
    let n = served.load(Ordering::Relaxed);
    assert_eq!(n, len / P);
    monitor.unregister(range)?;
    Ok(n as f64 / dt)
}
