//! The `unsafe` code behind guest RAM that the VMM owns (see
//! [`crate::GuestRam`]): the mapping itself (anonymous or memfd, 4 KiB or
//! 2 MiB transparent huge pages), volatile access to it, `madvise`,
//! `mremap`, and the KVM memslots that point at it.
//!
//! # Soundness
//!
//! Guest RAM holds no Rust object: Rust code touches it only through
//! `VolatileSlice`s handed out under [`RamMap`]'s read lock, which the
//! only operations that move or unmap it (`mremap_move`, `Drop`) exclude.
//! KVM dereferences it through a [`RamSlot`], which holds an `Arc` of the
//! map and counts itself in [`RamMap::slots`]: a map with a live slot is
//! never moved or unmapped by this module. What this module cannot stop is
//! another part of the process unmapping the range behind its back (a
//! `munmap` of guest RAM): userfaultfd then reports UNMAP, the owner marks
//! the map [`gone`](RamMap::mark_gone) and no slice is handed out after
//! that; a slice in flight at that very moment faults like a DMA to an
//! unmapped IOVA (the hazard spelled out in `notifier-uffd`'s docs).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use parking_lot::{RwLock, RwLockReadGuard};

/// 2 MiB: the transparent huge page size on x86_64.
pub(crate) const HUGE: usize = 2 << 20;

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn mmap_at(
    addr: usize,
    len: usize,
    flags: libc::c_int,
    fd: libc::c_int,
    prot: libc::c_int,
) -> io::Result<usize> {
    // SAFETY: callers pass addr 0 (the kernel picks a fresh range) or, with
    // MAP_FIXED, a range inside a reservation this module just made and
    // owns, so no memory that Rust code refers to is replaced.
    let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p as usize)
    }
}

/// `munmap` of a range this module owns.
fn unmap(addr: usize, len: usize) {
    if len > 0 {
        // SAFETY: only called on ranges this module mapped and owns, which
        // hold no Rust object and which no live slot refers to.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    }
}

/// A fresh range of `len` bytes aligned to `align`, `PROT_NONE`.
fn reserve_aligned(len: usize, align: usize) -> io::Result<usize> {
    let total = len.checked_add(align).ok_or_else(einval)?;
    let base = mmap_at(
        0,
        total,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        libc::PROT_NONE,
    )?;
    let start = base.next_multiple_of(align);
    unmap(base, start - base);
    unmap(start + len, base + total - (start + len));
    Ok(start)
}

/// Where the map is now, and where it was.
#[derive(Debug)]
pub(crate) struct RamState {
    addr: usize,
    /// Ranges the map left by `mremap_move`, each covered by a fresh
    /// anonymous mapping (a tombstone) until the map is dropped: a slice
    /// handed out before the move stays valid memory for its lifetime.
    tombstones: Vec<usize>,
}

/// One mapping of guest RAM, owned by this module.
#[derive(Debug)]
pub(crate) struct RamMap {
    state: RwLock<RamState>,
    len: usize,
    fd: Option<OwnedFd>,
    /// Live KVM memslots over the map: it is never moved while one exists.
    slots: AtomicU32,
    /// The range was unmapped behind our back (userfaultfd UNMAP / REMAP).
    gone: AtomicBool,
}

// SAFETY: the mapping holds no Rust object; every access is volatile
// (through `VolatileSlice`) or a syscall, and the address is behind a lock.
unsafe impl Send for RamMap {}
// SAFETY: as above.
unsafe impl Sync for RamMap {}

/// Advice for [`RamMap::madvise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RamAdvice {
    DontNeed,
    Remove,
    PopulateWrite,
}

impl RamMap {
    /// Map `len` bytes: anonymous private memory, or `fd` shared (a memfd
    /// of at least `len` bytes). With `huge`, the range is 2 MiB aligned
    /// and advised `MADV_HUGEPAGE` (`len` must be a multiple of 2 MiB).
    pub(crate) fn new(len: usize, fd: Option<OwnedFd>, huge: bool) -> io::Result<Self> {
        let align = if huge { HUGE } else { 4096 };
        if len == 0 || len % align != 0 {
            return Err(einval());
        }
        let at = reserve_aligned(len, align)?;
        let (flags, raw) = match &fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        if let Err(e) = mmap_at(at, len, flags | libc::MAP_FIXED, raw, prot) {
            unmap(at, len);
            return Err(e);
        }
        if huge {
            // SAFETY: our own fresh mapping; the advice changes no contents.
            let r =
                cvt(unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_HUGEPAGE) });
            if let Err(e) = r {
                unmap(at, len);
                return Err(e);
            }
        }
        Ok(Self {
            state: RwLock::new(RamState {
                addr: at,
                tombstones: Vec::new(),
            }),
            len,
            fd,
            slots: AtomicU32::new(0),
            gone: AtomicBool::new(false),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// The current host address (it changes only on `mremap_move`).
    pub(crate) fn addr(&self) -> u64 {
        self.state.read().addr as u64
    }

    /// Mark the map as unmapped behind our back: no slice is handed out any
    /// more.
    pub(crate) fn mark_gone(&self) {
        self.gone.store(true, Ordering::Release);
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// The map, read-locked: it neither moves nor goes while the guard lives.
    pub(crate) fn read(&self) -> RamGuard<'_> {
        RamGuard {
            map: self,
            st: self.state.read(),
        }
    }

    /// `madvise` over `[off, off + len)` (page aligned).
    pub(crate) fn madvise(&self, off: usize, len: usize, advice: RamAdvice) -> io::Result<()> {
        let st = self.state.read();
        if self.is_gone() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        bounds(off, len, self.len)?;
        let adv = match advice {
            RamAdvice::DontNeed => libc::MADV_DONTNEED,
            RamAdvice::Remove => libc::MADV_REMOVE,
            RamAdvice::PopulateWrite => libc::MADV_POPULATE_WRITE,
        };
        // SAFETY: inside our mapping, which holds no Rust object; the advice
        // only drops or populates page contents.
        cvt(unsafe { libc::madvise((st.addr + off) as *mut libc::c_void, len, adv) })
    }

    /// Move the whole map to a fresh address (`mremap(MREMAP_MAYMOVE |
    /// MREMAP_FIXED)`, page tables move, bytes do not); returns the new
    /// address. Refused with `EBUSY` while a memslot points at the map.
    pub(crate) fn mremap_move(&self) -> io::Result<u64> {
        let mut st = self.state.write();
        if self.slots.load(Ordering::Acquire) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if self.is_gone() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let align = if st.addr % HUGE == 0 && self.len % HUGE == 0 {
            HUGE
        } else {
            4096
        };
        let dst = reserve_aligned(self.len, align)?;
        // SAFETY: the source is our whole mapping (no Rust object inside, no
        // slot over it, no slice out: we hold the write lock); the
        // destination is the reservation just made.
        let p = unsafe {
            libc::mremap(
                st.addr as *mut libc::c_void,
                self.len,
                self.len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            unmap(dst, self.len);
            return Err(e);
        }
        let old = std::mem::replace(&mut st.addr, p as usize);
        // Cover the range left behind; if another thread mapped there in
        // between, that memory is not ours and we leave it alone.
        if mmap_at(
            old,
            self.len,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            libc::PROT_READ | libc::PROT_WRITE,
        )
        .is_ok_and(|got| got == old)
        {
            st.tombstones.push(old);
        }
        Ok(st.addr as u64)
    }
}

fn bounds(off: usize, len: usize, total: usize) -> io::Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= total && off % 4096 == 0 && len % 4096 == 0 && len > 0 => Ok(()),
        _ => Err(einval()),
    }
}

impl Drop for RamMap {
    fn drop(&mut self) {
        // Every slot holds an Arc of the map, so none is left; after a
        // `gone` the range may already belong to someone else: leave it.
        let gone = self.is_gone();
        let st = self.state.get_mut();
        for &t in &st.tombstones {
            unmap(t, self.len);
        }
        if !gone {
            unmap(st.addr, self.len);
        }
    }
}

/// A read-locked [`RamMap`].
pub(crate) struct RamGuard<'a> {
    map: &'a RamMap,
    st: RwLockReadGuard<'a, RamState>,
}

impl<'a> RamGuard<'a> {
    /// A volatile slice of `[off, off + len)` at the map's current address;
    /// `None` when out of range or when the map is gone. The slice may
    /// outlive the guard (vm-memory's slices cannot carry it): after a move
    /// it reads the tombstone (see [`RamState::tombstones`]).
    pub(crate) fn slice(&self, off: usize, len: usize) -> Option<vm_memory::VolatileSlice<'a>> {
        if self.map.is_gone() || off.checked_add(len)? > self.map.len {
            return None;
        }
        // SAFETY: in bounds of our mapping. This module unmaps no range it
        // ever handed out before the map is dropped (a move leaves a
        // tombstone), and the map outlives `'a`, so the memory stays mapped
        // for the slice's lifetime. It holds no Rust object and
        // `VolatileSlice` only makes volatile accesses. (A `munmap` by other
        // code is the hazard of the module docs; `gone` stops new slices.)
        Some(unsafe { vm_memory::VolatileSlice::new((self.st.addr + off) as *mut u8, len) })
    }
}

/// A KVM memslot over `[off, off + len)` of a [`RamMap`]: added on
/// creation, deleted on drop; the map cannot move while it lives.
#[derive(Debug)]
pub(crate) struct RamSlot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    map: Arc<RamMap>,
}

fn set_region(vm: &VmFd, region: kvm_userspace_memory_region) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: a deletion (size 0), or a range inside a `RamMap` that the
    // `RamSlot` keeps alive and unmoved (its `slots` count) until the slot
    // is deleted again, so KVM only ever accesses memory we own.
    unsafe { vm.set_user_memory_region(region) }
}

impl RamSlot {
    /// Add slot `slot`: guest-physical `gpa` is byte `off` of `map`.
    pub(crate) fn add(
        vm: &Arc<VmFd>,
        slot: u32,
        gpa: u64,
        map: &Arc<RamMap>,
        off: usize,
        len: usize,
        flags: u32,
    ) -> Result<Self, kvm_ioctls::Error> {
        if bounds(off, len, map.len).is_err() {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        // Counted before the ioctl, under the read lock, so a concurrent
        // `mremap_move` either finished before (we use its address) or
        // refuses.
        let st = map.state.read();
        map.slots.fetch_add(1, Ordering::AcqRel);
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: (st.addr + off) as u64,
        };
        drop(st);
        if let Err(e) = set_region(vm, region) {
            map.slots.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(Self {
            vm: vm.clone(),
            region,
            map: map.clone(),
        })
    }

    pub(crate) fn slot(&self) -> u32 {
        self.region.slot
    }

    pub(crate) fn flags(&self) -> u32 {
        self.region.flags
    }

    /// Move the slot or change its flags in place; on error nothing changed.
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

    /// `KVM_GET_DIRTY_LOG`: one bit per page, cleared by the read.
    pub(crate) fn dirty_log(&self) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.vm
            .get_dirty_log(self.region.slot, self.region.memory_size as usize)
    }
}

impl Drop for RamSlot {
    fn drop(&mut self) {
        let del = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        if set_region(&self.vm, del).is_ok() {
            self.map.slots.fetch_sub(1, Ordering::AcqRel);
        } else {
            // KVM may still read the map: keep it mapped and unmoved forever.
            std::mem::forget(self.map.clone());
        }
    }
}
