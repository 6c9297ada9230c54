//! Self-tests of the multi-node topology and of what the probes report when
//! traffic does not get through, no eBPF.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use rayfence_tests::{Layout, Outcome, Topology, probe_bin};

const T: Duration = Duration::from_secs(2);

fn pods_on_two_nodes_reach_each_other(layout: Layout) -> Result<()> {
    let started = Instant::now();
    let mut topo = Topology::with_pods(layout, probe_bin(), &["local"])?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "remote")?;
    eprintln!("{layout:?} two nodes: set up in {:?}", started.elapsed());
    let (local, remote) = (topo.pod("local"), topo.pod("remote"));
    assert_eq!(remote.node, 1);
    let _tcp = remote.serve_tcp(6379)?;
    let _udp = remote.serve_udp(6379)?;
    for dst in remote.ips() {
        assert_eq!(local.tcp_connect(dst, 6379, T), Outcome::Ok, "tcp {dst}");
        assert_eq!(local.udp_probe(dst, 6379, T), Outcome::Ok, "udp {dst}");
        assert_eq!(local.ping(dst, T), Outcome::Ok, "ping {dst}");
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

#[test]
fn bridged_pods_on_two_nodes_reach_each_other_over_the_underlay() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Bridged)
}

#[test]
fn routed_pods_on_two_nodes_reach_each_other_over_the_underlay() -> Result<()> {
    pods_on_two_nodes_reach_each_other(Layout::Routed)
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
