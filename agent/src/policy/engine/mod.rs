//! The incremental engine: keeps the cluster objects, the identities, the hash-consed
//! local policies and their rows, and updates [`Tables`] by what each change touches.
//!
//! Identities (see `docs` in the report / module `policy` header):
//! - one pod identity per distinct (namespace, labels, named container ports);
//! - one CIDR identity per distinct prefix (a `cidr` or `except` of any local policy),
//!   so the longest match names exactly the blocks an address is in, and a prefix keeps
//!   its identity for as long as it exists (adding a block never renumbers others);
//! - one identity per Service, on its ClusterIPs (exact and as a host prefix, so an
//!   ipBlock never matches a ClusterIP: the decision is the backends', post-DNAT).
//!
//! Must not: do I/O, keep a clock, or rebuild everything on a change.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::netpol::{self, ParsedNetpol};
use super::output::Output;
use super::problem::{ObjectRef, Problem, Severity};
use super::raycluster::{
    self, CompiledCluster, Declared, LABEL_CLUSTER, LABEL_GROUP, LABEL_NODE_TYPE, UserPolicy,
};
use super::rule::{NamespaceMatch, Peer, PortMatch, Role, Rule, RuleOrigin, parse_protocol};
use super::selector::Labels;
use super::settings::{DnsMode, Settings};
use crate::crd::RayCluster;
use crate::tables::{
    Direction, EndpointId, EndpointPolicy, IdentityId, PolicyEntry, PolicyId, Tables, TablesDiff,
    identity,
};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: u8,
    pub port: u16,
}

/// Why a flow gets its verdict; computed from the same rows the tables hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Explanation {
    /// Not a local pod: the datapath does not see it.
    UnknownEndpoint,
    /// The direction is not isolated for this pod.
    NotIsolated,
    /// The peer is this node.
    Host,
    /// Allowed; every rule that allows it, with the object it is written in.
    Allowed(Vec<(ObjectRef, RuleOrigin)>),
    /// Allowed to a Service ClusterIP: every backend is allowed, by these rules.
    AllowedViaService {
        service: ObjectKey,
        rules: Vec<(ObjectRef, RuleOrigin)>,
    },
    /// No rule allows it.
    Denied,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        !matches!(self, Self::UnknownEndpoint | Self::Denied)
    }
}

/// Sizes of the engine's state, for metrics (bounded label-free gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub endpoints: usize,
    pub policies: usize,
    pub pod_identities: usize,
    pub prefixes: usize,
    pub services: usize,
    pub addresses: usize,
    pub cidrs: usize,
    pub policy_rows: usize,
}

/// The object kinds the engine consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    RayCluster,
    Service,
    EndpointSlice,
    NetworkPolicy,
}

/// What is known about a local pod, for metrics and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointMeta {
    pub id: EndpointId,
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// `ray.io/cluster`, when the pod carries it.
    pub cluster: Option<String>,
    /// Role from `ray.io/node-type` / `ray.io/group`.
    pub role: Option<Role>,
    pub policy: EndpointPolicy,
}

#[derive(Debug)]
struct PodState {
    uid: String,
    labels: Labels,
    ips: Vec<IpAddr>,
    local: bool,
    named_ports: Arc<Vec<NamedPort>>,
    identity: Option<IdentityId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey {
    namespace: String,
    labels: Labels,
    named_ports: Arc<Vec<NamedPort>>,
    /// Backs the DNS Service (the DNS base flow's peer), so that flow is exact.
    dns_backend: bool,
}

#[derive(Debug)]
struct PodIdentity {
    key: IdentityKey,
    members: BTreeSet<ObjectKey>,
}

#[derive(Debug, Default)]
struct ClusterState {
    parsed: Option<raycluster::ParsedCluster>,
    last_good: Option<UserPolicy>,
    compiled: Option<CompiledCluster>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ServicePort {
    name: String,
    protocol: u8,
    port: u16,
}

#[derive(Debug)]
struct ServiceState {
    identity: IdentityId,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
}

#[derive(Debug)]
struct SliceState {
    service: ObjectKey,
    ports: Vec<ServicePort>,
    addresses: Vec<IpAddr>,
}

/// Everything that decides a local pod's rows: pods with equal specs share a policy id.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PolicySpec {
    isolate_ingress: bool,
    isolate_egress: bool,
    ingress: Vec<Arc<Rule>>,
    egress: Vec<Arc<Rule>>,
    /// The local pod's named ports, only when an ingress rule names a port.
    local_ports: Arc<Vec<NamedPort>>,
}

impl PolicySpec {
    fn rules(&self) -> impl Iterator<Item = (Direction, &Arc<Rule>)> {
        self.ingress
            .iter()
            .map(|r| (Direction::Ingress, r))
            .chain(self.egress.iter().map(|r| (Direction::Egress, r)))
    }
}

#[derive(Debug)]
struct PolicyState {
    spec: Arc<PolicySpec>,
    refs: usize,
    /// Rows by peer identity; sorted, never empty.
    rows: HashMap<IdentityId, Vec<PolicyEntry>>,
    prefixes: Vec<IpNet>,
    keys: Vec<IndexKey>,
}

/// How a policy's peers are found from a changed identity or namespace, so a change
/// only recomputes the policies it can affect.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IndexKey {
    /// A pod peer whose pod selector requires this label.
    PodPair(String, String),
    /// A pod peer without one, whose namespace selector requires this label.
    NsPair(String, String),
    /// A pod peer without one, limited to this namespace.
    NsName(String),
    /// A pod peer that can match any identity.
    Unindexed,
    /// Any ipBlock peer.
    Blocks,
    /// A `ServiceBackends` peer.
    Service(ObjectKey),
    /// A namespace selector that looks at this label key (for namespace relabels: a
    /// selector's verdict can only flip when a key it mentions changes).
    NsDepKey(String),
}

fn index_keys(spec: &PolicySpec) -> Vec<IndexKey> {
    let mut keys = Vec::new();
    for (_, rule) in spec.rules() {
        for peer in &rule.peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    if let NamespaceMatch::Selector(s) = namespaces {
                        keys.extend(
                            s.requirements
                                .iter()
                                .map(|r| IndexKey::NsDepKey(r.key().to_owned())),
                        );
                    }
                    match (pods.required_pair(), namespaces) {
                        (Some((k, v)), _) => {
                            keys.push(IndexKey::PodPair(k.to_owned(), v.to_owned()))
                        }
                        (None, NamespaceMatch::Names(names)) => {
                            keys.extend(names.iter().map(|n| IndexKey::NsName(n.clone())));
                        }
                        (None, NamespaceMatch::Selector(s)) => keys.push(match s.required_pair() {
                            Some((k, v)) => IndexKey::NsPair(k.to_owned(), v.to_owned()),
                            None => IndexKey::Unindexed,
                        }),
                    }
                }
                Peer::Block(_) => keys.push(IndexKey::Blocks),
                Peer::ServiceBackends { namespace, name } => {
                    keys.push(IndexKey::Service((namespace.clone(), name.clone())));
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[derive(Debug)]
struct LocalEndpoint {
    id: EndpointId,
    uid: String,
    policy: PolicyId,
    cluster: Option<String>,
    role: Option<Role>,
    problems: Vec<Problem>,
}

#[derive(Debug, Default)]
struct Dirty {
    endpoints: BTreeSet<ObjectKey>,
    identities: BTreeSet<IdentityId>,
    services: BTreeSet<ObjectKey>,
    nets: Vec<IpNet>,
    /// Pods whose DNS-backend bit may have changed.
    rekey: BTreeSet<ObjectKey>,
    /// Identities to recompute in one policy only (namespace relabels).
    pairs: BTreeMap<PolicyId, BTreeSet<IdentityId>>,
}

/// The policy engine. Feed it objects; read [`Engine::tables`] or take diffs.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    node_addresses: HashSet<IpAddr>,
    next_identity: IdentityId,
    next_endpoint: EndpointId,
    next_policy: PolicyId,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<ObjectKey, PodState>,
    addr_pods: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    identity_keys: HashMap<IdentityKey, IdentityId>,
    pod_identities: HashMap<IdentityId, PodIdentity>,
    ids_by_ns: HashMap<String, BTreeSet<IdentityId>>,
    ids_by_label: HashMap<(String, String), BTreeSet<IdentityId>>,
    prefixes: BTreeMap<IpNet, (IdentityId, usize)>,
    prefix_by_id: HashMap<IdentityId, IpNet>,
    prefix_lens: BTreeMap<(bool, u8), usize>,
    clusters: HashMap<ObjectKey, ClusterState>,
    netpols: BTreeMap<String, BTreeMap<String, Arc<ParsedNetpol>>>,
    services: HashMap<ObjectKey, ServiceState>,
    cluster_ips: HashMap<IpAddr, ObjectKey>,
    slices: HashMap<ObjectKey, SliceState>,
    slices_by_service: HashMap<ObjectKey, BTreeSet<String>>,
    backend_ips: BTreeMap<IpAddr, BTreeMap<ObjectKey, usize>>,
    endpoints: HashMap<ObjectKey, LocalEndpoint>,
    endpoint_keys: BTreeMap<EndpointId, ObjectKey>,
    policy_ids: HashMap<Arc<PolicySpec>, PolicyId>,
    policies: BTreeMap<PolicyId, PolicyState>,
    out: Output,
    dirty: Dirty,
    index: HashMap<IndexKey, BTreeSet<PolicyId>>,
    /// Which policies hold rows for an identity.
    row_owners: HashMap<IdentityId, BTreeSet<PolicyId>>,
    /// Local pods by (namespace, `ray.io/cluster`).
    local_by_cluster: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Known namespaces by label.
    ns_by_label: HashMap<(String, String), BTreeSet<String>>,
    /// The DNS Service of `DnsMode::Service`.
    dns_service: Option<ObjectKey>,
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Rows a rule gives a peer identity in one direction.
fn push_rule_rows(
    out: &mut Vec<PolicyEntry>,
    policy: PolicyId,
    direction: Direction,
    peer: IdentityId,
    rule: &Rule,
    peer_ports: Option<&[NamedPort]>,
    local_ports: &[NamedPort],
) {
    let Some(ports) = &rule.ports else {
        out.push(PolicyEntry::any(policy, direction, peer));
        return;
    };
    for spec in ports {
        let (p, start, end) = match &spec.port {
            PortMatch::All => (spec.protocol, 0, u16::MAX),
            PortMatch::Range(a, b) => (spec.protocol, *a, *b),
            PortMatch::Named(name) => {
                // Ingress: the local pod receives; egress: the peer pod does.
                let candidates = match direction {
                    Direction::Ingress => Some(local_ports),
                    Direction::Egress => peer_ports,
                };
                for np in candidates.into_iter().flatten() {
                    if np.name == *name && np.protocol == spec.protocol {
                        out.extend(PolicyEntry::for_port_range(
                            policy,
                            direction,
                            peer,
                            np.protocol,
                            np.port,
                            np.port,
                        ));
                    }
                }
                continue;
            }
        };
        out.extend(PolicyEntry::for_port_range(
            policy, direction, peer, p, start, end,
        ));
    }
}

impl Engine {
    pub fn new(settings: Settings) -> Self {
        let mut engine = Self {
            node_addresses: settings.node_addresses.iter().copied().collect(),
            settings,
            next_identity: identity::FIRST_ALLOCATED,
            next_endpoint: 1,
            next_policy: 1,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            addr_pods: HashMap::new(),
            identity_keys: HashMap::new(),
            pod_identities: HashMap::new(),
            ids_by_ns: HashMap::new(),
            ids_by_label: HashMap::new(),
            prefixes: BTreeMap::new(),
            prefix_by_id: HashMap::new(),
            prefix_lens: BTreeMap::new(),
            clusters: HashMap::new(),
            netpols: BTreeMap::new(),
            services: HashMap::new(),
            cluster_ips: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            backend_ips: BTreeMap::new(),
            endpoints: HashMap::new(),
            endpoint_keys: BTreeMap::new(),
            policy_ids: HashMap::new(),
            policies: BTreeMap::new(),
            out: Output::default(),
            dirty: Dirty::default(),
            index: HashMap::new(),
            row_owners: HashMap::new(),
            local_by_cluster: HashMap::new(),
            ns_by_label: HashMap::new(),
            dns_service: None,
        };
        if let DnsMode::Service { namespace, name } = &engine.settings.dns {
            engine.dns_service = Some((namespace.clone(), name.clone()));
        }
        for addr in engine.node_addresses.clone() {
            engine.out.set_address(addr, Some(identity::HOST));
        }
        engine
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The desired datapath state.
    pub fn tables(&self) -> &Tables {
        &self.out.tables
    }

    /// What changed in [`Engine::tables`] since the last call (the first call: all).
    pub fn take_diff(&mut self) -> TablesDiff {
        self.out.take_diff()
    }

    /// Every current problem (invalid input and notices), sorted.
    pub fn problems(&self) -> Vec<Problem> {
        let mut all = BTreeSet::new();
        for state in self.clusters.values() {
            all.extend(state.parsed.iter().flat_map(|p| p.problems.iter().cloned()));
        }
        for np in self.netpols.values().flat_map(|m| m.values()) {
            all.extend(np.problems.iter().cloned());
        }
        for ep in self.endpoints.values() {
            all.extend(ep.problems.iter().cloned());
        }
        all.extend(self.egress_named_port_problems());
        all.into_iter().collect()
    }

    /// Named egress ports that the pods a rule selects do not have (with that
    /// protocol). Computed on demand: such rules are rare and the answer depends on
    /// every peer pod.
    fn egress_named_port_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for state in self.policies.values() {
            for rule in &state.spec.egress {
                if rule.named_ports().next().is_none() || !seen.insert(Arc::as_ptr(rule)) {
                    continue;
                }
                let selected: Vec<&PodIdentity> = self
                    .pod_identities
                    .values()
                    .filter(|i| rule.peers.iter().any(|p| self.peer_matches_pod(p, i)))
                    .collect();
                if selected.is_empty() {
                    continue;
                }
                for (spec, name) in rule.named_ports() {
                    let resolves = selected.iter().any(|i| {
                        i.key
                            .named_ports
                            .iter()
                            .any(|p| p.name == name && p.protocol == spec.protocol)
                    });
                    if !resolves {
                        out.push(Problem {
                            object: (*rule.object).clone(),
                            field: format!("{}.ports", rule.field),
                            value: name.to_owned(),
                            message: "named port resolves to no container port of the selected pods for this protocol; it allows nothing".into(),
                            severity: Severity::Warning,
                        });
                    }
                }
            }
        }
        out
    }

    /// Replaces the node's own addresses (identity `HOST`), e.g. after a node IP change.
    pub fn set_node_addresses(&mut self, addresses: Vec<IpAddr>) {
        let old: Vec<IpAddr> = self.node_addresses.drain().collect();
        self.node_addresses.extend(addresses.iter().copied());
        self.settings.node_addresses = addresses.clone();
        for ip in old.iter().chain(&addresses) {
            self.refresh_address(*ip);
        }
        // A backend on a node address counts as allowed: Services may change.
        self.dirty.services.extend(self.services.keys().cloned());
        self.flush();
    }

    /// Sizes of what the engine holds, for metrics.
    pub fn stats(&self) -> Stats {
        Stats {
            endpoints: self.endpoints.len(),
            policies: self.policies.len(),
            pod_identities: self.pod_identities.len(),
            prefixes: self.prefixes.len(),
            services: self.services.len(),
            addresses: self.out.tables.addresses.len(),
            cidrs: self.out.tables.cidrs.len(),
            policy_rows: self.out.tables.policy.len(),
        }
    }

    /// The keys of every object of `kind` the engine holds, so a relist can remove
    /// what it did not see.
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = match kind {
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::RayCluster => self.clusters.keys().cloned().collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::NetworkPolicy => self
                .netpols
                .iter()
                .flat_map(|(ns, m)| m.keys().map(move |n| (ns.clone(), n.clone())))
                .collect(),
        };
        keys.sort();
        keys
    }

    /// The problems about one object.
    pub fn problems_for(&self, object: &ObjectRef) -> Vec<Problem> {
        self.problems()
            .into_iter()
            .filter(|p| &p.object == object)
            .collect()
    }

    /// The endpoint id of a local pod.
    pub fn endpoint_id(&self, namespace: &str, pod: &str) -> Option<EndpointId> {
        self.endpoints
            .get(&(namespace.to_owned(), pod.to_owned()))
            .map(|e| e.id)
    }

    /// Metadata of a local pod.
    pub fn endpoint_meta(&self, id: EndpointId) -> Option<EndpointMeta> {
        let key = self.endpoint_keys.get(&id)?;
        let ep = self.endpoints.get(key)?;
        Some(EndpointMeta {
            id,
            namespace: key.0.clone(),
            pod: key.1.clone(),
            uid: ep.uid.clone(),
            cluster: ep.cluster.clone(),
            role: ep.role.clone(),
            policy: *self.out.tables.endpoints.get(&id)?,
        })
    }

    /// Every local pod's metadata, by endpoint id.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointMeta> + '_ {
        self.endpoint_keys
            .keys()
            .filter_map(|id| self.endpoint_meta(*id))
    }

    // ---- namespaces ----

    fn ns_labels(&self, namespace: &str) -> Labels {
        self.namespaces.get(namespace).cloned().unwrap_or_else(|| {
            // Unknown namespace: the API server's automatic label is still known.
            [(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())].into()
        })
    }

    pub fn upsert_namespace(&mut self, ns: &Namespace) {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.clone());
        if self.namespaces.get(&name) == Some(&labels) {
            return;
        }
        let old = self.ns_labels(&name);
        self.set_namespace(&name, Some(labels));
        self.namespace_changed(&name, &old);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.contains_key(name) {
            let old = self.ns_labels(name);
            self.set_namespace(name, None);
            self.namespace_changed(name, &old);
        }
    }

    fn set_namespace(&mut self, name: &str, labels: Option<Labels>) {
        if let Some(old) = self.namespaces.remove(name) {
            for pair in old {
                if let Some(set) = self.ns_by_label.get_mut(&pair) {
                    set.remove(name);
                    if set.is_empty() {
                        self.ns_by_label.remove(&pair);
                    }
                }
            }
        }
        if let Some(labels) = labels {
            for pair in &labels {
                self.ns_by_label
                    .entry((pair.0.clone(), pair.1.clone()))
                    .or_default()
                    .insert(name.to_owned());
            }
            self.namespaces.insert(name.to_owned(), labels);
        }
    }

    /// Only policies with a namespace selector whose verdict flips for this namespace
    /// recompute, and only for the identities in it.
    fn namespace_changed(&mut self, name: &str, old: &Labels) {
        let new = self.ns_labels(name);
        let Some(ids) = self.ids_by_ns.get(name).cloned() else {
            self.flush();
            return;
        };
        let mut candidates: BTreeSet<PolicyId> = BTreeSet::new();
        let changed = old
            .keys()
            .chain(new.keys())
            .filter(|k| old.get(*k) != new.get(*k));
        for key in changed {
            if let Some(set) = self.index.get(&IndexKey::NsDepKey(key.clone())) {
                candidates.extend(set);
            }
        }
        for policy in candidates {
            let Some(state) = self.policies.get(&policy) else {
                continue;
            };
            let mut affected: BTreeSet<IdentityId> = BTreeSet::new();
            for peer in state.spec.rules().flat_map(|(_, r)| r.peers.iter()) {
                let Peer::Pods {
                    namespaces: NamespaceMatch::Selector(s),
                    pods,
                } = peer
                else {
                    continue;
                };
                if s.matches(old) == s.matches(&new) {
                    continue;
                }
                // Only identities the peer's pod selector can match are affected.
                match pods.required_pair() {
                    Some((k, v)) => {
                        let with_label = self.ids_by_label.get(&(k.to_owned(), v.to_owned()));
                        affected.extend(
                            with_label
                                .into_iter()
                                .flatten()
                                .filter(|id| ids.contains(id)),
                        );
                    }
                    None => affected.extend(ids.iter().copied()),
                }
            }
            if !affected.is_empty() {
                self.dirty.pairs.entry(policy).or_default().extend(affected);
            }
        }
        self.flush();
    }

    // ---- pods ----

    pub fn upsert_pod(&mut self, pod: &Pod) {
        let key = key_of(&pod.metadata);
        let uid = pod
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", key.0, key.1));
        if self.pods.get(&key).is_some_and(|old| old.uid != uid) {
            // Same name, new pod: a new endpoint.
            self.remove_pod_state(&key);
            self.flush();
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let terminal = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let host_network = spec.host_network == Some(true);
        // Host-network pods are the node (HOST), terminal pods no longer hold an IP.
        let selectable = !terminal && !host_network;
        let local =
            selectable && spec.node_name.as_deref() == Some(self.settings.node_name.as_str());
        let labels: Labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = Vec::new();
        if selectable {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.clone());
            for ip in status.pod_ip.iter().cloned().chain(listed) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    ips.push(ip);
                }
            }
        }
        ips.sort();
        ips.dedup();
        let mut named: Vec<NamedPort> = Vec::new();
        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let (Some(name), Some(protocol), Ok(number)) = (
                &port.name,
                parse_protocol(port.protocol.as_deref()),
                u16::try_from(port.container_port),
            ) else {
                continue;
            };
            named.push(NamedPort {
                name: name.clone(),
                protocol,
                port: number,
            });
        }
        named.sort();
        named.dedup();
        let named_ports = Arc::new(named);
        let dns_backend = self.is_dns_backend(&ips);
        let new_identity = selectable.then(|| {
            self.join_identity(
                IdentityKey {
                    namespace: key.0.clone(),
                    labels: labels.clone(),
                    named_ports: named_ports.clone(),
                    dns_backend,
                },
                &key,
            )
        });
        let old = self.pods.insert(
            key.clone(),
            PodState {
                uid,
                labels,
                ips: ips.clone(),
                local,
                named_ports,
                identity: new_identity,
            },
        );
        let (old_ips, old_identity, was_local) = match old {
            Some(old) => {
                self.unindex_local(&key, &old);
                (old.ips, old.identity, old.local)
            }
            None => (Vec::new(), None, false),
        };
        if local
            && let Some(cluster) = self
                .pods
                .get(&key)
                .and_then(|p| p.labels.get(LABEL_CLUSTER))
        {
            self.local_by_cluster
                .entry((key.0.clone(), cluster.clone()))
                .or_default()
                .insert(key.clone());
        }
        if old_identity != new_identity
            && let Some(id) = old_identity
        {
            self.leave_identity(id, &key);
        }
        self.ips_changed(
            &key,
            &old_ips,
            &ips,
            old_identity != new_identity,
            [old_identity, new_identity],
        );
        if local || was_local {
            self.dirty.endpoints.insert(key);
        }
        self.flush();
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.remove_pod_state(&key);
        self.flush();
    }

    fn remove_pod_state(&mut self, key: &ObjectKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        self.unindex_local(key, &old);
        if let Some(id) = old.identity {
            self.leave_identity(id, key);
        }
        self.ips_changed(key, &old.ips, &[], true, [old.identity, None]);
        self.dirty.endpoints.insert(key.clone());
    }

    fn unindex_local(&mut self, key: &ObjectKey, old: &PodState) {
        if let Some(cluster) = old.labels.get(LABEL_CLUSTER).filter(|_| old.local) {
            let group = (key.0.clone(), cluster.clone());
            if let Some(set) = self.local_by_cluster.get_mut(&group) {
                set.remove(key);
                if set.is_empty() {
                    self.local_by_cluster.remove(&group);
                }
            }
        }
    }

    fn ips_changed(
        &mut self,
        key: &ObjectKey,
        old: &[IpAddr],
        new: &[IpAddr],
        identity_changed: bool,
        identities: [Option<IdentityId>; 2],
    ) {
        for ip in old {
            if !new.contains(ip)
                && let Some(set) = self.addr_pods.get_mut(ip)
            {
                set.remove(key);
                if set.is_empty() {
                    self.addr_pods.remove(ip);
                }
            }
        }
        for ip in new {
            self.addr_pods.entry(*ip).or_default().insert(key.clone());
        }
        let changed = identity_changed || old != new;
        for ip in old.iter().chain(new) {
            self.refresh_address(*ip);
            if changed && let Some(services) = self.backend_ips.get(ip) {
                // Backend of a Service: its rows, and ServiceBackends peers, may change.
                self.dirty.services.extend(services.keys().cloned());
                self.dirty
                    .identities
                    .extend(identities.into_iter().flatten());
            }
        }
    }

    fn join_identity(&mut self, key: IdentityKey, member: &ObjectKey) -> IdentityId {
        let id = match self.identity_keys.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.next_identity;
                self.next_identity += 1;
                self.ids_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(id);
                for (k, v) in &key.labels {
                    self.ids_by_label
                        .entry((k.clone(), v.clone()))
                        .or_default()
                        .insert(id);
                }
                self.identity_keys.insert(key.clone(), id);
                self.pod_identities.insert(
                    id,
                    PodIdentity {
                        key,
                        members: BTreeSet::new(),
                    },
                );
                self.dirty.identities.insert(id);
                id
            }
        };
        if let Some(identity) = self.pod_identities.get_mut(&id) {
            identity.members.insert(member.clone());
        }
        id
    }

    fn leave_identity(&mut self, id: IdentityId, member: &ObjectKey) {
        let Some(identity) = self.pod_identities.get_mut(&id) else {
            return;
        };
        identity.members.remove(member);
        if !identity.members.is_empty() {
            return;
        }
        let Some(identity) = self.pod_identities.remove(&id) else {
            return;
        };
        self.identity_keys.remove(&identity.key);
        if let Some(set) = self.ids_by_ns.get_mut(&identity.key.namespace) {
            set.remove(&id);
            if set.is_empty() {
                self.ids_by_ns.remove(&identity.key.namespace);
            }
        }
        for (k, v) in &identity.key.labels {
            let label = (k.clone(), v.clone());
            if let Some(set) = self.ids_by_label.get_mut(&label) {
                set.remove(&id);
                if set.is_empty() {
                    self.ids_by_label.remove(&label);
                }
            }
        }
        self.dirty.identities.remove(&id);
        self.purge_identity(id);
    }

    fn purge_identity(&mut self, id: IdentityId) {
        for policy in self.row_owners.remove(&id).into_iter().flatten() {
            if let Some(rows) = self
                .policies
                .get_mut(&policy)
                .and_then(|p| p.rows.remove(&id))
            {
                for row in rows {
                    self.out.remove_row(row);
                }
            }
        }
    }

    fn address_identity(&self, ip: IpAddr) -> Option<IdentityId> {
        if self.node_addresses.contains(&ip) {
            return Some(identity::HOST);
        }
        if let Some(svc) = self.cluster_ips.get(&ip) {
            return self.services.get(svc).map(|s| s.identity);
        }
        self.addr_pods
            .get(&ip)?
            .iter()
            .find_map(|key| self.pods.get(key)?.identity)
    }

    fn refresh_address(&mut self, ip: IpAddr) {
        let value = self.address_identity(ip);
        self.out.set_address(ip, value);
    }

    fn refresh_cidr(&mut self, net: IpNet) {
        let service = (net.prefix_len() == net.max_prefix_len())
            .then(|| self.cluster_ips.get(&net.addr()))
            .flatten()
            .and_then(|svc| self.services.get(svc))
            .map(|s| s.identity);
        let value = service.or_else(|| self.prefixes.get(&net).map(|(id, _)| *id));
        self.out.set_cidr(net, value);
    }

    // ---- RayClusters ----

    pub fn upsert_raycluster(&mut self, cluster: &RayCluster) {
        let key = key_of(&cluster.metadata);
        let parsed = raycluster::parse(cluster);
        let state = self.clusters.entry(key.clone()).or_default();
        let effective = match &parsed.declared {
            Declared::Nothing => {
                state.last_good = None;
                None
            }
            Declared::Valid(policy) => {
                state.last_good = Some(policy.clone());
                Some(policy.clone())
            }
            Declared::Invalid(source) => Some(
                state
                    .last_good
                    .clone()
                    .unwrap_or_else(|| UserPolicy::deny_all(*source)),
            ),
        };
        let compiled = effective.map(|p| raycluster::compile(&parsed, &p, &self.settings));
        state.parsed = Some(parsed);
        if state.compiled != compiled {
            state.compiled = compiled;
            self.cluster_changed(&key);
        }
        self.flush();
    }

    pub fn remove_raycluster(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.clusters.remove(&key).is_some() {
            self.cluster_changed(&key);
        }
        self.flush();
    }

    fn cluster_changed(&mut self, key: &ObjectKey) {
        if let Some(members) = self.local_by_cluster.get(key) {
            self.dirty.endpoints.extend(members.iter().cloned());
        }
    }

    // ---- NetworkPolicies ----

    pub fn upsert_network_policy(&mut self, policy: &NetworkPolicy) {
        let (namespace, name) = key_of(&policy.metadata);
        let parsed = Arc::new(netpol::parse(policy));
        self.netpols
            .entry(namespace.clone())
            .or_default()
            .insert(name, parsed);
        self.netpols_changed(&namespace);
    }

    pub fn remove_network_policy(&mut self, namespace: &str, name: &str) {
        if let Some(map) = self.netpols.get_mut(namespace) {
            map.remove(name);
            if map.is_empty() {
                self.netpols.remove(namespace);
            }
        }
        self.netpols_changed(namespace);
    }

    fn netpols_changed(&mut self, namespace: &str) {
        if self.settings.enforce_networkpolicies {
            let members: Vec<ObjectKey> = self
                .endpoints
                .keys()
                .filter(|k| k.0 == namespace)
                .cloned()
                .collect();
            self.dirty.endpoints.extend(members);
        }
        self.flush();
    }

    // ---- Services and EndpointSlices ----

    pub fn upsert_service(&mut self, service: &Service) {
        let key = key_of(&service.metadata);
        let spec = service.spec.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        let mut ports: Vec<ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: parse_protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        ports.sort();
        let (identity, old_ips) = match self.services.remove(&key) {
            Some(old) => (old.identity, old.cluster_ips),
            None => {
                let id = self.next_identity;
                self.next_identity += 1;
                (id, Vec::new())
            }
        };
        for ip in &old_ips {
            self.cluster_ips.remove(ip);
        }
        for ip in &ips {
            self.cluster_ips.insert(*ip, key.clone());
        }
        self.services.insert(
            key.clone(),
            ServiceState {
                identity,
                cluster_ips: ips.clone(),
                ports,
            },
        );
        for ip in old_ips.iter().chain(&ips) {
            self.refresh_address(*ip);
            self.refresh_cidr(host_net(*ip));
        }
        self.dirty.services.insert(key);
        self.flush();
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.services.remove(&key) {
            for ip in &old.cluster_ips {
                self.cluster_ips.remove(ip);
                self.refresh_address(*ip);
                self.refresh_cidr(host_net(*ip));
            }
            self.purge_identity(old.identity);
        }
        self.flush();
    }

    pub fn upsert_endpoint_slice(&mut self, slice: &EndpointSlice) {
        let key = key_of(&slice.metadata);
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|s| (key.0.clone(), s.clone()));
        let mut ports: Vec<ServicePort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: parse_protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port?).ok()?,
                })
            })
            .collect();
        ports.sort();
        // What kube-proxy routes to: endpoints not marked unready.
        let mut addresses: Vec<IpAddr> = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        self.remove_slice_state(&key);
        if let Some(service) = service {
            for ip in &addresses {
                *self
                    .backend_ips
                    .entry(*ip)
                    .or_default()
                    .entry(service.clone())
                    .or_default() += 1;
            }
            self.backends_moved(&addresses);
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(key.1.clone());
            self.dirty.services.insert(service.clone());
            self.slices.insert(
                key,
                SliceState {
                    service,
                    ports,
                    addresses,
                },
            );
        }
        self.flush();
    }

    pub fn remove_endpoint_slice(&mut self, namespace: &str, name: &str) {
        self.remove_slice_state(&(namespace.to_owned(), name.to_owned()));
        self.flush();
    }

    fn remove_slice_state(&mut self, key: &ObjectKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        for ip in &old.addresses {
            if let Some(map) = self.backend_ips.get_mut(ip) {
                if let Some(n) = map.get_mut(&old.service) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&old.service);
                    }
                }
                if map.is_empty() {
                    self.backend_ips.remove(ip);
                }
            }
        }
        if let Some(set) = self.slices_by_service.get_mut(&old.service) {
            set.remove(&key.1);
        }
        self.backends_moved(&old.addresses);
        self.dirty.services.insert(old.service);
    }

    /// Pods at these addresses gained or lost a Service: `ServiceBackends` peers change.
    fn backends_moved(&mut self, addresses: &[IpAddr]) {
        for ip in addresses {
            for key in self.addr_pods.get(ip).into_iter().flatten() {
                if let Some(id) = self.pods.get(key).and_then(|p| p.identity) {
                    self.dirty.identities.insert(id);
                    self.dirty.rekey.insert(key.clone());
                }
            }
        }
    }

    fn is_dns_backend(&self, ips: &[IpAddr]) -> bool {
        self.dns_service.as_ref().is_some_and(|svc| {
            ips.iter().any(|ip| {
                self.backend_ips
                    .get(ip)
                    .is_some_and(|m| m.contains_key(svc))
            })
        })
    }

    /// Moves a pod to the identity its DNS-backend bit now calls for.
    fn rekey_pod(&mut self, key: &ObjectKey) {
        let Some(pod) = self.pods.get(key) else {
            return;
        };
        let Some(old) = pod.identity else {
            return;
        };
        let dns_backend = self.is_dns_backend(&pod.ips);
        if self
            .pod_identities
            .get(&old)
            .is_some_and(|i| i.key.dns_backend == dns_backend)
        {
            return;
        }
        let new_key = IdentityKey {
            namespace: key.0.clone(),
            labels: pod.labels.clone(),
            named_ports: pod.named_ports.clone(),
            dns_backend,
        };
        let ips = pod.ips.clone();
        let new = self.join_identity(new_key, key);
        if let Some(pod) = self.pods.get_mut(key) {
            pod.identity = Some(new);
        }
        self.leave_identity(old, key);
        for ip in ips {
            self.refresh_address(ip);
            if let Some(services) = self.backend_ips.get(&ip) {
                self.dirty.services.extend(services.keys().cloned());
            }
        }
    }

    // ---- local policies ----

    fn spec_for(
        &self,
        key: &ObjectKey,
        pod: &PodState,
    ) -> (PolicySpec, Option<String>, Option<Role>, Vec<Problem>) {
        let labels = &pod.labels;
        let mut ingress: Vec<Arc<Rule>> = Vec::new();
        let mut egress: Vec<Arc<Rule>> = Vec::new();
        let (mut isolate_ingress, mut isolate_egress) = (false, false);
        let cluster = labels.get(LABEL_CLUSTER).cloned();
        let role =
            cluster
                .as_ref()
                .and_then(|_| match labels.get(LABEL_NODE_TYPE).map(String::as_str) {
                    Some("head") => Some(Role::Head),
                    Some("worker") => Some(match labels.get(LABEL_GROUP) {
                        Some(group) => Role::Group(group.clone()),
                        None => Role::Worker,
                    }),
                    _ => None,
                });
        if let (Some(cluster), Some(role)) = (&cluster, &role)
            && let Some(compiled) = self
                .clusters
                .get(&(key.0.clone(), cluster.clone()))
                .and_then(|c| c.compiled.as_ref())
        {
            isolate_ingress |= compiled.mode.isolates(Direction::Ingress);
            isolate_egress |= compiled.mode.isolates(Direction::Egress);
            let rules = compiled.role(role);
            ingress.extend(rules.ingress.iter().cloned());
            egress.extend(rules.egress.iter().cloned());
        }
        if self.settings.enforce_networkpolicies {
            for np in self
                .netpols
                .get(&key.0)
                .into_iter()
                .flat_map(|m| m.values())
            {
                if !np.selector.as_ref().is_some_and(|s| s.matches(labels)) {
                    continue;
                }
                if np.isolate_ingress {
                    isolate_ingress = true;
                    ingress.extend(np.ingress.iter().cloned());
                }
                if np.isolate_egress {
                    isolate_egress = true;
                    egress.extend(np.egress.iter().cloned());
                }
            }
        }
        let mut problems = Vec::new();
        let mut uses_named = false;
        for rule in &ingress {
            for (spec, name) in rule.named_ports() {
                uses_named = true;
                if !pod
                    .named_ports
                    .iter()
                    .any(|p| p.name == name && p.protocol == spec.protocol)
                {
                    problems.push(Problem {
                        object: (*rule.object).clone(),
                        field: format!("{}.ports", rule.field),
                        value: name.to_owned(),
                        message: format!(
                            "named port resolves to no container port of pod {}/{} for this protocol; it allows nothing there",
                            key.0, key.1
                        ),
                        severity: Severity::Warning,
                    });
                }
            }
        }
        let spec = PolicySpec {
            isolate_ingress,
            isolate_egress,
            ingress,
            egress,
            local_ports: if uses_named {
                pod.named_ports.clone()
            } else {
                Arc::default()
            },
        };
        (spec, cluster, role, problems)
    }

    fn refresh_endpoint(&mut self, key: &ObjectKey, new_policies: &mut BTreeSet<PolicyId>) {
        let Some(pod) = self.pods.get(key).filter(|p| p.local) else {
            if let Some(ep) = self.endpoints.remove(key) {
                self.endpoint_keys.remove(&ep.id);
                self.out.set_endpoint(ep.id, None);
                self.release_policy(ep.policy);
            }
            return;
        };
        let uid = pod.uid.clone();
        let (spec, cluster, role, problems) = self.spec_for(key, pod);
        let value = |policy_id| EndpointPolicy {
            policy_id,
            isolate_ingress: spec.isolate_ingress,
            isolate_egress: spec.isolate_egress,
            audit: self.settings.audit,
        };
        let endpoint_policy = value(0);
        let policy = self.intern_policy(spec, new_policies);
        let id = match self.endpoints.get_mut(key) {
            Some(ep) => {
                let old = std::mem::replace(&mut ep.policy, policy);
                ep.cluster = cluster;
                ep.role = role;
                ep.problems = problems;
                let id = ep.id;
                self.release_policy(old);
                id
            }
            None => {
                let id = self.next_endpoint;
                self.next_endpoint += 1;
                self.endpoints.insert(
                    key.clone(),
                    LocalEndpoint {
                        id,
                        uid,
                        policy,
                        cluster,
                        role,
                        problems,
                    },
                );
                self.endpoint_keys.insert(id, key.clone());
                id
            }
        };
        self.out.set_endpoint(
            id,
            Some(EndpointPolicy {
                policy_id: policy,
                ..endpoint_policy
            }),
        );
    }

    fn intern_policy(
        &mut self,
        spec: PolicySpec,
        new_policies: &mut BTreeSet<PolicyId>,
    ) -> PolicyId {
        if let Some(id) = self.policy_ids.get(&spec) {
            if let Some(state) = self.policies.get_mut(id) {
                state.refs += 1;
            }
            return *id;
        }
        let id = self.next_policy;
        self.next_policy += 1;
        let mut prefixes: Vec<IpNet> = spec
            .rules()
            .flat_map(|(_, r)| r.peers.iter())
            .filter_map(|p| match p {
                Peer::Block(b) => Some(b.prefixes()),
                _ => None,
            })
            .flatten()
            .collect();
        prefixes.sort();
        prefixes.dedup();
        for net in &prefixes {
            self.add_prefix(*net);
        }
        let keys = index_keys(&spec);
        for key in &keys {
            self.index.entry(key.clone()).or_default().insert(id);
        }
        let spec = Arc::new(spec);
        self.policy_ids.insert(spec.clone(), id);
        self.policies.insert(
            id,
            PolicyState {
                spec,
                refs: 1,
                rows: HashMap::new(),
                prefixes,
                keys,
            },
        );
        new_policies.insert(id);
        id
    }

    fn release_policy(&mut self, id: PolicyId) {
        let Some(state) = self.policies.get_mut(&id) else {
            return;
        };
        state.refs -= 1;
        if state.refs > 0 {
            return;
        }
        let Some(state) = self.policies.remove(&id) else {
            return;
        };
        self.policy_ids.remove(&state.spec);
        for key in state.keys {
            if let Some(set) = self.index.get_mut(&key) {
                set.remove(&id);
                if set.is_empty() {
                    self.index.remove(&key);
                }
            }
        }
        for (peer, rows) in state.rows {
            if let Some(set) = self.row_owners.get_mut(&peer) {
                set.remove(&id);
                if set.is_empty() {
                    self.row_owners.remove(&peer);
                }
            }
            for row in rows {
                self.out.remove_row(row);
            }
        }
        for net in state.prefixes {
            self.remove_prefix(net);
        }
    }

    fn add_prefix(&mut self, net: IpNet) {
        if let Some((_, refs)) = self.prefixes.get_mut(&net) {
            *refs += 1;
            return;
        }
        let id = self.next_identity;
        self.next_identity += 1;
        self.prefixes.insert(net, (id, 1));
        self.prefix_by_id.insert(id, net);
        *self
            .prefix_lens
            .entry((net.addr().is_ipv6(), net.prefix_len()))
            .or_default() += 1;
        self.refresh_cidr(net);
        self.dirty.identities.insert(id);
        self.dirty.nets.push(net);
    }

    fn remove_prefix(&mut self, net: IpNet) {
        let Some((id, refs)) = self.prefixes.get_mut(&net) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let id = *id;
        self.prefixes.remove(&net);
        self.prefix_by_id.remove(&id);
        let len = (net.addr().is_ipv6(), net.prefix_len());
        if let Some(n) = self.prefix_lens.get_mut(&len) {
            *n -= 1;
            if *n == 0 {
                self.prefix_lens.remove(&len);
            }
        }
        self.refresh_cidr(net);
        self.dirty.identities.remove(&id);
        self.purge_identity(id);
        self.dirty.nets.push(net);
    }

    /// The CIDR identity the datapath's longest match gives `ip` (ClusterIPs aside).
    fn longest_prefix(&self, ip: IpAddr) -> Option<IdentityId> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let v6 = ip.is_ipv6();
        self.prefix_lens
            .keys()
            .rev()
            .filter(|(is_v6, _)| *is_v6 == v6)
            .find_map(|(_, len)| {
                let net = IpNet::new(ip, *len).ok()?.trunc();
                self.prefixes.get(&net).map(|(id, _)| *id)
            })
    }

    // ---- rows ----

    fn peer_matches_pod(&self, peer: &Peer, identity: &PodIdentity) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let ns = &identity.key.namespace;
                let ns_ok = match namespaces {
                    NamespaceMatch::Names(names) => names.contains(ns),
                    NamespaceMatch::Selector(s) => {
                        s.is_everything() || s.matches(&self.ns_labels(ns))
                    }
                };
                ns_ok && pods.matches(&identity.key.labels)
            }
            Peer::Block(_) => false,
            Peer::ServiceBackends { namespace, name } => {
                let service = (namespace.clone(), name.clone());
                if self.dns_service.as_ref() == Some(&service) {
                    return identity.key.dns_backend;
                }
                identity.members.iter().any(|m| {
                    self.pods.get(m).is_some_and(|p| {
                        p.ips.iter().any(|ip| {
                            self.backend_ips
                                .get(ip)
                                .is_some_and(|s| s.contains_key(&service))
                        })
                    })
                })
            }
        }
    }

    fn compute_rows(&self, policy: PolicyId, peer: IdentityId) -> Vec<PolicyEntry> {
        let mut out = Vec::new();
        let Some(state) = self.policies.get(&policy) else {
            return out;
        };
        let spec = &state.spec;
        if let Some(identity) = self.pod_identities.get(&peer) {
            for (direction, rule) in spec.rules() {
                if rule
                    .peers
                    .iter()
                    .any(|p| self.peer_matches_pod(p, identity))
                {
                    push_rule_rows(
                        &mut out,
                        policy,
                        direction,
                        peer,
                        rule,
                        Some(&identity.key.named_ports),
                        &spec.local_ports,
                    );
                }
            }
        } else if let Some(net) = self.prefix_by_id.get(&peer) {
            for (direction, rule) in spec.rules() {
                if rule
                    .peers
                    .iter()
                    .any(|p| matches!(p, Peer::Block(b) if b.covers(net)))
                {
                    push_rule_rows(
                        &mut out,
                        policy,
                        direction,
                        peer,
                        rule,
                        None,
                        &spec.local_ports,
                    );
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn replace_rows(&mut self, policy: PolicyId, peer: IdentityId, rows: Vec<PolicyEntry>) -> bool {
        let Some(state) = self.policies.get_mut(&policy) else {
            return false;
        };
        let old = if rows.is_empty() {
            state.rows.remove(&peer).unwrap_or_default()
        } else {
            state.rows.insert(peer, rows.clone()).unwrap_or_default()
        };
        if old == rows {
            return false;
        }
        if rows.is_empty() {
            if let Some(set) = self.row_owners.get_mut(&peer) {
                set.remove(&policy);
                if set.is_empty() {
                    self.row_owners.remove(&peer);
                }
            }
        } else if old.is_empty() {
            self.row_owners.entry(peer).or_default().insert(policy);
        }
        for row in &old {
            if rows.binary_search(row).is_err() {
                self.out.remove_row(*row);
            }
        }
        for row in &rows {
            if old.binary_search(row).is_err() {
                self.out.add_row(*row);
            }
        }
        true
    }

    /// Identities a new policy may have rows for.
    fn candidates(&self, policy: PolicyId) -> BTreeSet<IdentityId> {
        let mut ids = BTreeSet::new();
        let Some(state) = self.policies.get(&policy) else {
            return ids;
        };
        for (_, rule) in state.spec.rules() {
            for peer in &rule.peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        let by_label = pods
                            .required_pair()
                            .map(|(k, v)| self.ids_by_label.get(&(k.to_owned(), v.to_owned())));
                        match (namespaces, by_label) {
                            (_, Some(found)) => ids.extend(found.into_iter().flatten()),
                            (NamespaceMatch::Names(names), None) => {
                                for n in names {
                                    ids.extend(self.ids_by_ns.get(n).into_iter().flatten());
                                }
                            }
                            (NamespaceMatch::Selector(s), None) => match s.required_pair() {
                                Some((k, v)) => {
                                    let mut names: BTreeSet<&str> = self
                                        .ns_by_label
                                        .get(&(k.to_owned(), v.to_owned()))
                                        .into_iter()
                                        .flatten()
                                        .map(String::as_str)
                                        .collect();
                                    if k == NAMESPACE_NAME_LABEL {
                                        names.insert(v);
                                    }
                                    for n in names {
                                        ids.extend(self.ids_by_ns.get(n).into_iter().flatten());
                                    }
                                }
                                None => ids.extend(self.pod_identities.keys()),
                            },
                        }
                    }
                    Peer::Block(b) => {
                        ids.extend(
                            self.prefixes
                                .iter()
                                .filter(|(net, _)| b.cidr.contains(*net))
                                .map(|(_, (id, _))| *id),
                        );
                    }
                    Peer::ServiceBackends { namespace, name } => {
                        let service = (namespace.clone(), name.clone());
                        for slice in self.slices_by_service.get(&service).into_iter().flatten() {
                            let Some(slice) = self.slices.get(&(namespace.clone(), slice.clone()))
                            else {
                                continue;
                            };
                            for ip in &slice.addresses {
                                for key in self.addr_pods.get(ip).into_iter().flatten() {
                                    ids.extend(self.pods.get(key).and_then(|p| p.identity));
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// `(backend address, protocol, target port)` of one service port.
    fn backends(&self, service: &ObjectKey, port: &ServicePort) -> Vec<(IpAddr, u8, u16)> {
        let mut out = Vec::new();
        for slice in self.slices_by_service.get(service).into_iter().flatten() {
            let Some(slice) = self.slices.get(&(service.0.clone(), slice.clone())) else {
                continue;
            };
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            out.extend(
                slice
                    .addresses
                    .iter()
                    .map(|ip| (*ip, target.protocol, target.port)),
            );
        }
        out
    }

    /// Whether `policy`'s current rows let its pods open `protocol`/`port` to `ip`.
    fn egress_allows(&self, policy: &PolicyState, ip: IpAddr, protocol: u8, port: u16) -> bool {
        if self.node_addresses.contains(&ip) {
            return true;
        }
        let exact = self.out.tables.addresses.get(&ip).copied();
        let cidr = self.longest_prefix(ip);
        [exact, cidr].into_iter().flatten().any(|id| {
            policy.rows.get(&id).is_some_and(|rows| {
                rows.iter()
                    .any(|r| r.direction == Direction::Egress && r.matches(protocol, port))
            })
        })
    }

    /// Rows for a Service identity: a service port is allowed iff every backend it can
    /// land on is allowed (fail-closed when backends disagree).
    fn refresh_service_rows(&mut self, policy: PolicyId, service: &ObjectKey) {
        let Some(svc) = self.services.get(service) else {
            return;
        };
        let sid = svc.identity;
        let mut rows = Vec::new();
        if let Some(state) = self.policies.get(&policy)
            && state.spec.isolate_egress
        {
            for port in &svc.ports {
                let backends = self.backends(service, port);
                if !backends.is_empty()
                    && backends
                        .iter()
                        .all(|(ip, proto, target)| self.egress_allows(state, *ip, *proto, *target))
                {
                    rows.extend(PolicyEntry::for_port_range(
                        policy,
                        Direction::Egress,
                        sid,
                        port.protocol,
                        port.port,
                        port.port,
                    ));
                }
            }
        }
        rows.sort();
        rows.dedup();
        self.replace_rows(policy, sid, rows);
    }

    fn services_behind(&self, id: IdentityId, out: &mut BTreeSet<ObjectKey>) {
        if let Some(identity) = self.pod_identities.get(&id) {
            for key in &identity.members {
                for ip in self.pods.get(key).into_iter().flat_map(|p| p.ips.iter()) {
                    out.extend(
                        self.backend_ips
                            .get(ip)
                            .into_iter()
                            .flat_map(|s| s.keys().cloned()),
                    );
                }
            }
        } else if let Some(net) = self.prefix_by_id.get(&id) {
            self.services_in(*net, out);
        }
    }

    fn services_in(&self, net: IpNet, out: &mut BTreeSet<ObjectKey>) {
        for (ip, services) in self.backend_ips.range(net.network()..=net.broadcast()) {
            if net.contains(ip) {
                out.extend(services.keys().cloned());
            }
        }
        if let IpNet::V4(v4) = net {
            // IPv4-mapped IPv6 backends match IPv4 prefixes too.
            let lo = IpAddr::V6(v4.network().to_ipv6_mapped());
            let hi = IpAddr::V6(v4.broadcast().to_ipv6_mapped());
            for (_, services) in self.backend_ips.range(lo..=hi) {
                out.extend(services.keys().cloned());
            }
        }
    }

    /// Policies whose rows for `id` may change when it appears, changes or goes.
    fn policies_for_identity(&self, id: IdentityId, out: &mut BTreeSet<PolicyId>) {
        out.extend(self.row_owners.get(&id).into_iter().flatten());
        let mut add = |key: IndexKey| out.extend(self.index.get(&key).into_iter().flatten());
        if let Some(identity) = self.pod_identities.get(&id) {
            let ns = &identity.key.namespace;
            for (k, v) in &identity.key.labels {
                add(IndexKey::PodPair(k.clone(), v.clone()));
            }
            for (k, v) in self.ns_labels(ns) {
                add(IndexKey::NsPair(k, v));
            }
            add(IndexKey::NsName(ns.clone()));
            add(IndexKey::Unindexed);
            for key in &identity.members {
                for ip in self.pods.get(key).into_iter().flat_map(|p| p.ips.iter()) {
                    for service in self.backend_ips.get(ip).into_iter().flat_map(|s| s.keys()) {
                        add(IndexKey::Service(service.clone()));
                    }
                }
            }
        } else if self.prefix_by_id.contains_key(&id) {
            add(IndexKey::Blocks);
        }
    }

    /// Policies whose rows for `service` may change: those that hold rows for it or
    /// for any backend's identities (a port is only allowed if every backend is).
    fn policies_for_service(&self, service: &ObjectKey, out: &mut BTreeSet<PolicyId>) {
        if let Some(svc) = self.services.get(service) {
            out.extend(self.row_owners.get(&svc.identity).into_iter().flatten());
        }
        for slice in self.slices_by_service.get(service).into_iter().flatten() {
            let Some(slice) = self.slices.get(&(service.0.clone(), slice.clone())) else {
                continue;
            };
            for ip in &slice.addresses {
                let ids = [
                    self.out.tables.addresses.get(ip).copied(),
                    self.longest_prefix(*ip),
                ];
                for id in ids.into_iter().flatten() {
                    out.extend(self.row_owners.get(&id).into_iter().flatten());
                }
            }
        }
    }

    /// Brings rows and endpoints up to date with everything marked dirty.
    fn flush(&mut self) {
        for key in std::mem::take(&mut self.dirty.rekey) {
            self.rekey_pod(&key);
        }
        let mut new_policies = BTreeSet::new();
        for key in std::mem::take(&mut self.dirty.endpoints) {
            self.refresh_endpoint(&key, &mut new_policies);
        }
        new_policies.retain(|p| self.policies.contains_key(p));
        let mut pairs = std::mem::take(&mut self.dirty.pairs);
        for id in std::mem::take(&mut self.dirty.identities) {
            let mut policies = BTreeSet::new();
            self.policies_for_identity(id, &mut policies);
            for policy in policies {
                pairs.entry(policy).or_default().insert(id);
            }
        }
        let mut changed = BTreeSet::new();
        for (policy, ids) in pairs {
            if new_policies.contains(&policy) || !self.policies.contains_key(&policy) {
                continue;
            }
            for id in ids {
                let rows = self.compute_rows(policy, id);
                if self.replace_rows(policy, id, rows) {
                    changed.insert(id);
                }
            }
        }
        for &policy in &new_policies {
            for id in self.candidates(policy) {
                let rows = self.compute_rows(policy, id);
                self.replace_rows(policy, id, rows);
            }
        }
        let mut services = std::mem::take(&mut self.dirty.services);
        for id in changed {
            self.services_behind(id, &mut services);
        }
        for net in std::mem::take(&mut self.dirty.nets) {
            self.services_in(net, &mut services);
        }
        for service in &services {
            let mut policies = BTreeSet::new();
            self.policies_for_service(service, &mut policies);
            for policy in policies {
                if !new_policies.contains(&policy) {
                    self.refresh_service_rows(policy, service);
                }
            }
        }
        for &policy in &new_policies {
            let Some(state) = self.policies.get(&policy) else {
                continue;
            };
            if !state.spec.isolate_egress {
                continue;
            }
            let mut candidates = BTreeSet::new();
            for id in state.rows.keys() {
                self.services_behind(*id, &mut candidates);
            }
            for service in &candidates {
                self.refresh_service_rows(policy, service);
            }
        }
    }

    /// Which rules allow a flow, for `explain`: (direction, identity) rows per rule.
    pub(crate) fn rule_rows(
        &self,
        policy: PolicyId,
        peer: IdentityId,
    ) -> Vec<(RuleOrigin, Arc<ObjectRef>, Vec<PolicyEntry>)> {
        let mut out = Vec::new();
        let Some(state) = self.policies.get(&policy) else {
            return out;
        };
        let spec = &state.spec;
        for (direction, rule) in spec.rules() {
            let mut rows = Vec::new();
            if let Some(identity) = self.pod_identities.get(&peer) {
                if rule
                    .peers
                    .iter()
                    .any(|p| self.peer_matches_pod(p, identity))
                {
                    push_rule_rows(
                        &mut rows,
                        policy,
                        direction,
                        peer,
                        rule,
                        Some(&identity.key.named_ports),
                        &spec.local_ports,
                    );
                }
            } else if let Some(net) = self.prefix_by_id.get(&peer)
                && rule
                    .peers
                    .iter()
                    .any(|p| matches!(p, Peer::Block(b) if b.covers(net)))
            {
                push_rule_rows(
                    &mut rows,
                    policy,
                    direction,
                    peer,
                    rule,
                    None,
                    &spec.local_ports,
                );
            }
            if !rows.is_empty() {
                out.push((rule.origin.clone(), rule.object.clone(), rows));
            }
        }
        out
    }

    /// Explains the verdict [`Tables::allows`] gives a new flow of a local pod.
    pub fn explain(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Explanation {
        let Some(ep) = self.out.tables.endpoints.get(&endpoint) else {
            return Explanation::UnknownEndpoint;
        };
        let isolated = match direction {
            Direction::Ingress => ep.isolate_ingress,
            Direction::Egress => ep.isolate_egress,
        };
        if !isolated {
            return Explanation::NotIsolated;
        }
        let exact = self.out.tables.addresses.get(&peer).copied();
        if exact == Some(identity::HOST) {
            return Explanation::Host;
        }
        if let Some(service) = self.cluster_ips.get(&peer) {
            if direction == Direction::Ingress {
                return Explanation::Denied;
            }
            let Some(svc) = self.services.get(service) else {
                return Explanation::Denied;
            };
            let allowed = self.policies.get(&ep.policy_id).is_some_and(|p| {
                p.rows.get(&svc.identity).is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r.direction == direction && r.matches(protocol, port))
                })
            });
            if !allowed {
                return Explanation::Denied;
            }
            let mut rules = Vec::new();
            for sp in svc
                .ports
                .iter()
                .filter(|p| p.protocol == protocol && p.port == port)
            {
                for (ip, proto, target) in self.backends(service, sp) {
                    if let Explanation::Allowed(r) =
                        self.explain(endpoint, direction, ip, proto, target)
                    {
                        rules.extend(r);
                    }
                }
            }
            rules.sort();
            rules.dedup();
            return Explanation::AllowedViaService {
                service: service.clone(),
                rules,
            };
        }
        let cidr = self.longest_prefix(peer);
        let mut rules = Vec::new();
        for id in [exact, cidr].into_iter().flatten() {
            for (origin, object, rows) in self.rule_rows(ep.policy_id, id) {
                if rows
                    .iter()
                    .any(|r| r.direction == direction && r.matches(protocol, port))
                {
                    rules.push(((*object).clone(), origin));
                }
            }
        }
        rules.sort();
        rules.dedup();
        if rules.is_empty() {
            Explanation::Denied
        } else {
            Explanation::Allowed(rules)
        }
    }
}
