//! End to end: the real `rayfence agent` in a simulated node (flannel-like bridge),
//! fed by a manifests directory, enforcing a RayCluster on fixture pods found the
//! way the kubelet lays them out (pod cgroup with a sandbox process).
//!
//! Needs root (network namespaces, bpffs, cgroups). Each test has its own topology,
//! bpffs directory, manifests directory and kubelet cgroup tree, so they run in
//! parallel; guards kill the agent and run `rayfence cleanup` on panic too.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rayfence_tests::agent::*;
use rayfence_tests::background::Background;
use rayfence_tests::objects::json::*;
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::probe_bin;
use rayfence_tests::{Layout, Outcome, Prober, Topology};
use serde_json::json;

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);

/// Probes `addr:port` over TCP in a loop until stopped; counts successes.
fn continuous(prober: Prober, addr: IpAddr, port: u16) -> Background<(u32, Vec<Duration>)> {
    let t0 = Instant::now();
    Background::start(move |flag| {
        let (mut attempts, mut successes) = (0u32, Vec::new());
        while !flag.load(Ordering::Relaxed) {
            attempts += 1;
            if prober.tcp_connect(addr, port, Duration::from_millis(50)) == Outcome::Ok {
                successes.push(t0.elapsed());
            }
        }
        (attempts, successes)
    })
}

/// (topology pod name, UID, labels)
type PodSpec<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// The base objects: namespace, node, and the given pods.
fn base(ns: &str, topo: &Topology, pods: &[PodSpec<'_>]) -> Vec<serde_json::Value> {
    let mut docs = vec![namespace(ns), node_object(NODE, topo.node(0))];
    for (name, uid, labels) in pods {
        docs.push(pod_object(ns, topo.pod(name), uid, NODE, labels));
    }
    docs
}

#[test]
fn agent_enforces_a_raycluster_live_and_counts_drops() -> Result<()> {
    let node = SimNode::new(&["head", "worker", "outsider", "plain"], 1)?;
    let (topo, kubelet, ns, uids) = (&node.topo, &node.kubelet, &node.ns, &node.uids);
    let (head, worker, outsider, plain) = (
        topo.pod("head"),
        topo.pod("worker"),
        topo.pod("outsider"),
        topo.pod("plain"),
    );
    let _head_tcp = head.serve_tcp(8000)?;
    let _head_udp = head.serve_udp(8001)?;
    let _worker_tcp = worker.serve_tcp(8000)?;
    let _plain_tcp = plain.serve_tcp(8000)?;
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Ok,
        "open before the agent"
    );

    let manifests = Manifests::new()?;
    manifests.write(
        "base.yaml",
        &base(
            ns,
            topo,
            &[
                ("head", &uids[0], head_labels("rc")),
                ("worker", &uids[1], worker_labels("rc")),
                ("outsider", &uids[2], vec![("app", "outsider")]),
                ("plain", &uids[3], vec![("app", "plain")]),
            ],
        ),
    )?;
    let deny_all = json!({"mode": "DenyAll"});
    manifests.write("rc.yaml", &[raycluster(ns, "rc", deny_all.clone())])?;

    let bpffs = Bpffs::new();
    let agent = Agent::start(&AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &manifests.dir,
        bpffs: &bpffs.path,
        cgroup_root: kubelet.root.path(),
        kubeconfig: None,
        extra_args: &[],
    })?;
    let (ready_after, statuses) = agent.wait_ready(topo.node(0), Duration::from_secs(20))?;
    // Ready means programmed: the log says so before /readyz does, and the head
    // is already enforced at that moment.
    let log = agent.log_text();
    ensure!(
        log.contains("first full sync programmed"),
        "ready before programming:\n{log}"
    );
    ensure!(
        log.lines().any(|l| l.contains("endpoint attached")
            && l.contains(&format!("{ns}/head"))
            && l.contains("hook=\"tc\"")),
        "head not attached with TC when ready:\n{log}"
    );
    assert_ne!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Ok,
        "outsider right at readiness"
    );
    println!("ready after {ready_after:?} (readyz statuses seen: {statuses:?})");

    // Intra-cluster TCP and UDP pass (both directions, v4 and v6); the outsider is
    // dropped; a non-Ray pod is untouched.
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        worker.tcp_connect(head.ip6.into(), 8000, SHORT),
        Outcome::Ok
    );
    assert_eq!(worker.udp_probe(v4(head), 8001, SHORT), Outcome::Ok);
    assert_eq!(head.tcp_connect(v4(worker), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(outsider.udp_probe(v4(head), 8001, SHORT), Outcome::Timeout);
    assert_eq!(
        outsider.tcp_connect(v4(worker), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(outsider.tcp_connect(v4(plain), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        head.tcp_connect(v4(outsider), 9, SHORT),
        Outcome::Timeout,
        "egress isolated too"
    );

    // Drop counters reach /metrics with bounded labels.
    let drops = |agent: &Agent| -> f64 {
        agent
            .http_get(topo.node(0), "/metrics")
            .map(|(_, body)| {
                metric_sum(
                    &body,
                    "rayfence_drops_total",
                    &[
                        ("raycluster", "rc"),
                        ("role", "head"),
                        ("direction", "ingress"),
                        ("pod_namespace", ns),
                    ],
                )
            })
            .unwrap_or(0.0)
    };
    let t0 = Instant::now();
    while drops(&agent) < 1.0 {
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "no drops in /metrics"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = drops(&agent);
    for _ in 0..3 {
        let _ = outsider.tcp_connect(v4(head), 8000, Duration::from_millis(50));
    }
    let t0 = Instant::now();
    while drops(&agent) <= before {
        ensure!(t0.elapsed() < Duration::from_secs(5), "drops did not rise");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = agent.http_get(topo.node(0), "/metrics")?;
    ensure!(
        metrics.contains("rayfence_programming_latency_seconds"),
        "{metrics}"
    );
    ensure!(
        metric_sum(
            &metrics,
            "rayfence_endpoints",
            &[("hook", "tc"), ("state", "attached")]
        ) >= 4.0,
        "{metrics}"
    );
    ensure!(agent.http_get(topo.node(0), "/healthz")?.0 == 200);

    // Editing the RayCluster (an ingress rule for the outsider, then without it) is
    // enforced within a second each time.
    let allow = json!({"mode": "DenyAll", "head": {"ingressRules": [{
        "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
        "ports": [{"protocol": "TCP", "port": 8000}]}]}});
    let mut samples = Vec::new();
    for round in 0..4 {
        manifests.write("rc.yaml", &[raycluster(ns, "rc", allow.clone())])?;
        let t = wait_outcome(
            &format!("allow edit {round}"),
            Duration::from_secs(3),
            || outsider.tcp_connect(v4(head), 8000, Duration::from_millis(50)),
            true,
        )?;
        samples.push(t);
        manifests.write("rc.yaml", &[raycluster(ns, "rc", deny_all.clone())])?;
        let t = wait_outcome(
            &format!("revoke edit {round}"),
            Duration::from_secs(3),
            || outsider.tcp_connect(v4(head), 8000, Duration::from_millis(50)),
            false,
        )?;
        samples.push(t);
    }
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "RayCluster edit -> enforced (file written to probe verdict, {} edits): p50 {p50:?} p99 {p99:?} samples {samples:?}",
        samples.len()
    );
    ensure!(p99 < Duration::from_secs(1), "an edit took {p99:?}");
    // The agent's own view: change received -> datapath (and endpoints) updated.
    let (_, metrics) = agent.http_get(topo.node(0), "/metrics")?;
    let name = "rayfence_programming_latency_seconds";
    let (p50, n) = histogram_quantile(&metrics, name, 0.5);
    let (p99, _) = histogram_quantile(&metrics, name, 0.99);
    println!("agent programming latency over {n} programmings: p50 <= {p50:?} s, p99 <= {p99:?} s");
    ensure!(p99.is_some_and(|s| s < 1.0), "{metrics}");
    // The ingress rule allowed TCP 8000 only: UDP stayed closed.
    assert_eq!(outsider.udp_probe(v4(head), 8001, SHORT), Outcome::Timeout);
    Ok(())
}

#[test]
fn agent_protects_a_pod_whose_veth_appears_after_it_started() -> Result<()> {
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "outsider"])?;
    let kubelet = Kubelet::new()?;
    let ns = format!("ray-{}", topo.tag());
    let uids = [uid(11), uid(12), uid(13)];
    let _sandboxes = [
        sandbox(&kubelet, topo.pod("head"), &uids[0])?,
        sandbox(&kubelet, topo.pod("outsider"), &uids[1])?,
    ];
    let _head_tcp = topo.pod("head").serve_tcp(8000)?;
    // The late pod's addresses, as the topology will give them (third pod on node 0).
    let late_ip4: IpAddr = "10.244.0.12".parse()?;
    let late_ip6: IpAddr = "fd00:10:244::c".parse()?;
    let late_doc = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "late", "namespace": ns, "uid": uids[2],
                     "labels": {"ray.io/cluster": "rc", "ray.io/node-type": "worker", "ray.io/group": "small"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "qosClass": "Guaranteed", "podIP": late_ip4.to_string(),
                   "podIPs": [{"ip": late_ip4.to_string()}, {"ip": late_ip6.to_string()}]}});
    let manifests = Manifests::new()?;
    let mut docs = base(
        &ns,
        &topo,
        &[
            ("head", &uids[0], head_labels("rc")),
            ("outsider", &uids[1], vec![("app", "outsider")]),
        ],
    );
    docs.push(late_doc);
    docs.push(raycluster(&ns, "rc", json!({"mode": "DenyAll"})));
    manifests.write("all.yaml", &docs)?;

    let bpffs = Bpffs::new();
    let agent = Agent::start(&AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &manifests.dir,
        bpffs: &bpffs.path,
        cgroup_root: kubelet.root.path(),
        kubeconfig: None,
        extra_args: &[],
    })?;
    agent.wait_ready(topo.node(0), Duration::from_secs(20))?;
    agent.wait_log(&["pending", &format!("{ns}/late")], Duration::from_secs(5))?;

    // The outsider knocks continuously from before the pod exists.
    let knocking = continuous(topo.pod("outsider").prober(), late_ip4, 8000);
    // Kubelet order: pod cgroup, then the sandbox's network (veth), then containers.
    let ctr = kubelet.pod_cgroup(&uids[2])?;
    let created = Instant::now();
    let created_wall = jiff::Timestamp::now();
    let late = topo.add_pod(0, "late")?;
    assert_eq!(late.ip4.to_string(), late_ip4.to_string());
    let _pause = late.prober_in(&ctr).serve_tcp(9)?;
    let _server = late.prober_in(&ctr).serve_tcp(8000)?;
    let server_up = created.elapsed();
    agent.wait_log(
        &["endpoint attached", &format!("{ns}/late")],
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let (attempts, successes) = knocking.finish();
    let line = agent
        .log_text()
        .lines()
        .find(|l| l.contains("endpoint attached") && l.contains(&format!("{ns}/late")))
        .unwrap_or_default()
        .to_owned();
    // The agent's log timestamp (same clock) against the moment the veth was made.
    let attached_at: jiff::Timestamp =
        line.split_whitespace().next().unwrap_or_default().parse()?;
    let attach_after_link = attached_at.duration_since(created_wall);
    println!(
        "late pod: attached {attach_after_link:?} after `ip link add` began; its server listened {server_up:?} after; \
         outsider attempts {attempts}, successes {}; agent: {line}",
        successes.len()
    );
    ensure!(
        attach_after_link.as_secs_f64() < server_up.as_secs_f64(),
        "attached only after the server ran"
    );
    ensure!(
        successes.is_empty(),
        "the outsider reached the new pod at {successes:?}"
    );
    ensure!(attempts > 5, "too few probes ({attempts})");
    // And the pod is a working member of its cluster.
    let head = topo.pod("head");
    assert_eq!(head.tcp_connect(late_ip4, 8000, SHORT), Outcome::Ok);
    assert_eq!(
        topo.pod("late").tcp_connect(v4(head), 8000, SHORT),
        Outcome::Ok
    );
    // Its veth is now known, so it is enforced on TC too (first attach or added
    // beside the cgroup hook): what the kernel answers for the pod is covered, which
    // the cgroup hook alone cannot see.
    agent.wait_any_log(
        &[
            &["endpoint attached", "hook=\"tc\"", &format!("{ns}/late")],
            &["TC attached beside the cgroup hook", &format!("{ns}/late")],
        ],
        Duration::from_secs(5),
    )?;
    assert!(
        topo.pod("outsider")
            .ping(late_ip4, Duration::from_millis(200))
            .is_blocked(),
        "the kernel answered the outsider's ping for the late pod"
    );
    Ok(())
}

#[test]
fn agent_restart_keeps_connections_and_denials() -> Result<()> {
    let node = SimNode::new(&["head", "worker", "outsider"], 21)?;
    let (topo, kubelet, ns, uids) = (&node.topo, &node.kubelet, &node.ns, &node.uids);
    let (head, worker, outsider) = (topo.pod("head"), topo.pod("worker"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;
    let manifests = Manifests::new()?;
    let mut docs = base(
        ns,
        topo,
        &[
            ("head", &uids[0], head_labels("rc")),
            ("worker", &uids[1], worker_labels("rc")),
            ("outsider", &uids[2], vec![("app", "outsider")]),
        ],
    );
    docs.push(raycluster(ns, "rc", json!({"mode": "DenyAll"})));
    manifests.write("all.yaml", &docs)?;
    let bpffs = Bpffs::new();
    let options = AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &manifests.dir,
        bpffs: &bpffs.path,
        cgroup_root: kubelet.root.path(),
        kubeconfig: None,
        extra_args: &[],
    };
    let mut first = Agent::start(&options)?;
    first.wait_ready(topo.node(0), Duration::from_secs(20))?;
    let mut held = worker.tcp_hold(v4(head), 8000, SHORT)?;
    ensure!(held.roundtrip(), "held connection before the restart");
    let knocking = continuous(outsider.prober(), v4(head), 8000);

    first.kill();
    std::thread::sleep(Duration::from_millis(300));
    ensure!(held.roundtrip(), "held connection while no agent runs");

    let second = Agent::start(&options)?;
    let (ready, _) = second.wait_ready(topo.node(0), Duration::from_secs(20))?;
    ensure!(held.roundtrip(), "held connection after the restart");
    let log = second.log_text();
    let head_line = log
        .lines()
        .find(|l| l.contains("endpoint attached") && l.contains(&format!("{ns}/head")))
        .unwrap_or_default()
        .to_owned();
    ensure!(
        head_line.contains("adopted=true"),
        "head not re-registered on its pinned link: {head_line}\n{log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (attempts, successes) = knocking.finish();
    println!(
        "restart: second agent ready after {ready:?}; outsider attempts {attempts}, successes {}",
        successes.len()
    );
    ensure!(
        successes.is_empty(),
        "the outsider got through at {successes:?}"
    );
    ensure!(held.roundtrip(), "held connection at the end");
    // Converged: new connections as before.
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout
    );
    Ok(())
}

#[test]
fn agent_reports_bad_input_and_keeps_the_other_cluster_enforced() -> Result<()> {
    let node = SimNode::new(&["good", "bad", "outsider"], 31)?;
    let (topo, ns, uids) = (&node.topo, &node.ns, &node.uids);
    let _good = topo.pod("good").serve_tcp(8000)?;
    let _bad = topo.pod("bad").serve_tcp(8000)?;
    let manifests = Manifests::new()?;
    manifests.write(
        "base.yaml",
        &base(
            ns,
            topo,
            &[
                ("good", &uids[0], head_labels("good")),
                ("bad", &uids[1], head_labels("bad")),
                ("outsider", &uids[2], vec![("app", "outsider")]),
            ],
        ),
    )?;
    manifests.write(
        "good.yaml",
        &[raycluster(ns, "good", json!({"mode": "DenyAll"}))],
    )?;
    manifests.write(
        "bad.yaml",
        &[raycluster(ns, "bad", json!({"mode": "Sideways"}))],
    )?;
    let bpffs = Bpffs::new();
    let agent = node.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
    agent.wait_log(
        &["invalid input", "RayCluster", "/bad", "mode", "Sideways"],
        Duration::from_secs(5),
    )?;
    let outsider = topo.pod("outsider");
    assert_eq!(
        outsider.tcp_connect(v4(topo.pod("good")), 8000, SHORT),
        Outcome::Timeout
    );
    // The safe reading of an invalid mode with no last good policy: DenyAll.
    assert_eq!(
        outsider.tcp_connect(v4(topo.pod("bad")), 8000, SHORT),
        Outcome::Timeout
    );

    // A file that no longer parses is reported with its path and document, and its
    // objects keep their last good state (the good cluster stays isolated).
    manifests.write_raw(
        "good.yaml",
        "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: [oops\n",
    )?;
    agent.wait_log(
        &["manifest not read", "good.yaml", "document 0"],
        Duration::from_secs(3),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outsider.tcp_connect(v4(topo.pod("good")), 8000, SHORT),
        Outcome::Timeout
    );

    // A pod deleted from the manifests is detached: its pinned links go.
    let bad = topo.pod("bad");
    let link = bpffs
        .path
        .join("links")
        .join(format!("tc_{}_ingress", bad.host_ifindex));
    ensure!(link.exists(), "no pinned link {}", link.display());
    manifests.write(
        "base.yaml",
        &base(
            ns,
            topo,
            &[
                ("good", &uids[0], head_labels("good")),
                ("outsider", &uids[2], vec![("app", "outsider")]),
            ],
        ),
    )?;
    agent.wait_log(
        &["endpoint removed", &format!("{ns}/bad")],
        Duration::from_secs(3),
    )?;
    ensure!(!link.exists(), "{} still pinned", link.display());
    Ok(())
}
