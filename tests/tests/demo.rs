//! The demo scenario (`cargo xtask demo`) as tests, so CI runs it: with the agent
//! every verdict must match the hand-written matrix; without it, the harness must
//! see every flow get through, i.e. exactly the expected-dropped cells differ
//! (which checks the probing and the comparison themselves). Root only.

use std::path::{Path, PathBuf};
use std::process::Command;

use rayfence_tests::ProbeBin;
use rayfence_tests::demo::{self, Options};

fn probe() -> ProbeBin {
    ProbeBin::at(env!("CARGO_BIN_EXE_rf-probe"))
}

/// The `rayfence` binary: `$RAYFENCE_BIN`, else built here with `cargo build -p
/// rayfence-agent --bin rayfence` (cargo does not build a dependency's binaries
/// for this crate's tests, and a stale one would test old code) and taken from the
/// target directory (`target/<profile>/deps/demo-*` -> `target/<profile>/rayfence`).
fn rayfence() -> PathBuf {
    if let Some(p) = std::env::var_os("RAYFENCE_BIN") {
        return p.into();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace dir");
    // The environment cargo gives a test (CARGO_*, build-script variables) would
    // make this nested build fingerprint differently and rebuild dependencies.
    let keep = [
        "PATH",
        "HOME",
        "RUSTUP_HOME",
        "CARGO_HOME",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
    ];
    let status = Command::new(cargo)
        .env_clear()
        .envs(
            keep.iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .args(["build", "-p", "rayfence-agent", "--bin", "rayfence"])
        .current_dir(workspace)
        .status()
        .expect("running cargo build");
    assert!(
        status.success(),
        "cargo build of the rayfence binary: {status}"
    );
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("rayfence"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no rayfence binary near {}", exe.display()))
}

#[test]
fn without_agent_exactly_the_expected_drops_get_through() {
    let report = demo::run(&Options::new(None, probe())).expect("demo harness");
    assert_eq!(
        report.observed_allowed, report.probed,
        "with nothing enforcing, every probe must get through"
    );
    assert_eq!(
        report.mismatches.len(),
        report.expected_dropped,
        "the mismatches must be exactly the expected-dropped cells: {:#?}",
        report.mismatches
    );
    assert!(report.expected_dropped > 0 && !report.passed());
}

#[test]
fn with_agent_every_verdict_matches_the_expected_matrix() {
    let report = demo::run(&Options::new(Some(rayfence()), probe())).expect("demo");
    assert!(
        report.passed(),
        "{} of {} verdicts differ:\n{}",
        report.mismatches.len(),
        report.probed,
        report.mismatches.join("\n")
    );
}
