//! The `rayfence` command line: the top-level parser and one module per command,
//! each holding that command's flags and what it runs, so adding a flag touches
//! one file. Argument groups more than one command takes are in [`args`].
//!
//! These modules are the binary's own (declared by `main.rs`), not the library's:
//! flag parsing, the process's async runtimes, its signals and exit statuses are
//! the executable's business. The library keeps what they call: the agent
//! (`rayfence::runtime`, `rayfence::serve`, ...) and the operator commands' client
//! side (`rayfence::cli`, which must not change state, as starting the agent,
//! `cleanup` and `cni` do).
//!
//! Must not: hold agent logic (that is `rayfence::runtime`), or answer an operator
//! command itself (that is `rayfence::cli`).
mod agent;
mod args;
mod bundle;
mod cleanup;
mod cni;
mod completion;
mod explain;
mod flows;
mod man;
mod status;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rayfence",
    version,
    about = "RayCluster network isolation enforced in eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: watch the cluster (or a manifests directory) and keep
    /// the datapath equal to the policy, live.
    Agent(Box<agent::AgentArgs>),
    /// The local endpoints of the agent on this node: hook, mode, isolation, drops.
    Status(status::StatusArgs),
    /// Why a flow is allowed or denied, and by which rule, from the same engine the
    /// datapath's tables come from. The exit status is the verdict.
    #[command(after_help = explain::EXIT_STATUS)]
    Explain(Box<explain::ExplainArgs>),
    /// Denied (and audited) flows seen by the agent on this node.
    Flows(flows::FlowsArgs),
    /// Detach every program rayfence attached and remove everything it pinned.
    Cleanup(cleanup::CleanupArgs),
    /// Install or remove the chained CNI plugin rayfence-cni on this node.
    #[command(subcommand)]
    Cni(cni::CniCommand),
    /// Write a support bundle (.tar.gz) of this node's agent: status, flows,
    /// metrics, versions, kernel, pins and CNI configuration.
    Bundle(bundle::BundleArgs),
    /// Print a shell completion script: `source <(rayfence completion bash)`.
    Completion(completion::CompletionArgs),
    /// Print the manual page rayfence(1) (`rayfence man | man -l -`), or write one
    /// page per command with --dir.
    Man(man::ManArgs),
}

impl Cli {
    /// Runs the command asked for; its exit status when it succeeds.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Agent(args) => agent::run(*args),
            Command::Status(args) => status::run(args),
            Command::Explain(args) => explain::run(*args),
            Command::Flows(args) => flows::run(args),
            Command::Cleanup(args) => cleanup::run(args),
            Command::Cni(command) => cni::run(command),
            Command::Bundle(args) => bundle::run(args),
            Command::Completion(args) => completion::run(args),
            Command::Man(args) => man::run(args),
        }
    }
}

/// The commands' own small runtime (the agent builds its own).
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_tree_passes_clap_s_own_checks() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{path} (the command itself)"));
                }
                walk(sub, &path, missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        walk(&command, "rayfence", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
        // The walk sees the subcommands' own flags.
        let flows = command.find_subcommand("flows").expect("flows");
        assert!(flows.get_arguments().any(|a| a.get_id() == "raycluster"));
    }
}
