//! The `rayfence` binary for end-to-end tests. Cargo does not build a dependency's
//! binaries for this crate's tests (and a stale one would test old code), so it is
//! built once per test process and taken from next to the test executable
//! (`target/<profile>/deps/<test>` -> `target/<profile>/rayfence`). `$RAYFENCE_BIN`
//! overrides it.
//!
//! The nested build is `cargo test --no-run` over the packages `cargo xtask test`
//! tests: the same units with the same features, so under `cargo xtask test` (where
//! the agent's own integration tests already made cargo build the binary) it compiles
//! nothing. A narrower `cargo build -p rayfence-agent` unifies features differently
//! and rebuilt kube, hyper and the agent a second time: minutes and gigabytes.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Result;

/// The environment kept for the nested build: what cargo gives a test (`CARGO_*`,
/// build-script variables) would make it fingerprint differently and rebuild every
/// dependency.
/// What is kept changes the build the way it changed the outer one.
const KEPT_ENV: [&str; 10] = [
    "PATH",
    "HOME",
    "RUSTUP_HOME",
    "CARGO_HOME",
    "RUSTUP_TOOLCHAIN",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_INCREMENTAL",
    "CARGO_BUILD_JOBS",
    "RUSTFLAGS",
];

/// The outer test run's package selection (`cargo xtask test`'s).
const TEST_RUN_PACKAGES: [&str; 6] = [
    "--workspace",
    "--exclude",
    "rayfence-ebpf",
    "--exclude",
    "xtask",
    "--no-run",
];

pub fn rayfence_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build).clone().map_err(anyhow::Error::msg)
}

fn build() -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("RAYFENCE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace dir")?;
    let status = Command::new(cargo)
        .env_clear()
        .envs(
            KEPT_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .arg("test")
        .args(TEST_RUN_PACKAGES)
        .current_dir(workspace)
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the rayfence binary: {status}"));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("rayfence"))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no rayfence binary near {}", exe.display()))
}
