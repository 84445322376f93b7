//! The only `unsafe` code of the crate: memfd, the mappings built on it,
//! word access through a mapping, the VA reservations KVM reads guest
//! memory through, and the memslot ioctls that hand those reservations to
//! KVM.
//!
//! Two mapping types keep the unsafe surface small and sound:
//!
//! - [`SharedMap`]: a `MAP_SHARED` mapping of a whole memfd. It is always
//!   accessible (never punched), so Rust code may read and write it, but
//!   only through atomics and volatile copies (KVM, other threads and other
//!   mappings of the same pages write it concurrently).
//! - [`Reservation`]: a VA range owned by the crate whose pages are either
//!   memfd pages mapped `MAP_FIXED` or `PROT_NONE` holes. Rust code never
//!   dereferences it; only the kernel (KVM) does. A [`UserMemslot`] holds an
//!   `Arc` of its reservation, so the VA range outlives the slot.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Create a memfd of `len` bytes.
pub(crate) fn memfd_create(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on an fd we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    Ok(fd)
}

fn mmap(
    addr: usize,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    off: u64,
) -> io::Result<usize> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: callers pass either addr 0 (the kernel picks a fresh range)
    // or, with MAP_FIXED, a range inside a mapping this module owns, so no
    // memory Rust code holds references into is replaced.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as usize)
    }
}

fn bounds(off: usize, len: usize, total: usize) -> io::Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= total && off % 4096 == 0 && len % 4096 == 0 && len > 0 => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// A `MAP_SHARED`, read-write mapping of a whole memfd, accessed only
/// through atomics and volatile copies.
#[derive(Debug)]
pub(crate) struct SharedMap {
    base: usize,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// atomics or volatile copies, which are fine from any thread.
unsafe impl Send for SharedMap {}
// SAFETY: as above; `&SharedMap` hands out no references to plain data.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Map `len` bytes of `fd` from offset 0.
    pub(crate) fn new(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        let base = mmap(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )?;
        Ok(Self { base, len })
    }

    /// The word at byte offset `off`. Panics on a misaligned or
    /// out-of-range offset (callers check first).
    #[inline]
    pub(crate) fn word(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "word offset {off:#x} out of the mapping"
        );
        // SAFETY: in bounds and 8-aligned (the base is page aligned); the
        // mapping lives as long as `self` and is never unmapped or punched
        // while `self` exists; AtomicU64 tolerates concurrent writers.
        unsafe { &*((self.base + off) as *const AtomicU64) }
    }

    /// Volatile copy out of the mapping.
    pub(crate) fn read(&self, off: usize, buf: &mut [u8]) {
        self.slice(off, buf.len()).copy_to(buf);
    }

    /// Volatile copy into the mapping.
    pub(crate) fn write(&self, off: usize, data: &[u8]) {
        self.slice(off, data.len()).copy_from(data);
    }

    /// A volatile slice of `[off, off + len)`. Panics when out of range.
    pub(crate) fn slice(&self, off: usize, len: usize) -> vm_memory::VolatileSlice<'_> {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "slice out of the mapping"
        );
        // SAFETY: the range is inside the mapping, which stays mapped and
        // accessible for the lifetime `'_` of the borrow of `self`;
        // VolatileSlice only does volatile accesses.
        unsafe { vm_memory::VolatileSlice::new((self.base + off) as *mut u8, len) }
    }

    /// Host address of byte `off` (for diagnostics and KVM hva arithmetic).
    pub(crate) fn addr(&self, off: usize) -> u64 {
        (self.base + off) as u64
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A reserved VA range whose pages are memfd pages or `PROT_NONE` holes.
/// Only the kernel dereferences it.
#[derive(Debug)]
pub(crate) struct Reservation {
    base: usize,
    len: usize,
}

// SAFETY: Rust code never dereferences the range; the methods only make
// syscalls on it, which are thread safe.
unsafe impl Send for Reservation {}
// SAFETY: as above.
unsafe impl Sync for Reservation {}

const HOLE_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

impl Reservation {
    /// Reserve `len` bytes, all holes.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        if len == 0 || len % 4096 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let base = mmap(0, len, libc::PROT_NONE, HOLE_FLAGS, -1, 0)?;
        Ok(Self { base, len })
    }

    /// First host address.
    pub(crate) fn addr(&self) -> u64 {
        self.base as u64
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Map `len` bytes of `fd` at `file_off` over `[off, off + len)`,
    /// read-write or read-only (one `mmap(MAP_FIXED | MAP_SHARED)`).
    pub(crate) fn map(
        &self,
        off: usize,
        len: usize,
        fd: &OwnedFd,
        file_off: u64,
        writable: bool,
    ) -> io::Result<()> {
        bounds(off, len, self.len)?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        mmap(
            self.base + off,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            file_off,
        )
        .map(drop)
    }

    /// Turn `[off, off + len)` back into holes (one `mmap(MAP_FIXED)` of
    /// anonymous `PROT_NONE` memory, which atomically replaces the pages).
    pub(crate) fn punch(&self, off: usize, len: usize) -> io::Result<()> {
        bounds(off, len, self.len)?;
        mmap(
            self.base + off,
            len,
            libc::PROT_NONE,
            HOLE_FLAGS | libc::MAP_FIXED,
            -1,
            0,
        )
        .map(drop)
    }

    /// Make mapped pages in `[off, off + len)` read-only (`mprotect`).
    pub(crate) fn write_protect(&self, off: usize, len: usize) -> io::Result<()> {
        bounds(off, len, self.len)?;
        // SAFETY: the range is inside our reservation, which Rust code never
        // dereferences, so no reference is invalidated.
        check(unsafe {
            libc::mprotect((self.base + off) as *mut libc::c_void, len, libc::PROT_READ)
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own range; every memslot over it holds an Arc of it, so
        // KVM no longer refers to it when the last Arc goes.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// One KVM memslot over a [`Reservation`]: added on creation, deleted on
/// drop. Holding the reservation's `Arc` keeps the VA range alive while
/// KVM may access it.
#[derive(Debug)]
pub(crate) struct UserMemslot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    view: Arc<Reservation>,
}

fn set_region(vm: &VmFd, region: kvm_userspace_memory_region) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the region is either a deletion (size 0) or covers exactly a
    // `Reservation` that the resulting `UserMemslot` keeps alive until the
    // slot is deleted again (see `Drop`), so KVM never accesses memory it
    // does not own.
    unsafe { vm.set_user_memory_region(region) }
}

impl UserMemslot {
    /// Add slot `slot` mapping guest-physical `gpa` to the whole `view`.
    pub(crate) fn add(
        vm: &Arc<VmFd>,
        slot: u32,
        gpa: u64,
        view: Arc<Reservation>,
        flags: u32,
    ) -> Result<Self, kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: view.len() as u64,
            userspace_addr: view.addr(),
        };
        set_region(vm, region)?;
        Ok(Self {
            vm: vm.clone(),
            region,
            view,
        })
    }

    /// Slot id.
    pub(crate) fn slot(&self) -> u32 {
        self.region.slot
    }

    /// Guest-physical base.
    pub(crate) fn gpa(&self) -> u64 {
        self.region.guest_phys_addr
    }

    /// Flags (`KVM_MEM_LOG_DIRTY_PAGES`, ...).
    pub(crate) fn flags(&self) -> u32 {
        self.region.flags
    }

    /// Change the slot in place (a move or a flags change, which KVM
    /// supports without deletion). On error nothing changed.
    pub(crate) fn modify(&mut self, gpa: u64, flags: u32) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            guest_phys_addr: gpa,
            flags,
            ..self.region
        };
        set_region(&self.vm, region)?;
        self.region = region;
        Ok(())
    }

    /// Replace the slot by one of the same id over `view` at `gpa` (delete
    /// then add, for size changes KVM cannot do in place). On error the
    /// old slot is re-added, so the layout is unchanged.
    pub(crate) fn replace(
        &mut self,
        gpa: u64,
        view: Arc<Reservation>,
        flags: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        set_region(
            &self.vm,
            kvm_userspace_memory_region {
                memory_size: 0,
                ..self.region
            },
        )?;
        let region = kvm_userspace_memory_region {
            slot: self.region.slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: view.len() as u64,
            userspace_addr: view.addr(),
        };
        match set_region(&self.vm, region) {
            Ok(()) => {
                self.region = region;
                self.view = view;
                Ok(())
            }
            Err(e) => {
                if set_region(&self.vm, self.region).is_err() {
                    // Cannot restore: the slot is gone, so KVM no longer
                    // refers to the old view; record the slot as empty.
                    self.region.memory_size = 0;
                }
                Err(e)
            }
        }
    }

    /// Whether the slot exists in KVM (false only after a failed restore).
    pub(crate) fn is_live(&self) -> bool {
        self.region.memory_size != 0
    }

    /// `KVM_GET_DIRTY_LOG`: one bit per page, cleared by the read.
    pub(crate) fn dirty_log(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.vm
            .get_dirty_log(self.region.slot, self.region.memory_size as usize)
    }
}

impl Drop for UserMemslot {
    fn drop(&mut self) {
        if !self.is_live() {
            return;
        }
        if set_region(
            &self.vm,
            kvm_userspace_memory_region {
                memory_size: 0,
                ..self.region
            },
        )
        .is_err()
        {
            // KVM may still read the view: keep it mapped forever rather
            // than let the VA range be reused under a live slot.
            std::mem::forget(self.view.clone());
        }
    }
}

// ---------------------------------------------------------------------------
// userfaultfd, for the raw demand-paging baseline only (x86_64 ioctl numbers).

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// One private anonymous page registered with a userfaultfd for missing
/// faults, and a source page to copy in: the raw demand-paging baseline.
#[derive(Debug)]
pub(crate) struct UffdPage {
    fd: OwnedFd,
    page: usize,
    src: usize,
}

// SAFETY: the two pages are owned by this value and only touched through
// volatile reads, `madvise` and the kernel's UFFDIO_COPY, all thread safe.
unsafe impl Send for UffdPage {}
// SAFETY: as above.
unsafe impl Sync for UffdPage {}

impl UffdPage {
    /// Create the userfaultfd and the two pages; register the target page.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with flags only.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the `UffdioApi` we pass, which
        // lives across the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) })?;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let page = mmap(0, 4096, rw, anon, -1, 0)?;
        let src = mmap(0, 4096, rw, anon, -1, 0)?;
        let this = Self { fd, page, src };
        let mut reg = UffdioRegister {
            start: page as u64,
            len: 4096,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes `reg`; the range is our
        // own mapping.
        check(unsafe { libc::ioctl(this.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) })?;
        Ok(this)
    }

    /// Drop the target page (`MADV_DONTNEED`): the next touch faults.
    pub(crate) fn reset(&self) -> io::Result<()> {
        // SAFETY: our own mapping; no Rust reference points into it.
        check(unsafe { libc::madvise(self.page as *mut libc::c_void, 4096, libc::MADV_DONTNEED) })
    }

    /// Read the target page's first byte (blocks while a handler serves the
    /// fault).
    pub(crate) fn touch(&self) -> u8 {
        // SAFETY: the page is mapped for our lifetime; a missing page is
        // filled by the handler (UFFDIO_COPY) before the read completes.
        unsafe { std::ptr::read_volatile(self.page as *const u8) }
    }

    /// Wait up to `timeout_ms` for a fault and serve it with UFFDIO_COPY of
    /// the source page. Returns whether one was served.
    pub(crate) fn serve_one(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n <= 0 {
            return if n == 0 {
                Ok(false)
            } else {
                Err(io::Error::last_os_error())
            };
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into our buffer.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if r != 32 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(false);
        }
        let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes")) & !0xfff;
        let mut copy = UffdioCopy {
            dst: addr,
            src: self.src as u64,
            len: 4096,
            mode: 0,
            copy: 0,
        };
        // SAFETY: copies our source page into the registered page the
        // kernel reported; `copy` lives across the call.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut copy) })?;
        Ok(true)
    }
}

impl Drop for UffdPage {
    fn drop(&mut self) {
        // SAFETY: our own mappings; nothing refers to them any more.
        unsafe {
            libc::munmap(self.page as *mut libc::c_void, 4096);
            libc::munmap(self.src as *mut libc::c_void, 4096);
        }
    }
}
