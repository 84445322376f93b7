//! Benchmarks and the `notifier` CLI of the notifier workspace.
//!
//! The criterion benches live in `benches/`; `docs/BENCHMARKS.md` lists
//! their figures with the commands that produced them. The stress
//! benchmark is a library ([`stress`]) so integration tests drive it too.

pub mod rng;
pub mod stress;
