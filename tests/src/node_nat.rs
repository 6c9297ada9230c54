//! What a node rewrites on behalf of others: kube-proxy's NodePorts and ClusterIPs
//! (its iptables mode, or its nftables mode: [`KubeProxyMode`]) and the CNI portmap
//! plugin's hostPorts, as `iptables`/`ip6tables` rules or `nft` transactions in a
//! simulated node's network namespace, plus the Kubernetes objects that describe
//! them (the Service and its EndpointSlices; the pod's `hostPort`), made from the
//! same description so the rules and the objects the agent reads cannot disagree.
//!
//! A node's kube-proxy mode is chosen with [`set_kube_proxy_mode`] before its first
//! Service (default: iptables) and read back from the node itself
//! ([`kube_proxy_mode`]: nftables when its `kube-proxy` table exists), so
//! [`crate::topology::Topology::install_node_port`] needs no argument for it.
//! Installing a Service again re-syncs its endpoints, as kube-proxy does after an
//! EndpointSlice edit. [`install_cluster_ips`] is the demo's plain ClusterIP DNAT in
//! either mode.
//!
//! kube-proxy, iptables mode (nat table, the chains and marks kube-proxy 1.28+ programs):
//!
//! ```text
//! PREROUTING, OUTPUT  -j KUBE-SERVICES
//! POSTROUTING         -j KUBE-POSTROUTING
//! KUBE-SERVICES       -d <clusterIP> -p tcp --dport <port> -j KUBE-SVC-<h>      (one per Service)
//!                     -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS            (always last)
//! KUBE-NODEPORTS      -p tcp --dport <nodePort> -j KUBE-EXT-<h>
//! KUBE-EXT-<h>        Cluster: -j KUBE-MARK-MASQ; -j KUBE-SVC-<h>
//!                     Local:   -s <cluster CIDR> -j KUBE-SVC-<h>                (pods: as Cluster)
//!                              -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ    (the node itself)
//!                              -m addrtype --src-type LOCAL -j KUBE-SVC-<h>
//!                              -j KUBE-SVL-<h>                                  (local endpoints only)
//! KUBE-SVC-<h>        ! -s <cluster CIDR> -d <clusterIP> ... -j KUBE-MARK-MASQ
//!                     [-m statistic --mode random --probability p] -j KUBE-SEP-<e>
//! KUBE-SEP-<e>        -s <endpoint> -j KUBE-MARK-MASQ                          (hairpin)
//!                     -p tcp -j DNAT --to-destination <endpoint>:<targetPort>
//! KUBE-MARK-MASQ      -j MARK --or-mark 0x4000
//! KUBE-POSTROUTING    -m mark ! --mark 0x4000/0x4000 -j RETURN
//!                     -j MARK --xor-mark 0x4000
//!                     -j MASQUERADE --random-fully
//! ```
//!
//! So with externalTrafficPolicy `Cluster` every NodePort connection (from outside,
//! from a pod, from the node) leaves towards its endpoint with the address of the
//! node's outgoing interface as its source (on a bridged node: the bridge's, the
//! pods' gateway; towards another node: the underlay address). With `Local` the
//! client's address stays and only endpoints on the node that received the
//! connection serve it (a node without one leaves the port alone: nothing listens,
//! the client is refused). The cluster CIDR is
//! [`crate::topology::CLUSTER_CIDR4`] / [`crate::topology::CLUSTER_CIDR6`].
//!
//! kube-proxy, nftables mode: what its nftables proxier (Kubernetes 1.31+,
//! `pkg/proxy/nftables`) writes, per family (`ip`/`ip6`, `ipv4_addr`/`ipv6_addr`), in table `kube-proxy`:
//!
//! ```text
//! filter-prerouting  type filter hook prerouting priority dstnat - 10 (-110); ct state new jump firewall-check
//! filter-input       type filter hook input priority -110;             ct state new jump endpoints-check
//! filter-forward     type filter hook forward priority -110;           ct state new jump endpoints-check
//! filter-output      type filter hook output priority -110;            ct state new jump endpoints-check
//!                                                                      ct state new jump firewall-check
//! nat-prerouting     type nat hook prerouting priority dstnat;         jump services
//! nat-output         type nat hook output priority dstnat (-100);      jump services
//! nat-postrouting    type nat hook postrouting priority srcnat;        jump masquerading
//! services           ip daddr . meta l4proto . th dport vmap @service-ips
//!                    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
//! endpoints-check    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
//!                    fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
//! firewall-check     ip daddr . meta l4proto . th dport vmap @firewall-ips
//! mark-for-masquerade mark set mark or 0x4000
//! masquerading       mark and 0x4000 == 0 return; mark set mark xor 0x4000; masquerade fully-random
//! reject-chain       reject
//! service-<h>-<ns>/<name>/<proto>/<port>        (a Service port, Cluster policy)
//!                    ip daddr <clusterIP> <proto> dport <port> ip saddr != <cluster CIDR> jump mark-for-masquerade
//!                    numgen random mod <n> vmap { 0 : goto endpoint-..., ... }
//! local-<h>-...      numgen random mod <n> vmap { ... }          (the node's own endpoints)
//! external-<h>-...   Cluster: jump mark-for-masquerade; goto service-...
//!                    Local:   ip saddr <cluster CIDR> goto service-...     (short-circuit pod traffic)
//!                             fib saddr type local jump mark-for-masquerade
//!                             fib saddr type local goto service-...       (the node itself)
//!                             goto local-...                              (if it has local endpoints)
//! endpoint-<h>-...__<ip>/<port>
//!                    ip saddr <ip> jump mark-for-masquerade       (hairpin)
//!                    meta l4proto <proto> dnat to <ip>:<port>
//! service-ips        { <clusterIP> . <proto> . <port> : goto service-... }
//! service-nodeports  { <proto> . <nodePort> : goto external-... }        (if it has endpoints)
//! no-endpoint-services  { <clusterIP> . <proto> . <port> : goto reject-chain }   (no endpoints)
//! no-endpoint-nodeports { <proto> . <nodePort> : goto reject-chain, or drop under
//!                         Local without a local endpoint }
//! ```
//!
//! The backend sees the same sources as in the iptables mode (the same masquerade
//! decisions, the same mark). Where kube-proxy's two modes differ, this follows
//! the nftables one: a Service without endpoints is rejected (`reject-chain`), and a
//! Local NodePort on a node without a local endpoint is dropped, not refused.
//! Hashes are 8 characters of this module's FNV hash rather than kube-proxy's
//! base32 SHA-256: the names only need to be stable and distinct.
//!
//! portmap (nat table, as the plugin programs a pod's `hostPort`):
//!
//! ```text
//! PREROUTING, OUTPUT  -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT         (inserted first)
//! POSTROUTING         -j CNI-HOSTPORT-MASQ                                      (inserted first)
//! CNI-HOSTPORT-DNAT   -p tcp -m multiport --dports <hostPort> -j CNI-DN-<h>
//! CNI-DN-<h>          -s <pod IP> -p tcp --dport <hostPort> -j CNI-HOSTPORT-SETMARK   (hairpin)
//!                     -s 127.0.0.1 (::1) -p tcp --dport <hostPort> -j CNI-HOSTPORT-SETMARK
//!                     -p tcp --dport <hostPort> -j DNAT --to-destination <pod IP>:<containerPort>
//! CNI-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000
//! CNI-HOSTPORT-MASQ   -m mark --mark 0x2000/0x2000 -j MASQUERADE
//! ```
//!
//! plus `route_localnet` on the pod's host interface (and the bridge), as the plugin
//! sets it for the localhost case. A hostPort connection keeps its source address
//! unless it is the pod itself (hairpin) or the node's loopback.
//!
//! On a bridged node the reply of a DNATed flow between two pods of one bridge is
//! bridged, not routed: as on a real kube-proxy node, `br_netfilter` must be loaded
//! and `net.bridge.bridge-nf-call-iptables` / `-ip6tables` are set to 1, inside the
//! node's namespace only (per-namespace since Linux 5.3).
//!
//! The same holds for the nftables mode: br_netfilter hands bridged packets to the
//! IP hooks, where the `ip`/`ip6 kube-proxy` tables' chains are.
//!
//! Must not: touch any namespace but the node's, or load anything but
//! `br_netfilter` (and that only when a bridged node needs it and it is missing).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::netns::Netns;
use crate::topology::{CLUSTER_CIDR4, CLUSTER_CIDR6, Node, Pod};

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const KUBE_MASQ_MARK: &str = "0x4000/0x4000";
/// The portmap plugin's masquerade mark (its default `markMasqBit` 13).
pub const PORTMAP_MASQ_MARK: &str = "0x2000/0x2000";

/// A transport protocol of a Service port or a hostPort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As the Kubernetes API spells it.
    pub fn api(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// `spec.externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any node forwards to any endpoint and masquerades (the default).
    Cluster,
    /// Only endpoints on the receiving node; the client address is kept.
    Local,
}

impl TrafficPolicy {
    pub fn api(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// `spec.type`: a LoadBalancer Service is a NodePort Service on the node (the
/// load balancer sends its traffic to `<node>:<nodePort>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    NodePort,
    LoadBalancer,
}

/// One endpoint (a backend pod) of a Service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub namespace: String,
    pub pod: String,
    /// Index of the node it runs on.
    pub node: usize,
    pub ips: Vec<IpAddr>,
}

impl Endpoint {
    /// The topology pod `pod`, in Kubernetes namespace `namespace`, dual-stack.
    pub fn of(namespace: &str, pod: &Pod) -> Self {
        Endpoint {
            namespace: namespace.to_owned(),
            pod: pod.name.clone(),
            node: pod.node,
            ips: pod.ips().to_vec(),
        }
    }
}

/// A Service of type NodePort (or LoadBalancer) with one port.
#[derive(Debug, Clone)]
pub struct NodePortService {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceType,
    pub protocol: Protocol,
    /// The Service port (on its ClusterIPs).
    pub port: u16,
    /// Where the endpoints listen (`targetPort`, numeric).
    pub target_port: u16,
    pub node_port: u16,
    /// One per family the Service has (`spec.clusterIPs`, `ipFamilies` follow).
    pub cluster_ips: Vec<IpAddr>,
    pub external_traffic_policy: TrafficPolicy,
    pub endpoints: Vec<Endpoint>,
}

impl NodePortService {
    /// A TCP NodePort Service, policy Cluster, no endpoints yet.
    pub fn tcp(namespace: &str, name: &str, port: u16, node_port: u16) -> Self {
        NodePortService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            kind: ServiceType::NodePort,
            protocol: Protocol::Tcp,
            port,
            target_port: port,
            node_port,
            cluster_ips: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            endpoints: Vec::new(),
        }
    }

    /// The endpoints' addresses of one family.
    fn endpoint_ips(&self, v6: bool) -> Vec<(usize, IpAddr)> {
        self.endpoints
            .iter()
            .flat_map(|e| e.ips.iter().map(move |ip| (e.node, *ip)))
            .filter(|(_, ip)| ip.is_ipv6() == v6)
            .collect()
    }

    /// The Service's families (false: IPv4), in the order of its ClusterIPs.
    fn families(&self) -> Vec<bool> {
        let mut v = Vec::new();
        for ip in &self.cluster_ips {
            if !v.contains(&ip.is_ipv6()) {
                v.push(ip.is_ipv6());
            }
        }
        v
    }

    /// The Service and one EndpointSlice per family, as the API server and the
    /// EndpointSlice controller would have them; `node_name(i)` names node i.
    pub fn manifests(&self, node_name: &dyn Fn(usize) -> String) -> Vec<Value> {
        let port_name = format!("p{}", self.port);
        let families: Vec<&str> = self
            .families()
            .into_iter()
            .map(|v6| if v6 { "IPv6" } else { "IPv4" })
            .collect();
        let ips: Vec<String> = self.cluster_ips.iter().map(IpAddr::to_string).collect();
        let mut service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": format!("svc-{}-{}", self.namespace, self.name)},
            "spec": {
                "type": match self.kind {
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                },
                "clusterIP": ips.first(),
                "clusterIPs": ips,
                "ipFamilies": families,
                "ipFamilyPolicy": if families.len() > 1 { "PreferDualStack" } else { "SingleStack" },
                "externalTrafficPolicy": self.external_traffic_policy.api(),
                "ports": [{
                    "name": port_name, "protocol": self.protocol.api(), "port": self.port,
                    "targetPort": self.target_port, "nodePort": self.node_port,
                }],
            },
        });
        if self.kind == ServiceType::LoadBalancer {
            service["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.80"}]}});
        }
        let mut docs = vec![service];
        for (family, v6) in families.iter().zip(self.families()) {
            let endpoints: Vec<Value> = self
                .endpoints
                .iter()
                .filter_map(|e| {
                    let addresses: Vec<String> = e
                        .ips
                        .iter()
                        .filter(|ip| ip.is_ipv6() == v6)
                        .map(IpAddr::to_string)
                        .collect();
                    (!addresses.is_empty()).then(|| {
                        json!({
                            "addresses": addresses,
                            "conditions": {"ready": true, "serving": true, "terminating": false},
                            "nodeName": node_name(e.node),
                            "targetRef": {"kind": "Pod", "namespace": e.namespace, "name": e.pod},
                        })
                    })
                })
                .collect();
            docs.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-{}", self.name, family.to_lowercase()),
                    "namespace": self.namespace,
                    "labels": {
                        "kubernetes.io/service-name": self.name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                },
                "addressType": family,
                "endpoints": endpoints,
                "ports": [{"name": port_name, "protocol": self.protocol.api(), "port": self.target_port}],
            }));
        }
        docs
    }
}

/// A pod's `hostPort`, DNATed by the portmap plugin on the pod's node.
#[derive(Debug, Clone)]
pub struct HostPort {
    /// The topology pod.
    pub pod: String,
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
}

impl HostPort {
    pub fn tcp(pod: &str, host_port: u16, container_port: u16) -> Self {
        HostPort {
            pod: pod.to_owned(),
            protocol: Protocol::Tcp,
            host_port,
            container_port,
        }
    }

    /// The container port entry that declares it (`spec.containers[].ports[]`).
    pub fn container_port_entry(&self) -> Value {
        json!({
            "name": format!("hp{}", self.host_port),
            "containerPort": self.container_port,
            "hostPort": self.host_port,
            "protocol": self.protocol.api(),
        })
    }

    /// `pod` (a Pod object) with this hostPort added to its first container.
    pub fn add_to(&self, mut pod: Value) -> Value {
        let container = &mut pod["spec"]["containers"][0];
        if !container["ports"].is_array() {
            container["ports"] = json!([]);
        }
        if let Some(ports) = container["ports"].as_array_mut() {
            ports.push(self.container_port_entry());
        }
        pod
    }
}

/// A short, stable chain suffix (kube-proxy and portmap hash their names too).
fn chain_hash(what: &str) -> String {
    // FNV-1a, 64 bits, in 13 base32 characters.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in what.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..13)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

fn tool(v6: bool) -> &'static str {
    if v6 { "ip6tables" } else { "iptables" }
}

/// `iptables -w -t nat ARGS` (or ip6tables) in the node's namespace.
fn nat(ns: &Netns, v6: bool, args: &[&str]) -> Result<()> {
    let mut argv = vec![tool(v6), "-w", "-t", "nat"];
    argv.extend_from_slice(args);
    ns.exec(&argv).map(drop)
}

fn chain_exists(ns: &Netns, v6: bool, chain: &str) -> bool {
    ns.exec(&[tool(v6), "-w", "-t", "nat", "-S", chain]).is_ok()
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

fn cluster_cidr(v6: bool) -> String {
    if v6 {
        format!("{}/{}", CLUSTER_CIDR6.0, CLUSTER_CIDR6.1)
    } else {
        format!("{}/{}", CLUSTER_CIDR4.0, CLUSTER_CIDR4.1)
    }
}

/// br_netfilter provides the `net.bridge.*` sysctls; bridged nodes need
/// `bridge-nf-call-ip(6)tables` for DNATed flows between pods of one bridge.
fn bridge_netfilter(node: &Node) -> Result<()> {
    if node.bridge.is_none() {
        return Ok(());
    }
    if !Path::new("/proc/sys/net/bridge").exists() {
        let st = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status()
            .context("running modprobe br_netfilter")?;
        if !st.success() {
            bail!("modprobe br_netfilter failed: bridged NodePort and hostPort NAT need it");
        }
    }
    for key in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ] {
        node.netns
            .sysctl(key, "1")
            .with_context(|| format!("{key} in node {}", node.index))?;
    }
    Ok(())
}

/// kube-proxy's own chains, once per node and family.
fn kube_proxy_base(ns: &Netns, v6: bool) -> Result<()> {
    if chain_exists(ns, v6, "KUBE-SERVICES") {
        return Ok(());
    }
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        nat(ns, v6, &["-N", chain])?;
    }
    let portals = ["-m", "comment", "--comment", "kubernetes service portals"];
    for hook in ["PREROUTING", "OUTPUT"] {
        let mut args = vec!["-A", hook];
        args.extend_from_slice(&portals);
        args.extend_from_slice(&["-j", "KUBE-SERVICES"]);
        nat(ns, v6, &args)?;
    }
    nat(
        ns,
        v6,
        &[
            "-A",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes postrouting rules",
            "-j",
            "KUBE-POSTROUTING",
        ],
    )?;
    nat(
        ns,
        v6,
        &["-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000"],
    )?;
    nat(
        ns,
        v6,
        &[
            "-A",
            "KUBE-POSTROUTING",
            "-m",
            "mark",
            "!",
            "--mark",
            KUBE_MASQ_MARK,
            "-j",
            "RETURN",
        ],
    )?;
    nat(
        ns,
        v6,
        &[
            "-A",
            "KUBE-POSTROUTING",
            "-j",
            "MARK",
            "--xor-mark",
            "0x4000",
        ],
    )?;
    nat(
        ns,
        v6,
        &[
            "-A",
            "KUBE-POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes service traffic requiring SNAT",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ],
    )?;
    nat(
        ns,
        v6,
        &[
            "-A",
            "KUBE-SERVICES",
            "-m",
            "comment",
            "--comment",
            "kubernetes service nodeports; NOTE: this must be the last rule in this chain",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            "KUBE-NODEPORTS",
        ],
    )
}

/// kube-proxy's iptables rules for `svc` on `node`, for every family it has. Run
/// again for the same Service it re-syncs its endpoints (the Service and
/// external chains stay, the endpoint jumps are rewritten).
fn install_node_port_iptables(node: &Node, svc: &NodePortService) -> Result<()> {
    let ns = &node.netns;
    let proto = svc.protocol.iptables();
    let port_name = format!("{}/{}:p{}", svc.namespace, svc.name, svc.port);
    for v6 in svc.families() {
        kube_proxy_base(ns, v6)?;
        let h = chain_hash(&format!("{port_name}/{proto}"));
        let (svc_chain, ext_chain, svl_chain) = (
            format!("KUBE-SVC-{h}"),
            format!("KUBE-EXT-{h}"),
            format!("KUBE-SVL-{h}"),
        );
        let fresh = !chain_exists(ns, v6, &svc_chain);
        if fresh {
            for chain in [&svc_chain, &ext_chain, &svl_chain] {
                nat(ns, v6, &["-N", chain])?;
            }
        } else {
            for chain in [&svc_chain, &svl_chain] {
                nat(ns, v6, &["-F", chain])?;
            }
        }
        let cidr = cluster_cidr(v6);
        let port = svc.port.to_string();
        // ClusterIPs, ahead of the NodePorts rule (which stays last).
        for ip in svc.cluster_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
            let dst = host(*ip);
            if fresh {
                nat(
                    ns,
                    v6,
                    &[
                        "-I",
                        "KUBE-SERVICES",
                        "1",
                        "-d",
                        &dst,
                        "-p",
                        proto,
                        "-m",
                        "comment",
                        "--comment",
                        &format!("{port_name} cluster IP"),
                        "-m",
                        proto,
                        "--dport",
                        &port,
                        "-j",
                        &svc_chain,
                    ],
                )?;
            }
            nat(
                ns,
                v6,
                &[
                    "-A",
                    &svc_chain,
                    "!",
                    "-s",
                    &cidr,
                    "-d",
                    &dst,
                    "-p",
                    proto,
                    "-m",
                    proto,
                    "--dport",
                    &port,
                    "-j",
                    "KUBE-MARK-MASQ",
                ],
            )?;
        }
        if fresh {
            node_port_jumps(
                ns,
                v6,
                svc,
                &port_name,
                (&ext_chain, &svc_chain, &svl_chain),
            )?;
        }
        let endpoints = svc.endpoint_ips(v6);
        let local: Vec<(usize, IpAddr)> = endpoints
            .iter()
            .copied()
            .filter(|(n, _)| *n == node.index)
            .collect();
        for (chain, list) in [(&svc_chain, &endpoints), (&svl_chain, &local)] {
            for (i, (_, ip)) in list.iter().enumerate() {
                let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{port_name}/{ip}")));
                if !chain_exists(ns, v6, &sep) {
                    nat(ns, v6, &["-N", &sep])?;
                    nat(
                        ns,
                        v6,
                        &["-A", &sep, "-s", &host(*ip), "-j", "KUBE-MARK-MASQ"],
                    )?;
                    nat(
                        ns,
                        v6,
                        &[
                            "-A",
                            &sep,
                            "-p",
                            proto,
                            "-m",
                            proto,
                            "-j",
                            "DNAT",
                            "--to-destination",
                            &socket(*ip, svc.target_port),
                        ],
                    )?;
                }
                let left = list.len() - i;
                if left > 1 {
                    let p = format!("{:.10}", 1.0 / left as f64);
                    nat(
                        ns,
                        v6,
                        &[
                            "-A",
                            chain,
                            "-m",
                            "statistic",
                            "--mode",
                            "random",
                            "--probability",
                            &p,
                            "-j",
                            &sep,
                        ],
                    )?;
                } else {
                    nat(ns, v6, &["-A", chain, "-j", &sep])?;
                }
            }
        }
    }
    Ok(())
}

/// The NodePort's jump and its external chain (they do not depend on the endpoints).
fn node_port_jumps(
    ns: &Netns,
    v6: bool,
    svc: &NodePortService,
    port_name: &str,
    (ext_chain, svc_chain, svl_chain): (&str, &str, &str),
) -> Result<()> {
    let proto = svc.protocol.iptables();
    let cidr = cluster_cidr(v6);
    let node_port = svc.node_port.to_string();

    nat(
        ns,
        v6,
        &[
            "-A",
            "KUBE-NODEPORTS",
            "-p",
            proto,
            "-m",
            "comment",
            "--comment",
            port_name,
            "-m",
            proto,
            "--dport",
            &node_port,
            "-j",
            ext_chain,
        ],
    )?;
    match svc.external_traffic_policy {
        TrafficPolicy::Cluster => {
            nat(
                ns,
                v6,
                &[
                    "-A",
                    ext_chain,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("masquerade traffic for {port_name} external destinations"),
                    "-j",
                    "KUBE-MARK-MASQ",
                ],
            )?;
            nat(ns, v6, &["-A", ext_chain, "-j", svc_chain])?;
        }
        TrafficPolicy::Local => {
            nat(
                ns,
                v6,
                &[
                    "-A",
                    ext_chain,
                    "-s",
                    &cidr,
                    "-m",
                    "comment",
                    "--comment",
                    &format!("pod traffic for {port_name} external destinations"),
                    "-j",
                    svc_chain,
                ],
            )?;
            for target in ["KUBE-MARK-MASQ", svc_chain] {
                nat(
                    ns,
                    v6,
                    &[
                        "-A",
                        ext_chain,
                        "-m",
                        "comment",
                        "--comment",
                        &format!("LOCAL traffic for {port_name} external destinations"),
                        "-m",
                        "addrtype",
                        "--src-type",
                        "LOCAL",
                        "-j",
                        target,
                    ],
                )?;
            }
            nat(ns, v6, &["-A", ext_chain, "-j", svl_chain])?;
        }
    }
    Ok(())
}

/// Which of kube-proxy's proxiers programs a node's Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KubeProxyMode {
    /// `--proxy-mode=iptables`: the `nat` table's `KUBE-*` chains (the default).
    #[default]
    Iptables,
    /// `--proxy-mode=nftables` (Kubernetes 1.31+): tables `ip kube-proxy` and
    /// `ip6 kube-proxy`, written with `nft -f -` transactions.
    Nftables,
}

/// Starts kube-proxy in `mode` on each of `nodes`: its base tables and chains, as
/// it writes them at start-up, before any Service. Later
/// [`crate::topology::Topology::install_node_port`] calls on these nodes use that
/// mode; a node never set is in iptables mode. A node holds one mode: setting the
/// other one once Services are programmed is an error.
pub fn set_kube_proxy_mode(nodes: &[Node], mode: KubeProxyMode) -> Result<()> {
    for node in nodes {
        bridge_netfilter(node)?;
        let ns = &node.netns;
        let current = kube_proxy_mode(node);
        let has_iptables = chain_exists(ns, false, "KUBE-SERVICES");
        match mode {
            KubeProxyMode::Iptables if current == KubeProxyMode::Nftables => bail!(
                "node {} already runs kube-proxy in nftables mode",
                node.index
            ),
            KubeProxyMode::Nftables if has_iptables => bail!(
                "node {} already has kube-proxy's iptables rules",
                node.index
            ),
            KubeProxyMode::Iptables => {
                for v6 in [false, true] {
                    kube_proxy_base(ns, v6)?;
                }
            }
            KubeProxyMode::Nftables => {
                for v6 in [false, true] {
                    nft_base(ns, v6)?;
                }
            }
        }
    }
    Ok(())
}

/// The mode kube-proxy runs in on `node`: nftables when its `kube-proxy` table
/// exists there (so a machine without `nft` is always in iptables mode).
pub fn kube_proxy_mode(node: &Node) -> KubeProxyMode {
    if nft_table_exists(&node.netns, false) || nft_table_exists(&node.netns, true) {
        KubeProxyMode::Nftables
    } else {
        KubeProxyMode::Iptables
    }
}

/// kube-proxy's rules for `svc` on `node`, for every family it has, in the mode
/// kube-proxy runs in there ([`set_kube_proxy_mode`]). Run again for the same
/// Service (after an edit of its endpoints) it re-syncs, as kube-proxy does.
pub(crate) fn install_node_port(node: &Node, svc: &NodePortService) -> Result<()> {
    if svc.cluster_ips.is_empty() {
        bail!(
            "Service {}/{} has no ClusterIP: its families follow its ClusterIPs",
            svc.namespace,
            svc.name
        );
    }
    bridge_netfilter(node)?;
    match kube_proxy_mode(node) {
        KubeProxyMode::Iptables => install_node_port_iptables(node, svc),
        KubeProxyMode::Nftables => {
            let endpoints: Vec<(usize, IpAddr)> = svc
                .endpoints
                .iter()
                .flat_map(|e| e.ips.iter().map(move |ip| (e.node, *ip)))
                .collect();
            nft_service(
                node,
                &NftService {
                    namespace: &svc.namespace,
                    name: &svc.name,
                    protocol: svc.protocol,
                    port: svc.port,
                    target_port: svc.target_port,
                    cluster_ips: &svc.cluster_ips,
                    node_port: Some((svc.node_port, svc.external_traffic_policy)),
                    endpoints: &endpoints,
                },
            )
        }
    }
}

/// A ClusterIP port DNATed to one backend (a ClusterIP Service with one endpoint,
/// as the demo has them).
#[derive(Debug, Clone)]
pub struct ClusterIpRule {
    /// The Service's namespace and name (kube-proxy names its chains after them).
    pub namespace: String,
    pub name: String,
    pub cluster_ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub backend: IpAddr,
    /// Where the backend listens.
    pub target_port: u16,
}

/// The DNAT of `rules` on `node`, from pods (prerouting) and from the node itself
/// (output), in `mode`:
/// - [`KubeProxyMode::Iptables`]: one chain `RF-SERVICES` in the `nat` table
///   (jumped to from PREROUTING and OUTPUT), `-d <clusterIP> -p <proto> --dport
///   <port> -j DNAT --to-destination <backend>:<targetPort>` per rule; no
///   masquerade. Added ahead of any NodePort Service's ClusterIP rules.
/// - [`KubeProxyMode::Nftables`]: kube-proxy's `service-ips` element, Service and
///   endpoint chains (rules of one Service and protocol and port are one Service
///   with several endpoints), starting kube-proxy there if it is not yet.
///
/// On a bridged node the caller loads `br_netfilter` (bridged replies of DNATed
/// flows must see conntrack).
pub fn install_cluster_ips(
    node: &Node,
    mode: KubeProxyMode,
    rules: &[ClusterIpRule],
) -> Result<()> {
    let ns = &node.netns;
    match mode {
        KubeProxyMode::Iptables => {
            for v6 in [false, true] {
                let family: Vec<&ClusterIpRule> = rules
                    .iter()
                    .filter(|r| r.cluster_ip.is_ipv6() == v6)
                    .collect();
                if family.is_empty() {
                    continue;
                }
                if !chain_exists(ns, v6, "RF-SERVICES") {
                    nat(ns, v6, &["-N", "RF-SERVICES"])?;
                    nat(ns, v6, &["-A", "PREROUTING", "-j", "RF-SERVICES"])?;
                    nat(ns, v6, &["-A", "OUTPUT", "-j", "RF-SERVICES"])?;
                }
                for r in family {
                    if r.backend.is_ipv6() != v6 {
                        bail!(
                            "ClusterIP rule {}/{}: backend {} is not of the ClusterIP {}'s family",
                            r.namespace,
                            r.name,
                            r.backend,
                            r.cluster_ip
                        );
                    }
                    nat(
                        ns,
                        v6,
                        &[
                            "-A",
                            "RF-SERVICES",
                            "-d",
                            &host(r.cluster_ip),
                            "-p",
                            r.protocol.iptables(),
                            "--dport",
                            &r.port.to_string(),
                            "-j",
                            "DNAT",
                            "--to-destination",
                            &socket(r.backend, r.target_port),
                        ],
                    )?;
                }
            }
            Ok(())
        }
        KubeProxyMode::Nftables => {
            if kube_proxy_mode(node) != KubeProxyMode::Nftables {
                set_kube_proxy_mode(std::slice::from_ref(node), KubeProxyMode::Nftables)?;
            }
            // One Service per (namespace, name, protocol, port, targetPort): its
            // ClusterIPs and its backends.
            let mut services: Vec<(&ClusterIpRule, ServiceAddresses)> = Vec::new();
            for r in rules {
                let key = |k: &ClusterIpRule| {
                    (
                        k.namespace.clone(),
                        k.name.clone(),
                        k.protocol,
                        k.port,
                        k.target_port,
                    )
                };
                let i = match services.iter().position(|(s, _)| key(s) == key(r)) {
                    Some(i) => i,
                    None => {
                        services.push((r, ServiceAddresses::default()));
                        services.len() - 1
                    }
                };
                let found = &mut services[i].1;
                if !found.cluster_ips.contains(&r.cluster_ip) {
                    found.cluster_ips.push(r.cluster_ip);
                }
                if !found.endpoints.iter().any(|(_, ip)| *ip == r.backend) {
                    found.endpoints.push((node.index, r.backend));
                }
            }
            for (r, found) in &services {
                nft_service(
                    node,
                    &NftService {
                        namespace: &r.namespace,
                        name: &r.name,
                        protocol: r.protocol,
                        port: r.port,
                        target_port: r.target_port,
                        cluster_ips: &found.cluster_ips,
                        node_port: None,
                        endpoints: &found.endpoints,
                    },
                )?;
            }
            Ok(())
        }
    }
}

/// What kube-proxy's IPVS mode does to a node's addresses: every ClusterIP bound
/// to the dummy device `kube-ipvs0` (created if missing, left down as kube-proxy
/// leaves it), so that the node's stack takes them as local addresses. Where the
/// kernel has no dummy driver, a bridge without ports stands in (to the stack the
/// same: a down device holding addresses). The lab cannot run IPVS itself (the
/// kernel has no `IP_VS`): the DNAT stays with the node's iptables or nftables
/// rules. Only the node's addresses change.
pub fn bind_to_kube_ipvs0(node: &Node, cluster_ips: &[IpAddr]) -> Result<()> {
    let ns = &node.netns;
    if ns.ip(&["link", "show", "kube-ipvs0"]).is_err()
        && ns
            .ip(&["link", "add", "kube-ipvs0", "type", "dummy"])
            .is_err()
    {
        ns.ip(&["link", "add", "kube-ipvs0", "type", "bridge"])?;
    }
    for ip in cluster_ips {
        ns.ip(&["addr", "add", &host(*ip), "dev", "kube-ipvs0"])?;
    }
    Ok(())
}

// --- kube-proxy's nftables mode (the module header shows its layout) ---

/// A plain ClusterIP Service's addresses, gathered from its [`ClusterIpRule`]s.
#[derive(Default)]
struct ServiceAddresses {
    cluster_ips: Vec<IpAddr>,
    /// (node index, backend address).
    endpoints: Vec<(usize, IpAddr)>,
}

/// One Service port as the nftables writer needs it.
struct NftService<'a> {
    namespace: &'a str,
    name: &'a str,
    protocol: Protocol,
    port: u16,
    target_port: u16,
    cluster_ips: &'a [IpAddr],
    /// The nodePort and its externalTrafficPolicy, for a NodePort Service.
    node_port: Option<(u16, TrafficPolicy)>,
    /// (node index, address) of every endpoint, both families.
    endpoints: &'a [(usize, IpAddr)],
}

/// kube-proxy's masquerade mark, as its nftables proxier writes it.
const NFT_MASQ_MARK: &str = "0x4000";

fn nft_family(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

fn nft_table_exists(ns: &Netns, v6: bool) -> bool {
    ns.exec(&["nft", "list", "table", nft_family(v6), "kube-proxy"])
        .is_ok()
}

/// `nft -f -` with `script` in the node's namespace: one transaction, all or
/// nothing.
fn nft_apply(ns: &Netns, script: &str) -> Result<()> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = ns
        .cmd("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (Debian package nftables; `cargo xtask setup` installs it)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft -f - in netns {}: {}\n{script}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// kube-proxy's table, base chains, dispatch maps and masquerade chains, once per
/// node and family.
fn nft_base(ns: &Netns, v6: bool) -> Result<()> {
    if nft_table_exists(ns, v6) {
        return Ok(());
    }
    let fam = nft_family(v6);
    let (addr, no_localhost) = if v6 {
        ("ipv6_addr", "ip6 daddr != ::1")
    } else {
        ("ipv4_addr", "ip daddr != 127.0.0.0/8")
    };
    let t = format!("{fam} kube-proxy");
    let mut s = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    for (chain, kind, hook, priority) in [
        // dstnat is -100; older nft (Debian 12's 1.0.6) only names it on the
        // prerouting hook, so the others are written as numbers.
        ("filter-prerouting", "filter", "prerouting", "-110"),
        ("filter-input", "filter", "input", "-110"),
        ("filter-forward", "filter", "forward", "-110"),
        ("filter-output", "filter", "output", "-110"),
        ("nat-prerouting", "nat", "prerouting", "dstnat"),
        ("nat-output", "nat", "output", "-100"),
        ("nat-postrouting", "nat", "postrouting", "srcnat"),
    ] {
        s += &format!(
            "add chain {t} {chain} {{ type {kind} hook {hook} priority {priority} ; policy accept ; }}\n"
        );
    }
    for chain in [
        "endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        s += &format!("add chain {t} {chain}\n");
    }
    for (map, key, comment) in [
        (
            "service-ips",
            format!("{addr} . inet_proto . inet_service"),
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            "service-nodeports",
            "inet_proto . inet_service".to_owned(),
            "NodePort traffic",
        ),
        (
            "no-endpoint-services",
            format!("{addr} . inet_proto . inet_service"),
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "no-endpoint-nodeports",
            "inet_proto . inet_service".to_owned(),
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "firewall-ips",
            format!("{addr} . inet_proto . inet_service"),
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
    ] {
        s += &format!("add map {t} {map} {{ type {key} : verdict ; comment \"{comment}\" ; }}\n");
    }
    for (chain, rule) in [
        (
            "filter-input",
            "ct state new jump endpoints-check".to_owned(),
        ),
        (
            "filter-forward",
            "ct state new jump endpoints-check".to_owned(),
        ),
        (
            "filter-output",
            "ct state new jump endpoints-check".to_owned(),
        ),
        (
            "filter-prerouting",
            "ct state new jump firewall-check".to_owned(),
        ),
        (
            "filter-output",
            "ct state new jump firewall-check".to_owned(),
        ),
        ("nat-output", "jump services".to_owned()),
        ("nat-prerouting", "jump services".to_owned()),
        ("nat-postrouting", "jump masquerading".to_owned()),
        (
            "mark-for-masquerade",
            format!("mark set mark or {NFT_MASQ_MARK}"),
        ),
        (
            "masquerading",
            format!("mark and {NFT_MASQ_MARK} == 0 return"),
        ),
        ("masquerading", format!("mark set mark xor {NFT_MASQ_MARK}")),
        ("masquerading", "masquerade fully-random".to_owned()),
        ("reject-chain", "reject".to_owned()),
        (
            "endpoints-check",
            format!("{fam} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
        ),
        (
            "endpoints-check",
            format!(
                "fib daddr type local {no_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports"
            ),
        ),
        (
            "firewall-check",
            format!("{fam} daddr . meta l4proto . th dport vmap @firewall-ips"),
        ),
        (
            "services",
            format!("{fam} daddr . meta l4proto . th dport vmap @service-ips"),
        ),
        (
            "services",
            format!(
                "fib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports"
            ),
        ),
    ] {
        s += &format!("add rule {t} {chain} {rule}\n");
    }
    nft_apply(ns, &s)
}

/// Whether `map` of the node's kube-proxy table has an element `key`.
fn nft_element_exists(ns: &Netns, v6: bool, map: &str, key: &str) -> bool {
    ns.exec(&[
        "nft",
        "get",
        "element",
        nft_family(v6),
        "kube-proxy",
        map,
        &format!("{{ {key} }}"),
    ])
    .is_ok()
}

/// Transaction lines that leave `key` in `map` with `verdict` (`None`: absent),
/// whatever it held before.
fn nft_set_element(ns: &Netns, v6: bool, map: &str, key: &str, verdict: Option<&str>) -> String {
    let t = format!("{} kube-proxy", nft_family(v6));
    let mut s = String::new();
    if nft_element_exists(ns, v6, map, key) {
        s += &format!("delete element {t} {map} {{ {key} }}\n");
    }
    if let Some(verdict) = verdict {
        s += &format!("add element {t} {map} {{ {key} : {verdict} }}\n");
    }
    s
}

/// `add chain` + `flush chain`: the chain exists and is empty (kube-proxy's
/// `ensureChain`), so a re-sync rewrites it.
fn nft_fresh_chain(t: &str, chain: &str) -> String {
    format!("add chain {t} {chain}\nflush chain {t} {chain}\n")
}

/// `numgen random mod n vmap { 0 : goto c0, ... }`: one of `chains`, uniformly.
fn nft_pick(chains: &[String]) -> String {
    let arms: Vec<String> = chains
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{i} : goto {c}"))
        .collect();
    format!(
        "numgen random mod {} vmap {{ {} }}",
        chains.len(),
        arms.join(", ")
    )
}

/// kube-proxy's nftables rules for one Service port on `node`, every family it
/// has, in one transaction per family.
fn nft_service(node: &Node, svc: &NftService) -> Result<()> {
    let ns = &node.netns;
    let proto = svc.protocol.iptables();
    let base_name = format!("{}/{}/{proto}/p{}", svc.namespace, svc.name, svc.port);
    let base = format!("{}-{base_name}", &chain_hash(&base_name)[..8]);
    let (svc_chain, local_chain, ext_chain) = (
        format!("service-{base}"),
        format!("local-{base}"),
        format!("external-{base}"),
    );
    let mut families: Vec<bool> = Vec::new();
    for ip in svc.cluster_ips {
        if !families.contains(&ip.is_ipv6()) {
            families.push(ip.is_ipv6());
        }
    }
    for v6 in families {
        nft_base(ns, v6)?;
        let fam = nft_family(v6);
        let t = format!("{fam} kube-proxy");
        let cidr = cluster_cidr(v6);
        let endpoints: Vec<(usize, IpAddr)> = svc
            .endpoints
            .iter()
            .copied()
            .filter(|(_, ip)| ip.is_ipv6() == v6)
            .collect();
        let endpoint_chain = |ip: IpAddr| {
            let name = format!(
                "{base_name}__{}/{}",
                ip.to_string().replace(':', "."),
                svc.target_port
            );
            format!("endpoint-{}-{name}", &chain_hash(&name)[..8])
        };
        let all: Vec<String> = endpoints
            .iter()
            .map(|(_, ip)| endpoint_chain(*ip))
            .collect();
        let local: Vec<String> = endpoints
            .iter()
            .filter(|(n, _)| *n == node.index)
            .map(|(_, ip)| endpoint_chain(*ip))
            .collect();
        let has_endpoints = !all.is_empty();
        let mut s = String::new();
        for (_, ip) in &endpoints {
            let chain = endpoint_chain(*ip);
            s += &nft_fresh_chain(&t, &chain);
            s += &format!("add rule {t} {chain} {fam} saddr {ip} jump mark-for-masquerade\n");
            s += &format!(
                "add rule {t} {chain} meta l4proto {proto} dnat to {}\n",
                socket(*ip, svc.target_port)
            );
        }
        if has_endpoints {
            s += &nft_fresh_chain(&t, &svc_chain);
        }
        for ip in svc.cluster_ips.iter().filter(|ip| ip.is_ipv6() == v6) {
            let key = format!("{ip} . {proto} . {}", svc.port);
            if has_endpoints {
                s += &format!(
                    "add rule {t} {svc_chain} {fam} daddr {ip} {proto} dport {} {fam} saddr != {cidr} jump mark-for-masquerade\n",
                    svc.port
                );
                s += &nft_set_element(ns, v6, "no-endpoint-services", &key, None);
                s += &nft_set_element(
                    ns,
                    v6,
                    "service-ips",
                    &key,
                    Some(&format!("goto {svc_chain}")),
                );
            } else {
                s += &nft_set_element(ns, v6, "service-ips", &key, None);
                s += &nft_set_element(
                    ns,
                    v6,
                    "no-endpoint-services",
                    &key,
                    Some("goto reject-chain"),
                );
            }
        }
        if has_endpoints {
            s += &format!("add rule {t} {svc_chain} {}\n", nft_pick(&all));
        }
        if let Some((node_port, policy)) = svc.node_port {
            let key = format!("{proto} . {node_port}");
            let has_external = match policy {
                TrafficPolicy::Cluster => has_endpoints,
                TrafficPolicy::Local => !local.is_empty(),
            };
            if has_endpoints {
                s += &nft_fresh_chain(&t, &ext_chain);
                match policy {
                    TrafficPolicy::Cluster => {
                        s += &format!("add rule {t} {ext_chain} jump mark-for-masquerade\n");
                        s += &format!("add rule {t} {ext_chain} goto {svc_chain}\n");
                    }
                    TrafficPolicy::Local => {
                        s += &format!(
                            "add rule {t} {ext_chain} {fam} saddr {cidr} goto {svc_chain} comment \"short-circuit pod traffic\"\n"
                        );
                        s += &format!(
                            "add rule {t} {ext_chain} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"\n"
                        );
                        s += &format!(
                            "add rule {t} {ext_chain} fib saddr type local goto {svc_chain} comment \"short-circuit local traffic\"\n"
                        );
                        if has_external {
                            s += &nft_fresh_chain(&t, &local_chain);
                            s += &format!("add rule {t} {local_chain} {}\n", nft_pick(&local));
                            s += &format!("add rule {t} {ext_chain} goto {local_chain}\n");
                        }
                    }
                }
                s += &nft_set_element(
                    ns,
                    v6,
                    "service-nodeports",
                    &key,
                    Some(&format!("goto {ext_chain}")),
                );
            } else {
                s += &nft_set_element(ns, v6, "service-nodeports", &key, None);
            }
            let filter = match (has_endpoints, has_external) {
                (_, true) => None,
                (true, false) => Some("drop"),
                (false, false) => Some("goto reject-chain"),
            };
            s += &nft_set_element(ns, v6, "no-endpoint-nodeports", &key, filter);
        }
        nft_apply(ns, &s)?;
    }
    Ok(())
}

/// The portmap plugin's own chains, once per node and family.
fn portmap_base(ns: &Netns, v6: bool) -> Result<()> {
    if chain_exists(ns, v6, "CNI-HOSTPORT-DNAT") {
        return Ok(());
    }
    for chain in [
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-SETMARK",
        "CNI-HOSTPORT-MASQ",
    ] {
        nat(ns, v6, &["-N", chain])?;
    }
    nat(
        ns,
        v6,
        &[
            "-A",
            "CNI-HOSTPORT-SETMARK",
            "-m",
            "comment",
            "--comment",
            "CNI portfwd masquerade mark",
            "-j",
            "MARK",
            "--set-xmark",
            PORTMAP_MASQ_MARK,
        ],
    )?;
    nat(
        ns,
        v6,
        &[
            "-A",
            "CNI-HOSTPORT-MASQ",
            "-m",
            "mark",
            "--mark",
            PORTMAP_MASQ_MARK,
            "-j",
            "MASQUERADE",
        ],
    )?;
    for hook in ["PREROUTING", "OUTPUT"] {
        nat(
            ns,
            v6,
            &[
                "-I",
                hook,
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-j",
                "CNI-HOSTPORT-DNAT",
            ],
        )?;
    }
    nat(
        ns,
        v6,
        &[
            "-I",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "CNI portfwd requiring masquerade",
            "-j",
            "CNI-HOSTPORT-MASQ",
        ],
    )
}

/// The portmap plugin's rules for `hp` of `pod`, on `node`, both families.
pub(crate) fn install_host_port(node: &Node, pod: &Pod, hp: &HostPort) -> Result<()> {
    bridge_netfilter(node)?;
    let ns = &node.netns;
    let proto = hp.protocol.iptables();
    let host_port = hp.host_port.to_string();
    for ip in pod.ips() {
        let v6 = ip.is_ipv6();
        portmap_base(ns, v6)?;
        let chain = format!(
            "CNI-DN-{}",
            chain_hash(&format!("{}/{}/{proto}", pod.name, hp.host_port))
        );
        nat(ns, v6, &["-N", &chain])?;
        nat(
            ns,
            v6,
            &[
                "-A",
                "CNI-HOSTPORT-DNAT",
                "-p",
                proto,
                "-m",
                "comment",
                "--comment",
                &format!("dnat name: \"cbr0\" id: \"{}\"", pod.name),
                "-m",
                "multiport",
                "--dports",
                &host_port,
                "-j",
                &chain,
            ],
        )?;
        let loopback = if v6 { "::1/128" } else { "127.0.0.1/32" };
        for source in [host(ip), loopback.to_owned()] {
            nat(
                ns,
                v6,
                &[
                    "-A",
                    &chain,
                    "-s",
                    &source,
                    "-p",
                    proto,
                    "-m",
                    proto,
                    "--dport",
                    &host_port,
                    "-j",
                    "CNI-HOSTPORT-SETMARK",
                ],
            )?;
        }
        nat(
            ns,
            v6,
            &[
                "-A",
                &chain,
                "-p",
                proto,
                "-m",
                proto,
                "--dport",
                &host_port,
                "-j",
                "DNAT",
                "--to-destination",
                &socket(ip, hp.container_port),
            ],
        )?;
    }
    // The plugin lets 127.0.0.1 be DNATed out of the host interface.
    let host_if = node.bridge.as_deref().unwrap_or(&pod.host_if);
    ns.sysctl(&format!("net.ipv4.conf.{host_if}.route_localnet"), "1")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_fit_iptables_and_differ() {
        let a = format!("KUBE-SVC-{}", chain_hash("ns/a:p80/tcp"));
        let b = format!("KUBE-SVC-{}", chain_hash("ns/b:p80/tcp"));
        assert_ne!(a, b);
        assert!(a.len() <= 28, "{a}");
        assert_eq!(chain_hash("x"), chain_hash("x"));
    }

    #[test]
    fn nft_endpoint_choice_is_one_verdict_map_over_all_endpoints() {
        let chains = vec!["endpoint-A-x".to_owned(), "endpoint-B-y".to_owned()];
        assert_eq!(
            nft_pick(&chains),
            "numgen random mod 2 vmap { 0 : goto endpoint-A-x, 1 : goto endpoint-B-y }"
        );
        assert_eq!(
            nft_fresh_chain("ip kube-proxy", "c"),
            "add chain ip kube-proxy c\nflush chain ip kube-proxy c\n"
        );
    }

    #[test]
    fn a_dual_stack_service_has_one_slice_per_family() {
        let mut svc = NodePortService::tcp("ray", "head", 8265, 30265);
        svc.cluster_ips = vec![
            "10.96.5.1".parse().unwrap(),
            "fd00:10:96::5:1".parse().unwrap(),
        ];
        svc.endpoints.push(Endpoint {
            namespace: "ray".into(),
            pod: "head".into(),
            node: 0,
            ips: vec![
                "10.244.0.10".parse().unwrap(),
                "fd00:10:244::a".parse().unwrap(),
            ],
        });
        let docs = svc.manifests(&|n| format!("node-{n}"));
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["spec"]["ports"][0]["nodePort"], 30265);
        assert_eq!(docs[0]["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(docs[1]["addressType"], "IPv4");
        assert_eq!(docs[1]["endpoints"][0]["addresses"], json!(["10.244.0.10"]));
        assert_eq!(
            docs[2]["endpoints"][0]["addresses"],
            json!(["fd00:10:244::a"])
        );
        assert_eq!(docs[2]["endpoints"][0]["nodeName"], "node-0");
    }
}
