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
//!   for the handle, plus a 16-byte hot record with a plain reference
//!   count and LRU tick: no atomic read-modify-write on get or put.
//! - **Regions are interval subscribers.** Each region subscribes to the
//!   primary's notifiers. Its callback, under the provider's translation
//!   lock, records the sequence, kills the region on an unmap (or any event
//!   for a pinned registration) and drops the range's translations, before
//!   the primary may free a frame. ODP regions survive other events
//!   (clear, protection, migrate): the NIC faults the new pages in.
//! - **Invalidation eager, deregistration deferred.** The callback does
//!   what protects memory; unindexing, provider deregistration and
//!   unsubscribing happen at the owner's next `get` or `put` (the callback
//!   may be non-blockable and cannot wait for the grace period of
//!   unsubscribing). Keys of a dead region are rejected at once and never
//!   reissued while any handle can name it.
//! - **Costs set by the core.** A region's interval subscription costs
//!   104 bytes of entry plus its index node, and inserting into and
//!   removing from the core's interval tree dominate registration and
//!   deregistration at tens of thousands of regions (see the parity
//!   diagnostics).
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

// Unsafe code lives only in `ibverbs/sys.rs`, the thin verbs layer.
#![deny(unsafe_code)]

pub mod access;
pub mod error;
#[cfg(feature = "ibverbs")]
pub mod ibverbs;
pub mod parity;
pub mod provider;
pub mod region;
pub mod registry;
pub mod soft;
pub mod testing;

pub use access::{Access, Advice};
pub use error::{DmaError, ProviderError, RegError};
pub use provider::{Provider, ProviderMr};
pub use region::Region;
pub use registry::{MrHandle, Registry, RegistryConfig, Stats};
pub use soft::{SoftMr, SoftNic};
