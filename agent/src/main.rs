//! The `rayfence` binary: the node agent and its operator commands.
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "rayfence",
    version,
    about = "RayCluster network isolation enforced in eBPF"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
