//! Property tests: the compiled tables against an independent, obviously-correct
//! reference evaluator that decides flows straight from the objects (no engine code
//! beyond the input types), and incremental updates against a fresh full compile.
//!
//! The world has what docs/semantics.md "What counts as the node" is about too: Services with a `nodePort`, pods
//! with a `hostPort`, hostNetwork pods (on this node and another), and Services with
//! a backend on this node's address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use rayfence::policy::selector::Selector;
use rayfence::policy::{DnsMode, Engine, Settings};
use rayfence::tables::{Direction, Tables, identity};
use rayfence_tests::objects::typed::*;
use rayfence_tests::policy::*;
use serde_json::{Value, json};

// ------------------------------------------------------------------ the world model

const NAMESPACES: [&str; 3] = ["n0", "n1", "n2"];
const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 4] = ["x", "y", "z", "1"];
/// Container ports a pod may have: (name, protocol, port).
const PORTS: [(&str, &str, u16); 5] = [
    ("http", "TCP", 80),
    ("http", "UDP", 81),
    ("dns", "UDP", 53),
    ("alt", "TCP", 8080),
    ("metrics", "SCTP", 81),
];
const PORT_NAMES: [&str; 4] = ["http", "dns", "alt", "nope"];
/// ipBlocks: (cidr, except).
const BLOCKS: [(&str, &[&str]); 7] = [
    ("10.0.0.0/16", &[]),
    ("10.0.0.0/16", &["10.0.1.0/24"]),
    ("10.0.1.0/24", &["10.0.1.2/32"]),
    ("0.0.0.0/0", &["10.0.0.0/24"]),
    ("10.0.0.2/32", &[]),
    ("fd00::/120", &["fd00::4/126"]),
    ("::/0", &["fd00::/126"]),
];
const POD_SLOTS: usize = 8;
const SERVICE_SLOTS: usize = 3;
const NETPOL_SLOTS: usize = 3;
const EXTERNAL: [&str; 2] = ["10.0.1.200", "8.8.8.8"];
const PROBE_PORTS: [u16; 6] = [53, 80, 81, 8080, 8265, 10001];
const PROTOS: [&str; 3] = ["TCP", "UDP", "SCTP"];
/// Ports Services and pods may publish on the node (a nodePort, a hostPort).
const NODE_PORTS: [u16; 2] = [30080, 30081];
/// Container ports a hostPort may lead to.
const HOST_PORT_TARGETS: [u16; 2] = [80, 8080];

fn slot_ip(slot: usize) -> String {
    format!("10.0.{}.{}", slot / 4, slot % 4 + 1)
}

/// Every pod is dual-stack.
fn slot_ip6(slot: usize) -> String {
    format!("fd00::{}", slot + 1)
}

fn service_ip(slot: usize) -> String {
    format!("10.96.0.{}", slot + 1)
}

#[derive(Clone, Debug)]
struct Sel {
    labels: Vec<(usize, usize)>,
    /// (key, operator 0..4, values)
    expr: Option<(usize, usize, Vec<usize>)>,
}

#[derive(Clone, Debug)]
enum PeerT {
    Pods { ns: Option<Sel>, pods: Option<Sel> },
    Block(usize),
}

#[derive(Clone, Debug)]
enum PortVal {
    Num(u16),
    Range(u16, u16),
    Name(usize),
}

#[derive(Clone, Debug)]
struct PortT {
    proto: Option<usize>,
    port: Option<PortVal>,
}

#[derive(Clone, Debug)]
struct RuleT {
    peers: Option<Vec<PeerT>>,
    ports: Option<Vec<PortT>>,
}

#[derive(Clone, Debug)]
enum Ray {
    Head,
    Worker(Option<&'static str>),
    MemberOnly,
}

#[derive(Clone, Debug)]
struct PodT {
    ns: usize,
    labels: Vec<(usize, usize)>,
    ray: Option<Ray>,
    local: bool,
    ports: Vec<usize>,
    /// `spec.hostNetwork`: its address is its node's, not its slot's.
    host_network: bool,
    /// (protocol index into TCP/UDP, HOST_PORT_TARGETS index, NODE_PORTS index).
    host_port: Option<(usize, usize, usize)>,
}

#[derive(Clone, Debug)]
struct NetpolT {
    ns: usize,
    selector: Sel,
    types: (bool, bool),
    ingress: Vec<RuleT>,
    egress: Vec<RuleT>,
}

#[derive(Clone, Debug)]
struct RoleT {
    ingress: Vec<RuleT>,
    egress: Vec<RuleT>,
}

/// RayCluster `rc` in n0.
#[derive(Clone, Debug)]
struct ClusterT {
    mode: usize,
    head: RoleT,
    worker: RoleT,
    group_g: Option<RoleT>,
}

#[derive(Clone, Debug)]
struct ServiceT {
    ns: usize,
    proto: usize,
    target: u16,
    backends: Vec<usize>,
    external_backend: bool,
    /// A backend on this node's address (what a hostNetwork pod there serves).
    node_backend: bool,
    /// NODE_PORTS index of its nodePort, and whether it is a LoadBalancer.
    node_port: Option<(usize, bool)>,
}

#[derive(Clone, Debug, Default)]
struct World {
    ns_env: [Option<usize>; 3],
    pods: [Option<PodT>; POD_SLOTS],
    netpols: [Option<NetpolT>; NETPOL_SLOTS],
    cluster: Option<ClusterT>,
    services: [Option<ServiceT>; SERVICE_SLOTS],
}

#[derive(Clone, Debug)]
enum Op {
    Ns(usize, Option<usize>),
    Pod(usize, Option<PodT>),
    Netpol(usize, Option<NetpolT>),
    Cluster(Option<ClusterT>),
    Service(usize, Option<ServiceT>),
}

// ------------------------------------------------------------------ strategies

fn sel() -> impl Strategy<Value = Sel> {
    (
        prop::collection::vec((0..KEYS.len(), 0..VALUES.len()), 0..2),
        prop::option::weighted(
            0.4,
            (
                0..KEYS.len(),
                0..4usize,
                prop::collection::vec(0..VALUES.len(), 1..3),
            ),
        ),
    )
        .prop_map(|(labels, expr)| Sel { labels, expr })
}

fn peer() -> impl Strategy<Value = PeerT> {
    prop_oneof![
        (prop::option::of(sel()), sel()).prop_map(|(ns, pods)| PeerT::Pods {
            ns,
            pods: Some(pods)
        }),
        sel().prop_map(|ns| PeerT::Pods {
            ns: Some(ns),
            pods: None
        }),
        (0..BLOCKS.len()).prop_map(PeerT::Block),
    ]
}

fn port() -> impl Strategy<Value = PortT> {
    (
        prop::option::of(0..PROTOS.len()),
        prop::option::of(prop_oneof![
            prop::sample::select(vec![53u16, 80, 81, 8080]).prop_map(PortVal::Num),
            Just(PortVal::Range(80, 85)),
            (0..PORT_NAMES.len()).prop_map(PortVal::Name),
        ]),
    )
        .prop_map(|(proto, port)| PortT { proto, port })
}

fn rule() -> impl Strategy<Value = RuleT> {
    (
        prop::option::weighted(0.7, prop::collection::vec(peer(), 1..3)),
        prop::option::weighted(0.6, prop::collection::vec(port(), 1..3)),
    )
        .prop_map(|(peers, ports)| RuleT { peers, ports })
}

fn rules() -> impl Strategy<Value = Vec<RuleT>> {
    prop::collection::vec(rule(), 0..3)
}

fn pod_t() -> impl Strategy<Value = PodT> {
    (
        0..NAMESPACES.len(),
        prop::collection::vec((0..2usize, 0..VALUES.len()), 0..3),
        prop::option::weighted(
            0.5,
            prop_oneof![
                Just(Ray::Head),
                Just(Ray::Worker(Some("g"))),
                Just(Ray::Worker(Some("h"))),
                Just(Ray::Worker(None)),
                Just(Ray::MemberOnly),
            ],
        ),
        prop::bool::weighted(0.6),
        prop::collection::vec(0..PORTS.len(), 0..3),
        prop::bool::weighted(0.15),
        prop::option::weighted(
            0.25,
            (0..2usize, 0..HOST_PORT_TARGETS.len(), 0..NODE_PORTS.len()),
        ),
    )
        .prop_map(
            |(ns, labels, ray, local, ports, host_network, host_port)| PodT {
                ns,
                labels,
                ray,
                local,
                ports,
                host_network,
                host_port,
            },
        )
}

fn netpol_t() -> impl Strategy<Value = NetpolT> {
    (
        0..NAMESPACES.len(),
        sel(),
        (any::<bool>(), any::<bool>()),
        rules(),
        rules(),
    )
        .prop_map(|(ns, selector, types, ingress, egress)| NetpolT {
            ns,
            selector,
            types: if types == (false, false) {
                (true, false)
            } else {
                types
            },
            ingress,
            egress,
        })
}

fn role_t() -> impl Strategy<Value = RoleT> {
    (rules(), rules()).prop_map(|(ingress, egress)| RoleT { ingress, egress })
}

fn cluster_t() -> impl Strategy<Value = ClusterT> {
    (0..3usize, role_t(), role_t(), prop::option::of(role_t())).prop_map(
        |(mode, head, worker, group_g)| ClusterT {
            mode,
            head,
            worker,
            group_g,
        },
    )
}

fn service_t() -> impl Strategy<Value = ServiceT> {
    (
        0..NAMESPACES.len(),
        0..2usize,
        prop::sample::select(vec![80u16, 81, 53, 8080]),
        prop::collection::vec(0..POD_SLOTS, 0..3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.4, (0..NODE_PORTS.len(), any::<bool>())),
    )
        .prop_map(
            |(ns, proto, target, backends, external_backend, node_backend, node_port)| ServiceT {
                ns,
                proto,
                target,
                backends,
                external_backend,
                node_backend,
                node_port,
            },
        )
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::array::uniform3(prop::option::of(0..VALUES.len())),
        prop::collection::vec(prop::option::weighted(0.8, pod_t()), POD_SLOTS),
        prop::collection::vec(prop::option::weighted(0.5, netpol_t()), NETPOL_SLOTS),
        prop::option::weighted(0.7, cluster_t()),
        prop::collection::vec(prop::option::weighted(0.6, service_t()), SERVICE_SLOTS),
    )
        .prop_map(|(ns_env, pods, netpols, cluster, services)| World {
            ns_env,
            pods: pods.try_into().unwrap(),
            netpols: netpols.try_into().unwrap(),
            cluster,
            services: services.try_into().unwrap(),
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, prop::option::of(0..VALUES.len())).prop_map(|(n, v)| Op::Ns(n, v)),
        4 => (0..POD_SLOTS, prop::option::weighted(0.8, pod_t())).prop_map(|(s, p)| Op::Pod(s, p)),
        2 => (0..NETPOL_SLOTS, prop::option::weighted(0.7, netpol_t())).prop_map(|(s, p)| Op::Netpol(s, p)),
        2 => prop::option::weighted(0.8, cluster_t()).prop_map(Op::Cluster),
        1 => (0..SERVICE_SLOTS, prop::option::weighted(0.7, service_t())).prop_map(|(s, p)| Op::Service(s, p)),
    ]
}

// ------------------------------------------------------------------ the reference

fn ns_labels(w: &World, ns: usize) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(
        "kubernetes.io/metadata.name".to_owned(),
        NAMESPACES[ns].to_owned(),
    );
    if let Some(v) = w.ns_env[ns] {
        l.insert("env".to_owned(), VALUES[v].to_owned());
    }
    l
}

fn pod_labels(p: &PodT) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    for (k, v) in &p.labels {
        l.insert(KEYS[*k].to_owned(), VALUES[*v].to_owned());
    }
    if let Some(ray) = &p.ray {
        l.insert("ray.io/cluster".into(), "rc".into());
        match ray {
            Ray::Head => {
                l.insert("ray.io/node-type".into(), "head".into());
                l.insert("ray.io/group".into(), "headgroup".into());
            }
            Ray::Worker(g) => {
                l.insert("ray.io/node-type".into(), "worker".into());
                if let Some(g) = g {
                    l.insert("ray.io/group".into(), g.to_string());
                }
            }
            Ray::MemberOnly => {}
        }
    }
    if p.ns == 2
        && p.labels
            .iter()
            .any(|(k, v)| KEYS[*k] == "app" && VALUES[*v] == "z")
    {
        // n2 with app=z is the operator (see settings()).
    }
    l
}

const OPS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Selector semantics from the Kubernetes docs, written out directly.
fn sel_matches(s: &Sel, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in &s.labels {
        if labels.get(KEYS[*k]).map(String::as_str) != Some(VALUES[*v]) {
            return false;
        }
    }
    if let Some((k, op, values)) = &s.expr {
        let got = labels.get(KEYS[*k]);
        let in_values = got.is_some_and(|g| values.iter().any(|v| VALUES[*v] == g));
        let ok = match OPS[*op] {
            "In" => in_values,
            "NotIn" => !in_values,
            "Exists" => got.is_some(),
            _ => got.is_none(),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn in_net(ip: IpAddr, net: &str) -> bool {
    net.parse::<IpNet>().unwrap().contains(&ip)
}

fn in_block(ip: IpAddr, b: usize) -> bool {
    let (cidr, except) = BLOCKS[b];
    in_net(ip, cidr) && !except.iter().any(|e| in_net(ip, e))
}

/// The pod slot holding `ip`, if any (a hostNetwork pod holds none: its address is
/// its node's, which stays the node's).
fn pod_at(w: &World, ip: IpAddr) -> Option<&PodT> {
    (0..POD_SLOTS)
        .find(|s| {
            slot_ip(*s).parse::<IpAddr>().unwrap() == ip
                || slot_ip6(*s).parse::<IpAddr>().unwrap() == ip
        })
        .and_then(|s| w.pods[s].as_ref())
        .filter(|p| !p.host_network)
}

fn node_ip() -> IpAddr {
    NODE_IP.parse().unwrap()
}

fn proto_of(p: &PortT) -> &'static str {
    p.proto.map_or("TCP", |i| PROTOS[i])
}

/// How a peer matched: by selector (named egress ports resolve on the pod), by an
/// explicit ipBlock (they match nothing, documented), or as "any peer".
#[derive(PartialEq)]
enum Via {
    Selector,
    Block,
    Any,
}

/// One rule of the policy of `local` (in namespace `ns`), straight from its meaning,
/// for a peer at `peer` that is `peer_pod` (if a pod).
#[expect(clippy::too_many_arguments, reason = "a flow has that many parts")]
fn rule_allows(
    w: &World,
    rule: &RuleT,
    ns: usize,
    local: &PodT,
    dir: Direction,
    (peer, peer_pod): (IpAddr, Option<&PodT>),
    proto: &str,
    port: u16,
) -> bool {
    let mut vias = Vec::new();
    match &rule.peers {
        None => vias.push(Via::Any),
        Some(peers) => {
            for p in peers {
                match p {
                    PeerT::Block(b) => {
                        if in_block(peer, *b) {
                            vias.push(Via::Block);
                        }
                    }
                    PeerT::Pods { ns: ns_sel, pods } => {
                        let Some(pp) = peer_pod else { continue };
                        let ns_ok = match ns_sel {
                            None => pp.ns == ns,
                            Some(s) => sel_matches(s, &ns_labels(w, pp.ns)),
                        };
                        let pod_ok = pods
                            .as_ref()
                            .is_none_or(|s| sel_matches(s, &pod_labels(pp)));
                        if ns_ok && pod_ok {
                            vias.push(Via::Selector);
                        }
                    }
                }
            }
        }
    }
    vias.iter().any(|via| match &rule.ports {
        None => true,
        Some(ports) => ports.iter().any(|p| {
            if proto_of(p) != proto {
                return false;
            }
            match &p.port {
                None => true,
                Some(PortVal::Num(n)) => port == *n,
                Some(PortVal::Range(a, b)) => (*a..=*b).contains(&port),
                Some(PortVal::Name(i)) => {
                    let receiver = match dir {
                        Direction::Ingress => Some(local),
                        Direction::Egress => match via {
                            Via::Block => None,
                            _ => peer_pod,
                        },
                    };
                    receiver.is_some_and(|r| {
                        r.ports.iter().any(|c| {
                            let (name, pr, num) = PORTS[*c];
                            name == PORT_NAMES[*i] && pr == proto && num == port
                        })
                    })
                }
            }
        }),
    })
}

fn ray_rules<'a>(
    w: &'a World,
    local: &PodT,
    dir: Direction,
) -> Option<(bool, Vec<&'a RuleT>, bool)> {
    let c = w.cluster.as_ref()?;
    if local.ns != 0 {
        return None;
    }
    let (head, role) = match local.ray.as_ref()? {
        Ray::Head => (true, &c.head),
        Ray::Worker(Some("g")) => (false, c.group_g.as_ref().unwrap_or(&c.worker)),
        Ray::Worker(_) => (false, &c.worker),
        Ray::MemberOnly => return None,
    };
    let isolates = matches!(
        (c.mode, dir),
        (0, _) | (1, Direction::Ingress) | (2, Direction::Egress)
    );
    let user = match dir {
        Direction::Ingress => role.ingress.iter().collect(),
        Direction::Egress => role.egress.iter().collect(),
    };
    Some((isolates, user, head))
}

/// The reference verdict for a new flow of local pod `slot`.
fn reference(w: &World, slot: usize, dir: Direction, peer: IpAddr, proto: &str, port: u16) -> bool {
    let local = w.pods[slot].as_ref().unwrap();
    if peer == node_ip() {
        // A port the node DNATs is decided on where it leads; anything else on the
        // node's address is the node's own processes.
        if dir == Direction::Egress
            && isolated(w, local, dir)
            && let Some(verdict) = node_port_verdict(w, slot, proto, port)
        {
            return verdict;
        }
        return true;
    }
    // Post-DNAT: egress to a ClusterIP is the verdict for every backend it may land on.
    if dir == Direction::Egress
        && let Some(s) =
            (0..SERVICE_SLOTS).find(|s| service_ip(*s).parse::<IpAddr>().unwrap() == peer)
        && let Some(svc) = &w.services[s]
    {
        if !isolated(w, local, dir) {
            return true;
        }
        let svc_proto = ["TCP", "UDP"][svc.proto];
        if svc_proto != proto || port != 80 {
            return false;
        }
        return to_every_backend(w, slot, svc, proto);
    }
    direct(w, slot, dir, peer, proto, port)
}

/// The reference verdict when the peer is hostNetwork pod `host` of this node, known
/// by its socket rather than its address (the node's): its labels and namespace, or
/// an ipBlock covering the node's address.
fn reference_identified(
    w: &World,
    slot: usize,
    dir: Direction,
    host: usize,
    proto: &str,
    port: u16,
) -> bool {
    let local = w.pods[slot].as_ref().unwrap();
    if !isolated(w, local, dir) {
        return true;
    }
    if dir == Direction::Egress
        && let Some(verdict) = node_port_verdict(w, slot, proto, port)
    {
        return verdict;
    }
    direct_as(
        w,
        slot,
        dir,
        (node_ip(), w.pods[host].as_ref()),
        proto,
        port,
    )
}

/// Egress to every backend of `svc` on its target port (none: denied).
fn to_every_backend(w: &World, slot: usize, svc: &ServiceT, proto: &str) -> bool {
    let backends = backends(svc);
    !backends.is_empty()
        && backends
            .iter()
            .all(|b| to_backend(w, slot, *b, proto, svc.target))
}

/// Egress from `slot` to a backend (after DNAT). On this node's address it lands on
/// whatever listens there: a hostNetwork pod of this node that declares the port
/// (each one must be allowed), else the node's own processes.
fn to_backend(w: &World, slot: usize, backend: IpAddr, proto: &str, port: u16) -> bool {
    if backend != node_ip() {
        return direct(w, slot, Direction::Egress, backend, proto, port);
    }
    (0..POD_SLOTS)
        .filter(|h| {
            w.pods[*h]
                .as_ref()
                .is_some_and(|p| p.local && p.host_network && listens(p).contains(&(proto, port)))
        })
        .all(|h| {
            direct_as(
                w,
                slot,
                Direction::Egress,
                (node_ip(), w.pods[h].as_ref()),
                proto,
                port,
            )
        })
}

/// Every (protocol, containerPort) a pod declares.
fn listens(p: &PodT) -> Vec<(&'static str, u16)> {
    let mut out: Vec<(&'static str, u16)> =
        p.ports.iter().map(|c| (PORTS[*c].1, PORTS[*c].2)).collect();
    if let Some((proto, target, _)) = p.host_port {
        out.push((["TCP", "UDP"][proto], HOST_PORT_TARGETS[target]));
    }
    out
}

/// What claims `proto`/`port` on this node's addresses.
enum Claim<'a> {
    Service(&'a ServiceT),
    /// The slot of a local pod with that hostPort.
    Pod(usize),
    /// A local hostNetwork pod that declares the port: it leads to that pod.
    HostNetwork,
}

fn node_port_claims<'a>(w: &'a World, proto: &str, port: u16) -> Vec<Claim<'a>> {
    let mut out: Vec<Claim<'a>> = w
        .services
        .iter()
        .flatten()
        .filter(|svc| {
            svc.node_port.is_some_and(|(i, _)| NODE_PORTS[i] == port)
                && ["TCP", "UDP"][svc.proto] == proto
        })
        .map(Claim::Service)
        .collect();
    out.extend(
        (0..POD_SLOTS)
            .filter(|s| {
                w.pods[*s].as_ref().is_some_and(|p| {
                    p.local
                        && !p.host_network
                        && p.host_port.is_some_and(|(pr, _, np)| {
                            ["TCP", "UDP"][pr] == proto && NODE_PORTS[np] == port
                        })
                })
            })
            .map(Claim::Pod),
    );
    out.extend(
        (0..POD_SLOTS)
            .filter(|s| {
                w.pods[*s].as_ref().is_some_and(|p| {
                    p.local && p.host_network && listens(p).contains(&(proto, port))
                })
            })
            .map(|_| Claim::HostNetwork),
    );
    out
}

/// Egress of isolated `slot` to this node's address on a port the node DNATs: every
/// backend must be allowed, and a port two objects claim allows nothing. `None` when
/// nothing claims the port.
fn node_port_verdict(w: &World, slot: usize, proto: &str, port: u16) -> Option<bool> {
    Some(match node_port_claims(w, proto, port).as_slice() {
        [] => return None,
        [Claim::Service(svc)] => to_every_backend(w, slot, svc, proto),
        [Claim::Pod(pod)] => {
            let pod = *pod;
            let (_, target, _) = w.pods[pod].as_ref()?.host_port?;
            [slot_ip(pod), slot_ip6(pod)].iter().all(|ip| {
                direct(
                    w,
                    slot,
                    Direction::Egress,
                    ip.parse().unwrap(),
                    proto,
                    HOST_PORT_TARGETS[target],
                )
            })
        }
        [Claim::HostNetwork] => to_backend(w, slot, node_ip(), proto, port),
        _ => false,
    })
}

fn backends(svc: &ServiceT) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = svc
        .backends
        .iter()
        .map(|s| slot_ip(*s).parse().unwrap())
        .collect();
    if svc.external_backend {
        out.push(EXTERNAL[0].parse().unwrap());
    }
    if svc.node_backend {
        out.push(node_ip());
    }
    out.sort();
    out.dedup();
    out
}

fn isolated(w: &World, local: &PodT, dir: Direction) -> bool {
    let labels = pod_labels(local);
    let by_netpol = w.netpols.iter().flatten().any(|np| {
        np.ns == local.ns
            && sel_matches(&np.selector, &labels)
            && match dir {
                Direction::Ingress => np.types.0,
                Direction::Egress => np.types.1,
            }
    });
    by_netpol || ray_rules(w, local, dir).is_some_and(|(iso, _, _)| iso)
}

fn direct(w: &World, slot: usize, dir: Direction, peer: IpAddr, proto: &str, port: u16) -> bool {
    if peer == node_ip() {
        return true;
    }
    direct_as(w, slot, dir, (peer, pod_at(w, peer)), proto, port)
}

/// A flow of `slot` with a peer at an address that is a given pod (or none), by the
/// rules alone.
fn direct_as(
    w: &World,
    slot: usize,
    dir: Direction,
    (peer, peer_pod): (IpAddr, Option<&PodT>),
    proto: &str,
    port: u16,
) -> bool {
    let local = w.pods[slot].as_ref().unwrap();
    if !isolated(w, local, dir) {
        return true;
    }
    let labels = pod_labels(local);
    for np in w.netpols.iter().flatten() {
        if np.ns != local.ns || !sel_matches(&np.selector, &labels) {
            continue;
        }
        let (on, rules) = match dir {
            Direction::Ingress => (np.types.0, &np.ingress),
            Direction::Egress => (np.types.1, &np.egress),
        };
        if on
            && rules
                .iter()
                .any(|r| rule_allows(w, r, np.ns, local, dir, (peer, peer_pod), proto, port))
        {
            return true;
        }
    }
    if let Some((true, user, head)) = ray_rules(w, local, dir) {
        // Base flows: same cluster, all ports.
        if peer_pod.is_some_and(|p| p.ns == 0 && p.ray.is_some()) {
            return true;
        }
        // DNS: UDP/TCP 53 to the pods backing n0/svc0 (any of their addresses).
        if dir == Direction::Egress && (proto == "UDP" || proto == "TCP") && port == 53 {
            let dns = w.services[0].as_ref().filter(|svc| svc.ns == 0);
            let slot = (0..POD_SLOTS).find(|s| {
                w.pods[*s].as_ref().is_some_and(|p| !p.host_network)
                    && (slot_ip(*s).parse::<IpAddr>().unwrap() == peer
                        || slot_ip6(*s).parse::<IpAddr>().unwrap() == peer)
            });
            if let (Some(dns), Some(slot)) = (dns, slot)
                && backends(dns).contains(&slot_ip(slot).parse().unwrap())
            {
                return true;
            }
        }
        // The operator (settings(): namespace n2, app=z) to the head's ports.
        if head
            && dir == Direction::Ingress
            && proto == "TCP"
            && (port == 8265 || port == 10001)
            && peer_pod.is_some_and(|p| {
                p.ns == 2 && pod_labels(p).get("app").map(String::as_str) == Some("z")
            })
        {
            return true;
        }
        if user
            .iter()
            .any(|r| rule_allows(w, r, 0, local, dir, (peer, peer_pod), proto, port))
        {
            return true;
        }
    }
    false
}

// ------------------------------------------------------------------ objects

fn sel_json(s: &Sel) -> Value {
    let labels: serde_json::Map<String, Value> = s
        .labels
        .iter()
        .map(|(k, v)| (KEYS[*k].to_owned(), json!(VALUES[*v])))
        .collect();
    let mut out = json!({"matchLabels": labels});
    if let Some((k, op, values)) = &s.expr {
        let values: Vec<&str> = values.iter().map(|v| VALUES[*v]).collect();
        out["matchExpressions"] = match OPS[*op] {
            "In" | "NotIn" => json!([{"key": KEYS[*k], "operator": OPS[*op], "values": values}]),
            _ => json!([{"key": KEYS[*k], "operator": OPS[*op]}]),
        };
    }
    out
}

fn rule_json(r: &RuleT, dir: Direction) -> Value {
    let mut out = json!({});
    if let Some(peers) = &r.peers {
        let peers: Vec<Value> = peers
            .iter()
            .map(|p| match p {
                PeerT::Block(b) => {
                    json!({"ipBlock": {"cidr": BLOCKS[*b].0, "except": BLOCKS[*b].1}})
                }
                PeerT::Pods { ns, pods } => {
                    let mut v = json!({});
                    if let Some(ns) = ns {
                        v["namespaceSelector"] = sel_json(ns);
                    }
                    if let Some(pods) = pods {
                        v["podSelector"] = sel_json(pods);
                    }
                    v
                }
            })
            .collect();
        out[if dir == Direction::Ingress {
            "from"
        } else {
            "to"
        }] = json!(peers);
    }
    if let Some(ports) = &r.ports {
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| {
                let mut v = json!({});
                if let Some(i) = p.proto {
                    v["protocol"] = json!(PROTOS[i]);
                }
                match &p.port {
                    None => {}
                    Some(PortVal::Num(n)) => v["port"] = json!(n),
                    Some(PortVal::Range(a, b)) => {
                        v["port"] = json!(a);
                        v["endPort"] = json!(b);
                    }
                    Some(PortVal::Name(i)) => v["port"] = json!(PORT_NAMES[*i]),
                }
                v
            })
            .collect();
        out["ports"] = json!(ports);
    }
    out
}

fn rules_json(rules: &[RuleT], dir: Direction) -> Value {
    Value::Array(rules.iter().map(|r| rule_json(r, dir)).collect())
}

fn role_json(r: &RoleT) -> Value {
    json!({"ingressRules": rules_json(&r.ingress, Direction::Ingress), "egressRules": rules_json(&r.egress, Direction::Egress)})
}

/// `spec.networkPolicy` of `rc`.
fn cluster_block(c: &ClusterT) -> Value {
    let mode = ["DenyAll", "DenyAllIngress", "DenyAllEgress"][c.mode];
    let mut block = json!({
        "mode": mode,
        "head": role_json(&c.head), "worker": role_json(&c.worker),
    });
    if let Some(g) = &c.group_g {
        let mut entry = role_json(g);
        entry["groupName"] = json!("g");
        block["workerGroups"] = json!([entry]);
    }
    block
}

fn apply(e: &mut Engine, w: &mut World, op: &Op) {
    match op {
        Op::Ns(n, env) => {
            w.ns_env[*n] = *env;
            let l: Vec<(&str, &str)> = env.iter().map(|v| ("env", VALUES[*v])).collect();
            e.upsert_namespace(&namespace(NAMESPACES[*n], &l));
        }
        Op::Pod(s, p) => {
            let name = format!("p{s}");
            if let Some(old) = &w.pods[*s]
                && p.as_ref().is_none_or(|p| p.ns != old.ns)
            {
                e.remove_pod(NAMESPACES[old.ns], &name);
            }
            if let Some(p) = p {
                let labels = pod_labels(p);
                let l: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let ports: Vec<(&str, &str, i32)> = p
                    .ports
                    .iter()
                    .map(|i| (PORTS[*i].0, PORTS[*i].1, i32::from(PORTS[*i].2)))
                    .collect();
                let (node, node_ip) = if p.local {
                    (NODE, NODE_IP)
                } else {
                    ("node-b", OTHER_NODE_IP)
                };
                // A hostNetwork pod has its node's address (IPv4 only here).
                let ip = if p.host_network {
                    node_ip.to_owned()
                } else {
                    slot_ip(*s)
                };
                let mut object = pod(NAMESPACES[p.ns], &name, &l, &ip, node, &ports);
                if p.host_network {
                    object = host_network(object);
                } else if let Some(ips) = object.status.as_mut().and_then(|st| st.pod_ips.as_mut())
                {
                    ips.push(k8s_openapi::api::core::v1::PodIP { ip: slot_ip6(*s) });
                }
                if let Some((proto, target, node_port)) = p.host_port {
                    object = with_host_port(
                        object,
                        ["TCP", "UDP"][proto],
                        i32::from(HOST_PORT_TARGETS[target]),
                        i32::from(NODE_PORTS[node_port]),
                    );
                }
                e.upsert_pod(&object);
            }
            w.pods[*s] = p.clone();
        }
        Op::Netpol(s, np) => {
            let name = format!("np{s}");
            if let Some(old) = &w.netpols[*s] {
                e.remove_network_policy(NAMESPACES[old.ns], &name);
            }
            if let Some(np) = np {
                let mut types = Vec::new();
                if np.types.0 {
                    types.push("Ingress");
                }
                if np.types.1 {
                    types.push("Egress");
                }
                let obj = json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": name, "namespace": NAMESPACES[np.ns]},
                    "spec": {"podSelector": sel_json(&np.selector), "policyTypes": types,
                             "ingress": rules_json(&np.ingress, Direction::Ingress),
                             "egress": rules_json(&np.egress, Direction::Egress)}
                });
                e.upsert_network_policy(&serde_json::from_value(obj).unwrap());
            }
            w.netpols[*s] = np.clone();
        }
        Op::Cluster(c) => {
            match c {
                None => e.remove_raycluster("n0", "rc"),
                Some(c) => {
                    let obj = json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
                        "metadata": {"name": "rc", "namespace": "n0"}, "spec": {"networkPolicy": cluster_block(c)}});
                    e.upsert_raycluster(&serde_json::from_value(obj).unwrap());
                }
            }
            w.cluster = c.clone();
        }
        Op::Service(s, svc) => {
            let name = format!("svc{s}");
            if let Some(old) = &w.services[*s] {
                e.remove_endpoint_slice(NAMESPACES[old.ns], &format!("{name}-slice"));
                e.remove_service(NAMESPACES[old.ns], &name);
            }
            if let Some(svc) = svc {
                let proto = ["TCP", "UDP"][svc.proto];
                let ns = NAMESPACES[svc.ns];
                match svc.node_port {
                    Some((node_port, lb)) => e.upsert_service(&exposed_service(
                        ns,
                        &name,
                        if lb { "LoadBalancer" } else { "NodePort" },
                        &service_ip(*s),
                        &[("p", proto, 80, i32::from(NODE_PORTS[node_port]))],
                    )),
                    None => {
                        e.upsert_service(&service(ns, &name, &service_ip(*s), &[("p", proto, 80)]))
                    }
                }
                let ips: Vec<String> = backends(svc).iter().map(IpAddr::to_string).collect();
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                e.upsert_endpoint_slice(&slice(
                    ns,
                    &name,
                    &[("p", proto, i32::from(svc.target))],
                    &ips,
                ));
            }
            w.services[*s] = svc.clone();
        }
    }
}

/// DNS is the Service in slot 0 when it lives in n0 (`n0/svc0`).
fn settings_for_property() -> Settings {
    let mut s = settings();
    s.enforce_networkpolicies = true;
    s.dns = DnsMode::Service {
        namespace: "n0".into(),
        name: "svc0".into(),
    };
    s.operator_namespaces = vec!["n2".into()];
    s.operator_selector = Selector::from_labels([("app", "z")]);
    s
}

/// Feeds a whole world into a fresh engine, in one fixed order.
fn full(w: &World) -> Engine {
    full_with(w, settings_for_property())
}

fn full_with(w: &World, settings: Settings) -> Engine {
    full_adopting(w, settings, &Tables::default())
}

/// A restarted agent's first compile: the engine told which policy id each endpoint
/// had in the pinned maps (`pinned`) before the objects arrive.
fn full_adopting(w: &World, settings: Settings, pinned: &Tables) -> Engine {
    let mut e = Engine::new(settings);
    e.adopt_policy_ids(pinned.endpoints.iter().map(|(ep, p)| (*ep, p.policy_id)));
    let mut scratch = World::default();
    for n in 0..3 {
        apply(&mut e, &mut scratch, &Op::Ns(n, w.ns_env[n]));
    }
    for (s, p) in w.pods.iter().enumerate() {
        apply(&mut e, &mut scratch, &Op::Pod(s, p.clone()));
    }
    for (s, svc) in w.services.iter().enumerate() {
        apply(&mut e, &mut scratch, &Op::Service(s, svc.clone()));
    }
    for (s, np) in w.netpols.iter().enumerate() {
        apply(&mut e, &mut scratch, &Op::Netpol(s, np.clone()));
    }
    apply(&mut e, &mut scratch, &Op::Cluster(w.cluster.clone()));
    e.take_pinned_policy_ids();
    e
}

/// The same world fed in the opposite order (RayCluster and NetworkPolicies first,
/// pods last, each kind reversed), as a restarted agent's sources may deliver it.
fn full_reversed(w: &World) -> Engine {
    full_reversed_adopting(w, &Tables::default())
}

/// [`full_reversed`] as a restarted agent: told the pinned policy ids first.
fn full_reversed_adopting(w: &World, pinned: &Tables) -> Engine {
    let mut e = Engine::new(settings_for_property());
    e.adopt_policy_ids(pinned.endpoints.iter().map(|(ep, p)| (*ep, p.policy_id)));
    let mut scratch = World::default();
    apply(&mut e, &mut scratch, &Op::Cluster(w.cluster.clone()));
    for (s, np) in w.netpols.iter().enumerate().rev() {
        apply(&mut e, &mut scratch, &Op::Netpol(s, np.clone()));
    }
    for (s, svc) in w.services.iter().enumerate().rev() {
        apply(&mut e, &mut scratch, &Op::Service(s, svc.clone()));
    }
    for (s, p) in w.pods.iter().enumerate().rev() {
        apply(&mut e, &mut scratch, &Op::Pod(s, p.clone()));
    }
    for n in (0..3).rev() {
        apply(&mut e, &mut scratch, &Op::Ns(n, w.ns_env[n]));
    }
    e.take_pinned_policy_ids();
    e
}

/// Every sampled flow of every local pod must get the reference verdict, with peers
/// known by address and, for this node's hostNetwork pods, by identity.
fn check_verdicts(e: &Engine, w: &World) -> Result<(), TestCaseError> {
    let mut peers: Vec<IpAddr> = (0..POD_SLOTS)
        .flat_map(|s| [slot_ip(s).parse().unwrap(), slot_ip6(s).parse().unwrap()])
        .collect();
    peers.extend(EXTERNAL.iter().map(|p| p.parse::<IpAddr>().unwrap()));
    peers.push("fd00::ff".parse().unwrap());
    peers.push("2001:db8::1".parse().unwrap());
    peers.push(node_ip());
    peers.push(OTHER_NODE_IP.parse().unwrap());
    let services: Vec<IpAddr> = (0..SERVICE_SLOTS)
        .map(|s| service_ip(s).parse().unwrap())
        .collect();
    // The node's address is probed on the ports it may DNAT too.
    let node_probes: Vec<u16> = PROBE_PORTS.iter().chain(&NODE_PORTS).copied().collect();
    let host_network = host_network_slots(e, w)?;
    for (slot, p) in w.pods.iter().enumerate() {
        let Some(p) = p else { continue };
        let id = e.endpoint_id(NAMESPACES[p.ns], &format!("p{slot}"));
        prop_assert_eq!(
            id.is_some(),
            p.local && !p.host_network,
            "endpoint of p{}",
            slot
        );
        let Some(id) = id else { continue };
        for dir in Direction::ALL {
            let extra = if dir == Direction::Egress {
                &services[..]
            } else {
                &[][..]
            };
            for peer in peers.iter().chain(extra) {
                let ports = if *peer == node_ip() {
                    &node_probes[..]
                } else {
                    &PROBE_PORTS[..]
                };
                for proto in PROTOS {
                    for &port in ports {
                        let want = reference(w, slot, dir, *peer, proto, port);
                        let got = e.tables().allows(id, dir, *peer, proto_num(proto), port);
                        prop_assert_eq!(
                            got,
                            want,
                            "p{} {:?} {} {}/{}",
                            slot,
                            dir,
                            peer,
                            proto,
                            port
                        );
                        let why = e.explain(id, dir, *peer, proto_num(proto), port);
                        prop_assert_eq!(why.allowed(), got, "explain {:?}", why);
                    }
                }
            }
            for &(host, identity) in &host_network {
                for proto in PROTOS {
                    for &port in &node_probes {
                        let want = reference_identified(w, slot, dir, host, proto, port);
                        let got = e.tables().allows_identified(
                            id,
                            dir,
                            node_ip(),
                            identity,
                            proto_num(proto),
                            port,
                        );
                        prop_assert_eq!(
                            got,
                            want,
                            "p{} {:?} hostNetwork p{} {}/{}",
                            slot,
                            dir,
                            host,
                            proto,
                            port
                        );
                        let why = e.explain_identified(
                            id,
                            dir,
                            node_ip(),
                            identity,
                            proto_num(proto),
                            port,
                        );
                        prop_assert_eq!(why.allowed(), got, "explain {:?}", why);
                    }
                }
            }
        }
    }
    Ok(())
}

/// This node's hostNetwork pods as `(slot, identity)`; the engine must list exactly
/// those.
fn host_network_slots(e: &Engine, w: &World) -> Result<Vec<(usize, u32)>, TestCaseError> {
    let listed: BTreeMap<(String, String), u32> = e.host_network_pods().into_iter().collect();
    let mut out = Vec::new();
    for (slot, p) in w.pods.iter().enumerate() {
        let Some(p) = p.as_ref().filter(|p| p.local && p.host_network) else {
            continue;
        };
        let key = (NAMESPACES[p.ns].to_owned(), format!("p{slot}"));
        let identity = listed.get(&key).copied();
        prop_assert!(identity.is_some(), "p{} is not listed", slot);
        out.extend(identity.map(|id| (slot, id)));
    }
    prop_assert_eq!(out.len(), listed.len(), "listed: {:?}", listed);
    Ok(out)
}

fn proto_num(p: &str) -> u8 {
    proto(p)
}

type Canonical = (
    BTreeMap<String, (bool, bool, BTreeSet<String>)>,
    BTreeMap<IpAddr, String>,
    BTreeMap<IpNet, String>,
    BTreeMap<(u8, u16), String>,
);

/// Tables with every id replaced by what it stands for, so two engines that numbered
/// things differently compare equal when they mean the same.
fn canonical(e: &Engine) -> Canonical {
    let t: &Tables = e.tables();
    let mut names: HashMap<u32, BTreeSet<String>> = HashMap::new();
    for (ip, id) in &t.addresses {
        names.entry(*id).or_default().insert(ip.to_string());
    }
    for (net, id) in &t.cidrs {
        names.entry(*id).or_default().insert(net.to_string());
    }
    for (port, id) in &t.node_ports {
        names
            .entry(*id)
            .or_default()
            .insert(format!("node port {}/{}", port.protocol, port.port));
    }
    for ((ns, name), id) in e.host_network_pods() {
        names
            .entry(id)
            .or_default()
            .insert(format!("hostNetwork {ns}/{name}"));
    }
    let name = |id: &u32| {
        if *id == identity::HOST {
            return "HOST".to_owned();
        }
        names
            .get(id)
            .map(|n| n.iter().cloned().collect::<Vec<_>>().join(","))
            .unwrap_or_else(|| "?".into())
    };
    let mut endpoints = BTreeMap::new();
    for meta in e.endpoints() {
        let rows = t
            .policy
            .iter()
            .filter(|r| r.policy_id == meta.policy.policy_id)
            .map(|r| {
                format!(
                    "{:?} {} {:?} {}/{}",
                    r.direction,
                    name(&r.identity),
                    r.protocol,
                    r.port,
                    r.port_bits
                )
            })
            .collect();
        endpoints.insert(
            format!("{}/{}", meta.namespace, meta.pod),
            (
                meta.policy.isolate_ingress,
                meta.policy.isolate_egress,
                rows,
            ),
        );
    }
    let addresses = t.addresses.iter().map(|(ip, id)| (*ip, name(id))).collect();
    let cidrs = t.cidrs.iter().map(|(net, id)| (*net, name(id))).collect();
    let node_ports = t
        .node_ports
        .iter()
        .map(|(port, id)| ((port.protocol, port.port), name(id)))
        .collect();
    (endpoints, addresses, cidrs, node_ports)
}

/// Rows that belong to no endpoint's policy are leaks.
fn no_orphan_rows(e: &Engine) -> Result<(), TestCaseError> {
    let live: BTreeSet<u32> = e.tables().endpoints.values().map(|p| p.policy_id).collect();
    for row in &e.tables().policy {
        prop_assert!(live.contains(&row.policy_id), "orphan row {:?}", row);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_tables_match_the_reference(w in world()) {
        let e = full(&w);
        check_verdicts(&e, &w)?;
        no_orphan_rows(&e)?;
    }

    #[test]
    fn incremental_updates_equal_a_fresh_compile(w in world(), ops in prop::collection::vec(op(), 1..10)) {
        let mut e = full(&w);
        let mut world = w.clone();
        let mut mirror = Tables::default();
        mirror.apply(&e.take_diff());
        for op in &ops {
            apply(&mut e, &mut world, op);
            mirror.apply(&e.take_diff());
            prop_assert_eq!(&mirror, e.tables(), "diffs replay to the tables after {:?}", op);
            no_orphan_rows(&e)?;
        }
        check_verdicts(&e, &world)?;
        let fresh = full(&world);
        prop_assert_eq!(canonical(&e), canonical(&fresh));
        // An in-place edit keeps a policy's id, so ids are not always their
        // content's; a restarted agent told what the pinned maps hold gives every
        // endpoint its id back: the very same numbers, it renumbers nothing.
        let restarted = full_adopting(&world, settings_for_property(), e.tables());
        prop_assert_eq!(e.tables(), restarted.tables(), "a restart renumbers policies");
    }

    #[test]
    fn a_restart_renumbers_nothing_whatever_order_objects_arrive_in(w in world()) {
        // A policy keeps the id it was first interned with, so two orders may number
        // policies differently; they mean the same, and a restarted agent fed the
        // objects in another order gives every endpoint the pinned id back.
        let (forward, reversed) = (full(&w), full_reversed(&w));
        prop_assert_eq!(canonical(&forward), canonical(&reversed));
        let restarted = full_reversed_adopting(&w, forward.tables());
        prop_assert_eq!(forward.tables(), restarted.tables());
    }
}

// ------------------------------------------- RayCluster == what KubeRay would generate

/// The NetworkPolicies KubeRay generates for `rc` (head, and one per worker group
/// reading), with the base flows written out as plain rules.
fn kuberay_netpols(c: &ClusterT) -> Vec<Value> {
    let mode = ["DenyAll", "DenyAllIngress", "DenyAllEgress"][c.mode];
    let types: Vec<&str> = match mode {
        "DenyAll" => vec!["Ingress", "Egress"],
        "DenyAllIngress" => vec!["Ingress"],
        _ => vec!["Egress"],
    };
    let same = json!({"podSelector": {"matchLabels": {"ray.io/cluster": "rc"}}});
    let operator = json!({
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "n2"}},
                  "podSelector": {"matchLabels": {"app": "z"}}}],
        "ports": [{"port": 8265}, {"port": 10001}]
    });
    let policy = |name: &str, selector: Value, role: &RoleT, head: bool| {
        let mut ingress = vec![json!({"from": [same.clone()]})];
        if head {
            ingress.push(operator.clone());
        }
        if let Value::Array(user) = rules_json(&role.ingress, Direction::Ingress) {
            ingress.extend(user);
        }
        let mut egress = vec![json!({"to": [same.clone()]})];
        if let Value::Array(user) = rules_json(&role.egress, Direction::Egress) {
            egress.extend(user);
        }
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "n0"},
            "spec": {"podSelector": selector, "policyTypes": types, "ingress": ingress, "egress": egress}
        })
    };
    let mut out = vec![policy(
        "rc-head",
        json!({"matchLabels": {"ray.io/cluster": "rc", "ray.io/node-type": "head"}}),
        &c.head,
        true,
    )];
    match &c.group_g {
        Some(g) => {
            out.push(policy(
                "rc-worker-g",
                json!({"matchLabels": {"ray.io/cluster": "rc", "ray.io/node-type": "worker", "ray.io/group": "g"}}),
                g,
                false,
            ));
            out.push(policy(
                "rc-worker",
                json!({"matchLabels": {"ray.io/cluster": "rc", "ray.io/node-type": "worker"},
                       "matchExpressions": [{"key": "ray.io/group", "operator": "NotIn", "values": ["g"]}]}),
                &c.worker,
                false,
            ));
        }
        None => out.push(policy(
            "rc-worker",
            json!({"matchLabels": {"ray.io/cluster": "rc", "ray.io/node-type": "worker"}}),
            &c.worker,
            false,
        )),
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// docs/semantics.md: RayCluster isolation compiles to exactly what KubeRay would generate
    /// plus the base flows (DNS is off here; it is tested on its own).
    #[test]
    fn raycluster_equals_the_networkpolicies_kuberay_generates(mut w in world(), c in cluster_t()) {
        w.cluster = Some(c.clone());
        let mut off = settings_for_property();
        off.dns = DnsMode::Off;
        let ray = full_with(&w, off.clone());
        let mut plain = w.clone();
        plain.cluster = None;
        let mut e = full_with(&plain, off);
        for np in kuberay_netpols(&c) {
            e.upsert_network_policy(&serde_json::from_value(np).unwrap());
        }
        let mut peers: Vec<IpAddr> = (0..POD_SLOTS).map(|s| slot_ip(s).parse().unwrap()).collect();
        peers.extend(EXTERNAL.iter().map(|p| p.parse::<IpAddr>().unwrap()));
        peers.extend((0..SERVICE_SLOTS).map(|s| service_ip(s).parse::<IpAddr>().unwrap()));
        peers.push(OTHER_NODE_IP.parse().unwrap());
        for (slot, p) in w.pods.iter().enumerate() {
            let Some(p) = p else { continue };
            let name = format!("p{slot}");
            let (Some(a), Some(b)) = (ray.endpoint_id(NAMESPACES[p.ns], &name), e.endpoint_id(NAMESPACES[p.ns], &name)) else {
                continue;
            };
            for dir in Direction::ALL {
                for peer in &peers {
                    for proto in PROTOS {
                        for port in PROBE_PORTS {
                            let pn = proto_num(proto);
                            prop_assert_eq!(
                                ray.tables().allows(a, dir, *peer, pn, port),
                                e.tables().allows(b, dir, *peer, pn, port),
                                "p{} {:?} {} {}/{}", slot, dir, peer, proto, port
                            );
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------ unknown fields never widen a rule

/// Names no part of a rule has, some of them one typo away from one that does.
const TYPOS: [&str; 7] = [
    "frm",
    "matchLabel",
    "nested",
    "podSelectr",
    "excpt",
    "protocl",
    "x-future",
];

/// Every object inside the rules of `block` where a field could be written, as
/// `(JSON pointer of the object, JSON pointer of its rule, field path of the object)`:
/// each rule, peer, pod and namespace selector, `matchExpressions` entry, ipBlock and
/// port.
fn field_positions(block: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut roles = vec![("/head".to_owned(), ".head".to_owned())];
    roles.push(("/worker".to_owned(), ".worker".to_owned()));
    if block.get("workerGroups").is_some() {
        roles.push(("/workerGroups/0".to_owned(), ".workerGroups[0]".to_owned()));
    }
    for (role_ptr, role_path) in roles {
        for (list, peers_key) in [("ingressRules", "from"), ("egressRules", "to")] {
            let rules = block
                .pointer(&format!("{role_ptr}/{list}"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (r, rule) in rules.iter().enumerate() {
                let rule_ptr = format!("{role_ptr}/{list}/{r}");
                let rule_path = format!("{role_path}.{list}[{r}]");
                let mut at = |ptr: String, path: String| out.push((ptr, rule_ptr.clone(), path));
                at(rule_ptr.clone(), rule_path.clone());
                for (i, peer) in rule
                    .get(peers_key)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let ptr = format!("{rule_ptr}/{peers_key}/{i}");
                    let path = format!("{rule_path}.{peers_key}[{i}]");
                    at(ptr.clone(), path.clone());
                    for key in ["podSelector", "namespaceSelector", "ipBlock"] {
                        let Some(part) = peer.get(key) else { continue };
                        at(format!("{ptr}/{key}"), format!("{path}.{key}"));
                        for (e, _) in part
                            .get("matchExpressions")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .enumerate()
                        {
                            at(
                                format!("{ptr}/{key}/matchExpressions/{e}"),
                                format!("{path}.{key}.matchExpressions[{e}]"),
                            );
                        }
                    }
                }
                for (i, _) in rule
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    at(
                        format!("{rule_ptr}/ports/{i}"),
                        format!("{rule_path}.ports[{i}]"),
                    );
                }
            }
        }
    }
    out
}

/// The RayCluster `rc` with `block`, as `spec.networkPolicy` or as the annotation.
fn cluster_object(block: &Value, annotation: bool) -> rayfence::crd::RayCluster {
    let obj = if annotation {
        json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "rc", "namespace": "n0",
                         "annotations": {"rayfence.io/network-policy": block.to_string()}},
            "spec": {}})
    } else {
        json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "rc", "namespace": "n0"}, "spec": {"networkPolicy": block}})
    };
    serde_json::from_value(obj).unwrap()
}

/// Every sampled verdict of every local pod, by pod name.
fn verdicts(
    e: &Engine,
    w: &World,
) -> BTreeMap<(String, Direction, IpAddr, &'static str, u16), bool> {
    let mut peers: Vec<IpAddr> = (0..POD_SLOTS)
        .flat_map(|s| [slot_ip(s).parse().unwrap(), slot_ip6(s).parse().unwrap()])
        .collect();
    peers.extend(EXTERNAL.iter().map(|p| p.parse::<IpAddr>().unwrap()));
    peers.extend((0..SERVICE_SLOTS).map(|s| service_ip(s).parse::<IpAddr>().unwrap()));
    peers.push(node_ip());
    peers.push(OTHER_NODE_IP.parse().unwrap());
    peers.push("2001:db8::1".parse().unwrap());
    let mut out = BTreeMap::new();
    for (slot, p) in w.pods.iter().enumerate() {
        let Some(p) = p else { continue };
        let name = format!("p{slot}");
        let Some(id) = e.endpoint_id(NAMESPACES[p.ns], &name) else {
            continue;
        };
        for dir in Direction::ALL {
            for peer in &peers {
                for proto in PROTOS {
                    for port in PROBE_PORTS {
                        let allowed = e.tables().allows(id, dir, *peer, proto_num(proto), port);
                        out.insert((name.clone(), dir, *peer, proto, port), allowed);
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// docs/semantics.md "Bad input", issue 17: a field its type does not have, anywhere in a
    /// rule (the rule, a peer, a selector or one of its expressions, an ipBlock, a
    /// port), makes that rule allow nothing and is reported with its path; it never
    /// makes anything wider, from the spec field or the annotation.
    #[test]
    fn an_unknown_field_anywhere_in_a_rule_never_widens_it(
        mut w in world(),
        c in cluster_t(),
        position in any::<prop::sample::Index>(),
        typo in prop::sample::select(TYPOS.to_vec()),
        value in prop_oneof![
            Just(json!({"matchLabels": {"app": "x"}})),
            Just(json!([{"podSelector": {}}])),
            Just(json!("10.0.0.0/8")),
            Just(json!(null)),
        ],
        annotation in any::<bool>(),
    ) {
        let block = cluster_block(&c);
        let positions = field_positions(&block);
        prop_assume!(!positions.is_empty());
        let (object_ptr, rule_ptr, path) = position.get(&positions).clone();

        let mut typoed = block.clone();
        typoed.pointer_mut(&object_ptr).unwrap()[typo] = value;
        // The reading the typo must get: the same cluster without that rule.
        let mut without = block.clone();
        let (list_ptr, index) = rule_ptr.rsplit_once('/').unwrap();
        without
            .pointer_mut(list_ptr)
            .and_then(Value::as_array_mut)
            .unwrap()
            .remove(index.parse().unwrap());

        w.cluster = None;
        let mut engines = Vec::new();
        for b in [&block, &typoed, &without] {
            let mut e = full(&w);
            e.upsert_raycluster(&cluster_object(b, annotation));
            engines.push(e);
        }
        let (clean, with_typo, dropped) = (
            verdicts(&engines[0], &w),
            verdicts(&engines[1], &w),
            verdicts(&engines[2], &w),
        );
        for (flow, allowed) in &with_typo {
            prop_assert!(!allowed || clean[flow], "{} at {}: {:?} is wider", typo, path, flow);
        }
        prop_assert_eq!(&with_typo, &dropped, "{} at {}", typo, path);

        let prefix = if annotation {
            "metadata.annotations[rayfence.io/network-policy]"
        } else {
            "spec.networkPolicy"
        };
        let want = format!("{prefix}{path}.{typo}");
        let problems = engines[1].problems();
        prop_assert!(
            problems.iter().any(|p| p.field == want && p.message.contains("allows nothing")),
            "no problem names {}: {:?}", want, problems
        );
    }
}
