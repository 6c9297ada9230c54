//! Running a command in one agent pod through the API server (`pods/exec` over
//! WebSocket, as the user): its whole output and exit status, or its output line
//! by line while it runs (`flows --follow`).
//!
//! Must not: read what the command printed (the command modules do), or retry: an
//! agent that cannot be asked is reported as such.
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::{AttachParams, AttachedProcess};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};
use tokio::sync::mpsc;

use super::ClusterArgs;
use super::agents::{AgentPod, api_error};

/// A finished command.
#[derive(Debug)]
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
    /// The command's exit status.
    pub code: i32,
}

/// What a running command printed, one line at a time.
#[derive(Debug)]
pub enum Line {
    Stdout(String),
    Stderr(String),
}

async fn start(
    client: &kube::Client,
    cluster: &ClusterArgs,
    agent: &AgentPod,
    command: &[String],
) -> anyhow::Result<AttachedProcess> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &cluster.namespace);
    let params = AttachParams::default()
        .container(cluster.container.clone())
        .stdin(false)
        .stdout(true)
        .stderr(true);
    api.exec(&agent.name, command.iter().map(String::as_str), &params)
        .await
        .map_err(|e| {
            api_error(
                e,
                &format!(
                    "exec into agent pod {}/{} (node {})",
                    cluster.namespace, agent.name, agent.node
                ),
            )
        })
}

/// Runs `command` in `agent`'s container to its end, within `timeout`.
pub async fn run(
    client: &kube::Client,
    cluster: &ClusterArgs,
    agent: &AgentPod,
    command: &[String],
    timeout: Duration,
) -> anyhow::Result<Finished> {
    let work = async {
        let mut process = start(client, cluster, agent, command).await?;
        let status = process
            .take_status()
            .context("the exit status, taken once")?;
        let (stdout, stderr) = (process.stdout(), process.stderr());
        let (stdout, stderr) = tokio::join!(read_all(stdout), read_all(stderr));
        let code = exit_code(status.await, agent)?;
        Ok(Finished {
            stdout: stdout?,
            stderr: stderr?,
            code,
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        anyhow!(
            "agent pod {} (node {}) did not answer within {}s (--request-timeout)",
            agent.name,
            agent.node,
            timeout.as_secs()
        )
    })?
}

async fn read_all(reader: Option<impl AsyncRead + Unpin>) -> anyhow::Result<String> {
    let mut text = Vec::new();
    if let Some(mut reader) = reader {
        reader
            .read_to_end(&mut text)
            .await
            .context("reading the command's output")?;
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Runs `command` in `agent`'s container and sends each line it prints, with the
/// agent's node, to `lines` as it comes, until it ends (or `lines` is closed); its
/// exit status.
pub async fn stream(
    client: &kube::Client,
    cluster: &ClusterArgs,
    agent: &AgentPod,
    command: &[String],
    lines: &mpsc::Sender<(String, Line)>,
) -> anyhow::Result<i32> {
    let mut process = start(client, cluster, agent, command).await?;
    let status = process
        .take_status()
        .context("the exit status, taken once")?;
    let mut stdout = process.stdout().map(|r| BufReader::new(r).lines());
    let mut stderr = process.stderr().map(|r| BufReader::new(r).lines());
    while stdout.is_some() || stderr.is_some() {
        let line = tokio::select! {
            next = async { stdout.as_mut()?.next_line().await.transpose() }, if stdout.is_some() => match next {
                Some(text) => Line::Stdout(text.context("reading the command's output")?),
                None => {
                    stdout = None;
                    continue;
                }
            },
            next = async { stderr.as_mut()?.next_line().await.transpose() }, if stderr.is_some() => match next {
                Some(text) => Line::Stderr(text.context("reading the command's output")?),
                None => {
                    stderr = None;
                    continue;
                }
            },
        };
        if lines.send((agent.node.clone(), line)).await.is_err() {
            bail!(
                "nobody reads the output of agent pod {} any more",
                agent.name
            );
        }
    }
    exit_code(status.await, agent)
}

/// The exit status the API server reports (`Success`, or `NonZeroExitCode` with the
/// code among the causes); anything else is an error in its own words.
fn exit_code(status: Option<Status>, agent: &AgentPod) -> anyhow::Result<i32> {
    let Some(status) = status else {
        bail!(
            "agent pod {} (node {}): the connection closed before the command's exit status came",
            agent.name,
            agent.node
        );
    };
    if status.status.as_deref() == Some("Success") {
        return Ok(0);
    }
    if status.reason.as_deref() == Some("NonZeroExitCode")
        && let Some(code) = status
            .details
            .as_ref()
            .and_then(|d| d.causes.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.reason.as_deref() == Some("ExitCode"))
            .and_then(|c| c.message.as_deref()?.parse().ok())
    {
        return Ok(code);
    }
    bail!(
        "agent pod {} (node {}): {}",
        agent.name,
        agent.node,
        status
            .message
            .unwrap_or_else(|| "the command failed without saying why".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentPod {
        AgentPod {
            name: "rayfence-agent-x".into(),
            node: "n1".into(),
            ready: true,
            phase: "Running".into(),
            image: String::new(),
        }
    }

    #[test]
    fn the_exit_status_comes_from_the_status_channel() {
        let status =
            |v: serde_json::Value| Some(serde_json::from_value::<Status>(v).expect("status"));
        assert_eq!(
            exit_code(status(serde_json::json!({"status": "Success"})), &agent()).expect("0"),
            0
        );
        let three = status(serde_json::json!({
            "status": "Failure", "reason": "NonZeroExitCode",
            "message": "command terminated with non-zero exit code",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
        }));
        assert_eq!(exit_code(three, &agent()).expect("3"), 3);
        let missing = status(serde_json::json!({
            "status": "Failure", "reason": "InternalError",
            "message": "exec: \"rayfence\": executable file not found in $PATH",
        }));
        let error = exit_code(missing, &agent()).expect_err("an error");
        assert!(
            error.to_string().contains("executable file not found"),
            "{error}"
        );
        assert!(exit_code(None, &agent()).is_err());
    }
}
