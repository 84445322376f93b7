//! A registration cache that threads share: [`SharedRegistry`].
//!
//! # Design: a cache per thread, one registry to the user
//!
//! The hit path of a shared cache is where caches in use today collapse
//! (UCX's `ucs_rcache` and libfabric's MR cache take one lock per lookup;
//! their users report it as a top bottleneck). Here every thread that calls
//! [`SharedRegistry::get`] gets its own single-owner [`Registry`] (the
//! role of a UCX worker's rcache, made transparent), kept in thread-local
//! storage. A hit is that registry's hit: a hash probe and plain stores to
//! lines only the calling thread writes. No lock, no atomic
//! read-modify-write, no cache line another thread writes in the common
//! case, so hits scale with cores, also when every thread hits the same
//! hot region (each thread has its own registration of it).
//!
//! What the threads share, and how:
//!
//! | what | how | when |
//! |------|-----|------|
//! | the primary's invalidations | every per-thread registry subscribes its chunks; a callback kills or marks stale that registry's regions and sets its `pending` flag | an unmap, a zap |
//! | the application's order | every `get` and DMA waits on the primary's event gate | a `munmap` another thread returned from |
//! | a `put` from another thread | the handle names its registry (`MrHandle::registry_id`); the put goes to that registry's inbox, which its owner drains at its next operation | RDMA completions on another thread |
//! | an explicit [`SharedRegistry::invalidate`] | each registry's invalidation index, under its lock, as a callback would | rare |
//! | statistics | each owner publishes its counters every [`PUBLISH_EVERY`] operations and on slow paths | [`SharedRegistry::stats`] |
//!
//! ```text
//!   thread A (get/put)           thread B (put of A's handle)      monitor (unmap)
//!   TLS -> A's registry          dir.lock(): A's inbox             A's chunk callback:
//!   gate.wait_applied()          inbox.push(h); mail = true        kill/stale, pending = true
//!   mail? drain inbox (puts)     (Release)                         (Release)
//!   pending? drain queue
//!   hash probe, refs += 1  <- private lines only
//! ```
//!
//! What it costs, and the limits:
//! - A region used by T threads is registered T times (T keys, T MTTs):
//!   the memory per cached region is the single-owner figure per thread
//!   that uses it, and a buffer's first use on each thread is a miss.
//! - The limits of [`RegistryConfig`] apply to each thread's cache.
//! - A `put` on another thread than the `get` is queued: it returns
//!   `Ok` for a handle of a live registry of this cache, and its owner
//!   applies it (a stale or double put found then is counted in
//!   `Stats::bad_remote_puts`, not returned).
//! - At most 255 threads hold a cache at once (the handle's registry id is
//!   8 bits); the 256th thread's `get` fails with [`RegError::LimitExceeded`].
//! - When a thread exits, its cache moves to the shared registry's orphans:
//!   its handles stay valid, their puts are applied by whichever thread
//!   next takes a slow path, and the orphan is destroyed once it holds no
//!   reference (or with the shared registry).

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use notifier_core::notifier::NotifierSubscriptions;
use notifier_core::primary::Primary;
use parking_lot::Mutex;

use crate::access::Access;
use crate::error::RegError;
use crate::provider::Provider;
use crate::registry::chunk::Shared;
use crate::registry::{MrHandle, Registry, RegistryConfig, Stats};

/// A thread publishes its cache's counters at least once per this many
/// operations (and on every miss).
pub const PUBLISH_EVERY: u32 = 4096;

/// Most per-thread caches of one shared registry at once.
const MAX_SHARDS: usize = 255;

/// A registration cache shared by threads (see the module docs). Cheap to
/// clone (an `Arc`); `Send + Sync`.
pub struct SharedRegistry<N: Provider + Clone> {
    core: Arc<Core<N>>,
}

impl<N: Provider + Clone> Clone for SharedRegistry<N> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
        }
    }
}

impl<N: Provider + Clone> core::fmt::Debug for SharedRegistry<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedRegistry")
            .field("provider", &self.core.provider.name())
            .field("threads", &self.core.dir.lock().len())
            .finish()
    }
}

struct Core<N: Provider + Clone> {
    uid: u64,
    subs: Arc<NotifierSubscriptions>,
    provider: N,
    cfg: RegistryConfig,
    /// The per-thread caches, live or orphaned, by registry id.
    ///
    /// # Locking
    /// A leaf lock: held only to find or add a shard.
    dir: Mutex<Vec<Arc<Shard<N>>>>,
    /// Caches whose thread exited; any thread's slow path applies their mail.
    orphans: Mutex<Vec<Registry<N>>>,
    /// Counters of destroyed caches.
    retired: Mutex<Stats>,
}

/// The part of one thread's cache that other threads reach.
struct Shard<N: Provider + Clone> {
    id: u32,
    shared: Arc<Shared<N::Mr>>,
    /// Handles put by other threads, for the owner to apply.
    inbox: Mutex<Vec<MrHandle>>,
    /// `inbox` is not empty (Release by a sender, Acquire by the owner).
    mail: AtomicBool,
    /// The owner's last published counters.
    stats: Mutex<Stats>,
    bad_remote_puts: AtomicU64,
}

/// One thread's cache of one shared registry (in its thread-local list).
struct Local<N: Provider + Clone> {
    reg: Option<Registry<N>>,
    shard: Arc<Shard<N>>,
    core: Weak<Core<N>>,
    ops: u32,
    /// Misses when the counters were last published.
    published_misses: u64,
}

impl<N: Provider + Clone> Local<N> {
    #[inline(always)]
    fn get(&mut self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        self.read_mail();
        self.count_op();
        let Some(reg) = self.reg.as_mut() else {
            return Err(RegError::Unavailable);
        };
        // Publish after a miss, on the next operation: the result then
        // goes straight to the caller (a copy of it through a temporary
        // missed store forwarding and doubled the hit's cost).
        if reg.stats_misses() != self.published_misses {
            self.published_misses = reg.stats_misses();
            *self.shard.stats.lock() = reg.stats();
        }
        reg.get(start, len, access)
    }

    /// A put of a handle this cache issued.
    #[inline(always)]
    fn put(&mut self, h: MrHandle) -> Result<(), RegError> {
        let reg = self.reg.as_mut().ok_or(RegError::Unavailable)?;
        reg.put(h)
    }

    /// Apply the puts other threads sent.
    #[inline]
    fn read_mail(&mut self) {
        // Acquire pairs with the sender's Release: the handles are visible.
        if self.shard.mail.load(Ordering::Acquire) {
            self.read_mail_slow();
        }
    }

    #[cold]
    fn read_mail_slow(&mut self) {
        let Some(reg) = self.reg.as_mut() else { return };
        apply_mail(&self.shard, reg);
    }

    #[inline]
    fn count_op(&mut self) {
        self.ops = self.ops.wrapping_add(1);
        if self.ops % PUBLISH_EVERY == 0 {
            self.publish();
        }
    }

    fn publish(&self) {
        if let Some(reg) = &self.reg {
            *self.shard.stats.lock() = reg.stats();
        }
    }
}

/// Apply `shard`'s queued puts to its registry `reg`.
fn apply_mail<N: Provider + Clone>(shard: &Shard<N>, reg: &mut Registry<N>) {
    let mail = {
        let mut inbox = shard.inbox.lock();
        shard.mail.store(false, Ordering::Relaxed);
        core::mem::take(&mut *inbox)
    };
    for h in mail {
        if reg.put(h).is_err() {
            shard.bad_remote_puts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<N: Provider + Clone> Drop for Local<N> {
    /// The thread exits (or the shared registry is gone): a live shared
    /// registry adopts the cache; otherwise it is destroyed here.
    fn drop(&mut self) {
        let Some(reg) = self.reg.take() else { return };
        self.shard.stats.lock().clone_from(&reg.stats());
        if let Some(core) = self.core.upgrade() {
            core.orphans.lock().push(reg);
        }
    }
}

/// A type-erased `Rc<RefCell<Local<N>>>`, so one thread-local list serves
/// every provider type.
struct Entry {
    uid: u64,
    alive: Box<dyn Fn() -> bool>,
    local: Box<dyn Any>,
}

type LocalRc<N> = Rc<RefCell<Local<N>>>;

/// The calling thread's cache of a [`SharedRegistry`], bound to that
/// thread (`!Send`): [`SharedRegistry::local`] hands it out so that a
/// thread that does many operations pays the thread-local lookup once, as
/// a UCX worker holds its rcache. Its `get` and `put` are the shared
/// registry's, minus that lookup.
pub struct LocalCache<'a, N: Provider + Clone> {
    local: LocalRc<N>,
    shared: &'a SharedRegistry<N>,
}

impl<N: Provider + Clone> core::fmt::Debug for LocalCache<'_, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LocalCache").finish_non_exhaustive()
    }
}

impl<N: Provider + Clone> LocalCache<'_, N> {
    /// [`SharedRegistry::get`] on this thread's cache.
    ///
    /// # Errors
    /// Those of [`SharedRegistry::get`].
    #[inline(always)]
    pub fn get(&self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        let mut l = self
            .local
            .try_borrow_mut()
            .map_err(|_| RegError::Unavailable)?;
        l.get(start, len, access)
    }

    /// [`SharedRegistry::put`]: a handle of this thread's cache is applied
    /// here, any other goes to its owner.
    ///
    /// # Errors
    /// Those of [`SharedRegistry::put`].
    #[inline(always)]
    pub fn put(&self, h: MrHandle) -> Result<(), RegError> {
        let mut l = self
            .local
            .try_borrow_mut()
            .map_err(|_| RegError::Unavailable)?;
        if l.shard.id == h.registry_id() {
            l.put(h)
        } else {
            drop(l);
            self.shared.put_remote(h)
        }
    }
}

std::thread_local! {
    static CACHES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

fn next_uid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl<N: Provider + Clone> SharedRegistry<N> {
    /// A shared registry whose regions follow `primary` and are registered
    /// with (clones of) `provider`; `cfg` limits each thread's cache.
    pub fn new(primary: &dyn Primary, provider: N, cfg: RegistryConfig) -> Self {
        Self {
            core: Arc::new(Core {
                uid: next_uid(),
                subs: primary.notifiers().clone(),
                provider,
                cfg,
                dir: Mutex::new(Vec::new()),
                orphans: Mutex::new(Vec::new()),
                retired: Mutex::new(Stats::default()),
            }),
        }
    }

    /// The provider.
    pub fn provider(&self) -> &N {
        &self.core.provider
    }

    /// The calling thread's cache, created on first use.
    #[inline]
    fn local_rc(&self) -> Result<LocalRc<N>, RegError> {
        CACHES
            .try_with(|c| {
                let Ok(mut list) = c.try_borrow_mut() else {
                    return Err(RegError::Unavailable);
                };
                let uid = self.core.uid;
                let i = match list.iter().position(|e| e.uid == uid) {
                    Some(i) => i,
                    None => {
                        // Drop the caches of shared registries that are gone.
                        list.retain(|e| (e.alive)());
                        let local: LocalRc<N> = Rc::new(RefCell::new(self.new_local()?));
                        let core = Arc::downgrade(&self.core);
                        list.push(Entry {
                            uid,
                            alive: Box::new(move || core.strong_count() > 0),
                            local: Box::new(local),
                        });
                        list.len() - 1
                    }
                };
                list[i]
                    .local
                    .downcast_ref::<LocalRc<N>>()
                    .cloned()
                    .ok_or(RegError::Unavailable)
            })
            .unwrap_or(Err(RegError::Unavailable))
    }

    /// The calling thread's cache as a thread-bound handle: the fastest way
    /// to make many `get`/`put` calls from one thread.
    ///
    /// # Errors
    /// [`RegError::Unavailable`] while the thread exits;
    /// [`RegError::LimitExceeded`] for a 256th thread.
    pub fn local(&self) -> Result<LocalCache<'_, N>, RegError> {
        Ok(LocalCache {
            local: self.local_rc()?,
            shared: self,
        })
    }

    /// Run `f` on the calling thread's cache.
    #[inline]
    fn with_local<R>(
        &self,
        f: impl FnOnce(&mut Local<N>) -> Result<R, RegError>,
    ) -> Result<R, RegError> {
        let rc = self.local_rc()?;
        let mut l = rc.try_borrow_mut().map_err(|_| RegError::Unavailable)?;
        f(&mut l)
    }

    /// A cache for the calling thread, with the lowest free id.
    #[cold]
    fn new_local(&self) -> Result<Local<N>, RegError> {
        let mut dir = self.core.dir.lock();
        self.reap(&mut dir);
        if dir.len() >= MAX_SHARDS {
            return Err(RegError::LimitExceeded);
        }
        // Ids from the process-wide sequence (so handles of two shared
        // registries differ), unique among this registry's caches.
        let id = (0..MAX_SHARDS)
            .map(|_| crate::registry::next_registry_id())
            .find(|id| dir.iter().all(|s| s.id != *id))
            .ok_or(RegError::LimitExceeded)?;
        let reg = Registry::with_id(
            self.core.subs.clone(),
            self.core.provider.clone(),
            self.core.cfg,
            id,
        );
        let shard = Arc::new(Shard {
            id,
            shared: reg.shared().clone(),
            inbox: Mutex::new(Vec::new()),
            mail: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
            bad_remote_puts: AtomicU64::new(0),
        });
        dir.push(shard.clone());
        Ok(Local {
            reg: Some(reg),
            shard,
            core: Arc::downgrade(&self.core),
            ops: 0,
            published_misses: 0,
        })
    }

    /// Apply the mail of orphaned caches and destroy those that hold no
    /// reference any more (their shards leave `dir`).
    fn reap(&self, dir: &mut Vec<Arc<Shard<N>>>) {
        let Some(mut orphans) = self.core.orphans.try_lock() else {
            return;
        };
        let mut retired = self.core.retired.lock();
        orphans.retain_mut(|reg| {
            let Some(shard) = dir.iter().find(|s| s.id == reg.id()) else {
                return false;
            };
            apply_mail(shard, reg);
            if reg.has_references() {
                return true;
            }
            // Dropped below: everything it cached is deregistered.
            let mut s = reg.stats();
            s.deregistrations = s.registrations;
            s.cached_regions = 0;
            s.cached_bytes = 0;
            add(&mut retired, &s);
            let id = reg.id();
            dir.retain(|s| s.id != id);
            false
        });
    }

    /// Get a region covering `[start, start + len)` (any alignment) with
    /// exactly `access`, from the calling thread's cache (see
    /// [`Registry::get`] for the guarantees: never a region an
    /// invalidation touched, the application's order, exact rights).
    ///
    /// # Errors
    /// Those of [`Registry::get`]; [`RegError::Unavailable`] when called
    /// from inside this registry's own callback or while the thread exits;
    /// [`RegError::LimitExceeded`] for a 256th thread.
    #[inline]
    pub fn get(&self, start: u64, len: u64, access: Access) -> Result<MrHandle, RegError> {
        self.with_local(|local| local.get(start, len, access))
    }

    /// Give back a reference taken by [`Self::get`] on any thread: applied
    /// at once when the calling thread took it, queued for the owner
    /// otherwise (see the module docs).
    ///
    /// # Errors
    /// [`RegError::ForeignHandle`] for a handle no cache of this registry
    /// issued; those of [`Registry::put`] for a handle of the calling
    /// thread's cache.
    #[inline]
    pub fn put(&self, h: MrHandle) -> Result<(), RegError> {
        let local = self.with_local(|local| {
            if local.shard.id != h.registry_id() {
                return Ok(false);
            }
            local.put(h).map(|()| true)
        });
        match local {
            Ok(true) => Ok(()),
            Ok(false) | Err(RegError::Unavailable) => self.put_remote(h),
            Err(e) => Err(e),
        }
    }

    #[cold]
    fn put_remote(&self, h: MrHandle) -> Result<(), RegError> {
        let mut dir = self.core.dir.lock();
        let shard = dir
            .iter()
            .find(|s| s.id == h.registry_id())
            .cloned()
            .ok_or(RegError::ForeignHandle)?;
        shard.inbox.lock().push(h);
        // Release pairs with the owner's Acquire in `read_mail`.
        shard.mail.store(true, Ordering::Release);
        self.reap(&mut dir);
        Ok(())
    }

    /// Invalidate every cached region, of every thread's cache, that
    /// overlaps `[start, start + len)` (`ucs_rcache_region_invalidate`):
    /// their keys die before this returns; each owner retires its regions
    /// at its next operation. Returns how many.
    ///
    /// # Errors
    /// Bad range.
    pub fn invalidate(&self, start: u64, len: u64) -> Result<usize, RegError> {
        let range = notifier_core::PageRange::new(start, len)?;
        let dir = self.core.dir.lock().clone();
        Ok(dir
            .iter()
            .map(|s| s.shared.kill_range(range.start(), range.end()))
            .sum())
    }

    /// The counters of every thread's cache, added up. Each thread's part
    /// is as of its last publication (at most [`PUBLISH_EVERY`] operations
    /// old; the calling thread's is current).
    pub fn stats(&self) -> Stats {
        let _ = self.with_local(|local| {
            local.publish();
            Ok(())
        });
        let mut t = *self.core.retired.lock();
        for s in self.core.dir.lock().iter() {
            add(&mut t, &s.stats.lock());
            t.bad_remote_puts += s.bad_remote_puts.load(Ordering::Relaxed);
        }
        t
    }

    /// Threads with a cache now (live or exited with references left).
    pub fn caches(&self) -> usize {
        self.core.dir.lock().len()
    }
}

fn add(t: &mut Stats, s: &Stats) {
    t.hits += s.hits;
    t.misses += s.misses;
    t.merges += s.merges;
    t.evictions += s.evictions;
    t.invalidations += s.invalidations;
    t.registrations += s.registrations;
    t.deregistrations += s.deregistrations;
    t.cached_regions += s.cached_regions;
    t.cached_bytes += s.cached_bytes;
}
