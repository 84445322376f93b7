//! The primary address space: VMAs, a radix page table and real frames,
//! with the semantics of the seed patches, every PTE change announced to the
//! notifiers.
//!
//! [`Mm`] is the software primary (`struct mm_struct`). Its operations are
//! named after the kernel paths they model: [`Mm::mmap`], [`Mm::munmap`],
//! [`Mm::mprotect`], [`Mm::mremap`], [`Mm::madvise`],
//! [`Mm::remap_file_pages`], [`Mm::insert_pfn`], [`Mm::insert_page`],
//! [`Mm::try_to_unmap`] (reclaim), [`Mm::migrate`], [`Mm::fork`],
//! [`Mm::exit`], and the fault path behind [`Mm::read`], [`Mm::write`] and
//! [`Primary::fault_page`].
//!
//! # Notification discipline
//! Every change that takes something away from a translation (a present
//! PTE cleared, its frame replaced, write permission removed) happens inside
//! an invalidation bracket with the event that says why; the per-PTE
//! `clear` hook runs before each present PTE is cleared; frames that leave
//! the page table are released only after the bracket ends. Installing a
//! PTE where none was, and upgrading permissions, need no bracket.
//!
//! # Locking
//! Locks nest in this order (outer first); nothing is taken out of order:
//!
//! 1. the **mmap lock** (`RwLock<MmState>`): faults, lookups and the CPU
//!    accessors take it shared; layout and PTE-removing operations (mmap,
//!    munmap, mprotect, mremap, madvise, remap_file_pages, insert, reclaim,
//!    migrate, fork, exit, aging) take it exclusive;
//! 2. notifier callbacks run here: invalidation brackets open and close
//!    with the mmap lock held and **no** lower lock held, so a subscriber
//!    may sleep and take its own locks (but must not call back into this
//!    `Mm`);
//! 3. a file's **page-cache** mutex;
//! 4. a **leaf lock** (split PTE lock): the fault path's check-then-install;
//! 5. **page-metadata** shard mutexes and the **swap** mutex (innermost),
//!    then the frame store's own lock.
//!
//! There is no global mutex on the fault path: a fault takes the mmap lock
//! shared, walks the table lock-free, and locks one leaf.

mod error;
mod file;
mod normal_page;
mod page_meta;
mod page_table;
mod pte;
mod vma;

mod age;
mod exit;
mod fault;
mod fork;
mod insert;
mod madvise;
mod migrate;
mod mmap;
mod mprotect;
mod mremap;
mod munmap;
mod reclaim;
mod remap_file_pages;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

pub use error::MmError;
pub use file::{FileObj, FileOptions};
pub use madvise::Advice;
pub use mmap::{Backing, MmapRequest};
pub use mremap::MremapFlags;
pub use normal_page::{vm_normal_page, NormalPage, NormalPageEnv, Row};
pub use page_meta::PageInfo;
pub use page_table::{PageTableMemory, LEAF_SPAN, TASK_SIZE};
pub use pte::{is_invalidating_change, PresentPte, Pte, PTE_FILE_MAX_BITS, PTE_PFN_MAX};
pub use reclaim::ReclaimStats;
pub use remap_file_pages::MAP_NONBLOCK;
pub use vma::{
    PageArray, PagesRef, Prot, SpecialFault, SpecialFaultError, SpecialFaultFn, SpecialMapping,
    SpecialSource, VmFlags, Vma, VmaKind,
};

use page_meta::Memory;
use page_table::PageTable;

use crate::addr::{PageRange, PAGE_MASK};
use crate::frame::{FrameStore, Pfn};
use crate::notifier::{Event, InvalidateRange, Invalidation, NotifierSubscriptions};
use crate::primary::{Primary, PrimaryFault, Translation};
use crate::{PAGE_SHIFT, PAGE_SIZE};

/// How an [`Mm`] is built.
#[derive(Clone, Default)]
pub struct MmConfig {
    /// Whether PTEs carry the special bit (the kernel's `HAVE_PTE_SPECIAL`;
    /// `vm_normal_page` then follows seed 000's path). When false it follows
    /// seed 001's linearity rules. Default: true.
    pub no_pte_special: bool,
    /// Device memory that raw PFNs of PFNMAP/MIXEDMAP mappings read and
    /// write (PFNs this store has are not `pfn_valid` for the primary).
    pub io_memory: Option<Arc<dyn FrameStore>>,
}

/// Lock stripes ordering PTE reports (see `Inject::order`).
const ORDER_STRIPES: usize = 64;

/// One PTE store, reported to the test observer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PteChange {
    /// The page address.
    pub addr: u64,
    /// The raw entry before.
    pub old: u64,
    /// The raw entry after.
    pub new: u64,
    /// The flags of the VMA the entry belongs to, at the time of the store.
    pub vma_flags: VmFlags,
}

/// A PTE-change observer (test switch).
pub type PteObserver = dyn Fn(PteChange) + Send + Sync;

/// Fault-injection and observation **test switches** for the secondary-MMU
/// toolkit's tests. Always compiled; each costs one `Relaxed` load on its
/// path. They deliberately break the notification protocol so that tests
/// can prove an oracle notices.
pub struct Inject {
    /// Release frames that leave the page table *before* the bracket ends
    /// (the use-after-free a correct primary never allows).
    pub free_before_end: AtomicBool,
    /// 0: none; otherwise `1 + index in Event::ALL` of the event whose
    /// brackets are skipped entirely (the PTEs still change).
    skip_event: AtomicU8,
    observing: AtomicBool,
    observer: RwLock<Option<Arc<PteObserver>>>,
    /// PTE stores made but not yet reported to the observer. An observer
    /// that shadows the page table reads it to tell "not reported yet" from
    /// "really different" (the store is published before it is reported).
    pending: Arc<AtomicU64>,
    /// Serialise (store, report) pairs per PTE while observing, so the
    /// reports of one PTE reach the observer in the order of its stores (a
    /// fault's install and a COW break must not be reported in reverse).
    /// Striped by page address.
    order: [parking_lot::Mutex<()>; ORDER_STRIPES],
}

impl core::fmt::Debug for Inject {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Inject")
            .field(
                "free_before_end",
                &self.free_before_end.load(Ordering::Relaxed),
            )
            .field("skip_event", &self.skip_event())
            .finish()
    }
}

impl Inject {
    fn new() -> Self {
        Self {
            free_before_end: AtomicBool::new(false),
            skip_event: AtomicU8::new(0),
            observing: AtomicBool::new(false),
            observer: RwLock::new(None),
            pending: Arc::new(AtomicU64::new(0)),
            order: core::array::from_fn(|_| parking_lot::Mutex::new(())),
        }
    }

    /// The count of PTE stores published but not yet reported to the
    /// observer (incremented before the store, decremented with Release
    /// after the observer returned).
    pub fn pending_reports(&self) -> Arc<AtomicU64> {
        self.pending.clone()
    }

    /// Skip the invalidation bracket of every operation with this event
    /// (test switch); `None` restores correct behaviour.
    pub fn set_skip_event(&self, ev: Option<Event>) {
        let v = ev.map_or(0, |e| {
            1 + Event::ALL.iter().position(|x| *x == e).unwrap_or(0) as u8
        });
        self.skip_event.store(v, Ordering::Relaxed);
    }

    /// The event whose brackets are skipped.
    pub fn skip_event(&self) -> Option<Event> {
        match self.skip_event.load(Ordering::Relaxed) {
            0 => None,
            v => Event::ALL.get(usize::from(v) - 1).copied(),
        }
    }

    /// Set whether frames are released before the bracket ends (test switch).
    pub fn set_free_before_end(&self, on: bool) {
        self.free_before_end.store(on, Ordering::Relaxed);
    }

    /// Call `f` after every PTE store, on the storing thread (test switch:
    /// the recorder that proves every change is bracketed). `None` removes it.
    pub fn set_pte_observer(&self, f: Option<Arc<PteObserver>>) {
        let on = f.is_some();
        *self.observer.write() = f;
        self.observing.store(on, Ordering::Release);
    }
}

/// The state behind the mmap lock.
pub(crate) struct MmState {
    pub(crate) vmas: BTreeMap<u64, Vma>,
    pub(crate) pt: PageTable,
    pub(crate) exited: bool,
}

impl MmState {
    /// The VMA containing `addr` (`find_vma` + containment check).
    #[inline]
    pub(crate) fn vma(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.contains(addr))
    }

    /// The kernel's `find_vma`: the first VMA that ends after `addr`.
    pub(crate) fn find_vma(&self, addr: u64) -> Option<&Vma> {
        if let Some(v) = self.vma(addr) {
            return Some(v);
        }
        self.vmas.range(addr..).next().map(|(_, v)| v)
    }

    /// Whether any VMA overlaps `[start, end)`.
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.vmas
            .range(..end)
            .next_back()
            .is_some_and(|(_, v)| v.end > start)
    }
}

/// The software primary address space (`struct mm_struct`).
///
/// Create it with [`Mm::new`]; share it as an `Arc`. See the module docs
/// for the locking order and the notification discipline.
pub struct Mm {
    pub(crate) mem: Arc<Memory>,
    notifiers: Arc<NotifierSubscriptions>,
    pub(crate) state: RwLock<MmState>,
    pub(crate) pte_special: bool,
    inject: Inject,
}

impl core::fmt::Debug for Mm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let st = self.state.read();
        f.debug_struct("Mm")
            .field("vmas", &st.vmas.len())
            .field("exited", &st.exited)
            .finish()
    }
}

/// An open invalidation bracket of an operation, plus the frames and swap
/// slots to release once it has ended.
///
/// # Pairing
/// Opened by [`Mm::begin`]; ends with [`Bracket::end`] or on drop, and only
/// then releases what was deferred (unless the `free_before_end` switch is
/// on).
pub(crate) struct Bracket<'a> {
    mm: &'a Mm,
    inv: Option<Invalidation<'a>>,
    put: Vec<Pfn>,
}

impl Bracket<'_> {
    /// Seed 003's per-PTE clear: call before clearing the present PTE at `addr`.
    #[inline]
    pub(crate) fn clear(&self, addr: u64) {
        if let Some(inv) = &self.inv {
            inv.clear(addr);
        }
    }

    /// Release a frame reference once the bracket has ended.
    #[inline]
    pub(crate) fn defer_put(&mut self, pfn: Pfn) {
        if self.mm.inject.free_before_end.load(Ordering::Relaxed) {
            self.mm.mem.put_page(pfn);
        } else {
            self.put.push(pfn);
        }
    }

    /// End the bracket, then release.
    ///
    /// # Errors
    /// [`MmError::Notifier`] with
    /// [`NotifierError::SubscriberPanicked`](crate::notifier::NotifierError::SubscriberPanicked)
    /// when a subscriber panicked in a hook of this bracket (`clear`, the
    /// TLB hook or `invalidate_range_end`): the bracket ended and the
    /// frames were released all the same; the operation's change is made.
    pub(crate) fn end(mut self) -> Result<(), MmError> {
        let r = self.inv.take().map_or(Ok(()), Invalidation::try_end);
        self.finish();
        Ok(r?)
    }

    fn finish(&mut self) {
        if let Some(inv) = self.inv.take() {
            inv.end();
        }
        for pfn in self.put.drain(..) {
            self.mm.mem.put_page(pfn);
        }
    }
}

impl Drop for Bracket<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Round `len` up to pages, checked.
pub(crate) fn page_len(len: u64) -> Option<u64> {
    len.checked_add(PAGE_MASK).map(|l| l & !PAGE_MASK)
}

/// Check `[addr, addr + len)` as a user range: aligned start, non-empty,
/// non-wrapping, below [`TASK_SIZE`]. The length is rounded up to pages.
pub(crate) fn user_range(addr: u64, len: u64) -> Result<PageRange, MmError> {
    if addr & PAGE_MASK != 0 {
        return Err(MmError::Misaligned { addr });
    }
    let len = page_len(len).ok_or(MmError::Range(crate::RangeError::Wraps {
        start: addr,
        len,
    }))?;
    let r = PageRange::new(addr, len)?;
    if r.end() > TASK_SIZE {
        return Err(MmError::BeyondTaskSize { addr });
    }
    Ok(r)
}

impl Mm {
    /// A new, empty address space over `frames`, with the default
    /// configuration.
    ///
    /// # Panics
    /// If the store cannot provide the zero page (it has no free frame at
    /// all); use [`Mm::with_config`] to get that as an error.
    pub fn new(frames: Arc<dyn FrameStore>) -> Arc<Mm> {
        Self::with_config(frames, MmConfig::default())
            .expect("the frame store must provide the zero page")
    }

    /// A new, empty address space with a configuration.
    ///
    /// # Errors
    /// [`MmError::OutOfMemory`] when the store has no frame for the zero page.
    pub fn with_config(frames: Arc<dyn FrameStore>, cfg: MmConfig) -> Result<Arc<Mm>, MmError> {
        let mem = Arc::new(Memory::new(frames, cfg.io_memory)?);
        Ok(Self::from_memory(mem, !cfg.no_pte_special))
    }

    pub(crate) fn from_memory(mem: Arc<Memory>, pte_special: bool) -> Arc<Mm> {
        Arc::new(Mm {
            mem,
            notifiers: NotifierSubscriptions::new(),
            state: RwLock::new(MmState {
                vmas: BTreeMap::new(),
                pt: PageTable::new(),
                exited: false,
            }),
            pte_special,
            inject: Inject::new(),
        })
    }

    /// The notifier set of this address space.
    pub fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.notifiers
    }

    /// The fault-injection and observation test switches.
    pub fn inject(&self) -> &Inject {
        &self.inject
    }

    /// The frames behind this address space.
    pub fn frames(&self) -> &Arc<dyn FrameStore> {
        &self.mem.frames
    }

    /// The zero page.
    pub fn zero_pfn(&self) -> Pfn {
        self.mem.zero
    }

    /// Whether PTEs carry the special bit.
    pub fn has_pte_special(&self) -> bool {
        self.pte_special
    }

    /// A new file with a page cache, sharing this address space's frames.
    pub fn create_file(&self, opts: FileOptions) -> Arc<FileObj> {
        FileObj::new(self.mem.clone(), opts)
    }

    /// Allocate a zeroed frame holding one reference owned by the caller
    /// (for special-mapping page lists and page arrays); give it back with
    /// [`Mm::put_page`].
    ///
    /// # Errors
    /// [`MmError::OutOfMemory`].
    pub fn alloc_page(&self) -> Result<Pfn, MmError> {
        Ok(self.mem.alloc_page(false)?)
    }

    /// Drop a reference taken by [`Mm::alloc_page`].
    ///
    /// # Errors
    /// [`MmError::FrameNotHeld`] when the frame is free, or when every
    /// reference it holds belongs to a PTE that maps it (a second
    /// `put_page` after `insert_page`: freeing it would leave the PTE
    /// pointing at a frame the store hands out again); nothing changes.
    /// Raw PFNs and the zero page are not refcounted: `Ok` and nothing.
    pub fn put_page(&self, pfn: Pfn) -> Result<(), MmError> {
        if self.mem.counted(pfn) && !self.mem.put_unmapped_ref(pfn) {
            return Err(MmError::FrameNotHeld { pfn: pfn.0 });
        }
        Ok(())
    }

    /// The refcount and mapcount of a valid frame (`None` for raw PFNs, the
    /// zero page and free frames).
    pub fn page_info(&self, pfn: Pfn) -> Option<PageInfo> {
        self.mem.info(pfn)
    }

    /// Frames with metadata (held by page tables, caches or callers).
    pub fn tracked_pages(&self) -> usize {
        self.mem.tracked()
    }

    /// Swap slots in use.
    pub fn swap_slots(&self) -> usize {
        self.mem.swap_slots()
    }

    /// Memory held by the page table.
    pub fn page_table_memory(&self) -> PageTableMemory {
        self.state.read().pt.memory()
    }

    /// The VMA containing `addr`, cloned.
    pub fn vma_at(&self, addr: u64) -> Option<Vma> {
        self.state.read().vma(addr).cloned()
    }

    /// All VMAs in address order, cloned.
    pub fn vmas(&self) -> Vec<Vma> {
        self.state.read().vmas.values().cloned().collect()
    }

    /// The decoded PTE at `addr` (page aligned down).
    pub fn pte(&self, addr: u64) -> Pte {
        Pte::decode(self.state.read().pt.get(addr & !PAGE_MASK))
    }

    /// Whether [`Mm::exit`] ran.
    pub fn is_exited(&self) -> bool {
        self.state.read().exited
    }

    /// `vm_normal_page` for the present PTE at `addr`, with the row that
    /// decided; `Ok(None)` when no present PTE maps it.
    ///
    /// # Errors
    /// [`MmError::NoVma`] outside every mapping.
    pub fn vm_normal_page(&self, addr: u64) -> Result<Option<NormalPage>, MmError> {
        let addr = addr & !PAGE_MASK;
        let st = self.state.read();
        let vma = st.vma(addr).ok_or(MmError::NoVma { addr })?;
        Ok(Pte::decode(st.pt.get(addr))
            .present()
            .map(|p| self.normal_page(vma, addr, p)))
    }

    #[inline]
    pub(crate) fn normal_page(&self, vma: &Vma, addr: u64, pte: PresentPte) -> NormalPage {
        let valid = |p: Pfn| self.mem.frames.pfn_valid(p);
        vm_normal_page(
            vma,
            addr,
            pte,
            &NormalPageEnv {
                pte_special: self.pte_special,
                zero: self.mem.zero,
                pfn_valid: &valid,
            },
        )
    }

    #[inline]
    pub(crate) fn holds_ref(&self, vma: &Vma, addr: u64, pte: PresentPte) -> bool {
        let valid = |p: Pfn| self.mem.frames.pfn_valid(p);
        normal_page::pte_holds_ref(
            vma,
            addr,
            pte,
            &NormalPageEnv {
                pte_special: self.pte_special,
                zero: self.mem.zero,
                pfn_valid: &valid,
            },
        )
    }

    // ------------------------------------------------------------------
    // Brackets and PTE stores.

    /// Open an invalidation bracket over `[start, end)` for `event`
    /// (`mmu_notifier_invalidate_range_start`).
    ///
    /// # Locking
    /// Called with the mmap lock held and no leaf lock.
    pub(crate) fn begin(&self, start: u64, end: u64, event: Event) -> Result<Bracket<'_>, MmError> {
        let skip = self.inject.skip_event.load(Ordering::Relaxed);
        let inv = if skip != 0 && Event::ALL.get(usize::from(skip) - 1) == Some(&event) {
            None
        } else {
            let r = PageRange::from_bounds(start, end)?;
            Some(
                self.notifiers
                    .invalidate_range_start(&InvalidateRange::new(r, event))?,
            )
        };
        Ok(Bracket {
            mm: self,
            inv,
            put: Vec::new(),
        })
    }

    /// Store a PTE word.
    #[inline]
    pub(crate) fn set_pte(&self, vma: &Vma, e: &AtomicU64, addr: u64, old: u64, new: u64) {
        if self.inject.observing.load(Ordering::Relaxed) {
            let _order = self.inject.order[(addr >> PAGE_SHIFT) as usize % ORDER_STRIPES].lock();
            self.inject.pending.fetch_add(1, Ordering::SeqCst);
            e.store(new, Ordering::Release);
            self.observe(vma, addr, old, new);
            self.inject.pending.fetch_sub(1, Ordering::Release);
        } else {
            e.store(new, Ordering::Release);
        }
    }

    /// Compare-and-store a PTE word.
    #[inline]
    pub(crate) fn cas_pte(&self, vma: &Vma, e: &AtomicU64, addr: u64, old: u64, new: u64) -> bool {
        let observing = self.inject.observing.load(Ordering::Relaxed);
        let _order = observing
            .then(|| self.inject.order[(addr >> PAGE_SHIFT) as usize % ORDER_STRIPES].lock());
        if observing {
            self.inject.pending.fetch_add(1, Ordering::SeqCst);
        }
        let ok = e
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if observing {
            if ok {
                self.observe(vma, addr, old, new);
            }
            self.inject.pending.fetch_sub(1, Ordering::Release);
        }
        ok
    }

    #[inline]
    fn observe(&self, vma: &Vma, addr: u64, old: u64, new: u64) {
        if self.inject.observing.load(Ordering::Relaxed) {
            if let Some(f) = self.inject.observer.read().clone() {
                f(PteChange {
                    addr,
                    old,
                    new,
                    vma_flags: vma.flags,
                });
            }
        }
    }

    /// Clear the PTE word at `addr` inside `br`: the clear hook first, then
    /// the store, then the mapcount; the reference or swap slot is released
    /// after the bracket.
    ///
    /// Caller holds the mmap lock exclusively.
    pub(crate) fn zap_pte(
        &self,
        vma: &Vma,
        addr: u64,
        e: &AtomicU64,
        raw: u64,
        br: &mut Bracket<'_>,
    ) {
        match Pte::decode(raw) {
            Pte::Present(p) => {
                br.clear(addr);
                self.set_pte(vma, e, addr, raw, 0);
                if self.holds_ref(vma, addr, p) {
                    self.mem.unmap_page(p.pfn);
                    br.defer_put(p.pfn);
                }
            }
            Pte::Swap { slot } => {
                self.set_pte(vma, e, addr, raw, 0);
                self.mem.swap_free(slot);
            }
            Pte::File { .. } => self.set_pte(vma, e, addr, raw, 0),
            Pte::None => {}
        }
    }

    /// Zap every PTE of `[start, end)` (inside one VMA) into `br`.
    pub(crate) fn zap_range(
        &self,
        st: &MmState,
        vma: &Vma,
        start: u64,
        end: u64,
        br: &mut Bracket<'_>,
    ) {
        st.pt.for_each_entry(start, end, |addr, e, raw| {
            self.zap_pte(vma, addr, e, raw, br)
        });
    }

    // ------------------------------------------------------------------
    // CPU accessors.

    /// Read `buf.len()` bytes at `addr` as the CPU would, faulting pages in.
    ///
    /// # Errors
    /// The fault errors ([`MmError::NoVma`], [`MmError::Permission`],
    /// [`MmError::Bus`], [`MmError::OutOfMemory`]); bytes before the failing
    /// page may have been read.
    ///
    /// # Locking
    /// Takes the mmap lock shared for the whole access, so no frame it
    /// reads can be unmapped and released meanwhile.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MmError> {
        let st = self.state.read();
        self.access(&st, addr, buf.len(), false, |store, pfn, off, r| {
            store.read(pfn, off, &mut buf[r]).map_err(MmError::from)
        })
    }

    /// Write `data` at `addr` as the CPU would, faulting pages in and
    /// breaking copy-on-write.
    ///
    /// # Errors
    /// As [`Mm::read`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MmError> {
        let st = self.state.read();
        self.access(&st, addr, data.len(), true, |store, pfn, off, r| {
            store.write(pfn, off, &data[r]).map_err(MmError::from)
        })
    }

    /// Read the 8-aligned word at `addr`.
    ///
    /// # Errors
    /// As [`Mm::read`]; [`MmError::Misaligned`] for an unaligned address.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MmError> {
        if addr % 8 != 0 {
            return Err(MmError::Misaligned { addr });
        }
        let st = self.state.read();
        let (store_pfn, off) = (
            self.translate(&st, addr & !PAGE_MASK, false)?,
            (addr & PAGE_MASK) as usize,
        );
        let store = self.mem.store_for(store_pfn).ok_or(MmError::Bus { addr })?;
        Ok(store.load(store_pfn, off)?)
    }

    /// Write the 8-aligned word at `addr`.
    ///
    /// # Errors
    /// As [`Mm::read_u64`].
    pub fn write_u64(&self, addr: u64, val: u64) -> Result<(), MmError> {
        if addr % 8 != 0 {
            return Err(MmError::Misaligned { addr });
        }
        let st = self.state.read();
        let pfn = self.translate(&st, addr & !PAGE_MASK, true)?;
        let store = self.mem.store_for(pfn).ok_or(MmError::Bus { addr })?;
        Ok(store.store(pfn, (addr & PAGE_MASK) as usize, val)?)
    }

    fn access(
        &self,
        st: &MmState,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(&dyn FrameStore, Pfn, usize, core::ops::Range<usize>) -> Result<(), MmError>,
    ) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < len {
            let pos = addr
                .checked_add(done as u64)
                .ok_or(MmError::NoVma { addr })?;
            let page = pos & !PAGE_MASK;
            let within = (pos & PAGE_MASK) as usize;
            let n = (PAGE_SIZE as usize - within).min(len - done);
            let pfn = self.translate(st, page, write)?;
            let store = self.mem.store_for(pfn).ok_or(MmError::Bus { addr: page })?;
            f(store, pfn, within, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// The frame backing `page` for this access, faulting as needed, and
    /// the accessed (and dirty) bits set.
    #[inline]
    fn translate(&self, st: &MmState, page: u64, write: bool) -> Result<Pfn, MmError> {
        let p = self.fault_locked(st, page, write)?;
        Ok(p.pfn)
    }

    /// Fault `addr` in for a read or a write and return its translation
    /// (`handle_mm_fault`, then a page-table walk).
    ///
    /// # Errors
    /// As [`Mm::read`].
    pub fn fault(&self, addr: u64, write: bool) -> Result<Translation, MmError> {
        let st = self.state.read();
        let p = self.fault_locked(&st, addr & !PAGE_MASK, write)?;
        Ok(Translation {
            pfn: p.pfn,
            writable: p.write,
        })
    }

    /// The current translation of `addr` without faulting: a snapshot of the
    /// present PTE, `None` if not present or the VMA is not readable.
    pub fn lookup(&self, addr: u64) -> Option<Translation> {
        let addr = addr & !PAGE_MASK;
        let st = self.state.read();
        let vma = st.vma(addr)?;
        if !vma.flags.contains(VmFlags::READ) {
            return None;
        }
        let p = Pte::decode(st.pt.get(addr)).present()?;
        Some(Translation {
            pfn: p.pfn,
            writable: p.write && vma.flags.contains(VmFlags::WRITE),
        })
    }
}

impl Primary for Mm {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.notifiers
    }

    fn frames(&self) -> &dyn FrameStore {
        &*self.mem.frames
    }

    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        self.fault(addr, write)
            .map_err(|e| e.to_primary_fault(addr))
    }

    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.lookup(addr)
    }
}

/// Page index helper shared by the operation files.
#[inline]
pub(crate) const fn pages(len: u64) -> u64 {
    len >> PAGE_SHIFT
}
