//! End to end: the metrics of the real `rayfence agent` in a simulated node
//! (manifests source, pods found as the kubelet lays them out), driven by real
//! packets whose number and size the test knows: exact counter deltas per reason
//! and label, allowed new flows counted once per flow, map fill against what the
//! pinned maps hold, values kept across SIGKILL and SIGTERM restarts, series of gone
//! pods removed, a global `--audit` agent counting would-drops, and the API
//! source's watch restarts.
//!
//! Needs root. Each test has its own topology, bpffs, manifests and kubelet cgroup
//! tree; guards kill the agent and run `rayfence cleanup` on panic too.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rayfence::datapath::Capacities;
use rayfence::datapath::observe::{FILL_MAPS, count_pinned};
use rayfence_common::map_names;
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;
use rayfence_tests::{Node, Outcome, Server};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);
/// Below rf-probe's 250 ms resend: exactly one echo request per ping.
const ONE_PING: Duration = Duration::from_millis(200);
/// An rf-probe IPv4 echo (request or reply) as TC sees it: Ethernet 14 + IPv4 20 +
/// ICMP 8 + payload 16.
const PING_BYTES: f64 = 58.0;
/// Publications are every second; long enough for a few.
const PUBLISHED: Duration = Duration::from_secs(5);

/// The labels of one counter series.
fn series<'a>(
    direction: &'a str,
    reason: &'a str,
    ns: &'a str,
    raycluster: &'a str,
    role: &'a str,
    group: &'a str,
) -> [(&'a str, &'a str); 6] {
    [
        ("direction", direction),
        ("reason", reason),
        ("pod_namespace", ns),
        ("raycluster", raycluster),
        ("role", role),
        ("group", group),
    ]
}

fn scrape(agent: &Agent, node: &Node) -> Result<String> {
    let (code, body) = agent.http_get(node, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body)
}

/// Waits until `name{labels}` is exactly `want`, then checks it stays there over
/// two more publications (so an overshoot, e.g. a double count, is seen).
fn expect_value(
    agent: &Agent,
    node: &Node,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let body = scrape(agent, node)?;
        let got = metric_sum(&body, name, labels);
        if got == want {
            break;
        }
        if t0.elapsed() > PUBLISHED {
            bail!("{name}{labels:?} is {got}, want {want}; /metrics:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(2100));
    let body = scrape(agent, node)?;
    let got = metric_sum(&body, name, labels);
    ensure!(
        got == want,
        "{name}{labels:?} moved on to {got} from {want}; /metrics:\n{body}"
    );
    Ok(())
}

/// Waits until no sample of `name` carries every `labels` pair.
fn expect_absent(agent: &Agent, node: &Node, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let body = scrape(agent, node)?;
        let present = body.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        });
        if !present {
            return Ok(());
        }
        if t0.elapsed() > PUBLISHED {
            bail!("{name}{labels:?} still in /metrics:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the first publication (it sets the map capacities).
fn wait_published(agent: &Agent, node: &Node) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let body = scrape(agent, node)?;
        if body.contains("rayfence_map_capacity{") {
            return Ok(body);
        }
        if t0.elapsed() > PUBLISHED {
            bail!("nothing published after {PUBLISHED:?}:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pings `n` times, once each, all expected to be dropped (or, audit, answered).
fn pings(from: &rayfence_tests::Pod, to: &rayfence_tests::Pod, n: u32, answered: bool) {
    for i in 0..n {
        let outcome = from.ping(v4(to), ONE_PING);
        assert_eq!(
            outcome.is_ok(),
            answered,
            "ping {i} from {} to {}: {outcome:?}",
            from.name,
            to.name
        );
    }
}

fn worker_in(cluster: &str, group: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ray.io/cluster", cluster.to_owned()),
        ("ray.io/node-type", "worker".to_owned()),
        ("ray.io/group", group.to_owned()),
    ]
}

/// One simulated node with its manifests, bpffs and servers.
struct Setup {
    manifests: Manifests,
    bpffs: Bpffs,
    _servers: Vec<Server>,
    node: SimNode,
}

impl Setup {
    /// `pods`: (topology name, labels); every pod serves TCP 8000.
    fn new(pods: &[(&str, Vec<(&str, String)>)], first_uid: u32) -> Result<Self> {
        let names: Vec<&str> = pods.iter().map(|p| p.0).collect();
        let node = SimNode::new(&names, first_uid)?;
        let servers = names
            .iter()
            .map(|n| node.topo.pod(n).serve_tcp(8000))
            .collect::<Result<Vec<_>>>()?;
        let setup = Setup {
            manifests: Manifests::new()?,
            bpffs: Bpffs::new(),
            _servers: servers,
            node,
        };
        setup.write_pods(pods)?;
        Ok(setup)
    }

    fn ns(&self) -> &str {
        &self.node.ns
    }

    fn pod(&self, name: &str) -> &rayfence_tests::Pod {
        self.node.topo.pod(name)
    }

    fn node0(&self) -> &Node {
        self.node.topo.node(0)
    }

    /// Writes `pods.yaml`: namespace, node, and these pods (UIDs by topology order).
    fn write_pods(&self, pods: &[(&str, Vec<(&str, String)>)]) -> Result<()> {
        let ns = self.ns();
        let mut docs = vec![namespace(ns), node_object(NODE, self.node0())];
        for (name, labels) in pods {
            let index = self
                .node
                .topo
                .pods()
                .iter()
                .position(|p| p.name == *name)
                .context("pod in topology")?;
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            docs.push(pod_object(
                ns,
                self.pod(name),
                &self.node.uids[index],
                NODE,
                &labels,
            ));
        }
        self.manifests.write("pods.yaml", &docs)
    }

    fn write_clusters(&self, names: &[&str], policy: &Value) -> Result<()> {
        let docs: Vec<Value> = names
            .iter()
            .map(|n| raycluster(self.ns(), n, policy.clone()))
            .collect();
        self.manifests.write("clusters.yaml", &docs)
    }

    fn start(&self, extra_args: &[&str]) -> Result<Agent> {
        let agent = self
            .node
            .start_agent(NODE, &self.manifests.dir, &self.bpffs, extra_args)?;
        wait_published(&agent, self.node0())?;
        Ok(agent)
    }
}

fn labelled(pairs: Vec<(&'static str, &'static str)>) -> Vec<(&'static str, String)> {
    pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
}

fn head_of(cluster: &'static str) -> Vec<(&'static str, String)> {
    labelled(head_labels(cluster))
}

fn outsider() -> Vec<(&'static str, String)> {
    labelled(vec![("app", "outsider")])
}

#[test]
fn drops_and_allowed_new_flows_are_counted_exactly_per_reason_and_label() -> Result<()> {
    let setup = Setup::new(
        &[
            ("head", head_of("rc")),
            ("worker", worker_in("rc", "small")),
            ("outsider", outsider()),
        ],
        101,
    )?;
    setup.write_clusters(&["rc"], &json!({"mode": "DenyAll"}))?;
    let agent = setup.start(&[])?;
    let (node, ns) = (setup.node0(), setup.ns());
    let (head, worker, out) = (
        setup.pod("head"),
        setup.pod("worker"),
        setup.pod("outsider"),
    );
    let before = scrape(&agent, node)?;
    let drops_in = series("ingress", "no-policy", ns, "rc", "head", "");
    let drops_out = series("egress", "no-policy", ns, "rc", "head", "");
    let head_allowed = series("ingress", "policy-allow", ns, "rc", "head", "");
    let worker_allowed = series("egress", "policy-allow", ns, "rc", "worker", "small");
    let at = |name: &str, labels: &[(&str, &str)]| metric_sum(&before, name, labels);

    // 5 outsider pings into the head: 5 ingress no-policy drops of 58 bytes each.
    pings(out, head, 5, false);
    // 3 connection attempts from the head out: one SYN each (timeout < the 1 s RTO).
    for _ in 0..3 {
        assert_eq!(head.tcp_connect(v4(out), 8000, SHORT), Outcome::Timeout);
    }
    // 4 connections from the worker to the head: 4 new flows on each side, their
    // other packets established (not counted).
    for _ in 0..4 {
        assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    }

    let drops = "rayfence_drops_total";
    expect_value(&agent, node, drops, &drops_in, at(drops, &drops_in) + 5.0)?;
    let bytes = "rayfence_drop_bytes_total";
    expect_value(
        &agent,
        node,
        bytes,
        &drops_in,
        at(bytes, &drops_in) + 5.0 * PING_BYTES,
    )?;
    expect_value(&agent, node, drops, &drops_out, at(drops, &drops_out) + 3.0)?;
    let allowed = "rayfence_allowed_flows_total";
    expect_value(
        &agent,
        node,
        allowed,
        &head_allowed,
        at(allowed, &head_allowed) + 4.0,
    )?;
    expect_value(
        &agent,
        node,
        allowed,
        &worker_allowed,
        at(allowed, &worker_allowed) + 4.0,
    )?;
    // Nothing of this cluster was dropped anywhere else, nothing would-dropped.
    let body = scrape(&agent, node)?;
    let rc_drops = metric_sum(&body, drops, &[("raycluster", "rc")]);
    ensure!(
        rc_drops == at(drops, &[("raycluster", "rc")]) + 8.0,
        "other drops of rc: {body}"
    );
    ensure!(
        metric_sum(&body, "rayfence_would_drops_total", &[]) == 0.0,
        "{body}"
    );
    // Bounded labels: no address or port anywhere in a counter's labels.
    for line in body.lines().filter(|l| l.starts_with("rayfence_")) {
        for ip in [head.ip4.to_string(), out.ip4.to_string()] {
            ensure!(!line.contains(&ip), "an address as a label: {line}");
        }
    }
    Ok(())
}

#[test]
fn map_fill_equals_what_the_pinned_maps_hold_and_capacity_their_size() -> Result<()> {
    let setup = Setup::new(
        &[
            ("head", head_of("rc")),
            ("worker", worker_in("rc", "small")),
            ("outsider", outsider()),
        ],
        111,
    )?;
    setup.write_clusters(&["rc"], &json!({"mode": "DenyAll"}))?;
    let agent = setup.start(&[])?;
    let (node, head, worker) = (setup.node0(), setup.pod("head"), setup.pod("worker"));
    // Some conntrack entries and counter rows.
    for _ in 0..3 {
        assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    }
    pings(setup.pod("outsider"), head, 2, false);

    let caps = Capacities::default();
    let capacity = |map: &str| -> u32 {
        match map {
            map_names::ENDPOINTS_TC | map_names::ENDPOINTS_CGROUP => caps.endpoints,
            map_names::IDENTITIES => caps.identities,
            map_names::CIDRS => caps.cidrs,
            map_names::POLICY => caps.policy,
            map_names::CONNTRACK => caps.conntrack,
            map_names::FRAGMENTS => caps.fragments,
            _ => caps.counters,
        }
    };
    // Conntrack and fragments are counted in the kernel (small maps: at each
    // publication), the rest come from the agent's mirror of what it wrote.
    let t0 = Instant::now();
    let last = loop {
        let body = scrape(&agent, node)?;
        let mut mismatches = Vec::new();
        for (label, map) in FILL_MAPS {
            let entries = metric_sum(&body, "rayfence_map_entries", &[("map", label)]);
            let pinned = count_pinned(&setup.bpffs.path, map)? as f64;
            let cap = metric_sum(&body, "rayfence_map_capacity", &[("map", label)]);
            ensure!(
                cap == f64::from(capacity(map)),
                "capacity of {label}: {cap}\n{body}"
            );
            if entries != pinned {
                mismatches.push(format!("{label}: metric {entries}, pinned {pinned}"));
            }
        }
        if mismatches.is_empty() {
            break body;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            bail!("map fill differs: {mismatches:?}\n{body}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let entries = |label: &str| metric_sum(&last, "rayfence_map_entries", &[("map", label)]);
    // What the test made is there: the Ray pods on TC (one entry per host veth),
    // three flows on each side of the worker-head pair, the counter rows of all
    // that (head: drops and allows in, worker: allows out).
    ensure!(entries("endpoints-tc") >= 2.0, "{last}");
    ensure!(entries("conntrack") >= 6.0, "{last}");
    ensure!(entries("counters") >= 3.0, "{last}");
    ensure!(
        entries("policy") >= 1.0 && entries("identities") >= 6.0,
        "{last}"
    );
    Ok(())
}

/// SIGTERM, then waits for the process to be gone (or a zombie).
fn terminate(agent: &mut Agent) -> Result<()> {
    let pid = agent.pid();
    // SAFETY: signalling our own child by pid.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGTERM) } == 0);
    let t0 = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')) {
            break;
        }
        ensure!(t0.elapsed() < Duration::from_secs(10), "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        agent.log_text().contains("agent stopping"),
        "not a clean stop:\n{}",
        agent.log_text()
    );
    agent.kill(); // reaps
    Ok(())
}

#[test]
fn counters_survive_sigkill_and_sigterm_restarts_never_reset_never_doubled() -> Result<()> {
    let setup = Setup::new(
        &[
            ("head", head_of("rc")),
            ("worker", worker_in("rc", "small")),
            ("outsider", outsider()),
        ],
        121,
    )?;
    setup.write_clusters(&["rc"], &json!({"mode": "DenyAll"}))?;
    let (node, ns) = (setup.node0(), setup.ns());
    let (head, worker, out) = (
        setup.pod("head"),
        setup.pod("worker"),
        setup.pod("outsider"),
    );
    let drops_in = series("ingress", "no-policy", ns, "rc", "head", "");
    let worker_allowed = series("egress", "policy-allow", ns, "rc", "worker", "small");
    let (drops, bytes, allowed) = (
        "rayfence_drops_total",
        "rayfence_drop_bytes_total",
        "rayfence_allowed_flows_total",
    );

    let mut first = setup.start(&[])?;
    pings(out, head, 4, false);
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    expect_value(&first, node, drops, &drops_in, 4.0)?;
    expect_value(&first, node, allowed, &worker_allowed, 1.0)?;

    // SIGKILL; traffic while no agent runs is still dropped and counted (pinned).
    first.kill();
    pings(out, head, 3, false);
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    let mut second = setup.start(&[])?;
    expect_value(&second, node, drops, &drops_in, 7.0)?;
    expect_value(&second, node, bytes, &drops_in, 7.0 * PING_BYTES)?;
    expect_value(&second, node, allowed, &worker_allowed, 2.0)?;
    // And it keeps counting from there.
    pings(out, head, 2, false);
    expect_value(&second, node, drops, &drops_in, 9.0)?;

    // SIGTERM (a clean stop), traffic in between, a third agent.
    terminate(&mut second)?;
    pings(out, head, 1, false);
    let third = setup.start(&[])?;
    expect_value(&third, node, drops, &drops_in, 10.0)?;
    expect_value(&third, node, bytes, &drops_in, 10.0 * PING_BYTES)?;
    expect_value(&third, node, allowed, &worker_allowed, 2.0)?;
    Ok(())
}

#[test]
fn series_of_a_deleted_pod_and_raycluster_or_a_renamed_group_disappear() -> Result<()> {
    let mut pods = vec![
        ("head", head_of("alpha")),
        ("worker", worker_in("alpha", "small")),
        ("other", head_of("beta")),
        ("outsider", outsider()),
    ];
    let setup = Setup::new(&pods, 131)?;
    setup.write_clusters(&["alpha", "beta"], &json!({"mode": "DenyAllIngress"}))?;
    let agent = setup.start(&[])?;
    let (node, ns) = (setup.node0(), setup.ns());
    let out = setup.pod("outsider");
    pings(out, setup.pod("head"), 2, false);
    pings(out, setup.pod("worker"), 1, false);
    pings(out, setup.pod("other"), 1, false);
    let drops = "rayfence_drops_total";
    let alpha_head = series("ingress", "no-policy", ns, "alpha", "head", "");
    let small = series("ingress", "no-policy", ns, "alpha", "worker", "small");
    let beta = series("ingress", "no-policy", ns, "beta", "head", "");
    expect_value(&agent, node, drops, &alpha_head, 2.0)?;
    expect_value(&agent, node, drops, &small, 1.0)?;
    expect_value(&agent, node, drops, &beta, 1.0)?;

    // RayCluster beta deleted with its pod (as KubeRay's owner references do).
    pods.retain(|p| p.0 != "other");
    setup.write_pods(&pods)?;
    setup.write_clusters(&["alpha"], &json!({"mode": "DenyAllIngress"}))?;
    for family in [drops, "rayfence_drop_bytes_total"] {
        expect_absent(&agent, node, family, &[("raycluster", "beta")])?;
    }
    // The others keep their values.
    expect_value(&agent, node, drops, &alpha_head, 2.0)?;

    // The worker's group renamed: the old group's series go; new drops count under
    // the new name, from zero (the row's earlier packets are not counted again).
    pods.retain(|p| p.0 != "worker");
    pods.push(("worker", worker_in("alpha", "large")));
    setup.write_pods(&pods)?;
    expect_absent(&agent, node, drops, &[("group", "small")])?;
    pings(out, setup.pod("worker"), 2, false);
    let large = series("ingress", "no-policy", ns, "alpha", "worker", "large");
    expect_value(&agent, node, drops, &large, 2.0)?;

    // The worker deleted: its counter rows and its series go.
    pods.retain(|p| p.0 != "worker");
    setup.write_pods(&pods)?;
    expect_absent(&agent, node, drops, &[("role", "worker")])?;
    expect_value(&agent, node, drops, &alpha_head, 2.0)?;
    Ok(())
}

#[test]
fn a_global_audit_agent_counts_would_drops_and_drops_nothing() -> Result<()> {
    let setup = Setup::new(
        &[
            ("head", head_of("rc")),
            ("worker", worker_in("rc", "small")),
            ("outsider", outsider()),
        ],
        141,
    )?;
    setup.write_clusters(&["rc"], &json!({"mode": "DenyAll"}))?;
    let agent = setup.start(&["--audit"])?;
    let (node, ns) = (setup.node0(), setup.ns());
    let (head, out) = (setup.pod("head"), setup.pod("outsider"));
    // Answered: the request passes in and is counted once, as a flow; the reply
    // rides the flow's (audited) conntrack entry and is not counted.
    pings(out, head, 3, true);
    let would_in = series("ingress", "no-policy", ns, "rc", "head", "");
    let would_out = series("egress", "no-policy", ns, "rc", "head", "");
    let (would, would_bytes) = (
        "rayfence_would_drops_total",
        "rayfence_would_drop_bytes_total",
    );
    expect_value(&agent, node, would, &would_in, 3.0)?;
    expect_value(&agent, node, would_bytes, &would_in, 3.0 * PING_BYTES)?;
    expect_value(&agent, node, would, &would_out, 0.0)?;
    // TCP from the outsider connects too: one more flow, counted once.
    assert_eq!(out.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    expect_value(&agent, node, would, &[("raycluster", "rc")], 4.0)?;
    let body = scrape(&agent, node)?;
    ensure!(
        !body.contains("rayfence_drops_total{"),
        "an audit agent dropped: {body}"
    );
    Ok(())
}

#[test]
fn api_watch_restarts_are_counted_by_kind_and_the_source_stays_connected() -> Result<()> {
    let node = SimNode::new(&["head"], 151)?;
    let (topo, ns) = (&node.topo, node.ns.as_str());
    let (_rt, server) = fake_api_in(topo.node(0))?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&namespace(ns));
    server.apply(&node_object(NODE, topo.node(0)));
    let head = topo.pod("head");
    server.apply(&pod_object(
        ns,
        head,
        &node.uids[0],
        NODE,
        &head_labels("rc"),
    ));
    server.apply(&raycluster(ns, "rc", json!({"mode": "DenyAll"})));
    let manifests = Manifests::new()?;
    let kubeconfig = manifests.write_kubeconfig(&server)?;
    let bpffs = Bpffs::new();
    let agent = node.start_agent_on_api(NODE, &kubeconfig, &bpffs, &[])?;
    let restarts = "rayfence_watch_restarts_total";
    let body = scrape(&agent, topo.node(0))?;
    ensure!(
        metric_sum(&body, restarts, &[]) == 0.0,
        "restarts before any: {body}"
    );

    // The history compacted and the watches closed: each watch resumes into a
    // 410 Gone and relists, one restart per kind.
    server.compact_history();
    server.close_watches();
    let kinds = [
        "RayCluster",
        "Pod",
        "Namespace",
        "Service",
        "EndpointSlice",
        "Node",
    ];
    let t0 = Instant::now();
    let body = loop {
        let body = scrape(&agent, topo.node(0))?;
        if kinds
            .iter()
            .all(|k| metric_sum(&body, restarts, &[("kind", k)]) >= 1.0)
        {
            break body;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "no restart of every kind: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Routine: the source's status stays connected.
    ensure!(
        metric_sum(&body, "rayfence_source_status", &[("status", "connected")]) == 1.0,
        "{body}"
    );
    drop(agent);
    drop(server);
    Ok(())
}

/// The labels a PodMonitor's scrape sets on every series: the agent's own must not
/// collide with them (else Prometheus renames ours `exported_*`).
const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "container",
    "endpoint",
    "job",
    "instance",
    "node",
];

#[test]
fn the_scrape_passes_promtool_and_has_every_series_the_alerts_and_the_dashboard_query() -> Result<()>
{
    use rayfence_tests::deploy::monitoring::*;

    let setup = Setup::new(&[("head", head_of("rc")), ("outsider", outsider())], 131)?;
    setup.write_clusters(&["rc"], &json!({"mode": "DenyAll"}))?;
    let agent = setup.start(&[])?;
    let (node, ns) = (setup.node0(), setup.ns());
    agent.wait_ready(node, Duration::from_secs(20))?;
    // A drop, so the drop families have a series with all their labels.
    pings(setup.pod("outsider"), setup.pod("head"), 2, false);
    let drops = series("ingress", "no-policy", ns, "rc", "head", "");
    expect_value(&agent, node, "rayfence_drops_total", &drops, 2.0)?;

    // A scraper that names no format (curl, promtool) gets the text format, which
    // Prometheus's own checker accepts without a single complaint.
    let text = agent.http_get_with(node, "/metrics", &[])?;
    ensure!(text.code == 200, "{}", text.head);
    ensure!(
        text.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        text.head
    );
    let lint = run_promtool(&["check", "metrics"], &text.body)?;
    ensure!(
        lint.trim().is_empty(),
        "promtool check metrics:\n{lint}\n{}",
        text.body
    );
    // Prometheus asks for OpenMetrics and gets it.
    let open = agent.http_get_with(
        node,
        "/metrics",
        &[
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
                .into(),
        ],
    )?;
    ensure!(
        open.head
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{}",
        open.head
    );
    ensure!(open.body.ends_with("# EOF\n"), "{}", open.body);

    // What runs, and that it is ready.
    ensure!(
        metric_sum(&text.body, "rayfence_ready", &[]) == 1.0,
        "{}",
        text.body
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    ensure!(
        metric_sum(
            &text.body,
            "rayfence_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", kernel.trim()),
                ("hook_modes", "tcx,cgroup_skb"),
            ],
        ) == 1.0,
        "{}",
        text.body
    );
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        ensure!(
            text.body
                .lines()
                .any(|l| l.starts_with(&format!("{process} "))),
            "{process} missing:\n{}",
            text.body
        );
    }

    // No series carries a label the scrape sets itself.
    let labels = sample_label_names(&text.body);
    for target in TARGET_LABELS {
        ensure!(
            !labels.contains(target),
            "a series is labelled {target}: {labels:?}"
        );
    }

    // The shipped rules pass promtool, and they and the dashboard query only series
    // this agent exports.
    let exported = exported_names(&text.body);
    let rule = prometheus_rule()?;
    let spec = serde_norway::to_string(&rule["spec"])?;
    // Not in the manifests directory: the agent reads every file there.
    let rules_file = std::env::temp_dir().join(format!("rf-rules-{}.yaml", std::process::id()));
    std::fs::write(&rules_file, spec)?;
    let checked = run_promtool(
        &["check", "rules", rules_file.to_str().context("rules path")?],
        "",
    );
    let _ = std::fs::remove_file(&rules_file);
    let checked = checked?;
    ensure!(checked.contains("SUCCESS"), "{checked}");
    let queries: Vec<(String, String)> = rule_exprs(&rule)
        .into_iter()
        .map(|e| ("PrometheusRule".to_owned(), e))
        .chain(
            dashboard_exprs(&dashboard()?)
                .into_iter()
                .map(|e| ("dashboard".to_owned(), e)),
        )
        .collect();
    ensure!(queries.len() > 20, "too few queries read: {queries:?}");
    // A family with no series yet (nothing held, no sync error, no audit) is not in
    // the scrape; its name must then be one the agent registers, a string in its
    // binary: a misspelt query is in neither.
    let binary = std::fs::read(rayfence_tests::deploy::rayfence_bin()?)?;
    let registered = |name: &str| {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        binary
            .windows(family.len())
            .any(|window| window == family.as_bytes())
    };
    let missing: Vec<String> = queries
        .iter()
        .flat_map(|(source, expr)| {
            queried_names(expr)
                .into_iter()
                .filter(|name| !exported.contains(name) && !registered(name))
                .map(move |name| format!("{source}: {name} in {expr}"))
        })
        .collect();
    ensure!(
        missing.is_empty(),
        "queried, not exported:\n{}",
        missing.join("\n")
    );
    Ok(())
}
