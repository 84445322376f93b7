//! # notifier-rdma
//!
//! A pinning-free RDMA memory-region registry: a registration cache whose
//! regions are interval subscribers of a primary address space, so a
//! change of the primary kills every affected translation before any frame
//! is freed or reused, and the cache never serves a stale registration.
//!
//! - [`Registry`]: refcounted `get`/`put` of cached regions (merging,
//!   limits with LRU eviction, statistics), direct and implicit ODP
//!   registrations, prefetch advice.
//! - [`Provider`]: the NIC seam. [`SoftNic`] is an in-process NIC model
//!   with its own MTT whose DMA goes through the translations and faults on
//!   a miss; `Ibverbs` (feature `ibverbs`) drives a real device through
//!   rdma-sys.
//! - [`parity`]: the registration-cache parity workloads against UCX.
//! - [`testing`]: a minimal primary for tests and examples.
//!
//! # Design notes
//!
//! - **One owner, plain counters.** A [`Registry`] is used through
//!   `&mut self` (like a UCX worker's rcache; wrap it in a mutex to share
//!   it). Its hit path is a page-keyed hash probe that yields everything
//!   for the handle, plus a 32-byte hot record with a plain reference
//!   count and LRU tick: no atomic read-modify-write on get or put.
//! - **Chunks, not one subscription per region.** Regions join a *chunk*:
//!   one interval subscription per 1 GiB aligned window (kept while
//!   empty, up to 16), the design of UCX's single memory hook and the
//!   kernel's implicit-ODP child MRs; a region crossing a window boundary,
//!   and an implicit region, get a private chunk of their exact range. The
//!   chunk callback, under the registry's invalidation-index lock, records
//!   the sequence, then finds the affected regions in that index and, under
//!   each one's translation lock, kills it on an unmap (or any event for a
//!   pinned registration) and drops the range's translations, before the
//!   primary may free a frame. ODP regions survive other events (clear,
//!   protection, migrate): the NIC faults the new pages in, with
//!   `read_begin`/`read_retry` on the chunk. See `registry/chunk.rs`.
//! - **Invalidation eager, deregistration deferred.** The callback does
//!   what protects memory; unindexing from the owner's hash and provider
//!   deregistration happen at the owner's next `get` or `put`. Keys of a
//!   dead region are rejected at once and never reissued while any handle
//!   can name it.
//! - **Owner indexes.** A page-keyed hash to a 32-byte hot record serves
//!   hits; the ordered index of cached regions (sorted blocks with a
//!   finger, `registry/ordered.rs`) serves misses, merges and the chunk
//!   callbacks.
//!
//! ```
//! use notifier_rdma::{testing::ModelPrimary, Access, Registry, RegistryConfig, SoftNic};
//! use std::sync::Arc;
//!
//! let mm = ModelPrimary::new(64);
//! mm.mmap(0x10000, 0x10000, true).unwrap();
//! let nic = SoftNic::new(mm.clone());
//! let mut reg = Registry::new(&*mm, nic.clone(), RegistryConfig::default());
//! let h = reg.get(0x10000, 0x4000, Access::LOCAL_RW | Access::REMOTE_READ).unwrap();
//! nic.local_write(h.lkey(), 0x10008, b"hello").unwrap();
//! let mut buf = [0u8; 5];
//! nic.remote_read(h.rkey(), 0x10008, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! reg.put(h).unwrap();
//! mm.munmap(0x10000, 0x10000).unwrap();          // the memory goes away
//! assert!(nic.remote_read(h.rkey(), 0x10008, &mut buf).is_err()); // its rkey is dead
//! ```
//!
//! Guide (repository `docs/guide/rdma-real-memory.md`): the registry over
//! real process memory, with the userfaultfd monitor and the software NIC.
//!
//! # Stability
//!
//! Pre-1.0: any 0.x release may change the API; breaking changes bump the
//! minor version and are listed in the commit log.
//! [`Registry`], [`Provider`] and [`SoftNic`] are the product; the
//! registry may come to be shared across threads (`get`/`put` through
//! `&self`). The `parity` and `testing` modules are bench and test
//! scaffolding and may move behind a feature or out of the crate.

// Unsafe code lives only in thin layers: `ibverbs/sys.rs` (verbs),
// `page_vec.rs` (mmap/mremap) and `slab.rs` (counted records in slabs).
#![deny(unsafe_code)]

pub mod access;
pub mod error;
mod huge;
#[cfg(feature = "ibverbs")]
pub mod ibverbs;
mod page_vec;
pub mod parity;
pub mod parity_mt;
pub mod provider;
pub mod region;
pub mod registry;
pub mod shared;
mod slab;
pub mod soft;
pub mod testing;

pub use access::{Access, Advice};
pub use error::{DmaError, ProviderError, RegError};
pub use provider::{Provider, ProviderMr};
pub use region::Region;
pub use registry::{MrHandle, Registry, RegistryConfig, Stats};
pub use shared::{LocalCache, SharedRegistry};
pub use soft::{SoftMr, SoftNic};
