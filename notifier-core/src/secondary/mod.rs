//! The secondary-MMU toolkit: what KVM's EPT, an RDMA NIC's translation
//! table and a GPU's page table have in common.
//!
//! * [`ExternalPageTable`]: a radix table from external addresses
//!   ([`Iova`], [`Gpa`], [`Va`]) to frames, 4 KiB and 2 MiB entries, with
//!   permissions; lock-free lookups.
//! * [`Tlb`]: a set-associative TLB model with batched flushes and counters.
//! * [`Mirror`]: an interval subscription + table + per-device TLBs + the
//!   fault-in loop of the sequence protocol; devices access frames only
//!   through it, and an [`AccessCheck`] hook (the coherence oracle of the
//!   `verify` module) sees every access.

mod ept;
mod ext_addr;
mod mirror;
mod tlb;

pub use ept::{EptError, ExtEntry, ExternalPageTable, HUGE_PAGES, HUGE_SIZE};
pub use ext_addr::{ext_span_fits, ExternalAddress, Gpa, Iova, Perm, Va, EXT_ADDR_LIMIT};
pub use mirror::{
    AccessCheck, FaultMode, FlushPolicy, Mirror, MirrorConfig, MirrorError, MirrorInject,
    MirrorShared, MirrorStats,
};
pub use tlb::{FlushBatch, Tlb, TlbConfig, TlbEntry, TlbError, TlbStats};
