//! Process-wide mode for unmodified applications
//! ([`UffdMonitor::watch_process`]): every anonymous private mapping of the
//! process is watched events-only, so the application needs no
//! per-allocation call.
//!
//! # What it covers
//!
//! A scan of `/proc/self/maps` registers ([`RegisterMode::EVENTS`]) every
//! private, readable and writable mapping with no file behind it:
//! - glibc's mmap'd malloc chunks (allocations above `M_MMAP_THRESHOLD`,
//!   128 KiB by default) and the heaps of its thread arenas (`free` of an
//!   mmap'd chunk is a `munmap`: UNMAP; an arena heap trimmed by `free`
//!   gives REMOVE (`MADV_DONTNEED`) or UNMAP (`shrink_heap`));
//! - the `[heap]` (brk) area: a `brk` shrink (glibc's `systrim`) unmaps
//!   through `do_vmi_align_munmap` with the userfaultfd unmap list, so it
//!   raises UNMAP like `munmap` does;
//! - thread stacks and other anonymous buffers that exist at the scan.
//!
//! Mappings made **after** the scan are covered when a registration `get`
//! calls `Primary::ensure_covered` (`UffdPrimary`), or by scanning again
//! (`watch_process` is idempotent: it registers only what is new).
//!
//! # What it cannot cover, and why
//!
//! - **Mappings made after the scan, until covered**: the kernel has no
//!   "register every future mapping" mode; a new VMA has no userfaultfd
//!   context until `UFFDIO_REGISTER`.
//! - **File mappings** (`MAP_SHARED` or private of a regular file): the
//!   kernel accepts userfaultfd only for anonymous, shmem and hugetlbfs
//!   VMAs (`vma_can_userfault`); skipped (memfd/shmem can be watched
//!   explicitly with [`UffdMonitor::watch`]).
//! - **The monitor's own stack**: a thread that unmaps or zaps watched
//!   memory sleeps until the monitor *reads* the event; when the stack of
//!   the monitor's thread is freed (by the thread joining it) the monitor
//!   is gone. The stack of the handler thread is skipped.
//! - **`[vdso]`, `[vvar]`, `[vsyscall]`**: special mappings
//!   (`VM_SPECIAL` / not anonymous): refused by the kernel; skipped.
//! - **Read-only or `PROT_NONE` mappings** (guard pages, reservations):
//!   skipped; they hold nothing a device may use.
//! - **The monitor thread itself must not unmap or zap watched memory**:
//!   it would sleep until it read its own event. In this mode that
//!   includes `free` on the monitor thread returning memory to the kernel
//!   (subscribers and fault handlers run there): keep their allocations
//!   small, or raise `M_TRIM_THRESHOLD` / `M_MMAP_THRESHOLD` (`mallopt`).

use notifier_core::addr::PageRange;

use crate::error::UffdError;
use crate::monitor::UffdMonitor;
use crate::registry::RegisterMode;

/// What a [`UffdMonitor::watch_process`] scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessScan {
    /// Mappings registered now (new since the last scan).
    pub watched: usize,
    /// Mappings already watched.
    pub already: usize,
    /// Mappings skipped as not watchable (file, special, not read-write,
    /// the monitor's stack), with the reason.
    pub skipped: Vec<(PageRange, &'static str)>,
    /// Mappings the kernel refused (e.g. unmapped meanwhile).
    pub refused: Vec<(PageRange, String)>,
}

/// One line of `/proc/self/maps`: the range, whether it is a private
/// read-write mapping, and its path (empty for anonymous memory).
fn parse(line: &str) -> Option<(u64, u64, bool, &str)> {
    let mut it = line.splitn(6, ' ');
    let (a, b) = it.next()?.split_once('-')?;
    let perms = it.next()?;
    let (_off, _dev, _ino) = (it.next()?, it.next()?, it.next()?);
    let path = it.next().unwrap_or("").trim();
    let rw_private = perms.starts_with("rw") && perms.ends_with('p');
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
        rw_private,
        path,
    ))
}

impl UffdMonitor {
    /// Watch every anonymous private read-write mapping of the process,
    /// events-only (see the `process` module docs for what this covers
    /// and what it cannot). Idempotent: a second scan registers only the
    /// mappings that are new.
    ///
    /// # Errors
    /// [`UffdError::Io`] when `/proc/self/maps` cannot be read,
    /// [`UffdError::Stopped`] once the monitor is retired.
    pub fn watch_process(&self) -> Result<ProcessScan, UffdError> {
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        let own_stack = self
            .inner
            .monitor_stack
            .load(std::sync::atomic::Ordering::Acquire);
        let mut scan = ProcessScan::default();
        for line in maps.lines() {
            let Some((s, e, rw_private, path)) = parse(line) else {
                continue;
            };
            let Ok(range) = PageRange::from_bounds(s, e) else {
                continue;
            };
            let skip = if !rw_private {
                Some("not a private read-write mapping")
            } else if path.starts_with("[v") {
                Some("special mapping (vdso, vvar, vsyscall)")
            } else if !path.is_empty() && path != "[heap]" && path != "[stack]" {
                Some("file mapping")
            } else if (s..e).contains(&own_stack) {
                Some("the monitor thread's stack")
            } else {
                None
            };
            if let Some(why) = skip {
                scan.skipped.push((range, why));
                continue;
            }
            if self.is_watched(s, e - s) {
                scan.already += 1;
                continue;
            }
            match self.watch(s, e - s, RegisterMode::EVENTS) {
                Ok(_) => scan.watched += 1,
                Err(UffdError::Stopped) => return Err(UffdError::Stopped),
                Err(err) => scan.refused.push((range, err.to_string())),
            }
        }
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn maps_lines_parse() {
        assert_eq!(
            parse("7f00-7f10 rw-p 00000000 00:00 0 "),
            Some((0x7f00, 0x7f10, true, ""))
        );
        assert_eq!(
            parse("5600-5700 rw-p 00000000 00:00 0                          [heap]"),
            Some((0x5600, 0x5700, true, "[heap]"))
        );
        assert_eq!(
            parse("7f00-7f10 r--p 00000000 08:01 123  /usr/lib/libc.so.6"),
            Some((0x7f00, 0x7f10, false, "/usr/lib/libc.so.6"))
        );
        assert_eq!(
            parse("7f00-7f10 rw-s 00000000 00:01 9  /memfd:x (deleted)"),
            Some((0x7f00, 0x7f10, false, "/memfd:x (deleted)"))
        );
        assert_eq!(parse("garbage"), None);
    }
}
