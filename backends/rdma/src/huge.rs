//! Anonymous mappings for the registry's large arrays: 4 KiB pages while
//! an array is small, transparent huge pages once it is large. The thin
//! sys layer under [`PageVec`](crate::page_vec) and the slab's segments.
//!
//! Why: on the hosts this library is measured on (a paravirtualised guest)
//! the first touch of a fresh 4 KiB page costs 1.0-2.5 us, about
//! 0.4 ns per byte, while a 2 MiB transparent huge page costs about
//! 0.08 ns per byte: the kernel zeroes it in one go and maps it with one
//! page-table entry. A registry growing to tens of thousands of regions
//! touches ~140 bytes of fresh memory per registration, so with 4 KiB pages
//! fresh memory was about 60 ns of a ~145 ns miss.
//!
//! Small mappings, and what a small mapping grows by, are faulted in with
//! one `MADV_POPULATE_WRITE` call (about 1.1 us per page on that host
//! against 1.3-1.5 us for a first-touch fault, and no read-then-write
//! double fault). Their pages are then resident whether used or not, which
//! costs nothing in the memory figures: those count mapped bytes.
//!
//! Small mappings that arrays give up (the 4 KiB part of an array that
//! moved to huge pages, an array dropped) are kept, already faulted in, in
//! a process-wide pool of spares of at most [`SPARE_MAX`] bytes. A small
//! array that grows takes a spare when one is large enough and copies its
//! contents into it: on that host copying a byte costs about a twentieth
//! of faulting a fresh one in.
//!
//! The policy bounds what huge pages cost in resident memory: an array
//! asks for them only when its capacity reaches [`HUGE_FROM`], and its
//! capacity is then rounded up to whole huge pages. A small registry never
//! uses them; a large one holds at most one partly used huge page per
//! array more than its capacity. With `transparent_hugepage` set to
//! `never`, or on a kernel without it, `madvise` fails and the mapping
//! simply keeps 4 KiB pages.

#![allow(unsafe_code)]

use core::ptr::NonNull;
use std::sync::Mutex;

use notifier_core::PAGE_SIZE;

/// Size of a (PMD-level) transparent huge page on x86-64 and arm64 with 4 KiB pages.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Capacity (bytes) from which an array is placed on huge pages. A huge
/// page is zeroed whole (~0.17 ms for 2 MiB on the measured host, what
/// ~110 first touches of 4 KiB pages cost); a doubling array that reaches
/// 1 MiB fills at least half of its first one. (512 KiB was tried: it
/// rounded half-used arrays up to 2 MiB, 221 bytes per cached region
/// counted instead of 142, for no gain in time.)
pub(crate) const HUGE_FROM: usize = 1 << 20;

/// Most bytes of spare mappings the process keeps.
pub(crate) const SPARE_MAX: usize = 4 << 20;

/// Small private anonymous mappings nobody uses, faulted in (their
/// contents are left over), as (address, bytes), page aligned.
struct Spares {
    maps: Vec<(usize, usize)>,
    bytes: usize,
}

impl Spares {
    const fn new() -> Self {
        Self {
            maps: Vec::new(),
            bytes: 0,
        }
    }

    /// Keep `[addr, addr + bytes)` unless that would exceed [`SPARE_MAX`].
    fn keep(&mut self, addr: usize, bytes: usize) -> bool {
        if self.bytes + bytes > SPARE_MAX {
            return false;
        }
        self.maps.push((addr, bytes));
        self.bytes += bytes;
        true
    }

    /// `bytes` (whole pages) cut from the head of the smallest spare that
    /// holds them; its tail stays spare.
    fn take(&mut self, bytes: usize) -> Option<usize> {
        let (i, &(addr, len)) = self
            .maps
            .iter()
            .enumerate()
            .filter(|(_, m)| m.1 >= bytes)
            .min_by_key(|(_, m)| m.1)?;
        if len == bytes {
            self.maps.swap_remove(i);
        } else {
            self.maps[i] = (addr + bytes, len - bytes);
        }
        self.bytes -= bytes;
        Some(addr)
    }
}

static SPARES: Mutex<Spares> = Mutex::new(Spares::new());

/// Bytes of spare mappings the process keeps now.
pub(crate) fn spare_bytes() -> usize {
    SPARES.lock().map_or(0, |s| s.bytes)
}

/// A spare of `bytes` (whole pages), if the pool has one.
fn take_spare(bytes: usize) -> Option<NonNull<u8>> {
    let addr = SPARES.lock().ok()?.take(bytes)?;
    NonNull::new(addr as *mut u8)
}

/// Bytes to map for an array that needs `bytes`: whole 4 KiB pages below
/// [`HUGE_FROM`], whole huge pages from it on. `None` on overflow.
pub(crate) fn round(bytes: usize) -> Option<usize> {
    let unit = if bytes >= HUGE_FROM {
        HUGE_PAGE
    } else {
        PAGE_SIZE as usize
    };
    Some(bytes.checked_add(unit - 1)? & !(unit - 1))
}

/// Whether a mapping of `bytes` (a result of [`round`]) is on huge pages.
pub(crate) fn is_huge(bytes: usize) -> bool {
    bytes >= HUGE_FROM
}

/// Map `bytes` (a result of [`round`]) of private anonymous memory: page
/// aligned, or huge-page aligned and advised for huge pages when
/// [`is_huge`]. `None` when the kernel refuses.
pub(crate) fn map(bytes: usize) -> Option<NonNull<u8>> {
    if !is_huge(bytes) {
        let p = raw_map(bytes)?;
        populate(p.as_ptr(), bytes);
        return Some(p);
    }
    // Over-map by one huge page and trim both ends to the alignment.
    let over = bytes.checked_add(HUGE_PAGE)?;
    let p = raw_map(over)?.as_ptr() as usize;
    let base = (p + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let (head, tail) = (base - p, over - (base - p) - bytes);
    // SAFETY: both ranges lie inside the mapping just made, which nothing
    // else references; unmapping them leaves `[base, base + bytes)`.
    unsafe {
        if head != 0 {
            libc::munmap(p as *mut libc::c_void, head);
        }
        if tail != 0 {
            libc::munmap((base + bytes) as *mut libc::c_void, tail);
        }
        // Advice only: failure (no THP in this kernel) leaves 4 KiB pages.
        libc::madvise(base as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    NonNull::new(base as *mut u8)
}

/// Fault in `[p, p + bytes)` (part of a private anonymous mapping of
/// ours) for writing, in one call instead of a fault per 4 KiB page.
fn populate(p: *mut u8, bytes: usize) {
    // SAFETY: advice on our own mapping; it changes no contents (fresh
    // anonymous pages read as zero either way). Failure (a kernel before
    // 5.14, or no memory) leaves the pages to fault in on first touch.
    unsafe { libc::madvise(p.cast(), bytes, libc::MADV_POPULATE_WRITE) };
}

fn raw_map(bytes: usize) -> Option<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    // A mapping at address 0 (possible only with vm.mmap_min_addr = 0)
    // cannot be represented; give it back.
    let q = NonNull::new(p.cast::<u8>());
    if q.is_none() {
        // SAFETY: the mapping just made, referenced by nobody.
        unsafe { libc::munmap(p, bytes) };
    }
    q
}

/// Grow the mapping `[ptr, ptr + old)` (made by [`map`] or [`grow`]) to
/// `new > old` bytes (a result of [`round`]), keeping its first `old`
/// bytes; the bytes after them are unspecified (zero, or left over in a
/// spare). The result may lie elsewhere. `None` when the kernel refuses,
/// the old mapping then intact.
///
/// A small mapping that stays small moves into a spare large enough if
/// there is one (a copy into pages already faulted in), else grows by
/// `mremap` (its page-table entries move, not its bytes) and has its new
/// tail populated. A mapping that becomes huge is copied
/// into a fresh huge mapping, so its first huge page is one too (moved
/// 4 KiB entries would keep that range on small pages). A huge mapping
/// moves into a fresh aligned one by `mremap`, huge page by huge page.
///
/// # Safety
/// `ptr`/`old` describe a live mapping made by [`map`] or [`grow`] that
/// the caller owns; no reference into it is used after the call (it is
/// gone on success).
pub(crate) unsafe fn grow(ptr: NonNull<u8>, old: usize, new: usize) -> Option<NonNull<u8>> {
    debug_assert!(new > old);
    if !is_huge(new) {
        if let Some(to) = take_spare(new) {
            // SAFETY: the spare is a live mapping of `new > old` bytes that
            // nobody else uses (taken out of the pool); the old one is the
            // caller's, given up here.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr.as_ptr(), to.as_ptr(), old);
                unmap(ptr, old);
            }
            return Some(to);
        }
        // SAFETY: per the contract; MREMAP_MAYMOVE keeps the contents.
        let p = unsafe { libc::mremap(ptr.as_ptr().cast(), old, new, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return None;
        }
        let Some(q) = NonNull::new(p.cast::<u8>()) else {
            // The old mapping is gone already: no consistent state to
            // unwind into (as for a failed `realloc` that freed).
            std::process::abort();
        };
        // SAFETY: `[q + old, q + new)` is the grown tail of the mapping.
        populate(unsafe { q.as_ptr().add(old) }, new - old);
        return Some(q);
    }
    let to = map(new)?;
    if !is_huge(old) {
        // SAFETY: both mappings are live, distinct and at least `old` long;
        // the old one is the caller's, given up here.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), to.as_ptr(), old);
            unmap(ptr, old);
        }
        return Some(to);
    }
    // SAFETY: `to` is a fresh mapping of `new >= old` bytes, huge-page
    // aligned like the old one: MREMAP_FIXED moves the old pages over its
    // first `old` bytes (replacing them) and unmaps the old range.
    let p = unsafe {
        libc::mremap(
            ptr.as_ptr().cast(),
            old,
            old,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to.as_ptr().cast::<libc::c_void>(),
        )
    };
    if p == libc::MAP_FAILED {
        // SAFETY: the fresh mapping, referenced by nobody.
        unsafe { libc::munmap(to.as_ptr().cast(), new) };
        return None;
    }
    Some(to)
}

/// Give up `[ptr, ptr + bytes)`: a small mapping becomes a spare while
/// the pool has room, anything else is unmapped.
///
/// # Safety
/// A live mapping made by [`map`] or [`grow`], owned by the caller, with
/// no reference into it used afterwards.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, bytes: usize) {
    if !is_huge(bytes) {
        if let Ok(mut s) = SPARES.lock() {
            if s.keep(ptr.as_ptr() as usize, bytes) {
                return;
            }
        }
    }
    // SAFETY: per the contract.
    unsafe { libc::munmap(ptr.as_ptr().cast(), bytes) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_switches_to_huge_pages_at_the_threshold() {
        assert_eq!(round(1), Some(PAGE_SIZE as usize));
        assert_eq!(round(HUGE_FROM - 1), Some(HUGE_FROM));
        assert!(!is_huge(HUGE_FROM - PAGE_SIZE as usize));
        assert_eq!(round(HUGE_FROM), Some(HUGE_PAGE));
        assert_eq!(round(HUGE_PAGE + 1), Some(2 * HUGE_PAGE));
        assert_eq!(round(usize::MAX - 10), None);
    }

    #[test]
    fn growth_keeps_contents_across_every_transition() {
        // 4 KiB -> small -> huge (copied) -> bigger huge (moved).
        let sizes = [PAGE_SIZE as usize, 256 << 10, HUGE_PAGE, 3 * HUGE_PAGE];
        let mut p = map(sizes[0]).expect("map");
        let fill = |p: NonNull<u8>, from: usize, to: usize| {
            for i in (from.next_multiple_of(997)..to).step_by(997) {
                // SAFETY: inside the live mapping.
                unsafe { p.as_ptr().add(i).write((i % 251) as u8) };
            }
        };
        fill(p, 0, sizes[0]);
        for w in sizes.windows(2) {
            // SAFETY: `p` is the live mapping of `w[0]` bytes.
            p = unsafe { grow(p, w[0], w[1]) }.expect("grow");
            if is_huge(w[1]) {
                assert_eq!(p.as_ptr() as usize % HUGE_PAGE, 0, "huge-page aligned");
            }
            for i in (0..w[0]).step_by(997) {
                // SAFETY: inside the live mapping.
                let got = unsafe { p.as_ptr().add(i).read() };
                assert_eq!(got, (i % 251) as u8, "{w:?} at {i}");
            }
            fill(p, w[0], w[1]);
        }
        // SAFETY: the live mapping, unused afterwards.
        unsafe { unmap(p, sizes[3]) };
    }

    #[test]
    fn spares_cut_the_smallest_fit_and_respect_the_cap() {
        let mut s = Spares::new();
        assert!(s.keep(0x10_0000, 8 * 4096));
        assert!(s.keep(0x20_0000, 2 * 4096));
        assert_eq!(s.take(3 * 4096), Some(0x10_0000), "the 8-page spare");
        assert_eq!(s.bytes, 7 * 4096);
        assert_eq!(s.take(2 * 4096), Some(0x20_0000), "exact fit first");
        assert_eq!(s.take(5 * 4096), Some(0x10_0000 + 3 * 4096), "the rest");
        assert_eq!((s.take(4096), s.bytes), (None, 0));
        assert!(s.keep(0x30_0000, SPARE_MAX));
        assert!(!s.keep(0x40_0000, 4096), "over the cap");
    }

    #[test]
    fn a_growth_into_a_spare_keeps_contents() {
        // Give up a small mapping (it becomes a spare unless the pool is
        // full, which other tests may have caused), then grow another.
        let spare = map(64 << 10).expect("map");
        // SAFETY: the live mapping, unused afterwards.
        unsafe { unmap(spare, 64 << 10) };
        let p = map(4096).expect("map");
        for i in 0..4096 {
            // SAFETY: inside the live mapping.
            unsafe { p.as_ptr().add(i).write((i % 253) as u8) };
        }
        // SAFETY: `p` is the live mapping of 4096 bytes.
        let q = unsafe { grow(p, 4096, 32 << 10) }.expect("grow");
        for i in 0..4096 {
            // SAFETY: inside the live mapping.
            assert_eq!(unsafe { q.as_ptr().add(i).read() }, (i % 253) as u8);
        }
        // SAFETY: every byte of the grown mapping is writable.
        unsafe { q.as_ptr().add((32 << 10) - 1).write(1) };
        // SAFETY: the live mapping, unused afterwards.
        unsafe { unmap(q, 32 << 10) };
    }
}
