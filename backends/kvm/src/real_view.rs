//! [`GuestView`]: device emulation's view of a [`crate::RealGuestMemory`],
//! vm-memory's [`GuestMemory`] (and so, through vm-memory's blanket impl,
//! `Bytes<GuestAddress>`: `read_obj`, `write_slice`, `read_volatile_from`,
//! atomics ...), versioned like `GuestMemoryAtomic`.
//!
//! # What an access checks, in order
//!
//! 1. The event gate: every userfaultfd event the monitor has read
//!    (REMOVE, UNMAP, REMAP) has been applied, so an access ordered after
//!    a `munmap` or `madvise` that returned sees its effect.
//! 2. The generation, under the layout's read lock: a view of an older
//!    layout is refused ([`KvmError::StaleView`] inside vm-memory's
//!    `IOError`); [`GuestView::refresh`] moves it to the current layout.
//!    The lock is held until the access ends, so a layout change waits for
//!    accesses in flight and no access straddles two layouts.
//! 3. Per region: the RAM is not gone (unmapped behind the VMM's back);
//!    the slice is handed out under the RAM's read lock, which `mremap`
//!    excludes.
//!
//! # Limit
//! As with every vm-memory backend, a `VolatileSlice` kept after its
//! iterator moved on is not protected.

use std::iter::FusedIterator;
use std::sync::Arc;

use parking_lot::RwLockReadGuard;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{Error as GmError, GuestMemorySliceIterator, Result as GmResult};
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};

use crate::real::{Layout, Shared};
use crate::sys_ram::RamGuard;
use crate::KvmError;

/// A device-emulation view of one layout of a [`crate::RealGuestMemory`]
/// (see the module docs). Cheap to clone and to refresh.
#[derive(Clone)]
pub struct GuestView {
    shared: Arc<Shared>,
    layout: Arc<Layout>,
}

impl core::fmt::Debug for GuestView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuestView")
            .field("generation", &self.layout.gen)
            .finish_non_exhaustive()
    }
}

impl GuestView {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let layout = shared.layout.read().clone();
        Self { shared, layout }
    }

    /// The layout this view serves.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The generation of that layout.
    pub fn generation(&self) -> u64 {
        self.layout.gen
    }

    /// Whether the view's layout is still the current one.
    pub fn is_current(&self) -> bool {
        self.shared.layout.read().gen == self.layout.gen
    }

    /// Move the view to the current layout; returns whether it changed.
    pub fn refresh(&mut self) -> bool {
        let cur = self.shared.layout.read().clone();
        let changed = cur.gen != self.layout.gen;
        self.layout = cur;
        changed
    }

    /// Steps 1 and 2 of the module docs: the layout guard, or the refusal.
    fn enter(&self) -> Result<RwLockReadGuard<'_, Arc<Layout>>, KvmError> {
        self.shared.notifiers.event_gate().wait_applied();
        let l = self.shared.layout.read();
        if l.gen != self.layout.gen {
            return Err(KvmError::StaleView {
                view: self.layout.gen,
                current: l.gen,
            });
        }
        Ok(l)
    }
}

fn io(e: KvmError) -> GmError {
    GmError::IOError(std::io::Error::other(e))
}

/// The slices of one [`GuestView`] access, each guarded until the next call.
pub struct GuestSlices<'a> {
    view: &'a GuestView,
    _layout: RwLockReadGuard<'a, Arc<Layout>>,
    ram: Option<RamGuard<'a>>,
    addr: u64,
    count: usize,
    write: bool,
}

impl<'a> Iterator for GuestSlices<'a> {
    type Item = GmResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.ram = None;
        if self.count == 0 {
            return None;
        }
        let a = self.addr;
        let Some(r) = self.view.layout.find(a) else {
            self.count = 0;
            return Some(Err(GmError::InvalidGuestAddress(GuestAddress(a))));
        };
        let off = a - r.gpa;
        let n = ((r.len - off) as usize).min(self.count);
        if r.ram.is_gone() {
            self.count = 0;
            return Some(Err(GmError::InvalidGuestAddress(GuestAddress(a))));
        }
        let g = r.ram.map.read();
        let Some(s) = g.slice(off as usize, n) else {
            self.count = 0;
            return Some(Err(GmError::InvalidGuestAddress(GuestAddress(a))));
        };
        if self.write {
            r.mark_dirty(off, n as u64);
        }
        self.ram = Some(g);
        self.addr += n as u64;
        self.count -= n;
        Some(Ok(s))
    }
}

impl FusedIterator for GuestSlices<'_> {}
impl<'a> GuestMemorySliceIterator<'a, ()> for GuestSlices<'a> {}

impl GuestMemory for GuestView {
    /// Never returned ([`GuestMemory::physical_memory`] is `None`): regions
    /// are reached through the versioned access path only.
    type PhysicalMemory = vm_memory::GuestMemoryMmap<()>;
    type Bitmap = ();

    /// Whether the view's regions cover the range (a stale view covers
    /// nothing).
    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        if !self.is_current() {
            return false;
        }
        let mut a = addr.0;
        let Some(end) = a.checked_add(count as u64) else {
            return false;
        };
        while a < end {
            let Some(r) = self.layout.find(a) else {
                return false;
            };
            a = (r.gpa + r.len).min(end);
        }
        true
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GmResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        let layout = self.enter().map_err(io)?;
        Ok(GuestSlices {
            view: self,
            _layout: layout,
            ram: None,
            addr: addr.0,
            count,
            write: access.has_write(),
        })
    }
}
