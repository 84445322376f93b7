//! The notifier machinery: range notifiers (seed 003's pte notifiers grown
//! up into `mmu_notifier`), interval notifiers with the sequence-count
//! collision-retry protocol, and teardown with grace periods.
//!
//! See `docs/DESIGN.md` for the protocols with their interleaving diagrams.

mod error;
mod event_gate;
mod interval;
mod interval_tree;
mod ops;
mod range;
mod subscriptions;

pub use error::NotifierError;
pub use event_gate::{EventGate, GateBatch};
pub use interval::{IntervalNotifier, IntervalSubscription};
pub use ops::{Hooks, IntervalNotifierOps, MmuNotifierOps};
pub use range::{Again, Event, InvalidateRange};
pub use subscriptions::{Invalidation, MmuNotifier, NotifierSubscriptions};
