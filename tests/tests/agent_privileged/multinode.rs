//! Multi-node simulation: three "nodes" (network namespaces joined by an underlay,
//! pod traffic routed over it or encapsulated in VXLAN), each running its own real
//! `rayfence agent` against one fake Kubernetes API server, with the Ray pods of one RayCluster spread over all of
//! them: intra-cluster flows across nodes pass, an outsider on another node is
//! dropped, a RayCluster edit reaches every node (the time to enforcement on each
//! node is printed), and an API outage keeps enforcement as it was (intra-cluster
//! traffic never stops, an edit the agents cannot see changes nothing), after which
//! the agents relist (410 Gone) and enforce what they missed.
//!
//! And NodePorts across two nodes (kube-proxy's NAT on each, an external client on
//! the underlay): what each node's NAT does to the source, and who is judged.
//!
//! And two nodes over flannel's vxlan backend (pod traffic between nodes
//! encapsulated, see [`rayfence_tests::topology::Transport`]): the agents' programs
//! on the pods' veths see the inner packets, so a RayCluster split over the nodes
//! passes, an outsider on the other node is dropped and counted by the head's node,
//! a pod that is not isolated stays reachable, and the worker's egress to it is
//! dropped and counted by the worker's node.
//!
//! And IPv6 ipBlock rules across two nodes (host-gw and VXLAN): a range of the other
//! node's pods with one address excepted, ingress and egress, directly and through
//! IPv6 ClusterIPs, each agent deciding by the pods' IPv6 addresses.
//!
//! The fake API server listens on 127.0.0.1 of the test's namespace, which the
//! agents (in their node namespaces) cannot reach; each node gets a small TCP relay
//! listening on its own 127.0.0.1, so the agent's kubeconfig names a local address,
//! as a kubeconfig names the API server's, and an outage of the server reaches
//! every agent.
//!
//! Needs root (network namespaces, bpffs, cgroups). Guards kill the agents and run
//! `rayfence cleanup` even when the test panics.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence::source::kube::MAX_BACKOFF;
use rayfence_tests::agent::{
    Agent, AgentOptions, Bpffs, Kubelet, Sandbox, metric_sum, percentile, sandbox, uid, v4,
};
use rayfence_tests::background::Background;
use rayfence_tests::fake_api::{ApiRelay, FakeApiServer};
use rayfence_tests::node_nat::{Endpoint, NodePortService, TrafficPolicy};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::probe_bin;
use rayfence_tests::topology::Transport;
use rayfence_tests::{Layout, Node, Outcome, Pod, Server, Topology};
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(300);
const PORT: u16 = 8000;
/// One probe's timeout while measuring: the resolution of a "now dropped -> now
/// allowed" figure (a connection inside one machine takes well under 1 ms).
const PROBE: Duration = Duration::from_millis(20);
/// Per-edit bound while connected (the assertion on the figures is tighter).
const EDIT_WAIT: Duration = Duration::from_secs(10);
/// The watchers retry with backoff (0.8 s, 1.6 s, 3.2 s, ... with jitter).
const RECOVERY_WAIT: Duration = Duration::from_secs(40);

pub(crate) fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// A pod, the node it runs on, its labels.
type Placement<'a> = (&'a str, usize, Vec<(&'a str, &'a str)>);
/// A pod, its namespace, the node it runs on, its labels.
type NamespacedPlacement<'a> = (&'a str, &'a str, usize, Vec<(&'a str, &'a str)>);

/// Everything one simulated node runs.
pub(crate) struct NodeRig {
    pub(crate) agent: Agent,
    _relay: ApiRelay,
    _sandboxes: Vec<Sandbox>,
    _kubelet: Kubelet,
    // Last: cleaned up after the agent is killed.
    _bpffs: Bpffs,
}

/// A flow probed over and over (new TCP connections) until finished.
fn steady(from: &Pod, to: &Pod) -> Background<(u32, u32)> {
    let prober = from.prober();
    let addr = v4(to);
    Background::start(move |flag| {
        let (mut attempts, mut failures) = (0, 0);
        while !flag.load(Ordering::Relaxed) {
            attempts += 1;
            if prober.tcp_connect(addr, PORT, SHORT) != Outcome::Ok {
                failures += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (attempts, failures)
    })
}

/// `placement` in namespace `ns`.
fn in_namespace<'a>(ns: &'a str, placement: &[Placement<'a>]) -> Vec<NamespacedPlacement<'a>> {
    placement
        .iter()
        .map(|(pod, node, labels)| (*pod, ns, *node, labels.clone()))
        .collect()
}

/// Per node: its kubelet tree (taken by [`start_agents`]) and its pods' sandboxes.
type PlacedPods = (Vec<Option<Kubelet>>, Vec<Vec<Sandbox>>);

/// The nodes and pods as the API server and the kubelets see them before any agent
/// starts: each pod (uids from `first_uid`) in a sandbox of its node's kubelet tree.
/// Each node's kubelet tree and sandboxes, for [`start_agents`].
fn place_pods(
    server: &FakeApiServer,
    topo: &Topology,
    placement: &[NamespacedPlacement],
    first_uid: u32,
) -> Result<PlacedPods> {
    for (i, node) in topo.nodes().iter().enumerate() {
        server.apply(&node_object(&node_name(i), node));
    }
    let mut kubelets = Vec::new();
    let mut sandboxes = Vec::new();
    for _ in topo.nodes() {
        kubelets.push(Some(Kubelet::new()?));
        sandboxes.push(Vec::new());
    }
    for (n, (pod, pod_ns, node, labels)) in placement.iter().enumerate() {
        let uid = uid(first_uid + n as u32);
        let kubelet: &Kubelet = kubelets[*node].as_ref().context("kubelet")?;
        sandboxes[*node].push(sandbox(kubelet, topo.pod(pod), &uid)?);
        server.apply(&pod_object(
            pod_ns,
            topo.pod(pod),
            &uid,
            &node_name(*node),
            labels,
        ));
    }
    Ok((kubelets, sandboxes))
}

/// One agent per node, each with its own relay to the fake API server, bpffs and
/// kubelet tree (and the pod sandboxes it enforces, kept alive with it).
pub(crate) fn start_agents(
    topo: &Topology,
    server: &FakeApiServer,
    kubelets: &mut [Option<Kubelet>],
    sandboxes: &mut [Vec<Sandbox>],
) -> Result<Vec<NodeRig>> {
    let dir = std::env::temp_dir();
    let mut rigs = Vec::new();
    for (i, node) in topo.nodes().iter().enumerate() {
        let mut relay = ApiRelay::in_node(node, server.addr())?;
        let kubeconfig = relay.write_kubeconfig(server, &dir)?;
        let bpffs = Bpffs::new();
        let kubelet = kubelets[i].take().context("kubelet")?;
        let agent = Agent::start(&AgentOptions {
            node,
            node_name: &node_name(i),
            manifests: Path::new("/nonexistent"),
            bpffs: &bpffs.path,
            cgroup_root: kubelet.root.path(),
            kubeconfig: Some(&kubeconfig),
            extra_args: &[],
        })?;
        rigs.push(NodeRig {
            agent,
            _relay: relay,
            _sandboxes: std::mem::take(&mut sandboxes[i]),
            _kubelet: kubelet,
            _bpffs: bpffs,
        });
    }
    Ok(rigs)
}

fn alive(agent: &Agent) -> Result<()> {
    ensure!(
        Path::new(&format!("/proc/{}", agent.pid())).exists(),
        "the agent exited; log:\n{}",
        agent.log_text()
    );
    Ok(())
}

/// Applies `object` and measures, for each (node, target) in parallel, how long
/// until `outsider -> target:PORT` gives the wanted verdict.
fn edit_and_measure(
    server: &FakeApiServer,
    object: &Value,
    outsider: &Pod,
    targets: &[(usize, &Pod)],
    want_ok: bool,
    timeout: Duration,
) -> Result<Vec<(usize, Duration)>> {
    measure(
        || drop(server.apply(object)),
        outsider,
        targets,
        want_ok,
        timeout,
    )
}

/// Runs `change` and measures, for each (node, target) in parallel, how long until
/// `outsider -> target:PORT` gives the wanted verdict.
fn measure(
    change: impl FnOnce(),
    outsider: &Pod,
    targets: &[(usize, &Pod)],
    want_ok: bool,
    timeout: Duration,
) -> Result<Vec<(usize, Duration)>> {
    let prober = outsider.prober();
    let t0 = Instant::now();
    change();
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(node, target)| {
                let prober = prober.clone();
                let addr = v4(target);
                let name = target.name.clone();
                let node = *node;
                s.spawn(move || -> Result<(usize, Duration)> {
                    wait_outcome(
                        &format!("outsider -> {name} on node-{node}"),
                        timeout,
                        || prober.tcp_connect(addr, PORT, PROBE),
                        want_ok,
                    )?;
                    Ok((node, t0.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
            })
            .collect()
    })
}

#[test]
fn three_nodes_enforce_one_raycluster_from_one_api_server() -> Result<()> {
    three_nodes_enforce_one_raycluster(Transport::HostGw)
}

/// The same over flannel's vxlan backend: every flow between nodes encapsulated.
#[test]
fn three_nodes_over_vxlan_enforce_one_raycluster_from_one_api_server() -> Result<()> {
    three_nodes_enforce_one_raycluster(Transport::Vxlan)
}

fn three_nodes_enforce_one_raycluster(transport: Transport) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(FakeApiServer::start())?;
    server.install_crd("ray.io", "v1", "rayclusters");

    // node-0: the head; node-1: a worker and the outsider; node-2: a worker.
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head"])?;
    topo.set_transport(transport)?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "worker-1")?;
    topo.add_pod(n1, "outsider")?;
    let n2 = topo.add_node()?;
    topo.add_pod(n2, "worker-2")?;
    let ns = format!("ray-{}", topo.tag());
    let placement: [Placement; 4] = [
        ("head", 0, head_labels("rc")),
        ("worker-1", n1, worker_labels("rc")),
        ("outsider", n1, vec![("app", "outsider")]),
        ("worker-2", n2, worker_labels("rc")),
    ];

    server.apply(&namespace(&ns));
    let (mut kubelets, mut sandboxes) =
        place_pods(&server, &topo, &in_namespace(&ns, &placement), 1)?;
    let deny_all = raycluster(&ns, "rc", json!({"mode": "DenyAll"}));
    server.apply(&deny_all);

    let (head, worker1, worker2, outsider) = (
        topo.pod("head"),
        topo.pod("worker-1"),
        topo.pod("worker-2"),
        topo.pod("outsider"),
    );
    let _servers = [
        head.serve_tcp(PORT)?,
        worker1.serve_tcp(PORT)?,
        worker2.serve_tcp(PORT)?,
        head.serve_udp(PORT)?,
        worker2.serve_udp(PORT)?,
    ];
    assert_eq!(
        outsider.tcp_connect(v4(head), PORT, SHORT),
        Outcome::Ok,
        "open before the agents"
    );

    let mut rigs = start_agents(&topo, &server, &mut kubelets, &mut sandboxes)?;
    for (i, rig) in rigs.iter_mut().enumerate() {
        let ready = rig
            .agent
            .wait_ready(topo.node(i), Duration::from_secs(30))?;
        println!("node-{i}: agent ready after {ready:?}");
    }

    // Intra-cluster flows across nodes pass, both ways, TCP and UDP, v4 and v6.
    let intra = |what: &str| -> Result<()> {
        for (from, to) in [
            (worker1, head),
            (head, worker1),
            (worker2, head),
            (head, worker2),
            (worker1, worker2),
            (worker2, worker1),
        ] {
            for dst in to.ips() {
                ensure!(
                    from.tcp_connect(dst, PORT, SHORT) == Outcome::Ok,
                    "{what}: {} -> {} ({dst}) TCP",
                    from.name,
                    to.name
                );
            }
        }
        ensure!(
            worker1.udp_probe(v4(head), PORT, SHORT) == Outcome::Ok,
            "{what}: UDP worker-1 -> head"
        );
        ensure!(
            head.udp_probe(v4(worker2), PORT, SHORT) == Outcome::Ok,
            "{what}: UDP head -> worker-2"
        );
        Ok(())
    };
    // The outsider (node-1) is dropped by every node's agent: the head on node-0, its
    // neighbour worker-1 on node-1, worker-2 on node-2.
    let outsider_dropped = |what: &str| -> Result<()> {
        for to in [head, worker1, worker2] {
            for dst in to.ips() {
                ensure!(
                    outsider.tcp_connect(dst, PORT, SHORT) == Outcome::Timeout,
                    "{what}: outsider -> {} ({dst}) not dropped",
                    to.name
                );
            }
        }
        ensure!(
            outsider.udp_probe(v4(head), PORT, SHORT) == Outcome::Timeout,
            "{what}: UDP outsider -> head not dropped"
        );
        Ok(())
    };
    intra("DenyAll")?;
    outsider_dropped("DenyAll")?;

    // A RayCluster edit reaches every node: allow the outsider into head and
    // workers (TCP 8000), then take it back; time to enforcement per node.
    let allow_rule = json!([{
        "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
        "ports": [{"protocol": "TCP", "port": PORT}]}]);
    let allow = raycluster(
        &ns,
        "rc",
        json!({"mode": "DenyAll", "head": {"ingressRules": allow_rule},
               "worker": {"ingressRules": allow_rule}}),
    );
    let targets = [(0, head), (n1, worker1), (n2, worker2)];
    let mut per_node: Vec<Vec<Duration>> = vec![Vec::new(); topo.nodes().len()];
    for round in 0..3 {
        for (object, want_ok) in [(&allow, true), (&deny_all, false)] {
            let times = edit_and_measure(&server, object, outsider, &targets, want_ok, EDIT_WAIT)
                .with_context(|| format!("round {round}, allow={want_ok}"))?;
            for (node, t) in times {
                per_node[node].push(t);
            }
        }
    }
    for (i, samples) in per_node.iter().enumerate() {
        println!(
            "node-{i}: RayCluster edit (API write) -> enforced: p50 {:?} max {:?} over {} edits {samples:?}",
            percentile(samples, 50.0),
            percentile(samples, 100.0),
            samples.len()
        );
    }
    let worst = per_node
        .iter()
        .map(|s| percentile(s, 100.0))
        .max()
        .unwrap_or_default();
    ensure!(
        worst < Duration::from_secs(2),
        "an edit took {worst:?} to reach a node"
    );
    intra("after edits")?;
    outsider_dropped("after edits")?;

    // API outage: enforcement stays as it was on every node, and intra-cluster
    // traffic never stops, through the outage and the relist after it.
    let steady = steady(worker2, head);
    server.set_available(false);
    let outage = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    for (i, rig) in rigs.iter().enumerate() {
        alive(&rig.agent)?;
        let log = rig.agent.log_text();
        ensure!(
            log.contains("API server unreachable"),
            "agent on node-{i} did not report the outage:\n{log}"
        );
    }
    intra("during the outage")?;
    outsider_dropped("during the outage")?;
    for (i, rig) in rigs.iter().enumerate() {
        let ready = rig
            .agent
            .http_get(topo.node(i), "/readyz")
            .map(|r| r.0)
            .unwrap_or(0);
        println!("node-{i}: /readyz during the outage: {ready}");
    }
    ensure!(
        server.refused_connections() > 0,
        "the agents did not notice the outage"
    );

    // An edit the agents cannot see, and the history compacted: unseen, it changes
    // nothing; once the server is back, the agents' watches get 410 Gone, relist,
    // and enforce it without a new write.
    server.apply(&allow);
    server.compact_history();
    std::thread::sleep(Duration::from_millis(500));
    outsider_dropped("an edit made during the outage")?;
    let outage = outage.elapsed();
    let times = measure(
        || server.set_available(true),
        outsider,
        &targets,
        true,
        RECOVERY_WAIT,
    )
    .context("the edit made during the outage, after it")?;
    for (node, t) in &times {
        println!(
            "node-{node}: edit made during a {outage:?} outage enforced {t:?} after the server came back (relist)"
        );
        // Sleeping watchers are woken when the server answers (probed every second);
        // one that misses the wake-up sleeps MAX_BACKOFF at most. Then a relist
        // (410, at once) and programming.
        ensure!(
            *t < MAX_BACKOFF + Duration::from_secs(3),
            "node-{node} took {t:?} to catch up after the outage"
        );
    }
    let times = edit_and_measure(&server, &deny_all, outsider, &targets, false, EDIT_WAIT)
        .context("the revoke after the outage")?;
    for (node, t) in &times {
        println!("node-{node}: revoke after the outage enforced after {t:?}");
    }
    let (attempts, failures) = steady.finish();
    println!(
        "worker-2 (node-2) -> head (node-0) through outage and relist: {attempts} connections, {failures} failed"
    );
    ensure!(
        attempts > 10 && failures == 0,
        "intra-cluster traffic broke during the outage or relist: {failures} of {attempts} failed"
    );
    intra("after the outage")?;
    outsider_dropped("after the outage")?;
    if transport == Transport::Vxlan {
        for node in topo.nodes() {
            let carried = vxlan_packets(node)?;
            println!(
                "node-{}: its VXLAN devices carried {carried} packets",
                node.index
            );
            ensure!(
                carried > 100,
                "node-{}: {carried} packets over VXLAN",
                node.index
            );
        }
    }
    for rig in &rigs {
        alive(&rig.agent)?;
    }
    drop(rigs);
    drop(rt);
    Ok(())
}

/// Drops `node`'s agent counted for `role` of RayCluster `cluster` in `direction`.
fn drops(agent: &Agent, node: &Node, ns: &str, cluster: &str, role: &str, dir: &str) -> f64 {
    agent
        .http_get(node, "/metrics")
        .map(|(_, body)| {
            metric_sum(
                &body,
                "rayfence_drops_total",
                &[
                    ("pod_namespace", ns),
                    ("raycluster", cluster),
                    ("role", role),
                    ("direction", dir),
                ],
            )
        })
        .unwrap_or(0.0)
}

/// Waits (counters are published every second) until `read()` reaches `want`,
/// then checks it is exactly that.
fn expect_drops(what: &str, want: f64, read: impl Fn() -> f64) -> Result<()> {
    let t0 = Instant::now();
    let mut now = read();
    while now < want && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        now = read();
    }
    ensure!(now == want, "{what}: {now} drops counted, expected {want}");
    Ok(())
}

/// The one source address a recording server saw since it was last asked.
fn one_peer(what: &str, srv: &Server) -> Result<IpAddr> {
    let seen = srv.take_peers(Duration::from_secs(1));
    ensure!(seen.len() == 1, "{what}: the server saw {seen:?}");
    Ok(seen[0])
}

/// NodePorts on two nodes (kube-proxy's NAT in both, docs/semantics.md "What counts as the node"): the head's
/// node judges what it NATed itself by the original client (the node's conntrack),
/// and what another node masqueraded by that node's address (an ordinary peer: its
/// SNAT hid the client); an egress-isolated pod's own node's NodePort is decided
/// by the backend on the other node. Checks that pass without the node-trust
/// datapath come first, then the ones it makes pass.
///
/// Not asserted: an egress-isolated pod to ANOTHER node's NodePort. For its own
/// agent that node's address is an ordinary peer (docs/semantics.md "What an isolated pod may do", egress 2: only the
/// pod's own node), so it is dropped unless an ipBlock covers it, whatever the
/// backend; whether 5a's "any Service's nodePort on any node address" should
/// decide it by the backend instead is open.
#[test]
fn node_ports_across_nodes_are_judged_by_the_original_client_and_the_backend() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(FakeApiServer::start())?;
    server.install_crd("ray.io", "v1", "rayclusters");

    // node-0: the head of `rc`, the head of `eg`, a pod of another namespace;
    // node-1: a worker of each, an outsider; a client outside the cluster.
    let mut topo = Topology::with_pods(
        Layout::Bridged,
        probe_bin(),
        &["head", "eg-head", "foreign"],
    )?;
    let n1 = topo.add_node()?;
    for pod in ["worker", "eg-worker", "outsider"] {
        topo.add_pod(n1, pod)?;
    }
    topo.add_external_client("client")?;
    let ns = format!("ray-{}", topo.tag());
    let other = format!("other-{}", topo.tag());
    let placement: [NamespacedPlacement; 6] = [
        ("head", &ns, 0, head_labels("rc")),
        ("eg-head", &ns, 0, head_labels("eg")),
        ("foreign", &other, 0, vec![("app", "foreign")]),
        ("worker", &ns, n1, worker_labels("rc")),
        ("eg-worker", &ns, n1, worker_labels("eg")),
        ("outsider", &ns, n1, vec![("app", "outsider")]),
    ];
    let service = |name: &str, namespace: &str, pod: &str, node_port, policy, ip: u8| {
        let mut svc = NodePortService::tcp(namespace, name, PORT, node_port);
        svc.external_traffic_policy = policy;
        svc.cluster_ips = vec![
            format!("10.96.2.{ip}").parse().expect("ip"),
            format!("fd00:10:96::2:{ip}").parse().expect("ip"),
        ];
        svc.endpoints.push(Endpoint::of(namespace, topo.pod(pod)));
        svc
    };
    let services = [
        service("head-np", &ns, "head", 30080, TrafficPolicy::Cluster, 1),
        service("head-np-local", &ns, "head", 30081, TrafficPolicy::Local, 2),
        service(
            "foreign-np",
            &other,
            "foreign",
            30090,
            TrafficPolicy::Cluster,
            3,
        ),
        service("eg-np", &ns, "eg-head", 30093, TrafficPolicy::Cluster, 4),
    ];
    for svc in &services {
        topo.install_node_port(svc)?;
    }

    let (node0, node1) = (topo.node(0), topo.node(n1));
    let client = topo.external("client");
    let (head, foreign, eg_worker, outsider) = (
        topo.pod("head"),
        topo.pod("foreign"),
        topo.pod("eg-worker"),
        topo.pod("outsider"),
    );
    let head_srv = head.prober().serve_tcp_recording(PORT)?;
    let foreign_srv = foreign.prober().serve_tcp_recording(PORT)?;
    let _servers = [
        topo.pod("eg-head").serve_tcp(PORT)?,
        node0.serve_tcp(10250)?,
        node1.serve_tcp(10250)?,
    ];
    let ul1: [IpAddr; 2] = [
        node1.underlay4.context("underlay")?.into(),
        node1.underlay6.context("underlay")?.into(),
    ];
    let addrs0 = node0.addresses()?;

    // The lab: every path answers, with the source each NAT leaves.
    for (dst0, dst1) in node0.ips().into_iter().zip(node1.ips()) {
        ensure!(
            client.tcp_connect(dst1, 30080, SHORT) == Outcome::Ok,
            "lab: client -> node-1 {dst1}:30080"
        );
        let src = one_peer("lab: client via node-1", &head_srv)?;
        ensure!(ul1.contains(&src), "lab: via node-1 the head saw {src}");
        ensure!(
            client.tcp_connect(dst0, 30081, SHORT) == Outcome::Ok,
            "lab: client -> {dst0}:30081"
        );
        ensure!(client.ips().contains(&one_peer("lab: Local", &head_srv)?));
        ensure!(
            outsider.tcp_connect(dst0, 30080, SHORT) == Outcome::Ok,
            "lab: outsider -> {dst0}:30080"
        );
        ensure!(addrs0.contains(&one_peer("lab: outsider via node-0", &head_srv)?));
        ensure!(
            eg_worker.tcp_connect(dst1, 30090, SHORT) == Outcome::Ok,
            "lab: eg-worker -> {dst1}:30090"
        );
        ensure!(ul1.contains(&one_peer("lab: eg-worker via node-1", &foreign_srv)?));
    }

    server.apply(&namespace(&ns));
    server.apply(&namespace(&other));
    let (mut kubelets, mut sandboxes) = place_pods(&server, &topo, &placement, 101)?;
    for svc in &services {
        for doc in svc.manifests(&node_name) {
            server.apply(&doc);
        }
    }
    server.apply(&raycluster(&ns, "rc", json!({"mode": "DenyAll"})));
    server.apply(&raycluster(&ns, "eg", json!({"mode": "DenyAllEgress"})));

    let rigs = start_agents(&topo, &server, &mut kubelets, &mut sandboxes)?;
    for (i, rig) in rigs.iter().enumerate() {
        rig.agent
            .wait_ready(topo.node(i), Duration::from_secs(30))?;
    }
    let (agent0, agent1) = (&rigs[0].agent, &rigs[1].agent);
    let head_in = || drops(agent0, node0, &ns, "rc", "head", "ingress");
    let eg_out = || drops(agent1, node1, &ns, "eg", "worker", "egress");
    let (mut want_in, mut want_out) = (head_in(), eg_out());
    let denied = Duration::from_millis(700);
    let dropped = |what: &str, o: Outcome, srv: Option<&Server>| -> Result<()> {
        ensure!(o.is_blocked(), "{what}: not dropped ({o:?})");
        if let Some(srv) = srv {
            let seen = srv.take_peers(Duration::from_millis(50));
            ensure!(seen.is_empty(), "{what}: arrived from {seen:?}");
        }
        Ok(())
    };

    // The head's own node is the node; another node's host is an ordinary peer.
    ensure!(
        node0.tcp_connect(v4(head), PORT, SHORT) == Outcome::Ok,
        "node-0's kubelet -> head"
    );
    ensure!(addrs0.contains(&one_peer("node-0's kubelet", &head_srv)?));
    dropped(
        "node-1's host -> head",
        node1.tcp_connect(v4(head), PORT, denied),
        Some(&head_srv),
    )?;
    want_in += 1.0;
    // Through node-1's NodePort the head sees node-1's address: an ordinary peer.
    for dst in node1.ips() {
        dropped(
            &format!("outsider -> node-1 {dst}:30080"),
            outsider.tcp_connect(dst, 30080, denied),
            Some(&head_srv),
        )?;
        dropped(
            &format!("client -> node-1 {dst}:30080"),
            client.tcp_connect(dst, 30080, denied),
            Some(&head_srv),
        )?;
        want_in += 2.0;
    }
    // Local keeps the client's address.
    dropped(
        "client -> node-0:30081 (Local)",
        client.tcp_connect(node0.ip4.into(), 30081, denied),
        Some(&head_srv),
    )?;
    want_in += 1.0;
    expect_drops("head ingress, without node trust", want_in, head_in)?;
    // Egress of `eg` (DenyAllEgress) through its own node-1: its cluster's head on
    // node-0 and node-1's host pass; the pod directly does not.
    ensure!(
        eg_worker.tcp_connect(node1.ip4.into(), 30093, SHORT) == Outcome::Ok,
        "eg-worker -> node-1:30093 (eg-head)"
    );
    ensure!(
        eg_worker.tcp_connect(node1.ip4.into(), 10250, SHORT) == Outcome::Ok,
        "eg-worker -> node-1's host"
    );
    dropped(
        "eg-worker -> foreign directly",
        eg_worker.tcp_connect(v4(foreign), PORT, denied),
        Some(&foreign_srv),
    )?;
    want_out += 1.0;
    expect_drops("eg-worker egress, without node trust", want_out, eg_out)?;

    // What node trust adds: node-0's own NAT is judged by the original source.
    for dst in node0.ips() {
        dropped(
            &format!("outsider -> node-0 {dst}:30080"),
            outsider.tcp_connect(dst, 30080, denied),
            Some(&head_srv),
        )?;
        dropped(
            &format!("client -> node-0 {dst}:30080"),
            client.tcp_connect(dst, 30080, denied),
            Some(&head_srv),
        )?;
        want_in += 2.0;
    }
    expect_drops("head ingress, NATed by node-0", want_in, head_in)?;
    // And node-1's NodePort for a pod of another namespace on node-0 is that pod.
    for dst in node1.ips() {
        dropped(
            &format!("eg-worker -> node-1 {dst}:30090 (foreign)"),
            eg_worker.tcp_connect(dst, 30090, denied),
            Some(&foreign_srv),
        )?;
        want_out += 1.0;
    }
    expect_drops("eg-worker egress to foreign's NodePort", want_out, eg_out)?;

    // An ipBlock for the client opens node-0's NodePorts to it; through node-1 it
    // still arrives as node-1's address.
    let rule = json!([{"from": [
        {"ipBlock": {"cidr": format!("{}/32", client.ip4)}},
        {"ipBlock": {"cidr": format!("{}/128", client.ip6)}}],
        "ports": [{"protocol": "TCP", "port": PORT}]}]);
    server.apply(&raycluster(
        &ns,
        "rc",
        json!({"mode": "DenyAll", "head": {"ingressRules": rule}}),
    ));
    wait_outcome(
        "client -> node-0:30081 once its ipBlock is programmed",
        EDIT_WAIT,
        || client.tcp_connect(node0.ip4.into(), 30081, PROBE),
        true,
    )?;
    std::thread::sleep(Duration::from_millis(1200));
    head_srv.take_peers(Duration::from_millis(100));
    want_in = head_in();
    for dst in node0.ips() {
        ensure!(
            client.tcp_connect(dst, 30081, SHORT) == Outcome::Ok,
            "client -> node-0 {dst}:30081"
        );
        ensure!(
            client
                .ips()
                .contains(&one_peer("Local with the ipBlock", &head_srv)?)
        );
        ensure!(
            client.tcp_connect(dst, 30080, SHORT) == Outcome::Ok,
            "client -> node-0 {dst}:30080"
        );
        ensure!(addrs0.contains(&one_peer("Cluster with the ipBlock", &head_srv)?));
    }
    for dst in node1.ips() {
        dropped(
            &format!("client -> node-1 {dst}:30080 with its ipBlock"),
            client.tcp_connect(dst, 30080, denied),
            Some(&head_srv),
        )?;
        want_in += 1.0;
    }
    expect_drops("head ingress with the client's ipBlock", want_in, head_in)?;
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        head_in() == want_in && eg_out() == want_out,
        "drops nobody caused"
    );
    for rig in &rigs {
        alive(&rig.agent)?;
    }
    drop(rigs);
    drop(rt);
    Ok(())
}

/// Packets sent and received by `node`'s VXLAN devices, both families together.
fn vxlan_packets(node: &Node) -> Result<u64> {
    let devices = node.vxlan.as_ref().context("no VXLAN devices")?;
    let mut sum = 0;
    for dev in devices {
        let (rx, tx) = node.link_packets(dev)?;
        sum += rx + tx;
    }
    Ok(sum)
}

/// flannel's vxlan backend under two agents: the head of `rc` and a pod nobody
/// isolates on node-0, a worker of `rc` and an outsider on node-1. Every flow
/// between the nodes is encapsulated, and judged on the pods' veths all the same.
#[test]
fn two_nodes_over_vxlan_enforce_a_raycluster_split_between_them() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(FakeApiServer::start())?;
    server.install_crd("ray.io", "v1", "rayclusters");

    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "open"])?;
    topo.set_transport(Transport::Vxlan)?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "worker")?;
    topo.add_pod(n1, "outsider")?;
    let ns = format!("ray-{}", topo.tag());
    let placement: [Placement; 4] = [
        ("head", 0, head_labels("rc")),
        ("open", 0, vec![("app", "open")]),
        ("worker", n1, worker_labels("rc")),
        ("outsider", n1, vec![("app", "outsider")]),
    ];

    server.apply(&namespace(&ns));
    let (mut kubelets, mut sandboxes) =
        place_pods(&server, &topo, &in_namespace(&ns, &placement), 201)?;
    server.apply(&raycluster(&ns, "rc", json!({"mode": "DenyAll"})));

    let (node0, node1) = (topo.node(0), topo.node(n1));
    let (head, open, worker, outsider) = (
        topo.pod("head"),
        topo.pod("open"),
        topo.pod("worker"),
        topo.pod("outsider"),
    );
    let _servers = [
        head.serve_tcp(PORT)?,
        head.serve_udp(PORT)?,
        open.serve_tcp(PORT)?,
        worker.serve_tcp(PORT)?,
    ];
    for dst in head.ips() {
        ensure!(
            outsider.tcp_connect(dst, PORT, SHORT) == Outcome::Ok,
            "open before the agents: outsider -> head {dst}"
        );
    }

    let rigs = start_agents(&topo, &server, &mut kubelets, &mut sandboxes)?;
    for (i, rig) in rigs.iter().enumerate() {
        let ready = rig
            .agent
            .wait_ready(topo.node(i), Duration::from_secs(30))?;
        println!("node-{i}: agent ready after {ready:?}");
    }
    let agent0 = &rigs[0].agent;
    let head_in = || drops(agent0, node0, &ns, "rc", "head", "ingress");
    let mut want_in = head_in();
    let encapsulated = [vxlan_packets(node0)?, vxlan_packets(node1)?];

    // The RayCluster across the nodes: both ways, TCP v4 and v6, UDP.
    for (from, to) in [(worker, head), (head, worker)] {
        for dst in to.ips() {
            ensure!(
                from.tcp_connect(dst, PORT, SHORT) == Outcome::Ok,
                "{} -> {} ({dst}) TCP",
                from.name,
                to.name
            );
        }
    }
    for dst in head.ips() {
        ensure!(
            worker.udp_probe(dst, PORT, SHORT) == Outcome::Ok,
            "worker -> head ({dst}) UDP"
        );
    }
    // The outsider on node-1 is dropped by node-0's agent, one SYN each.
    let denied = Duration::from_millis(700);
    for dst in head.ips() {
        let o = outsider.tcp_connect(dst, PORT, denied);
        ensure!(
            o.is_blocked(),
            "outsider -> head ({dst}) not dropped ({o:?})"
        );
        want_in += 1.0;
    }
    expect_drops("head ingress from node-1's outsider", want_in, head_in)?;
    // A pod nobody isolates, on node-0: the outsider reaches it; the worker may
    // not leave its cluster (DenyAll isolates egress too), dropped and counted by
    // node-1's agent.
    let agent1 = &rigs[1].agent;
    let worker_out = || drops(agent1, node1, &ns, "rc", "worker", "egress");
    let mut want_out = worker_out();
    for dst in open.ips() {
        ensure!(
            outsider.tcp_connect(dst, PORT, SHORT) == Outcome::Ok,
            "outsider -> open ({dst})"
        );
        let o = worker.tcp_connect(dst, PORT, denied);
        ensure!(o.is_blocked(), "worker -> open ({dst}) not dropped ({o:?})");
        want_out += 1.0;
    }
    expect_drops("worker egress to node-0's open pod", want_out, worker_out)?;
    // All of it went through the VXLAN devices (an encapsulated packet counts
    // once on each node's device).
    for (i, node) in [node0, node1].into_iter().enumerate() {
        let now = vxlan_packets(node)?;
        println!(
            "node-{i}: its VXLAN devices carried {} packets",
            now - encapsulated[i]
        );
        ensure!(
            now >= encapsulated[i] + 20,
            "node-{i}: its VXLAN devices carried {} packets",
            now - encapsulated[i]
        );
    }
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        head_in() == want_in && worker_out() == want_out,
        "drops nobody caused"
    );
    for rig in &rigs {
        alive(&rig.agent)?;
    }
    drop(rigs);
    drop(rt);
    Ok(())
}

/// IPv6 ipBlock rules decided for pod traffic between two nodes, over host-gw.
#[test]
fn ipv6_ip_blocks_across_two_nodes_are_decided_by_the_pods_addresses() -> Result<()> {
    ipv6_ip_blocks_across_nodes(Transport::HostGw)
}

/// The same over flannel's vxlan backend (IPv6 pod traffic in flannel-v6.1).
#[test]
fn ipv6_ip_blocks_across_two_nodes_over_vxlan_are_decided_by_the_pods_addresses() -> Result<()> {
    ipv6_ip_blocks_across_nodes(Transport::Vxlan)
}

/// A RayCluster split over two nodes with IPv6 ipBlock rules naming the other node's
/// pod range with one address excepted: the head (node-0) admits `fd00:10:244:1::/64`
/// except `client-b`, TCP [`PORT`]; the worker (node-1) may reach
/// `fd00:10:244::/64` except `open-b`, TCP [`PORT`]. Directly and through IPv6
/// ClusterIPs (kube-proxy's DNAT on the client's node, pod sources kept), each
/// agent decides by the pods' IPv6 addresses; IPv4 is not covered by the rules.
/// The Services are dual-stack: each ClusterIP is decided on the backends of its own
/// family (kube-proxy DNATs it to no other), so the IPv6-only rule allows the IPv6
/// ClusterIP and still drops the IPv4 one.
fn ipv6_ip_blocks_across_nodes(transport: Transport) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(FakeApiServer::start())?;
    server.install_crd("ray.io", "v1", "rayclusters");

    // node-0: the head and two pods nobody isolates; node-1: the worker and two
    // clients.
    let mut topo =
        Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "open-a", "open-b"])?;
    topo.set_transport(transport)?;
    let n1 = topo.add_node()?;
    for pod in ["worker", "client-a", "client-b"] {
        topo.add_pod(n1, pod)?;
    }
    let ns = format!("ray-{}", topo.tag());
    let placement: [Placement; 6] = [
        ("head", 0, head_labels("rc")),
        ("open-a", 0, vec![("app", "open")]),
        ("open-b", 0, vec![("app", "open")]),
        ("worker", n1, worker_labels("rc")),
        ("client-a", n1, vec![("app", "client")]),
        ("client-b", n1, vec![("app", "client")]),
    ];
    let (node0, node1) = (topo.node(0), topo.node(n1));
    let [head, open_a, open_b, worker, client_a, client_b] =
        ["head", "open-a", "open-b", "worker", "client-a", "client-b"].map(|p| topo.pod(p));
    // IPv6 ClusterIPs (with IPv4 ones) for the head and for each open pod.
    let service = |name: &str, pod: &Pod, node_port, ip: u8| {
        let mut svc = NodePortService::tcp(&ns, name, PORT, node_port);
        svc.cluster_ips = vec![
            format!("10.96.5.{ip}").parse().expect("ip"),
            format!("fd00:10:96::5:{ip}").parse().expect("ip"),
        ];
        svc.endpoints.push(Endpoint::of(&ns, pod));
        svc
    };
    let services = [
        service("head-svc", head, 30501, 1),
        service("open-a-svc", open_a, 30502, 2),
        service("open-b-svc", open_b, 30503, 3),
    ];
    for svc in &services {
        topo.install_node_port(svc)?;
    }
    let cluster_ip6 = |svc: &NodePortService| -> Result<IpAddr> {
        svc.cluster_ips
            .iter()
            .copied()
            .find(IpAddr::is_ipv6)
            .context("an IPv6 ClusterIP")
    };
    let [head_svc, open_a_svc, open_b_svc] = [
        cluster_ip6(&services[0])?,
        cluster_ip6(&services[1])?,
        cluster_ip6(&services[2])?,
    ];
    let open_a_svc4 = services[1]
        .cluster_ips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .context("an IPv4 ClusterIP")?;
    let _servers = [
        head.serve_tcp(PORT)?,
        open_a.serve_tcp(PORT)?,
        open_b.serve_tcp(PORT)?,
    ];
    // The lab, before any agent: every path answers, directly and through the
    // ClusterIPs, on both nodes.
    for (from, to) in [
        (client_a, head_svc),
        (client_b, head_svc),
        (worker, open_a_svc),
        (worker, open_b_svc),
        (client_a, head.ip6.into()),
        (worker, open_b.ip6.into()),
        (worker, open_a_svc4),
    ] {
        wait_outcome(
            &format!("lab: {} -> {to}", from.name),
            EDIT_WAIT,
            || from.tcp_connect(to, PORT, SHORT),
            true,
        )?;
    }

    server.apply(&namespace(&ns));
    let (mut kubelets, mut sandboxes) =
        place_pods(&server, &topo, &in_namespace(&ns, &placement), 301)?;
    for svc in &services {
        for doc in svc.manifests(&node_name) {
            server.apply(&doc);
        }
    }
    let block = |net: (std::net::Ipv6Addr, u8), except: &Pod| {
        json!({"ipBlock": {"cidr": format!("{}/{}", net.0, net.1),
                           "except": [format!("{}/128", except.ip6)]}})
    };
    let ports = json!([{"protocol": "TCP", "port": PORT}]);
    server.apply(&raycluster(
        &ns,
        "rc",
        json!({"mode": "DenyAll",
               "head": {"ingressRules": [{"from": [block(node1.pod_cidr6, client_b)], "ports": ports}]},
               "worker": {"egressRules": [{"to": [block(node0.pod_cidr6, open_b)],
                                           "ports": ports}]}}),
    ));

    let rigs = start_agents(&topo, &server, &mut kubelets, &mut sandboxes)?;
    for (i, rig) in rigs.iter().enumerate() {
        rig.agent
            .wait_ready(topo.node(i), Duration::from_secs(30))?;
    }
    let (agent0, agent1) = (&rigs[0].agent, &rigs[1].agent);
    let head_in = || drops(agent0, node0, &ns, "rc", "head", "ingress");
    let worker_out = || drops(agent1, node1, &ns, "rc", "worker", "egress");
    let (mut want_in, mut want_out) = (head_in(), worker_out());
    let denied = Duration::from_millis(700);
    let pass = |what: &str, o: Outcome| -> Result<()> {
        ensure!(o == Outcome::Ok, "{what}: {o:?}");
        Ok(())
    };
    let blocked = |what: &str, o: Outcome| -> Result<()> {
        ensure!(o.is_blocked(), "{what}: not dropped ({o:?})");
        Ok(())
    };
    let head6: IpAddr = head.ip6.into();

    // Ingress to the head on node-0, from node-1's pods.
    pass(
        "client-a -> head (v6)",
        client_a.tcp_connect(head6, PORT, SHORT),
    )?;
    pass(
        "client-a -> head's ClusterIP (v6)",
        client_a.tcp_connect(head_svc, PORT, SHORT),
    )?;
    pass(
        "worker -> head (v6, same cluster)",
        worker.tcp_connect(head6, PORT, SHORT),
    )?;
    for (what, o) in [
        (
            "client-b -> head (v6, excepted)",
            client_b.tcp_connect(head6, PORT, denied),
        ),
        (
            "client-b -> head's ClusterIP (v6, excepted)",
            client_b.tcp_connect(head_svc, PORT, denied),
        ),
        (
            "client-a -> head (v4: no IPv4 block)",
            client_a.tcp_connect(v4(head), PORT, denied),
        ),
    ] {
        blocked(what, o)?;
        want_in += 1.0;
    }
    expect_drops("head ingress from node-1's pods", want_in, head_in)?;

    // Egress of the worker on node-1, to node-0's pods. Each ClusterIP of the
    // dual-stack Services is decided on the backends of its own family only.
    pass(
        "worker -> open-a (v6)",
        worker.tcp_connect(open_a.ip6.into(), PORT, SHORT),
    )?;
    pass(
        "worker -> open-a's ClusterIP (v6)",
        worker.tcp_connect(open_a_svc, PORT, SHORT),
    )?;
    for (what, o) in [
        (
            "worker -> open-b (v6, excepted)",
            worker.tcp_connect(open_b.ip6.into(), PORT, denied),
        ),
        (
            "worker -> open-b's ClusterIP (v6, excepted)",
            worker.tcp_connect(open_b_svc, PORT, denied),
        ),
        (
            "worker -> open-a (v4: no IPv4 block)",
            worker.tcp_connect(v4(open_a), PORT, denied),
        ),
        (
            "worker -> open-a's ClusterIP (v4: its IPv4 backend is not allowed)",
            worker.tcp_connect(open_a_svc4, PORT, denied),
        ),
    ] {
        blocked(what, o)?;
        want_out += 1.0;
    }
    expect_drops("worker egress to node-0's pods", want_out, worker_out)?;
    if transport == Transport::Vxlan {
        for node in [node0, node1] {
            let carried = vxlan_packets(node)?;
            ensure!(
                carried > 20,
                "node-{}: {carried} packets over VXLAN",
                node.index
            );
        }
    }
    std::thread::sleep(Duration::from_millis(1200));
    ensure!(
        head_in() == want_in && worker_out() == want_out,
        "drops nobody caused"
    );
    for rig in &rigs {
        alive(&rig.agent)?;
    }
    drop(rigs);
    drop(rt);
    Ok(())
}
