//! `kubectl rayfence status`: every agent's `rayfence status`, one row per node
//! (agent pod, ready, version, image, endpoints, drops), each unreachable agent named with
//! why; exit status 1 when an agent is not ready or cannot be asked.
//!
//! Must not: judge an agent's state beyond its own `ready` and its pod's Ready
//! condition.
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::agents::{self, AgentPod, Forbidden};
use super::{ClusterArgs, OutputArgs, exec};
use crate::cli::{self, Output, render};
use crate::operator::wire::StatusReport;

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    output: OutputArgs,
}

/// One node's answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    node: String,
    agent: String,
    /// The pod's Ready condition.
    pod_ready: bool,
    image: String,
    /// The agent's own answer, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusReport>,
    /// Why there is no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl NodeStatus {
    fn ready(&self) -> bool {
        self.pod_ready && self.status.as_ref().is_some_and(|s| s.ready)
    }
}

/// The whole answer, as `-o json|yaml` prints it.
#[derive(Debug, Serialize)]
struct ClusterStatus {
    nodes: Vec<NodeStatus>,
}

pub async fn run(
    client: &kube::Client,
    cluster: &ClusterArgs,
    args: StatusArgs,
) -> anyhow::Result<ExitCode> {
    let pods = agents::agent_pods(client, cluster).await?;
    let command: Vec<String> = ["rayfence", "status", "-o", "json"]
        .map(String::from)
        .to_vec();
    let answers = futures::future::join_all(
        pods.iter()
            .map(|agent| exec::run(client, cluster, agent, &command, cluster.timeout())),
    )
    .await;
    let mut nodes = Vec::new();
    for (agent, answer) in pods.iter().zip(answers) {
        let (status, error) = match answer.and_then(|done| parse(agent, &done)) {
            Ok(report) => (Some(report), None),
            // The user's permission, the same for every agent: stop at it.
            Err(e) if e.is::<Forbidden>() => return Err(e),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        nodes.push(NodeStatus {
            node: agent.node.clone(),
            agent: agent.name.clone(),
            pod_ready: agent.ready,
            image: agent.image.clone(),
            status,
            error,
        });
    }
    let all_ready = nodes.iter().all(NodeStatus::ready);
    let report = ClusterStatus { nodes };
    let text = match args.output.output {
        Output::Json => serde_json::to_string_pretty(&report)? + "\n",
        Output::Yaml => serde_norway::to_string(&report)?,
        Output::Table => table(&report, false),
        Output::Wide => table(&report, true),
    };
    cli::out(&text)?;
    Ok(if all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The agent's JSON answer; a failed command is an error in its own words.
fn parse(agent: &AgentPod, done: &exec::Finished) -> anyhow::Result<StatusReport> {
    if done.code != 0 {
        anyhow::bail!(
            "`rayfence status` in agent pod {} exited {}: {}",
            agent.name,
            done.code,
            done.stderr.trim()
        );
    }
    serde_json::from_str(&done.stdout).map_err(|e| {
        anyhow::anyhow!(
            "agent pod {}: the status answer is not what this version reads ({e})",
            agent.name
        )
    })
}

fn table(report: &ClusterStatus, wide: bool) -> String {
    let rows = report
        .nodes
        .iter()
        .map(|n| {
            let status = n.status.as_ref();
            let count =
                |f: fn(&StatusReport) -> u64| status.map_or("-".into(), |s| f(s).to_string());
            vec![
                n.node.clone(),
                n.agent.clone(),
                match (n.pod_ready, status) {
                    (_, None) => "unreachable".to_owned(),
                    (true, Some(s)) if s.ready => "yes".to_owned(),
                    (false, Some(_)) => "no (pod not Ready)".to_owned(),
                    (true, Some(_)) => "no (agent not ready)".to_owned(),
                },
                match status.map(|s| s.version.as_str()) {
                    Some("") | None => "-".to_owned(),
                    Some(version) => version.to_owned(),
                },
                n.image.clone(),
                count(|s| s.endpoints.len() as u64),
                count(|s| s.endpoints.iter().map(|e| e.drops).sum()),
                count(|s| s.endpoints.iter().map(|e| e.would_drops).sum()),
                count(|s| s.problems as u64),
            ]
        })
        .collect();
    let mut out = render::table(
        &[
            "NODE",
            "AGENT",
            "READY",
            "VERSION",
            "IMAGE",
            "ENDPOINTS",
            "DROPS",
            "WOULD-DROP",
            "PROBLEMS",
        ],
        rows,
    );
    for n in &report.nodes {
        if let Some(error) = &n.error {
            out.push_str(&format!("{}: {error}\n", n.node));
        }
    }
    if wide {
        for status in report.nodes.iter().filter_map(|n| n.status.as_ref()) {
            out.push('\n');
            out.push_str(&render::status(status, true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, ready: bool) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "node": node, "ready": ready, "source": "kube", "audit": false,
            "problems": 0, "endpoints": [],
        }))
        .expect("a status report")
    }

    #[test]
    fn a_node_is_ready_only_when_its_pod_and_its_agent_both_are() {
        let node = |pod_ready, status: Option<StatusReport>| NodeStatus {
            node: "n1".into(),
            agent: "a".into(),
            pod_ready,
            image: "img".into(),
            error: status.is_none().then(|| "no answer".into()),
            status,
        };
        let nodes = vec![
            node(true, Some(report("n1", true))),
            node(true, Some(report("n1", false))),
            node(false, Some(report("n1", true))),
            node(true, None),
        ];
        let ready: Vec<bool> = nodes.iter().map(NodeStatus::ready).collect();
        assert_eq!(ready, [true, false, false, false]);
        let text = table(&ClusterStatus { nodes }, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NODE  AGENT  READY"), "{text}");
        assert!(lines[1].contains(" yes "), "{text}");
        assert!(lines[2].contains("no (agent not ready)"), "{text}");
        assert!(lines[3].contains("no (pod not Ready)"), "{text}");
        assert!(lines[4].contains("unreachable"), "{text}");
        assert_eq!(lines[5], "n1: no answer");
    }
}
