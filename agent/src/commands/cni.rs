//! `rayfence cni install` and `rayfence cni uninstall`: the chained CNI plugin
//! rayfence-cni on this node, by hand (the agent keeps it installed itself when
//! given the CNI directories).
//!
//! Must not: edit the CNI configuration itself (`rayfence::cni::install` does).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use rayfence::cli;
use rayfence::cni::install::{self as cni_install, DEFAULT_BIN_DIR, DEFAULT_CONF_DIR};
use rayfence::datapath::paths::DEFAULT_BPFFS_DIR;

#[derive(Subcommand, Debug)]
pub(super) enum CniCommand {
    /// Copy rayfence-cni into the bin dir and chain it as the last plugin of the
    /// node's first CNI configuration. A second run changes nothing.
    Install {
        /// The node's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The node's CNI plugin directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
        cni_bin_dir: PathBuf,
        /// The agent's bpffs directory as the host sees it (the plugin runs there).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// The plugin to copy (default: rayfence-cni next to this executable).
        #[arg(long, value_name = "PATH")]
        plugin_binary: Option<PathBuf>,
    },
    /// Remove the rayfence-cni entries and binary (nothing else). A second run
    /// changes nothing.
    Uninstall {
        /// The node's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The node's CNI plugin directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
        cni_bin_dir: PathBuf,
    },
}

pub(super) fn run(command: CniCommand) -> anyhow::Result<ExitCode> {
    let report = match command {
        CniCommand::Install {
            cni_conf_dir,
            cni_bin_dir,
            bpffs,
            plugin_binary,
        } => cni_install::install(&cni_install::InstallConfig {
            conf_dir: cni_conf_dir,
            bin_dir: cni_bin_dir,
            bpffs,
            plugin_binary: match plugin_binary {
                Some(path) => path,
                None => cni_install::default_plugin_binary()?,
            },
        })?
        .to_string(),
        CniCommand::Uninstall {
            cni_conf_dir,
            cni_bin_dir,
        } => cni_install::uninstall(&cni_conf_dir, &cni_bin_dir)?.to_string(),
    };
    cli::out(&format!("{report}\n"))?;
    Ok(ExitCode::SUCCESS)
}
