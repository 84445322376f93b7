//! The registry over real process memory watched through userfaultfd: the
//! software NIC's DMA reaches the process's own pages (`UffdPrimary`, whose
//! "frames" are the virtual pages), and the kernel's UNMAP and REMOVE
//! events become the invalidations that kill or flush registrations.
//!
//! # What the uffd backend turns into what
//!
//! - `munmap`, and `mmap(MAP_FIXED)` over a registered range, raise
//!   `UFFD_EVENT_UNMAP` **after** the pages are gone; the monitor turns it
//!   into an `Event::Unmap` invalidation, which kills every cached region
//!   overlapping it (its keys are rejected from then on), and cuts the
//!   monitor's registration of the range only once every subscriber ran.
//!   So a test waits until `registration(addr)` is `None`, then maps new
//!   memory there and registers it again. The crate's hazard holds: no DMA
//!   may touch a range while the application unmaps it (it would fault on
//!   an unmapped page), so the concurrent test keeps DMA off a buffer while
//!   it is freed, with a per-buffer lock, but lets DMA threads keep and
//!   reuse their keys across frees: the registry, not the lock, must reject
//!   them.
//! - `madvise(DONTNEED)` raises `UFFD_EVENT_REMOVE`; announced through
//!   `UffdMonitor::madvise` it is an `Event::Clear` bracket on the calling
//!   thread. The software NIC registers on demand (ODP), so a clear does not
//!   kill a region: its translations are dropped and the NIC faults the
//!   new (zeroed) pages in. The registration stays the same (the virtual
//!   range is still mapped), and DMA through it sees the new contents,
//!   never the old: what these tests check for the madvise path.
//!
//! Every test skips with a visible `SKIP:` line when userfaultfd is
//! unavailable, and fails instead under `NOTIFIER_REQUIRE_UFFD=1`.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notifier_rdma::soft::{DmaAccess, DmaObserver};
use notifier_rdma::{Access, DmaError, MrHandle, RegError, Registry, RegistryConfig, SoftNic};
use notifier_uffd::{
    Advice, HandlerThread, Region, RegisterMode, UffdMonitor, UffdPrimary, ZeroHandler,
};
use parking_lot::{Mutex, RwLock};

const P: u64 = 4096;
const RW: Access = Access::ALL;

/// A monitor, or a visible SKIP (a failure under `NOTIFIER_REQUIRE_UFFD=1`).
fn monitor() -> Option<UffdMonitor> {
    match UffdMonitor::builder().build(Arc::new(ZeroHandler)) {
        Ok(m) => Some(m),
        Err(e) if notifier_uffd::uffd_required() => {
            panic!("userfaultfd required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIP: userfaultfd unavailable: {e}");
            None
        }
    }
}

/// Wait (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Counts the NIC's frame accesses, and those that reach a page the monitor
/// does not (or no longer) watch: memory outside every live mapping.
#[derive(Default)]
struct Outside {
    checked: AtomicU64,
    violations: AtomicU64,
}

/// A software NIC over `prim` whose every frame access is checked against
/// the monitor's registered ranges at the moment of access.
fn nic(m: &UffdMonitor, prim: &Arc<UffdPrimary>) -> (SoftNic, Arc<Outside>) {
    let out = Arc::new(Outside::default());
    let observer: DmaObserver = {
        let (m, out) = (m.clone(), out.clone());
        Arc::new(move |a: &DmaAccess| {
            out.checked.fetch_add(1, Ordering::Relaxed);
            if m.registration(a.page).is_none() {
                out.violations.fetch_add(1, Ordering::Relaxed);
                eprintln!("VIOLATION: DMA {a:?} outside every watched mapping");
            }
        })
    };
    (SoftNic::with_observer(prim.clone(), observer), out)
}

/// What every test runs on: a monitor and its handler thread, an anonymous
/// region it watches for missing pages, the primary over it and a checked
/// software NIC.
///
/// Fields drop in order: the region must go (its unmap raises an event the
/// handler thread reads) before the thread and the monitor.
struct World {
    out: Arc<Outside>,
    nic: SoftNic,
    prim: Arc<UffdPrimary>,
    region: Arc<Region>,
    _thread: HandlerThread,
    m: UffdMonitor,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// The tests of this file run one at a time. They unmap buffers and map
/// them back at the same address; in between, the hole is free address
/// space, and another test's thread (a registry growing its arrays) could
/// map into it, which makes the mapping back fail with `EEXIST` (see
/// `Region::map_fixed_over`).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl World {
    /// `None` (after a visible SKIP) without userfaultfd.
    fn new(bytes: u64) -> Option<Self> {
        // A test that failed leaves the lock poisoned; the next still runs.
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let m = monitor()?;
        let _thread = m.spawn().unwrap();
        let region = Arc::new(Region::anon(bytes).unwrap());
        m.register(&region, RegisterMode::MISSING).unwrap();
        let prim = Arc::new(UffdPrimary::new(&m).unwrap());
        let (nic, out) = nic(&m, &prim);
        Some(Self {
            out,
            nic,
            prim,
            region,
            _thread,
            m,
            _serial: serial,
        })
    }
}

fn registry(prim: &Arc<UffdPrimary>, nic: &SoftNic) -> Registry<SoftNic> {
    Registry::new(&**prim, nic.clone(), RegistryConfig::default())
}

/// `munmap` `[off, off + len)` of `region` (or replace it with `mmap
/// (MAP_FIXED)` when `fixed`), wait until the monitor applied the UNMAP
/// (every subscriber ran), map fresh memory there and watch it again.
fn free_and_recreate(m: &UffdMonitor, region: &Region, off: u64, len: u64, fixed: bool) {
    let a = region.addr() + off;
    if fixed {
        region.map_fixed_over(off, len).unwrap();
    } else {
        region.munmap(off, len).unwrap();
    }
    wait_until("the UNMAP applied", || m.registration(a).is_none());
    if !fixed {
        region.map_fixed_over(off, len).unwrap();
    }
    m.register_range(region, off, len, RegisterMode::MISSING)
        .unwrap();
}

fn is_rejected(r: Result<(), DmaError>, key: u32) -> bool {
    matches!(r, Err(DmaError::Invalidated(k) | DmaError::UnknownKey(k)) if k == key)
}

#[test]
fn dma_through_the_keys_reaches_real_memory() {
    let Some(w) = World::new(16 * P) else { return };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let mut reg = registry(&w.prim, nic);
    let base = region.addr();

    let h = reg.get(base + 4 * P, 4 * P, RW).unwrap();
    assert_eq!(reg.bounds(h).unwrap(), (base + 4 * P, base + 8 * P));
    // A DMA write across a page boundary, through the lkey.
    let msg = b"written by the NIC across a page boundary";
    let at = base + 5 * P - 10;
    nic.local_write(h.lkey(), at, msg).unwrap();
    // The CPU sees it in the process's memory ...
    let mut cpu = vec![0u8; msg.len()];
    region.read(at - base, &mut cpu).unwrap();
    assert_eq!(cpu, msg);
    // ... and so does a remote read through the rkey.
    let mut back = vec![0u8; msg.len()];
    nic.remote_read(h.rkey(), at, &mut back).unwrap();
    assert_eq!(back, msg);
    // A CPU write is seen by DMA; a remote atomic is seen by the CPU.
    region.write(6 * P, &7u64.to_le_bytes()).unwrap();
    assert_eq!(nic.remote_fetch_add(h.rkey(), base + 6 * P, 5).unwrap(), 7);
    let mut w = [0u8; 8];
    region.read(6 * P, &mut w).unwrap();
    assert_eq!(u64::from_le_bytes(w), 12);
    // Memory outside the registration is never reachable through it.
    assert!(matches!(
        nic.remote_read(h.rkey(), base + 8 * P, &mut w),
        Err(DmaError::OutOfBounds { .. })
    ));
    reg.put(h).unwrap();
    assert!(nic.stats().faults > 0, "translations built by NIC faults");
    assert!(out.checked.load(Ordering::Relaxed) > 0);
    assert_eq!(out.violations.load(Ordering::Relaxed), 0);
    assert_eq!(m.last_error(), None);
}

#[test]
fn free_then_recreate_at_the_same_address_gives_a_new_registration() {
    let Some(w) = World::new(16 * P) else { return };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let mut reg = registry(&w.prim, nic);
    let (off, len) = (4 * P, 4 * P);
    let a = region.addr() + off;

    // Both ways of freeing that the backend reports: munmap, and mmap
    // (MAP_FIXED) straight over the old memory.
    for (round, fixed) in [false, true, false, true].into_iter().enumerate() {
        let old = reg.get(a, len, RW).unwrap();
        let old_byte = 0x10 + round as u8;
        nic.local_write(old.lkey(), a + 100, &[old_byte; 64])
            .unwrap();
        reg.put(old).unwrap();
        // Cached and idle: the next get is a hit on the same registration.
        let again = reg.get(a, len, RW).unwrap();
        assert_eq!(again, old);
        reg.put(again).unwrap();
        let before = reg.stats();

        free_and_recreate(m, region, off, len, fixed);
        // The old keys died with the UNMAP, before the new memory came.
        let mut b = [0u8; 64];
        assert!(is_rejected(
            nic.remote_read(old.rkey(), a + 100, &mut b),
            old.rkey()
        ));
        assert!(is_rejected(
            nic.local_read(old.lkey(), a + 100, &mut b),
            old.lkey()
        ));
        // The new memory's contents, written by the CPU.
        region.write(off + 200, b"new incarnation").unwrap();

        let new = reg.get(a, len, RW).unwrap();
        let s = reg.stats();
        assert_eq!(s.misses, before.misses + 1, "a miss, not a stale hit");
        assert_eq!(s.hits, before.hits);
        assert_eq!(s.registrations, before.registrations + 1);
        assert_eq!(s.invalidations, before.invalidations + 1);
        assert_eq!(s.deregistrations, before.deregistrations + 1);
        assert_ne!(new.lkey(), old.lkey());
        assert_ne!(new.rkey(), old.rkey());
        // The old rkey stays rejected; the new one sees the new memory only.
        assert_eq!(
            nic.remote_read(old.rkey(), a + 100, &mut b),
            Err(DmaError::UnknownKey(old.rkey()))
        );
        nic.remote_read(new.rkey(), a + 100, &mut b).unwrap();
        assert_eq!(b, [0u8; 64], "the old data is gone");
        let mut n = [0u8; 15];
        nic.remote_read(new.rkey(), a + 200, &mut n).unwrap();
        assert_eq!(&n, b"new incarnation");
        reg.put(new).unwrap();
    }
    assert!(m.stats().unmaps >= 4);
    assert_eq!(out.violations.load(Ordering::Relaxed), 0);
    assert_eq!(m.last_error(), None);
}

#[test]
fn a_zap_by_madvise_keeps_the_odp_registration_and_shows_the_new_pages() {
    let Some(w) = World::new(16 * P) else { return };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let mut reg = registry(&w.prim, nic);
    let (off, len) = (4 * P, 4 * P);
    let a = region.addr() + off;
    let h = reg.get(a, len, RW).unwrap();
    reg.put(h).unwrap();

    for announced in [true, false] {
        nic.remote_write(h.rkey(), a + P - 8, &[0xa5; 16]).unwrap();
        let mut b = [0u8; 16];
        region.read(off + P - 8, &mut b).unwrap();
        assert_eq!(b, [0xa5; 16]);
        let (before, faults) = (reg.stats(), nic.stats().faults);
        let removes = m.stats().removes;
        if announced {
            m.madvise(region, off, len, Advice::DontNeed).unwrap();
        } else {
            // Unannounced is fine while no DMA runs on the range; its
            // REMOVE is applied before any later fault is served.
            region.madvise(off, len, Advice::DontNeed).unwrap();
        }
        wait_until("the REMOVE delivered", || m.stats().removes > removes);
        // On demand: the registration survives, its translations do not.
        let again = reg.get(a, len, RW).unwrap();
        assert_eq!(again, h);
        let s = reg.stats();
        assert_eq!((s.hits, s.misses), (before.hits + 1, before.misses));
        assert_eq!(s.registrations, before.registrations);
        reg.put(again).unwrap();
        // The DMA sees the zapped (zero) pages, faulted in anew.
        nic.remote_read(h.rkey(), a + P - 8, &mut b).unwrap();
        assert_eq!(b, [0u8; 16], "never the old contents");
        assert!(nic.stats().faults >= faults + 2, "both pages re-faulted");
    }
    assert_eq!(out.violations.load(Ordering::Relaxed), 0);
    assert_eq!(m.last_error(), None);
}

#[test]
fn a_region_held_across_the_unmap_dies_at_once_and_goes_at_its_last_put() {
    let Some(w) = World::new(16 * P) else { return };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let mut reg = registry(&w.prim, nic);
    let (off, len) = (8 * P, 2 * P);
    let a = region.addr() + off;

    let held = reg.get(a, len, RW).unwrap();
    nic.local_write(held.lkey(), a, b"held").unwrap();
    let s0 = reg.stats();
    let nic0 = nic.stats();

    region.munmap(off, len).unwrap();
    wait_until("the UNMAP applied", || m.registration(a).is_none());
    // Its keys died with the invalidation, though the region is still held.
    let mut b = [0u8; 4];
    assert_eq!(
        nic.remote_read(held.rkey(), a, &mut b),
        Err(DmaError::Invalidated(held.rkey()))
    );
    assert_eq!(
        nic.local_write(held.lkey(), a, b"late"),
        Err(DmaError::Invalidated(held.lkey()))
    );
    assert!(!reg.region(held).unwrap().is_valid());
    assert_eq!(reg.stats().invalidations, s0.invalidations + 1);

    // New memory at the same address: a new registration, while the old
    // region still waits for its put.
    region.map_fixed_over(off, len).unwrap();
    m.register_range(region, off, len, RegisterMode::MISSING)
        .unwrap();
    let new = reg.get(a, len, RW).unwrap();
    assert_ne!(new.rkey(), held.rkey());
    nic.remote_read(new.rkey(), a, &mut b).unwrap();
    assert_eq!(b, [0; 4], "new memory, not the held region's data");
    let deregs = reg.stats().deregistrations;
    assert_eq!(deregs, s0.deregistrations, "held: not deregistered yet");

    // The put deregisters it; a second put is refused.
    reg.put(held).unwrap();
    assert_eq!(reg.stats().deregistrations, deregs + 1);
    assert_eq!(nic.stats().deregistrations, nic0.deregistrations + 1);
    assert!(matches!(reg.put(held), Err(RegError::StaleHandle)));
    assert!(matches!(
        nic.remote_read(held.rkey(), a, &mut b),
        Err(DmaError::UnknownKey(_))
    ));

    reg.put(new).unwrap();
    reg.invalidate(region.addr(), region.len()).unwrap();
    let s = reg.stats();
    assert_eq!(s.registrations, s.deregistrations, "{s:?}");
    let n = nic.stats();
    assert_eq!(n.registrations, n.deregistrations, "{n:?}");
    assert_eq!(out.violations.load(Ordering::Relaxed), 0);
    assert_eq!(m.last_error(), None);
}

// ---------------------------------------------------------------------------
// Concurrency.

const BUFS: u64 = 6;
const BUF: u64 = 2 * P;
/// Buffers are two lengths apart, so cached regions never merge.
const STRIDE: u64 = 2 * BUF;

/// The incarnation byte of generation `g` (never zero, the zapped value).
fn gen_byte(g: u64) -> u8 {
    (g % 255) as u8 + 1
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// What the DMA threads found wrong, and what they did.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    rejected: AtomicU64,
    /// A DMA through a key succeeded after its buffer was freed, or saw
    /// bytes other than its own incarnation's.
    stale: AtomicU64,
    /// A key that had served DMA was rejected though its buffer was never
    /// freed.
    spurious: AtomicU64,
    /// A fresh `get` returned a key that was dead before its first DMA,
    /// though its buffer was not freed: the registry kills a region built
    /// while *any* range of its chunk window is invalidated (reproduced
    /// deterministically, and ignored until fixed, in `publish_race.rs`).
    /// Safe, so counted rather than failed.
    dead_on_arrival: AtomicU64,
    /// `get` returned a key issued for an older incarnation.
    reissued: AtomicU64,
}

impl Tally {
    fn bad(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        eprintln!("VIOLATION: {what}");
    }
}

#[test]
fn dma_threads_against_unmapping_threads_never_use_a_stale_registration() {
    let Some(w) = World::new(BUFS * STRIDE) else {
        return;
    };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let reg = Arc::new(Mutex::new(registry(&w.prim, nic)));
    // Per buffer: the current generation, under the application's lock
    // that keeps DMA off a buffer while it is unmapped (the documented
    // hazard). DMA threads keep their keys across the lock.
    let gens: Arc<Vec<RwLock<u64>>> = Arc::new((0..BUFS).map(|_| RwLock::new(0)).collect());
    for k in 0..BUFS {
        region
            .write(k * STRIDE, &[gen_byte(0); BUF as usize])
            .unwrap();
    }
    let tally = Arc::new(Tally::default());
    let keys: Arc<Mutex<HashMap<u32, (u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let dma = |seed: u64| {
        let (region, nic, reg, gens, tally, keys, stop) = (
            region.clone(),
            nic.clone(),
            reg.clone(),
            gens.clone(),
            tally.clone(),
            keys.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut seed = seed;
            // Per buffer: the handle, its incarnation, and whether it served a DMA.
            let mut mine: Vec<Option<(MrHandle, u64, bool)>> = vec![None; BUFS as usize];
            while !stop.load(Ordering::Relaxed) {
                let k = rng(&mut seed) % BUFS;
                let a = region.addr() + k * STRIDE;
                let cur = gens[k as usize].read();
                let (h, g, used) = match mine[k as usize] {
                    Some(x) => x,
                    None => {
                        let h = reg.lock().get(a, BUF, RW).unwrap();
                        // Every key names one incarnation, ever.
                        match keys.lock().insert(h.rkey(), (k, *cur)) {
                            Some(was) if was != (k, *cur) => tally.bad(
                                &tally.reissued,
                                format!(
                                    "get on buf {k} gen {} gave rkey {:#x} of {was:?}",
                                    *cur,
                                    h.rkey()
                                ),
                            ),
                            _ => {}
                        }
                        mine[k as usize] = Some((h, *cur, false));
                        (h, *cur, false)
                    }
                };
                let off = rng(&mut seed) % (BUF - 64);
                let n = 1 + (rng(&mut seed) % 64) as usize;
                let r = if rng(&mut seed) % 3 == 0 {
                    // Writes keep the buffer's bytes its incarnation's byte.
                    nic.remote_write(h.rkey(), a + off, &vec![gen_byte(g); n])
                } else {
                    let mut b = vec![0u8; n];
                    nic.remote_read(h.rkey(), a + off, &mut b).map(|()| {
                        if let Some(x) = b.iter().find(|&&x| x != gen_byte(g)) {
                            tally.bad(
                                &tally.stale,
                                format!(
                                    "buf {k} key of gen {g} read byte {x:#x} (now gen {})",
                                    *cur
                                ),
                            );
                        }
                    })
                };
                match r {
                    Ok(()) if g == *cur => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        mine[k as usize] = Some((h, g, true));
                    }
                    Ok(()) => tally.bad(
                        &tally.stale,
                        format!("buf {k}: key of gen {g} served at gen {}", *cur),
                    ),
                    Err(e @ (DmaError::Invalidated(_) | DmaError::UnknownKey(_))) => {
                        if g == *cur && used {
                            let what = format!("buf {k} gen {g}: live key rejected: {e:?}");
                            tally.bad(&tally.spurious, what);
                        } else if g == *cur {
                            // Its buffer was not freed since the get: only an
                            // invalidation of other memory can have killed it.
                            tally.dead_on_arrival.fetch_add(1, Ordering::Relaxed);
                        }
                        tally.rejected.fetch_add(1, Ordering::Relaxed);
                        // Rejected once, rejected for good.
                        if !is_rejected(nic.remote_read(h.rkey(), a, &mut [0u8; 8]), h.rkey()) {
                            tally.bad(&tally.stale, format!("buf {k}: a rejected key came back"));
                        }
                        reg.lock().put(h).unwrap();
                        mine[k as usize] = None;
                    }
                    Err(e) => panic!("DMA failed: {e}"),
                }
                drop(cur);
                // Sometimes give the reference back: the next get is a hit
                // or, after a free, a new registration.
                if rng(&mut seed) % 4 == 0 {
                    if let Some((h, _, _)) = mine[k as usize].take() {
                        reg.lock().put(h).unwrap();
                    }
                }
            }
            let mut r = reg.lock();
            for (h, _, _) in mine.into_iter().flatten() {
                r.put(h).unwrap();
            }
        })
    };
    let dmas: Vec<_> = (1..=3)
        .map(|i| dma(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i)))
        .collect();

    // Two freeing threads, each over its own half of the buffers.
    let frees: Vec<_> = (0..2u64)
        .map(|t| {
            let (m, region, gens, reg) = (m.clone(), region.clone(), gens.clone(), reg.clone());
            std::thread::spawn(move || {
                let mut seed = 0x1234_5678 + t;
                for i in 0..60 {
                    let k = t * (BUFS / 2) + rng(&mut seed) % (BUFS / 2);
                    let mut g = gens[k as usize].write();
                    // Between a munmap and the mmap back, the hole is free
                    // address space: the registry, which maps its arrays
                    // under its lock, could take it (and the mmap back
                    // would then fail with EEXIST). The application keeps
                    // its own threads out of the hole.
                    let fixed = i % 2 == 1;
                    let hole = (!fixed).then(|| reg.lock());
                    free_and_recreate(&m, &region, k * STRIDE, BUF, fixed);
                    drop(hole);
                    *g += 1;
                    region
                        .write(k * STRIDE, &[gen_byte(*g); BUF as usize])
                        .unwrap();
                    drop(g);
                    std::thread::sleep(Duration::from_micros(300));
                }
            })
        })
        .collect();
    for f in frees {
        f.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for d in dmas {
        d.join().unwrap();
    }

    let mut reg = Arc::into_inner(reg).unwrap().into_inner();
    reg.invalidate(region.addr(), region.len()).unwrap();
    let s = reg.stats();
    let t = &*tally;
    let (ok, rejected) = (
        t.ok.load(Ordering::Relaxed),
        t.rejected.load(Ordering::Relaxed),
    );
    let doa = t.dead_on_arrival.load(Ordering::Relaxed);
    eprintln!(
        "{ok} DMAs served, {rejected} keys rejected ({doa} dead on arrival); {s:?}; {:?}",
        nic.stats()
    );
    assert_eq!(t.stale.load(Ordering::Relaxed), 0, "stale DMA served");
    assert_eq!(
        t.reissued.load(Ordering::Relaxed),
        0,
        "stale registration served"
    );
    assert_eq!(t.spurious.load(Ordering::Relaxed), 0, "live key rejected");
    assert_eq!(doa, 0, "a fresh registration came back dead");
    assert_eq!(
        out.violations.load(Ordering::Relaxed),
        0,
        "DMA outside the mappings"
    );
    assert!(ok > 0 && rejected > 0, "the race was exercised");
    assert!(s.invalidations > 0 && s.misses > BUFS);
    assert_eq!(s.registrations, s.deregistrations, "{s:?}");
    assert_eq!(m.last_error(), None);
}

#[test]
fn dma_threads_against_announced_zaps_see_only_whole_incarnations() {
    let Some(w) = World::new(BUFS * STRIDE) else {
        return;
    };
    let (m, region, nic, out) = (&w.m, &w.region, &w.nic, &w.out);
    let mut reg = registry(&w.prim, nic);
    // Per buffer a sequence word: odd while the buffer is zapped and
    // refilled, `2 * g` when generation g is whole. No lock: an announced
    // zap may run while devices access the range.
    let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..BUFS).map(|_| AtomicU64::new(0)).collect());
    let mut handles = Vec::new();
    for k in 0..BUFS {
        region
            .write(k * STRIDE, &[gen_byte(0); BUF as usize])
            .unwrap();
        handles.push(reg.get(region.addr() + k * STRIDE, BUF, RW).unwrap());
    }
    let handles = Arc::new(handles);
    let (checked, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));

    let dmas: Vec<_> = (1..=2u64)
        .map(|i| {
            let (region, nic, seqs, handles, checked, torn, stop) = (
                region.clone(),
                nic.clone(),
                seqs.clone(),
                handles.clone(),
                checked.clone(),
                torn.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut seed = 0xdead_beef * i;
                while !stop.load(Ordering::Relaxed) {
                    let k = rng(&mut seed) % BUFS;
                    let h = handles[k as usize];
                    let off = rng(&mut seed) % (BUF - 256);
                    let mut b = [0u8; 256];
                    let s1 = seqs[k as usize].load(Ordering::Acquire);
                    nic.remote_read(h.rkey(), region.addr() + k * STRIDE + off, &mut b)
                        .unwrap();
                    fence(Ordering::Acquire);
                    let s2 = seqs[k as usize].load(Ordering::Relaxed);
                    if s1 == s2 && s1 % 2 == 0 {
                        checked.fetch_add(1, Ordering::Relaxed);
                        if let Some(x) = b.iter().find(|&&x| x != gen_byte(s1 / 2)) {
                            torn.fetch_add(1, Ordering::Relaxed);
                            eprintln!("VIOLATION: buf {k} gen {} read {x:#x}", s1 / 2);
                        }
                    }
                }
            })
        })
        .collect();

    let faults = nic.stats().faults;
    let mut seed = 0x5151u64;
    for _ in 0..300 {
        let k = rng(&mut seed) % BUFS;
        let seq = &seqs[k as usize];
        let g = seq.fetch_add(1, Ordering::AcqRel) / 2 + 1;
        m.madvise(region, k * STRIDE, BUF, Advice::DontNeed)
            .unwrap();
        region
            .write(k * STRIDE, &[gen_byte(g); BUF as usize])
            .unwrap();
        seq.fetch_add(1, Ordering::Release);
    }
    stop.store(true, Ordering::Relaxed);
    for d in dmas {
        d.join().unwrap();
    }

    let s = reg.stats();
    eprintln!(
        "{} whole reads checked; {s:?}; {:?}; {:?}",
        checked.load(Ordering::Relaxed),
        nic.stats(),
        m.stats()
    );
    assert_eq!(torn.load(Ordering::Relaxed), 0, "a stale or torn read");
    assert!(checked.load(Ordering::Relaxed) > 0);
    assert!(
        nic.stats().faults > faults,
        "zapped pages were faulted in again"
    );
    // The registrations survived every zap (on demand), with their keys.
    assert_eq!((s.invalidations, s.misses), (0, BUFS));
    for &h in handles.iter() {
        reg.put(h).unwrap();
    }
    assert_eq!(out.violations.load(Ordering::Relaxed), 0);
    assert_eq!(m.last_error(), None);
}
