//! `cargo xtask <command>`: everything a developer or CI runs, on a fresh machine.
//!
//! - `setup`: install the pinned toolchains, LLVM and bpf-linker (idempotent).
//! - `test`: setup, then every test of the workspace (as root: the eBPF and network
//!   namespace tests need it).
//! - `bench datapath|engine`: setup, then the named benchmark.
//! - `demo`: setup, build the agent and the demo, then run the demo (as root): a
//!   simulated node, the agent against manifests, every flow probed, the matrix of
//!   expected vs observed verdicts; fails when any verdict differs.
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

const USAGE: &str = "usage: cargo xtask <setup | test [cargo test args] | bench <datapath|engine> | demo [rf-demo args]>";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match command.as_str() {
        "setup" => setup::ensure_all(),
        "test" => test(rest),
        "bench" => bench(rest),
        "demo" => demo(rest),
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn test(extra: &[String]) -> Result<()> {
    require_root("the eBPF and network namespace tests load programs and create namespaces")?;
    setup::ensure_all()?;
    setup::require_kubectl()?;
    say("checking formatting");
    run(cargo(setup::HOST_TOOLCHAIN).args(["fmt", "--all", "--", "--check"]))?;
    say("running the tests");
    run(cargo(setup::HOST_TOOLCHAIN)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "rayfence-ebpf",
            "--exclude",
            "xtask",
        ])
        .args(extra))?;
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    let Some(name) = args.first() else {
        bail!("{USAGE}")
    };
    if !["datapath", "engine"].contains(&name.as_str()) {
        bail!("unknown benchmark {name:?}\n{USAGE}");
    }
    if name == "datapath" {
        require_root("the datapath benchmark loads eBPF programs")?;
    }
    setup::ensure_all()?;
    say(&format!("running benchmark {name}"));
    run(cargo(setup::HOST_TOOLCHAIN)
        .args(["bench", "-p", "rayfence-agent", "--bench", name])
        .args(&args[1..]))
}

fn demo(extra: &[String]) -> Result<()> {
    require_root("the demo creates network namespaces and loads eBPF programs")?;
    setup::ensure_all()?;
    say("building the agent (rayfence) and the demo (rf-demo, rf-probe)");
    run(cargo(setup::HOST_TOOLCHAIN).args([
        "build",
        "--package",
        "rayfence-agent",
        "--bin",
        "rayfence",
        "--package",
        "rayfence-tests",
        "--bin",
        "rf-demo",
        "--bin",
        "rf-probe",
    ]))?;
    let bin = target_dir()?.join("debug");
    let rayfence = bin.join("rayfence");
    say(&format!(
        "running {} --rayfence {}",
        bin.join("rf-demo").display(),
        rayfence.display()
    ));
    run(Command::new(bin.join("rf-demo"))
        .arg("--rayfence")
        .arg(&rayfence)
        .arg("--probe")
        .arg(bin.join("rf-probe"))
        .args(extra))
}

/// The workspace's target directory, as cargo reports it (honours
/// `CARGO_TARGET_DIR` and `build.target-dir`).
fn target_dir() -> Result<PathBuf> {
    let out = cargo(setup::HOST_TOOLCHAIN)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    let json = String::from_utf8_lossy(&out.stdout);
    const KEY: &str = "\"target_directory\":\"";
    let Some(start) = json.find(KEY).map(|i| i + KEY.len()) else {
        bail!("cargo metadata did not report a target_directory");
    };
    let end = json[start..]
        .find('"')
        .context("unterminated target_directory")?;
    Ok(PathBuf::from(&json[start..start + end]))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// `cargo +<toolchain>` at the workspace root, without the variables the outer
/// `cargo run` set (they would pin the nested cargo to the outer toolchain).
pub(crate) fn cargo(toolchain: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .arg(format!("+{toolchain}"))
        .current_dir(workspace_root());
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "CARGO_MANIFEST_DIR",
    ] {
        command.env_remove(var);
    }
    command
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

pub(crate) fn say(message: &str) {
    eprintln!("xtask: {message}");
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
