//! The second thin unsafe layer: memory accesses that never fault in this
//! process (`process_vm_readv` / `process_vm_writev` on ourselves), the
//! kernel's populate advice, and closing a descriptor in place. Every
//! block has its `// SAFETY:` argument.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Read the 8 bytes at `addr` of this process through the kernel
/// (`process_vm_readv`): a page that is not mapped gives `EFAULT` instead
/// of SIGSEGV; a page not yet populated is faulted in by the kernel (as a
/// device's ODP fault would be), through the userfaultfd handler when the
/// range is registered for MISSING faults.
pub(crate) fn read_word(addr: u64) -> Result<u64, i32> {
    let mut v: u64 = 0;
    let local = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` describes a live u64 of ours; the remote side is
    // only read by the kernel, which checks it and reports EFAULT.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    match n {
        8 => Ok(v),
        n if n < 0 => Err(errno()),
        _ => Err(libc::EFAULT),
    }
}

/// Write the 8 bytes at `addr` of this process through the kernel
/// (`process_vm_writev`); as [`read_word`].
pub(crate) fn write_word(addr: u64, val: u64) -> Result<(), i32> {
    let local = libc::iovec {
        iov_base: (&val as *const u64).cast_mut().cast(),
        iov_len: 8,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: 8,
    };
    // SAFETY: `local` describes a live u64 the kernel only reads; the
    // remote side is checked by the kernel (EFAULT when not mapped). It is
    // registered application memory that holds no Rust object.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    match n {
        8 => Ok(()),
        n if n < 0 => Err(errno()),
        _ => Err(libc::EFAULT),
    }
}

/// `MADV_POPULATE_READ` / `MADV_POPULATE_WRITE` over `[addr, addr + len)`:
/// fault the pages in through the kernel (Linux 5.14), without touching
/// their contents; `EFAULT`/`ENOMEM` when part of it is not mapped.
pub(crate) fn populate(addr: u64, len: u64, write: bool) -> Result<(), i32> {
    const MADV_POPULATE_READ: i32 = 22;
    const MADV_POPULATE_WRITE: i32 = 23;
    let adv = if write {
        MADV_POPULATE_WRITE
    } else {
        MADV_POPULATE_READ
    };
    // SAFETY: populating only faults pages in (as an access would); it
    // changes no contents and no mapping.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, adv) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Close the open file behind `fd` while keeping the number valid: the
/// number is pointed at `/dev/null` (`dup3` replaces atomically), so a
/// concurrent user of the number gets errors, never another file.
pub(crate) fn close_in_place(fd: BorrowedFd<'_>) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    let raw: RawFd = fd.as_raw_fd();
    // SAFETY: `dup3` only changes what the descriptor number refers to;
    // the owner of `fd` keeps owning the number (now /dev/null).
    let r = unsafe { libc::dup3(null.as_raw_fd(), raw, libc::O_CLOEXEC) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
