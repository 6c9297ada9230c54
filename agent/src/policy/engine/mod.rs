//! The incremental engine: keeps the cluster objects, the identities, the hash-consed
//! local policies and their rows, and updates [`Tables`] by what each change touches.
//! The identities and policy ids it allocates are described in the [`super`] header.
//!
//! This file holds the [`Engine`] state, its read-only public API and `flush`, the
//! driver that turns what a change marked `Dirty` into endpoint and row updates.
//! One concern per submodule:
//! - `namespaces`, `pods`, `declared` (RayClusters, NetworkPolicies), `services`
//!   (Services, EndpointSlices): the `upsert_*`/`remove_*` of each input kind;
//! - `node_ports`: the ports the node DNATs (Service `nodePort`s, local pods'
//!   `hostPort`s), who claims each, and the rows of host-port identities;
//! - `identities`: pod, CIDR and address identities, and what addresses and prefixes
//!   map to in the output;
//! - `local`: local endpoints, their policy specs and the hash-consed policy ids;
//! - `index`: which policies and identities a change can touch;
//! - `rule_index`: which of one policy's rules can select a given peer identity;
//! - `rows`: the rows a rule gives a peer identity, and writing them to the output;
//! - `services` also owns the post-DNAT rows of Service and node-port identities;
//! - `explain`: why a flow gets its verdict.
//!
//! Must not: do I/O, keep a clock, or rebuild everything on a change.

mod declared;
mod explain;
pub use explain::{AddressOwner, PodFacts};
mod identities;
mod ids;
mod index;
mod local;
mod namespaces;
mod node_ports;
pub use namespaces::GUARD_LABEL;
pub use node_ports::NodePortOwner;
mod pods;
mod rows;
mod rule_index;
mod services;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::netpol::ParsedNetpol;
use super::output::Output;
use super::problem::{ObjectRef, Problem};
use super::rule::{Role, RuleOrigin};
use super::selector::Labels;
use super::settings::{DnsMode, Settings};
use crate::tables::{
    EndpointId, EndpointPolicy, IdentityId, NodePort, PolicyId, Tables, TablesDiff, identity,
};
use declared::ClusterState;
use identities::{IdentityKey, PodIdentity};
use index::IndexKey;
use local::{LocalEndpoint, PolicySpec, PolicyState};
use node_ports::Claimant;
use pods::PodState;
use services::{ServiceState, SliceState};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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
    /// Allowed to a port the node DNATs (a Service's `nodePort`, a local pod's
    /// `hostPort`) on one of its addresses: every backend is allowed, by these rules.
    AllowedViaNodePort {
        owner: NodePortOwner,
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
    /// Audit-only: would-drops pass and are counted (`--audit`, or its RayCluster's
    /// `rayfence.io/audit: "true"`). The same as `policy.audit`.
    pub audit: bool,
}
#[derive(Debug, Default)]
struct Dirty {
    endpoints: BTreeSet<ObjectKey>,
    identities: BTreeSet<IdentityId>,
    services: BTreeSet<ObjectKey>,
    nets: Vec<IpNet>,
    /// Local pods whose host-port rows may change.
    host_ports: BTreeSet<ObjectKey>,
    /// Pods whose DNS-backend bit may have changed.
    rekey: BTreeSet<ObjectKey>,
    /// Identities to recompute in one policy only (namespace relabels).
    pairs: BTreeMap<PolicyId, BTreeSet<IdentityId>>,
}

/// Removes `value` from the set at `key` in a reverse index, and the set once it is
/// empty, so an index never holds empty sets.
fn unlink<K, V, Q>(index: &mut HashMap<K, BTreeSet<V>>, key: &K, value: &Q)
where
    K: Eq + Hash,
    V: Ord + Borrow<Q>,
    Q: Ord + ?Sized,
{
    if let Some(set) = index.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// The policy engine. Feed it objects; read [`Engine::tables`] or take diffs.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    node_addresses: HashSet<IpAddr>,
    /// Every identity in use (pod, CIDR, Service, node port): ids are derived from
    /// content and probe past these on a collision.
    used_identities: HashSet<IdentityId>,
    namespaces: HashMap<String, Labels>,
    pods: HashMap<ObjectKey, PodState>,
    addr_pods: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Addresses more than one pod claims: they map to no pod identity.
    addr_conflicts: BTreeSet<IpAddr>,
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
    /// The policy ids pinned maps gave endpoints before a restart, until the first
    /// full program has re-pointed every endpoint ([`Engine::adopt_policy_ids`]).
    adopted: local::AdoptedPolicyIds,
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
    /// Who claims each port the node DNATs, with the claiming fields.
    node_port_claims: BTreeMap<NodePort, BTreeMap<Claimant, Vec<String>>>,
    /// The ports each claimant claims.
    claims_by: HashMap<Claimant, Vec<NodePort>>,
    /// The identity (never given rows) of each port several objects claim.
    conflict_identities: HashMap<NodePort, IdentityId>,
    /// Local pods with `hostPort`s.
    host_port_pods: BTreeSet<ObjectKey>,
    /// hostNetwork pods on this node.
    local_host_network: BTreeSet<ObjectKey>,
}

impl Engine {
    /// A new identity for what `seed` hashes (see [`ids`]), marked in use.
    fn allocate_identity(&mut self, seed: u64) -> IdentityId {
        let used = &self.used_identities;
        let id = ids::pick(seed, identity::FIRST_ALLOCATED, |id| used.contains(&id));
        self.used_identities.insert(id);
        id
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Engine {
    pub fn new(settings: Settings) -> Self {
        let mut engine = Self {
            node_addresses: settings.node_addresses.iter().copied().collect(),
            settings,
            used_identities: HashSet::new(),
            namespaces: HashMap::new(),
            pods: HashMap::new(),
            addr_pods: HashMap::new(),
            addr_conflicts: BTreeSet::new(),
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
            adopted: local::AdoptedPolicyIds::default(),
            out: Output::default(),
            dirty: Dirty::default(),
            index: HashMap::new(),
            row_owners: HashMap::new(),
            local_by_cluster: HashMap::new(),
            ns_by_label: HashMap::new(),
            dns_service: None,
            node_port_claims: BTreeMap::new(),
            claims_by: HashMap::new(),
            conflict_identities: HashMap::new(),
            host_port_pods: BTreeSet::new(),
            local_host_network: BTreeSet::new(),
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
        all.extend(self.node_port_problems());
        all.extend(self.address_conflict_problems());
        all.into_iter().collect()
    }

    /// The hostNetwork pods on this node with their pod identity, by `(namespace,
    /// name)`: what the datapath maps their cgroups to (`RF_NODECG`), so their traffic
    /// is judged as theirs, not the node's (SEMANTICS 5a). A hostNetwork pod on another
    /// node is not listed: its traffic comes from its node's address, and only an
    /// ipBlock covering that address can match it there.
    pub fn host_network_pods(&self) -> Vec<(ObjectKey, IdentityId)> {
        self.local_host_network
            .iter()
            .filter_map(|key| Some((key.clone(), self.pods.get(key)?.identity?)))
            .collect()
    }

    /// The identity of hostNetwork pod `namespace/name` if it runs on this node.
    pub fn host_network_identity(&self, namespace: &str, name: &str) -> Option<IdentityId> {
        let key = (namespace.to_owned(), name.to_owned());
        if !self.local_host_network.contains(&key) {
            return None;
        }
        self.pods.get(&key)?.identity
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
        self.dirty
            .host_ports
            .extend(self.host_port_pods.iter().cloned());
        self.flush();
    }

    /// The ipBlock prefixes each policy's rules name (cidrs and excepts), so the
    /// runtime can tell which policies need which `cidrs` entries.
    pub fn policy_prefixes(&self) -> impl Iterator<Item = (PolicyId, &[IpNet])> + '_ {
        self.policies
            .iter()
            .map(|(id, state)| (*id, state.prefixes.as_slice()))
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
        let policy = *self.out.tables.endpoints.get(&id)?;
        Some(EndpointMeta {
            id,
            namespace: key.0.clone(),
            pod: key.1.clone(),
            uid: ep.uid.clone(),
            cluster: ep.cluster.clone(),
            role: ep.role.clone(),
            audit: policy.audit,
            policy,
        })
    }

    /// Every local pod's metadata, by endpoint id.
    pub fn endpoints(&self) -> impl Iterator<Item = EndpointMeta> + '_ {
        self.endpoint_keys
            .keys()
            .filter_map(|id| self.endpoint_meta(*id))
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
        let mut host_ports = std::mem::take(&mut self.dirty.host_ports);
        for &id in &changed {
            self.services_behind(id, &mut services);
            self.host_ports_behind(id, &mut host_ports);
        }
        for net in std::mem::take(&mut self.dirty.nets) {
            self.services_in(net, &mut services);
            self.host_ports_in(net, &mut host_ports);
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
        for pod in &host_ports {
            let mut policies = BTreeSet::new();
            self.policies_for_host_ports(pod, &mut policies);
            for policy in policies {
                if !new_policies.contains(&policy) {
                    self.refresh_host_port_rows(policy, pod);
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
            let mut host_ports = BTreeSet::new();
            // A backend on this node's address needs no row of the policy's own.
            self.services_at_node(&mut candidates);
            for id in state.rows.keys() {
                self.services_behind(*id, &mut candidates);
                self.host_ports_behind(*id, &mut host_ports);
            }
            for service in &candidates {
                self.refresh_service_rows(policy, service);
            }
            for pod in &host_ports {
                self.refresh_host_port_rows(policy, pod);
            }
        }
    }
}
