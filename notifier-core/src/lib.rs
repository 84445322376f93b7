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
