//! Builds the eBPF object (crate `rayfence-ebpf`, target bpfel-unknown-none) with the
//! pinned nightly, so the agent embeds the programs it loads.
use anyhow::{Context as _, anyhow};

/// The nightly whose LLVM major matches bpf-linker's (see xtask/src/setup.rs).
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-01";

fn main() -> anyhow::Result<()> {
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
