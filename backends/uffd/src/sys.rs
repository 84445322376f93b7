//! The thin unsafe layer: every system call and every raw memory access of
//! the crate, each with its `// SAFETY:` argument. Nothing else in the
//! crate contains `unsafe`.
//!
//! Conventions: functions return `io::Result` (or the raw errno for the
//! `UFFDIO_*` fill ioctls, whose errno the caller dispatches on). Addresses
//! are `u64` virtual addresses of this process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use parking_lot::RwLock;

const PAGE: u64 = 4096;

// ---------------------------------------------------------------------------
// userfaultfd ABI (include/uapi/linux/userfaultfd.h).

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: only faults from user mode are handled.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `UFFD_FEATURE_*` bits.
pub mod feature {
    /// Write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_EVENT_FORK`.
    pub const EVENT_FORK: u64 = 1 << 1;
    /// `UFFD_EVENT_REMAP`.
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// `UFFD_EVENT_REMOVE`.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// Missing faults on shmem/memfd.
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// `UFFD_EVENT_UNMAP`.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// The faulting thread id is reported.
    pub const THREAD_ID: u64 = 1 << 8;
    /// Minor faults on shmem/memfd.
    pub const MINOR_SHMEM: u64 = 1 << 10;
    /// Write-protect on shmem/hugetlbfs.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// `UFFDIO_POISON`.
    pub const POISON: u64 = 1 << 14;
}

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
/// Layout shared by `uffdio_zeropage`, `uffdio_continue`, `uffdio_poison`.
#[repr(C)]
#[derive(Default)]
struct UffdioRangeOp {
    range: UffdioRange,
    mode: u64,
    result: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioRangeOp>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0x07, size_of::<UffdioRangeOp>());
const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, 0x08, size_of::<UffdioRangeOp>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
/// `UFFDIO_COPY_MODE_DONTWAKE` (same bit for zeropage/continue/poison).
const MODE_DONTWAKE: u64 = 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Move an owned userfaultfd descriptor into the `userfaultfd` crate's type.
pub fn uffd_from_owned(fd: OwnedFd) -> userfaultfd::Uffd {
    use std::os::fd::IntoRawFd;
    // SAFETY: ownership of the descriptor moves into the `Uffd`, which
    // closes it on drop; nothing else holds it.
    unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) }
}

/// Take the descriptor back out of a `userfaultfd::Uffd`.
///
/// Not `Uffd::into_raw_fd`: in userfaultfd 0.9 it lets `Drop` run and so
/// closes the descriptor it returns.
pub fn owned_from_uffd(uffd: userfaultfd::Uffd) -> OwnedFd {
    let fd = uffd.as_raw_fd();
    std::mem::forget(uffd);
    owned(fd)
}

/// Set `O_NONBLOCK` on a descriptor.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take integer arguments.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) })?;
    Ok(())
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall that created
    // it; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A new userfaultfd from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`).
pub fn open_device(flags: i32) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its argument by value (the flags)
    // and dereferences nothing.
    let fd = cvt(unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) })?;
    Ok(owned(fd))
}

/// A new userfaultfd from the `userfaultfd(2)` system call.
pub fn open_syscall(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes one integer argument.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned(r as RawFd))
}

/// The `UFFDIO_API` handshake: request `features`; returns the features
/// the kernel granted (or, when `features == 0`, all it supports) and the
/// ioctl bitmap.
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<(u64, u64)> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `a` is a live, correctly laid out `uffdio_api` the kernel
    // reads and writes for the duration of the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut a) })?;
    Ok((a.features, a.ioctls))
}

/// `UFFDIO_COPY` of one page from `src` to the registered page `dst`.
/// Returns the raw errno on failure (`EAGAIN`, `EEXIST`, `ENOENT`, ...).
pub fn copy(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: &[u8; PAGE as usize],
    wake: bool,
) -> Result<(), i32> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: PAGE,
        mode: if wake { 0 } else { MODE_DONTWAKE },
        copy: 0,
    };
    // SAFETY: the kernel reads PAGE bytes from `src`, a live buffer of that
    // size, and writes into `dst` only if it lies in a range registered on
    // this userfaultfd, where it installs a new page (it never overwrites a
    // present one: EEXIST); no Rust object is aliased by that page except
    // through the volatile/atomic accessors of this module. `c` is live.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn range_op(fd: BorrowedFd<'_>, req: u64, start: u64, len: u64, wake: bool) -> Result<(), i32> {
    let mut z = UffdioRangeOp {
        range: UffdioRange { start, len },
        mode: if wake { 0 } else { MODE_DONTWAKE },
        result: 0,
    };
    // SAFETY: `z` is a live struct with the layout shared by
    // uffdio_zeropage/continue/poison; the kernel only maps pages into
    // ranges registered on this userfaultfd (and validates them).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut z) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `UFFDIO_ZEROPAGE` over `[start, start + len)`.
pub fn zeropage(fd: BorrowedFd<'_>, start: u64, len: u64, wake: bool) -> Result<(), i32> {
    range_op(fd, UFFDIO_ZEROPAGE, start, len, wake)
}

/// `UFFDIO_CONTINUE` (map the page-cache page) over `[start, start + len)`.
pub fn cont(fd: BorrowedFd<'_>, start: u64, len: u64, wake: bool) -> Result<(), i32> {
    range_op(fd, UFFDIO_CONTINUE, start, len, wake)
}

/// `UFFDIO_POISON` over `[start, start + len)`: later accesses get SIGBUS.
pub fn poison(fd: BorrowedFd<'_>, start: u64, len: u64, wake: bool) -> Result<(), i32> {
    range_op(fd, UFFDIO_POISON, start, len, wake)
}

/// `UFFDIO_WAKE` over `[start, start + len)`.
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), i32> {
    let mut r = UffdioRange { start, len };
    // SAFETY: `r` is a live uffdio_range; WAKE only wakes waiters.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// `UFFDIO_WRITEPROTECT`: protect (`wp`) or unprotect `[start, start + len)`.
pub fn writeprotect(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    wp: bool,
    wake: bool,
) -> Result<(), i32> {
    let mode = if wp {
        UFFDIO_WRITEPROTECT_MODE_WP
    } else if wake {
        0
    } else {
        2 // UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    };
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    // SAFETY: `w` is a live uffdio_writeprotect; the kernel changes only
    // PTE permissions of registered ranges.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut w) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// eventfd and poll, for the handler thread's stop signal.

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Add one to an eventfd.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Reset an eventfd to zero.
pub fn eventfd_clear(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 (non-blocking fd).
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// `poll(2)` two fds for input; returns which are readable (or hung up).
pub fn poll2(a: BorrowedFd<'_>, b: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(e);
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// Send `sig` to thread `tid` of this process (`tgkill`).
pub fn tgkill(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid() as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Owned mappings.

/// Advice for [`Region::madvise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: zap the pages (anonymous private: zero on next touch).
    DontNeed,
    /// `MADV_FREE`: free lazily.
    Free,
    /// `MADV_REMOVE`: punch a hole in the shared backing (memfd/shmem).
    Remove,
}

/// An owned `mmap` of anonymous or memfd memory, with a per-page record of
/// which pages are still mapped, so that every access through it is
/// checked and safe. Its bytes are never Rust objects: they are read and
/// written only with atomic byte/word accesses.
pub struct Region {
    /// Base address; changes only on `mremap_move` (under `&mut self`).
    addr: u64,
    len: u64,
    /// Bit per page: still mapped by this region.
    mapped: RwLock<Vec<u64>>,
    /// The memfd behind a shared region.
    file: Option<std::sync::Arc<File>>,
}

// SAFETY: the region's memory is accessed only atomically; the bookkeeping
// is behind a mutex.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

fn mmap_raw(addr: u64, len: u64, prot: i32, flags: i32, fd: RawFd) -> io::Result<u64> {
    // SAFETY: without MAP_FIXED the kernel picks a fresh address range and
    // no existing object is affected; MAP_FIXED_NOREPLACE never replaces a
    // mapping. Callers passing MAP_FIXED target only pages of a region that
    // are mapped and owned by it (checked by the caller).
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len as usize, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as u64)
    }
}

impl Region {
    fn new(addr: u64, len: u64, file: Option<std::sync::Arc<File>>) -> Self {
        let pages = (len / PAGE) as usize;
        let mut bits = vec![u64::MAX; pages.div_ceil(64)];
        if pages % 64 != 0 {
            *bits.last_mut().expect("non-empty") = (1u64 << (pages % 64)) - 1;
        }
        Self {
            addr,
            len,
            mapped: RwLock::new(bits),
            file,
        }
    }

    /// Fresh anonymous private read-write memory of `len` bytes (a multiple
    /// of the page size).
    pub fn anon(len: u64) -> io::Result<Self> {
        check_len(len)?;
        let a = mmap_raw(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        Ok(Self::new(a, len, None))
    }

    /// A new memfd of `len` bytes, mapped shared read-write.
    pub fn memfd(len: u64) -> io::Result<Self> {
        check_len(len)?;
        // SAFETY: the name is a valid NUL-terminated string.
        let fd = cvt(unsafe { libc::memfd_create(c"notifier-uffd".as_ptr(), libc::MFD_CLOEXEC) })?;
        let file = File::from(owned(fd));
        file.set_len(len)?;
        let a = mmap_raw(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
        )?;
        Ok(Self::new(a, len, Some(std::sync::Arc::new(file))))
    }

    /// A second shared mapping of the same memfd (for populating the page
    /// cache behind a MINOR-registered mapping).
    pub fn alias(&self) -> io::Result<Self> {
        let file = self
            .file
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let a = mmap_raw(
            0,
            self.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
        )?;
        Ok(Self::new(a, self.len, Some(file)))
    }

    /// Base address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty (never: regions are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every page of `[off, off + len)` is still mapped.
    fn all_mapped(bits: &[u64], off: u64, len: u64) -> bool {
        (off / PAGE..(off + len).div_ceil(PAGE))
            .all(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len && len > 0 => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn check_mapped(&self, bits: &[u64], off: u64, len: u64) -> io::Result<()> {
        self.check(off, len)?;
        if Self::all_mapped(bits, off, len) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EFAULT))
        }
    }

    /// Read bytes at `off` (each byte an atomic load; faults in missing
    /// pages, which a userfaultfd handler may have to serve).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, off, buf.len() as u64)?;
        let base = self.addr + off;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: the byte lies in a page of this region that is still
            // mapped (checked under the read lock; unmap takes the write lock); region
            // memory is only accessed atomically.
            *b =
                unsafe { AtomicU8::from_ptr((base + i as u64) as *mut u8) }.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Write bytes at `off` (each byte an atomic store).
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, off, data.len() as u64)?;
        let base = self.addr + off;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { AtomicU8::from_ptr((base + i as u64) as *mut u8) }
                .store(*b, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Read one byte (see [`Region::read`]).
    pub fn read_u8(&self, off: u64) -> io::Result<u8> {
        let mut b = [0u8];
        self.read(off, &mut b)?;
        Ok(b[0])
    }

    /// Touch the page at `off`: an atomic load, or for `write` an atomic
    /// add of zero (a write that changes nothing), so the page is populated
    /// (and, for a write, write-enabled) when it returns.
    pub fn touch(&self, off: u64, write: bool) -> io::Result<u8> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, off, 1)?;
        // SAFETY: as in `read`.
        let a = unsafe { AtomicU8::from_ptr((self.addr + off) as *mut u8) };
        Ok(if write {
            a.fetch_add(0, Ordering::Relaxed)
        } else {
            a.load(Ordering::Relaxed)
        })
    }

    /// `read(2)` from `file` into `[off, off + len)`: the kernel itself
    /// writes the bytes, so a missing page is a kernel-mode fault (served
    /// only with a device-opened userfaultfd; EFAULT otherwise or when the
    /// page cannot be served).
    pub fn read_from(&self, off: u64, len: u64, file: &File) -> io::Result<usize> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, off, len)?;
        // SAFETY: the destination lies inside this region's mapped pages,
        // which hold no Rust object; the kernel validates and writes them.
        let r = unsafe {
            libc::read(
                file.as_raw_fd(),
                (self.addr + off) as *mut libc::c_void,
                len as usize,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// `madvise` over `[off, off + len)`.
    pub fn madvise(&self, off: u64, len: u64, advice: Advice) -> io::Result<()> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, off, len)?;
        let adv = match advice {
            Advice::DontNeed => libc::MADV_DONTNEED,
            Advice::Free => libc::MADV_FREE,
            Advice::Remove => libc::MADV_REMOVE,
        };
        // SAFETY: the range lies inside this region's mapped pages, which no
        // Rust object occupies; the advice only drops page contents.
        cvt(unsafe { libc::madvise((self.addr + off) as *mut libc::c_void, len as usize, adv) })?;
        Ok(())
    }

    /// `munmap` `[off, off + len)` (page aligned); later accesses there fail
    /// with `EFAULT` instead of faulting. Only the pages this region still
    /// maps are unmapped: a hole it left earlier may hold another mapping
    /// by now, which must survive.
    pub fn munmap(&self, off: u64, len: u64) -> io::Result<()> {
        let mut bits = self.mapped.write();
        self.check(off, len)?;
        if off % PAGE != 0 || len % PAGE != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let is_mapped = |bits: &[u64], p: u64| bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
        let (mut p, end) = (off / PAGE, (off + len) / PAGE);
        while p < end {
            if !is_mapped(&bits, p) {
                p += 1;
                continue;
            }
            let s = p;
            while p < end && is_mapped(&bits, p) {
                p += 1;
            }
            let (a, n) = (self.addr + s * PAGE, (p - s) * PAGE);
            // SAFETY: a run of pages this region still maps (checked),
            // whose memory holds no Rust object.
            cvt(unsafe { libc::munmap(a as *mut libc::c_void, n as usize) })?;
            for x in s..p {
                bits[(x / 64) as usize] &= !(1 << (x % 64));
            }
        }
        Ok(())
    }

    /// Map fresh anonymous memory over `[off, off + len)`: `MAP_FIXED` over
    /// the pages still mapped (the kernel unmaps the old ones first), and
    /// `MAP_FIXED_NOREPLACE` into the holes this region's [`Self::munmap`]
    /// left, which another thread may have mapped since: then this fails
    /// with `EEXIST` instead of destroying that thread's memory (a process
    /// that unmaps and maps back must keep its other threads from mapping
    /// into the hole meanwhile).
    pub fn map_fixed_over(&self, off: u64, len: u64) -> io::Result<()> {
        let mut bits = self.mapped.write();
        self.check(off, len)?;
        let is_mapped = |bits: &[u64], p: u64| bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
        let (first, end) = (off / PAGE, (off + len).div_ceil(PAGE));
        // Runs of pages that are all mapped or all holes; the holes first,
        // so a taken hole fails the call before any old page is replaced.
        let mut runs = Vec::new();
        let mut p = first;
        while p < end {
            let here = is_mapped(&bits, p);
            let mut q = p + 1;
            while q < end && is_mapped(&bits, q) == here {
                q += 1;
            }
            runs.push((here, p, q));
            p = q;
        }
        runs.sort_by_key(|r| r.0);
        for (here, p, q) in runs {
            let (at, n) = (self.addr + p * PAGE, (q - p) * PAGE);
            let fixed = if here {
                libc::MAP_FIXED
            } else {
                libc::MAP_FIXED_NOREPLACE
            };
            let got = mmap_raw(
                at,
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
                -1,
            )?;
            if got != at {
                // A kernel before 4.17 takes NOREPLACE as a hint.
                // SAFETY: the mapping just made elsewhere, referenced by nobody.
                unsafe { libc::munmap(got as *mut libc::c_void, n as usize) };
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            for x in p..q {
                bits[(x / 64) as usize] |= 1 << (x % 64);
            }
        }
        Ok(())
    }

    /// Move the whole region to a new address with `mremap(MREMAP_MAYMOVE |
    /// MREMAP_FIXED)`; returns the new base address.
    pub fn mremap_move(&mut self) -> io::Result<u64> {
        let bits = self.mapped.read();
        self.check_mapped(&bits, 0, self.len)?;
        drop(bits);
        // Reserve a destination so the move surely changes address.
        let dst = mmap_raw(
            0,
            self.len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )?;
        // SAFETY: the source is this whole region (all pages mapped, no Rust
        // object inside); the destination is the reservation just made.
        let p = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                self.len as usize,
                self.len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: `dst` is our own reservation.
            unsafe { libc::munmap(dst as *mut libc::c_void, self.len as usize) };
            return Err(e);
        }
        self.addr = p as u64;
        Ok(self.addr)
    }
}

fn check_len(len: u64) -> io::Result<()> {
    if len == 0 || len % PAGE != 0 {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let bits = self.mapped.get_mut();
        let pages = self.len / PAGE;
        let mut p = 0;
        while p < pages {
            if bits[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                p += 1;
                continue;
            }
            let s = p;
            while p < pages && bits[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                p += 1;
            }
            // SAFETY: a run of pages this region still maps.
            unsafe {
                libc::munmap(
                    (self.addr + s * PAGE) as *mut libc::c_void,
                    ((p - s) * PAGE) as usize,
                )
            };
        }
    }
}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("shared", &self.file.is_some())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Processes (tests and the privilege-dropping helper).

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

/// `fork(2)`; in the child run `f` and `_exit` with its result (127 if it
/// panics); in the parent wait for the child and return how it ended.
///
/// The child is a copy of a possibly multi-threaded process: `f` should
/// avoid locks other threads may have held at the fork.
pub fn run_in_child(f: impl FnOnce() -> i32) -> io::Result<ChildExit> {
    // SAFETY: fork has no memory-safety preconditions; the child only runs
    // `f` and then `_exit`s without running destructors or atexit handlers.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(127);
        // SAFETY: terminates the child immediately.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live c_int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(ChildExit::Signaled(libc::WTERMSIG(status)))
    } else {
        Ok(ChildExit::Exited(libc::WEXITSTATUS(status)))
    }
}

/// Drop to `uid`/`gid` for good (`setgroups([])`, `setresgid`, `setresuid`).
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups with an empty list dereferences nothing.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })?;
    Ok(())
}

/// The effective user id.
pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Peak resident set size of this process in KiB (`VmHWM`).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root cause of the stress runs' registry corruption (issue 15):
    /// a munmap over a range with a hole unmapped whatever another thread
    /// had mapped into the hole (there, a registration cache's hash).
    #[test]
    fn munmap_over_a_hole_never_unmaps_what_another_thread_put_there() {
        let r = Region::anon(4 * PAGE).unwrap();
        r.munmap(PAGE, PAGE).unwrap();
        let theirs = mmap_raw(
            r.addr() + PAGE,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
        )
        .unwrap();
        assert_eq!(theirs, r.addr() + PAGE);
        // SAFETY: the page just mapped above, owned by this test.
        unsafe { (theirs as *mut u8).write(0x5a) };
        r.munmap(0, 4 * PAGE).unwrap();
        // Their page is still mapped (mincore fails with ENOMEM on a hole).
        let mut vec = [0u8; 1];
        // SAFETY: mincore only reads the page tables of that range.
        let rc =
            unsafe { libc::mincore(theirs as *mut libc::c_void, PAGE as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "their mapping was unmapped");
        // SAFETY: their page, still mapped (checked above).
        assert_eq!(unsafe { (theirs as *const u8).read() }, 0x5a);
        // SAFETY: their mapping, unused afterwards.
        unsafe { libc::munmap(theirs as *mut libc::c_void, PAGE as usize) };
    }

    #[test]
    fn mapping_back_never_replaces_what_another_thread_put_in_a_hole() {
        let r = Region::anon(4 * PAGE).unwrap();
        r.write(0, b"kept").unwrap();
        r.munmap(PAGE, PAGE).unwrap();
        // Someone else's mapping lands in the hole.
        let theirs = mmap_raw(
            r.addr() + PAGE,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
        )
        .unwrap();
        assert_eq!(theirs, r.addr() + PAGE);
        // SAFETY: the page just mapped above, owned by this test.
        unsafe { (theirs as *mut u8).write(0x5a) };
        let e = r.map_fixed_over(0, 4 * PAGE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        // SAFETY: as above.
        let got = unsafe { (theirs as *const u8).read() };
        assert_eq!(got, 0x5a, "their memory is intact");
        let mut b = [0u8; 4];
        r.read(0, &mut b).unwrap();
        assert_eq!(&b, b"kept", "a failed call replaced nothing");
        // Once they are gone, the hole is mapped back and the rest renewed.
        // SAFETY: their mapping, unused afterwards.
        unsafe { libc::munmap(theirs as *mut libc::c_void, PAGE as usize) };
        r.map_fixed_over(0, 4 * PAGE).unwrap();
        let mut b = [1u8; 4];
        r.read(0, &mut b).unwrap();
        assert_eq!(b, [0; 4], "fresh memory over the whole range");
        r.read(PAGE, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
