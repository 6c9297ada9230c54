//! Builds the eBPF object (crate `rayfence-ebpf`, target bpfel-unknown-none) with the
//! pinned nightly, so the agent embeds the programs it loads.
use anyhow::{Context as _, anyhow};

/// The nightly whose LLVM major matches bpf-linker's (see xtask/src/setup.rs).
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";

fn main() -> anyhow::Result<()> {
    export_commit();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "rayfence-ebpf")
        .ok_or_else(|| anyhow!("package rayfence-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // aya-build passes every line the nested cargo writes to stderr on as a
    // `cargo::warning`, and cargo repeats those on every later command: quiet
    // leaves only what matters there (errors; the compiler's own diagnostics come
    // through its JSON messages either way).
    if std::env::var_os("CARGO_TERM_QUIET").is_none() {
        // SAFETY: the build script is single-threaded here.
        unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    }
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}

/// `RAYFENCE_COMMIT` for `rayfence_build_info`: the builder's own (the image build
/// passes it, having no `.git`), else the checkout's HEAD, else `unknown`. Cargo
/// reruns this when HEAD moves, so the label never names an older commit.
fn export_commit() {
    println!("cargo::rerun-if-env-changed=RAYFENCE_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|out| out.trim().to_owned())
    };
    let commit = match std::env::var("RAYFENCE_COMMIT") {
        Ok(commit) if !commit.is_empty() => commit,
        _ => {
            // HEAD and the branch it points at, wherever git keeps them (worktrees too).
            // (A missing path would rerun this on every build: a packed ref is left out.)
            let head = git(&["rev-parse", "--git-path", "HEAD"]);
            let branch = git(&["rev-parse", "--symbolic-full-name", "HEAD"])
                .and_then(|name| git(&["rev-parse", "--git-path", &name]));
            for path in [head, branch].into_iter().flatten() {
                if std::path::Path::new(&path).exists() {
                    println!("cargo::rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo::rustc-env=RAYFENCE_COMMIT={commit}");
}
