//! The notifier machinery: range notifiers (seed 003's pte notifiers grown
//! up into `mmu_notifier`), interval notifiers with the sequence-count
//! collision-retry protocol, and teardown with grace periods.
//!
//! See `docs/DESIGN.md` for the protocols with their interleaving diagrams.

mod bracket;
mod error;
mod event_gate;
mod guard;
mod hooks;
mod interval;
mod interval_tree;
mod ops;
mod range;
mod range_sub;
mod subscriptions;

pub use bracket::Invalidation;
pub use error::{Hook, NotifierError};
pub use event_gate::{EventGate, GateBatch};
pub use interval::{IntervalNotifier, IntervalSubscription};
pub use ops::{Hooks, IntervalNotifierOps, MmuNotifierOps};
pub use range::{Again, Event, InvalidateRange};
pub use range_sub::MmuNotifier;
pub use subscriptions::NotifierSubscriptions;
