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
/// Debian packages: LLVM for bpf-linker; iproute2, iptables and nftables (`nft`) for
/// the network namespace tests and the demo (kube-proxy's NAT in its iptables and its
/// nftables mode).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "iptables",
    "nftables",
];
/// The metrics tests check the agent's `/metrics` and the shipped alert rules with
/// Prometheus's own checker, and run the dashboard's queries on a Prometheus that
/// scraped a real agent. Debian ships both inside the `prometheus` package, whose
/// installation would also start a Prometheus service: only the two binaries are
/// taken out of the package, promtool into [`PROMTOOL`] and the server, which only
/// the tests run, into [`PROMETHEUS`] (off the PATH).
const PROMTOOL_PACKAGE: &str = "prometheus";
pub const PROMTOOL: &str = "/usr/local/bin/promtool";
pub const PROMETHEUS: &str = "/usr/local/lib/rayfence/prometheus";

pub fn ensure_all() -> Result<()> {
    let host = ensure_host_toolchain()?;
    ensure_toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    ensure_apt_packages()?;
    ensure_bpf_linker()?;
    ensure_promtool()?;
    say(&format!(
        "prerequisites in place: Rust {host} (rust-toolchain.toml), {EBPF_TOOLCHAIN} + rust-src, {}, bpf-linker {BPF_LINKER_VERSION}, promtool and a Prometheus server for the tests",
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

fn ensure_promtool() -> Result<()> {
    if output(PROMTOOL, &["--version"]).is_some() && output(PROMETHEUS, &["--version"]).is_some() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "promtool or the Prometheus server for the tests is missing; run as root to take them from Debian's `{PROMTOOL_PACKAGE}` package"
        );
    }
    say(&format!(
        "taking promtool ({PROMTOOL}) and the Prometheus server ({PROMETHEUS}, for the tests only) out of Debian's `{PROMTOOL_PACKAGE}` package (not installing the service)"
    ));
    let scratch = std::env::temp_dir().join(format!("rayfence-promtool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let taken = (|| -> Result<()> {
        // `apt-get download` writes as the unprivileged `_apt` user: let it.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o777))?;
        let download = || {
            run(Command::new("apt-get")
                .args(["download", "-q", PROMTOOL_PACKAGE])
                .current_dir(&scratch))
        };
        if download().is_err() {
            run(Command::new("apt-get").arg("update").arg("-q"))?;
            download()?;
        }
        let deb = std::fs::read_dir(&scratch)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .context("apt-get download left no .deb")?;
        let tree = scratch.join("tree");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        for (binary, to) in [("promtool", PROMTOOL), ("prometheus", PROMETHEUS)] {
            if let Some(dir) = std::path::Path::new(to).parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::copy(tree.join("usr/bin").join(binary), to)
                .with_context(|| format!("copying {binary} to {to}"))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    taken?;
    output(PROMTOOL, &["--version"]).context("the promtool taken from the package does not run")?;
    output(PROMETHEUS, &["--version"])
        .context("the Prometheus server taken from the package does not run")?;
    Ok(())
}
