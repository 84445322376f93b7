//! The stress benchmark from code, step by step as `docs/guide/stress.md`
//! walks through it with the `notifier` CLI: a clean threaded run, a
//! deterministic run with a broken protocol that the oracle catches, a
//! recording and its exact replay, and a configuration refused before it
//! runs.
//!
//! `cargo run --release -p notifier-bench --example stress_walkthrough`
//!
//! Exits with an error if any step does not behave as the guide says.

use notifier_bench::stress::{self, Backend, Inject, Report, StressConfig};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// An error unless `ok`.
fn expect(ok: bool, what: impl FnOnce() -> String) -> Res {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// No progress output.
fn quiet(_: f64, _: u64, _: u64, _: u64) {}

fn main() -> Res {
    // Step 1: `notifier stress --seconds 1 --threads 2`. Mutator threads
    // change the software primary while device threads use TLB mirrors;
    // the coherence oracle checks every device access.
    let clean = StressConfig {
        backend: Backend::Soft,
        threads: 2,
        seed: 0x5eed,
        seconds: 1.0,
        steps: None,
        inject: None,
        subscriptions: 1000,
        mirrors: 2,
        ops_per_sec: 100_000,
        fault_delay: 0,
        flush_at_end: false,
    };
    stress::preflight(&clean)?;
    let r = stress::run(&clean, &quiet)?;
    println!(
        "step 1, clean threaded run: {} verified accesses, {} operations, {} invalidations, \
         {} violations",
        r.accesses, r.operations, r.invalidations, r.violations
    );
    expect(r.violations == 0 && r.accesses > 0, || r.table())?;

    // Step 2: `notifier stress --steps 30000 --inject late-flush`. The
    // mirrors flush their TLBs only after the bracket ended, so a device
    // can use a translation whose frame the primary already changed. One
    // thread interleaves mutators and devices from the seed.
    let broken = StressConfig {
        steps: Some(30_000),
        inject: Some(Inject::LateFlush),
        ..clean.clone()
    };
    stress::preflight(&broken)?;
    let r = stress::run(&broken, &quiet)?;
    println!(
        "step 2, --inject {}: {} violations; the first:\n{}",
        Inject::LateFlush.name(),
        r.violations,
        r.first_violations.first().map_or("", String::as_str)
    );
    expect(r.violations > 0, || r.table())?;

    // Step 3: `--record PATH` then `--replay PATH`. A deterministic run's
    // report carries its configuration; running that configuration again
    // reproduces every count and the hash of the operation sequence.
    let recording = serde_json::to_string_pretty(&r)?;
    let recorded: Report = serde_json::from_str(&recording)?;
    let replayed = stress::run(&recorded.config, &quiet)?;
    expect(replayed.replay_key() == recorded.replay_key(), || {
        format!(
            "replay diverged:\n  recorded {:?}\n  replayed {:?}",
            recorded.replay_key(),
            replayed.replay_key()
        )
    })?;
    println!(
        "step 3, replay of a {}-byte recording: identical ({} violations, operation hash {:#x})",
        recording.len(),
        replayed.violations,
        replayed.op_log_hash.unwrap_or(0)
    );

    // Step 4: what one thread cannot catch is refused before it runs (the
    // CLI exits 2 with this message).
    let blind = StressConfig {
        inject: Some(Inject::SkipReadRetry),
        ..broken
    };
    match stress::preflight(&blind) {
        Err(why) => println!("step 4, refused: {why}"),
        Ok(()) => return Err("--steps with --inject skip-read-retry was accepted".into()),
    }
    Ok(())
}
