//! The operator commands' client side: `rayfence status`, `rayfence explain` and
//! `rayfence flows` ask a running agent over its local socket (or its HTTP address,
//! with a bearer token when `--metrics-auth` protects it) and print for a person or
//! as JSON; `rayfence explain --manifests DIR` answers offline from manifests, with
//! the same engine the agent runs.
//!
//! Errors are for a person at a terminal (anyhow, each naming the flag or the
//! agent address it is about). Everything is written to stdout through [`out`], so
//! a reader that goes away (`| head`) ends the command quietly instead of a panic:
//! [`stdout_closed`] tells such an error apart.
//!
//! Must not: compute a verdict itself (the engine does, through [`crate::operator::explain`]),
//! or change anything in the agent.
mod client;
pub mod render;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

pub use client::AgentAddress;
use client::get;

use crate::operator::wire::{ExplainReport, FlowFilter, FlowRecord, FlowVerdict, StatusReport};
use crate::policy::{Engine, Settings};
use crate::source::files::Manifests;
use crate::source::{Object, ObjectKind};

/// How answers are printed (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns and short sentences, for a person.
    Table,
    /// The table with every field in a column of its own.
    Wide,
    /// The agent's answer as JSON (flows: one object per line).
    Json,
    /// The same as YAML (flows: one document per event).
    Yaml,
}

/// Exit status of `rayfence explain`, the way `kubectl auth can-i` gives its answer.
pub mod exit {
    /// The flow passes: every side that is enforced allows it.
    pub const ALLOWED: u8 = 0;
    /// The policy denies the flow (`denied`, and `audit`: denied, let through only
    /// while audit mode is on).
    pub const DENIED: u8 = 1;
    /// No answer: bad arguments, no agent, unreadable manifests, any other error.
    pub const ERROR: u8 = 2;
    /// No verdict here: a side is decided by another node's agent (`unknown`).
    pub const UNKNOWN: u8 = 3;
}

/// The exit status for an explanation's verdict (see [`exit`]).
pub fn verdict_exit_code(verdict: &str) -> u8 {
    match verdict {
        "allowed" => exit::ALLOWED,
        "denied" | "audit" => exit::DENIED,
        _ => exit::UNKNOWN,
    }
}

/// The reader of stdout went away (`rayfence ... | head`): not a failure of the
/// command, which just stops writing. Only [`out`] gives it, so a broken pipe to
/// the agent is never mistaken for it.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Writes `text` to stdout as is.
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// Whether `error` is (or was caused by) [`StdoutClosed`].
pub fn stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<StdoutClosed>())
}

/// A line on stderr for a person; nothing to do if stderr is gone too.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// GET `path_and_query` from the agent, the whole answer as text; anything but 200
/// is an error carrying the agent's words (`rayfence bundle` collects with this).
pub async fn fetch_text(agent: &AgentAddress, path_and_query: &str) -> anyhow::Result<String> {
    client::get(agent, path_and_query).await?.text().await
}

pub async fn status(agent: &AgentAddress, output: Output) -> anyhow::Result<()> {
    let body = get(agent, "/v1/status").await?.text().await?;
    let report: StatusReport = serde_json::from_str(&body)
        .with_context(|| format!("{agent}: the status answer is not what this version reads"))?;
    let text = match output {
        Output::Json => json(&report)?,
        Output::Yaml => yaml(&report)?,
        Output::Table => render::status(&report, false),
        Output::Wide => render::status(&report, true),
    };
    out(&text)
}

fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

fn yaml<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    serde_norway::to_string(value).context("writing YAML")
}

/// Asks the running agent and prints the answer (a closed stdout is not an error
/// here: the verdict is known, and is what the caller exits with).
pub async fn explain(
    agent: &AgentAddress,
    from: &str,
    to: &str,
    output: Output,
) -> anyhow::Result<ExplainReport> {
    let report = fetch_explanation(agent, from, to).await?;
    print_explanation(&report, output)?;
    Ok(report)
}

/// Asks the running agent.
pub async fn fetch_explanation(
    agent: &AgentAddress,
    from: &str,
    to: &str,
) -> anyhow::Result<ExplainReport> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("from", from)
        .append_pair("to", to)
        .finish();
    let body = get(agent, &format!("/v1/explain?{query}"))
        .await?
        .text()
        .await?;
    serde_json::from_str(&body)
        .with_context(|| format!("{agent}: the explain answer is not what this version reads"))
}

/// An explanation as `rayfence explain` prints it for a person.
pub fn render_explanation(report: &ExplainReport) -> String {
    render::explanation(report, false)
}

/// Answers from manifests: every pod counts as local, so both sides of a flow are
/// decided. `settings` carries the policy flags (DNS, operator, NetworkPolicies).
pub fn explain_offline(
    dir: &Path,
    settings: Settings,
    from: &str,
    to: &str,
    output: Output,
) -> anyhow::Result<ExplainReport> {
    let engine = offline_engine(dir, settings)?;
    for problem in engine.problems() {
        note(&format!(
            "note: {} {}/{} {} = {}: {}",
            problem.object.kind,
            problem.object.namespace,
            problem.object.name,
            problem.field,
            problem.value,
            problem.message
        ));
    }
    let report = crate::operator::explain::explain_flow(&engine, from, to)?;
    print_explanation(&report, output)?;
    Ok(report)
}

fn print_explanation(report: &ExplainReport, output: Output) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => json(report)?,
        Output::Yaml => yaml(report)?,
        Output::Table => render::explanation(report, false),
        Output::Wide => render::explanation(report, true),
    };
    match out(&text) {
        Err(error) if stdout_closed(&error) => Ok(()),
        other => other,
    }
}

/// The engine over every object in `dir`, each pod placed on `settings.node_name`.
pub fn offline_engine(dir: &Path, settings: Settings) -> anyhow::Result<Engine> {
    let mut manifests = Manifests::default();
    let errors = manifests
        .rescan(dir)
        .with_context(|| format!("--manifests {}", dir.display()))?
        .unwrap_or_default();
    if let Some(first) = errors.first() {
        bail!(
            "--manifests {}: {} file(s) could not be read; first: {first}",
            dir.display(),
            errors.len()
        );
    }
    // The same reading the agent applies, said the way the agent's log does.
    for c in manifests.conflicts() {
        let files: Vec<String> = c.files.iter().map(|f| f.display().to_string()).collect();
        note(&format!(
            "note: {} {}/{} is in more than one file ({}): {}",
            c.kind,
            c.key.namespace,
            c.key.name,
            files.join(", "),
            c.reading.describe()
        ));
    }
    let node = settings.node_name.clone();
    let mut engine = Engine::new(settings);
    let listing = manifests.listing();
    // Namespaces first, so selectors see their labels from the start.
    let order = [ObjectKind::Namespace].into_iter().chain(
        ObjectKind::ALL
            .into_iter()
            .filter(|k| *k != ObjectKind::Namespace),
    );
    for kind in order {
        for object in listing.get(&kind).into_iter().flatten() {
            match object {
                Object::Namespace(o) => engine.upsert_namespace(o),
                Object::Pod(o) => {
                    let mut pod = o.clone();
                    pod.spec.get_or_insert_with(Default::default).node_name = Some(node.clone());
                    engine.upsert_pod(&pod);
                }
                Object::RayCluster(o) => engine.upsert_raycluster(o),
                Object::Service(o) => engine.upsert_service(o),
                Object::EndpointSlice(o) => engine.upsert_endpoint_slice(o),
                Object::NetworkPolicy(o) => engine.upsert_network_policy(o),
                Object::Node(_) => {}
            }
        }
    }
    Ok(engine)
}

/// `rayfence flows`: the recent events, then (with `follow`) every new one until
/// interrupted.
pub async fn flows(
    agent: &AgentAddress,
    filter: &FlowFilter,
    follow: bool,
    limit: usize,
    output: Output,
) -> anyhow::Result<()> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(verdict) = filter.verdict {
        query.append_pair("verdict", verdict.as_str());
    }
    if let Some(ns) = &filter.namespace {
        query.append_pair("namespace", ns);
    }
    if let Some(rc) = &filter.raycluster {
        query.append_pair("raycluster", rc);
    }
    query.append_pair("limit", &limit.to_string());
    if follow {
        query.append_pair("follow", "true");
    }
    let mut response = get(agent, &format!("/v1/flows?{}", query.finish())).await?;
    while let Some(line) = response.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<FlowRecord>(&line) {
            Ok(record) => out(&match output {
                Output::Json => format!("{line}\n"),
                Output::Yaml => format!("---\n{}", yaml(&record)?),
                Output::Table => render::flow(&record, false) + "\n",
                Output::Wide => render::flow(&record, true) + "\n",
            })?,
            Err(_) => match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v.get("skipped").is_some() => {
                    note(&format!("(fell behind: {} events skipped)", v["skipped"]));
                }
                _ => bail!("{agent}: unexpected line in the flow stream: {line}"),
            },
        }
    }
    Ok(())
}

/// `--verdict dropped|audit`.
pub fn parse_verdict(value: &str) -> anyhow::Result<FlowVerdict> {
    match value {
        "dropped" => Ok(FlowVerdict::Dropped),
        "audit" => Ok(FlowVerdict::Audit),
        other => bail!("--verdict {other:?}: expected dropped or audit"),
    }
}

/// The default local socket, shared by the agent and the commands.
pub const DEFAULT_API_SOCKET: &str = "/run/rayfence/api/agent.sock";

/// Where the commands find the agent: `--agent URL` wins, else the socket.
pub fn agent_address(
    agent: Option<&str>,
    socket: &Path,
    token_file: Option<&Path>,
) -> anyhow::Result<AgentAddress> {
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    match agent {
        Some(url) => AgentAddress::http(url, token),
        None => Ok(AgentAddress::Socket(PathBuf::from(socket))),
    }
}
