//! The conformance suite: the invariants every secondary must keep, as
//! generic checks that each backend's tests call with its own primary and
//! secondary (`check_secondary`), so each backend proves the same things.

use crate::primary::Primary;

/// What the suite needs from a primary besides [`Primary`]: CPU-side
/// accesses and the mutations whose effect secondaries must follow.
pub trait ConformancePrimary: Primary {
    /// CPU read of the word at `addr` (faulting as needed).
    fn cpu_read(&self, addr: u64) -> u64;
    /// CPU write of the word at `addr` (faulting as needed).
    fn cpu_write(&self, addr: u64, val: u64);
    /// Drop the page's contents (`munmap` + re-map, or `MADV_DONTNEED`):
    /// afterwards it reads as zero.
    fn zap(&self, addr: u64);
    /// Move the page to another frame keeping its contents; false if the
    /// primary cannot.
    fn migrate(&self, addr: u64) -> bool;
    /// Write-protect the page (the next write faults); false if the primary
    /// cannot.
    fn write_protect(&self, addr: u64) -> bool;
}

/// A secondary as the suite drives it.
pub trait SecondaryUnderTest {
    /// Device read of the word at `addr`.
    fn read(&self, addr: u64) -> Result<u64, String>;
    /// Device write of the word at `addr`.
    fn write(&self, addr: u64, val: u64) -> Result<(), String>;
    /// Stale accesses the coherence oracle found so far.
    fn violations(&self) -> u64;
}

/// What a conformance run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    /// Checks that passed.
    pub checks: u64,
    /// Whether migration was exercised.
    pub migrated: bool,
    /// Whether write protection was exercised.
    pub protected: bool,
}

fn expect(what: &str, addr: u64, got: u64, want: u64) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what} at {addr:#x}: secondary saw {got:#x}, primary holds {want:#x}"
        ))
    }
}

/// Run the single-threaded invariants over `pages` (page-aligned
/// addresses inside both the primary and the secondary):
///
/// 1. a CPU write is seen by the device;
/// 2. a device write is seen by the CPU;
/// 3. after a zap the device reads zero, never the old frame;
/// 4. after a migration the device reads the current contents and its
///    writes land in the new frame;
/// 5. after write protection a device write still lands (faulting and
///    upgrading) and the CPU sees it;
/// 6. the oracle found no violation.
pub fn check_secondary<P: ConformancePrimary + ?Sized, S: SecondaryUnderTest + ?Sized>(
    primary: &P,
    secondary: &S,
    pages: &[u64],
) -> Result<ConformanceReport, String> {
    let mut r = ConformanceReport::default();
    for (i, &page) in pages.iter().enumerate() {
        let a = page + 8 * (i as u64 % 512);
        let tag = 0xC0DE_0000_0000 + i as u64;

        primary.cpu_write(a, tag);
        expect("cpu write -> device read", a, secondary.read(a)?, tag)?;
        r.checks += 1;

        secondary.write(a, tag + 1)?;
        expect("device write -> cpu read", a, primary.cpu_read(a), tag + 1)?;
        r.checks += 1;

        primary.zap(page);
        expect("zap -> device read", a, secondary.read(a)?, 0)?;
        r.checks += 1;

        primary.cpu_write(a, tag + 2);
        expect("re-fault -> device read", a, secondary.read(a)?, tag + 2)?;
        r.checks += 1;

        if primary.migrate(page) {
            r.migrated = true;
            expect("migrate -> device read", a, secondary.read(a)?, tag + 2)?;
            secondary.write(a, tag + 3)?;
            expect(
                "migrate -> device write -> cpu read",
                a,
                primary.cpu_read(a),
                tag + 3,
            )?;
            r.checks += 2;
        }

        if primary.write_protect(page) {
            r.protected = true;
            secondary.write(a, tag + 4)?;
            expect(
                "write-protect -> device write -> cpu read",
                a,
                primary.cpu_read(a),
                tag + 4,
            )?;
            r.checks += 1;
        }
    }
    if secondary.violations() != 0 {
        return Err(format!(
            "oracle found {} stale accesses",
            secondary.violations()
        ));
    }
    Ok(r)
}

/// How long [`check_concurrent`]'s device thread retries a refused write
/// before it reports the refusal. Long enough for a mutator preempted
/// inside its read-only window on a loaded machine.
pub const WRITE_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(5);

fn write_retrying<S>(secondary: &S, addr: u64, val: u64) -> Result<(), String>
where
    S: SecondaryUnderTest + ?Sized,
{
    let start = std::time::Instant::now();
    loop {
        match secondary.write(addr, val) {
            Err(_) if start.elapsed() < WRITE_RETRY_FOR => std::thread::yield_now(),
            r => return r,
        }
    }
}

/// Run device accesses on `pages` from one thread while another mutates
/// the primary (`rounds` zaps, migrations and write-protections), then
/// require zero oracle violations. Returns the number of device accesses.
///
/// A write-protection may take the write right away for a moment (over
/// [`Mm`](crate::mm::Mm) it is `mprotect(READ)` then `mprotect(RW)`), and a
/// device write that faults in that window is refused by the primary, as a
/// DMA write to a read-only page would be. The device thread retries a
/// refused write, as a device retries a faulted DMA, for up to
/// [`WRITE_RETRY_FOR`]; a write still refused after that is an error.
pub fn check_concurrent<P, S>(
    primary: &P,
    secondary: &S,
    pages: &[u64],
    rounds: u64,
) -> Result<u64, String>
where
    P: ConformancePrimary + ?Sized + Sync,
    S: SecondaryUnderTest + ?Sized + Sync,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = AtomicBool::new(false);
    let accesses = AtomicU64::new(0);
    let err = std::thread::scope(|s| {
        let dev = s.spawn(|| {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let a = pages[i % pages.len()];
                let r = if i % 3 == 0 {
                    write_retrying(secondary, a, i as u64).map(|_| 0)
                } else {
                    secondary.read(a)
                };
                if let Err(e) = r {
                    return Some(e);
                }
                accesses.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            None
        });
        // Let the device get going first, so the mutations race with it.
        while accesses.load(Ordering::Relaxed) == 0 && !dev.is_finished() {
            std::thread::yield_now();
        }
        for k in 0..rounds {
            let a = pages[(k as usize * 7) % pages.len()];
            match k % 3 {
                0 => primary.zap(a),
                1 => {
                    primary.migrate(a);
                }
                _ => {
                    primary.write_protect(a);
                }
            }
            primary.cpu_write(a, k);
        }
        stop.store(true, Ordering::Relaxed);
        dev.join().expect("device thread")
    });
    if let Some(e) = err {
        return Err(e);
    }
    if secondary.violations() != 0 {
        return Err(format!(
            "oracle found {} stale accesses",
            secondary.violations()
        ));
    }
    Ok(accesses.load(Ordering::Relaxed))
}
