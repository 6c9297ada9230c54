//! `kubectl rayfence explain --from A --to B[:PORT[/PROTO]]`: each side of the flow
//! answered by the agent that enforces it. The agent on the source's node is asked
//! first (the egress side, and the destination's too when it runs there); every
//! side it says is decided `elsewhere` is asked of the agent on that side's pod's
//! node; the verdict is combined as the datapath combines them (every side must
//! let the flow pass), with the node that decided each side.
//!
//! Must not: decide a side itself (each agent's engine does) or combine sides any
//! other way than `operator::explain::combine`.
use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;

use super::agents::{self, AgentPod};
use super::{ClusterArgs, OutputArgs, exec};
use crate::cli::{self, Output, render};
use crate::operator::explain::{combine, parse_destination, parse_end};
use crate::operator::wire::ExplainReport;

/// What `kubectl rayfence explain --help` says after the flags.
pub const EXIT_STATUS: &str = "\
Exit status (as `rayfence explain`'s):
  0  allowed: every side that is enforced allows the flow
  1  denied, or audit (denied; audit mode lets it through)
  2  error: bad arguments, no agent, not allowed to ask, ...
  3  unknown: a side's agent could not decide it";

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The source: NAMESPACE/POD or an IP.
    #[arg(long, value_name = "NS/POD|IP")]
    from: String,
    /// The destination, then :PORT and /tcp|udp|sctp (default tcp); no port: ICMP echo.
    #[arg(long, value_name = "NS/POD|IP[:PORT[/PROTO]]")]
    to: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// Which agent decided a side.
#[derive(Clone, Debug, Serialize)]
struct Decider {
    direction: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    node: String,
    agent: String,
}

/// The combined answer, as `-o json|yaml` prints it: the report of the source's
/// agent with every side replaced by its deciding agent's, and who decided.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterExplanation {
    #[serde(flatten)]
    report: ExplainReport,
    decided_by: Vec<Decider>,
}

pub async fn run(
    client: &kube::Client,
    cluster: &ClusterArgs,
    args: ExplainArgs,
) -> anyhow::Result<ExitCode> {
    // The agent checks these too; checked here first so a typo costs no exec.
    let source = parse_end("--from", &args.from)?;
    let destination = parse_destination(&args.to)?;
    let pods = agents::agent_pods(client, cluster).await?;
    let first = match agents::node_of_end(client, "--from", &source).await? {
        Some(node) => node,
        None => match agents::node_of_end(client, "--to", &destination.end).await? {
            Some(node) => node,
            None => bail!(
                "neither --from {:?} nor --to {:?} is a pod's address: no agent enforces this flow",
                args.from,
                args.to
            ),
        },
    };
    let mut asked: HashMap<String, ExplainReport> = HashMap::new();
    let mut report = ask(client, cluster, &pods, &first, &args, &mut asked).await?;
    let mut decided_by = Vec::new();
    for side in report.sides.iter_mut() {
        let mut node = first.clone();
        if side.verdict == "elsewhere"
            && let Some((namespace, name)) = side.pod.as_deref().and_then(|p| p.split_once('/'))
        {
            let flag = if side.direction == "egress" {
                "--from"
            } else {
                "--to"
            };
            node = agents::node_of_pod(client, flag, namespace, name).await?;
            let theirs = ask(client, cluster, &pods, &node, &args, &mut asked).await?;
            match theirs
                .sides
                .iter()
                .find(|s| s.direction == side.direction && s.pod == side.pod)
            {
                Some(decided) => *side = decided.clone(),
                None => bail!(
                    "the agent on node {node} does not name the {} side at {} in its answer",
                    side.direction,
                    side.pod.as_deref().unwrap_or("?")
                ),
            }
        }
        decided_by.push(Decider {
            direction: side.direction.clone(),
            pod: side.pod.clone(),
            agent: agents::on_node(&pods, &node)?.name.clone(),
            node,
        });
    }
    report.verdict = combine(&report.sides);
    let exit = cli::verdict_exit_code(&report.verdict);
    let answer = ClusterExplanation { report, decided_by };
    let text = match args.output.output {
        Output::Json => serde_json::to_string_pretty(&answer)? + "\n",
        Output::Yaml => serde_norway::to_string(&answer)?,
        Output::Table => table(&answer, false),
        Output::Wide => table(&answer, true),
    };
    match cli::out(&text) {
        Err(error) if cli::stdout_closed(&error) => {}
        other => other?,
    }
    Ok(ExitCode::from(exit))
}

/// The explanation of the agent on `node` (asked once per node).
async fn ask(
    client: &kube::Client,
    cluster: &ClusterArgs,
    pods: &[AgentPod],
    node: &str,
    args: &ExplainArgs,
    asked: &mut HashMap<String, ExplainReport>,
) -> anyhow::Result<ExplainReport> {
    if let Some(report) = asked.get(node) {
        return Ok(report.clone());
    }
    let agent = agents::on_node(pods, node)?;
    let command: Vec<String> = [
        "rayfence", "explain", "--from", &args.from, "--to", &args.to, "-o", "json",
    ]
    .map(String::from)
    .to_vec();
    let done = exec::run(client, cluster, agent, &command, cluster.timeout()).await?;
    // 0, 1 and 3 are verdicts, with the answer on stdout; 2 is an error.
    if !matches!(done.code, 0 | 1 | 3) {
        bail!(
            "node {node}, agent pod {}: `rayfence explain` exited {}: {}",
            agent.name,
            done.code,
            done.stderr.trim()
        );
    }
    let report: ExplainReport = serde_json::from_str(&done.stdout).with_context(|| {
        format!(
            "node {node}, agent pod {}: the explain answer is not what this version reads",
            agent.name
        )
    })?;
    asked.insert(node.to_owned(), report.clone());
    Ok(report)
}

/// The local command's explanation, then where each side was decided.
fn table(answer: &ClusterExplanation, wide: bool) -> String {
    let mut out = render::explanation(&answer.report, wide);
    for d in &answer.decided_by {
        out.push_str(&format!(
            "  {:<7} decided on node {} (agent {})\n",
            d.direction, d.node, d.agent
        ));
    }
    out
}
