//! The `rayfence` binary for end-to-end tests. Cargo does not build a dependency's
//! binaries for this crate's tests (and a stale one would test old code), so it is
//! built once per test process and taken from next to the test executable
//! (`target/<profile>/deps/<test>` -> `target/<profile>/rayfence`). `$RAYFENCE_BIN`
//! overrides it.
//!
//! `cargo xtask test` runs the whole suite with `$RAYFENCE_BIN` set to the binary it
//! built just before, in one `cargo build --bins --tests` of the workspace (so with
//! the suite's features): a nested `cargo build -p rayfence-agent` unifies features
//! differently and rebuilt kube, hyper and the agent a second time, minutes and
//! gigabytes. Run on its own (`cargo test -p rayfence-tests --test ...`), a test
//! builds just the agent's binaries.
//!
//! The CNI plugin (`rayfence-cni`) comes the same way: `$RAYFENCE_CNI_BIN`, else the
//! `rayfence-cni` next to `$RAYFENCE_BIN` (that build makes every binary of the
//! workspace), else the nested build, which builds all three. The kubectl plugin
//! (`kubectl-rayfence`) the same way: `$KUBECTL_RAYFENCE_BIN`, else next to
//! `$RAYFENCE_BIN`, else the nested build.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Result;

/// The environment kept for the nested build: what cargo gives a test (`CARGO_*`,
/// build-script variables) would make it fingerprint differently and rebuild every
/// dependency. What is kept changes the build the way it changed the outer one.
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

pub fn rayfence_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("RAYFENCE_BIN") {
            return Ok(PathBuf::from(path));
        }
        build("rayfence")
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The chained CNI plugin, `rayfence-cni`.
pub fn rayfence_cni_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| sibling_or_build("RAYFENCE_CNI_BIN", "rayfence-cni"))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The kubectl plugin, `kubectl-rayfence`.
pub fn kubectl_rayfence_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| sibling_or_build("KUBECTL_RAYFENCE_BIN", "kubectl-rayfence"))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `$variable`, else `name` next to `$RAYFENCE_BIN`, else the nested build's.
fn sibling_or_build(variable: &str, name: &str) -> std::result::Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(variable) {
        return Ok(PathBuf::from(path));
    }
    if let Some(agent) = std::env::var_os("RAYFENCE_BIN") {
        let sibling = Path::new(&agent).with_file_name(name);
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    build(name)
}

/// Builds the three binaries (one nested build whichever is asked first; each
/// `OnceLock` above runs it at most once) and returns `name`'s path.
fn build(name: &str) -> std::result::Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace dir")?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // A benchmark (target/release/deps/...) measures the release binaries: build
    // those, or it would find a stale release binary next to it.
    let release = exe
        .ancestors()
        .nth(2)
        .is_some_and(|profile| profile.file_name() == Some("release".as_ref()));
    let status = Command::new(cargo)
        .env_clear()
        .envs(
            KEPT_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .args([
            "build",
            "-p",
            "rayfence-agent",
            "--bin",
            "rayfence",
            "--bin",
            "rayfence-cni",
            "--bin",
            "kubectl-rayfence",
        ])
        .args(release.then_some("--release"))
        .current_dir(workspace)
        .status()
        .map_err(|e| format!("running cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the rayfence binaries: {status}"));
    }
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no {name} binary near {}", exe.display()))
}
