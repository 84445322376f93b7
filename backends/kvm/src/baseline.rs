//! Raw baselines for the benches: the bare syscalls and ioctls the mirror
//! is built from, with no bookkeeping, so a bench can measure them beside
//! the mirror in the same run.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use notifier_core::PAGE_SIZE;

use crate::sys::{Reservation, UserMemslot};
use crate::{KvmError, MemfdFrames};

/// A VA reservation and a slot id for raw memslot ioctls.
#[derive(Debug)]
pub struct RawSlot {
    vm: Arc<VmFd>,
    view: Arc<Reservation>,
    slot: u32,
    gpa: u64,
}

impl RawSlot {
    /// Reserve `len` bytes for slot `slot` at `gpa`.
    ///
    /// # Errors
    /// [`KvmError::Os`] when the reservation fails.
    pub fn new(vm: Arc<VmFd>, slot: u32, gpa: u64, len: u64) -> Result<Self, KvmError> {
        let view = Reservation::new(len as usize).map_err(|e| KvmError::os("reserve", e))?;
        Ok(Self {
            vm,
            view: Arc::new(view),
            slot,
            gpa,
        })
    }

    /// One `KVM_SET_USER_MEMORY_REGION` add and one delete.
    ///
    /// # Errors
    /// KVM's error.
    pub fn add_delete(&self) -> Result<(), KvmError> {
        let s = UserMemslot::add(&self.vm, self.slot, self.gpa, self.view.clone(), 0)
            .map_err(|e| KvmError::kvm("add", e))?;
        drop(s);
        Ok(())
    }

    /// Add the slot and keep it: a handle that moves it in place.
    ///
    /// # Errors
    /// KVM's error.
    pub fn add(&self) -> Result<RawLiveSlot, KvmError> {
        let s = UserMemslot::add(&self.vm, self.slot, self.gpa, self.view.clone(), 0)
            .map_err(|e| KvmError::kvm("add", e))?;
        Ok(RawLiveSlot(s))
    }
}

/// A live raw slot.
#[derive(Debug)]
pub struct RawLiveSlot(UserMemslot);

impl RawLiveSlot {
    /// One `KVM_SET_USER_MEMORY_REGION` that moves the slot to `gpa`.
    ///
    /// # Errors
    /// KVM's error.
    pub fn move_to(&mut self, gpa: u64) -> Result<(), KvmError> {
        let flags = self.0.flags();
        self.0
            .modify(gpa, flags)
            .map_err(|e| KvmError::kvm("move", e))
    }

    /// One `KVM_SET_USER_MEMORY_REGION` that changes the slot's flags in
    /// place (e.g. dirty logging on or off).
    ///
    /// # Errors
    /// KVM's error.
    pub fn set_flags(&mut self, flags: u32) -> Result<(), KvmError> {
        let gpa = self.0.gpa();
        self.0
            .modify(gpa, flags)
            .map_err(|e| KvmError::kvm("set flags", e))
    }
}

/// A VA reservation to map memfd pages into and punch, raw.
#[derive(Debug)]
pub struct RawView {
    view: Reservation,
    frames: Arc<MemfdFrames>,
}

impl RawView {
    /// Reserve `len` bytes.
    ///
    /// # Errors
    /// [`KvmError::Os`].
    pub fn new(len: u64, frames: Arc<MemfdFrames>) -> Result<Self, KvmError> {
        Ok(Self {
            view: Reservation::new(len as usize).map_err(|e| KvmError::os("reserve", e))?,
            frames,
        })
    }

    /// One `mmap(MAP_FIXED | MAP_SHARED)` per page: page `i` of the view
    /// maps memfd page `i`.
    ///
    /// # Errors
    /// [`KvmError::Os`].
    pub fn map_all(&self) -> Result<(), KvmError> {
        for off in (0..self.view.len()).step_by(PAGE_SIZE as usize) {
            self.view
                .map(off, PAGE_SIZE as usize, self.frames.fd(), off as u64, true)
                .map_err(|e| KvmError::os("mmap", e))?;
        }
        Ok(())
    }

    /// One `mmap(MAP_FIXED, PROT_NONE)` over the whole view.
    ///
    /// # Errors
    /// [`KvmError::Os`].
    pub fn punch_all(&self) -> Result<(), KvmError> {
        self.view
            .punch(0, self.view.len())
            .map_err(|e| KvmError::os("punch", e))
    }
}

/// The raw userfaultfd demand-paging round trip: a page registered for
/// missing faults, a helper thread that serves each fault with one
/// `UFFDIO_COPY`, and the faulting thread that resets the page
/// (`MADV_DONTNEED`) and touches it.
#[derive(Debug)]
pub struct UffdCopy {
    page: Arc<crate::sys::UffdPage>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    helper: Option<std::thread::JoinHandle<()>>,
}

impl UffdCopy {
    /// Set up the page and start the helper thread.
    ///
    /// # Errors
    /// [`KvmError::Os`] when userfaultfd is unavailable (or not permitted).
    pub fn new() -> Result<Self, KvmError> {
        let page =
            Arc::new(crate::sys::UffdPage::new().map_err(|e| KvmError::os("userfaultfd", e))?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (page.clone(), stop.clone());
        let helper = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if p.serve_one(50).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            page,
            stop,
            helper: Some(helper),
        })
    }

    /// `MADV_DONTNEED` the page (the next touch faults).
    ///
    /// # Errors
    /// [`KvmError::Os`].
    pub fn reset(&self) -> Result<(), KvmError> {
        self.page.reset().map_err(|e| KvmError::os("madvise", e))
    }

    /// Touch the page: a fault served by the helper's `UFFDIO_COPY` when it
    /// was reset.
    pub fn touch(&self) -> u8 {
        self.page.touch()
    }
}

impl Drop for UffdCopy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.helper.take() {
            let _ = h.join();
        }
    }
}
