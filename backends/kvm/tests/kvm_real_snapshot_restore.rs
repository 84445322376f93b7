//! Real memory: lazy restore from a snapshot file through userfaultfd
//! (MISSING + UFFDIO_COPY; MINOR + UFFDIO_CONTINUE for a memfd) while a
//! real vCPU runs and a device view reads. Each page is served once; a
//! page the balloon removed reads zeros, never the snapshot; a snapshot
//! that cannot be read gives the vCPU an error, not a hang.

mod common;

use std::fs::File;
use std::io::Write;
use std::time::Duration;

use notifier_kvm::guest::RealModeGuest;
use notifier_kvm::{restore_mode, GuestRam, RamBacking, RamPages, SnapshotRestore};

const P: u64 = 4096;
const LEN: u64 = 1 << 20;
const PAGES: u64 = LEN / P;

fn tag(i: u64) -> u32 {
    0xA000_0000 | i as u32
}

/// A snapshot whose page `i` starts with `tag(i)`.
fn snapshot(name: &str) -> (std::path::PathBuf, File) {
    let path = std::env::temp_dir().join(format!("{name}-{}.snap", std::process::id()));
    let mut f = File::create(&path).unwrap();
    let mut page = vec![0u8; P as usize];
    for i in 0..PAGES {
        page[..4].copy_from_slice(&tag(i).to_le_bytes());
        f.write_all(&page).unwrap();
    }
    f.sync_all().unwrap();
    (path.clone(), File::open(&path).unwrap())
}

fn restore(test: &str, backing: RamBacking) {
    let (path, file) = snapshot(test);
    let r = SnapshotRestore::new(file, PAGES);
    let Some(w) = common::real_setup(test, r.clone()) else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    let _watch = w
        .mem
        .monitor()
        .notifiers()
        .register(r.balloon_watch())
        .unwrap();
    let ram = GuestRam::new(LEN, backing, RamPages::Small).unwrap();
    r.set_base(ram.addr());
    let ram = w
        .mem
        .add_region(0, ram, Some(restore_mode(backing)))
        .unwrap();
    // Loading the program faults page 1 in from the snapshot.
    let mut guest = RealModeGuest::new(&w.mem, 0).unwrap();
    assert!(r.is_served(1));
    let view = w.mem.memory();

    // The vCPU's access faults page 5 in (through KVM), once.
    assert_eq!(guest.read_u32(&w.mem, 5 * P).unwrap(), tag(5));
    let served = r.stats().served;
    assert_eq!(guest.read_u32(&w.mem, 5 * P).unwrap(), tag(5));
    assert_eq!(common::view_u32(&view, 5 * P).unwrap(), tag(5));
    assert_eq!(r.stats().served, served, "page 5 served once");

    // A device read restores page 6; the guest sees the same bytes.
    assert_eq!(common::view_u32(&view, 6 * P).unwrap(), tag(6));
    assert_eq!(guest.read_u32(&w.mem, 6 * P).unwrap(), tag(6));
    assert_eq!(r.stats().served, served + 1);

    // The guest writes a restored page; the write stays.
    guest.write_u32(&w.mem, 6 * P + 8, 0xDEAD_0006).unwrap();
    assert_eq!(common::view_u32(&view, 6 * P + 8).unwrap(), 0xDEAD_0006);

    // Balloon: page 5 (served) and page 7 (never served) read zeros after,
    // never the snapshot.
    w.mem.balloon_inflate(5 * P, P).unwrap();
    w.mem.balloon_inflate(7 * P, P).unwrap();
    assert!(r.is_removed(5) && r.is_removed(7));
    assert_eq!(guest.read_u32(&w.mem, 5 * P).unwrap(), 0, "removed page 5");
    assert_eq!(guest.read_u32(&w.mem, 7 * P).unwrap(), 0, "removed page 7");
    assert_eq!(common::view_u32(&view, 7 * P).unwrap(), 0);
    assert!(!r.is_served(7));
    assert!(r.stats().zero_after_remove >= 2, "{:?}", r.stats());

    // Pages fault in while a device thread reads other pages concurrently.
    std::thread::scope(|s| {
        let v = view.clone();
        let dev = s.spawn(move || {
            for i in 64..128 {
                assert_eq!(common::view_u32(&v, i * P).unwrap(), tag(i));
            }
        });
        for i in 128..192 {
            assert_eq!(guest.read_u32(&w.mem, i * P).unwrap(), tag(i));
        }
        dev.join().unwrap();
    });
    let st = r.stats();
    assert_eq!(st.refaults, 0, "no page served twice: {st:?}");
    assert_eq!(st.failed, 0);
    for i in (64..192).chain([1, 5, 6]) {
        assert!(r.is_served(i), "page {i}");
    }

    if backing == RamBacking::Memfd {
        // Zap only this mapping's PTE of a restored page: it stays in the
        // page cache, so the next touch is a MINOR fault answered with
        // UFFDIO_CONTINUE, bytes kept, not served again.
        let served = r.stats().served;
        ram.drop_mappings(6 * P, P).unwrap();
        assert_eq!(guest.read_u32(&w.mem, 6 * P + 8).unwrap(), 0xDEAD_0006);
        assert!(r.stats().continued >= 1, "{:?}", r.stats());
        assert_eq!(r.stats().served, served);
    }
    drop(guest);
    drop(w);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn real_snapshot_restore_anon() {
    restore("real_snapshot_restore_anon", RamBacking::Anon);
}

#[test]
fn real_snapshot_restore_memfd() {
    restore("real_snapshot_restore_memfd", RamBacking::Memfd);
}

/// The snapshot becomes unreadable (truncated) mid-restore: the fault
/// fails, the monitor poisons the page, and the vCPU gets an error from
/// `KVM_RUN` or KVM's SIGBUS for a poisoned page (`BUS_MCEERR_AR`), never a
/// hang. Runs in a child process (a SIGBUS ends it), bounded by a watchdog
/// thread that exits with 3.
#[test]
fn real_restore_dead_source_fails_the_vcpu_not_hangs() {
    let test = "real_restore_dead_source";
    if common::kvm_or_skip(test).is_none() {
        return;
    }
    let (path, file) = snapshot(test);
    let p2 = path.clone();
    let exit = notifier_uffd::run_in_child(move || {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(30));
            std::process::exit(3);
        });
        let r = SnapshotRestore::new(file, PAGES);
        let Some(w) = common::real_setup(test, r.clone()) else {
            return 4;
        };
        let ram = GuestRam::anon(LEN).unwrap();
        w.mem
            .add_region(0, ram, Some(restore_mode(RamBacking::Anon)))
            .unwrap();
        let mut guest = RealModeGuest::new(&w.mem, 0).unwrap();
        if guest.read_u32(&w.mem, 2 * P).ok() != Some(tag(2)) {
            return 5;
        }
        // The source dies: everything past page 4 is gone.
        if std::fs::OpenOptions::new()
            .write(true)
            .open(&p2)
            .and_then(|f| f.set_len(4 * P))
            .is_err()
        {
            return 6;
        }
        let res = guest.read_u32(&w.mem, 200 * P);
        eprintln!("vCPU on an unservable page: {res:?} ({:?})", r.stats());
        match res {
            Err(_) if r.stats().failed >= 1 => 0,
            Err(_) => 7,
            Ok(_) => 1,
        }
    })
    .unwrap();
    let _ = std::fs::remove_file(&path);
    match exit {
        notifier_uffd::ChildExit::Exited(0) => {}
        notifier_uffd::ChildExit::Signaled(s) if s == libc_sigbus() => {
            eprintln!("vCPU thread got SIGBUS on the poisoned page");
        }
        notifier_uffd::ChildExit::Exited(3) => panic!("vCPU hung on an unservable page"),
        other => panic!("unexpected child exit: {other:?}"),
    }
}

/// SIGBUS on Linux x86_64.
fn libc_sigbus() -> i32 {
    7
}
