//! A simulated Kubernetes node (or several) made of network namespaces: a "node"
//! namespace plus one namespace per pod, dual stack, in one of two layouts.
//!
//! - [`Layout::Bridged`] (flannel's cni0): a bridge in the node namespace holds the
//!   node's pod-subnet gateway address; each pod's host-side veth is a bridge port
//!   in hairpin mode (flannel's default); pods route by default via the bridge
//!   address.
//! - [`Layout::Routed`] (Calico): no bridge; each host-side veth has no address and
//!   MAC `ee:ee:ee:ee:ee:ee`, and the node has a /32 and a /128 route per pod via
//!   it. Pods route by default via `169.254.1.1` (answered by proxy ARP on the host
//!   veth, `proxy_delay` 0) and `fe80::ecee:eeff:feee:eeee` (the host veth's own
//!   link-local address, so plain NDP answers it).
//!
//! Address plan (n = node index, k = pod index on that node):
//!
//! | what                      | IPv4              | IPv6                        |
//! |---------------------------|-------------------|-----------------------------|
//! | node host address (dummy `host0`, also the default route) | 10.0.0.(n+1)/32 | fd00:10::(n+1)/128 |
//! | pod CIDR of node n        | 10.244.n.0/24     | fd00:10:244:n::/64          |
//! | bridge gateway (Bridged)  | 10.244.n.1/24     | fd00:10:244:n::1/64         |
//! | pod k on node n           | 10.244.n.(10+k)   | fd00:10:244:n::(10+k) (hex) |
//! | underlay (multi-node, or with an external client) | 10.1.0.(n+1)/24 | fd00:10:1::(n+1)/64 |
//! | VTEP address ([`Transport::Vxlan`]) | 10.244.n.0/32 | fd00:10:244:n::/128 |
//! | VTEP MAC ([`Transport::Vxlan`]) | 0e:72:66:(n):00:04 | 0e:72:66:(n):00:06 |
//! | macvlan pod k on node n   | 10.245.n.(10+k)   | fd00:10:245:n::(10+k) (hex) |
//! | external client i         | 10.1.0.(200+i)/24 | fd00:10:1::(c8+i)/64        |
//! | "cluster CIDR" (kube-proxy's `--cluster-cidr`) | 10.244.0.0/15 | fd00:10:244::/47 |
//!
//! Every topology lives in its own namespaces, so two topologies (in one test
//! binary or in several) may use the same addresses without meeting. Interface
//! names carry a per-topology tag (`rf<tag>p<i>` for host veths, `rf<tag>br` for the
//! bridge, `rf<tag>vx` / `rf<tag>v6` for the VXLAN devices) so they are unique
//! machine-wide as well, although nothing requires that.
//!
//! Host veths may instead be named as a CNI names them ([`HostIfNames`], chosen
//! with [`Topology::set_host_if_names`] before the first pod): Calico's `cali`, the
//! AWS VPC CNI's `eni`, kindnet's and the ptp plugin's `veth`, each followed by 11
//! hex digits. Those are the topology's own (pid, a per-process counter) and the
//! pod's index, so these names are unique machine-wide too (at most 15 characters,
//! as IFNAMSIZ allows).
//!
//! NodeLocal DNSCache ([`Node::add_node_local_dns_interface`]): its `nodelocaldns`
//! device on the node (a veth pair here: the "dummy" module may be missing), holding
//! [`NODE_LOCAL_DNS4`] (the cache's standard address) and [`NODE_LOCAL_DNS6`], or
//! any addresses a test gives it (kube-dns's ClusterIP, as its iptables mode binds
//! it). Pods reach it through their default route to the node. What answers there
//! is a hostNetwork pod: [`crate::kubelet::NodeLocalDns`].
//!
//! Multi-node: [`Topology::add_node`] connects nodes through an "underlay"
//! namespace holding a bridge; each node has a veth `ul0` on it and routes to the
//! other nodes' host addresses (and macvlan ranges) via their underlay address.
//! How pod traffic crosses between nodes is the [`Transport`], chosen with
//! [`Topology::set_transport`] before the second node:
//! - [`Transport::HostGw`] (the default; flannel's host-gw backend): a plain route
//!   to each other node's pod CIDRs via that node's underlay address.
//! - [`Transport::Vxlan`] (flannel's vxlan backend, k3s's default): each node has
//!   flannel's two VXLAN devices, `rf<tag>vx` (flannel.1: VNI 1, dstport 8472,
//!   `local` its IPv4 underlay address, nolearning, MTU 1450) and `rf<tag>v6`
//!   (flannel-v6.1: the same over the IPv6 underlay, MTU 1430), each holding the
//!   node's VTEP address. For every other node m it has, as flanneld programs them,
//!   `10.244.m.0/24 via 10.244.m.0 dev rf<tag>vx onlink` (and
//!   `fd00:10:244:m::/64 via fd00:10:244:m:: dev rf<tag>v6 onlink`), a permanent
//!   neighbour entry from m's VTEP address to m's VTEP MAC, and an FDB entry from
//!   that MAC to m's underlay address. Pods (and the bridge) get MTU 1430, which
//!   fits both encapsulations, as flannel shrinks the pods' MTU. Nothing routes a
//!   pod CIDR via the underlay, so pod traffic between nodes is always
//!   encapsulated; external clients still route pod ranges via the node.
//!
//! Pieces a test adds when it needs them (each optional; see also [`crate::node_nat`]
//! and [`crate::kubelet`]):
//! - [`Topology::add_external_client`]: a namespace on the underlay that is neither
//!   a node nor a pod (a client outside the cluster), with routes to every node's
//!   host address and pod ranges; a single-node topology gets an underlay for it.
//! - [`Topology::add_macvlan_pod`]: a pod on a macvlan (as a Multus secondary
//!   network gives one), in its own range: it has no host-side veth, so the agent
//!   enforces it with the cgroup hook. The node reaches it through a macvlan of its
//!   own (`rf<tag>mv`, link-local `fe80::1`) with a /32 and /128 route whose source
//!   is the node's host address; the pod's default routes point at the node's host
//!   address (IPv4, on-link) and `fe80::1` (IPv6).
//! - [`Topology::install_node_port`] / [`Topology::install_host_port`]:
//!   kube-proxy's NodePort NAT on every node, the CNI portmap plugin's hostPort NAT
//!   on the pod's node ([`crate::node_nat`]).
//!
//! Links are always created inside our namespaces (`ip -n NODE link add ... peer
//! ... netns POD`), never in the root namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cgroup::TestCgroup;
use crate::names;
use crate::netns::Netns;
use crate::node_nat::{self, HostPort, NodePortService};
use crate::probe::{HeldConnection, Outcome, ProbeBin, Prober, Server};

/// How pods are wired to their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// flannel-like: a bridge in the node namespace.
    Bridged,
    /// Calico-like: routes per pod, proxy ARP, link-local gateway.
    Routed,
}

/// How host-side veths are named (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HostIfNames {
    /// `rf<tag>p<i>`: this kit's own.
    #[default]
    Kit,
    /// Calico's: `cali` + 11 hex digits.
    Calico,
    /// The AWS VPC CNI's: `eni` + 11 hex digits.
    AwsEni,
    /// kindnet's and the CNI ptp plugin's: `veth` + 11 hex digits.
    Veth,
}

impl HostIfNames {
    pub const ALL: [HostIfNames; 4] = [
        HostIfNames::Kit,
        HostIfNames::Calico,
        HostIfNames::AwsEni,
        HostIfNames::Veth,
    ];

    /// The prefix before the hex digits (`None`: the kit's own names).
    pub fn prefix(self) -> Option<&'static str> {
        match self {
            HostIfNames::Kit => None,
            HostIfNames::Calico => Some("cali"),
            HostIfNames::AwsEni => Some("eni"),
            HostIfNames::Veth => Some("veth"),
        }
    }
}

/// Topologies made by this process so far: the middle of their hex tags.
static HEX_TAGS: AtomicU32 = AtomicU32::new(0);

/// Nine hex digits unique machine-wide for this process's lifetime: the pid (22
/// bits on Linux, six digits) and a per-process counter (three digits).
fn hex_tag() -> String {
    let n = HEX_TAGS.fetch_add(1, Ordering::Relaxed) & 0xfff;
    format!("{:06x}{n:03x}", std::process::id() & 0xff_ffff)
}

/// `<prefix><topology's hex tag><pod index, two hex digits>`.
fn cni_style_name(prefix: &str, hex_tag: &str, index: usize) -> String {
    format!("{prefix}{hex_tag}{index:02x}")
}

/// NodeLocal DNSCache's standard address (its `-localip`, kubernetes' docs).
pub const NODE_LOCAL_DNS4: Ipv4Addr = Ipv4Addr::new(169, 254, 20, 10);
/// An IPv6 address for the cache in this lab (the cache has no standard one).
pub const NODE_LOCAL_DNS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0xffff, 0, 0, 0, 0, 0xa);
/// The device NodeLocal DNSCache puts its addresses on.
pub const NODE_LOCAL_DNS_DEVICE: &str = "nodelocaldns";

/// How pod traffic travels between nodes (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// flannel's host-gw: routes via the other node's underlay address.
    #[default]
    HostGw,
    /// flannel's vxlan: encapsulated over a VXLAN device per address family.
    Vxlan,
}

/// flannel's VXLAN identifier and UDP port (the Linux kernel's, not IANA's 4789).
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
/// The pods' MTU with [`Transport::Vxlan`]: 1500 less the 70 bytes VXLAN over
/// IPv6 adds, so neither encapsulation needs fragments or path MTU discovery.
pub const VXLAN_POD_MTU: u32 = 1430;

/// The MAC Calico gives every host-side veth.
const ROUTED_HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' IPv4 gateway in the routed layout (never assigned anywhere).
pub const ROUTED_GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The host veth's EUI-64 link-local address for [`ROUTED_HOST_MAC`].
pub const ROUTED_GATEWAY6: Ipv6Addr =
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The first external client's addresses (client i: `.200 + i`, `::c8 + i`).
pub const EXTERNAL_CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 200);
pub const EXTERNAL_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0xc8);
/// Every pod address of every node (veth and macvlan pods): kube-proxy's
/// `--cluster-cidr`, which tells pod sources from others.
pub const CLUSTER_CIDR4: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 15);
pub const CLUSTER_CIDR6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0), 47);
/// The node side of the macvlan pods' network: its link-local address, their IPv6
/// gateway.
pub const MACVLAN_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Node `n`'s VTEP MAC for address family `family` (4 or 6): locally
/// administered, unicast, fixed so peers can be programmed without asking.
fn vtep_mac(n: usize, family: u8) -> String {
    format!("0e:72:66:{:02x}:00:{family:02x}", n as u8)
}

/// A node namespace.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    pub netns: Netns,
    /// The node's own ("host") addresses, on `host0` (one end of a veth pair
    /// inside the node namespace, standing in for eth0; default routes use it).
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The pods' default gateway: the bridge address (Bridged) or
    /// 169.254.1.1 / fe80::ecee:eeff:feee:eeee (Routed).
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    /// Pod CIDRs (network address and prefix length).
    pub pod_cidr4: (Ipv4Addr, u8),
    pub pod_cidr6: (Ipv6Addr, u8),
    /// The range of its macvlan pods (`10.245.n.0/24`, `fd00:10:245:n::/64`).
    pub macvlan_cidr4: (Ipv4Addr, u8),
    pub macvlan_cidr6: (Ipv6Addr, u8),
    /// The bridge's name (Bridged only).
    pub bridge: Option<String>,
    /// The underlay address, once a second node or an external client exists.
    pub underlay4: Option<Ipv4Addr>,
    pub underlay6: Option<Ipv6Addr>,
    /// The node's own macvlan, once it has a macvlan pod.
    pub macvlan: Option<String>,
    /// Its VXLAN devices (IPv4, IPv6 underlay), once a second node exists with
    /// [`Transport::Vxlan`].
    pub vxlan: Option<[String; 2]>,
    bin: ProbeBin,
    pods_created: usize,
    macvlan_pods_created: usize,
}

impl Node {
    /// A prober running in the node namespace (for node-local services).
    pub fn prober(&self) -> Prober {
        Prober::new(self.bin.clone(), &self.netns)
    }

    pub fn serve_tcp(&self, port: u16) -> Result<Server> {
        self.prober().serve_tcp(port)
    }

    pub fn serve_udp(&self, port: u16) -> Result<Server> {
        self.prober().serve_udp(port)
    }

    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().tcp_connect(addr, port, timeout)
    }

    pub fn udp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().udp_probe(addr, port, timeout)
    }

    pub fn ping(&self, addr: IpAddr, timeout: Duration) -> Outcome {
        self.prober().ping(addr, timeout)
    }

    pub fn tcp_hold(&self, addr: IpAddr, port: u16, timeout: Duration) -> Result<HeldConnection> {
        self.prober().tcp_hold(addr, port, timeout)
    }

    /// The host addresses `host0` holds, as probe targets.
    pub fn ips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ip4), IpAddr::V6(self.ip6)]
    }

    /// NodeLocal DNSCache's device (see the module docs) holding `addresses` (host
    /// prefixes), made on first use; returns its name. What serves there is a
    /// hostNetwork pod ([`crate::kubelet::NodeLocalDns`]).
    pub fn add_node_local_dns_interface(&self, addresses: &[IpAddr]) -> Result<&'static str> {
        let dev = NODE_LOCAL_DNS_DEVICE;
        if self.netns.ifindex(dev).is_err() {
            let peer = format!("{dev}p");
            self.netns
                .ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer])?;
            self.netns.ip(&["link", "set", &peer, "up"])?;
            self.netns.ip(&["link", "set", dev, "up"])?;
        }
        for ip in addresses {
            let prefix = match ip {
                IpAddr::V4(_) => format!("{ip}/32"),
                IpAddr::V6(_) => format!("{ip}/128"),
            };
            self.netns
                .ip(&["addr", "add", &prefix, "dev", dev, "nodad"])?;
        }
        Ok(dev)
    }

    /// Packets received and sent by interface `dev` of the node namespace
    /// (`ip -s link`): (rx, tx).
    pub fn link_packets(&self, dev: &str) -> Result<(u64, u64)> {
        let out = self.netns.ip(&["-j", "-s", "link", "show", "dev", dev])?;
        let links: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("ip -j -s link show dev {dev}: {out}"))?;
        let stats = &links[0]["stats64"];
        let count = |dir: &str| {
            stats[dir]["packets"]
                .as_u64()
                .with_context(|| format!("no {dir} packets for {dev} in {out}"))
        };
        Ok((count("rx")?, count("tx")?))
    }

    /// Every global address of the node namespace (host, bridge, underlay): what
    /// a masquerade on this node may pick as the new source.
    pub fn addresses(&self) -> Result<Vec<IpAddr>> {
        let out = self.netns.ip(&["-o", "addr", "show", "scope", "global"])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect())
    }
}

/// How a pod is wired to its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// A veth pair: the host side is in the node namespace (TC attaches there).
    Veth,
    /// A macvlan on a device of the node: no host-side veth, so the agent falls
    /// back to the cgroup hook.
    Macvlan,
}

/// A pod namespace wired to a node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// Index of the node it runs on.
    pub node: usize,
    pub netns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub wiring: Wiring,
    /// Host-side veth, in the node namespace (where TC programs attach). For a
    /// macvlan pod: the node's own macvlan, shared by every macvlan pod of the node
    /// (no program attaches there).
    pub host_if: String,
    pub host_ifindex: u32,
    /// Pod-side veth (`eth0`) in the pod namespace.
    pub pod_if: String,
    pub pod_ifindex: u32,
    bin: ProbeBin,
    cgroup: Mutex<Option<PathBuf>>,
}

impl Pod {
    /// Puts every probe this pod starts from now on into cgroup `cg` (or none).
    pub fn set_cgroup(&self, cg: Option<&TestCgroup>) {
        self.set_cgroup_dir(cg.map(TestCgroup::path));
    }

    /// Like [`Pod::set_cgroup`], for a cgroup directory this crate did not make a
    /// [`TestCgroup`] of (a container cgroup of a [`crate::kubelet::KubeletTree`]).
    pub fn set_cgroup_dir(&self, dir: Option<&Path>) {
        *self.cgroup.lock().unwrap_or_else(|e| e.into_inner()) = dir.map(Path::to_owned);
    }

    pub fn cgroup(&self) -> Option<PathBuf> {
        self.cgroup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A prober in this pod's namespace (and its cgroup, if set).
    pub fn prober(&self) -> Prober {
        let p = Prober::new(self.bin.clone(), &self.netns);
        match self.cgroup() {
            Some(cg) => p.in_cgroup(&cg),
            None => p,
        }
    }

    /// A prober in this pod's namespace inside cgroup `dir`, whatever
    /// [`Pod::set_cgroup`] said.
    pub fn prober_in(&self, dir: &Path) -> Prober {
        Prober::new(self.bin.clone(), &self.netns).in_cgroup(dir)
    }

    pub fn ips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ip4), IpAddr::V6(self.ip6)]
    }

    pub fn serve_tcp(&self, port: u16) -> Result<Server> {
        self.prober().serve_tcp(port)
    }

    pub fn serve_udp(&self, port: u16) -> Result<Server> {
        self.prober().serve_udp(port)
    }

    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().tcp_connect(addr, port, timeout)
    }

    pub fn udp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().udp_probe(addr, port, timeout)
    }

    pub fn ping(&self, addr: IpAddr, timeout: Duration) -> Outcome {
        self.prober().ping(addr, timeout)
    }

    pub fn tcp_hold(&self, addr: IpAddr, port: u16, timeout: Duration) -> Result<HeldConnection> {
        self.prober().tcp_hold(addr, port, timeout)
    }
}

/// A client outside the cluster: a namespace on the underlay, neither a node nor a
/// pod, that reaches every node's host address (and, as on a flat network, the
/// pod ranges) through that node's underlay address.
#[derive(Debug)]
pub struct ExternalClient {
    pub name: String,
    pub netns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    bin: ProbeBin,
}

impl ExternalClient {
    pub fn prober(&self) -> Prober {
        Prober::new(self.bin.clone(), &self.netns)
    }

    pub fn ips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ip4), IpAddr::V6(self.ip6)]
    }

    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().tcp_connect(addr, port, timeout)
    }

    pub fn udp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober().udp_probe(addr, port, timeout)
    }
}

/// One or more simulated nodes with their pods; everything is removed on drop.
#[derive(Debug)]
pub struct Topology {
    pub layout: Layout,
    transport: Transport,
    host_if_names: HostIfNames,
    tag: String,
    /// The hex digits of CNI-style host veth names ([`HostIfNames`]).
    hex_tag: String,
    bin: ProbeBin,
    // Field order is drop order: pods, then nodes, then external clients, then
    // the underlay.
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    externals: Vec<ExternalClient>,
    underlay: Option<Netns>,
    underlay_bridge: String,
}

impl Topology {
    /// One node, no pods.
    pub fn new(layout: Layout, bin: ProbeBin) -> Result<Self> {
        let tag = names::unique_tag();
        let underlay_bridge = format!("rf{tag}ul");
        let mut t = Topology {
            layout,
            transport: Transport::HostGw,
            host_if_names: HostIfNames::Kit,
            tag,
            hex_tag: hex_tag(),
            bin,
            pods: Vec::new(),
            nodes: Vec::new(),
            externals: Vec::new(),
            underlay: None,
            underlay_bridge,
        };
        t.create_node()?;
        Ok(t)
    }

    /// One node with the named pods on it.
    pub fn with_pods(layout: Layout, bin: ProbeBin, pods: &[&str]) -> Result<Self> {
        let mut t = Self::new(layout, bin)?;
        for p in pods {
            t.add_pod(0, p)?;
        }
        Ok(t)
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn host_if_names(&self) -> HostIfNames {
        self.host_if_names
    }

    /// How the host veths of the pods added from now on are named; only before the
    /// first pod, so one topology has one style.
    pub fn set_host_if_names(&mut self, names: HostIfNames) -> Result<()> {
        if !self.pods.is_empty() {
            bail!("the host veth names are chosen before the first pod");
        }
        self.host_if_names = names;
        Ok(())
    }

    /// The host veth name of the pod with index `index` in this topology.
    fn host_if_name(&self, index: usize) -> Result<String> {
        Ok(match self.host_if_names.prefix() {
            None => format!("rf{}p{index}", self.tag),
            Some(prefix) => {
                if index > 0xff {
                    bail!("at most 256 pods with {:?} names", self.host_if_names);
                }
                cni_style_name(prefix, &self.hex_tag, index)
            }
        })
    }

    /// How pod traffic will cross between nodes; only while there is one node
    /// (the pods it has already get the transport's MTU).
    pub fn set_transport(&mut self, transport: Transport) -> Result<()> {
        if self.nodes.len() > 1 {
            bail!("the transport is chosen before the second node");
        }
        self.transport = transport;
        if let Some(mtu) = self.pod_mtu() {
            let mtu = mtu.to_string();
            for node in &self.nodes {
                if let Some(br) = &node.bridge {
                    node.netns.ip(&["link", "set", br, "mtu", &mtu])?;
                }
            }
            for pod in self.pods.iter().filter(|p| p.wiring == Wiring::Veth) {
                let node = &self.nodes[pod.node];
                node.netns.ip(&["link", "set", &pod.host_if, "mtu", &mtu])?;
                pod.netns.ip(&["link", "set", &pod.pod_if, "mtu", &mtu])?;
            }
        }
        Ok(())
    }

    /// The MTU of the pods (and the bridge), if the transport shrinks it.
    fn pod_mtu(&self) -> Option<u32> {
        match self.transport {
            Transport::HostGw => None,
            Transport::Vxlan => Some(VXLAN_POD_MTU),
        }
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod called `name`; panics if there is none (test code).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in topology {}", self.tag))
    }

    /// The external client called `name`; panics if there is none (test code).
    pub fn external(&self, name: &str) -> &ExternalClient {
        self.externals
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no external client {name} in topology {}", self.tag))
    }

    /// Every namespace of this topology (nodes, pods, external clients, underlay).
    pub fn netns_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.netns.name().to_owned())
            .collect();
        v.extend(self.pods.iter().map(|p| p.netns.name().to_owned()));
        v.extend(self.externals.iter().map(|e| e.netns.name().to_owned()));
        v.extend(self.underlay.iter().map(|u| u.name().to_owned()));
        v
    }

    fn create_node(&mut self) -> Result<usize> {
        let n = self.nodes.len();
        if n > 250 {
            bail!("too many nodes");
        }
        let nb = n as u8;
        let netns = Netns::new(&format!("node{n}"))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            netns.sysctl(k, v)?;
        }
        let ip4 = Ipv4Addr::new(10, 0, 0, nb + 1);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, u16::from(nb) + 1);
        // The "dummy" module may be missing (it is here): a veth pair with both
        // ends in the node namespace stands in for the node's eth0.
        netns.ip(&[
            "link",
            "add",
            "host0",
            "type",
            "veth",
            "peer",
            "name",
            "host0peer",
        ])?;
        netns.ip(&["link", "set", "host0peer", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", "host0"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "host0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "host0", "up"])?;
        // A default route out of another device is what lets proxy ARP answer for
        // 169.254.1.1 (arp_fwd_proxy needs the route's device != the asking one).
        netns.ip(&["route", "add", "default", "dev", "host0"])?;
        netns.ip(&["-6", "route", "add", "default", "dev", "host0"])?;

        let pod_cidr4 = (Ipv4Addr::new(10, 244, nb, 0), 24);
        let pod_cidr6 = (
            Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(nb), 0, 0, 0, 0),
            64,
        );
        let (gateway4, gateway6, bridge) = match self.layout {
            Layout::Bridged => {
                let br = format!("rf{}br", self.tag);
                let g4 = Ipv4Addr::new(10, 244, nb, 1);
                let g6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(nb), 0, 0, 0, 1);
                netns.ip(&[
                    "link",
                    "add",
                    &br,
                    "type",
                    "bridge",
                    "forward_delay",
                    "0",
                    "mcast_snooping",
                    "0",
                ])?;
                if let Some(mtu) = self.pod_mtu() {
                    netns.ip(&["link", "set", &br, "mtu", &mtu.to_string()])?;
                }
                netns.ip(&["addr", "add", &format!("{g4}/24"), "dev", &br])?;
                netns.ip(&["addr", "add", &format!("{g6}/64"), "dev", &br, "nodad"])?;
                netns.ip(&["link", "set", &br, "up"])?;
                (g4, g6, Some(br))
            }
            Layout::Routed => (ROUTED_GATEWAY4, ROUTED_GATEWAY6, None),
        };
        self.nodes.push(Node {
            index: n,
            netns,
            ip4,
            ip6,
            gateway4,
            gateway6,
            pod_cidr4,
            pod_cidr6,
            macvlan_cidr4: (Ipv4Addr::new(10, 245, nb, 0), 24),
            macvlan_cidr6: (
                Ipv6Addr::new(0xfd00, 0x10, 0x245, u16::from(nb), 0, 0, 0, 0),
                64,
            ),
            bridge,
            underlay4: None,
            underlay6: None,
            macvlan: None,
            vxlan: None,
            bin: self.bin.clone(),
            pods_created: 0,
            macvlan_pods_created: 0,
        });
        Ok(n)
    }

    /// Adds a node joined to the others through an underlay bridge, with routes
    /// to every other node's pod CIDRs and host addresses. Returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let n = self.create_node()?;
        for i in 0..=n {
            if self.nodes[i].underlay4.is_none() {
                self.attach_underlay(i)?;
            }
            if self.transport == Transport::Vxlan && self.nodes[i].vxlan.is_none() {
                self.add_vteps(i)?;
            }
        }
        for m in 0..n {
            self.route_between(m, n)?;
            self.route_between(n, m)?;
        }
        for e in 0..self.externals.len() {
            self.route_external(e, n)?;
        }
        Ok(n)
    }

    /// Adds an external client `name` on the underlay (made now if this is a
    /// single node): client i has `10.1.0.(200+i)/24` and `fd00:10:1::(c8+i)/64`,
    /// and routes to every node's host address, pod CIDR and macvlan range via
    /// that node's underlay address (nodes added later too).
    pub fn add_external_client(&mut self, name: &str) -> Result<&ExternalClient> {
        if self.externals.iter().any(|e| e.name == name) {
            bail!("external client {name} exists");
        }
        let i = self.externals.len();
        if i >= 50 {
            bail!("too many external clients");
        }
        for n in 0..self.nodes.len() {
            if self.nodes[n].underlay4.is_none() {
                self.attach_underlay(n)?;
            }
        }
        let ul = self.underlay.as_ref().context("no underlay")?;
        let netns = Netns::new(&format!("ext-{name}"))?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let port = format!("rf{}x{i}", self.tag);
        ul.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        ul.ip(&["link", "set", &port, "master", &self.underlay_bridge, "up"])?;
        let ip4 = Ipv4Addr::new(10, 1, 0, 200 + i as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, 0xc8 + i as u16);
        netns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        self.externals.push(ExternalClient {
            name: name.to_owned(),
            netns,
            ip4,
            ip6,
            bin: self.bin.clone(),
        });
        for n in 0..self.nodes.len() {
            self.route_external(i, n)?;
        }
        Ok(self.externals.last().expect("just pushed"))
    }

    /// Routes in external client `e` towards node `n`'s host address and pods.
    fn route_external(&self, e: usize, n: usize) -> Result<()> {
        let (ext, node) = (&self.externals[e], &self.nodes[n]);
        let via4 = node.underlay4.context("no underlay")?.to_string();
        let via6 = node.underlay6.context("no underlay")?.to_string();
        for dst in [
            format!("{}/32", node.ip4),
            format!("{}/{}", node.pod_cidr4.0, node.pod_cidr4.1),
            format!("{}/{}", node.macvlan_cidr4.0, node.macvlan_cidr4.1),
        ] {
            ext.netns.ip(&["route", "add", &dst, "via", &via4])?;
        }
        for dst in [
            format!("{}/128", node.ip6),
            format!("{}/{}", node.pod_cidr6.0, node.pod_cidr6.1),
            format!("{}/{}", node.macvlan_cidr6.0, node.macvlan_cidr6.1),
        ] {
            ext.netns.ip(&["-6", "route", "add", &dst, "via", &via6])?;
        }
        Ok(())
    }

    fn attach_underlay(&mut self, i: usize) -> Result<()> {
        if self.underlay.is_none() {
            let ul = Netns::new("underlay")?;
            let br = &self.underlay_bridge;
            ul.ip(&[
                "link",
                "add",
                br,
                "type",
                "bridge",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ])?;
            ul.ip(&["link", "set", br, "up"])?;
            self.underlay = Some(ul);
        }
        let ul = self.underlay.as_ref().expect("just created");
        let node = &self.nodes[i];
        let port = format!("rf{}u{i}", self.tag);
        ul.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            node.netns.name(),
        ])?;
        ul.ip(&["link", "set", &port, "master", &self.underlay_bridge, "up"])?;
        let u4 = Ipv4Addr::new(10, 1, 0, i as u8 + 1);
        let u6 = Ipv6Addr::new(0xfd00, 0x10, 1, 0, 0, 0, 0, i as u16 + 1);
        node.netns
            .ip(&["addr", "add", &format!("{u4}/24"), "dev", "ul0"])?;
        node.netns
            .ip(&["addr", "add", &format!("{u6}/64"), "dev", "ul0", "nodad"])?;
        node.netns.ip(&["link", "set", "ul0", "up"])?;
        let node = &mut self.nodes[i];
        node.underlay4 = Some(u4);
        node.underlay6 = Some(u6);
        Ok(())
    }

    /// Routes in node `from` towards node `to`'s pods and host addresses.
    fn route_between(&self, from: usize, to: usize) -> Result<()> {
        let (f, t) = (&self.nodes[from], &self.nodes[to]);
        let via4 = t.underlay4.context("no underlay")?.to_string();
        let via6 = t.underlay6.context("no underlay")?.to_string();
        let ns = &f.netns;
        match self.transport {
            Transport::HostGw => {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("{}/{}", t.pod_cidr4.0, t.pod_cidr4.1),
                    "via",
                    &via4,
                ])?;
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("{}/{}", t.pod_cidr6.0, t.pod_cidr6.1),
                    "via",
                    &via6,
                ])?;
            }
            Transport::Vxlan => self.route_through_vxlan(from, to)?,
        }
        ns.ip(&["route", "add", &format!("{}/32", t.ip4), "via", &via4])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", t.ip6),
            "via",
            &via6,
        ])?;
        ns.ip(&[
            "route",
            "add",
            &format!("{}/{}", t.macvlan_cidr4.0, t.macvlan_cidr4.1),
            "via",
            &via4,
        ])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/{}", t.macvlan_cidr6.0, t.macvlan_cidr6.1),
            "via",
            &via6,
        ])?;
        Ok(())
    }

    /// Node `i`'s VXLAN devices (see the module docs), bound to its underlay
    /// addresses, each holding the node's VTEP address.
    fn add_vteps(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let u4 = node.underlay4.context("no underlay")?;
        let u6 = node.underlay6.context("no underlay")?;
        let (dev4, dev6) = (format!("rf{}vx", self.tag), format!("rf{}v6", self.tag));
        let vni = VXLAN_VNI.to_string();
        let port = VXLAN_PORT.to_string();
        for (dev, local, mac, vtep, mtu) in [
            (
                &dev4,
                IpAddr::from(u4),
                vtep_mac(i, 4),
                format!("{}/32", node.pod_cidr4.0),
                "1450",
            ),
            (
                &dev6,
                IpAddr::from(u6),
                vtep_mac(i, 6),
                format!("{}/128", node.pod_cidr6.0),
                "1430",
            ),
        ] {
            node.netns.ip(&[
                "link",
                "add",
                dev,
                "address",
                &mac,
                "mtu",
                mtu,
                "type",
                "vxlan",
                "id",
                &vni,
                "local",
                &local.to_string(),
                "dev",
                "ul0",
                "dstport",
                &port,
                "nolearning",
            ])?;
            node.netns
                .ip(&["addr", "add", &vtep, "dev", dev, "nodad"])?;
            node.netns.ip(&["link", "set", dev, "up"])?;
        }
        self.nodes[i].vxlan = Some([dev4, dev6]);
        Ok(())
    }

    /// What flanneld programs in node `from` for node `to` with the vxlan backend:
    /// per address family a route to `to`'s pod CIDR via its VTEP address (on-link
    /// on the VXLAN device), a permanent neighbour entry for that address, and the
    /// FDB entry that sends `to`'s VTEP MAC to its underlay address.
    fn route_through_vxlan(&self, from: usize, to: usize) -> Result<()> {
        let (f, t) = (&self.nodes[from], &self.nodes[to]);
        let [dev4, dev6] = f.vxlan.as_ref().context("no VXLAN device")?;
        let u4: IpAddr = t.underlay4.context("no underlay")?.into();
        let u6: IpAddr = t.underlay6.context("no underlay")?.into();
        for (family, dev, vtep, cidr, mac, underlay) in [
            (
                "-4",
                dev4,
                IpAddr::from(t.pod_cidr4.0),
                t.pod_cidr4.1,
                vtep_mac(to, 4),
                u4,
            ),
            (
                "-6",
                dev6,
                IpAddr::from(t.pod_cidr6.0),
                t.pod_cidr6.1,
                vtep_mac(to, 6),
                u6,
            ),
        ] {
            let vtep = vtep.to_string();
            f.netns.ip(&[
                family,
                "neigh",
                "replace",
                &vtep,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
            f.netns.ip(&[
                family,
                "route",
                "add",
                &format!("{vtep}/{cidr}"),
                "via",
                &vtep,
                "dev",
                dev,
                "onlink",
            ])?;
            f.netns.exec(&[
                "bridge",
                "fdb",
                "replace",
                &mac,
                "dev",
                dev,
                "dst",
                &underlay.to_string(),
                "self",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// kube-proxy's NAT for `service` (its NodePort on every node, its ClusterIPs),
    /// in every node's namespace. See [`crate::node_nat`].
    pub fn install_node_port(&self, service: &NodePortService) -> Result<()> {
        for node in &self.nodes {
            node_nat::install_node_port(node, service)?;
        }
        Ok(())
    }

    /// The CNI portmap plugin's NAT for `host_port`, on the node of its pod. See
    /// [`crate::node_nat`].
    pub fn install_host_port(&self, host_port: &HostPort) -> Result<()> {
        let pod = self
            .pods
            .iter()
            .find(|p| p.name == host_port.pod)
            .with_context(|| format!("no pod {} in topology {}", host_port.pod, self.tag))?;
        node_nat::install_host_port(&self.nodes[pod.node], pod, host_port)
    }

    /// Adds pod `name` on node `node`, wired by a macvlan instead of a veth (see
    /// the module docs): pod k of that kind gets `10.245.n.(10+k)` and
    /// `fd00:10:245:n::(10+k)`.
    pub fn add_macvlan_pod(&mut self, node: usize, name: &str) -> Result<&Pod> {
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} exists");
        }
        let tag = self.tag.clone();
        let index = self.pods.len();
        let n = self
            .nodes
            .get_mut(node)
            .with_context(|| format!("no node {node}"))?;
        let k = n.macvlan_pods_created;
        if k > 200 {
            bail!("too many macvlan pods on node {node}");
        }
        n.macvlan_pods_created += 1;
        let lower = format!("rf{tag}ml");
        if n.macvlan.is_none() {
            // The macvlans' lower device: a veth pair inside the node (the
            // "dummy" module may be missing), up at both ends.
            let ns = &n.netns;
            let mv = format!("rf{tag}mv");
            let peer = format!("rf{tag}mp");
            ns.ip(&["link", "add", &lower, "type", "veth", "peer", "name", &peer])?;
            ns.ip(&["link", "set", &peer, "up"])?;
            ns.ip(&["link", "set", &lower, "up"])?;
            ns.ip(&[
                "link", "add", &mv, "link", &lower, "type", "macvlan", "mode", "bridge",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{MACVLAN_GATEWAY6}/64"),
                "dev",
                &mv,
                "nodad",
            ])?;
            ns.ip(&["link", "set", &mv, "up"])?;
            n.macvlan = Some(mv);
        }
        let n = &self.nodes[node];
        let host_if = n.macvlan.clone().context("node macvlan")?;
        let nb = node as u8;
        let ip4 = Ipv4Addr::new(10, 245, nb, 10 + k as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0x245, u16::from(nb), 0, 0, 0, 10 + k as u16);
        let netns = Netns::new(&format!("pod-{name}"))?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let node_ns = &n.netns;
        let temp = format!("rf{tag}m{index}");
        node_ns.ip(&[
            "link", "add", &temp, "link", &lower, "type", "macvlan", "mode", "bridge",
        ])?;
        node_ns.ip(&["link", "set", &temp, "netns", netns.name()])?;
        let pod_if = "eth0".to_owned();
        netns.ip(&["link", "set", &temp, "name", &pod_if])?;
        netns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", &pod_if])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &pod_if,
            "nodad",
        ])?;
        netns.ip(&["link", "set", &pod_if, "up"])?;
        let node4 = n.ip4.to_string();
        netns.ip(&["route", "add", &node4, "dev", &pod_if, "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &node4, "dev", &pod_if])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &MACVLAN_GATEWAY6.to_string(),
            "dev",
            &pod_if,
        ])?;
        node_ns.ip(&[
            "route",
            "add",
            &format!("{ip4}/32"),
            "dev",
            &host_if,
            "src",
            &node4,
        ])?;
        node_ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            &host_if,
            "src",
            &n.ip6.to_string(),
        ])?;
        let host_ifindex = node_ns.ifindex(&host_if)?;
        let pod_ifindex = netns.ifindex(&pod_if)?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            netns,
            ip4,
            ip6,
            wiring: Wiring::Macvlan,
            host_if,
            host_ifindex,
            pod_if,
            pod_ifindex,
            bin: self.bin.clone(),
            cgroup: Mutex::new(None),
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Adds pod `name` on node `node` (an "outsider" is just a pod the test does
    /// not register with the policy). Names must be unique in the topology.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<&Pod> {
        if self.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} exists");
        }
        let layout = self.layout;
        let host_if = self.host_if_name(self.pods.len())?;
        let n = self
            .nodes
            .get_mut(node)
            .with_context(|| format!("no node {node}"))?;
        let k = n.pods_created;
        if k > 200 {
            bail!("too many pods on node {node}");
        }
        n.pods_created += 1;
        let n = &self.nodes[node];
        let nb = node as u8;
        let ip4 = Ipv4Addr::new(10, 244, nb, 10 + k as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(nb), 0, 0, 0, 10 + k as u16);
        let netns = Netns::new(&format!("pod-{name}"))?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let pod_if = "eth0".to_owned();
        let node_ns = &n.netns;
        node_ns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
            "netns",
            netns.name(),
        ])?;
        if let Some(mtu) = self.pod_mtu() {
            let mtu = mtu.to_string();
            node_ns.ip(&["link", "set", &host_if, "mtu", &mtu])?;
            netns.ip(&["link", "set", &pod_if, "mtu", &mtu])?;
        }
        match layout {
            Layout::Bridged => {
                let br = n.bridge.as_deref().context("bridged node without bridge")?;
                node_ns.ip(&["link", "set", &host_if, "master", br, "up"])?;
                // As flannel and the CNI bridge plugin (`hairpinMode`) do: a pod
                // reaching itself through a NAT of the node (its hostPort, a
                // Service it backs) gets its own packets back on its port.
                node_ns.ip(&[
                    "link",
                    "set",
                    "dev",
                    &host_if,
                    "type",
                    "bridge_slave",
                    "hairpin",
                    "on",
                ])?;
                netns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", &pod_if])?;
                netns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", &pod_if, "nodad"])?;
                netns.ip(&["link", "set", &pod_if, "up"])?;
                netns.ip(&["route", "add", "default", "via", &n.gateway4.to_string()])?;
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &n.gateway6.to_string(),
                ])?;
            }
            Layout::Routed => {
                node_ns.ip(&["link", "set", &host_if, "address", ROUTED_HOST_MAC])?;
                node_ns.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
                node_ns.sysctl(&format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0")?;
                node_ns.ip(&["link", "set", &host_if, "up"])?;
                node_ns.ip(&[
                    "route",
                    "add",
                    &format!("{ip4}/32"),
                    "dev",
                    &host_if,
                    "scope",
                    "link",
                ])?;
                node_ns.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
                netns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", &pod_if])?;
                netns.ip(&[
                    "addr",
                    "add",
                    &format!("{ip6}/128"),
                    "dev",
                    &pod_if,
                    "nodad",
                ])?;
                netns.ip(&["link", "set", &pod_if, "up"])?;
                let g4 = ROUTED_GATEWAY4.to_string();
                netns.ip(&["route", "add", &g4, "dev", &pod_if, "scope", "link"])?;
                netns.ip(&["route", "add", "default", "via", &g4, "dev", &pod_if])?;
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &ROUTED_GATEWAY6.to_string(),
                    "dev",
                    &pod_if,
                ])?;
            }
        }
        let host_ifindex = node_ns.ifindex(&host_if)?;
        let pod_ifindex = netns.ifindex(&pod_if)?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            netns,
            ip4,
            ip6,
            wiring: Wiring::Veth,
            host_if,
            host_ifindex,
            pod_if,
            pod_ifindex,
            bin: self.bin.clone(),
            cgroup: Mutex::new(None),
        });
        Ok(self.pods.last().expect("just pushed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_style_host_veth_names_fit_ifnamsiz_and_differ_per_topology_and_pod() {
        let (a, b) = (hex_tag(), hex_tag());
        assert_ne!(a, b);
        for names in HostIfNames::ALL {
            let Some(prefix) = names.prefix() else {
                continue;
            };
            let first = cni_style_name(prefix, &a, 0);
            let last = cni_style_name(prefix, &a, 0xff);
            for name in [&first, &last] {
                assert!(name.len() <= 15, "{name}");
                let hex = name.strip_prefix(prefix).expect("prefix");
                assert_eq!(hex.len(), 11, "{name}");
                assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
            }
            assert_ne!(first, last);
            assert_ne!(first, cni_style_name(prefix, &b, 0));
        }
    }
}
