//! The stress benchmark as a test: short runs find zero violations; each
//! injection mode makes the oracle find some; a recorded run replays
//! exactly; bad usage exits 2.

use std::process::Command;

use notifier_bench::stress::{progress_line, run, Backend, Inject, StressConfig};

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

/// A scratch directory for one test's files.
fn scratch(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("notifier-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Exit status, stdout and stderr of `notifier ARGS`.
fn outcome(args: &[&str]) -> (Option<i32>, String, String) {
    let out = notifier().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every usage error exits 2 with a message that names the culprit, before
/// anything runs (nothing on stdout).
#[test]
fn usage_errors_exit_2_with_the_reason() {
    let dir = scratch("usage");
    let missing_dir = dir.join("no-such-dir").join("x.json");
    let missing_dir = missing_dir.to_str().unwrap();
    let a_dir = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 12] = [
        (&["stress", "--seconds", "-1"], "--seconds"),
        (&["stress", "--seconds", "0"], "--seconds"),
        (&["stress", "--threads", "-1"], "--threads"),
        (&["stress", "--mirrors", "65"], "--mirrors"),
        (&["stress", "--seed", "-5"], "--seed"),
        (&["stress", "--steps", "0"], "--steps"),
        (
            &["stress", "--seconds", "5", "--json", missing_dir],
            "--json",
        ),
        (&["stress", "--seconds", "5", "--plot", a_dir], "--plot"),
        (
            &["stress", "--backend", "rdma", "--inject", "late-flush"],
            "--backend rdma",
        ),
        (
            &["stress", "--steps", "1000", "--inject", "skip-read-retry"],
            "deterministic",
        ),
        (
            &["stress", "--threads", "1", "--inject", "skip-read-retry"],
            "--threads 1",
        ),
        (&["bench", "nope"], "unknown bench"),
    ];
    for (args, names) in cases {
        let (code, out, err) = outcome(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(names),
            "{args:?}: the message should name {names}: {err}"
        );
        assert!(out.is_empty(), "{args:?} ran: {out}");
    }
    assert!(!dir.join("no-such-dir").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--help` states the exit statuses; the status of a run that fails after
/// its usage was checked (its report cannot be written) is 3.
#[test]
fn help_states_the_exit_statuses_and_a_failed_run_exits_3() {
    for args in [&["--help"][..], &["stress", "--help"]] {
        let (code, out, _) = outcome(args);
        assert_eq!(code, Some(0));
        for line in [
            "0  clean",
            "1  violations",
            "2  bad usage",
            "3  the run failed",
        ] {
            assert!(out.contains(line), "{args:?} lacks {line:?}:\n{out}");
        }
    }
    if std::path::Path::new("/dev/full").exists() {
        let (code, _, err) = outcome(&[
            "stress",
            "--quiet",
            "--steps",
            "2000",
            "--json",
            "/dev/full",
        ]);
        assert_eq!(code, Some(3), "{err}");
        assert!(err.contains("/dev/full"), "{err}");
    }
}

/// Issue 18, item 6: in a deterministic run every `--inject` mode is either
/// caught (exit 1, the violations printed with hex addresses) or refused
/// (exit 2) with the reason.
#[test]
fn every_injection_mode_is_caught_or_refused_in_deterministic_runs() {
    for (backend, inject) in ["soft", "all"]
        .into_iter()
        .flat_map(|b| Inject::ALL.map(|i| (b, i)))
    {
        let (code, out, err) = outcome(&[
            "stress",
            "--quiet",
            "--backend",
            backend,
            "--steps",
            "30000",
            "--inject",
            inject.name(),
        ]);
        match inject.needs_threads() {
            Some(why) => {
                assert_eq!(code, Some(2), "{backend} {inject:?}: {out}{err}");
                assert!(err.contains(why), "{backend} {inject:?}: {err}");
            }
            None => {
                assert_eq!(
                    code,
                    Some(1),
                    "{backend} {inject:?} found nothing: {out}{err}"
                );
                assert!(out.contains("violations found, as expected"), "{out}");
                let first = out
                    .lines()
                    .find(|l| l.starts_with("stale "))
                    .unwrap_or_else(|| panic!("{inject:?}: no violation printed: {out}"));
                assert!(first.contains(" at 0x"), "{first}");
                let history = out
                    .lines()
                    .find(|l| l.starts_with("    #"))
                    .unwrap_or_else(|| panic!("{inject:?}: no history printed: {out}"));
                assert!(history.contains("0x"), "{history}");
            }
        }
    }
}

/// `--backend all` says which backends ran and reports each: in the table
/// and as JSON entries whose totals add up to the run's.
#[test]
fn backend_all_reports_per_backend() {
    let dir = scratch("all");
    let json = dir.join("all.json");
    let (code, out, err) = outcome(&[
        "stress",
        "--quiet",
        "--backend",
        "all",
        "--steps",
        "20000",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let backends = v["backends"].as_array().expect("backends array");
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "soft+rdma", "{names:?}");
    assert!(
        out.contains(&format!("backend all ({})", names.join(", "))),
        "the header names the backends that ran: {out}"
    );
    for key in ["accesses", "operations", "invalidations", "violations"] {
        let sum: u64 = backends.iter().map(|b| b[key].as_u64().unwrap()).sum();
        assert_eq!(sum, v[key].as_u64().unwrap(), "{key}");
    }
    if names.len() > 1 {
        assert!(out.contains("per backend"), "{out}");
        for n in &names {
            assert!(
                out.lines().any(|l| l.trim_start().starts_with(n)),
                "{n}: {out}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The progress line fits an 80-column terminal (with the spinner) even
/// with extreme figures.
#[test]
fn the_progress_line_fits_80_columns() {
    for (t, f, acc, ops, viol) in [
        (0.0, Some(0.0), 0, 0, 0),
        (0.05, Some(1.0), u64::MAX, u64::MAX, u64::MAX),
        (86_400.0, Some(1.0), 123_456_789_012, 987_654_321, 4_000_000),
        (1.0, None, 999_949, 999_960, 1_000),
    ] {
        let line = progress_line(t, f, acc, ops, viol);
        assert!(
            line.chars().count() + 2 <= 80,
            "{} columns: {line}",
            line.len() + 2
        );
        assert!(line.contains("violations"), "{line}");
    }
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
