//! # notifier-core
//!
//! Linux's secondary-MMU machinery in userspace: a primary address space
//! whose every page-table change is announced, range and interval notifiers
//! with the kernel's protocols, and a toolkit for secondary MMUs (external
//! page tables and TLBs) that never use a translation after its
//! invalidation has started.
//!
//! This crate is pure Rust: no libc, no `unsafe`. Backends that touch the
//! OS (userfaultfd, KVM, RDMA) live in their own crates.
//!
//! Guides (repository `docs/guide/`): `vmm.md`, `rdma-real-memory.md`, `stress.md`.
//!
//! # Stability
//!
//! Pre-1.0: any 0.x release may change the API; breaking changes bump the
//! minor version and are listed in the commit log.
//! The semantics that follow the kernel (the notifier hooks and their
//! pairing, the sequence-count protocol, the `mm` operations and the
//! `vm_normal_page` rules) change only to follow the kernel more closely.
//! The `verify` feature (oracle, recorder, conformance suite) is tooling
//! and may change faster; the fault-injection switches (`Mm::inject`,
//! `Mirror::inject`) may move behind a `testing` feature.
#![forbid(unsafe_code)]

pub mod addr;
pub mod notifier;
mod sync;

pub use addr::{PageRange, RangeError, PAGE_SHIFT, PAGE_SIZE};
pub mod frame;
#[cfg(not(loom))]
pub mod mm;
pub mod primary;
pub mod secondary;
#[cfg(all(feature = "verify", not(loom)))]
pub mod verify;
