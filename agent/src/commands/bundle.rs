//! `rayfence bundle`: one `.tar.gz` holding what a maintainer needs to debug the
//! agent on this node: its status, recent flows and metrics (with the map fill
//! taken out of them), versions, kernel facts, its own flags, what it pinned, and
//! the node's CNI configuration, with a `README.txt` saying what each file is.
//! Run on the node, in the agent's pod:
//! `kubectl exec ds/rayfence-agent -- rayfence bundle --output - > bundle.tgz`.
//!
//! Every part is collected on its own: a part that cannot be (no agent, a missing
//! file) is named with its reason in `errors.txt`, the archive is still written and
//! the command still succeeds, with a warning on stderr naming what is missing.
//! The agent's log is not in it: the agent logs to its container's stdout, which
//! is not readable from inside the container, so the command and the README say
//! how to add it.
//!
//! Must not: change anything on the node or in the agent (it only reads), fail the
//! whole bundle for one part, or take more of the node than [`FILES`] lists (the
//! pin directory by name only, of the agent's environment only its settings).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use rayfence::cli::AgentAddress;
use rayfence::cni::install::{DEFAULT_CONF_DIR, PLUGIN_TYPE};
use rayfence::datapath::paths::DEFAULT_BPFFS_DIR;

use super::args::AgentConnection;

#[derive(Args, Debug)]
pub(super) struct BundleArgs {
    #[command(flatten)]
    agent: AgentConnection,
    /// Where to write the archive, `-` for stdout [default:
    /// rayfence-bundle-<node>-<UTC time>.tar.gz in the current directory].
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The agent's pin directory to list [default: the running agent's --bpffs,
    /// else /sys/fs/bpf/rayfence].
    #[arg(long, value_name = "DIR", env = "RAYFENCE_BPFFS")]
    bpffs: Option<PathBuf>,
    /// The node's CNI configuration directory to list [default: the running
    /// agent's --cni-conf-dir, else /etc/cni/net.d].
    #[arg(long, value_name = "DIR", env = "RAYFENCE_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// This node's name, for the archive's name [default: the agent's answer, else
    /// the host name].
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,
}

/// How long one request to the agent may take: a stuck agent is a missing part,
/// not a stuck bundle.
const AGENT_WAIT: Duration = Duration::from_secs(15);
/// The flows the agent keeps for `/v1/flows` (its recent buffer holds this many).
const FLOWS_LIMIT: usize = 1024;
/// The agent's log, which the bundle cannot hold (see the module header).
const LOGS_HINT: &str = "The agent's log is not in the bundle (it goes to the container's stdout). \
Add it: kubectl -n rayfence-system logs <agent pod> --since 1h > agent.log";

pub(super) fn run(args: BundleArgs) -> anyhow::Result<ExitCode> {
    let address = args.agent.address()?;
    let mut bundle = Bundle::default();
    let agent = super::block_on(async { Ok(collect_agent(&address, &mut bundle).await) })?;
    collect_version(&mut bundle, agent.metrics.as_deref());
    collect_kernel(&mut bundle);
    let bpffs = args
        .bpffs
        .or_else(|| agent.flag("--bpffs", "RAYFENCE_BPFFS"))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));
    collect_pins(&mut bundle, &bpffs);
    let cni_conf_dir = args
        .cni_conf_dir
        .or_else(|| agent.flag("--cni-conf-dir", "RAYFENCE_CNI_CONF_DIR"))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONF_DIR));
    collect_cni(&mut bundle, &cni_conf_dir);

    let node = args
        .node_name
        .or(agent.node)
        .or_else(|| read_text("/proc/sys/kernel/hostname").ok())
        .map(|name| file_name_safe(name.trim()))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let now = jiff::Timestamp::now();
    let stem = format!("rayfence-bundle-{node}-{}", now.strftime("%Y%m%dT%H%M%SZ"));
    let mtime = u64::try_from(now.as_second()).unwrap_or(0);

    let missing = bundle.missing();
    let to_stdout = args.output.as_deref() == Some(Path::new("-"));
    let written = if to_stdout {
        let stdout = std::io::stdout().lock();
        bundle
            .write(&stem, mtime, stdout)
            .and_then(|mut stdout| stdout.flush())
            .context("writing the bundle to stdout")?;
        "stdout".to_owned()
    } else {
        let path = args
            .output
            .unwrap_or_else(|| PathBuf::from(format!("{stem}.tar.gz")));
        let file =
            std::fs::File::create(&path).with_context(|| format!("--output {}", path.display()))?;
        bundle
            .write(&stem, mtime, file)
            .and_then(|file| file.sync_all())
            .with_context(|| format!("writing the bundle to {}", path.display()))?;
        path.display().to_string()
    };
    eprintln!("wrote the support bundle to {written}");
    if !missing.is_empty() {
        eprintln!(
            "warning: not collected (reasons in errors.txt): {}",
            missing.join(", ")
        );
    }
    eprintln!("{LOGS_HINT}");
    eprintln!("It holds pod names, addresses and flows of this node: share it with care.");
    Ok(ExitCode::SUCCESS)
}

/// The archive's files in order, and the parts that could not be collected.
#[derive(Debug, Default)]
struct Bundle {
    files: Vec<(String, Vec<u8>)>,
    errors: Vec<(String, String)>,
}

impl Bundle {
    fn add(&mut self, name: &str, contents: impl Into<Vec<u8>>) {
        self.files.push((name.to_owned(), contents.into()));
    }

    /// `name` failed to be collected because of `reason`.
    fn fail(&mut self, name: &str, reason: impl std::fmt::Display) {
        self.errors.push((name.to_owned(), reason.to_string()));
    }

    /// Adds `name` when `contents` was collected, else records why not.
    fn record(&mut self, name: &str, contents: anyhow::Result<impl Into<Vec<u8>>>) {
        match contents {
            Ok(contents) => self.add(name, contents),
            Err(error) => self.fail(name, format!("{error:#}")),
        }
    }

    /// The parts not collected, each named once, in order.
    fn missing(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (name, _) in &self.errors {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "Every part was collected.\n".to_owned();
        }
        self.errors
            .iter()
            .map(|(name, reason)| format!("{name}: {reason}\n"))
            .collect()
    }

    /// The gzipped tar, every file under `root/`, `README.txt` first and
    /// `errors.txt` last.
    fn write<W: Write>(&self, root: &str, mtime: u64, out: W) -> std::io::Result<W> {
        let gzip = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gzip);
        let readme = readme();
        let errors = self.errors_text();
        let all = std::iter::once(("README.txt", readme.as_bytes()))
            .chain(self.files.iter().map(|(n, c)| (n.as_str(), c.as_slice())))
            .chain(std::iter::once(("errors.txt", errors.as_bytes())));
        for (name, contents) in all {
            let mut header = tar::Header::new_ustar();
            header.set_size(contents.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(mtime);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, format!("{root}/{name}"), contents)?;
        }
        tar.into_inner()?.finish()
    }
}

/// What the archive's files are, for whoever opens it.
fn readme() -> String {
    let mut text = String::from(
        "rayfence support bundle: the state of the rayfence agent on one node.\n\
         \n\
         It holds pod names, namespaces, addresses and recent denied flows of this\n\
         node, and the node's CNI configuration: share it with care (with the\n\
         maintainers you are working with, not in a public issue unless you have\n\
         looked through it).\n\
         \n\
         Files:\n",
    );
    for (name, what) in FILES {
        let _ = writeln!(text, "  {name:<22} {what}");
    }
    let _ = write!(
        text,
        "\n{LOGS_HINT}\n\
         (the agent pod is the one on this node: kubectl -n rayfence-system get pods\n\
         -o wide). Put agent.log next to this archive when you share it.\n"
    );
    text
}

/// Every file the bundle may hold, with what it is; `errors.txt` says which are
/// missing and why.
const FILES: [(&str, &str); 18] = [
    ("README.txt", "this file"),
    (
        "status.json",
        "the agent's /v1/status: node, readiness, source, local endpoints, held RayClusters",
    ),
    (
        "flows.ndjson",
        "the agent's recent denied (and audited) flows, /v1/flows, one JSON object a line",
    ),
    (
        "metrics.txt",
        "the agent's /metrics (Prometheus text format)",
    ),
    (
        "map-fill.txt",
        "entries and capacity of each datapath map, from the metrics",
    ),
    (
        "version.txt",
        "this rayfence's version and commit, and the running agent's rayfence_build_info",
    ),
    (
        "agent/cmdline.txt",
        "the running agent's command line, one argument a line",
    ),
    (
        "agent/environment.txt",
        "the running agent's RAYFENCE_* and NODE_NAME variables",
    ),
    ("kernel/version", "/proc/version"),
    ("kernel/osrelease", "/proc/sys/kernel/osrelease"),
    ("kernel/cmdline", "/proc/cmdline"),
    (
        "kernel/btf.txt",
        "whether /sys/kernel/btf/vmlinux exists (the kernel's BTF)",
    ),
    (
        "kernel/mounts.txt",
        "the bpf and cgroup2 lines of /proc/self/mountinfo",
    ),
    (
        "bpffs.txt",
        "what is pinned under the agent's pin directory, names only",
    ),
    (
        "cni/listing.txt",
        "the CNI configuration directory: file names, sizes, which one the runtime reads",
    ),
    (
        "cni/<file>",
        "that file (the configuration rayfence-cni is chained into), as it is",
    ),
    (
        "errors.txt",
        "every part that could not be collected, with the reason",
    ),
    ("agent.log", "not collected: add it yourself (see below)"),
];

/// What the agent told us that the rest of the bundle uses.
#[derive(Debug, Default)]
struct AgentFacts {
    node: Option<String>,
    metrics: Option<String>,
    /// The running agent's arguments and environment (local socket only).
    cmdline: Vec<String>,
    environment: Vec<(String, String)>,
}

impl AgentFacts {
    /// The running agent's `flag` (`--flag VALUE` or `--flag=VALUE`), else its
    /// environment variable `env`.
    fn flag(&self, flag: &str, env: &str) -> Option<PathBuf> {
        let mut args = self.cmdline.iter();
        let mut found = None;
        while let Some(arg) = args.next() {
            if arg == flag {
                found = args.next().cloned();
            } else if let Some(value) = arg.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
                found = Some(value.to_owned());
            }
        }
        found
            .or_else(|| {
                self.environment
                    .iter()
                    .find(|(k, _)| k == env)
                    .map(|(_, v)| v.clone())
            })
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }
}

/// Status, flows and metrics from the agent, and (over the local socket) its own
/// command line and settings.
async fn collect_agent(address: &AgentAddress, bundle: &mut Bundle) -> AgentFacts {
    let mut facts = AgentFacts::default();
    match fetch(address, "/v1/status").await {
        Ok(body) => {
            facts.node = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["node"].as_str().map(str::to_owned));
            bundle.add("status.json", body);
        }
        Err(error) => bundle.fail("status.json", format!("{error:#}")),
    }
    let flows = fetch(address, &format!("/v1/flows?limit={FLOWS_LIMIT}")).await;
    bundle.record("flows.ndjson", flows);
    match fetch(address, "/metrics").await {
        Ok(body) => {
            let text = String::from_utf8_lossy(&body).into_owned();
            bundle.add("map-fill.txt", map_fill(&text));
            bundle.add("metrics.txt", body);
            facts.metrics = Some(text);
        }
        Err(error) => {
            let reason = format!("{error:#}");
            bundle.fail("metrics.txt", &reason);
            bundle.fail("map-fill.txt", "no metrics (see metrics.txt)");
        }
    }
    match address {
        AgentAddress::Socket(socket) => match agent_process(socket).await {
            Ok((cmdline, environment)) => {
                bundle.add("agent/cmdline.txt", lines(&cmdline));
                let env: Vec<String> = environment
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                bundle.add(
                    "agent/environment.txt",
                    if env.is_empty() {
                        "none of its variables is a RAYFENCE_* or NODE_NAME\n".to_owned()
                    } else {
                        lines(&env)
                    },
                );
                facts.cmdline = cmdline;
                facts.environment = environment;
            }
            Err(error) => {
                let reason = format!("{error:#}");
                bundle.fail("agent/cmdline.txt", &reason);
                bundle.fail("agent/environment.txt", &reason);
            }
        },
        AgentAddress::Http { .. } => {
            let reason = "the agent was asked over HTTP (--agent): its process is on another host";
            bundle.fail("agent/cmdline.txt", reason);
            bundle.fail("agent/environment.txt", reason);
        }
    }
    facts
}

/// GET `path` from the agent, the whole answer; anything but 200 is an error with
/// the agent's words.
async fn fetch(agent: &AgentAddress, path: &str) -> anyhow::Result<Vec<u8>> {
    match tokio::time::timeout(AGENT_WAIT, rayfence::cli::fetch_text(agent, path)).await {
        Ok(answer) => answer
            .map(String::into_bytes)
            .with_context(|| format!("GET {path}")),
        Err(_) => bail!("GET {path}: {agent} did not answer within {AGENT_WAIT:?}"),
    }
}

/// The process that answers on `socket` (its peer credentials): its arguments, and
/// its RAYFENCE_* and NODE_NAME variables (the rest of its environment stays out).
async fn agent_process(socket: &Path) -> anyhow::Result<(Vec<String>, Vec<(String, String)>)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to agent socket {}", socket.display()))?;
    let pid = stream
        .peer_cred()
        .context("the agent socket's peer credentials")?
        .pid()
        .context("the agent socket's peer has no process id here")?;
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline"))
        .with_context(|| format!("reading {}", proc.join("cmdline").display()))?;
    let environ = std::fs::read(proc.join("environ"))
        .with_context(|| format!("reading {}", proc.join("environ").display()))?;
    Ok((
        nul_separated(&cmdline),
        agent_settings(&nul_separated(&environ)),
    ))
}

fn nul_separated(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect()
}

/// The variables that are the agent's settings: nothing else of its environment.
fn agent_settings(environment: &[String]) -> Vec<(String, String)> {
    environment
        .iter()
        .filter_map(|entry| entry.split_once('='))
        .filter(|(key, _)| key.starts_with("RAYFENCE_") || *key == "NODE_NAME")
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn lines(items: &[String]) -> String {
    items.iter().map(|item| format!("{item}\n")).collect()
}

/// `rayfence_map_entries` against `rayfence_map_capacity`, one map a line.
fn map_fill(metrics: &str) -> String {
    let mut maps: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for line in metrics.lines() {
        let (slot, rest) = if let Some(rest) = line.strip_prefix("rayfence_map_entries{") {
            (0, rest)
        } else if let Some(rest) = line.strip_prefix("rayfence_map_capacity{") {
            (1, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let map = labels
            .split(',')
            .find_map(|label| label.strip_prefix("map=\""))
            .map(|v| v.trim_end_matches('"').to_owned())
            .unwrap_or_else(|| labels.to_owned());
        let value = value.split_whitespace().next().and_then(|v| v.parse().ok());
        let entry = maps.entry(map).or_default();
        if slot == 0 {
            entry.0 = value;
        } else {
            entry.1 = value;
        }
    }
    if maps.is_empty() {
        return "no rayfence_map_entries or rayfence_map_capacity in the metrics\n".to_owned();
    }
    let mut text = format!(
        "{:<20} {:>12} {:>12} {:>7}\n",
        "MAP", "ENTRIES", "CAPACITY", "FILL"
    );
    for (map, (entries, capacity)) in maps {
        let show = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v}"));
        let fill = match (entries, capacity) {
            (Some(e), Some(c)) if c > 0.0 => format!("{:.1}%", e / c * 100.0),
            _ => "?".to_owned(),
        };
        let _ = writeln!(
            text,
            "{map:<20} {:>12} {:>12} {fill:>7}",
            show(entries),
            show(capacity)
        );
    }
    text
}

/// This binary's version and commit, and the running agent's build info (a mixed
/// rollout shows as two versions).
fn collect_version(bundle: &mut Bundle, metrics: Option<&str>) {
    let mut text = format!(
        "rayfence {} (commit {})\n",
        env!("CARGO_PKG_VERSION"),
        env!("RAYFENCE_COMMIT")
    );
    text.push_str("\nthe running agent:\n");
    match metrics {
        Some(metrics) => {
            let info: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("rayfence_build_info{"))
                .collect();
            if info.is_empty() {
                text.push_str("no rayfence_build_info in its metrics\n");
            }
            for line in info {
                let _ = writeln!(text, "{line}");
            }
        }
        None => text.push_str("unknown: its metrics were not collected\n"),
    }
    bundle.add("version.txt", text);
}

fn collect_kernel(bundle: &mut Bundle) {
    bundle.record("kernel/version", read_text("/proc/version"));
    bundle.record("kernel/osrelease", read_text("/proc/sys/kernel/osrelease"));
    bundle.record("kernel/cmdline", read_text("/proc/cmdline"));
    let btf = "/sys/kernel/btf/vmlinux";
    bundle.add(
        "kernel/btf.txt",
        match std::fs::metadata(btf) {
            Ok(meta) => format!("{btf}: present, {} bytes\n", meta.len()),
            Err(error) => format!("{btf}: absent ({error})\n"),
        },
    );
    bundle.record(
        "kernel/mounts.txt",
        read_text("/proc/self/mountinfo").map(|text| bpf_and_cgroup2_mounts(&text)),
    );
}

/// The mountinfo lines of bpf and cgroup2 filesystems (the type is the first field
/// after the ` - ` separator).
fn bpf_and_cgroup2_mounts(mountinfo: &str) -> String {
    let kept: String = mountinfo
        .lines()
        .filter(|line| {
            line.split_once(" - ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|fstype| fstype == "bpf" || fstype == "cgroup2")
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if kept.is_empty() {
        "no bpf or cgroup2 filesystem is mounted in this mount namespace\n".to_owned()
    } else {
        kept
    }
}

/// Names under the pin directory, one a line (directories end in `/`).
fn collect_pins(bundle: &mut Bundle, dir: &Path) {
    let mut names = Vec::new();
    match list_tree(dir, Path::new(""), &mut names) {
        Ok(()) => {
            let mut text = format!("{}:\n", dir.display());
            if names.is_empty() {
                text.push_str("(empty)\n");
            }
            text.push_str(&lines(&names));
            bundle.add("bpffs.txt", text);
        }
        Err(error) => bundle.fail("bpffs.txt", format!("{error:#}")),
    }
}

fn list_tree(dir: &Path, prefix: &Path, names: &mut Vec<String>) -> anyhow::Result<()> {
    let here = if prefix.as_os_str().is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(prefix)
    };
    let mut entries: Vec<_> = std::fs::read_dir(&here)
        .with_context(|| format!("listing {}", here.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let relative = prefix.join(entry.file_name());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(format!("{}/", relative.display()));
            list_tree(dir, &relative, names)?;
        } else {
            names.push(relative.display().to_string());
        }
    }
    Ok(())
}

/// The extensions libcni reads configurations from.
const CNI_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The conf dir's listing, and the configuration the runtime reads (the first by
/// name, where rayfence-cni is chained), as it is.
fn collect_cni(bundle: &mut Bundle, dir: &Path) {
    let mut entries: Vec<(String, u64)> = match std::fs::read_dir(dir) {
        Ok(read) => read
            .filter_map(Result::ok)
            .map(|e| {
                let size = e.metadata().map_or(0, |m| m.len());
                (e.file_name().to_string_lossy().into_owned(), size)
            })
            .collect(),
        Err(error) => {
            bundle.fail(
                "cni/listing.txt",
                format!("listing {}: {error}", dir.display()),
            );
            return;
        }
    };
    entries.sort();
    let first = entries
        .iter()
        .map(|(name, _)| name)
        .find(|name| {
            Path::new(name)
                .extension()
                .is_some_and(|ext| CNI_EXTENSIONS.iter().any(|e| ext == *e))
        })
        .cloned();
    let mut text = format!("{}:\n", dir.display());
    for (name, size) in &entries {
        let mark = if Some(name) == first.as_ref() {
            "  <- read by the runtime"
        } else {
            ""
        };
        let _ = writeln!(text, "{size:>8}  {name}{mark}");
    }
    let Some(first) = first else {
        text.push_str(
            "no .conf, .conflist or .json file: the runtime has no network configuration here\n",
        );
        bundle.add("cni/listing.txt", text);
        return;
    };
    match read_text(dir.join(&first)) {
        Ok(contents) => {
            let chained = contents.contains(&format!("\"{PLUGIN_TYPE}\""));
            let _ = writeln!(
                text,
                "{first} {} {PLUGIN_TYPE}",
                if chained { "chains" } else { "does not chain" }
            );
            bundle.add("cni/listing.txt", text);
            bundle.add(&format!("cni/{first}"), contents);
        }
        Err(error) => {
            bundle.add("cni/listing.txt", text);
            bundle.fail(&format!("cni/{first}"), format!("{error:#}"));
        }
    }
}

fn read_text(path: impl AsRef<Path>) -> anyhow::Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `name` with anything but letters, digits, `.`, `-` and `_` replaced, for a
/// file name.
fn file_name_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// The archive's files, by path, with their contents.
    fn unpack(archive: &[u8]) -> BTreeMap<String, String> {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        let mut files = BTreeMap::new();
        for entry in tar.entries().expect("a tar") {
            let mut entry = entry.expect("an entry");
            let path = entry.path().expect("a path").display().to_string();
            let mut contents = String::new();
            entry.read_to_string(&mut contents).expect("utf-8");
            files.insert(path, contents);
        }
        files
    }

    #[test]
    fn the_archive_holds_the_readme_every_file_and_errors_under_one_directory() {
        let mut bundle = Bundle::default();
        bundle.add("status.json", r#"{"node":"n1"}"#);
        bundle.add("kernel/version", "Linux 6.6\n");
        let archive = bundle
            .write("rb", 1_700_000_000, Vec::new())
            .expect("written");
        let files = unpack(&archive);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            [
                "rb/README.txt",
                "rb/errors.txt",
                "rb/kernel/version",
                "rb/status.json"
            ]
        );
        assert_eq!(files["rb/status.json"], r#"{"node":"n1"}"#);
        assert_eq!(files["rb/errors.txt"], "Every part was collected.\n");
        let readme = &files["rb/README.txt"];
        assert!(readme.contains("share it with care"), "{readme}");
        assert!(
            readme.contains("kubectl -n rayfence-system logs"),
            "{readme}"
        );
        for (name, _) in FILES {
            assert!(readme.contains(name), "{name} not described: {readme}");
        }
    }

    #[test]
    fn a_part_that_fails_is_named_with_its_reason_and_the_rest_is_kept() {
        let mut bundle = Bundle::default();
        bundle.record("kernel/version", read_text("/proc/version"));
        bundle.record("missing.txt", read_text("/nonexistent-rf/file"));
        bundle.fail("metrics.txt", "connecting to agent socket /x.sock: refused");
        bundle.fail("metrics.txt", "again");
        assert_eq!(bundle.missing(), ["missing.txt", "metrics.txt"]);
        let files = unpack(&bundle.write("rb", 0, Vec::new()).expect("written"));
        assert!(files.contains_key("rb/kernel/version"));
        assert!(!files.contains_key("rb/missing.txt"));
        let errors = &files["rb/errors.txt"];
        assert!(
            errors.contains("missing.txt: reading /nonexistent-rf/file: No such file"),
            "{errors}"
        );
        assert!(
            errors.contains("metrics.txt: connecting to agent socket /x.sock"),
            "{errors}"
        );
    }

    #[test]
    fn an_unreachable_agent_is_recorded_for_each_of_its_parts() {
        let socket = PathBuf::from(format!("/nonexistent-rf/agent-{}.sock", std::process::id()));
        let mut bundle = Bundle::default();
        let facts = super::super::block_on(async {
            Ok(collect_agent(&AgentAddress::Socket(socket.clone()), &mut bundle).await)
        })
        .expect("runtime");
        assert!(facts.node.is_none() && facts.metrics.is_none());
        assert!(bundle.files.is_empty(), "{:?}", bundle.files);
        for part in [
            "status.json",
            "flows.ndjson",
            "metrics.txt",
            "agent/cmdline.txt",
        ] {
            let (_, reason) = bundle
                .errors
                .iter()
                .find(|(name, _)| name == part)
                .unwrap_or_else(|| panic!("{part} not recorded: {:?}", bundle.errors));
            if part != "agent/cmdline.txt" {
                assert!(reason.contains(&socket.display().to_string()), "{reason}");
            }
        }
    }

    #[test]
    fn map_fill_pairs_entries_with_capacity() {
        let metrics = "# HELP rayfence_map_entries Entries\n\
            rayfence_map_entries{map=\"endpoints\"} 3\n\
            rayfence_map_capacity{map=\"endpoints\"} 4096\n\
            rayfence_map_entries{map=\"policy\"} 65536\n\
            rayfence_map_capacity{map=\"policy\"} 65536\n\
            rayfence_map_capacity{map=\"conntrack\"} 262144\n";
        let fill = map_fill(metrics);
        let line = |map: &str| {
            fill.lines()
                .find(|l| l.starts_with(map))
                .unwrap_or_else(|| panic!("{map}: {fill}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(line("endpoints"), ["endpoints", "3", "4096", "0.1%"]);
        assert_eq!(line("policy"), ["policy", "65536", "65536", "100.0%"]);
        assert_eq!(line("conntrack"), ["conntrack", "?", "262144", "?"]);
        assert!(map_fill("up 1\n").starts_with("no rayfence_map_entries"));
    }

    #[test]
    fn only_bpf_and_cgroup2_mounts_are_kept() {
        let mountinfo = "22 1 0:21 / /proc rw - proc proc rw\n\
            30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
            31 25 0:27 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n\
            40 1 0:30 / /run/x rw shared:5 - tmpfs tmpfs rw\n";
        let kept = bpf_and_cgroup2_mounts(mountinfo);
        assert_eq!(kept.lines().count(), 2, "{kept}");
        assert!(kept.contains("/sys/fs/cgroup") && kept.contains("/sys/fs/bpf"));
        assert!(bpf_and_cgroup2_mounts(mountinfo.lines().next().unwrap()).starts_with("no bpf"));
    }

    #[test]
    fn the_agent_s_own_flags_win_over_its_environment() {
        let facts = AgentFacts {
            cmdline: [
                "rayfence",
                "agent",
                "--bpffs=/run/rayfence/bpffs/rayfence",
                "--cni-conf-dir",
                "/run/cni",
            ]
            .map(str::to_owned)
            .to_vec(),
            environment: vec![
                ("RAYFENCE_BPFFS".to_owned(), "/env/bpffs".to_owned()),
                ("RAYFENCE_CNI_BIN_DIR".to_owned(), "/opt/cni/bin".to_owned()),
            ],
            ..AgentFacts::default()
        };
        assert_eq!(
            facts.flag("--bpffs", "RAYFENCE_BPFFS"),
            Some(PathBuf::from("/run/rayfence/bpffs/rayfence"))
        );
        assert_eq!(
            facts.flag("--cni-conf-dir", "RAYFENCE_CNI_CONF_DIR"),
            Some(PathBuf::from("/run/cni"))
        );
        let env_only = AgentFacts {
            environment: facts.environment.clone(),
            ..AgentFacts::default()
        };
        assert_eq!(
            env_only.flag("--bpffs", "RAYFENCE_BPFFS"),
            Some(PathBuf::from("/env/bpffs"))
        );
        assert_eq!(
            env_only.flag("--cni-conf-dir", "RAYFENCE_CNI_CONF_DIR"),
            None
        );
        let settings = agent_settings(&[
            "PATH=/bin".to_owned(),
            "NODE_NAME=n1".to_owned(),
            "RAYFENCE_AUDIT=false".to_owned(),
        ]);
        assert_eq!(settings.len(), 2, "{settings:?}");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rf-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn pins_are_listed_by_name_only() {
        let dir = temp_dir("pins");
        std::fs::create_dir_all(dir.join("maps")).unwrap();
        std::fs::write(dir.join("maps/policy"), "secret contents").unwrap();
        std::fs::write(dir.join("version"), "").unwrap();
        let mut bundle = Bundle::default();
        collect_pins(&mut bundle, &dir);
        collect_pins(&mut bundle, &dir.join("absent"));
        let (_, listing) = &bundle.files[0];
        let listing = String::from_utf8_lossy(listing);
        assert!(
            listing.ends_with("maps/\nmaps/policy\nversion\n"),
            "{listing}"
        );
        assert!(!listing.contains("secret"));
        assert_eq!(bundle.missing(), ["bpffs.txt"]);
        let reason = &bundle.errors[0].1;
        assert!(
            reason.ends_with("/absent: No such file or directory (os error 2)"),
            "{reason}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cni_configuration_the_runtime_reads_is_copied_and_marked() {
        let dir = temp_dir("cni");
        std::fs::write(
            dir.join("10-flannel.conflist"),
            r#"{"plugins":[{"type":"flannel"},{"type":"rayfence-cni"}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("99-other.conf"), "{}").unwrap();
        std::fs::write(dir.join("README"), "not a configuration").unwrap();
        let mut bundle = Bundle::default();
        collect_cni(&mut bundle, &dir);
        let names: Vec<&str> = bundle.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cni/listing.txt", "cni/10-flannel.conflist"]);
        let listing = String::from_utf8_lossy(&bundle.files[0].1);
        assert!(
            listing.contains("10-flannel.conflist  <- read by the runtime"),
            "{listing}"
        );
        assert!(
            listing.contains("10-flannel.conflist chains rayfence-cni"),
            "{listing}"
        );
        assert!(bundle.errors.is_empty());
        let mut missing = Bundle::default();
        collect_cni(&mut missing, &dir.join("absent"));
        assert_eq!(missing.missing(), ["cni/listing.txt"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_names_are_made_safe_for_a_file_name() {
        assert_eq!(
            file_name_safe("ip-10-0-0-1.ec2.internal"),
            "ip-10-0-0-1.ec2.internal"
        );
        assert_eq!(file_name_safe("a/b c"), "a_b_c");
    }
}
