//! `rayfence cleanup`: detach every program rayfence attached, remove everything
//! it pinned and, when given the CNI directories, the rayfence-cni plugin.
//!
//! Must not: touch anything rayfence did not put there (`rayfence::datapath` and
//! `rayfence::cni::install` know what that is).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use rayfence::cli;
use rayfence::cni::install as cni_install;
use rayfence::datapath::{self, paths::DEFAULT_BPFFS_DIR};

use super::args::CniDirsArgs;

#[derive(Args, Debug)]
pub(super) struct CleanupArgs {
    /// The agent's bpffs directory.
    #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS", default_value = DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Also remove the rayfence-cni plugin (entry and binary) from these.
    #[command(flatten)]
    cni: CniDirsArgs,
}

pub(super) fn run(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    let CleanupArgs { bpffs, cni } = args;
    // The entry first: no new pod is handed to a plugin whose state is about to go.
    if let (Some(conf), Some(bin)) = (&cni.cni_conf_dir, &cni.cni_bin_dir) {
        let report = cni_install::uninstall(conf, bin)?;
        cli::out(&format!("{report}\n"))?;
    }
    let report =
        datapath::cleanup(&bpffs).with_context(|| format!("cleaning up {}", bpffs.display()))?;
    cli::out(&format!(
        "removed {} links and {} maps under {}\n",
        report.links,
        report.maps,
        bpffs.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}
