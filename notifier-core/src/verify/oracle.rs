//! The coherence oracle: at the moment of every secondary access it checks
//! that the frame the device is about to touch is still mapped at that
//! address, with that permission, in the primary.
//!
//! It is an [`AccessCheck`]: mirrors call it under the device lock, so the
//! answer is exact — an invalidation of that page cannot complete while the
//! check and the access run, and the primary changes a PTE only after the
//! invalidation's callbacks returned. Any mismatch is therefore a real
//! protocol violation (a skipped invalidation, a missing `read_retry`, a
//! late TLB flush, ...), never a benign race.
//!
//! A violation carries the page's recent history from rings of events
//! (primary operations reported by the driver, invalidations, fills).
//!
//! # Scaling
//!
//! Device threads check and fill in parallel, so nothing they touch is
//! shared by all of them: checks are counted in per-device stripes, fills
//! go to one of [`SHARDS`] history rings chosen by page (a device faulting
//! page A and one faulting page B take different locks), and the liveness
//! map is sharded the same way. Events are ordered by a monotonic-clock
//! timestamp instead of a shared counter. Operations and invalidations
//! (mutator threads, whose primary operations the primary serialises
//! anyway) share one ring of range events.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use crate::frame::Pfn;
use crate::notifier::Event;
use crate::primary::{Primary, Translation};
use crate::secondary::AccessCheck;

/// One event in the history rings. `seq` orders events across threads: the
/// monotonic clock's nanoseconds since the oracle was created, read where
/// the event happens (under the lock that orders it against the others:
/// the mirror's lock for fills and invalidations), so two events that the
/// protocol orders carry increasing values; unordered events may tie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryEvent {
    /// A primary operation over `[start, end)`, named by the driver.
    Op {
        /// Global order.
        seq: u64,
        /// Operation name (`munmap`, `migrate`, ...).
        op: &'static str,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A mirror's invalidate callback ran.
    Invalidate {
        /// Global order.
        seq: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Why.
        event: Event,
    },
    /// A mirror wrote an external entry.
    Fill {
        /// Global order.
        seq: u64,
        /// The page.
        addr: u64,
        /// The frame.
        pfn: Pfn,
        /// Whether writable.
        writable: bool,
    },
}

impl HistoryEvent {
    fn covers(&self, addr: u64) -> bool {
        match *self {
            HistoryEvent::Op { start, end, .. } | HistoryEvent::Invalidate { start, end, .. } => {
                start <= addr && addr < end
            }
            HistoryEvent::Fill { addr: a, .. } => a == addr,
        }
    }
}

/// A stale access found by the oracle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The device that accessed.
    pub device: usize,
    /// The page (primary address).
    pub addr: u64,
    /// The frame the device used.
    pub used: Pfn,
    /// Whether it was a write.
    pub write: bool,
    /// What the primary maps there now (`None`: nothing present).
    pub primary: Option<Translation>,
    /// The page's recent history, oldest first.
    pub history: Vec<HistoryEvent>,
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        writeln!(
            f,
            "stale {} by device {} at {:#x}: used pfn {:#x}, primary maps {}",
            if self.write { "write" } else { "read" },
            self.device,
            self.addr,
            self.used.0,
            match self.primary {
                None => "nothing".to_string(),
                Some(t) => format!(
                    "pfn {:#x} {}",
                    t.pfn.0,
                    if t.writable { "rw" } else { "ro" }
                ),
            }
        )?;
        for h in &self.history {
            writeln!(f, "    {h:?}")?;
        }
        Ok(())
    }
}

/// How long a mismatch may wait for unreported PTE stores (see `check`).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// How many violations keep their full report.
const KEEP: usize = 16;
/// Range events (operations, invalidations) kept.
const RING: usize = 1 << 14;
/// Fill rings (and liveness-map shards), chosen by page number, and
/// check-counter stripes, chosen by device.
pub const SHARDS: usize = 64;
/// Fills kept per shard.
const FILL_RING: usize = 1 << 10;

/// The part of the oracle a fill of one page touches.
#[derive(Default)]
struct Shard {
    fills: Mutex<VecDeque<HistoryEvent>>,
    /// Liveness mode: frame generation at the last fill of (page, frame).
    filled: Mutex<HashMap<(u64, u64), u64>>,
}

#[inline]
fn shard_of(addr: u64) -> usize {
    (addr >> 12) as usize % SHARDS
}

fn push_ring(ring: &Mutex<VecDeque<HistoryEvent>>, cap: usize, e: HistoryEvent) {
    let mut h = ring.lock();
    if h.len() == cap {
        h.pop_front();
    }
    h.push_back(e);
}

/// Which invariant the oracle checks.
pub enum OracleMode {
    /// The primary maps the page to that frame with that permission now
    /// (for mirrors that flush in the invalidate callback).
    Strict,
    /// The frame has not been freed since the translation was filled (for
    /// [`FlushPolicy::AtEnd`](crate::secondary::FlushPolicy) mirrors, which
    /// may legitimately use a translation until the bracket ends).
    Liveness(Arc<dyn Fn(Pfn) -> u64 + Send + Sync>),
}

/// Where the oracle reads what the primary maps now.
type Source = Box<dyn Fn(u64) -> Option<Translation> + Send + Sync>;

/// The coherence oracle over one primary.
pub struct Oracle {
    source: Source,
    /// Whether the source has stores not yet reported (shadowed primaries).
    pending: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    mode: OracleMode,
    /// Fill rings and liveness maps, by page.
    shards: Box<[CachePadded<Shard>]>,
    /// Checks, by device.
    checks: Box<[CachePadded<AtomicU64>]>,
    violations: AtomicU64,
    first: Mutex<Vec<Violation>>,
    /// Operations and invalidations.
    ranges: Mutex<VecDeque<HistoryEvent>>,
    /// Time zero of `seq`.
    epoch: Instant,
}

impl core::fmt::Debug for Oracle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Oracle")
            .field("checks", &self.checks())
            .field("violations", &self.violation_count())
            .finish()
    }
}

impl Oracle {
    /// An oracle that checks accesses against `primary`.
    ///
    /// It calls `primary.lookup_page` under device locks: use it only with
    /// primaries whose lookup takes no lock that their invalidation path
    /// holds (the test primary); for `mm::Mm` use [`Oracle::for_mm`].
    pub fn new(primary: Arc<dyn Primary>) -> Arc<Self> {
        Self::with_mode(
            Box::new(move |a| primary.lookup_page(a)),
            OracleMode::Strict,
        )
    }

    /// A strict oracle over a software primary, reading a shadow of its
    /// page table (see [`super::MmShadow`]). Create it before mapping.
    pub fn for_mm(mm: &crate::mm::Mm) -> Arc<Self> {
        let shadow = super::MmShadow::attach(mm);
        let s2 = shadow.clone();
        Self::build(
            Box::new(move |a| shadow.lookup(a)),
            Some(Box::new(move || s2.reports_pending())),
            OracleMode::Strict,
        )
    }

    /// An oracle in liveness mode over `frames` (see [`OracleMode::Liveness`]).
    /// The software primary `mm` must use `frames` as its frame store;
    /// create the oracle before mapping.
    pub fn liveness<F: crate::frame::FrameStore + 'static>(
        mm: &crate::mm::Mm,
        frames: Arc<super::TrackedFrames<F>>,
    ) -> Arc<Self> {
        let shadow = super::MmShadow::attach(mm);
        let s2 = shadow.clone();
        let source: Source = Box::new(move |a| shadow.lookup(a));
        Self::build(
            source,
            Some(Box::new(move || s2.reports_pending())),
            OracleMode::Liveness(Arc::new(move |pfn| frames.generation(pfn))),
        )
    }

    /// An oracle checking `mode`'s invariant.
    pub fn with_mode(source: Source, mode: OracleMode) -> Arc<Self> {
        Self::build(source, None, mode)
    }

    fn build(
        source: Source,
        pending: Option<Box<dyn Fn() -> bool + Send + Sync>>,
        mode: OracleMode,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            pending,
            mode,
            shards: (0..SHARDS).map(|_| CachePadded::default()).collect(),
            checks: (0..SHARDS).map(|_| CachePadded::default()).collect(),
            violations: AtomicU64::new(0),
            first: Mutex::new(Vec::new()),
            ranges: Mutex::new(VecDeque::with_capacity(RING)),
            epoch: Instant::now(),
        })
    }

    #[inline]
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Record a primary operation for the history.
    pub fn record_op(&self, op: &'static str, start: u64, end: u64) {
        let seq = self.now();
        push_ring(
            &self.ranges,
            RING,
            HistoryEvent::Op {
                seq,
                op,
                start,
                end,
            },
        );
    }

    /// Number of accesses checked.
    pub fn checks(&self) -> u64 {
        self.checks.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The recent events that concern the page at `addr`, oldest first.
    fn history_of(&self, addr: u64) -> Vec<HistoryEvent> {
        let mut h: Vec<HistoryEvent> = self.shards[shard_of(addr)]
            .fills
            .lock()
            .iter()
            .filter(|e| e.covers(addr))
            .cloned()
            .collect();
        h.extend(
            self.ranges
                .lock()
                .iter()
                .filter(|e| e.covers(addr))
                .cloned(),
        );
        h.sort_by_key(|e| match *e {
            HistoryEvent::Op { seq, .. }
            | HistoryEvent::Invalidate { seq, .. }
            | HistoryEvent::Fill { seq, .. } => seq,
        });
        h
    }

    /// Number of violations found.
    pub fn violation_count(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// The first violations, with their histories.
    pub fn violations(&self) -> Vec<Violation> {
        self.first.lock().clone()
    }

    /// Check one access directly (what [`AccessCheck::check_access`] does);
    /// returns the violation, if any.
    pub fn check(&self, device: usize, addr: u64, pfn: Pfn, write: bool) -> Option<Violation> {
        self.checks[device % SHARDS].fetch_add(1, Ordering::Relaxed);
        let ok = match &self.mode {
            OracleMode::Strict => {
                let good = |t: Option<Translation>| matches!(t, Some(t) if t.pfn == pfn && (t.writable || !write));
                // A shadowed primary publishes a PTE store before it reports
                // it: while stores are unreported, wait for them (boundedly);
                // once none is, a mismatch is real.
                good((self.source)(addr)) || {
                    let deadline = std::time::Instant::now() + SETTLE;
                    loop {
                        let pending = self.pending.as_ref().is_some_and(|p| p());
                        if good((self.source)(addr)) {
                            break true;
                        }
                        if !pending || std::time::Instant::now() > deadline {
                            break false;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            OracleMode::Liveness(gen) => self.shards[shard_of(addr)]
                .filled
                .lock()
                .get(&(addr, pfn.0))
                .is_some_and(|g| *g == gen(pfn)),
        };
        let now = if ok { None } else { (self.source)(addr) };
        match ok {
            true => None,
            false => {
                self.violations.fetch_add(1, Ordering::Relaxed);
                let history = self.history_of(addr);
                let tail = history.len().saturating_sub(12);
                let v = Violation {
                    device,
                    addr,
                    used: pfn,
                    write,
                    primary: now,
                    history: history[tail..].to_vec(),
                };
                let mut first = self.first.lock();
                if first.len() < KEEP {
                    first.push(v.clone());
                }
                Some(v)
            }
        }
    }
}

impl AccessCheck for Oracle {
    #[inline]
    fn check_access(&self, device: usize, addr: u64, pfn: Pfn, write: bool) {
        self.check(device, addr, pfn, write);
    }
    fn on_fill(&self, addr: u64, pfn: Pfn, writable: bool) {
        let shard = &self.shards[shard_of(addr)];
        if let OracleMode::Liveness(gen) = &self.mode {
            shard.filled.lock().insert((addr, pfn.0), gen(pfn));
        }
        let seq = self.now();
        push_ring(
            &shard.fills,
            FILL_RING,
            HistoryEvent::Fill {
                seq,
                addr,
                pfn,
                writable,
            },
        );
    }
    fn on_invalidate(&self, start: u64, end: u64, event: Event) {
        let seq = self.now();
        push_ring(
            &self.ranges,
            RING,
            HistoryEvent::Invalidate {
                seq,
                start,
                end,
                event,
            },
        );
    }
}
