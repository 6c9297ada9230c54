//! Installs what building and testing rayfence needs, idempotently: each step checks
//! first and says what it does. The host toolchain is the one rust-toolchain.toml
//! pins; the other versions are pinned here and nowhere else (the agent's build.rs
//! names the same eBPF nightly).
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, nested, run, say};

/// What xtask uses of the host toolchain (rust-toolchain.toml lists them as well, so
/// rustup installs them with it).
const HOST_COMPONENTS: &[&str] = &["rustfmt", "clippy"];
/// eBPF toolchain: its LLVM major (22) must match bpf-linker's LLVM.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";
/// Debian packages: LLVM for bpf-linker; iproute2 and iptables for the network
/// namespace tests and the demo (kube-proxy-like DNAT).
const APT_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "iproute2", "iptables"];

pub fn ensure_all() -> Result<()> {
    let host = ensure_host_toolchain()?;
    ensure_toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    say(&format!(
        "prerequisites in place: Rust {host} (rust-toolchain.toml), {EBPF_TOOLCHAIN} + rust-src, {}, bpf-linker {BPF_LINKER_VERSION}",
        APT_PACKAGES.join(", ")
    ));
    Ok(())
}

/// The toolchain rust-toolchain.toml pins, with [`HOST_COMPONENTS`]. rustup installs
/// it on first use (that is how `cargo xtask` itself got built), unless
/// `RUSTUP_AUTO_INSTALL=0` or `cargo +other xtask` chose another one; then
/// `rustup toolchain install` (no argument: the file's toolchain) does it here.
fn ensure_host_toolchain() -> Result<String> {
    output("rustup", &["--version"]).context("rustup is needed: https://rustup.rs")?;
    let host = match active_toolchain() {
        Some(host) => host,
        None => {
            say("installing the Rust toolchain rust-toolchain.toml pins");
            run(nested("rustup").args(["toolchain", "install"]))?;
            active_toolchain()
                .context("rustup installed no toolchain for this workspace (rust-toolchain.toml)")?
        }
    };
    ensure_components(&host, HOST_COMPONENTS)?;
    Ok(host)
}

/// The toolchain rustup picks at the workspace root, if installed (asked without
/// installing it: `rustup show active-toolchain` fails for a missing one).
fn active_toolchain() -> Option<String> {
    let out = nested("rustup")
        .args(["show", "active-toolchain"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // "1.99.0-x86_64-unknown-linux-gnu (overridden by '.../rust-toolchain.toml')"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

/// The deploy tests render the manifests with `kubectl kustomize`. kubectl is part
/// of this project's machine image; Debian has no package for it, so it cannot be
/// installed here, only asked for.
pub fn require_kubectl() -> Result<()> {
    if output("kubectl", &["version", "--client"]).is_none() {
        bail!(
            "kubectl (with its built-in kustomize) is needed by the deploy tests: \
             install it from https://kubernetes.io/docs/tasks/tools/ and run again"
        );
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_toolchain(toolchain: &str, components: &[&str]) -> Result<()> {
    let installed =
        output("rustup", &["toolchain", "list"]).context("rustup is needed: https://rustup.rs")?;
    if !installed
        .lines()
        .any(|line| line.starts_with(&format!("{toolchain}-")))
    {
        say(&format!("installing Rust toolchain {toolchain}"));
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
        ]))?;
    }
    ensure_components(toolchain, components)
}

fn ensure_components(toolchain: &str, components: &[&str]) -> Result<()> {
    let have = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", toolchain],
    )
    .unwrap_or_default();
    for component in components {
        if !have
            .lines()
            .any(|line| line.starts_with(&format!("{component}-")) || line == *component)
        {
            say(&format!("adding {component} to {toolchain}"));
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }
    Ok(())
}

fn apt_installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|status| status.contains("install ok installed"))
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages {missing:?}; run as root or: apt-get install -y {}",
            missing.join(" ")
        );
    }
    say(&format!("installing Debian packages {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 2 minutes)"
    ));
    run(cargo()
        .args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        // bpf-linker's build finds LLVM through llvm-config on PATH or LLVM_PREFIX.
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))?;
    Ok(())
}
