//! `cargo xtask bench scale`: the real `rayfence` binary (release) on a simulated
//! node, fed generated objects through a manifests directory and through the fake
//! API server, measured from outside the way an operator would see it:
//!
//! - **large**: one RayCluster whose head admits N ingress rules (rule 0 admits the
//!   `client` pod, the others are half ipBlock /24s, half namespace+pod selectors of
//!   remote workers). Start -> ready; edit -> enforced, revoking and granting rule 0,
//!   seen by a prober opening new connections and by a held connection; RSS.
//! - **idle**: P pods in R RayClusters (two of them local) and nothing changing:
//!   start -> ready, RSS (current and peak), CPU to get ready and while idle.
//!
//! One row per (scenario, N, figure) with the range over the runs. Needs root (the
//! simulated node is network namespaces, the agent loads eBPF). Arguments after
//! `--`: `--only large|idle`, `--source manifests|kubernetes` (default both), `--runs K`
//! (default 3), `--sizes a,b,c` (large: rule
//! counts; idle: pod counts, in as many RayClusters as `IDLE_SHAPES` gives them, else
//! one per 10 pods).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rayfence_tests::Prober;
use rayfence_tests::agent::{
    Agent, AgentOptions, Bpffs, Manifests, SimNode, fake_api_in, metric_sum, v4,
};
use rayfence_tests::fake_api::FakeApiServer;
use rayfence_tests::objects::json::{
    head_labels, labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const PORT: u16 = 8080;
/// New-connection probes give up after this: a dropped SYN is seen this late.
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);
/// Remote namespaces the large RayCluster's selector rules pick from.
const REMOTE_NAMESPACES: usize = 100;
/// (pods, RayClusters) of the idle scenario.
const IDLE_SHAPES: [(usize, usize); 2] = [(10_000, 1_000), (150_000, 10_000)];
const LARGE_RULES: [usize; 3] = [1_000, 5_000, 10_000];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Manifests,
    Kubernetes,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Manifests => "manifests",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// Figures of one scenario, several runs each: (scenario, N, figure) -> samples.
#[derive(Default)]
struct Rows(BTreeMap<(String, usize, String), Vec<f64>>);

impl Rows {
    fn add(&mut self, scenario: &str, n: usize, figure: &str, value: f64) {
        println!("    {scenario} N={n} {figure}: {value:.1}");
        self.0
            .entry((scenario.to_owned(), n, figure.to_owned()))
            .or_default()
            .push(value);
    }

    fn print(&self) {
        println!("\n| scenario | N | figure | min | max | runs |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for ((scenario, n, figure), samples) in &self.0 {
            let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
            let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!(
                "| {scenario} | {n} | {figure} | {} | {} | {} |",
                shown(min),
                shown(max),
                samples.len()
            );
        }
    }
}

fn shown(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

struct Options {
    only: Option<String>,
    runs: usize,
    sizes: Option<Vec<usize>>,
    sources: Vec<Source>,
}

fn options() -> Result<Options> {
    let mut o = Options {
        only: None,
        runs: 3,
        sizes: None,
        sources: vec![Source::Manifests, Source::Kubernetes],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => o.only = Some(args.next().context("--only needs large or idle")?),
            "--runs" => o.runs = args.next().context("--runs needs a number")?.parse()?,
            "--sizes" => {
                let list = args.next().context("--sizes needs a list")?;
                o.sizes = Some(
                    list.split(',')
                        .map(|s| s.trim().parse())
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("--sizes {list}"))?,
                );
            }
            "--source" => {
                o.sources = match args.next().as_deref() {
                    Some("manifests") => vec![Source::Manifests],
                    Some("kubernetes") => vec![Source::Kubernetes],
                    other => bail!("--source needs manifests or kubernetes, not {other:?}"),
                }
            }
            // cargo bench passes --bench; nothing else is ours.
            "--bench" => {}
            other => bail!(
                "unknown argument {other} (--only large|idle, --runs K, --sizes a,b, --source S)"
            ),
        }
    }
    Ok(o)
}

fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the scale benchmark needs root (network namespaces, eBPF)");
    }
    let o = options()?;
    let mut rows = Rows::default();
    if o.only.as_deref() != Some("idle") {
        let sizes = o.sizes.clone().unwrap_or(LARGE_RULES.to_vec());
        for &source in &o.sources {
            for &n in &sizes {
                println!("large: {} N={n}", source.name());
                large(&mut rows, source, n, o.runs)?;
            }
        }
    }
    if o.only.as_deref() != Some("large") {
        let shapes: Vec<(usize, usize)> = match &o.sizes {
            Some(pods) if o.only.is_some() => pods
                .iter()
                .map(|&p| {
                    let known = IDLE_SHAPES.iter().find(|(pods, _)| *pods == p);
                    known.copied().unwrap_or((p, p / 10))
                })
                .collect(),
            _ => IDLE_SHAPES.to_vec(),
        };
        for &source in &o.sources {
            for &(pods, clusters) in &shapes {
                println!(
                    "idle: {} {pods} pods / {clusters} RayClusters",
                    source.name()
                );
                for _ in 0..o.runs.min(2) {
                    idle(&mut rows, source, pods, clusters)?;
                }
            }
        }
    }
    rows.print();
    Ok(())
}

/// Where the generated objects go: a manifests directory or the fake API server.
enum Feed {
    Manifests(Manifests),
    Kubernetes {
        _rt: tokio::runtime::Runtime,
        server: FakeApiServer,
        dir: Manifests,
    },
}

impl Feed {
    fn new(source: Source, node: &SimNode) -> Result<Self> {
        Ok(match source {
            Source::Manifests => Feed::Manifests(Manifests::new()?),
            Source::Kubernetes => {
                let (rt, server) = fake_api_in(node.topo.node(0))?;
                server.install_crd("ray.io", "v1", "rayclusters");
                let dir = Manifests::new()?;
                dir.write_kubeconfig(&server)?;
                Feed::Kubernetes {
                    _rt: rt,
                    server,
                    dir,
                }
            }
        })
    }

    /// Puts `docs` in place as the file `name` (manifests) or as objects (API).
    fn put(&self, name: &str, docs: &[Value]) -> Result<()> {
        match self {
            Feed::Manifests(m) => m.write(name, docs),
            Feed::Kubernetes { server, .. } => {
                for doc in docs {
                    server
                        .try_apply(doc)
                        .map_err(|e| anyhow::anyhow!("fake API: {e:?}"))?;
                }
                Ok(())
            }
        }
    }

    fn start_agent(&self, node: &SimNode, bpffs: &Bpffs) -> Result<Agent> {
        let (manifests, kubeconfig) = match self {
            Feed::Manifests(m) => (m.dir.clone(), None),
            Feed::Kubernetes { dir, .. } => (dir.dir.clone(), Some(dir.dir.join("kubeconfig"))),
        };
        Agent::start(&AgentOptions {
            node: node.topo.node(0),
            node_name: NODE,
            manifests: &manifests,
            bpffs: &bpffs.path,
            cgroup_root: node.kubelet.root.path(),
            kubeconfig: kubeconfig.as_deref(),
            // Every pod address of the cluster is an identity-map entry: 150,000 pods
            // do not fit the default 65,536.
            extra_args: &[
                "--max-policy",
                "262144",
                "--max-cidrs",
                "65536",
                "--max-identities",
                "262144",
            ],
        })
    }
}

fn remote_ns(i: usize) -> String {
    format!("team-{i:03}")
}

/// A running pod on another node (no sandbox here): only its labels and IP matter.
fn remote_pod(ns: &str, name: &str, ip: [u8; 4], pod_labels: &[(&str, &str)]) -> Value {
    let ip = std::net::Ipv4Addr::from(ip).to_string();
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
                        "labels": labels(pod_labels)},
           "spec": {"nodeName": "node-elsewhere", "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// The head's ingress rules: rule 0 admits the `client` pod of the head's namespace;
/// then even rules an ipBlock /24 (172.16.0.0/12, far from the lab's ranges), odd
/// ones the `cpu` workers of one remote namespace.
fn large_policy(rules: usize, with_client: bool) -> Value {
    let port = json!([{"port": PORT}]);
    let mut ingress = Vec::with_capacity(rules);
    if with_client {
        ingress.push(
            json!({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                            "ports": port}),
        );
    }
    for r in 1..rules {
        ingress.push(if r % 2 == 0 {
            json!({"from": [{"ipBlock": {"cidr": format!("172.{}.{}.0/24", 16 + r / 256, r % 256)}}],
                   "ports": port})
        } else {
            json!({"from": [{"namespaceSelector": {"matchLabels":
                                {"kubernetes.io/metadata.name": remote_ns(r % REMOTE_NAMESPACES)}},
                             "podSelector": {"matchLabels": {"ray.io/group": "cpu"}}}],
                   "ports": port})
        });
    }
    json!({"mode": "DenyAll", "head": {"ingressRules": ingress}})
}

/// Remote namespaces with 5 `cpu` workers each (what the selector rules select).
fn remote_objects() -> Vec<Value> {
    let mut docs = Vec::new();
    for i in 0..REMOTE_NAMESPACES {
        let ns = remote_ns(i);
        docs.push(namespace(&ns));
        for w in 0..5u8 {
            docs.push(remote_pod(
                &ns,
                &format!("cpu-{w}"),
                [10, 100, i as u8, w + 1],
                &[("ray.io/cluster", "other"), ("ray.io/group", "cpu")],
            ));
        }
    }
    docs
}

/// One new connection from `prober` to `to`: true when it was accepted.
fn opens(prober: &Prober, to: IpAddr) -> bool {
    prober.tcp_connect(to, PORT, PROBE_TIMEOUT).is_ok()
}

/// Probes until `opens` gives `want`; the time from `since` to the start of the
/// first probe that saw it (a bound: enforcement was in place by then).
fn until_new_connection(
    prober: &Prober,
    to: IpAddr,
    want: bool,
    since: Instant,
) -> Result<Duration> {
    loop {
        let at = since.elapsed();
        if opens(prober, to) == want {
            return Ok(at);
        }
        if since.elapsed() > Duration::from_secs(60) {
            bail!(
                "a new connection still {} after 60 s",
                if want { "denied" } else { "accepted" }
            );
        }
    }
}

fn large(rows: &mut Rows, source: Source, rules: usize, runs: usize) -> Result<()> {
    let node = SimNode::new(&["head", "client", "outsider"], 1)?;
    let ns = node.ns.clone();
    let feed = Feed::new(source, &node)?;
    let mut base = vec![namespace(&ns), node_object(NODE, node.topo.node(0))];
    base.push(pod_object(
        &ns,
        node.topo.pod("head"),
        &node.uids[0],
        NODE,
        &head_labels("big"),
    ));
    base.push(pod_object(
        &ns,
        node.topo.pod("client"),
        &node.uids[1],
        NODE,
        &[("app", "client")],
    ));
    base.push(pod_object(
        &ns,
        node.topo.pod("outsider"),
        &node.uids[2],
        NODE,
        &[("app", "outsider")],
    ));
    base.extend(remote_objects());
    feed.put("objects.yaml", &base)?;
    let granted = raycluster(&ns, "big", large_policy(rules, true));
    let revoked = raycluster(&ns, "big", large_policy(rules, false));
    feed.put("big.yaml", std::slice::from_ref(&granted))?;

    let head = v4(node.topo.pod("head"));
    let _server = node.topo.pod("head").prober().serve_tcp(PORT)?;
    let client = node.topo.pod("client").prober();
    let outsider = node.topo.pod("outsider").prober();
    for _ in 0..runs {
        let bpffs = Bpffs::new();
        let mut agent = feed.start_agent(&node, &bpffs)?;
        let (ready, _) = agent.wait_ready(node.topo.node(0), Duration::from_secs(120))?;
        rows.add(
            "large",
            rules,
            &format!("{} start -> ready (ms)", source.name()),
            ms(ready),
        );
        until_new_connection(&client, head, true, Instant::now())?;
        if opens(&outsider, head) {
            bail!("the outsider reached the head: the policy is not enforced");
        }
        rows.add(
            "large",
            rules,
            &format!("{} RSS after ready (MiB)", source.name()),
            rss_mib(agent.pid())?.0,
        );

        let mut held = client.tcp_hold(head, PORT, Duration::from_millis(50))?;
        if !held.roundtrip() {
            bail!("the held connection failed before the edit");
        }
        // Revoke: rule 0 removed; new connections and the held one must stop.
        let before = programmed(&agent, &node)?;
        let t0 = Instant::now();
        feed.put("big.yaml", std::slice::from_ref(&revoked))?;
        let revoke_new = until_new_connection(&client, head, false, t0)?;
        let revoke_held = loop {
            let at = t0.elapsed();
            if !held.roundtrip() {
                break at;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the held connection still passes 60 s after the revoke");
            }
        };
        rows.add(
            "large",
            rules,
            &format!("{} revoke -> new connection denied (ms)", source.name()),
            ms(revoke_new),
        );
        rows.add(
            "large",
            rules,
            &format!("{} revoke -> held connection cut (ms)", source.name()),
            ms(revoke_held),
        );
        drop(held);
        let after = programmed(&agent, &node)?;
        // Grant: rule 0 back.
        let t0 = Instant::now();
        feed.put("big.yaml", std::slice::from_ref(&granted))?;
        let grant_new = until_new_connection(&client, head, true, t0)?;
        let after_grant = programmed(&agent, &node)?;
        for ((count0, sum0), (count1, sum1), what) in
            [(before, after, "revoke"), (after, after_grant, "grant")]
        {
            if count1 > count0 {
                rows.add(
                    "large",
                    rules,
                    &format!("{} {what}: agent's own programming (ms)", source.name()),
                    (sum1 - sum0) / (count1 - count0) * 1e3,
                );
            }
        }
        rows.add(
            "large",
            rules,
            &format!("{} grant -> new connection accepted (ms)", source.name()),
            ms(grant_new),
        );
        rows.add(
            "large",
            rules,
            &format!("{} RSS peak (MiB)", source.name()),
            rss_mib(agent.pid())?.1,
        );
        keep_log(&agent, &format!("large-{}-{rules}", source.name()));
        agent.kill();
    }
    Ok(())
}

/// With `$RAYFENCE_SCALE_LOGS` set, the agent's log is kept there (its lines carry
/// timestamps: where the time of a start or an edit went).
fn keep_log(agent: &Agent, label: &str) {
    if let Some(dir) = std::env::var_os("RAYFENCE_SCALE_LOGS") {
        let to = std::path::Path::new(&dir).join(format!("{label}.log"));
        if let Err(e) = std::fs::copy(&agent.log, &to) {
            eprintln!("keeping {}: {e}", to.display());
        }
    }
}

/// The agent's own programming so far: (count, seconds) of
/// `rayfence_programming_latency_seconds`, from a change reaching the runtime to the
/// maps written (what the agent adds to an edit, its sources' reading aside).
fn programmed(agent: &Agent, node: &SimNode) -> Result<(f64, f64)> {
    let (_, text) = agent.http_get(node.topo.node(0), "/metrics")?;
    let name = "rayfence_programming_latency_seconds";
    Ok((
        metric_sum(&text, &format!("{name}_count"), &[]),
        metric_sum(&text, &format!("{name}_sum"), &[]),
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (current, peak) resident set of `pid`, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// User + system CPU seconds `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in its parentheses.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// `pods` pods in `clusters` RayClusters of 100 namespaces, spread over other
/// nodes, plus a local head and worker of the first RayCluster.
fn idle_objects(node: &SimNode, pods: usize, clusters: usize) -> Vec<Vec<Value>> {
    let per_cluster = pods / clusters;
    let namespaces = 100.min(clusters);
    let mut files: Vec<Vec<Value>> = vec![Vec::new(); namespaces];
    for (i, file) in files.iter_mut().enumerate() {
        file.push(namespace(&remote_ns(i)));
    }
    for c in 0..clusters {
        let ns_index = c % namespaces;
        let ns = remote_ns(ns_index);
        let name = format!("rc-{c:05}");
        let policy = json!({"mode": "DenyAll",
            "head": {"ingressRules": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "gateway"}}}],
                 "ports": [{"port": 8265}]},
                {"from": [{"ipBlock": {"cidr": format!("172.{}.{}.0/24", 16 + c / 256, c % 256)}}],
                 "ports": [{"port": 10001}]}]},
            "workers": {"egressRules": [
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                 "ports": [{"port": 443}]}]}});
        files[ns_index].push(raycluster(&ns, &name, policy));
        for p in 0..per_cluster {
            let global = c * per_cluster + p;
            let ip = [
                10,
                100 + (global >> 16) as u8,
                (global >> 8) as u8,
                global as u8,
            ];
            let role = if p == 0 { "head" } else { "worker" };
            let group = if p == 0 { "headgroup" } else { "cpu" };
            files[ns_index].push(remote_pod(
                &ns,
                &format!("{name}-{role}-{p}"),
                ip,
                &[
                    ("ray.io/cluster", &name),
                    ("ray.io/node-type", role),
                    ("ray.io/group", group),
                ],
            ));
        }
    }
    // The two local pods: a head and a worker of `local` in the node's namespace.
    let ns = &node.ns;
    files.push(vec![
        namespace(ns),
        node_object(NODE, node.topo.node(0)),
        raycluster(ns, "local", json!({"mode": "DenyAll"})),
        pod_object(
            ns,
            node.topo.pod("head"),
            &node.uids[0],
            NODE,
            &head_labels("local"),
        ),
        pod_object(
            ns,
            node.topo.pod("worker"),
            &node.uids[1],
            NODE,
            &worker_labels("local"),
        ),
    ]);
    files
}

fn idle(rows: &mut Rows, source: Source, pods: usize, clusters: usize) -> Result<()> {
    let node = SimNode::new(&["head", "worker", "outsider"], 1)?;
    let feed = Feed::new(source, &node)?;
    for (i, docs) in idle_objects(&node, pods, clusters).iter().enumerate() {
        feed.put(&format!("objects-{i:03}.yaml"), docs)?;
    }
    let bpffs = Bpffs::new();
    let mut agent = feed.start_agent(&node, &bpffs)?;
    let (ready, _) = agent.wait_ready(node.topo.node(0), Duration::from_secs(300))?;
    let pid = agent.pid();
    let shape = format!("{} {clusters} RayClusters", source.name());
    rows.add(
        "idle",
        pods,
        &format!("{shape}: start -> ready (ms)"),
        ms(ready),
    );
    rows.add(
        "idle",
        pods,
        &format!("{shape}: CPU to ready (s)"),
        cpu_seconds(pid)?,
    );
    // The local head is isolated (DenyAll): the outsider must not reach it.
    let _server = node.topo.pod("head").prober().serve_tcp(PORT)?;
    until_new_connection(
        &node.topo.pod("outsider").prober(),
        v4(node.topo.pod("head")),
        false,
        Instant::now(),
    )?;
    let before = cpu_seconds(pid)?;
    let window = Duration::from_secs(10);
    std::thread::sleep(window);
    let idle_cpu = (cpu_seconds(pid)? - before) / window.as_secs_f64() * 100.0;
    let (rss, peak) = rss_mib(pid)?;
    rows.add("idle", pods, &format!("{shape}: RSS (MiB)"), rss);
    rows.add("idle", pods, &format!("{shape}: RSS peak (MiB)"), peak);
    rows.add(
        "idle",
        pods,
        &format!("{shape}: idle CPU (% of a core)"),
        idle_cpu,
    );
    if let Feed::Kubernetes { server, .. } = &feed {
        // What this agent cost the API server: its requests, and the size of what
        // a Pod list (or one pod's watch event) carries for objects of this shape.
        let requests = server.requests();
        let lists = requests
            .iter()
            .filter(|r| !r.is_watch() && r.method == "GET")
            .count();
        let watches = requests.iter().filter(|r| r.is_watch()).count();
        let pod_list = serde_json::to_vec(&server.objects("v1", "Pod"))?.len();
        let api = |figure: &str| format!("{shape}: API {figure}");
        rows.add(
            "idle",
            pods,
            &api("GET requests (lists, probes) to ready"),
            lists as f64,
        );
        rows.add("idle", pods, &api("watches"), watches as f64);
        rows.add(
            "idle",
            pods,
            &api("Pod list (MiB)"),
            pod_list as f64 / 1048576.0,
        );
        rows.add(
            "idle",
            pods,
            &api("bytes per pod"),
            pod_list as f64 / pods as f64,
        );
    }
    keep_log(&agent, &format!("idle-{}-{pods}", source.name()));
    agent.kill();
    Ok(())
}
