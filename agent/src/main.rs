//! The `rayfence` binary: the node agent and its operator commands.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rayfence::datapath::{self, paths::DEFAULT_BPFFS_DIR};

#[derive(Parser, Debug)]
#[command(
    name = "rayfence",
    version,
    about = "RayCluster network isolation enforced in eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Detach every program rayfence attached and remove everything it pinned.
    Cleanup {
        /// The agent's bpffs directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Cleanup { bpffs }) => {
            let report = datapath::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            println!(
                "removed {} links and {} maps under {}",
                report.links,
                report.maps,
                bpffs.display()
            );
        }
        None => {}
    }
    Ok(())
}
