//! `cargo xtask <command>`: everything a developer or CI runs, on a fresh machine.
//!
//! - `setup`: install the toolchains, LLVM and bpf-linker (idempotent).
//! - `test`: setup, then every test of the workspace (as root: the eBPF and network
//!   namespace tests need it).
//! - `bench datapath|engine`: setup, then the named benchmark.
//! - `demo`: setup, build the agent and the demo, then run the demo (as root): a
//!   simulated node, the agent against manifests, every flow probed, the matrix of
//!   expected vs observed verdicts; fails when any verdict differs.
//!
//! Arguments are parsed (clap) before anything runs, so `--help` on any command
//! only prints help. Errors print their chain (`{:#}`), never a backtrace.
mod setup;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

/// rayfence's set-up, test, demo and benchmark commands.
///
/// Each command first installs what it needs and skips what is there (a few seconds
/// when everything is present), saying what it does.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
enum Task {
    /// Install the toolchains, LLVM and bpf-linker (skips what is there).
    ///
    /// The Rust toolchain rust-toolchain.toml pins (with rustfmt and clippy), the
    /// eBPF crate's nightly with rust-src, Debian's LLVM 22 (llvm-22-dev,
    /// libpolly-22-dev), iproute2 and iptables, and bpf-linker built against LLVM
    /// 22. Debian packages need root.
    Setup,
    /// Setup, check formatting, then run every test of the workspace (as root).
    ///
    /// As root because the eBPF and network namespace tests load programs and
    /// create namespaces. Runs xtask's own tests (`cargo test -p xtask`), then
    /// `cargo test --workspace` for the rest (the eBPF crate left out: the agent's
    /// build embeds it) with the arguments given, after building the binaries the
    /// end-to-end tests run.
    #[command(
        override_usage = "cargo xtask test [CARGO_TEST_ARGS]... [-- TEST_ARGS...]",
        after_help = "Examples:\n  \
        cargo xtask test\n  \
        cargo xtask test explain             # only tests whose name contains explain\n  \
        cargo xtask test -- --nocapture      # show what the tests print"
    )]
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(
            value_name = "CARGO_TEST_ARGS",
            allow_hyphen_values = true,
            value_terminator = "--"
        )]
        cargo_args: Vec<String>,
        /// After `--`: passed to the test binaries (e.g. --nocapture).
        #[arg(
            value_name = "TEST_ARGS",
            allow_hyphen_values = true,
            trailing_var_arg = true
        )]
        test_args: Vec<String>,
    },
    /// Setup, then run a benchmark (datapath as root: it loads eBPF programs).
    #[command(override_usage = "cargo xtask bench <NAME> [CARGO_BENCH_ARGS]... [-- BENCH_ARGS...]")]
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        name: Benchmark,
        /// Passed to `cargo bench`.
        #[arg(
            value_name = "CARGO_BENCH_ARGS",
            allow_hyphen_values = true,
            value_terminator = "--"
        )]
        cargo_args: Vec<String>,
        /// After `--`: passed to the benchmark binary.
        #[arg(
            value_name = "BENCH_ARGS",
            allow_hyphen_values = true,
            trailing_var_arg = true
        )]
        bench_args: Vec<String>,
    },
    /// Setup, build and run the demo: a simulated node, the agent, every flow
    /// probed (as root).
    ///
    /// Builds the agent (rayfence) and the demo (rf-demo, rf-probe), then runs
    /// rf-demo: a flannel-like node in network namespaces with two RayClusters,
    /// `rayfence agent` against manifests, every flow probed and printed as a
    /// matrix of expected vs observed verdicts. Exits non-zero when a verdict
    /// differs. As root: it creates network namespaces and loads eBPF programs.
    #[command(
        after_help = "rf-demo's arguments: --shape NAME (the node's shape: CNI, kube-proxy mode, \
        runtime, cgroup layout, DNS; default flannel; --shapes lists them), \
        --timeout-ms N (per probe, default 1500), \
        --parallel N (probes at once, default 40), --ipv4-only, \
        --no-agent (harness self-check: every expected drop must get through)"
    )]
    Demo {
        /// Passed to rf-demo (see below).
        #[arg(
            value_name = "RF_DEMO_ARGS",
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Benchmark {
    /// ns per packet through the real programs (BPF_PROG_TEST_RUN).
    Datapath,
    /// Policy compile and single-change cost at 1,000 RayClusters.
    Engine,
    /// The real agent on a simulated node: ready time, edit -> enforced, RSS, CPU.
    Scale,
}

impl Benchmark {
    fn name(self) -> &'static str {
        match self {
            Benchmark::Datapath => "datapath",
            Benchmark::Engine => "engine",
            Benchmark::Scale => "scale",
        }
    }
}

fn main() -> ExitCode {
    // Help, a usage error: clap prints it and exits (0 for help, 2 otherwise).
    let cli = Cli::parse();
    match cli.command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The chain, not `Result`'s Debug: that would add a backtrace under
            // RUST_BACKTRACE=1, which says nothing about a missing package.
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Task {
    fn run(self) -> Result<()> {
        match self {
            Task::Setup => setup::ensure_all(),
            Task::Test {
                cargo_args,
                test_args,
            } => test(&cargo_args, &test_args),
            Task::Bench {
                name,
                cargo_args,
                bench_args,
            } => bench(name, &cargo_args, &bench_args),
            Task::Demo { args } => demo(&args),
        }
    }
}

fn test(cargo_args: &[String], test_args: &[String]) -> Result<()> {
    require_root("the eBPF and network namespace tests load programs and create namespaces")?;
    setup::ensure_all()?;
    setup::require_kubectl()?;
    say("checking formatting");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // A cargo invocation of their own: xtask's dependencies (cargo_metadata turns on
    // serde_json's unbounded_depth) would change the features, hence the builds, of
    // nearly every other crate in a --workspace one. They take no arguments: a
    // filter or flag for the workspace's tests may not apply to them.
    say("running xtask's own tests");
    run(cargo().args(["test", "--package", "xtask"]))?;
    let target = target_dir()?;
    check_free_disk(&target, FRESH_TEST_BUILD_GIB);
    // A one-off build gains nothing from incremental caches: they cost disk and time.
    let incremental = std::env::var_os("CARGO_INCREMENTAL").unwrap_or("0".into());
    let mut command = cargo();
    // The end-to-end tests run the agent's binaries. Cargo builds no binary of
    // another package for a test, so they are built here first, in the same build as
    // the suite's tests (the same features: the test run reuses it all), and the
    // tests take that one; with target flags the tests build their own.
    if !cargo_args.iter().any(|arg| arg.starts_with('-')) {
        say("building the binaries and the tests");
        run(cargo()
            .env("CARGO_INCREMENTAL", &incremental)
            .args(["build", "--bins", "--tests"])
            .args(WORKSPACE_TESTED))?;
        command.env("RAYFENCE_BIN", target.join("debug").join("rayfence"));
    }
    say("running the tests");
    run(command
        .env("CARGO_INCREMENTAL", &incremental)
        .arg("test")
        .args(WORKSPACE_TESTED)
        .args(cargo_args)
        .args(after_separator(test_args)))
}

/// What `cargo xtask test` builds and tests: the workspace but the eBPF crate (the
/// agent's build embeds it) and xtask (its own tests run apart, see [`test`]).
const WORKSPACE_TESTED: [&str; 5] = [
    "--workspace",
    "--exclude",
    "rayfence-ebpf",
    "--exclude",
    "xtask",
];

fn bench(name: Benchmark, cargo_args: &[String], bench_args: &[String]) -> Result<()> {
    match name {
        Benchmark::Datapath => require_root("the datapath benchmark loads eBPF programs")?,
        Benchmark::Scale => require_root("the scale benchmark runs the agent on a simulated node")?,
        Benchmark::Engine => {}
    }
    setup::ensure_all()?;
    let mut command = cargo();
    if name == Benchmark::Scale {
        // The agent it measures is the release binary, built here: a benchmark does
        // not make cargo build another package's binaries.
        say("building the agent (rayfence, release)");
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "rayfence-agent",
            "--bin",
            "rayfence",
        ]))?;
        command.env(
            "RAYFENCE_BIN",
            target_dir()?.join("release").join("rayfence"),
        );
    }
    // Every benchmark lives with the test kit (tests/benches/).
    command.args(["bench", "-p", "rayfence-tests", "--bench", name.name()]);
    say(&format!("running benchmark {}", name.name()));
    run(command.args(cargo_args).args(after_separator(bench_args)))
}

fn demo(args: &[String]) -> Result<()> {
    require_root("the demo creates network namespaces and loads eBPF programs")?;
    setup::ensure_all()?;
    say("building the agent (rayfence) and the demo (rf-demo, rf-probe)");
    run(cargo().args([
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
        .args(args))
}

/// What a fresh `cargo xtask test` writes under the target directory, in GiB, with
/// some room (measured: see README "Testing").
const FRESH_TEST_BUILD_GIB: u64 = 6;

/// Says how much disk the test build needs when less is free: a full disk shows up
/// as a compiler crash deep in a nested build, far from its cause.
fn check_free_disk(target: &Path, needed_gib: u64) {
    let existing = target
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    let Ok(out) = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(existing)
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(free) = text
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse::<u64>().ok())
    else {
        return;
    };
    let free_gib = free >> 30;
    if free_gib < needed_gib {
        say(&format!(
            "warning: {free_gib} GiB free under {}; a fresh test build needs about \
             {needed_gib} GiB (free some, or point CARGO_TARGET_DIR elsewhere)",
            existing.display()
        ));
    }
}

/// `-- ARGS` when there are any: what cargo hands on to the test or bench binaries.
fn after_separator(args: &[String]) -> Vec<&str> {
    if args.is_empty() {
        return Vec::new();
    }
    std::iter::once("--")
        .chain(args.iter().map(String::as_str))
        .collect()
}

/// The workspace's target directory, as cargo reports it (honours
/// `CARGO_TARGET_DIR` and `build.target-dir`).
fn target_dir() -> Result<PathBuf> {
    let mut command = cargo_metadata::MetadataCommand::new();
    command
        .cargo_path("cargo")
        .current_dir(workspace_root())
        .no_deps();
    for var in NESTED_CARGO_ENV_REMOVED {
        command.env_remove(var);
    }
    let metadata = command.exec().context("running cargo metadata")?;
    Ok(metadata.target_directory.into_std_path_buf())
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

/// What the outer `cargo xtask` (a `cargo run`) sets for xtask and must not reach a
/// nested cargo or rustup: they would pin it to the outer toolchain (which can be a
/// `cargo +toolchain xtask` override) instead of rust-toolchain.toml's.
const NESTED_CARGO_ENV_REMOVED: [&str; 10] = [
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "CARGO",
    "RUSTC_WRAPPER",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "OUT_DIR",
];

/// Prefixes of the package variables `cargo run` sets for xtask. Build scripts watch
/// some of them (ring's `rerun-if-env-changed=CARGO_PKG_NAME`), and cargo reads those
/// from its own environment: left in, a test's nested build (which has none) saw
/// them change and rebuilt ring, rustls, kube and the agent.
const NESTED_CARGO_ENV_PREFIXES_REMOVED: [&str; 2] = ["CARGO_PKG_", "CARGO_MANIFEST_"];

/// Removes what `cargo run` set for xtask from `command`'s environment.
fn remove_outer_cargo_env(command: &mut Command) {
    for var in NESTED_CARGO_ENV_REMOVED {
        command.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        let Some(name) = var.to_str() else { continue };
        if NESTED_CARGO_ENV_PREFIXES_REMOVED
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(&var);
        }
    }
}

/// `cargo` at the workspace root: the toolchain rust-toolchain.toml pins.
pub(crate) fn cargo() -> Command {
    nested("cargo")
}

/// `program` (cargo or rustup) at the workspace root, without the outer cargo's
/// variables.
pub(crate) fn nested(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    remove_outer_cargo_env(&mut command);
    command
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Result<Task, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_on_the_top_level_and_on_each_command_is_a_help_request() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["help"],
            &["help", "demo"],
            &["setup", "--help"],
            &["test", "--help"],
            &["test", "-h"],
            &["bench", "--help"],
            &["bench", "engine", "--help"],
            &["demo", "--help"],
            &["demo", "-h"],
        ] {
            let error = parse(args).expect_err("help is not a command to run");
            assert_eq!(error.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(error.exit_code(), 0, "{args:?}");
        }
    }

    #[test]
    fn top_level_help_lists_every_command() {
        let help = Cli::command().render_help().to_string();
        for command in ["setup", "test", "bench", "demo"] {
            assert!(
                help.lines()
                    .any(|line| line.trim_start().starts_with(command)),
                "{command} missing from:\n{help}"
            );
        }
    }

    #[test]
    fn unknown_command_and_missing_benchmark_are_usage_errors() {
        for args in [&["frobnicate"][..], &["bench"], &["bench", "network"], &[]] {
            let error = parse(args).expect_err("not a valid command line");
            assert_ne!(error.exit_code(), 0, "{args:?}");
        }
    }

    #[test]
    fn test_passes_cargo_args_and_test_binary_args_on_separately() {
        assert_eq!(
            parse(&["test"]).unwrap(),
            Task::Test {
                cargo_args: vec![],
                test_args: vec![]
            }
        );
        assert_eq!(
            parse(&[
                "test",
                "--test",
                "demo",
                "--",
                "--nocapture",
                "--test-threads",
                "1"
            ])
            .unwrap(),
            Task::Test {
                cargo_args: strings(&["--test", "demo"]),
                test_args: strings(&["--nocapture", "--test-threads", "1"]),
            }
        );
        assert_eq!(
            parse(&["test", "--", "--nocapture"]).unwrap(),
            Task::Test {
                cargo_args: vec![],
                test_args: strings(&["--nocapture"]),
            }
        );
        assert_eq!(
            parse(&["test", "datapath_", "--", "--exact", "--", "x"]).unwrap(),
            Task::Test {
                cargo_args: strings(&["datapath_"]),
                test_args: strings(&["--exact", "--", "x"]),
            }
        );
    }

    #[test]
    fn test_binary_args_reach_cargo_after_a_separator() {
        assert_eq!(
            after_separator(&strings(&["--nocapture"])),
            ["--", "--nocapture"]
        );
        assert!(after_separator(&[]).is_empty());
    }

    #[test]
    fn bench_takes_a_known_benchmark_and_its_args() {
        assert_eq!(
            parse(&["bench", "engine", "--", "--quick"]).unwrap(),
            Task::Bench {
                name: Benchmark::Engine,
                cargo_args: vec![],
                bench_args: strings(&["--quick"]),
            }
        );
        assert_eq!(
            parse(&["bench", "datapath"]).unwrap(),
            Task::Bench {
                name: Benchmark::Datapath,
                cargo_args: vec![],
                bench_args: vec![],
            }
        );
    }

    #[test]
    fn demo_passes_every_following_arg_to_rf_demo() {
        assert_eq!(
            parse(&["demo", "--ipv4-only", "--parallel", "10"]).unwrap(),
            Task::Demo {
                args: strings(&["--ipv4-only", "--parallel", "10"])
            }
        );
        assert_eq!(parse(&["demo"]).unwrap(), Task::Demo { args: vec![] });
    }
}
