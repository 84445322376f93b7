//! # notifier-kvm
//!
//! A KVM guest-memory mirror: the guest-physical space of a real VM follows
//! a notifier-core [`Primary`](notifier_core::primary::Primary), so KVM (and
//! so the guest), the VMM's device emulation and any DMA see the primary's
//! current frame for every guest-physical page.
//!
//! - [`MemfdFrames`]: frames that are pages of one memfd.
//! - [`KvmMirror`]: the secondary MMU. Per region, a host view (reserved VA
//!   range; present pages are memfd pages mapped `MAP_FIXED`, the others are
//!   `PROT_NONE` holes) under a KVM memslot; an interval subscription that
//!   punches invalidated pages back to holes; a demand-fault path that maps
//!   pages in through the primary with `read_begin`/`read_retry`.
//! - [`DeviceView`]: vm-memory's `GuestMemory` over the mirror through a
//!   translation cache that is itself an interval subscriber.
//! - [`DirtyBitmap`]: KVM's dirty log merged with VMM writes and the
//!   mirror's write faults.
//! - [`guest`]: a tiny real-mode guest that reads and writes guest-physical
//!   memory on command, for tests and examples.
//!
//! - [`RealGuestMemory`]: guest RAM that the VMM owns ([`GuestRam`]:
//!   anonymous or memfd, 4 KiB or 2 MiB pages) under KVM memslots, watched
//!   through `notifier-uffd`, with versioned device views ([`GuestView`]).
//!
//! All `unsafe` code is in the private `sys` and `sys_ram` modules.
//!
//! Guide (repository `docs/guide/vmm.md`): embedding the mirror in a VMM.
//!
//! # Stability
//!
//! Pre-1.0: any 0.x release may change the API; breaking changes bump the
//! minor version and are listed in the commit log.
//! [`KvmMirror`], [`RealGuestMemory`], [`GuestRam`], [`GuestView`],
//! [`DeviceView`], [`MemfdFrames`] and [`DirtyBitmap`] are the product. The
//! `guest`, `baseline` and `testing` modules are scaffolding for tests,
//! examples and benches, and may move behind a feature or out of the crate.

mod error;
mod memfd;
mod sys;

pub use error::KvmError;
pub use memfd::MemfdFrames;
mod cache;
mod device;
mod dirty;
mod host_view;
pub mod memslot;
mod mirror;

pub use device::{DeviceRegion, DeviceRegions, DeviceSlices, DeviceView, PageGuard};
pub use dirty::DirtyBitmap;
pub use mirror::{KvmMirror, RegionInfo, RegionStats, LOG_DIRTY_PAGES};
mod guest_ram;
mod real;
mod real_view;
mod restore;
mod sys_ram;

pub use guest_ram::{GuestRam, RamBacking, RamPages};
pub use real::{watch_mode, Layout, RealGuestMemory, RealRegion, RealStats};
pub use real_view::{GuestSlices, GuestView};
pub use restore::{restore_mode, RestoreStats, SnapshotRestore};
pub mod baseline;
pub mod guest;
pub mod testing;
