//! RDMA buffers in real process memory: an application registers buffers
//! through the registration cache, moves data with the software NIC, frees
//! the buffers and allocates new ones at the very same addresses, and
//! shows that the registry never serves a stale registration.
//!
//! The memory is the process's own, watched through userfaultfd: `munmap`
//! and `mmap(MAP_FIXED)` raise the kernel's UNMAP event, which the monitor
//! turns into the invalidation that kills the registrations over it; an
//! `madvise(DONTNEED)`, announced to the monitor, drops the NIC's
//! translations but keeps the (on-demand) registration, whose DMA then sees
//! the new, zeroed pages.
//!
//! `cargo run --release -p notifier-examples --example rdma_buffers_uffd`
//!
//! Without userfaultfd (no `/dev/userfaultfd` access and no
//! `userfaultfd(2)`), it says so and exits successfully, unless
//! `NOTIFIER_REQUIRE_UFFD=1`.

use std::error::Error;
use std::sync::Arc;

use notifier_rdma::{Access, DmaError, MrHandle, Registry, RegistryConfig, SoftNic};
use notifier_uffd::{Advice, Region, RegisterMode, UffdMonitor, UffdPrimary, ZeroHandler};

type Res<T = ()> = Result<T, Box<dyn Error>>;

const PAGE: u64 = 4096;
const BUFS: u64 = 4;
const BUF: u64 = 16 * PAGE;
/// Buffers lie one buffer apart, so their registrations never merge.
const STRIDE: u64 = 2 * BUF;

/// An error unless `ok`: the registry served something stale.
fn ensure(ok: bool, what: impl FnOnce() -> String) -> Res {
    if ok {
        Ok(())
    } else {
        Err(format!("STALE: {}", what()).into())
    }
}

fn main() -> Res {
    let m = match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
        Ok(m) => m,
        Err(e) if notifier_uffd::uffd_required() => return Err(e.into()),
        Err(e) => {
            println!("userfaultfd is unavailable here ({e}); nothing to show.");
            println!("(run as root, or allow unprivileged userfaultfd, to see the example)");
            return Ok(());
        }
    };
    // Created before the memory, so it outlives it: the unmaps at exit are
    // still read.
    let thread = m.spawn()?;
    let region = Region::anon(BUFS * STRIDE)?;
    m.register(&region, RegisterMode::MISSING)?;
    let prim = Arc::new(UffdPrimary::new(&m)?);
    let nic = SoftNic::new(prim.clone());
    let mut reg = Registry::new(
        &*prim,
        nic.clone(),
        RegistryConfig {
            max_regions: 64,
            ..Default::default()
        },
    );
    println!(
        "userfaultfd via {:?}; {BUFS} buffers of {} KiB at {:#x}",
        m.open_path(),
        BUF / 1024,
        region.addr()
    );
    let access = Access::LOCAL_RW | Access::REMOTE_READ | Access::REMOTE_WRITE;
    let off = |i: u64| i * STRIDE;
    let addr = |i: u64| region.addr() + off(i);

    // Register the buffers (misses), then use them again (hits).
    let mut old: Vec<MrHandle> = Vec::new();
    for round in 0..2 {
        for i in 0..BUFS {
            let h = reg.get(addr(i), BUF, access)?;
            let msg = format!("buffer {i} round {round}");
            // A remote peer writes into the buffer ...
            nic.remote_write(h.rkey(), addr(i) + 64, msg.as_bytes())?;
            // ... the CPU sees it in the process's memory ...
            let mut cpu = vec![0u8; msg.len()];
            region.read(off(i) + 64, &mut cpu)?;
            ensure(cpu == msg.as_bytes(), || format!("CPU read {cpu:?}"))?;
            // ... and a local DMA reads it back.
            let mut back = vec![0u8; msg.len()];
            nic.local_read(h.lkey(), addr(i) + 64, &mut back)?;
            ensure(back == msg.as_bytes(), || format!("DMA read {back:?}"))?;
            if round == 1 {
                old.push(h);
            }
            reg.put(h)?;
        }
    }
    println!("registered and reused: {:?}", reg.stats());

    // Free the buffers and allocate new memory at the same addresses: two
    // with munmap + mmap, two with mmap(MAP_FIXED) straight over them.
    for i in 0..BUFS {
        let how = if i < 2 {
            region.munmap(off(i), BUF)?;
            "munmap + mmap"
        } else {
            region.map_fixed_over(off(i), BUF)?;
            "mmap(MAP_FIXED) over"
        };
        // No waiting: the monitor's event gate orders everything after the
        // unmap returned (the watch below, the registry's next get).
        if i < 2 {
            region.map_fixed_over(off(i), BUF)?;
        }
        m.watch(addr(i), BUF, RegisterMode::MISSING)?;
        region.write(off(i) + 1024, format!("fresh {i}").as_bytes())?;
        println!(
            "buffer {i} at {:#x}: freed and reallocated ({how})",
            addr(i)
        );
    }
    let before = reg.stats();
    for (i, o) in (0..BUFS).zip(&old) {
        // The old rkey is dead: a late remote write cannot land anywhere.
        match nic.remote_write(o.rkey(), addr(i) + 64, b"late write") {
            Err(DmaError::UnknownKey(_) | DmaError::Invalidated(_)) => {}
            other => ensure(false, || {
                format!("old rkey {:#x} was served: {other:?}", o.rkey())
            })?,
        }
        // A get registers anew, and its DMA sees the new memory only.
        let h = reg.get(addr(i), BUF, access)?;
        ensure(h.rkey() != o.rkey() && h.lkey() != o.lkey(), || {
            format!("buffer {i}: the old registration was served again")
        })?;
        let mut b = [0xffu8; 17];
        nic.remote_read(h.rkey(), addr(i) + 64, &mut b)?;
        ensure(b == [0u8; 17], || {
            format!("buffer {i} shows old data {b:?}")
        })?;
        let fresh = format!("fresh {i}");
        let mut f = vec![0u8; fresh.len()];
        nic.remote_read(h.rkey(), addr(i) + 1024, &mut f)?;
        ensure(f == fresh.as_bytes(), || format!("buffer {i} reads {f:?}"))?;
        println!(
            "buffer {i}: old rkey {:#x} rejected, new rkey {:#x} sees the new memory",
            o.rkey(),
            h.rkey()
        );
        reg.put(h)?;
    }
    let s = reg.stats();
    ensure(
        s.invalidations == before.invalidations && s.misses == before.misses + BUFS,
        || format!("expected {BUFS} fresh registrations: {s:?}"),
    )?;
    ensure(s.invalidations == BUFS, || format!("invalidations {s:?}"))?;
    println!("after free + reallocate: {s:?}");

    // Zap buffer 0 with an announced madvise: the registration stays (the
    // NIC maps on demand), its translations go, and DMA sees zero pages.
    let h = reg.get(addr(0), BUF, access)?;
    nic.remote_write(h.rkey(), addr(0) + 8 * PAGE, b"before the zap")?;
    let faults = nic.stats().faults;
    m.madvise(&region, off(0), BUF, Advice::DontNeed)?;
    let mut b = [0xffu8; 14];
    nic.remote_read(h.rkey(), addr(0) + 8 * PAGE, &mut b)?;
    ensure(b == [0u8; 14], || format!("zapped buffer shows {b:?}"))?;
    println!(
        "buffer 0 zapped by madvise(DONTNEED): same rkey {:#x}, reads zeroes ({} NIC faults since)",
        h.rkey(),
        nic.stats().faults - faults
    );
    reg.put(h)?;

    reg.invalidate(region.addr(), region.len())?;
    let s = reg.stats();
    ensure(s.registrations == s.deregistrations, || format!("{s:?}"))?;
    let n = nic.stats();
    println!(
        "no stale registration served: {} registrations, all deregistered; {} NIC faults, {} page accesses; monitor saw {} unmaps, {} removes",
        s.registrations,
        n.faults,
        n.page_accesses,
        m.stats().unmaps,
        m.stats().removes
    );
    if let Some(e) = m.last_error() {
        return Err(format!("the monitor reported: {e}").into());
    }
    drop((reg, nic, prim, region));
    thread.stop();
    Ok(())
}
