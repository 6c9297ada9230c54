//! End to end through the Kubernetes API: the real `rayfence agent` watching the fake
//! API server (real HTTP list and watch) from inside a simulated node. The server's
//! socket is made inside the node namespace, so the agent reaches it at 127.0.0.1.
//!
//! Needs root, like `runtime`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::Outcome;
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;
use serde_json::json;

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        ensure!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t0.elapsed())
}

#[test]
fn agent_follows_the_api_server_keeps_enforcing_through_an_outage_and_posts_events() -> Result<()> {
    let node = SimNode::new(&["head", "worker", "outsider"], 41)?;
    let (topo, ns, uids) = (&node.topo, &node.ns, &node.uids);
    let (head, worker, outsider) = (topo.pod("head"), topo.pod("worker"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;

    let (_rt, server) = fake_api_in(topo.node(0))?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&namespace(ns));
    server.apply(&node_object(NODE, topo.node(0)));
    server.apply(&pod_object(ns, head, &uids[0], NODE, &head_labels("rc")));
    server.apply(&pod_object(
        ns,
        worker,
        &uids[1],
        NODE,
        &worker_labels("rc"),
    ));
    server.apply(&pod_object(
        ns,
        outsider,
        &uids[2],
        NODE,
        &[("app", "outsider")],
    ));
    server.apply(&raycluster(ns, "rc", json!({"mode": "DenyAll"})));
    let manifests = Manifests::new()?;
    let kubeconfig = manifests.write_kubeconfig(&server)?;

    let bpffs = Bpffs::new();
    let agent = node.start_agent_on_api(NODE, &kubeconfig, &bpffs, &[])?;
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout
    );

    // A RayCluster edit through the API is enforced within a second.
    let allow = json!({"mode": "DenyAll", "head": {"ingressRules": [{
        "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
        "ports": [{"protocol": "TCP", "port": 8000}]}]}});
    server.apply(&raycluster(ns, "rc", allow));
    let t = eventually("allow through the API", Duration::from_secs(3), || {
        outsider.tcp_connect(v4(head), 8000, Duration::from_millis(50)) == Outcome::Ok
    })?;
    println!("API edit -> enforced: {t:?}");
    ensure!(t < Duration::from_secs(1), "took {t:?}");
    server.apply(&raycluster(ns, "rc", json!({"mode": "DenyAll"})));
    eventually("revoke through the API", Duration::from_secs(3), || {
        outsider.tcp_connect(v4(head), 8000, Duration::from_millis(50)) != Outcome::Ok
    })?;

    // API server down: the last state stays enforced, nothing is flushed.
    server.set_available(false);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        worker.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Ok,
        "during the outage"
    );
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout,
        "during the outage"
    );
    server.set_available(true);

    // Bad input: an Event on the RayCluster naming the field and value.
    server.apply(&raycluster(ns, "bad", json!({"mode": "Sideways"})));
    eventually(
        "an Event about the bad RayCluster",
        Duration::from_secs(15),
        || {
            server.events().iter().any(|e| {
                let text = e.to_string();
                text.contains("Sideways") && text.contains("\"bad\"")
            })
        },
    )
    .with_context(|| format!("events: {:?}\nlog:\n{}", server.events(), agent.log_text()))?;
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout,
        "after the outage"
    );
    drop(agent);
    drop(server);
    Ok(())
}
