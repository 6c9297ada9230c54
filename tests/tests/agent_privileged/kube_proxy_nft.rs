//! End to end with kube-proxy in its nftables mode (Kubernetes 1.31+: tables `ip
//! kube-proxy` and `ip6 kube-proxy` instead of iptables' `KUBE-*` chains), the real
//! `rayfence agent` on a simulated bridged node (TC hook):
//!
//! - egress to a ClusterIP is decided on the Service's backends: a Service whose
//!   backend the policy allows passes, one whose backend it does not is dropped and
//!   counted; a held connection through the ClusterIP is cut when the policy stops
//!   allowing the backend, and when the Service's EndpointSlice moves it to a
//!   backend the policy does not allow (kube-proxy re-synced as it would be);
//! - "what counts as the node" (`node_trust.rs`'s cases, run here in nftables
//!   mode): NodePort traffic from outside and from other pods is not the node, a
//!   hostPort keeps its client, the node's own processes are the node.
//!
//! The ClusterIP case also runs in iptables mode, so both modes are held to the
//! same expectations, and with the ClusterIPs bound to `kube-ipvs0` as kube-proxy's
//! IPVS mode binds them (IPVS itself cannot run here: the kernel has no `IP_VS`). Nothing in the agent knows which mode the node runs: the
//! ClusterIP rows are compiled from the Services and EndpointSlices and decided
//! on the pod's hook before any NAT, and what the ingress side needs of NAT it
//! asks the kernel's conntrack, which both modes feed. Needs root.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::agent::{Agent, AgentOptions, Bpffs, Manifests, metric_sum};
use rayfence_tests::kubelet::{KubeletTree, QosClass};
use rayfence_tests::node_nat::{self, Endpoint, KubeProxyMode, NodePortService};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::{Layout, Outcome, Server, Topology, probe_bin};
use serde_json::{Value, json};

use crate::node_trust::{self, Hook};

const NODE: &str = "node-a";
const OK: Duration = Duration::from_secs(1);
/// Denied TCP: shorter than the first SYN retransmission, so one packet.
const DENIED: Duration = Duration::from_millis(700);
const PORT: u16 = 8000;
/// How long an edit may take to reach the datapath.
const EDIT: Duration = Duration::from_secs(10);

static RIGS: AtomicU32 = AtomicU32::new(0);

/// A pod of the test: topology name, Kubernetes namespace, labels.
type PodSpec<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// DenyAllEgress, with (or without) a rule for head and workers to `db` in the
/// other namespace on [`PORT`].
fn policy(other_ns: &str, allow_db: bool) -> Value {
    if !allow_db {
        return json!({"mode": "DenyAllEgress"});
    }
    let rule = json!({
        "to": [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": other_ns}},
            "podSelector": {"matchLabels": {"app": "db"}},
        }],
        "ports": [{"protocol": "TCP", "port": PORT}],
    });
    json!({"mode": "DenyAllEgress", "head": {"egressRules": [rule]},
           "worker": {"egressRules": [rule]}})
}

/// Egress drops of `role` of RayCluster `rc` on `/metrics`.
fn egress_drops(agent: &Agent, topo: &Topology, ns: &str, role: &str) -> f64 {
    agent
        .http_get(topo.node(0), "/metrics")
        .map(|(_, body)| {
            metric_sum(
                &body,
                "rayfence_drops_total",
                &[
                    ("pod_namespace", ns),
                    ("raycluster", "rc"),
                    ("role", role),
                    ("direction", "egress"),
                ],
            )
        })
        .unwrap_or(0.0)
}

/// Waits (counters are published every second) until the count is `want`, and
/// checks it is exactly that.
fn expect_drops(what: &str, want: f64, read: impl Fn() -> f64) -> Result<()> {
    let t0 = Instant::now();
    let mut now = read();
    while now < want && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        now = read();
    }
    std::thread::sleep(Duration::from_millis(1200));
    let now = read().max(now);
    ensure!(now == want, "{what}: egress drops {now}, expected {want}");
    Ok(())
}

fn dropped(what: &str, o: Outcome, srv: &Server) -> Result<()> {
    ensure!(o.is_blocked(), "{what}: not dropped ({o:?})");
    let seen = srv.take_peers(Duration::from_millis(50));
    ensure!(seen.is_empty(), "{what}: arrived from {seen:?}");
    Ok(())
}

/// Waits until a round trip over `held` fails: the connection was cut.
fn wait_cut(what: &str, held: &mut rayfence_tests::HeldConnection) -> Result<Duration> {
    let t0 = Instant::now();
    while held.roundtrip() {
        ensure!(
            t0.elapsed() < EDIT,
            "{what}: still carries traffic after {EDIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t0.elapsed())
}

/// `ipvs_addresses`: the ClusterIPs are also bound to `kube-ipvs0`, as kube-proxy's
/// IPVS mode binds them (local addresses of the node), the DNAT staying with
/// `mode`'s rules.
fn cluster_ip_egress_is_decided_on_the_backend_and_revoked(
    mode: KubeProxyMode,
    ipvs_addresses: bool,
) -> Result<()> {
    let rig_no = RIGS.fetch_add(1, Ordering::Relaxed);
    let uid = |n: u32| {
        format!(
            "c1a5{rig_no:02x}{n:02x}-aaaa-4bbb-8ccc-{:012x}",
            std::process::id()
        )
    };
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "worker"])?;
    topo.add_pod(0, "db")?;
    topo.add_pod(0, "foreign")?;
    let tag = topo.tag().to_owned();
    let (ns, other) = (format!("ray-{tag}"), format!("other-{tag}"));

    let kubelet = KubeletTree::new(rayfence_tests::kubelet::CgroupDriver::Cgroupfs)?;
    let mut docs = vec![
        namespace(&ns),
        namespace(&other),
        node_object(NODE, topo.node(0)),
    ];
    let pods: [PodSpec; 4] = [
        ("head", &ns, head_labels("rc")),
        ("worker", &ns, worker_labels("rc")),
        ("db", &other, vec![("app", "db")]),
        ("foreign", &other, vec![("app", "foreign")]),
    ];
    let mut servers = Vec::new();
    for (i, (name, pod_ns, labels)) in pods.iter().enumerate() {
        let pod = topo.pod(name);
        let uid = uid(i as u32);
        let ctr = kubelet.pod_cgroup(&uid, QosClass::Burstable)?;
        pod.set_cgroup_dir(Some(&ctr));
        servers.push(pod.serve_tcp(9)?);
        docs.push(pod_object(pod_ns, pod, &uid, NODE, labels));
    }
    servers.push(topo.pod("head").serve_tcp(PORT)?);
    let db_srv = topo.pod("db").prober().serve_tcp_recording(PORT)?;
    let foreign_srv = topo.pod("foreign").prober().serve_tcp_recording(PORT)?;

    // kube-proxy: two Services in the other namespace, one per backend.
    node_nat::set_kube_proxy_mode(topo.nodes(), mode)?;
    let service = |name: &str, backend: &str, node_port: u16, ip: u8| {
        let mut svc = NodePortService::tcp(&other, name, PORT, node_port);
        svc.cluster_ips = vec![
            format!("10.96.5.{ip}").parse().expect("ip"),
            format!("fd00:10:96::5:{ip}").parse().expect("ip"),
        ];
        svc.endpoints.push(Endpoint::of(&other, topo.pod(backend)));
        svc
    };
    let db_svc = service("db", "db", 30100, 1);
    let foreign_svc = service("foreign", "foreign", 30101, 2);
    let service_docs = |svcs: &[&NodePortService]| -> Vec<Value> {
        svcs.iter()
            .flat_map(|s| s.manifests(&|_| NODE.to_owned()))
            .collect()
    };
    for svc in [&db_svc, &foreign_svc] {
        topo.install_node_port(svc)?;
        if ipvs_addresses {
            node_nat::bind_to_kube_ipvs0(topo.node(0), &svc.cluster_ips)?;
        }
    }
    ensure!(node_nat::kube_proxy_mode(topo.node(0)) == mode);

    // The lab before any policy: both ClusterIPs lead to their backend, DNAT only.
    let worker = topo.pod("worker");
    for (svc, srv) in [(&db_svc, &db_srv), (&foreign_svc, &foreign_srv)] {
        for ip in &svc.cluster_ips {
            let o = worker.tcp_connect(*ip, PORT, OK);
            ensure!(o == Outcome::Ok, "lab {mode:?}: worker -> {ip}: {o:?}");
            let seen = srv.take_peers(OK);
            ensure!(
                seen.len() == 1 && worker.ips().contains(&seen[0]),
                "lab {mode:?}: {} saw {seen:?}",
                svc.name
            );
        }
    }

    let manifests = Manifests::new()?;
    manifests.write("all.yaml", &docs)?;
    manifests.write("svc.yaml", &service_docs(&[&db_svc, &foreign_svc]))?;
    manifests.write("rc.yaml", &[raycluster(&ns, "rc", policy(&other, true))])?;
    let bpffs = Bpffs::new();
    let agent = Agent::start(&AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &manifests.dir,
        bpffs: &bpffs.path,
        cgroup_root: kubelet.root(),
        kubeconfig: None,
        extra_args: &[],
    })?;
    agent.wait_ready(topo.node(0), Duration::from_secs(30))?;
    agent.wait_log(
        &["endpoint attached", "hook=\"tc\"", &format!("{ns}/worker")],
        Duration::from_secs(10),
    )?;
    let drops = || egress_drops(&agent, &topo, &ns, "worker");
    let expected = drops() + 2.0;

    // Decided on the backend: db's Service passes, foreign's is dropped.
    for ip in &db_svc.cluster_ips {
        let o = worker.tcp_connect(*ip, PORT, OK);
        ensure!(
            o == Outcome::Ok,
            "{mode:?}: worker -> db's ClusterIP {ip}: {o:?}"
        );
        ensure!(worker.ips().contains(&db_srv.take_peers(OK)[0]));
    }
    for ip in &foreign_svc.cluster_ips {
        let o = worker.tcp_connect(*ip, PORT, DENIED);
        dropped(
            &format!("{mode:?}: worker -> foreign's ClusterIP {ip}"),
            o,
            &foreign_srv,
        )?;
    }
    expect_drops("foreign's ClusterIPs", expected, drops)?;
    let o = topo
        .pod("head")
        .tcp_connect(db_svc.cluster_ips[1], PORT, OK);
    ensure!(o == Outcome::Ok, "{mode:?}: head -> db's ClusterIP: {o:?}");
    db_srv.take_peers(OK);

    // Revoked by the policy: the held connection through the ClusterIP is cut.
    let db4 = db_svc.cluster_ips[0];
    let mut held = worker.tcp_hold(db4, PORT, Duration::from_millis(500))?;
    ensure!(
        held.roundtrip(),
        "{mode:?}: held connection to db's ClusterIP"
    );
    db_srv
        .take_peers_exactly(1, OK)
        .context("the held connection")?;
    manifests.write("rc.yaml", &[raycluster(&ns, "rc", policy(&other, false))])?;
    let took = wait_cut(&format!("{mode:?}: held after the rule went"), &mut held)?;
    println!("{mode:?}: the held ClusterIP connection was cut {took:?} after the policy edit");
    drop(held);
    let o = worker.tcp_connect(db4, PORT, DENIED);
    dropped(
        &format!("{mode:?}: worker -> db's ClusterIP, rule gone"),
        o,
        &db_srv,
    )?;

    // Revoked by the endpoints: db's Service now leads to foreign.
    manifests.write("rc.yaml", &[raycluster(&ns, "rc", policy(&other, true))])?;
    wait_outcome(
        "db's ClusterIP once the rule is back",
        EDIT,
        || worker.tcp_connect(db4, PORT, DENIED),
        true,
    )?;
    let mut held = worker.tcp_hold(db4, PORT, Duration::from_millis(500))?;
    ensure!(
        held.roundtrip(),
        "{mode:?}: held connection to db's ClusterIP, again"
    );
    // The probe that saw the rule back, and the held connection.
    db_srv
        .take_peers_exactly(2, OK)
        .context("the probe and the held connection")?;
    let mut moved = db_svc.clone();
    moved.endpoints = vec![Endpoint::of(&other, topo.pod("foreign"))];
    topo.install_node_port(&moved)?;
    manifests.write("svc.yaml", &service_docs(&[&moved, &foreign_svc]))?;
    let took = wait_cut(
        &format!("{mode:?}: held after the endpoint moved"),
        &mut held,
    )?;
    println!(
        "{mode:?}: the held ClusterIP connection was cut {took:?} after the EndpointSlice edit"
    );
    // New connections to the moved Service are dropped. Counted on the head, which
    // held no connection (the worker's cut one keeps retransmitting into drops).
    let head = topo.pod("head");
    let head_drops = || egress_drops(&agent, &topo, &ns, "head");
    let expected = head_drops() + 2.0;
    for ip in &moved.cluster_ips {
        let o = head.tcp_connect(*ip, PORT, DENIED);
        dropped(
            &format!("{mode:?}: head -> moved ClusterIP {ip}"),
            o,
            &foreign_srv,
        )?;
    }
    expect_drops("the moved Service", expected, head_drops)?;
    drop(held);
    let late = db_srv.take_peers(Duration::from_millis(100));
    ensure!(late.is_empty(), "{mode:?}: db still reached from {late:?}");
    // The pod IP of db is still allowed directly.
    let db_ip: IpAddr = topo.pod("db").ip4.into();
    let o = worker.tcp_connect(db_ip, PORT, OK);
    ensure!(o == Outcome::Ok, "{mode:?}: worker -> db directly: {o:?}");
    drop(servers);
    Ok(())
}

#[test]
fn nftables_mode_cluster_ip_egress_is_decided_on_the_backend_and_revoked() -> Result<()> {
    cluster_ip_egress_is_decided_on_the_backend_and_revoked(KubeProxyMode::Nftables, false)
}

#[test]
fn iptables_mode_cluster_ip_egress_is_decided_on_the_backend_and_revoked() -> Result<()> {
    cluster_ip_egress_is_decided_on_the_backend_and_revoked(KubeProxyMode::Iptables, false)
}

/// IPVS mode, as far as this kernel allows (no `IP_VS`): its ClusterIPs are local
/// addresses of the node, on `kube-ipvs0`. They must keep their Service's identity:
/// were they taken for the node's own addresses, egress to any Service would be
/// "the node".
#[test]
fn cluster_ips_bound_to_kube_ipvs0_are_still_decided_on_the_backend_and_revoked() -> Result<()> {
    cluster_ip_egress_is_decided_on_the_backend_and_revoked(KubeProxyMode::Nftables, true)
}

// --- what counts as the node, in nftables mode (node_trust.rs's cases) ---

#[test]
fn nftables_mode_node_port_from_outside_and_from_a_pod_to_a_deny_all_head_is_dropped_tc()
-> Result<()> {
    node_trust::node_port_to_a_deny_all_head_is_dropped(Hook::Tc, KubeProxyMode::Nftables)
}

#[test]
fn nftables_mode_node_port_from_outside_and_from_a_pod_to_a_deny_all_head_is_dropped_cgroup()
-> Result<()> {
    node_trust::node_port_to_a_deny_all_head_is_dropped(Hook::Cgroup, KubeProxyMode::Nftables)
}

#[test]
fn nftables_mode_an_ip_block_for_the_external_client_opens_the_node_port_to_it_alone_tc()
-> Result<()> {
    node_trust::ip_block_for_the_client_opens_the_node_port_to_it_alone(
        Hook::Tc,
        KubeProxyMode::Nftables,
    )
}

#[test]
fn nftables_mode_an_ip_block_for_the_external_client_opens_only_the_local_node_port_on_the_cgroup_hook()
-> Result<()> {
    node_trust::ip_block_for_the_client_opens_the_node_port_to_it_alone(
        Hook::Cgroup,
        KubeProxyMode::Nftables,
    )
}

#[test]
fn nftables_mode_the_kubelet_probe_from_the_node_still_passes_to_head_and_workers_tc() -> Result<()>
{
    node_trust::kubelet_probe(Hook::Tc, KubeProxyMode::Nftables)
}

#[test]
fn nftables_mode_an_egress_isolated_pod_reaches_through_its_node_only_what_it_may_reach_directly_tc()
-> Result<()> {
    node_trust::egress_through_the_node(Hook::Tc, KubeProxyMode::Nftables)
}

#[test]
fn nftables_mode_a_host_network_pod_is_dropped_by_a_deny_all_head_unless_a_rule_selects_it_tc()
-> Result<()> {
    node_trust::host_network_pods(Hook::Tc, KubeProxyMode::Nftables)
}
