//! The demo's cluster: namespaces, pods (with the labels KubeRay or Helm stamps),
//! Services, the two RayClusters, and the probe targets. Everything here is plain
//! data; [`manifests`] turns it into the YAML the agent reads with `--manifests`,
//! using the addresses the topology actually gave each pod.
//!
//! Must not: decide what is allowed. The expected verdicts are written by hand in
//! [`super::expected`].

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use crate::objects::json::labels;
use crate::topology::{EXTERNAL_CLIENT4, EXTERNAL_CLIENT6};

/// The simulated node's name (`spec.nodeName` of every pod, `--node-name`).
pub const NODE_NAME: &str = "rf-demo-node";
/// The second node, on shapes that have one ([`crate::shape::Shape::second_node`]).
pub const SECOND_NODE_NAME: &str = "rf-demo-node-2";
/// The pods that run on the second node when there is one: RayCluster beta's
/// worker (so beta spans the nodes) and two pods that are only sources. None of
/// them is a NodePort backend or has a hostPort, so every expectation holds as
/// on one node (the `node` row probes a pod from that pod's own node).
pub const ON_SECOND_NODE: &[&str] = &["impostor", "grafana", "b-worker"];

/// The index of the node pod `key` runs on: 0, or 1 for [`ON_SECOND_NODE`] when
/// there are `nodes` = 2.
pub fn node_of(key: &str, nodes: usize) -> usize {
    usize::from(nodes > 1 && ON_SECOND_NODE.contains(&key))
}

/// The Node object's name of node `index`.
pub fn node_name(index: usize) -> &'static str {
    if index == 0 {
        NODE_NAME
    } else {
        SECOND_NODE_NAME
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn api(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// One pod of the demo. `key` is its short name in the matrix and in the
/// topology (`pod-<key>` namespace).
#[derive(Debug)]
pub struct PodSpec {
    pub key: &'static str,
    pub namespace: &'static str,
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
    /// Ports served (and declared as container ports): (port, protocol, name).
    pub ports: &'static [(u16, Proto, &'static str)],
}

const HEAD_PORTS: &[(u16, Proto, &str)] = &[
    (6379, Proto::Tcp, "gcs-server"),
    (8265, Proto::Tcp, "dashboard"),
    (10001, Proto::Tcp, "client"),
    (8080, Proto::Tcp, "metrics"),
];
const WORKER_PORTS: &[(u16, Proto, &str)] = &[(8080, Proto::Tcp, "metrics")];
const OPERATOR_LABELS: &[(&str, &str)] = &[
    ("app.kubernetes.io/name", "kuberay-operator"),
    ("app.kubernetes.io/component", "kuberay-operator"),
];

/// Every pod, in the order they are created (pod k gets 10.244.0.(10+k)).
pub const PODS: &[PodSpec] = &[
    PodSpec {
        key: "coredns",
        namespace: "kube-system",
        name: "coredns-5d78c9869d-q7x2m",
        labels: &[("k8s-app", "kube-dns")],
        ports: &[(53, Proto::Udp, "dns"), (53, Proto::Tcp, "dns-tcp")],
    },
    PodSpec {
        key: "operator",
        namespace: "ray-system",
        name: "kuberay-operator-6bc4f7d8f9-kx5tz",
        labels: OPERATOR_LABELS,
        ports: &[],
    },
    PodSpec {
        key: "impostor",
        namespace: "other",
        name: "fake-operator-7f9c6d5b8-ppl2w",
        labels: OPERATOR_LABELS,
        ports: &[],
    },
    PodSpec {
        key: "outsider",
        namespace: "other",
        name: "outsider",
        labels: &[("app", "outsider")],
        ports: &[(8080, Proto::Tcp, "http")],
    },
    PodSpec {
        key: "prometheus",
        namespace: "monitoring",
        name: "prometheus-0",
        labels: &[("app", "prometheus")],
        ports: &[],
    },
    PodSpec {
        key: "grafana",
        namespace: "monitoring",
        name: "grafana-6f5b9c7d4-m2v8n",
        labels: &[("app", "grafana")],
        ports: &[],
    },
    PodSpec {
        key: "a-head",
        namespace: "team-a",
        name: "alpha-head-8x2kq",
        labels: &[
            ("ray.io/cluster", "alpha"),
            ("ray.io/node-type", "head"),
            ("ray.io/group", "headgroup"),
        ],
        ports: HEAD_PORTS,
    },
    PodSpec {
        key: "a-worker",
        namespace: "team-a",
        name: "alpha-workers-worker-4m7zt",
        labels: &[
            ("ray.io/cluster", "alpha"),
            ("ray.io/node-type", "worker"),
            ("ray.io/group", "workers"),
        ],
        ports: WORKER_PORTS,
    },
    PodSpec {
        key: "b-head",
        namespace: "team-b",
        name: "beta-head-p9d3s",
        labels: &[
            ("ray.io/cluster", "beta"),
            ("ray.io/node-type", "head"),
            ("ray.io/group", "headgroup"),
        ],
        ports: HEAD_PORTS,
    },
    PodSpec {
        key: "b-worker",
        namespace: "team-b",
        name: "beta-workers-worker-z6kfr",
        labels: &[
            ("ray.io/cluster", "beta"),
            ("ray.io/node-type", "worker"),
            ("ray.io/group", "workers"),
        ],
        ports: WORKER_PORTS,
    },
];

/// hostNetwork pods: their processes run in the node's network namespace, in their
/// own pod cgroup (`kubepods/besteffort/pod<uid>`), with the node's addresses.
pub const HOST_NETWORK_PODS: &[PodSpec] = &[PodSpec {
    key: "hostnet",
    namespace: "monitoring",
    name: "node-exporter-7kq4d",
    labels: &[("app", "node-exporter")],
    ports: &[(9100, Proto::Tcp, "metrics")],
}];

/// hostPorts the portmap plugin DNATs on the node: (pod key, container port,
/// host port).
pub const HOST_PORTS: &[(&str, u16, u16)] = &[("outsider", 8080, 18080)];

/// The row of the client outside the cluster (a namespace on the underlay, at
/// [`EXTERNAL_CLIENT4`] / [`EXTERNAL_CLIENT6`]).
pub const EXTERNAL: &str = "external";

pub const NAMESPACES: &[&str] = &[
    "kube-system",
    "ray-system",
    "other",
    "monitoring",
    "team-a",
    "team-b",
];

/// A ClusterIP Service with one backend pod, DNATed like kube-proxy does.
#[derive(Debug)]
pub struct ServiceSpec {
    pub key: &'static str,
    pub namespace: &'static str,
    pub name: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub selector: &'static [(&'static str, &'static str)],
    /// The pod (key) behind it.
    pub backend: &'static str,
    pub ports: &'static [(u16, Proto, &'static str)],
    /// (port, nodePort): when not empty the Service is `type: NodePort`
    /// (externalTrafficPolicy Cluster), and kube-proxy's NodePort NAT is on the node.
    pub node_ports: &'static [(u16, u16)],
}

pub const SERVICES: &[ServiceSpec] = &[
    ServiceSpec {
        key: "kube-dns",
        namespace: "kube-system",
        name: "kube-dns",
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        selector: &[("k8s-app", "kube-dns")],
        backend: "coredns",
        ports: &[(53, Proto::Udp, "dns"), (53, Proto::Tcp, "dns-tcp")],
        node_ports: &[],
    },
    ServiceSpec {
        key: "svc-a",
        namespace: "team-a",
        name: "alpha-head-svc",
        cluster_ip: Ipv4Addr::new(10, 96, 10, 1),
        selector: &[("ray.io/cluster", "alpha"), ("ray.io/node-type", "head")],
        backend: "a-head",
        ports: HEAD_PORTS,
        // The dashboard and the Ray client port, as `serviceType: NodePort` gives them.
        node_ports: &[(8265, 30265), (10001, 30001)],
    },
    ServiceSpec {
        key: "svc-b",
        namespace: "team-b",
        name: "beta-head-svc",
        cluster_ip: Ipv4Addr::new(10, 96, 10, 2),
        selector: &[("ray.io/cluster", "beta"), ("ray.io/node-type", "head")],
        backend: "b-head",
        ports: HEAD_PORTS,
        node_ports: &[],
    },
];

/// Where a probe goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// A pod's own IP (key).
    Pod(&'static str),
    /// A Service's ClusterIP (key).
    Service(&'static str),
    /// The node's host address (`host0`): its own services, a hostPort, a
    /// hostNetwork pod's port.
    Node,
    /// A NodePort of a Service (key) on the node's host address, IPv4 only (the
    /// Service is single-stack IPv4, so kube-proxy programs it for IPv4).
    NodePort(&'static str),
}

/// One column of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Header, first line (who).
    pub who: &'static str,
    pub dest: Dest,
    pub port: u16,
    pub proto: Proto,
}

impl Target {
    /// Header, second line (what): `6379`, `udp53`.
    pub fn what(&self) -> String {
        match self.proto {
            Proto::Tcp => self.port.to_string(),
            Proto::Udp => format!("u{}", self.port),
        }
    }
}

const fn tcp(who: &'static str, dest: Dest, port: u16) -> Target {
    Target {
        who,
        dest,
        port,
        proto: Proto::Tcp,
    }
}

/// The columns, in the order of the hand-written table in [`super::expected`].
pub const TARGETS: &[Target] = &[
    tcp("a-head", Dest::Pod("a-head"), 6379),
    tcp("a-head", Dest::Pod("a-head"), 8265),
    tcp("a-head", Dest::Pod("a-head"), 10001),
    tcp("a-head", Dest::Pod("a-head"), 8080),
    tcp("a-worker", Dest::Pod("a-worker"), 8080),
    tcp("b-head", Dest::Pod("b-head"), 6379),
    tcp("b-head", Dest::Pod("b-head"), 8265),
    tcp("b-head", Dest::Pod("b-head"), 10001),
    tcp("b-head", Dest::Pod("b-head"), 8080),
    tcp("b-worker", Dest::Pod("b-worker"), 8080),
    tcp("svc-a", Dest::Service("svc-a"), 8265),
    tcp("svc-b", Dest::Service("svc-b"), 8265),
    Target {
        who: "kube-dns",
        dest: Dest::Service("kube-dns"),
        port: 53,
        proto: Proto::Udp,
    },
    tcp("kube-dns", Dest::Service("kube-dns"), 53),
    Target {
        who: "coredns",
        dest: Dest::Pod("coredns"),
        port: 53,
        proto: Proto::Udp,
    },
    tcp("outsider", Dest::Pod("outsider"), 8080),
    tcp("node", Dest::Node, 10250),
    tcp("np-a", Dest::NodePort("svc-a"), 30265),
    tcp("np-a", Dest::NodePort("svc-a"), 30001),
    tcp("hostport", Dest::Node, 18080),
    tcp("hostnet", Dest::Node, 9100),
];

/// The rows: the node itself, every pod, the hostNetwork pods, the external client.
pub fn sources() -> Vec<&'static str> {
    std::iter::once("node")
        .chain(PODS.iter().map(|p| p.key))
        .chain(HOST_NETWORK_PODS.iter().map(|p| p.key))
        .chain(std::iter::once(EXTERNAL))
        .collect()
}

/// What a row's probes come from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A host process of the node, in no pod cgroup (the kubelet).
    Node,
    Pod(&'static PodSpec),
    HostNetwork(&'static PodSpec),
    External,
}

pub fn source(key: &str) -> Option<Source> {
    match key {
        "node" => Some(Source::Node),
        EXTERNAL => Some(Source::External),
        _ => pod(key)
            .map(Source::Pod)
            .or_else(|| host_network_pod(key).map(Source::HostNetwork)),
    }
}

pub fn pod(key: &str) -> Option<&'static PodSpec> {
    PODS.iter().find(|p| p.key == key)
}

pub fn host_network_pod(key: &str) -> Option<&'static PodSpec> {
    HOST_NETWORK_PODS.iter().find(|p| p.key == key)
}

/// `metadata.uid` of hostNetwork pod `index` of [`HOST_NETWORK_PODS`].
pub fn host_network_pod_uid(run: u32, index: usize) -> String {
    pod_uid(run, PODS.len() + index)
}

pub fn service(key: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().find(|s| s.key == key)
}

/// The node's addresses as its Node object lists them.
#[derive(Debug, Clone, Copy)]
pub struct NodeAddrs {
    pub internal_ip: Ipv4Addr,
    pub internal_ip6: Ipv6Addr,
    pub pod_cidr: (Ipv4Addr, u8),
}

/// The manifests the agent reads in demo run `run` (see [`pod_uid`]): `(file
/// name, multi-document YAML)`.
/// `nodes` are the nodes' addresses (one, or two on shapes with a second node,
/// whose pods are placed by [`node_of`]). `pod_ip(key)` is what the topology gave
/// a pod: dual-stack pods, as in a dual-stack cluster; the Services stay
/// single-stack IPv4 (the default for a Service there), so ClusterIPs and
/// EndpointSlices are IPv4 only.
pub fn manifests(
    run: u32,
    nodes: &[NodeAddrs],
    pod_ip: &dyn Fn(&str) -> (Ipv4Addr, Ipv6Addr),
) -> Vec<(String, String)> {
    let node = nodes[0];
    let pod_node = |key: &str| node_name(node_of(key, nodes.len()));
    let namespaces: Vec<Value> = NAMESPACES
        .iter()
        .map(|ns| {
            json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            })
        })
        .collect();
    let node_objects: Vec<Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let name = node_name(i);
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"podCIDR": format!("{}/{}", node.pod_cidr.0, node.pod_cidr.1)},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": node.internal_ip.to_string()},
                    {"type": "InternalIP", "address": node.internal_ip6.to_string()},
                    {"type": "Hostname", "address": name},
                ]},
            })
        })
        .collect();
    let mut pods: Vec<Value> = PODS
        .iter()
        .enumerate()
        .map(|(i, p)| pod_manifest(pod_uid(run, i), p, pod_ip(p.key), pod_node(p.key)))
        .collect();
    for (i, p) in HOST_NETWORK_PODS.iter().enumerate() {
        let mut m = pod_manifest(
            host_network_pod_uid(run, i),
            p,
            (node.internal_ip, node.internal_ip6),
            NODE_NAME,
        );
        // Host networking: every container port is also a hostPort (the API
        // server's default), the pod's IPs are the node's.
        m["spec"]["hostNetwork"] = json!(true);
        if let Some(ports) = m["spec"]["containers"][0]["ports"].as_array_mut() {
            for port in ports {
                port["hostPort"] = port["containerPort"].clone();
            }
        }
        m["status"]["hostIP"] = json!(node.internal_ip.to_string());
        pods.push(m);
    }
    let mut services = Vec::new();
    for s in SERVICES {
        let node_port = |port: u16| s.node_ports.iter().find(|(p, _)| *p == port).map(|n| n.1);
        let mut service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": s.cluster_ip.to_string(),
                "clusterIPs": [s.cluster_ip.to_string()],
                "selector": labels(s.selector),
                "ports": s.ports.iter().map(|(port, proto, name)| {
                    let mut p = json!({
                        "name": name, "port": port, "targetPort": port, "protocol": proto.api(),
                    });
                    if let Some(n) = node_port(*port) {
                        p["nodePort"] = json!(n);
                    }
                    p
                }).collect::<Vec<_>>(),
            },
        });
        if !s.node_ports.is_empty() {
            service["spec"]["type"] = json!("NodePort");
            service["spec"]["externalTrafficPolicy"] = json!("Cluster");
        }
        services.push(service);
        let backend = pod(s.backend).expect("service backend is a demo pod");
        services.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-x7k2p", s.name),
                "namespace": s.namespace,
                "labels": {
                    "kubernetes.io/service-name": s.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": [pod_ip(s.backend).0.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": pod_node(s.backend),
                "targetRef": {"kind": "Pod", "namespace": backend.namespace, "name": backend.name},
            }],
            "ports": s.ports.iter().map(|(port, proto, name)| json!({
                "name": name, "port": port, "protocol": proto.api(),
            })).collect::<Vec<_>>(),
        }));
    }
    vec![
        ("00-namespaces.yaml".into(), yaml_docs(&namespaces)),
        ("01-node.yaml".into(), yaml_docs(&node_objects)),
        ("10-pods.yaml".into(), yaml_docs(&pods)),
        ("20-services.yaml".into(), yaml_docs(&services)),
        ("30-rayclusters.yaml".into(), yaml_docs(&rayclusters())),
    ]
}

/// `metadata.uid` of pod `index` of [`PODS`] in demo run `run`; the kubelet names
/// the pod's cgroup after it (`kubepods/besteffort/pod<uid>` with the cgroupfs
/// driver). Unique per run: an agent that looks for pod cgroups over the whole
/// cgroup2 tree (as on the cgroup2 shape) must not find another run's.
pub fn pod_uid(run: u32, index: usize) -> String {
    format!("{run:08x}-0000-4000-8000-{:012x}", index + 1)
}

/// A run's part of its pods' UIDs, from its unique name.
pub fn run_id(run_name: &str) -> u32 {
    // FNV-1a: stable, and spreads names that differ in a digit.
    run_name.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

fn pod_manifest(
    uid: String,
    p: &PodSpec,
    (ip, ip6): (Ipv4Addr, Ipv6Addr),
    node_name: &str,
) -> Value {
    let container = if p.labels.iter().any(|(k, _)| *k == "ray.io/node-type") {
        "ray-node"
    } else {
        p.key
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "uid": uid,
            "labels": labels(p.labels),
        },
        "spec": {
            "nodeName": node_name,
            "containers": [{
                "name": container,
                "image": "registry.example/demo:1",
                "ports": p.ports.iter().map(|(port, proto, name)| {
                    let mut c = json!({
                        "name": name, "containerPort": port, "protocol": proto.api(),
                    });
                    let host_port = HOST_PORTS.iter().find(|(k, cp, _)| *k == p.key && cp == port);
                    if let Some((_, _, hp)) = host_port {
                        c["hostPort"] = json!(hp);
                    }
                    c
                }).collect::<Vec<_>>(),
            }],
        },
        "status": {
            "phase": "Running",
            "qosClass": "BestEffort",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}, {"ip": ip6.to_string()}],
        },
    })
}

/// RayCluster `alpha` (team-a): KubeRay v1.7 `spec.networkPolicy`, mode DenyAll,
/// two user ingress rules for the head: Prometheus pods in `monitoring` may scrape
/// its metrics port, and the external client (an ipBlock for each of its
/// addresses) may reach its dashboard. RayCluster `beta` (team-b): PR #4638's `spec.networkIsolation`,
/// mode DenyAllIngress, no user rules.
fn rayclusters() -> Vec<Value> {
    let groups = || {
        json!({
            "headGroupSpec": {
                "rayStartParams": {"dashboard-port": "8265"},
                "template": {"spec": {"containers": [{
                    "name": "ray-head", "image": "rayproject/ray:2.52.0",
                    "ports": HEAD_PORTS.iter().map(|(port, _, name)| json!({
                        "containerPort": port, "name": name,
                    })).collect::<Vec<_>>(),
                }]}},
            },
            "workerGroupSpecs": [{
                "groupName": "workers", "replicas": 1, "rayStartParams": {},
                "template": {"spec": {"containers": [{
                    "name": "ray-worker", "image": "rayproject/ray:2.52.0",
                }]}},
            }],
            "rayVersion": "2.52.0",
        })
    };
    let mut alpha_spec = groups();
    let mut beta_spec = groups();
    alpha_spec["networkPolicy"] = json!({
        "mode": "DenyAll",
        "head": {"ingressRules": [{
            "from": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "podSelector": {"matchLabels": {"app": "prometheus"}},
            }],
            "ports": [{"protocol": "TCP", "port": 8080}],
        }, {
            "from": [
                {"ipBlock": {"cidr": format!("{EXTERNAL_CLIENT4}/32")}},
                {"ipBlock": {"cidr": format!("{EXTERNAL_CLIENT6}/128")}},
            ],
            "ports": [{"protocol": "TCP", "port": 8265}],
        }]},
    });
    beta_spec["networkIsolation"] = json!({"mode": "DenyAllIngress"});
    vec![
        json!({
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "alpha", "namespace": "team-a", "uid": "d3e0c000-0000-4000-8000-00000000000a"},
            "spec": alpha_spec,
        }),
        json!({
            "apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "beta", "namespace": "team-b", "uid": "d3e0c000-0000-4000-8000-00000000000b"},
            "spec": beta_spec,
        }),
    ]
}

/// Documents joined with `---`.
pub fn yaml_docs(docs: &[Value]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        emit(&mut out, d, 0);
    }
    out
}

/// A small block-style YAML emitter for JSON values: strings are written as JSON
/// strings (valid YAML double-quoted scalars), keys plain when they are simple.
fn emit(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, val) in m {
                let key = yaml_key(k);
                match val {
                    Value::Object(x) if !x.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}:");
                        emit(out, val, indent + 2);
                    }
                    Value::Array(x) if !x.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}:");
                        emit(out, val, indent);
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}{key}: {}", scalar(val));
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                match item {
                    Value::Object(x) if !x.is_empty() => {
                        // The first key goes on the dash line, the rest indented under it.
                        let mut first = String::new();
                        emit(&mut first, item, indent + 2);
                        let body = first.trim_start_matches(' ');
                        let _ = write!(out, "{pad}- {body}");
                    }
                    Value::Array(x) if !x.is_empty() => {
                        let _ = writeln!(out, "{pad}-");
                        emit(out, item, indent + 2);
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}- {}", scalar(item));
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other));
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        other => other.to_string(),
    }
}

fn yaml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./_-".contains(c))
        && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
    {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_emitter_nests_maps_and_lists() {
        let v = json!({"a": {"b": [1, {"c": "x", "d": []}], "e": {}}, "f": "g:h"});
        let mut s = String::new();
        emit(&mut s, &v, 0);
        assert_eq!(
            s,
            "a:\n  b:\n  - 1\n  - c: \"x\"\n    d: []\n  e: {}\nf: \"g:h\"\n"
        );
    }

    #[test]
    fn every_target_and_backend_names_a_demo_object() {
        for t in TARGETS {
            match t.dest {
                Dest::Pod(k) => assert!(pod(k).is_some(), "{k}"),
                Dest::Service(k) => assert!(service(k).is_some(), "{k}"),
                Dest::NodePort(k) => assert!(
                    service(k).is_some_and(|s| s.node_ports.iter().any(|n| n.1 == t.port)),
                    "{k}:{}",
                    t.port
                ),
                Dest::Node => {}
            }
        }
        for s in SERVICES {
            assert!(pod(s.backend).is_some(), "{}", s.backend);
        }
        for (k, container_port, _) in HOST_PORTS {
            assert!(
                pod(k).is_some_and(|p| p.ports.iter().any(|q| q.0 == *container_port)),
                "{k}"
            );
        }
        for key in sources() {
            assert!(source(key).is_some(), "{key}");
        }
    }
}
