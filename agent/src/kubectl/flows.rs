//! `kubectl rayfence flows`: every agent's `rayfence flows` with the same filters,
//! merged; each line tagged with the node that saw the flow. Without `--follow`,
//! the most recent `--limit` flows of the cluster in time order; with it, every
//! node's recent flows and then each new one as its node sends it, until
//! interrupted.
//!
//! Must not: filter flows itself (each agent does, with the flags passed on).
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;
use serde::Serialize;

use super::agents::{self, AgentPod, Forbidden};
use super::{ClusterArgs, OutputArgs, exec, note};
use crate::cli::{self, Output, render};
use crate::operator::wire::FlowRecord;

#[derive(Args, Debug)]
pub struct FlowsArgs {
    /// Keep printing new flows from every node until interrupted.
    #[arg(long, short)]
    follow: bool,
    /// Only `dropped` or only `audit` (would have been dropped).
    #[arg(long, value_parser = ["dropped", "audit"])]
    verdict: Option<String>,
    /// Only flows of pods in this namespace (rayfence flows --namespace; -n is the
    /// agents' namespace here, as in kubectl).
    #[arg(long, value_name = "NS")]
    pod_namespace: Option<String>,
    /// Only flows of pods of this RayCluster.
    #[arg(long, value_name = "NAME")]
    raycluster: Option<String>,
    /// How many recent flows to print first (of the whole cluster; each node is
    /// asked for as many).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    output: OutputArgs,
}

/// A flow and the node whose agent saw it, as `-o json` prints it (one a line).
#[derive(Debug, Serialize)]
struct NodeFlow<'a> {
    node: &'a str,
    #[serde(flatten)]
    record: &'a FlowRecord,
}

impl FlowsArgs {
    /// The agents' own command, with the same filters.
    fn command(&self) -> Vec<String> {
        let mut command: Vec<String> = ["rayfence", "flows", "-o", "json", "--limit"]
            .map(String::from)
            .to_vec();
        command.push(self.limit.to_string());
        let mut flag = |name: &str, value: &Option<String>| {
            if let Some(value) = value {
                command.extend([name.to_owned(), value.clone()]);
            }
        };
        flag("--verdict", &self.verdict);
        flag("--namespace", &self.pod_namespace);
        flag("--raycluster", &self.raycluster);
        if self.follow {
            command.push("--follow".into());
        }
        command
    }
}

pub async fn run(
    client: &kube::Client,
    cluster: &ClusterArgs,
    args: FlowsArgs,
) -> anyhow::Result<ExitCode> {
    let pods = agents::agent_pods(client, cluster).await?;
    let command = args.command();
    let complete = if args.follow {
        follow(client, cluster, &pods, &command, args.output.output).await?
    } else {
        recent(client, cluster, &pods, &command, &args).await?
    };
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One flow line of an agent's output; its other lines (`fell behind`) are notes.
fn record(node: &str, line: &str) -> anyhow::Result<Option<FlowRecord>> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(line)
        .map(Some)
        .map_err(|e| anyhow!("node {node}: unexpected line in the flow stream ({e}): {line}"))
}

fn print(node: &str, record: &FlowRecord, output: Output) -> anyhow::Result<()> {
    let flow = NodeFlow { node, record };
    cli::out(&match output {
        Output::Json => serde_json::to_string(&flow)? + "\n",
        Output::Yaml => format!("---\n{}", serde_norway::to_string(&flow)?),
        Output::Table => format!("{node}  {}\n", render::flow(record, false)),
        Output::Wide => format!("{node}  {}\n", render::flow(record, true)),
    })
}

/// Every node's recent flows, the last `--limit` of them in time order. Whether
/// every agent answered.
async fn recent(
    client: &kube::Client,
    cluster: &ClusterArgs,
    pods: &[AgentPod],
    command: &[String],
    args: &FlowsArgs,
) -> anyhow::Result<bool> {
    let answers = futures::future::join_all(
        pods.iter()
            .map(|agent| exec::run(client, cluster, agent, command, cluster.timeout())),
    )
    .await;
    let mut complete = true;
    let mut flows: Vec<(String, FlowRecord)> = Vec::new();
    for (agent, answer) in pods.iter().zip(answers) {
        let done = match answer {
            Ok(done) if done.code == 0 => done,
            Ok(done) => {
                complete = false;
                note(&format!(
                    "node {}: `rayfence flows` in agent pod {} exited {}: {}",
                    agent.node,
                    agent.name,
                    done.code,
                    done.stderr.trim()
                ));
                continue;
            }
            Err(e) if e.is::<Forbidden>() => return Err(e),
            Err(e) => {
                complete = false;
                note(&format!("node {}: {e:#}", agent.node));
                continue;
            }
        };
        for line in done.stderr.lines().filter(|l| !l.trim().is_empty()) {
            note(&format!("node {}: {line}", agent.node));
        }
        for line in done.stdout.lines() {
            if let Some(flow) = record(&agent.node, line)? {
                flows.push((agent.node.clone(), flow));
            }
        }
    }
    // RFC 3339 in UTC, the same format on every node: text order is time order.
    flows.sort_by(|a, b| a.1.time.cmp(&b.1.time).then_with(|| a.0.cmp(&b.0)));
    let skip = flows.len().saturating_sub(args.limit);
    for (node, flow) in &flows[skip..] {
        print(node, flow, args.output.output)?;
    }
    Ok(complete)
}

/// Every node's stream, printed line by line as they come, until every stream
/// ends (or the user interrupts). Whether every stream ended cleanly.
async fn follow(
    client: &kube::Client,
    cluster: &ClusterArgs,
    pods: &[AgentPod],
    command: &[String],
    output: Output,
) -> anyhow::Result<bool> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, exec::Line)>(256);
    let mut streams = tokio::task::JoinSet::new();
    for agent in pods {
        let (client, cluster, agent, command, tx) = (
            client.clone(),
            cluster.clone(),
            agent.clone(),
            command.to_vec(),
            tx.clone(),
        );
        streams.spawn(async move {
            let result = exec::stream(&client, &cluster, &agent, &command, &tx).await;
            (agent, result)
        });
    }
    drop(tx);
    let mut complete = true;
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some((node, exec::Line::Stdout(text))) => {
                    if let Some(flow) = record(&node, &text)? {
                        print(&node, &flow, output)?;
                    }
                }
                Some((node, exec::Line::Stderr(text))) => note(&format!("node {node}: {text}")),
                None => break,
            },
            Some(ended) = streams.join_next() => complete &= stream_ended(ended)?,
        }
    }
    // The output is done; say how the streams that had not been reaped ended.
    while let Some(ended) = streams.join_next().await {
        complete &= stream_ended(ended)?;
    }
    Ok(complete)
}

/// How one node's stream ended: `true` when cleanly; a refusal by the API server
/// is the user's, for every node: an error.
fn stream_ended(
    ended: Result<(AgentPod, anyhow::Result<i32>), tokio::task::JoinError>,
) -> anyhow::Result<bool> {
    let (agent, result) = ended.map_err(|e| anyhow!("a node's stream: {e}"))?;
    match result {
        Ok(0) => Ok(true),
        Ok(code) => {
            note(&format!(
                "node {}: `rayfence flows` in agent pod {} exited {code}",
                agent.node, agent.name
            ));
            Ok(false)
        }
        Err(e) if e.is::<Forbidden>() => Err(e),
        Err(e) => {
            note(&format!("node {}: {e:#}", agent.node));
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn the_agents_are_asked_with_the_same_filters() {
        let cli = crate::kubectl::Cli::try_parse_from([
            "kubectl-rayfence",
            "-n",
            "rayfence-system",
            "flows",
            "--verdict",
            "dropped",
            "--pod-namespace",
            "team-a",
            "--raycluster",
            "rc",
            "--limit",
            "5",
            "-f",
        ])
        .expect("parses");
        let crate::kubectl::Command::Flows(args) = cli.command else {
            panic!("flows");
        };
        assert_eq!(
            args.command().join(" "),
            "rayfence flows -o json --limit 5 --verdict dropped --namespace team-a --raycluster rc --follow"
        );
    }

    #[test]
    fn a_flow_line_is_tagged_with_its_node() {
        let line = r#"{"time":"2026-01-01T00:00:00Z","verdict":"dropped","direction":"ingress","reason":"policy","protocol":"tcp","source":{"ip":"10.0.0.1","port":1234,"kind":"pod","namespace":"a","name":"x"},"destination":{"ip":"10.0.0.2","port":80,"kind":"pod","namespace":"b","name":"y"},"namespace":"b","pod":"y","bytes":60,"suppressed":0}"#;
        let flow = record("n1", line).expect("parses").expect("a flow");
        let json = serde_json::to_value(NodeFlow {
            node: "n1",
            record: &flow,
        })
        .expect("json");
        assert_eq!(json["node"], "n1");
        assert_eq!(json["pod"], "y");
        assert!(record("n1", "not json").is_err());
        assert!(record("n1", "  ").expect("blank").is_none());
    }
}
