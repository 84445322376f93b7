//! The stress benchmark as a test: short runs find zero violations; each
//! injection mode makes the oracle find some; a recorded run replays
//! exactly; bad usage exits 2.

use std::process::Command;

use notifier_bench::stress::{run, Backend, Inject, StressConfig};

fn cfg(seconds: f64, inject: Option<Inject>) -> StressConfig {
    StressConfig {
        backend: Backend::Soft,
        threads: 2,
        seed: 7,
        seconds,
        steps: None,
        inject,
        subscriptions: 200,
        mirrors: 2,
        ops_per_sec: 50_000,
        fault_delay: 0,
        flush_at_end: false,
    }
}

fn quiet(_: f64, _: u64, _: u64, _: u64) {}

#[test]
fn clean_runs_find_no_violation() {
    for threads in [1, 2, 3] {
        let r = run(
            &StressConfig {
                threads,
                ..cfg(1.0, None)
            },
            &quiet,
        )
        .unwrap();
        assert_eq!(r.violations, 0, "{}", r.first_violations.join("\n"));
        assert!(r.accesses > 10_000 && r.operations > 1_000, "{}", r.table());
        assert!(r.invalidations > 0 && r.faults > 0);
        assert_eq!(r.checks, r.accesses, "every completed access is checked");
    }
}

#[test]
fn a_clean_run_with_a_slow_fault_path_still_finds_nothing() {
    let r = run(
        &StressConfig {
            fault_delay: 2000,
            ..cfg(1.0, None)
        },
        &quiet,
    )
    .unwrap();
    assert_eq!(r.violations, 0);
    assert!(
        r.retries > 0,
        "the widened window must produce collisions: {}",
        r.table()
    );
}

#[test]
fn end_flushing_mirrors_are_clean_while_frames_outlive_the_bracket() {
    let r = run(
        &StressConfig {
            flush_at_end: true,
            ..cfg(1.5, None)
        },
        &quiet,
    )
    .unwrap();
    assert_eq!(r.violations, 0, "{}", r.first_violations.join("\n"));
    assert!(r.accesses > 10_000, "{}", r.table());
}

#[test]
fn every_injection_mode_is_caught() {
    for inject in [
        Inject::SkipInvalidate,
        Inject::SkipReadRetry,
        Inject::LateFlush,
        Inject::FreeBeforeEnd,
    ] {
        let r = run(&cfg(2.0, Some(inject)), &quiet).unwrap();
        assert!(
            r.violations >= 1,
            "{inject:?} found nothing:\n{}",
            r.table()
        );
        assert!(!r.first_violations.is_empty());
    }
}

#[test]
fn deterministic_runs_replay_exactly() {
    for inject in [None, Some(Inject::LateFlush)] {
        let c = StressConfig {
            steps: Some(40_000),
            ..cfg(0.0, inject)
        };
        let a = run(&c, &quiet).unwrap();
        let b = run(&c, &quiet).unwrap();
        assert_eq!(a.replay_key(), b.replay_key());
        if inject.is_some() {
            assert!(a.violations > 0);
        }
    }
}

fn notifier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_notifier"))
}

#[test]
fn cli_exit_codes_and_record_replay() {
    let dir = std::env::temp_dir().join(format!("notifier-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rec = dir.join("run.json");
    let json = dir.join("report.json");
    let svg = dir.join("lat.svg");
    let st = notifier()
        .args([
            "stress",
            "--quiet",
            "--steps",
            "30000",
            "--inject",
            "late-flush",
            "--record",
        ])
        .arg(&rec)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(1), "violations exit 1");
    let out = notifier()
        .args(["stress", "--quiet", "--replay"])
        .arg(&rec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("replay matches the recording exactly"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1));
    let st = notifier()
        .args(["stress", "--quiet", "--seconds", "1", "--json"])
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(0));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in [
        "violations",
        "accesses",
        "invalidations",
        "faults",
        "retries",
        "seconds",
    ] {
        assert!(v.get(k).is_some(), "JSON lacks {k}");
    }
    assert_eq!(v["violations"], 0);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    for bad in [
        vec!["stress", "--seconds", "0"],
        vec!["stress", "--seconds", "1e9"],
        vec!["stress", "--backend", "nope"],
        vec!["stress", "--threads", "0"],
        vec!["stress", "--bogus"],
        vec!["bench", "nope"],
    ] {
        assert_eq!(
            notifier().args(&bad).output().unwrap().status.code(),
            Some(2),
            "{bad:?}"
        );
    }
    let missing = dir.join("missing.json");
    assert_eq!(
        notifier()
            .args(["stress", "--replay"])
            .arg(&missing)
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    std::fs::write(dir.join("garbage.json"), "not json").unwrap();
    assert_eq!(
        notifier()
            .args(["stress", "--replay"])
            .arg(dir.join("garbage.json"))
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--backend kvm`: a real VM whose memory follows the software primary;
/// device-emulation accesses (oracle-checked) and real guest reads
/// (value-checked) under the mutators find nothing. Skips visibly without
/// `/dev/kvm` unless `NOTIFIER_REQUIRE_KVM=1`.
#[test]
fn kvm_backend_runs_clean() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        if std::env::var("NOTIFIER_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("kvm_backend_runs_clean: /dev/kvm required (NOTIFIER_REQUIRE_KVM=1): {e}");
        }
        eprintln!("SKIP: kvm_backend_runs_clean: /dev/kvm unavailable: {e}");
        return;
    }
    let r = run(
        &StressConfig {
            backend: Backend::Kvm,
            ..cfg(1.5, None)
        },
        &quiet,
    )
    .unwrap();
    assert_eq!(r.violations, 0, "{}", r.first_violations.join("\n"));
    assert!(r.accesses > 0 && r.operations > 0, "{}", r.table());
    assert!(r.invalidations > 0 && r.faults > 0, "{}", r.table());
    eprintln!(
        "kvm: {} accesses ({} by real guests), {} operations",
        r.accesses, r.guest_reads, r.operations
    );
}

/// `--backend uffd`: real memory watched by a userfaultfd monitor, mutated
/// by real madvise, munmap + mmap, mremap and CPU writes while devices use
/// mirrors over it; the strict oracle finds nothing. Skips visibly without
/// userfaultfd unless `NOTIFIER_REQUIRE_UFFD=1`.
#[test]
fn uffd_backend_runs_clean() {
    if let Err(e) = notifier_uffd::UffdMonitor::new() {
        if notifier_uffd::uffd_required() {
            panic!("uffd_backend_runs_clean: userfaultfd required (NOTIFIER_REQUIRE_UFFD=1): {e}");
        }
        eprintln!("SKIP: uffd_backend_runs_clean: userfaultfd unavailable: {e}");
        return;
    }
    let r = run(
        &StressConfig {
            backend: Backend::Uffd,
            ..cfg(1.5, None)
        },
        &quiet,
    )
    .unwrap();
    assert_eq!(r.violations, 0, "{}", r.first_violations.join("\n"));
    assert!(r.accesses > 0 && r.operations > 0, "{}", r.table());
    assert!(r.invalidations > 0 && r.faults > 0, "{}", r.table());
    eprintln!(
        "uffd: {} accesses, {} operations, {} invalidations",
        r.accesses, r.operations, r.invalidations
    );
}
