//! The real `rayfence agent` on a simulated node, for the end-to-end tests and the
//! scale benchmark: the binary started in a topology's node namespace (`nsenter
//! --net`) with its own bpffs pin directory and a manifests directory (or the fake
//! API server, reached through a kubeconfig), a fake kubelet cgroup tree so pods are
//! found the way the kubelet lays them out, reading its metrics, and guards that
//! kill the agent and run `rayfence cleanup` even when a test panics. The objects it
//! is fed come from [`crate::objects::json`]. [`Agent::start_with`] starts it seeing
//! other cgroup mounts than the machine's ([`CgroupMount`]: a pure cgroup v2 or a
//! v1-only host). Must not: assert anything.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rayfence::discovery::QosClass;
use rayfence::discovery::cgroup::{cgroupfs_path, pod_cgroup_name};
use serde_json::Value;

pub use crate::agent_bin::rayfence_bin;
pub use crate::cgroup::CgroupMount;
use crate::fake_api::FakeApiServer;
use crate::{Layout, Node, Pod, Server, TestCgroup, Topology};

pub const METRICS_PORT: u16 = 9402;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("rf-{role}-{}-{n}", std::process::id())
}

/// A fake kubelet cgroup tree (cgroupfs driver, Guaranteed pods:
/// `<root>/kubepods/pod<uid>/ctr`); everything in it is killed and removed on drop.
pub struct Kubelet {
    pub root: TestCgroup,
}

impl Kubelet {
    pub fn new() -> Result<Self> {
        Ok(Kubelet {
            root: TestCgroup::new()?,
        })
    }

    /// Creates the pod's cgroup and its container child; returns the container's.
    pub fn pod_cgroup(&self, uid: &str) -> Result<PathBuf> {
        let rel = cgroupfs_path(&pod_cgroup_name("/", QosClass::Guaranteed, uid));
        let pod = self.root.path().join(rel);
        let ctr = pod.join("ctr");
        std::fs::create_dir_all(&ctr).with_context(|| format!("mkdir {}", ctr.display()))?;
        Ok(ctr)
    }
}

/// A pod's "sandbox": its kubelet cgroup with a pause-like process in its network
/// namespace (what the agent reaches the pod's namespace through).
pub struct Sandbox {
    pub uid: String,
    pub ctr: PathBuf,
    _pause: Server,
}

pub fn sandbox(kubelet: &Kubelet, pod: &Pod, uid: &str) -> Result<Sandbox> {
    let ctr = kubelet.pod_cgroup(uid)?;
    let pause = pod.prober_in(&ctr).serve_tcp(9)?;
    Ok(Sandbox {
        uid: uid.to_owned(),
        ctr,
        _pause: pause,
    })
}

/// A bridged node whose pods each run in a kubelet-like cgroup with a sandbox
/// process, as the agent finds pods on a real node. Fields drop in order: the
/// sandboxes' processes first, then their cgroups, then the namespaces.
pub struct SimNode {
    _sandboxes: Vec<Sandbox>,
    pub kubelet: Kubelet,
    pub topo: Topology,
    /// The pods' namespace in the manifests: `ray-<topology tag>`.
    pub ns: String,
    /// Pod UIDs, in the order of the pod names given.
    pub uids: Vec<String>,
}

impl SimNode {
    /// Pods `names` on one bridged node, UIDs from `uid(first_uid)` on.
    pub fn new(names: &[&str], first_uid: u32) -> Result<Self> {
        let topo = Topology::with_pods(Layout::Bridged, crate::probe_bin(), names)?;
        let kubelet = Kubelet::new()?;
        let uids: Vec<String> = (first_uid..).take(names.len()).map(uid).collect();
        let sandboxes = names
            .iter()
            .zip(&uids)
            .map(|(name, uid)| sandbox(&kubelet, topo.pod(name), uid))
            .collect::<Result<Vec<_>>>()?;
        Ok(SimNode {
            _sandboxes: sandboxes,
            kubelet,
            ns: format!("ray-{}", topo.tag()),
            topo,
            uids,
        })
    }
}

impl SimNode {
    /// `rayfence agent --manifests DIR` on this node as `node_name`, with more flags,
    /// once `/readyz` says it is ready.
    pub fn start_agent(
        &self,
        node_name: &str,
        manifests: &Path,
        bpffs: &Bpffs,
        extra_args: &[&str],
    ) -> Result<Agent> {
        self.start_ready(node_name, manifests, None, bpffs, extra_args)
    }

    /// `rayfence agent --kubeconfig FILE` on this node as `node_name` (objects from
    /// that API server: [`fake_api_in`], [`Manifests::write_kubeconfig`]), with more
    /// flags, once `/readyz` says it is ready.
    pub fn start_agent_on_api(
        &self,
        node_name: &str,
        kubeconfig: &Path,
        bpffs: &Bpffs,
        extra_args: &[&str],
    ) -> Result<Agent> {
        // The manifests directory is not read when a kubeconfig is given.
        let no_manifests = Path::new("/nonexistent");
        self.start_ready(node_name, no_manifests, Some(kubeconfig), bpffs, extra_args)
    }

    fn start_ready(
        &self,
        node_name: &str,
        manifests: &Path,
        kubeconfig: Option<&Path>,
        bpffs: &Bpffs,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let agent = Agent::start(&AgentOptions {
            node: self.topo.node(0),
            node_name,
            manifests,
            bpffs: &bpffs.path,
            cgroup_root: self.kubelet.root.path(),
            kubeconfig,
            extra_args,
        })?;
        agent.wait_ready(self.topo.node(0), Duration::from_secs(20))?;
        Ok(agent)
    }
}

/// A fake API server made inside `node`'s namespace, so the agent reaches it at
/// 127.0.0.1, and the runtime serving it (keep both).
pub fn fake_api_in(node: &Node) -> Result<(tokio::runtime::Runtime, FakeApiServer)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = node.netns.run(|| rt.block_on(FakeApiServer::start()))??;
    Ok((rt, server))
}

pub fn uid(n: u32) -> String {
    format!("a9e1{n:04x}-aaaa-4bbb-8ccc-{:012x}", std::process::id())
}

/// A bpffs directory for one test, cleaned up (`rayfence cleanup`) and removed on drop.
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    /// A fresh name under `/sys/fs/bpf`, with a bpf filesystem mounted there (the
    /// agent would mount it too, but tests read pins there themselves).
    #[expect(
        clippy::new_without_default,
        reason = "each is a fresh directory under /sys/fs/bpf, not a default value"
    )]
    pub fn new() -> Self {
        let path = PathBuf::from("/sys/fs/bpf").join(unique("test"));
        crate::bpffs::ensure_mounted(&path).expect("a bpf filesystem at /sys/fs/bpf");
        Bpffs { path }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(bin) = rayfence_bin() {
            let _ = Command::new(bin)
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&self.path)
                .stdout(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A manifests directory, written atomically (temp file renamed into place).
pub struct Manifests {
    pub dir: PathBuf,
}

impl Manifests {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("manifests"));
        std::fs::create_dir_all(&dir)?;
        Ok(Manifests { dir })
    }

    /// Writes `docs` as a multi-document YAML file (JSON documents are YAML).
    pub fn write(&self, name: &str, docs: &[Value]) -> Result<()> {
        let text: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
        self.write_raw(name, &text.join("\n---\n"))
    }

    pub fn write_raw(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }

    /// Writes a kubeconfig naming `server` here, as `kubeconfig`, and returns its
    /// path (for [`AgentOptions::kubeconfig`] or `--kubeconfig`).
    pub fn write_kubeconfig(&self, server: &FakeApiServer) -> Result<PathBuf> {
        self.write_raw("kubeconfig", &server.kubeconfig_yaml())?;
        Ok(self.dir.join("kubeconfig"))
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `rayfence agent`; SIGKILLed on drop (pinned state stays: see [`Bpffs`]).
pub struct Agent {
    child: Option<Child>,
    /// Its log (stdout: every line, flow events included) and stderr (a fatal error).
    pub log: PathBuf,
    /// The operator API socket (`--api-socket`), unique per agent.
    pub socket: PathBuf,
    netns: PathBuf,
    pub started: Instant,
}

pub struct AgentOptions<'a> {
    pub node: &'a Node,
    pub node_name: &'a str,
    pub manifests: &'a Path,
    pub bpffs: &'a Path,
    pub cgroup_root: &'a Path,
    /// Watch this API server (kubeconfig) instead of the manifests directory.
    pub kubeconfig: Option<&'a Path>,
    /// More flags, after the ones above.
    pub extra_args: &'a [&'a str],
}

impl Agent {
    /// Starts the agent on the machine's own cgroup mounts
    /// ([`CgroupMount::Hybrid`]), with `--cgroup-root` [`AgentOptions::cgroup_root`].
    pub fn start(o: &AgentOptions<'_>) -> Result<Agent> {
        Self::start_with(o, CgroupMount::Hybrid)
    }

    /// Starts the agent seeing `mount` at `/sys/fs/cgroup`. Other than on
    /// [`CgroupMount::Hybrid`] it gets no `--cgroup-root` (it finds the cgroup2
    /// mount itself, or finds none), and [`AgentOptions::cgroup_root`] is not used.
    pub fn start_with(o: &AgentOptions<'_>, mount: CgroupMount) -> Result<Agent> {
        let bin = rayfence_bin()?;
        let name = unique("agent");
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let socket = std::env::temp_dir().join(format!("{name}.sock"));
        let file = std::fs::File::create(&log)?;
        let stdout = file.try_clone()?;
        let mut command = o.node.netns.cmd(bin.to_str().context("utf-8 path")?);
        match o.kubeconfig {
            Some(path) => command.arg("agent").arg("--kubeconfig").arg(path),
            None => command.arg("agent").arg("--manifests").arg(o.manifests),
        };
        if mount == CgroupMount::Hybrid {
            command.arg("--cgroup-root").arg(o.cgroup_root);
        }
        crate::cgroup::set_cgroup_mount(&mut command, mount);
        let child = command
            .arg("--node-name")
            .arg(o.node_name)
            .arg("--bpffs")
            .arg(o.bpffs)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{METRICS_PORT}"))
            .arg("--dns-mode")
            .arg("off")
            .arg("--api-socket")
            .arg(&socket)
            .args(o.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .context("spawning rayfence agent")?;
        Ok(Agent {
            child: Some(child),
            log,
            socket,
            netns: o.node.netns.path(),
            started: Instant::now(),
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing every needle; returns the time waited.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> Result<Duration> {
        self.wait_any_log(&[needles], timeout)
    }

    /// Waits for a log line that holds every needle of at least one alternative.
    pub fn wait_any_log(&self, alternatives: &[&[&str]], timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if self.log_text().lines().any(|l| {
                alternatives
                    .iter()
                    .any(|needles| needles.iter().all(|n| l.contains(n)))
            }) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "no log line with {alternatives:?} after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn check_alive(&self) -> Result<()> {
        // A child that exited early: say why.
        if !Path::new(&format!("/proc/{}", self.pid())).exists() {
            bail!("the agent exited; log:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit; its exit code (`None`: killed
    /// by a signal). Fails if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let t0 = Instant::now();
        let child = self
            .child
            .as_mut()
            .context("the agent was already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the agent still runs after {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `GET path` on the agent's metrics address, from inside the node namespace.
    pub fn http_get(&self, node: &Node, path: &str) -> Result<(u16, String)> {
        let reply = self.http_get_with(node, path, &[])?;
        Ok((reply.code, reply.body))
    }

    /// [`Self::http_get`] with extra header lines (`"Accept: ..."`), the whole reply.
    pub fn http_get_with(
        &self,
        node: &Node,
        path: &str,
        headers: &[String],
    ) -> Result<crate::http::Reply> {
        let (path, headers) = (path.to_owned(), headers.to_vec());
        node.netns.run(move || {
            crate::http::get(
                ([127, 0, 0, 1], METRICS_PORT).into(),
                &path,
                &headers,
                Duration::from_secs(2),
            )
        })?
    }

    /// Polls `/readyz` until 200; returns when it flipped and every status seen.
    pub fn wait_ready(&self, node: &Node, timeout: Duration) -> Result<(Duration, Vec<u16>)> {
        let mut seen = Vec::new();
        loop {
            if let Ok((code, _)) = self.http_get(node, "/readyz") {
                if seen.last() != Some(&code) {
                    seen.push(code);
                }
                if code == 200 {
                    return Ok((self.started.elapsed(), seen));
                }
            }
            if self.started.elapsed() > timeout {
                bail!("not ready after {timeout:?}; log:\n{}", self.log_text());
            }
            self.check_alive()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL (no chance to clean anything up), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Runs `rayfence ARGS` against this agent (its socket; inside the node
    /// namespace, so `--agent http://127.0.0.1:...` works too). Returns whether it
    /// succeeded, its stdout and its stderr.
    pub fn command(&self, node: &Node, args: &[&str]) -> Result<(bool, String, String)> {
        let (code, out, err) = self.command_status(node, args)?;
        Ok((code == Some(0), out, err))
    }

    /// [`Agent::command`] with the exit status (`None`: killed by a signal).
    pub fn command_status(
        &self,
        node: &Node,
        args: &[&str],
    ) -> Result<(Option<i32>, String, String)> {
        let bin = rayfence_bin()?;
        let output = node
            .netns
            .cmd(bin.to_str().context("utf-8 path")?)
            .args(args)
            .env("RAYFENCE_API_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running rayfence {args:?}"))?;
        Ok((
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// The flow events the agent logged so far (with `--log-format json`: its lines
    /// of target `rayfence::flows`), as the API's records; `time` is the line's
    /// `timestamp`.
    pub fn logged_flows(&self) -> Vec<rayfence::operator::wire::FlowRecord> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == rayfence::logging::FLOW_TARGET)
            .filter_map(|v| flow_record(&v))
            .collect()
    }
}

/// A flow log line's flat fields back into the API's nested record.
fn flow_record(line: &Value) -> Option<rayfence::operator::wire::FlowRecord> {
    let text = |key: &str| line.get(key).and_then(Value::as_str).map(str::to_owned);
    let end = |prefix: &str| -> Option<rayfence::operator::wire::FlowEnd> {
        Some(rayfence::operator::wire::FlowEnd {
            ip: text(&format!("{prefix}_ip"))?.parse().ok()?,
            port: u16::try_from(line.get(format!("{prefix}_port"))?.as_u64()?).ok()?,
            kind: text(&format!("{prefix}_kind"))?,
            namespace: text(&format!("{prefix}_namespace")),
            name: text(&format!("{prefix}_name")),
            raycluster: text(&format!("{prefix}_raycluster")),
            cidr: text(&format!("{prefix}_cidr")),
        })
    };
    Some(rayfence::operator::wire::FlowRecord {
        time: text("timestamp")?,
        verdict: serde_json::from_value(line.get("verdict")?.clone()).ok()?,
        direction: text("direction")?,
        reason: text("reason")?,
        protocol: text("protocol")?,
        source: end("src")?,
        destination: end("dst")?,
        namespace: text("namespace")?,
        pod: text("pod")?,
        raycluster: text("raycluster"),
        role: text("role"),
        bytes: u32::try_from(line.get("bytes")?.as_u64()?).ok()?,
        suppressed: line.get("suppressed")?.as_u64()?,
    })
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The sum of the samples of a metric whose label set contains every `labels` pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// p-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// An address as a probe target.
pub fn v4(pod: &Pod) -> IpAddr {
    pod.ip4.into()
}

/// The upper bound (`le`) of the first bucket of histogram `name` holding at least
/// `q` (0..=1) of its samples, and the sample count.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> (Option<f64>, f64) {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let bound = buckets
        .iter()
        .find(|(_, c)| *c >= q * total && total > 0.0)
        .map(|b| b.0);
    (bound, total)
}
