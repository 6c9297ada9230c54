//! Self-tests of the topology fixtures, no eBPF: in both layouts, TCP, UDP and
//! ICMP get through pod to pod (IPv4 and IPv6) and pod to node, and the topology's
//! namespaces are gone after drop.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use rayfence_tests::{Layout, Outcome, Topology, probe_bin};

const T: Duration = Duration::from_secs(2);

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn all_traffic_passes(layout: Layout) -> Result<()> {
    let started = Instant::now();
    let topo = Topology::with_pods(layout, probe_bin(), &["a", "b"])?;
    eprintln!("{layout:?}: set up in {:?}", started.elapsed());
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let node = topo.node(0);
    let _tcp = b.serve_tcp(8080)?;
    let _udp = b.serve_udp(5353)?;
    let _node_tcp = node.serve_tcp(10250)?;
    let _node_udp = node.serve_udp(10251)?;
    for dst in b.ips() {
        assert_eq!(a.tcp_connect(dst, 8080, T), Outcome::Ok, "tcp a -> b {dst}");
        assert_eq!(a.udp_probe(dst, 5353, T), Outcome::Ok, "udp a -> b {dst}");
        assert_eq!(a.ping(dst, T), Outcome::Ok, "ping a -> b {dst}");
    }
    for dst in [IpAddr::V4(node.ip4), IpAddr::V6(node.ip6)] {
        assert_eq!(
            a.tcp_connect(dst, 10250, T),
            Outcome::Ok,
            "tcp a -> node {dst}"
        );
        assert_eq!(
            a.udp_probe(dst, 10251, T),
            Outcome::Ok,
            "udp a -> node {dst}"
        );
        assert_eq!(a.ping(dst, T), Outcome::Ok, "ping a -> node {dst}");
    }
    // And node to pod (the kubelet's probes).
    for dst in a.ips() {
        assert_eq!(node.ping(dst, T), Outcome::Ok, "ping node -> a {dst}");
    }
    let names = topo.netns_names();
    let listed = netns_list();
    assert!(names.iter().all(|n| listed.contains(n.as_str())));
    let dropping = Instant::now();
    drop((_tcp, _udp, _node_tcp, _node_udp));
    drop(topo);
    eprintln!("{layout:?}: torn down in {:?}", dropping.elapsed());
    let listed = netns_list();
    for n in names {
        assert!(!listed.contains(n.as_str()), "{n} still listed");
    }
    Ok(())
}

#[test]
fn bridged_pods_reach_each_other_and_the_node_over_tcp_udp_icmp() -> Result<()> {
    all_traffic_passes(Layout::Bridged)
}

#[test]
fn routed_pods_reach_each_other_and_the_node_over_tcp_udp_icmp() -> Result<()> {
    all_traffic_passes(Layout::Routed)
}
