//! End to end: capacity per RayCluster. Two RayClusters on one node, the agent at
//! its default map sizes (16384 ipBlock prefixes); one grows the rule of the report
//! (`ipBlock 10.0.0.0/8` with 17,000 `/32` excepts, about 400 KB) that does not fit. The other keeps its intra-cluster traffic and
//! its edits keep being applied; the big one is held fail-closed and reported (an
//! Event on it, `rayfence status`, explain, a metric, with the numbers), and comes
//! back when it shrinks.
//!
//! Needs root (network namespaces, bpffs, cgroups). The agent follows a fake API
//! server (so the Event can be checked); guards clean up on panic too.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence::operator::wire::{ExplainReport, StatusReport};
use rayfence_tests::agent::*;
use rayfence_tests::background::Background;
use rayfence_tests::objects::json::*;
use rayfence_tests::{Outcome, Prober};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);
/// More than the CIDR map's default 16384 entries.
const EXCEPTS: usize = 17000;

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        ensure!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t0.elapsed())
}

/// TCP connects to `addr:port` in a loop until stopped: (attempts, failures).
fn continuous(prober: Prober, addr: IpAddr, port: u16) -> Background<(u32, u32)> {
    Background::start(move |flag| {
        let (mut attempts, mut failures) = (0u32, 0u32);
        while !flag.load(Ordering::Relaxed) {
            attempts += 1;
            if prober.tcp_connect(addr, port, Duration::from_millis(500)) != Outcome::Ok {
                failures += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (attempts, failures)
    })
}

/// The big cluster's policy: its workers may reach 10.0.0.0/8 except `excepts`
/// addresses (none of them a pod's).
fn big_policy(excepts: usize) -> Value {
    let except: Vec<String> = (0..excepts)
        .map(|i| format!("10.{}.{}.{}/32", 100 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    json!({"mode": "DenyAll", "worker": {"egressRules": [{
        "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": except}}]}]}})
}

/// The small cluster's policy, with its own ipBlock (so it holds CIDR entries
/// too), and optionally an ingress rule for the outsider.
fn alpha_policy(allow_outsider: bool) -> Value {
    let mut head = json!({"egressRules": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}]});
    if allow_outsider {
        head["ingressRules"] = json!([{
            "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
            "ports": [{"protocol": "TCP", "port": 8000}]}]);
    }
    json!({"mode": "DenyAll", "head": head})
}

fn status(agent: &Agent, node: &SimNode) -> Result<StatusReport> {
    let (ok, out, err) = agent.command(node.topo.node(0), &["status", "--json"])?;
    ensure!(ok, "rayfence status failed: {err}");
    serde_json::from_str(&out).with_context(|| format!("rayfence status printed: {out}"))
}

fn mode_of(status: &StatusReport, pod: &str) -> Result<String> {
    status
        .endpoints
        .iter()
        .find(|e| e.pod == pod)
        .map(|e| e.mode.clone())
        .with_context(|| format!("no endpoint {pod} in {status:?}"))
}

fn held_metric(agent: &Agent, node: &SimNode, ns: &str) -> Result<f64> {
    let (_, body) = agent.http_get(node.topo.node(0), "/metrics")?;
    Ok(metric_sum(
        &body,
        "rayfence_raycluster_capacity_held",
        &[
            ("raycluster_namespace", ns),
            ("raycluster", "big"),
            ("map", "cidrs"),
        ],
    ))
}

#[test]
fn an_oversized_raycluster_is_held_fail_closed_and_reported_while_the_other_keeps_its_policy()
-> Result<()> {
    let node = SimNode::new(
        &["a-head", "a-worker", "b-head", "b-worker", "outsider"],
        71,
    )?;
    let (topo, ns, uids) = (&node.topo, &node.ns, &node.uids);
    let (a_head, a_worker, b_head, b_worker, outsider) = (
        topo.pod("a-head"),
        topo.pod("a-worker"),
        topo.pod("b-head"),
        topo.pod("b-worker"),
        topo.pod("outsider"),
    );
    let _a_tcp = a_head.serve_tcp(8000)?;
    let _b_tcp = b_head.serve_tcp(8000)?;
    let _outsider_tcp = outsider.serve_tcp(8000)?;

    let (_rt, server) = fake_api_in(topo.node(0))?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&namespace(ns));
    server.apply(&node_object(NODE, topo.node(0)));
    for (i, (pod, labels)) in [
        (a_head, head_labels("alpha")),
        (a_worker, worker_labels("alpha")),
        (b_head, head_labels("big")),
        (b_worker, worker_labels("big")),
        (outsider, vec![("app", "outsider")]),
    ]
    .into_iter()
    .enumerate()
    {
        server.apply(&pod_object(ns, pod, &uids[i], NODE, &labels));
    }
    server.apply(&raycluster(ns, "alpha", alpha_policy(false)));
    server.apply(&raycluster(ns, "big", big_policy(3)));
    let manifests = Manifests::new()?;
    let kubeconfig = manifests.write_kubeconfig(&server)?;

    let bpffs = Bpffs::new();
    let options = AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: Path::new("/nonexistent"),
        bpffs: &bpffs.path,
        cgroup_root: node.kubelet.root.path(),
        kubeconfig: Some(&kubeconfig),
        extra_args: &[],
    };
    let mut agent = Agent::start(&options)?;
    agent.wait_ready(topo.node(0), Duration::from_secs(20))?;
    agent.wait_log(&["endpoint attached", "/b-worker"], Duration::from_secs(10))?;
    agent.wait_log(&["endpoint attached", "/a-worker"], Duration::from_secs(10))?;

    // Both fit: both enforced.
    assert_eq!(a_worker.tcp_connect(v4(a_head), 8000, SHORT), Outcome::Ok);
    assert_eq!(b_worker.tcp_connect(v4(b_head), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        outsider.tcp_connect(v4(a_head), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(
        outsider.tcp_connect(v4(b_head), 8000, SHORT),
        Outcome::Timeout
    );
    assert!(status(&agent, &node)?.held.is_empty());

    // "big" grows past the CIDR map while alpha's intra-cluster traffic is probed
    // without a pause: not one connection of alpha's may fail.
    let alpha_traffic = continuous(a_worker.prober(), v4(a_head), 8000);
    server.apply(&raycluster(ns, "big", big_policy(EXCEPTS)));
    let held_after = agent
        .wait_log(
            &["RayCluster does not fit", "/big", "RF_CIDR_V1"],
            // The engine compiles 17,000 prefixes first (seconds in a debug build).
            Duration::from_secs(120),
        )
        .with_context(|| agent.log_text())?;
    println!("big held {held_after:?} after its edit");
    eventually(
        "big's intra-cluster traffic cut",
        Duration::from_secs(3),
        || b_worker.tcp_connect(v4(b_head), 8000, Duration::from_millis(100)) != Outcome::Ok,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let (attempts, failures) = alpha_traffic.finish();
    println!("alpha worker -> head while big grew: {attempts} connections, {failures} failed");
    ensure!(
        attempts > 5 && failures == 0,
        "{failures} of {attempts} failed"
    );

    // Held fail-closed: nothing but node traffic, in either direction.
    assert_eq!(
        b_worker.tcp_connect(v4(b_head), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(
        outsider.tcp_connect(v4(b_head), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(
        b_head.tcp_connect(v4(outsider), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(
        b_worker.tcp_connect(v4(outsider), 8000, SHORT),
        Outcome::Timeout,
        "the worker's egress rule allows 10.0.0.0/8, yet nothing passes while held"
    );
    // Alpha: untouched.
    assert_eq!(a_worker.tcp_connect(v4(a_head), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        outsider.tcp_connect(v4(a_head), 8000, SHORT),
        Outcome::Timeout
    );

    // Reported, with the numbers: status, explain, metric, an Event on "big".
    let report = status(&agent, &node)?;
    let held = report
        .held
        .iter()
        .find(|h| h.name == "big" && h.namespace == *ns)
        .with_context(|| format!("big not held: {report:?}"))?;
    ensure!(
        held.map == "RF_CIDR_V1" && held.needed >= EXCEPTS && held.free < held.needed,
        "{held:?}"
    );
    ensure!(report.held.len() == 1, "{report:?}");
    assert_eq!(mode_of(&report, "b-head")?, "fail-closed");
    assert_eq!(mode_of(&report, "b-worker")?, "fail-closed");
    assert_eq!(mode_of(&report, "a-head")?, "enforce");
    let (_, text, _) = agent.command(topo.node(0), &["status"])?;
    ensure!(
        text.contains(&format!(
            "RayCluster {ns}/big held fail-closed: needs {} entries in map RF_CIDR_V1, {} free",
            held.needed, held.free
        )),
        "{text}"
    );
    let (_, out, err) = agent.command(
        topo.node(0),
        &[
            "explain",
            "--json",
            "--from",
            &format!("{ns}/b-worker"),
            "--to",
            &format!("{ns}/b-head:8000"),
        ],
    )?;
    let explained: ExplainReport =
        serde_json::from_str(&out).with_context(|| format!("explain printed {out}; {err}"))?;
    assert_eq!(explained.verdict, "denied", "{explained:?}");
    ensure!(
        explained
            .sides
            .iter()
            .all(|s| s.verdict == "denied" && s.because.contains("does not fit")),
        "{explained:?}"
    );
    let metric = held_metric(&agent, &node, ns)?;
    ensure!(
        metric == held.needed as f64,
        "metric {metric}, status {held:?}"
    );
    eventually("an Event on big", Duration::from_secs(15), || {
        server.events().iter().any(|e| {
            let text = e.to_string();
            text.contains("\"big\"") && text.contains("RF_CIDR_V1") && text.contains("free")
        })
    })
    .with_context(|| format!("events: {:?}", server.events()))?;

    // Alpha's edits keep being applied while big is held.
    server.apply(&raycluster(ns, "alpha", alpha_policy(true)));
    let t = eventually("alpha's edit applied", Duration::from_secs(3), || {
        outsider.tcp_connect(v4(a_head), 8000, Duration::from_millis(100)) == Outcome::Ok
    })?;
    println!("alpha edit applied while big is held: {t:?}");
    server.apply(&raycluster(ns, "alpha", alpha_policy(false)));
    eventually("alpha's revocation applied", Duration::from_secs(3), || {
        outsider.tcp_connect(v4(a_head), 8000, Duration::from_millis(100)) != Outcome::Ok
    })?;
    assert_eq!(
        b_worker.tcp_connect(v4(b_head), 8000, SHORT),
        Outcome::Timeout
    );

    // A restart while big is held loses nothing: while no agent runs and while the
    // new one compiles and adopts the pinned state, alpha passes and big stays shut;
    // the new agent holds big again, with alpha's incumbent entries kept first.
    let alpha_traffic = continuous(a_worker.prober(), v4(a_head), 8000);
    let big_traffic = continuous(b_worker.prober(), v4(b_head), 8000);
    agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    agent = Agent::start(&options)?;
    let (ready, _) = agent.wait_ready(topo.node(0), Duration::from_secs(120))?;
    agent.wait_log(
        &["RayCluster does not fit", "/big", "RF_CIDR_V1"],
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let (attempts, failures) = alpha_traffic.finish();
    let (big_attempts, big_failures) = big_traffic.finish();
    println!(
        "restart while big is held: ready after {ready:?}; alpha {attempts} connections, \
         {failures} failed; big {big_attempts} connections, {} passed",
        big_attempts - big_failures
    );
    ensure!(
        attempts > 5 && failures == 0,
        "alpha: {failures} of {attempts} failed"
    );
    ensure!(
        big_attempts > 2 && big_failures == big_attempts,
        "big passed while held"
    );
    ensure!(status(&agent, &node)?.held.len() == 1);

    // Shrunk, big fits again and is enforced as written.
    server.apply(&raycluster(ns, "big", big_policy(10)));
    let t = eventually("big back", Duration::from_secs(5), || {
        b_worker.tcp_connect(v4(b_head), 8000, Duration::from_millis(100)) == Outcome::Ok
    })?;
    println!("big enforced again after shrinking: {t:?}");
    agent.wait_log(&["no longer held", "/big"], Duration::from_secs(3))?;
    assert_eq!(
        outsider.tcp_connect(v4(b_head), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(
        b_worker.tcp_connect(v4(outsider), 8000, SHORT),
        Outcome::Ok,
        "its egress rule allows 10.0.0.0/8 again"
    );
    assert_eq!(
        b_head.tcp_connect(v4(outsider), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(a_worker.tcp_connect(v4(a_head), 8000, SHORT), Outcome::Ok);
    let report = status(&agent, &node)?;
    ensure!(report.held.is_empty(), "{report:?}");
    assert_eq!(mode_of(&report, "b-head")?, "enforce");
    assert_eq!(held_metric(&agent, &node, ns)?, 0.0);
    let (_, metrics) = agent.http_get(topo.node(0), "/metrics")?;
    let name = "rayfence_programming_latency_seconds";
    let (p50, n) = histogram_quantile(&metrics, name, 0.5);
    let (p99, _) = histogram_quantile(&metrics, name, 0.99);
    println!("programming latency over {n} programmings: p50 <= {p50:?} s, p99 <= {p99:?} s");
    drop(agent);
    drop(server);
    Ok(())
}
