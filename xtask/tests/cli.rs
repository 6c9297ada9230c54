//! The built `xtask` binary as a user meets it: help on every command prints help,
//! exits 0 and runs nothing; errors exit non-zero with their message and no
//! backtrace, even under `RUST_BACKTRACE=1`.
//!
//! `PATH` holds only stand-ins for every program xtask may start (cargo, rustup,
//! apt-get, ...): each records its call in a log and fails, so the log shows
//! whether anything was run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const PROGRAMS: &[&str] = &[
    "cargo",
    "rustup",
    "rustc",
    "apt-get",
    "dpkg-query",
    "bpf-linker",
    "kubectl",
];

/// A directory of recording stand-ins, removed on drop.
struct FakePath {
    dir: PathBuf,
}

impl FakePath {
    fn new() -> FakePath {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xtask-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let log = dir.join("calls.log");
        for program in PROGRAMS {
            let path = dir.join(program);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{program} $*\" >> '{}'\nexit 1\n",
                    log.display()
                ),
            )
            .expect("stand-in");
            set_executable(&path);
        }
        FakePath { dir }
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default()
    }

    fn xtask(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env("PATH", &self.dir)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("running xtask")
    }
}

impl Drop for FakePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_command_exits_0_and_runs_nothing() {
    for args in [&["--help"][..], &["-h"], &["help"]] {
        let fake = FakePath::new();
        let out = fake.xtask(args);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        for command in ["setup", "test", "bench", "demo"] {
            assert!(
                stdout
                    .lines()
                    .any(|line| line.trim_start().starts_with(command)),
                "{args:?}: {command} missing from:\n{stdout}"
            );
        }
        assert_eq!(text(&out.stderr), "", "{args:?}");
        assert_eq!(fake.calls(), "", "{args:?} ran something");
    }
}

#[test]
fn help_of_each_command_exits_0_and_runs_nothing() {
    for (args, says) in [
        (&["setup", "--help"][..], "rust-toolchain.toml"),
        (&["test", "--help"], "cargo xtask test"),
        (&["test", "-h"], "cargo xtask test"),
        (&["bench", "--help"], "datapath"),
        (&["bench", "engine", "--help"], "engine"),
        (&["demo", "--help"], "rf-demo"),
        (&["demo", "-h"], "rf-demo"),
        (&["help", "demo"], "rf-demo"),
    ] {
        let fake = FakePath::new();
        let out = fake.xtask(args);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        assert!(stdout.contains(says), "{args:?}:\n{stdout}");
        assert_eq!(text(&out.stderr), "", "{args:?}");
        assert_eq!(fake.calls(), "", "{args:?} ran something");
    }
}

#[test]
fn unknown_command_is_a_usage_error_without_backtrace() {
    let fake = FakePath::new();
    let out = fake.xtask(&["frobnicate"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'frobnicate'"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(fake.calls(), "");
}

#[test]
fn no_command_prints_usage_and_fails() {
    let fake = FakePath::new();
    let out = fake.xtask(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Usage: cargo xtask <COMMAND>"), "{stderr}");
    assert_eq!(fake.calls(), "");
}

#[test]
fn a_failing_command_prints_its_error_chain_without_backtrace() {
    let fake = FakePath::new();
    // rustup (the stand-in) fails, so setup stops at its first check.
    let out = fake.xtask(&["setup"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("Error: rustup is needed"),
        "the error, first and alone:\n{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");
    assert_eq!(fake.calls(), "rustup --version\n");
}
