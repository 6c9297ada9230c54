//! `rayfence status`: the local endpoints of the agent on this node.
//!
//! Must not: read the node's state itself (the agent answers, `rayfence::cli` asks).
use std::process::ExitCode;

use clap::Args;
use rayfence::cli;

use super::args::{AgentConnection, OutputArgs};

#[derive(Args, Debug)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    agent: AgentConnection,
    #[command(flatten)]
    pub(super) output: OutputArgs,
}

pub(super) fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let address = args.agent.address()?;
    super::block_on(cli::status(&address, args.output.format()))?;
    Ok(ExitCode::SUCCESS)
}
