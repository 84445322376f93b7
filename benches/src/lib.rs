//! Benchmarks and the `notifier` CLI of the notifier workspace.
//!
//! The criterion benches live in `benches/`; `docs/BENCHMARKS.md` lists
//! their figures with the commands that produced them. The stress
//! benchmark is a library ([`stress`]) so integration tests drive it too.
//!
//! Guide (repository `docs/guide/stress.md`): the CLI, fault injection,
//! record and replay.
//!
//! # Stability
//!
//! Not published. The `notifier` CLI's options, exit statuses (0 clean, 1
//! violations, 2 usage, 3 failure) and JSON fields are its interface; new
//! JSON fields may be added, existing ones keep their meaning.

pub mod rng;
pub mod stress;
