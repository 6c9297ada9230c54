//! `kubectl rayfence` (the `kubectl-rayfence` binary, a kubectl plugin): the
//! operator commands over every node's agent, from a laptop with a kubeconfig.
//! `status` is one row per node, `explain` asks the agents on the nodes that decide
//! each side of a flow and combines them as the datapath does, `flows` merges the
//! flow streams of all nodes.
//!
//! Transport: exec into the agent pods through the API server (`pods/exec`, over
//! WebSocket), running the image's own `rayfence status|explain|flows -o json`
//! against the agent's local socket, as `cilium status` runs `cilium-dbg` in each
//! agent pod. The API server authenticates the user and RBAC decides who may ask
//! (`create` on `pods/exec` and `list` on pods in the agent's namespace: the
//! `rayfence-viewer` Role of deploy/). Not the pod proxy: the API server does not
//! pass the user's credentials on to the pod, so the agent could not tell who
//! asks, and an open query port would answer every pod of the cluster.
//!
//! One file per concern: `agents` (finding the agent pods and the node of a pod),
//! `exec` (running a command in one agent pod), then one per command.
//!
//! Errors name the flag, node or agent pod they are about; exit statuses are the
//! local commands' (`explain`'s is its verdict, [`crate::cli::exit`]), and `status`
//! exits 1 when an agent is not ready or cannot be reached.
//!
//! Must not: compute a verdict or format an agent's answer itself (the agents'
//! engines decide, `crate::cli::render` prints), or change anything in the cluster.
mod agents;
mod exec;
mod explain;
mod flows;
mod status;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::cli::{self, Output};

/// The namespace deploy/ installs the agents in.
pub const DEFAULT_NAMESPACE: &str = "rayfence-system";
/// The agent pods' labels in deploy/ (the DaemonSet's selector).
pub const DEFAULT_SELECTOR: &str =
    "app.kubernetes.io/name=rayfence,app.kubernetes.io/component=agent";
/// The agent's container in those pods.
pub const DEFAULT_CONTAINER: &str = "agent";

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-rayfence",
    bin_name = "kubectl rayfence",
    version,
    about = "rayfence over the whole cluster: every node's agent, asked through the API server as you"
)]
pub struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One row per node: its agent pod, ready or not, version, image, endpoints, drops.
    /// Exits 1 when an agent is not ready or cannot be asked.
    Status(status::StatusArgs),
    /// Why a flow is allowed or denied, each side asked of the agent on the node
    /// that decides it (egress at the source's node, ingress at the destination's).
    /// The exit status is the verdict, as `rayfence explain`'s.
    #[command(after_help = explain::EXIT_STATUS)]
    Explain(explain::ExplainArgs),
    /// Denied (and audited) flows seen by every node's agent, merged, each line
    /// tagged with its node.
    Flows(flows::FlowsArgs),
}

/// Where the cluster and the agents are.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// The namespace the agents run in.
    #[arg(
        short = 'n',
        long,
        global = true,
        value_name = "NS",
        env = "RAYFENCE_NAMESPACE",
        default_value = DEFAULT_NAMESPACE
    )]
    namespace: String,
    /// The agent pods' labels, k=v[,k=v].
    #[arg(short = 'l', long, global = true, value_name = "K=V[,K=V]", default_value = DEFAULT_SELECTOR)]
    selector: String,
    /// The agent's container in those pods.
    #[arg(long, global = true, value_name = "NAME", default_value = DEFAULT_CONTAINER)]
    container: String,
    /// How long to wait for each agent's answer (status, explain), in seconds.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 30)]
    request_timeout: u64,
}

impl ClusterArgs {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout.max(1))
    }

    /// The client for the kubeconfig and context asked for.
    async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("--kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("--kubeconfig {}", path.display()))?
            }
            None => kube::Config::from_kubeconfig(&options).await.context(
                "reading the kubeconfig ($KUBECONFIG or ~/.kube/config; or --kubeconfig)",
            )?,
        };
        kube::Client::try_from(config).context("building the API client")
    }
}

/// `-o`, as the local commands take it.
#[derive(Args, Debug, Clone, Copy)]
struct OutputArgs {
    /// Output format: table, wide (every field), json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

/// Parses the command line, runs the command; errors as the `rayfence` binary
/// prints them (`Error: ` and the chain of causes, exit status 2).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("starting the async runtime")),
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(error) if cli::stdout_closed(&error) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "Error: {error:#}");
    ExitCode::from(cli::exit::ERROR)
}

impl Cli {
    async fn run(self) -> anyhow::Result<ExitCode> {
        let client = self.cluster.client().await?;
        match self.command {
            Command::Status(args) => status::run(&client, &self.cluster, args).await,
            Command::Explain(args) => explain::run(&client, &self.cluster, args).await,
            Command::Flows(args) => flows::run(&client, &self.cluster, args).await,
        }
    }
}

/// A line on stderr for a person; nothing to do if stderr is gone too.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_tree_passes_clap_s_checks_and_every_flag_has_help() {
        let mut command = Cli::command();
        command.build();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        for sub in command.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_owned());
            }
            for arg in sub.get_arguments() {
                if arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn the_agents_namespace_and_selector_default_to_what_deploy_installs() {
        let cli = Cli::try_parse_from(["kubectl-rayfence", "status"]).expect("parses");
        assert_eq!(cli.cluster.namespace, "rayfence-system");
        assert_eq!(cli.cluster.selector, DEFAULT_SELECTOR);
        let cli = Cli::try_parse_from(["kubectl-rayfence", "status", "-n", "edge", "-l", "a=b"])
            .expect("parses");
        assert_eq!(
            (
                cli.cluster.namespace.as_str(),
                cli.cluster.selector.as_str()
            ),
            ("edge", "a=b")
        );
    }
}
