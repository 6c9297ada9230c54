//! Self-tests of the multi-node topology (over host-gw routes and over VXLAN) and
//! of what the probes report when traffic does not get through, no eBPF.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence_tests::topology::{Transport, VXLAN_POD_MTU};
use rayfence_tests::{Layout, Node, Outcome, Topology, probe_bin};

const T: Duration = Duration::from_secs(2);

/// Packets (rx, tx) of each VXLAN device of `node` (IPv4, IPv6 underlay).
fn vxlan_packets(node: &Node) -> Result<[(u64, u64); 2]> {
    let [dev4, dev6] = node.vxlan.as_ref().context("no VXLAN devices")?;
    Ok([node.link_packets(dev4)?, node.link_packets(dev6)?])
}

fn pods_on_two_nodes_reach_each_other(layout: Layout, transport: Transport) -> Result<()> {
    let started = Instant::now();
    let mut topo = Topology::with_pods(layout, probe_bin(), &["local"])?;
    topo.set_transport(transport)?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "remote")?;
    eprintln!(
        "{layout:?} over {transport:?}, two nodes: set up in {:?}",
        started.elapsed()
    );
    let (local, remote) = (topo.pod("local"), topo.pod("remote"));
    assert_eq!(remote.node, 1);
    let _tcp = remote.serve_tcp(6379)?;
    let _udp = remote.serve_udp(6379)?;
    let (node0, node1) = (topo.node(0), topo.node(1));
    let before = match transport {
        Transport::HostGw => None,
        Transport::Vxlan => Some([vxlan_packets(node0)?, vxlan_packets(node1)?]),
    };
    for dst in remote.ips() {
        assert_eq!(local.tcp_connect(dst, 6379, T), Outcome::Ok, "tcp {dst}");
        assert_eq!(local.udp_probe(dst, 6379, T), Outcome::Ok, "udp {dst}");
        assert_eq!(local.ping(dst, T), Outcome::Ok, "ping {dst}");
    }
    if let Some(before) = before {
        let after = [vxlan_packets(node0)?, vxlan_packets(node1)?];
        eprintln!("VXLAN devices (rx, tx) per node and family: {before:?} -> {after:?}");
        // Each family: at least a SYN, a datagram and an echo request one way, and
        // their answers the other way, through each node's device.
        for (node, (was, now)) in before.iter().zip(&after).enumerate() {
            for (family, ((rx0, tx0), (rx1, tx1))) in
                ["IPv4", "IPv6"].iter().zip(was.iter().zip(now))
            {
                ensure!(
                    rx1 - rx0 >= 3 && tx1 - tx0 >= 3,
                    "node-{node} {family} VXLAN device: rx {rx0} -> {rx1}, tx {tx0} -> {tx1}"
                );
            }
        }
        assert_pod_routes_use_vxlan(node0, remote.ips(), node1)?;
        assert_pod_routes_use_vxlan(node1, local.ips(), node0)?;
        // The pod made before the transport was chosen was shrunk too.
        for pod in [local, remote] {
            let link = pod.netns.ip(&["link", "show", "dev", &pod.pod_if])?;
            ensure!(
                link.contains(&format!(" mtu {VXLAN_POD_MTU} ")),
                "{}: {link}",
                pod.name
            );
        }
    }
    // The other node's host address, through the underlay.
    let node1 = topo.node(1);
    let _kubelet = node1.serve_tcp(10250)?;
    for dst in [IpAddr::V4(node1.ip4), IpAddr::V6(node1.ip6)] {
        assert_eq!(
            local.tcp_connect(dst, 10250, T),
            Outcome::Ok,
            "tcp node1 {dst}"
        );
    }
    Ok(())
}

/// `node` reaches the pods `dsts` of node `peer` only through its VXLAN devices:
/// flannel's on-link routes via the peer's VTEP address, none via the underlay.
fn assert_pod_routes_use_vxlan(node: &Node, dsts: [IpAddr; 2], peer: &Node) -> Result<()> {
    let [dev4, dev6] = node.vxlan.as_ref().context("no VXLAN devices")?;
    let want = [
        format!(
            "{0}/{1} via {0} dev {dev4} ",
            peer.pod_cidr4.0, peer.pod_cidr4.1
        ),
        format!(
            "{0}/{1} via {0} dev {dev6} ",
            peer.pod_cidr6.0, peer.pod_cidr6.1
        ),
    ];
    for (family, want) in ["-4", "-6"].into_iter().zip(want) {
        let routes = node.netns.ip(&[family, "route", "show", "table", "all"])?;
        ensure!(
            routes
                .lines()
                .any(|r| r.starts_with(&want) && r.contains(" onlink")),
            "node-{}: no route `{want}... onlink` in\n{routes}",
            node.index
        );
        ensure!(
            !routes.lines().any(|r| r.contains("dev ul0")
                && (r.contains(&peer.pod_cidr4.0.to_string())
                    || r.contains(&peer.pod_cidr6.0.to_string()))),
            "node-{}: a plain route to node-{}'s pods in\n{routes}",
            node.index,
            peer.index
        );
    }
    for (dst, dev) in dsts.into_iter().zip([dev4, dev6]) {
        let got = node.netns.ip(&["route", "get", &dst.to_string()])?;
        ensure!(
            got.contains(&format!(" dev {dev} ")),
            "node-{}: {dst} is not routed through {dev}: {got}",
            node.index
        );
    }
    Ok(())
}

#[test]
fn bridged_pods_on_two_nodes_reach_each_other_over_the_underlay() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Bridged, Transport::HostGw)
}

#[test]
fn routed_pods_on_two_nodes_reach_each_other_over_the_underlay() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Routed, Transport::HostGw)
}

/// flannel's vxlan backend: the same reachability, every packet encapsulated.
#[test]
fn bridged_pods_on_two_nodes_reach_each_other_through_vxlan() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Bridged, Transport::Vxlan)
}

/// Calico's VXLAN mode has the same shape (its own VNI, port and device name).
#[test]
fn routed_pods_on_two_nodes_reach_each_other_through_vxlan() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Routed, Transport::Vxlan)
}

#[test]
fn probes_tell_refused_from_timeout() -> Result<()> {
    let topo = Topology::with_pods(Layout::Routed, probe_bin(), &["a", "b"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    for dst in b.ips() {
        // Nothing listens: RST / ICMP port unreachable.
        assert_eq!(a.tcp_connect(dst, 1, T), Outcome::Refused, "tcp {dst}");
        assert_eq!(a.udp_probe(dst, 1, T), Outcome::Refused, "udp {dst}");
    }
    // Silently dropped: a 100 ms timeout is honoured. (Here the node's default
    // route leads nowhere, like a drop by a filter.)
    let started = Instant::now();
    let nowhere: IpAddr = "10.99.0.1".parse()?;
    assert_eq!(
        a.tcp_connect(nowhere, 80, Duration::from_millis(100)),
        Outcome::Timeout
    );
    assert_eq!(
        a.ping(nowhere, Duration::from_millis(100)),
        Outcome::Timeout
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn held_connection_survives_and_reports_when_its_server_is_gone() -> Result<()> {
    let topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["a", "b"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    for dst in b.ips() {
        let srv = b.serve_tcp(8000)?;
        let mut held = a.tcp_hold(dst, 8000, T)?;
        assert!(held.roundtrip(), "first roundtrip {dst}");
        assert!(
            held.roundtrip(),
            "second roundtrip on the same connection {dst}"
        );
        drop(srv);
        assert!(!held.roundtrip(), "roundtrip after the server died {dst}");
    }
    Ok(())
}

#[test]
fn netns_helpers_find_interfaces_and_set_sysctls_inside() -> Result<()> {
    let topo = Topology::with_pods(Layout::Routed, probe_bin(), &["a"])?;
    let (node, a) = (topo.node(0), topo.pod("a"));
    assert_eq!(node.netns.ifindex(&a.host_if)?, a.host_ifindex);
    assert_eq!(a.netns.ifindex("eth0")?, a.pod_ifindex);
    assert!(
        node.netns.ifindex("eth0").is_err(),
        "eth0 exists only in the pod"
    );
    assert_eq!(
        node.netns
            .read_sysctl(&format!("net.ipv4.conf.{}.proxy_arp", a.host_if))?,
        "1"
    );
    a.netns.sysctl("net.ipv4.ip_forward", "1")?;
    assert_eq!(a.netns.read_sysctl("net.ipv4.ip_forward")?, "1");
    // A closure runs in the namespace: the pod sees its own address.
    let links = a.netns.exec(&["ip", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(links.contains(&a.ip4.to_string()), "{links}");
    let in_ns = a
        .netns
        .run(|| std::net::UdpSocket::bind((a.ip4, 0)).is_ok())?;
    assert!(
        in_ns,
        "binding the pod address works inside the pod namespace"
    );
    assert!(
        std::net::UdpSocket::bind((a.ip4, 0)).is_err(),
        "but not outside it"
    );
    Ok(())
}
