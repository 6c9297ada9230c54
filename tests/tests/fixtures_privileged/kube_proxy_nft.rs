//! Self-tests of kube-proxy's nftables mode in the lab ([`KubeProxyMode::Nftables`]),
//! no eBPF and no agent: the same paths as the iptables mode, with the same sources
//! at the backend (a recording server says what it saw): a ClusterIP from a pod
//! keeps the pod's address, from the node it is masqueraded; a NodePort under
//! externalTrafficPolicy Cluster masquerades, under Local keeps the client; a
//! re-sync after an endpoint change sends new connections to the new backend; a
//! Service without endpoints is rejected. Each path runs in both modes, and the
//! node's rule set says which mode wrote it (nft tables, or iptables chains).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use rayfence_tests::node_nat::{
    self, ClusterIpRule, Endpoint, KubeProxyMode, Protocol, TrafficPolicy,
};
use rayfence_tests::{Layout, Outcome, Topology, probe_bin};

use super::node_lab::{seen, service};

const T: Duration = Duration::from_secs(2);

fn kube_proxy_paths(layout: Layout, mode: KubeProxyMode) -> Result<()> {
    let mut topo = Topology::with_pods(layout, probe_bin(), &["head", "other"])?;
    topo.add_external_client("client")?;
    node_nat::set_kube_proxy_mode(topo.nodes(), mode)?;
    ensure!(node_nat::kube_proxy_mode(topo.node(0)) == mode);
    let cluster = service(&topo, "np", "head", 30080, TrafficPolicy::Cluster, 80);
    topo.install_node_port(&cluster)?;
    topo.install_node_port(&service(
        &topo,
        "npl",
        "head",
        30081,
        TrafficPolicy::Local,
        81,
    ))?;
    let (node, head, other, ext) = (
        topo.node(0),
        topo.pod("head"),
        topo.pod("other"),
        topo.external("client"),
    );
    // A plain ClusterIP Service (the demo's kind): port 7000 to the head's 8000.
    let plain: Vec<ClusterIpRule> = [
        ("10.96.4.90", head.ip4.into()),
        ("fd00:10:96::4:90", head.ip6.into()),
    ]
    .into_iter()
    .map(|(ip, backend): (&str, IpAddr)| ClusterIpRule {
        namespace: "ray".into(),
        name: "plain".into(),
        cluster_ip: ip.parse().expect("ip"),
        protocol: Protocol::Tcp,
        port: 7000,
        backend,
        target_port: 8000,
    })
    .collect();
    node_nat::install_cluster_ips(node, mode, &plain)?;

    let node_addrs = node.addresses()?;
    let srv = head.prober().serve_tcp_recording(8000)?;
    let other_srv = other.prober().serve_tcp_recording(8000)?;
    let what = format!("{layout:?} {mode:?}");
    for dst in node.ips() {
        // Cluster: the node's address, never the client's.
        let o = ext.tcp_connect(dst, 30080, T);
        ensure!(o == Outcome::Ok, "{what}: client -> {dst}:30080: {o:?}");
        let src = seen(&srv)?;
        ensure!(
            node_addrs.contains(&src),
            "{what}: Cluster NodePort {dst}: the head saw {src}, not a node address"
        );
        // Local: the client's own address.
        let o = ext.tcp_connect(dst, 30081, T);
        ensure!(o == Outcome::Ok, "{what}: client -> {dst}:30081: {o:?}");
        let src = seen(&srv)?;
        ensure!(ext.ips().contains(&src), "{what}: Local NodePort: {src}");
        // A pod through its node's NodePort: masqueraded (Cluster), kept (Local).
        ensure!(other.tcp_connect(dst, 30080, T) == Outcome::Ok, "{what}");
        let src = seen(&srv)?;
        ensure!(node_addrs.contains(&src), "{what}: pod via Cluster: {src}");
        ensure!(other.tcp_connect(dst, 30081, T) == Outcome::Ok, "{what}");
        let src = seen(&srv)?;
        ensure!(other.ips().contains(&src), "{what}: pod via Local: {src}");
        // The node's own processes (output hook): masqueraded to a node address.
        ensure!(node.tcp_connect(dst, 30080, T) == Outcome::Ok, "{what}");
        ensure!(
            node_addrs.contains(&seen(&srv)?),
            "{what}: node via Cluster"
        );
    }
    for (ip, port) in [
        ("10.96.0.80", 8000),
        ("fd00:10:96::80", 8000),
        ("10.96.4.90", 7000),
        ("fd00:10:96::4:90", 7000),
    ] {
        let ip: IpAddr = ip.parse()?;
        // From a pod: DNAT only, the pod's address stays.
        let o = other.tcp_connect(ip, port, T);
        ensure!(o == Outcome::Ok, "{what}: other -> {ip}:{port}: {o:?}");
        let src = seen(&srv)?;
        ensure!(
            other.ips().contains(&src),
            "{what}: ClusterIP from a pod: {src}"
        );
        // From the node: a node address.
        let o = node.tcp_connect(ip, port, T);
        ensure!(o == Outcome::Ok, "{what}: node -> {ip}:{port}: {o:?}");
        let src = seen(&srv)?;
        ensure!(
            node_addrs.contains(&src),
            "{what}: ClusterIP from the node: {src}"
        );
    }

    // An endpoint change, re-synced: new connections go to the new backend.
    let mut moved = cluster.clone();
    moved.endpoints = vec![Endpoint::of("ray", other)];
    topo.install_node_port(&moved)?;
    for ip in &cluster.cluster_ips {
        let o = head.tcp_connect(*ip, 8000, T);
        ensure!(
            o == Outcome::Ok,
            "{what}: head -> {ip} after the move: {o:?}"
        );
        ensure!(head.ips().contains(&seen(&other_srv)?), "{what}: moved");
    }
    let o = ext.tcp_connect(node.ip4.into(), 30080, T);
    ensure!(
        o == Outcome::Ok,
        "{what}: client -> NodePort after the move: {o:?}"
    );
    ensure!(
        node_addrs.contains(&seen(&other_srv)?),
        "{what}: moved NodePort"
    );
    ensure!(
        srv.take_peers(Duration::from_millis(100)).is_empty(),
        "{what}: stale"
    );

    // Which mode wrote the rules.
    let ruleset = node.netns.exec(&["nft", "list", "ruleset"])?;
    let iptables = node.netns.exec(&["iptables", "-w", "-t", "nat", "-S"])?;
    match mode {
        KubeProxyMode::Nftables => {
            for needle in [
                "table ip kube-proxy",
                "table ip6 kube-proxy",
                "type nat hook prerouting priority dstnat",
                "type nat hook output priority -100",
                "type nat hook postrouting priority srcnat",
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
                "10.96.0.80 . tcp . 8000 : goto service-",
                "-ray/np/tcp/p8000",
                "tcp . 30081 : goto external-",
                "masquerade fully-random",
                "meta l4proto tcp dnat to [fd00:10:244::",
            ] {
                ensure!(ruleset.contains(needle), "no {needle:?} in\n{ruleset}");
            }
            ensure!(
                !iptables.contains("KUBE-"),
                "nftables mode, yet kube-proxy iptables chains:\n{iptables}"
            );
            // No endpoints: kube-proxy rejects (reject-chain), from pods and the node.
            moved.endpoints.clear();
            topo.install_node_port(&moved)?;
            let o = other.tcp_connect("10.96.0.80".parse()?, 8000, T);
            ensure!(o == Outcome::Refused, "{what}: no endpoints: {o:?}");
            let o = ext.tcp_connect(node.ip4.into(), 30080, T);
            ensure!(
                o == Outcome::Refused,
                "{what}: NodePort, no endpoints: {o:?}"
            );
        }
        KubeProxyMode::Iptables => {
            ensure!(
                !ruleset.contains("kube-proxy"),
                "iptables mode, yet a kube-proxy table:\n{ruleset}"
            );
            ensure!(iptables.contains("-j KUBE-NODEPORTS"), "{iptables}");
        }
    }
    Ok(())
}

#[test]
fn nftables_mode_bridged_node_keeps_or_masquerades_the_source_as_iptables_mode() -> Result<()> {
    kube_proxy_paths(Layout::Bridged, KubeProxyMode::Nftables)
}

#[test]
fn nftables_mode_routed_node_keeps_or_masquerades_the_source_as_iptables_mode() -> Result<()> {
    kube_proxy_paths(Layout::Routed, KubeProxyMode::Nftables)
}

#[test]
fn iptables_mode_bridged_node_same_paths_and_an_endpoint_resync() -> Result<()> {
    kube_proxy_paths(Layout::Bridged, KubeProxyMode::Iptables)
}

#[test]
fn nftables_mode_drops_a_local_node_port_on_a_node_without_a_local_endpoint() -> Result<()> {
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head"])?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "remote")?;
    topo.add_external_client("client")?;
    node_nat::set_kube_proxy_mode(topo.nodes(), KubeProxyMode::Nftables)?;
    topo.install_node_port(&service(
        &topo,
        "np",
        "head",
        30080,
        TrafficPolicy::Cluster,
        82,
    ))?;
    topo.install_node_port(&service(
        &topo,
        "npl",
        "head",
        30081,
        TrafficPolicy::Local,
        83,
    ))?;
    let (node1, remote, ext) = (topo.node(n1), topo.pod("remote"), topo.external("client"));
    let srv = topo.pod("head").prober().serve_tcp_recording(8000)?;
    for dst in node1.ips() {
        // node-1 DNATs to node-0's head and masquerades to its underlay address.
        ensure!(ext.tcp_connect(dst, 30080, T) == Outcome::Ok, "{dst}");
        let src = seen(&srv)?;
        ensure!(
            Some(src) == node1.underlay4.map(IpAddr::from)
                || Some(src) == node1.underlay6.map(IpAddr::from),
            "via node-1: saw {src}, not its underlay address"
        );
        // Local without a local endpoint: kube-proxy's nftables mode drops it
        // (`no-endpoint-nodeports`), where the iptables lab leaves the port alone.
        let o = ext.tcp_connect(dst, 30081, T);
        ensure!(
            o == Outcome::Timeout,
            "Local without a local endpoint: {o:?}"
        );
        // A pod of node-1 is short-circuited to the Service: it reaches the head.
        ensure!(remote.tcp_connect(dst, 30081, T) == Outcome::Ok, "{dst}");
        ensure!(remote.ips().contains(&seen(&srv)?));
    }
    Ok(())
}
