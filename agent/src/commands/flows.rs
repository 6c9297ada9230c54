//! `rayfence flows`: the denied (and audited) flows the agent on this node saw,
//! and with `--follow` every new one.
//!
//! Must not: filter or format the flows itself (`rayfence::cli` does).
use std::process::ExitCode;

use clap::Args;
use rayfence::cli;
use rayfence::operator::wire::FlowFilter;

use super::args::{AgentConnection, OutputArgs};

#[derive(Args, Debug)]
pub(super) struct FlowsArgs {
    #[command(flatten)]
    agent: AgentConnection,
    /// Keep printing new flows until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// Only `dropped` or only `audit` (would have been dropped).
    #[arg(long, value_parser = ["dropped", "audit"])]
    verdict: Option<String>,
    /// Only flows of local pods in this namespace.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Only flows of local pods of this RayCluster.
    #[arg(long, value_name = "NAME")]
    raycluster: Option<String>,
    /// How many recent flows to print first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    output: OutputArgs,
}

pub(super) fn run(args: FlowsArgs) -> anyhow::Result<ExitCode> {
    let address = args.agent.address()?;
    let filter = FlowFilter {
        verdict: args
            .verdict
            .as_deref()
            .map(cli::parse_verdict)
            .transpose()?,
        namespace: args.namespace,
        raycluster: args.raycluster,
    };
    super::block_on(cli::flows(
        &address,
        &filter,
        args.follow,
        args.limit,
        args.output.format(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
