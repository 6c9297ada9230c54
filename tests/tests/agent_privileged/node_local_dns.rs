//! NodeLocal DNSCache under the agent (docs/semantics.md, the DNS base flow): the
//! cache's `nodelocaldns` device on the node holds 169.254.20.10 and
//! fd00:10:ffff::a, its hostNetwork pod (`kube-system`, `k8s-app: node-local-dns`,
//! declaring UDP and TCP 53 and 9253 as its DaemonSet does) answers port 53 there, and
//! Ray pods send their queries to it.
//!
//! - Without `--dns-node-local` the cache's address is one of the node's and its port
//!   53 the hostNetwork pod's, which no rule of a DenyAll RayCluster selects: the
//!   queries are dropped (why the flag exists).
//! - With it, UDP and TCP 53 to the cache pass, over IPv4 and IPv6, with the DNS
//!   Service kube-dns or with `--dns-service` naming another Service; anything else
//!   to the cache's address, and port 53 on the node's own address, is dropped and
//!   counted; the node's own processes stay reachable. The CNI guard's DNS map
//!   (`RF_GUARDDNS_V1`) holds the cache's addresses, so a pod held by the guard can
//!   resolve too: a new pod it holds (its Pod object not seen yet) reaches the cache
//!   on port 53 and nothing else there.
//! - Its iptables mode: the cache also binds kube-dns's ClusterIPs on its device
//!   (with NOTRACK rules, so kube-proxy's DNAT never applies): a query to the
//!   ClusterIP is answered on the node and passes as the DNS Service, not as the
//!   node, whether or not `--dns-node-local` names the ClusterIP.
//!
//! Needs root (network namespaces, bpffs, cgroups). Guards kill the agents and run
//! `rayfence cleanup` even when a test panics.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use rayfence::datapath::paths;
use rayfence_common::{Addr, Direction, map_names};
use rayfence_tests::kubelet::NodeLocalDns;
use rayfence_tests::objects::json::{head_labels, namespace, worker_labels};
use rayfence_tests::pinned;
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::topology::{HostIfNames, NODE_LOCAL_DNS4, NODE_LOCAL_DNS6};
use rayfence_tests::{Layout, Topology, probe_bin};
use serde_json::{Value, json};

use super::cni_guard::cni;
use super::routed::{DENIED, Placement, Rig, SHORT, allowed, dropped, node_name};

/// kube-dns's ClusterIPs.
const KUBE_DNS: [&str; 2] = ["10.96.0.10", "fd00:10:96::a"];
/// The cache's metrics port (declared by its pod, served here).
const METRICS: u16 = 9253;
/// The node's own process (the kubelet's port).
const KUBELET: u16 = 10250;

/// Which variant of the setup one test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// No `--dns-node-local`: the cache is the node's address and its pod's port.
    WithoutTheFlag,
    /// `--dns-node-local` with the default `--dns-service kube-system/kube-dns`.
    WithTheFlag,
    /// `--dns-node-local` and `--dns-service` naming another Service.
    OtherDnsService,
    /// The cache also binds kube-dns's ClusterIPs on its device.
    ClusterIpOnTheNode,
    /// `--dns-node-local`, and a new pod the CNI guard holds (no Pod object yet).
    Guarded,
}

/// kube-dns as the API server lists it: its ClusterIPs, one CoreDNS replica on
/// another node.
fn kube_dns() -> Vec<Value> {
    let ports = json!([
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]);
    let slice_ports = json!([
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]);
    let coredns = ["10.244.9.10", "fd00:10:244:9::a"];
    let mut docs = vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kube-dns", "namespace": "kube-system", "uid": "svc-kube-dns"},
               "spec": {"type": "ClusterIP", "clusterIP": KUBE_DNS[0], "clusterIPs": KUBE_DNS,
                        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                        "ports": ports}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "coredns-1", "namespace": "kube-system",
                            "uid": "coredns-1-uid", "labels": {"k8s-app": "kube-dns"}},
               "spec": {"nodeName": "node-9", "containers": [{"name": "c", "image": "x"}]},
               "status": {"phase": "Running", "podIP": coredns[0],
                          "podIPs": [{"ip": coredns[0]}, {"ip": coredns[1]}]}}),
    ];
    for (family, address) in ["IPv4", "IPv6"].into_iter().zip(coredns) {
        docs.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("kube-dns-{}", family.to_lowercase()),
                         "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "kube-dns"}},
            "addressType": family,
            "endpoints": [{"addresses": [address],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "nodeName": "node-9",
                           "targetRef": {"kind": "Pod", "namespace": "kube-system", "name": "coredns-1"}}],
            "ports": slice_ports,
        }));
    }
    docs
}

/// The addresses in the pinned CNI guard DNS map under `bpffs`.
fn guard_dns(bpffs: &std::path::Path) -> Result<BTreeSet<IpAddr>> {
    let path = paths::map(bpffs, map_names::GUARD_DNS);
    let map = pinned::Map::open(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(map
        .keys(size_of::<Addr>())?
        .into_iter()
        .map(|key| {
            let v6 = Ipv6Addr::from(pinned::from_bytes::<Addr>(&key));
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        })
        .collect())
}

/// One node (flannel-like, or routed with Calico's names), a DenyAll RayCluster
/// (head, worker), NodeLocal DNSCache, the agent started as `case` says.
fn node_local_dns(case: Case, layout: Layout) -> Result<()> {
    let mut topo = Topology::new(layout, probe_bin())?;
    if layout == Layout::Routed {
        topo.set_host_if_names(HostIfNames::Calico)?;
    }
    let placement: [Placement; 2] = [
        ("head", 0, head_labels("rc")),
        ("worker", 0, worker_labels("rc")),
    ];
    let mut rig = Rig::new(topo, &placement, json!({"mode": "DenyAll"}))?;
    let cache_ips: Vec<IpAddr> = vec![NODE_LOCAL_DNS4.into(), NODE_LOCAL_DNS6.into()];
    let kube_dns_ips: Vec<IpAddr> = KUBE_DNS
        .iter()
        .map(|ip| ip.parse())
        .collect::<Result<_, _>>()?;
    let mut on_device = cache_ips.clone();
    if case == Case::ClusterIpOnTheNode {
        on_device.extend(&kube_dns_ips);
    }
    let node = rig.topo.node(0);
    node.add_node_local_dns_interface(&on_device)?;
    let cache = NodeLocalDns::start(
        &rig.kubelets[0],
        node,
        "kube-system",
        &format!("node-local-dns-{}", rig.topo.tag()),
        &rayfence_tests::agent::uid(0x7d0),
        &cache_ips,
    )?;
    let servers = [cache.pod.serve_tcp(METRICS)?, node.serve_tcp(KUBELET)?];
    for server in servers {
        rig.keep(server);
    }
    let mut docs = vec![namespace("kube-system"), cache.manifest(&node_name(0))];
    docs.extend(kube_dns());
    rig.add_docs(docs);

    // Where the pods query: the cache, and kube-dns's ClusterIPs where the cache
    // answers them.
    let mut answered_here = cache_ips.clone();
    if case == Case::ClusterIpOnTheNode {
        answered_here.extend(&kube_dns_ips);
    }
    let (head, worker) = (rig.pod("head"), rig.pod("worker"));
    for dst in &answered_here {
        for pod in [head, worker] {
            wait_outcome(
                &format!("lab: {} -> {dst}:53 UDP", pod.name),
                std::time::Duration::from_secs(10),
                || pod.udp_probe(*dst, 53, SHORT),
                true,
            )?;
            allowed(
                &format!("lab: {} -> {dst}:53 TCP", pod.name),
                pod.tcp_connect(*dst, 53, SHORT),
            )?;
        }
    }

    let flag = cache.flag_value();
    let mut args = vec!["--dns-mode", "service"];
    match case {
        Case::WithoutTheFlag => {}
        Case::WithTheFlag | Case::ClusterIpOnTheNode | Case::Guarded => {
            args.extend(["--dns-node-local", &flag]);
        }
        Case::OtherDnsService => args.extend([
            "--dns-node-local",
            &flag,
            "--dns-service",
            "dns-system/resolver",
        ]),
    }
    rig.start(&args)?;
    if case != Case::WithoutTheFlag {
        let log = rig.agents[0].log_text();
        ensure!(
            log.lines()
                .any(|l| l.contains("DNS base flow") && l.contains(&flag))
                && !log.contains("no device of this node holds"),
            "the agent's start-up log on the DNS base flow:\n{log}"
        );
    }
    if case == Case::Guarded {
        return guarded_pod_queries_the_cache(rig, &cache_ips);
    }
    let (head, worker) = (rig.pod("head"), rig.pod("worker"));
    let node = rig.topo.node(0);
    let mut want = super::routed::Tally::now(&rig)?;

    if case == Case::WithoutTheFlag {
        for dst in &cache_ips {
            dropped(
                &format!("head -> {dst}:53 TCP without --dns-node-local"),
                head.tcp_connect(*dst, 53, DENIED),
            )?;
            want.add(0, Direction::Egress);
        }
        want.check(&rig, "without --dns-node-local")?;
        let guard = guard_dns(&rig.bpffs[0].path)?;
        ensure!(
            cache_ips.iter().all(|ip| !guard.contains(ip)),
            "the guard's DNS map holds the cache without the flag: {guard:?}"
        );
        return rig.alive();
    }

    // The queries pass, both protocols, both families, from both roles.
    for dst in &answered_here {
        for pod in [head, worker] {
            allowed(
                &format!("{} -> {dst}:53 UDP", pod.name),
                pod.udp_probe(*dst, 53, SHORT),
            )?;
            allowed(
                &format!("{} -> {dst}:53 TCP", pod.name),
                pod.tcp_connect(*dst, 53, SHORT),
            )?;
        }
        // Nothing else there: the cache's metrics, dropped and counted.
        dropped(
            &format!("head -> {dst}:{METRICS}"),
            head.tcp_connect(*dst, METRICS, DENIED),
        )?;
        want.add(0, Direction::Egress);
    }
    // The node's own address: port 53 is the cache's pod there (no rule selects
    // it); the kubelet's port is the node.
    for dst in node.ips() {
        dropped(
            &format!("head -> the node {dst}:53 TCP"),
            head.tcp_connect(dst, 53, DENIED),
        )?;
        want.add(0, Direction::Egress);
        allowed(
            &format!("head -> the node {dst}:{KUBELET}"),
            head.tcp_connect(dst, KUBELET, SHORT),
        )?;
    }
    want.check(&rig, &format!("{case:?}"))?;
    // A pod the CNI guard holds may query the cache too.
    let guard = guard_dns(&rig.bpffs[0].path)?;
    for ip in &cache_ips {
        ensure!(
            guard.contains(ip),
            "the guard's DNS map lacks {ip}: {guard:?}"
        );
    }
    let kube_dns_listed = kube_dns_ips.iter().all(|ip| guard.contains(ip));
    ensure!(
        kube_dns_listed == (case != Case::OtherDnsService),
        "{case:?}: the guard's DNS map is {guard:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1200));
    want.check(&rig, "settled")?;
    rig.alive()
}

/// A pod whose sandbox the runtime just made, in the RayCluster's (guarded)
/// namespace, its Pod object not seen yet: the CNI guard holds it, and it may query
/// the cache (and nothing else there, nor port 53 on the node's own address).
fn guarded_pod_queries_the_cache(mut rig: Rig, cache_ips: &[IpAddr]) -> Result<()> {
    rig.agents[0].wait_log(
        &["namespaces whose new pods the CNI plugin guards", &rig.ns],
        std::time::Duration::from_secs(5),
    )?;
    rig.topo.add_pod(0, "late")?;
    let late = rig.topo.pod("late");
    let node = rig.topo.node(0);
    let (ok, printed) = cni("ADD", node, late, &rig.ns, &rig.bpffs[0].path)?;
    ensure!(ok, "CNI ADD of the late pod failed: {printed}");
    let mut want = super::routed::Tally::now(&rig)?;
    for dst in cache_ips {
        wait_outcome(
            &format!("guarded late -> {dst}:53 UDP"),
            std::time::Duration::from_secs(5),
            || late.udp_probe(*dst, 53, SHORT),
            true,
        )?;
        allowed(
            &format!("guarded late -> {dst}:53 TCP"),
            late.tcp_connect(*dst, 53, SHORT),
        )?;
        dropped(
            &format!("guarded late -> {dst}:{METRICS}"),
            late.tcp_connect(*dst, METRICS, DENIED),
        )?;
        want.add(0, Direction::Egress);
    }
    for dst in node.ips() {
        dropped(
            &format!("guarded late -> the node {dst}:53 TCP"),
            late.tcp_connect(dst, 53, DENIED),
        )?;
        want.add(0, Direction::Egress);
        allowed(
            &format!("guarded late -> the node {dst}:{KUBELET}"),
            late.tcp_connect(dst, KUBELET, SHORT),
        )?;
    }
    want.check(&rig, "the guarded pod")?;
    let (ok, status, _) = rig.agents[0].command(node, &["status"])?;
    ensure!(
        ok && status.contains(&format!("pending: {}/late held by the CNI guard", rig.ns)),
        "{status}"
    );
    rig.alive()
}

#[test]
fn a_pod_held_by_the_cni_guard_may_query_the_node_local_cache() -> Result<()> {
    node_local_dns(Case::Guarded, Layout::Bridged)
}

#[test]
fn without_dns_node_local_a_deny_all_pod_cannot_query_the_node_local_cache() -> Result<()> {
    node_local_dns(Case::WithoutTheFlag, Layout::Bridged)
}

#[test]
fn dns_node_local_lets_queries_to_the_cache_through_and_nothing_else() -> Result<()> {
    node_local_dns(Case::WithTheFlag, Layout::Bridged)
}

#[test]
fn dns_node_local_on_a_routed_calico_node() -> Result<()> {
    node_local_dns(Case::WithTheFlag, Layout::Routed)
}

#[test]
fn dns_node_local_works_when_dns_service_names_another_service() -> Result<()> {
    node_local_dns(Case::OtherDnsService, Layout::Bridged)
}

#[test]
fn kube_dns_cluster_ip_bound_by_the_cache_is_answered_locally_as_the_dns_service() -> Result<()> {
    node_local_dns(Case::ClusterIpOnTheNode, Layout::Bridged)
}
