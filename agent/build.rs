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
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
