//! Self-tests of the lab for "what counts as the node", no eBPF and no agent:
//! every NAT path works and rewrites the source exactly as kube-proxy and the
//! portmap plugin do (a recording server says what source it saw), the external
//! client reaches the nodes, a macvlan pod is reachable without a host veth, and a
//! hostNetwork pod runs in the node's namespace inside a pod cgroup laid out where
//! the agent's discovery looks for it.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rayfence::discovery::QosClass as AgentQos;
use rayfence::discovery::cgroup::{cgroupfs_path, pod_cgroup_name, systemd_path};
use rayfence_tests::kubelet::{
    CgroupDriver, HostNetworkPod, KubeletTree, QosClass, pod_cgroup_path,
};
use rayfence_tests::node_nat::{Endpoint, HostPort, NodePortService, TrafficPolicy};
use rayfence_tests::topology::{EXTERNAL_CLIENT4, EXTERNAL_CLIENT6};
use rayfence_tests::{Layout, Outcome, Server, Topology, Wiring, probe_bin};

const T: Duration = Duration::from_secs(2);

/// One peer seen by `server` after a successful probe.
pub(crate) fn seen(server: &Server) -> Result<IpAddr> {
    let peers = server.take_peers(T);
    ensure!(peers.len() == 1, "expected one connection, saw {peers:?}");
    Ok(peers[0])
}

/// A NodePort Service in front of `pod` (namespace `ray`), dual-stack.
pub(crate) fn service(
    topo: &Topology,
    name: &str,
    pod: &str,
    node_port: u16,
    policy: TrafficPolicy,
    ip: u8,
) -> NodePortService {
    let mut svc = NodePortService::tcp("ray", name, 8000, node_port);
    svc.external_traffic_policy = policy;
    svc.cluster_ips = vec![
        format!("10.96.0.{ip}").parse().expect("ip"),
        format!("fd00:10:96::{ip}").parse().expect("ip"),
    ];
    svc.endpoints.push(Endpoint::of("ray", topo.pod(pod)));
    svc
}

fn node_port_cluster_masquerades_local_keeps_the_client(layout: Layout) -> Result<()> {
    let mut topo = Topology::with_pods(layout, probe_bin(), &["head", "other"])?;
    let ext = topo.add_external_client("client")?;
    assert_eq!((ext.ip4, ext.ip6), (EXTERNAL_CLIENT4, EXTERNAL_CLIENT6));
    topo.install_node_port(&service(
        &topo,
        "np",
        "head",
        30080,
        TrafficPolicy::Cluster,
        80,
    ))?;
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
    let node_addrs = node.addresses()?;
    let srv = head.prober().serve_tcp_recording(8000)?;
    let _kubelet = node.serve_tcp(10250)?;
    for dst in node.ips() {
        ensure!(
            ext.tcp_connect(dst, 10250, T) == Outcome::Ok,
            "client -> node {dst}"
        );
        // Cluster: the node's address, never the client's.
        ensure!(
            ext.tcp_connect(dst, 30080, T) == Outcome::Ok,
            "client -> {dst}:30080"
        );
        let src = seen(&srv)?;
        ensure!(
            node_addrs.contains(&src),
            "{layout:?}: Cluster NodePort {dst}: the head saw {src}, not a node address ({node_addrs:?})"
        );
        if layout == Layout::Bridged {
            ensure!(
                src == IpAddr::from(node.gateway4) || src == IpAddr::from(node.gateway6),
                "bridged: masqueraded to the bridge address, saw {src}"
            );
        }
        println!("{layout:?}: client -> {dst}:30080 (Cluster): the head saw {src}");
        // Local: the client's own address.
        ensure!(
            ext.tcp_connect(dst, 30081, T) == Outcome::Ok,
            "client -> {dst}:30081"
        );
        let src = seen(&srv)?;
        ensure!(
            ext.ips().contains(&src),
            "Local NodePort {dst}: the head saw {src}"
        );
        // A pod through its node's NodePort: masqueraded (Cluster), kept (Local:
        // pod sources are short-circuited to the Service).
        ensure!(other.tcp_connect(dst, 30080, T) == Outcome::Ok);
        let src = seen(&srv)?;
        ensure!(node_addrs.contains(&src), "pod via Cluster: {src}");
        ensure!(other.tcp_connect(dst, 30081, T) == Outcome::Ok);
        let src = seen(&srv)?;
        ensure!(other.ips().contains(&src), "pod via Local: {src}");
        // The node's own processes (OUTPUT): masqueraded to a node address.
        ensure!(node.tcp_connect(dst, 30080, T) == Outcome::Ok);
        ensure!(node_addrs.contains(&seen(&srv)?));
    }
    // ClusterIPs go through the same Service chain.
    for ip in ["10.96.0.80", "fd00:10:96::80"] {
        ensure!(
            other.tcp_connect(ip.parse()?, 8000, T) == Outcome::Ok,
            "{ip}"
        );
        ensure!(
            other.ips().contains(&seen(&srv)?),
            "ClusterIP from a pod keeps it"
        );
    }
    // The client also reaches pods directly (a flat network) and keeps its address.
    ensure!(ext.tcp_connect(head.ip4.into(), 8000, T) == Outcome::Ok);
    ensure!(seen(&srv)? == IpAddr::from(EXTERNAL_CLIENT4));
    // The iptables rules are kube-proxy's: the mark and the addrtype match.
    let rules = node.netns.exec(&["iptables", "-w", "-t", "nat", "-S"])?;
    for needle in [
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        "--dport 30080 -j KUBE-EXT-",
    ] {
        ensure!(rules.contains(needle), "no {needle:?} in\n{rules}");
    }
    Ok(())
}

#[test]
fn bridged_node_port_masquerades_under_cluster_and_keeps_the_client_under_local() -> Result<()> {
    node_port_cluster_masquerades_local_keeps_the_client(Layout::Bridged)
}

#[test]
fn routed_node_port_masquerades_under_cluster_and_keeps_the_client_under_local() -> Result<()> {
    node_port_cluster_masquerades_local_keeps_the_client(Layout::Routed)
}

#[test]
fn host_port_keeps_the_client_and_masquerades_hairpin_and_localhost() -> Result<()> {
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["hp", "other"])?;
    topo.add_external_client("client")?;
    topo.install_host_port(&HostPort::tcp("hp", 18080, 8080))?;
    let (node, hp, other, ext) = (
        topo.node(0),
        topo.pod("hp"),
        topo.pod("other"),
        topo.external("client"),
    );
    let node_addrs = node.addresses()?;
    let srv = hp.prober().serve_tcp_recording(8080)?;
    for dst in node
        .ips()
        .into_iter()
        .chain([IpAddr::from(node.gateway4), IpAddr::from(node.gateway6)])
    {
        let o = other.tcp_connect(dst, 18080, T);
        ensure!(o == Outcome::Ok, "pod -> {dst}:18080: {o:?}");
        ensure!(other.ips().contains(&seen(&srv)?), "a pod's source is kept");
        let o = ext.tcp_connect(dst, 18080, T);
        ensure!(o == Outcome::Ok, "client -> {dst}:18080: {o:?}");
        ensure!(ext.ips().contains(&seen(&srv)?), "the client's is kept");
        // Hairpin: the pod to its own hostPort, masqueraded (mark 0x2000).
        let o = hp.tcp_connect(dst, 18080, T);
        ensure!(o == Outcome::Ok, "hairpin {dst}:18080: {o:?}");
        let src = seen(&srv)?;
        ensure!(node_addrs.contains(&src), "hairpin: saw {src}");
    }
    // The node's loopback (route_localnet), masqueraded.
    ensure!(node.tcp_connect("127.0.0.1".parse()?, 18080, T) == Outcome::Ok);
    let src = seen(&srv)?;
    ensure!(node_addrs.contains(&src), "localhost: saw {src}");
    let rules = node.netns.exec(&["iptables", "-w", "-t", "nat", "-S"])?;
    for needle in [
        "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
    ] {
        ensure!(rules.contains(needle), "no {needle:?} in\n{rules}");
    }
    Ok(())
}

#[test]
fn node_ports_of_every_node_reach_a_backend_on_another_node() -> Result<()> {
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head"])?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "remote")?;
    topo.add_external_client("client")?;
    topo.install_node_port(&service(
        &topo,
        "np",
        "head",
        30080,
        TrafficPolicy::Cluster,
        80,
    ))?;
    topo.install_node_port(&service(
        &topo,
        "npl",
        "head",
        30081,
        TrafficPolicy::Local,
        81,
    ))?;
    let (node0, node1, remote, ext) = (
        topo.node(0),
        topo.node(n1),
        topo.pod("remote"),
        topo.external("client"),
    );
    let srv = topo.pod("head").prober().serve_tcp_recording(8000)?;
    let (addrs0, addrs1) = (node0.addresses()?, node1.addresses()?);
    for dst in node1.ips() {
        // node-1 DNATs to node-0's head and masquerades to its underlay address.
        ensure!(ext.tcp_connect(dst, 30080, T) == Outcome::Ok, "{dst}");
        let src = seen(&srv)?;
        ensure!(
            Some(src) == node1.underlay4.map(IpAddr::from)
                || Some(src) == node1.underlay6.map(IpAddr::from),
            "via node-1: saw {src}, not its underlay address"
        );
        println!("client -> node-1 {dst}:30080 (Cluster): the head on node-0 saw {src}");
        // Local: node-1 has no endpoint, so it leaves the port alone.
        ensure!(
            ext.tcp_connect(dst, 30081, T) == Outcome::Refused,
            "Local without a local endpoint"
        );
        ensure!(remote.tcp_connect(dst, 30080, T) == Outcome::Ok);
        ensure!(addrs1.contains(&seen(&srv)?));
    }
    for dst in node0.ips() {
        ensure!(remote.tcp_connect(dst, 30080, T) == Outcome::Ok, "{dst}");
        let src = seen(&srv)?;
        ensure!(addrs0.contains(&src), "pod on node-1 via node-0: saw {src}");
        ensure!(ext.tcp_connect(dst, 30081, T) == Outcome::Ok, "{dst}");
        ensure!(ext.ips().contains(&seen(&srv)?));
    }
    Ok(())
}

#[test]
fn a_macvlan_pod_has_no_host_veth_and_is_reached_from_everywhere() -> Result<()> {
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["a"])?;
    topo.add_macvlan_pod(0, "mv")?;
    topo.add_external_client("client")?;
    let mut svc = NodePortService::tcp("ray", "mv", 8000, 30085);
    svc.cluster_ips = vec!["10.96.0.85".parse()?];
    svc.endpoints.push(Endpoint::of("ray", topo.pod("mv")));
    topo.install_node_port(&svc)?;
    let (node, a, mv, ext) = (
        topo.node(0),
        topo.pod("a"),
        topo.pod("mv"),
        topo.external("client"),
    );
    assert_eq!(mv.wiring, Wiring::Macvlan);
    let link = mv.netns.exec(&["ip", "-d", "link", "show", "eth0"])?;
    ensure!(link.contains("macvlan"), "{link}");
    let srv = mv.prober().serve_tcp_recording(8000)?;
    let _a = a.serve_tcp(8000)?;
    let _kubelet = node.serve_tcp(10250)?;
    for dst in mv.ips() {
        // The node's own probes leave with its host address (the route's source).
        ensure!(
            node.tcp_connect(dst, 8000, T) == Outcome::Ok,
            "node -> {dst}"
        );
        ensure!(node.ips().contains(&seen(&srv)?));
        ensure!(a.tcp_connect(dst, 8000, T) == Outcome::Ok, "a -> {dst}");
        ensure!(a.ips().contains(&seen(&srv)?));
        ensure!(
            ext.tcp_connect(dst, 8000, T) == Outcome::Ok,
            "client -> {dst}"
        );
        ensure!(ext.ips().contains(&seen(&srv)?));
    }
    for dst in node.ips() {
        ensure!(
            mv.tcp_connect(dst, 10250, T) == Outcome::Ok,
            "mv -> node {dst}"
        );
    }
    for dst in a.ips() {
        ensure!(mv.tcp_connect(dst, 8000, T) == Outcome::Ok, "mv -> a {dst}");
    }
    ensure!(ext.tcp_connect(node.ip4.into(), 30085, T) == Outcome::Ok);
    let src = seen(&srv)?;
    ensure!(node.addresses()?.contains(&src), "NodePort to mv: {src}");
    println!("client -> node:30085 (Cluster) -> macvlan pod: it saw {src}");
    Ok(())
}

#[test]
fn kubelet_tree_paths_are_where_the_agent_looks() {
    let uid = "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc";
    for (qos, agent) in [
        (QosClass::Guaranteed, AgentQos::Guaranteed),
        (QosClass::Burstable, AgentQos::Burstable),
        (QosClass::BestEffort, AgentQos::BestEffort),
    ] {
        let name = pod_cgroup_name("/", agent, uid);
        assert_eq!(
            pod_cgroup_path(CgroupDriver::Systemd, qos, uid),
            systemd_path(&name)
        );
        assert_eq!(
            pod_cgroup_path(CgroupDriver::Cgroupfs, qos, uid),
            cgroupfs_path(&name)
        );
    }
}

#[test]
fn a_host_network_pod_runs_in_the_node_namespace_inside_its_pod_cgroup() -> Result<()> {
    let topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["a"])?;
    let node = topo.node(0);
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        let tree = KubeletTree::new(driver)?;
        let uid = "5e1f0000-aaaa-4bbb-8ccc-000000000001";
        let hn = HostNetworkPod::new(
            &tree,
            node,
            "monitoring",
            "exporter",
            uid,
            QosClass::Burstable,
        )?;
        ensure!(hn.container.starts_with(tree.kubepods()));
        let srv = hn.prober().serve_tcp_recording(9100)?;
        // In the node's namespace: a pod reaches it on the node's address.
        for dst in node.ips() {
            ensure!(
                topo.pod("a").tcp_connect(dst, 9100, T) == Outcome::Ok,
                "{driver:?}: a -> hostNetwork pod on {dst}"
            );
            ensure!(topo.pod("a").ips().contains(&seen(&srv)?));
        }
        let ns_of = |pid: u32| -> Result<u64> {
            Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
        };
        ensure!(ns_of(srv.pid())? == std::fs::metadata(node.netns.path())?.ino());
        // In its pod's container cgroup.
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", srv.pid()))?;
        let line = cg
            .lines()
            .find(|l| l.starts_with("0::"))
            .context("no cgroup v2 line")?;
        let rel = hn
            .container
            .strip_prefix(rayfence_tests::cgroup::cgroup2_mount()?)?
            .to_string_lossy()
            .into_owned();
        ensure!(line.ends_with(&rel), "{line} vs {rel}");
        // Its Pod object says host networking, on the node's addresses.
        let pod = hn.manifest("node-a", &[("app", "exporter")], &[9100]);
        assert_eq!(pod["spec"]["hostNetwork"], true);
        assert_eq!(pod["status"]["podIP"], node.ip4.to_string());
        assert_eq!(pod["status"]["qosClass"], "Burstable");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["hostPort"], 9100);
        drop(srv);
    }
    Ok(())
}
