//! The incremental engine: keeps the cluster objects, the identities, the hash-consed
//! local policies and their rows, and updates [`Tables`] by what each change touches.
//! The identities and policy ids it allocates are described in the [`super`] header.
//!
//! [`Engine`] composes parts that each own their state behind private fields: only a
//! part's own methods change it, and it hands out shared references only, so a part's
//! type says what may change it:
//! - `objects` (`Objects`): the objects as received (namespaces, pods, RayClusters,
//!   NetworkPolicies, Services, EndpointSlices) with their reverse indexes (namespaces
//!   by label, pods by address and addresses two pods claim, local pods by RayCluster,
//!   with host ports, on the host network, ClusterIPs, slices by Service, backends,
//!   node port claims), each changed together with what it indexes;
//! - `identities` (`Identities`): the identity allocator: ids in use, pod identities
//!   with their members and indexes (by namespace, by label), CIDR identities of the
//!   prefixes policies name (reference counted), and the identities of ports several
//!   objects claim;
//! - `policies` (`Policies`): the hash-consed policies (spec, reference count, rows
//!   by peer identity, index keys, rule index), the policy index, which policies hold
//!   rows for an identity, and the pinned ids to give back after a restart. The only
//!   writer of rows, to itself and to the output;
//! - `endpoints` (`LocalEndpoints`): the local endpoints and the policy each uses;
//! - `dirty` (`Dirty`): what a change marked for `flush`;
//! - `out` (`Output`, in `policy::output`): the desired tables and their diff; rows
//!   are written by `policies`, endpoints, addresses, prefixes and node ports by the
//!   `impl Engine` blocks below.
//!
//! The engine's own state is its settings (with the node's addresses and the DNS
//! Service they name), changed only in this file. This file holds it, the read-only
//! public API and `flush`, the driver that turns what a change marked into endpoint
//! and row updates. The `impl Engine` blocks coordinate the parts, one concern each:
//! - `namespaces`, `pods`, `declared` (RayClusters, NetworkPolicies), `services`
//!   (Services, EndpointSlices): the `upsert_*`/`remove_*` of each input kind;
//! - `node_ports`: the ports the node DNATs (Service `nodePort`s, local pods'
//!   `hostPort`s), who claims each, and the rows of host-port identities;
//! - `addresses`: joining and leaving identities, prefixes coming and going, and
//!   what addresses and prefixes map to in the output;
//! - `local`: each local endpoint's policy spec, and interning, editing and releasing
//!   its policy;
//! - `index`: which policies and identities a change can touch;
//! - `rows`: the rows a rule gives a peer identity (read-only);
//! - `services` also owns the post-DNAT rows of Service and node-port identities;
//! - `explain`: why a flow gets its verdict (read-only).
//!
//! Plain helpers, with no engine state: `spec` (a policy's spec and what follows from
//! it alone), `rule_index` (which of one policy's rules can select a given peer),
//! `ids` (content-derived ids).
//!
//! Must not: do I/O, keep a clock, or rebuild everything on a change.

mod addresses;
mod declared;
mod dirty;
mod endpoints;
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
mod objects;
mod pods;
mod policies;
mod rows;
mod rule_index;
mod services;
mod spec;

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;

use super::output::Output;
use super::problem::{ObjectRef, Problem};
use super::rule::{Role, RuleOrigin};
use super::settings::{DnsMode, Settings};
use crate::tables::{
    EndpointId, EndpointPolicy, IdentityId, PolicyId, Tables, TablesDiff, identity,
};
use dirty::Dirty;
use endpoints::LocalEndpoints;
use identities::Identities;
use objects::Objects;
use policies::Policies;

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
///
/// The engine composes its parts (see the module docs); each owns its state and
/// changes it only through its methods. Only the settings (with the node's addresses
/// and the DNS Service) are the engine's own.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    node_addresses: HashSet<IpAddr>,
    /// The DNS Service of `DnsMode::Service`.
    dns_service: Option<ObjectKey>,
    objects: Objects,
    identities: Identities,
    policies: Policies,
    endpoints: LocalEndpoints,
    out: Output,
    dirty: Dirty,
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
            node_addresses: HashSet::new(),
            settings,
            dns_service: None,
            objects: Objects::default(),
            identities: Identities::default(),
            policies: Policies::default(),
            endpoints: LocalEndpoints::default(),
            out: Output::default(),
            dirty: Dirty::default(),
        };
        if let DnsMode::Service { namespace, name } = &engine.settings.dns {
            engine.dns_service = Some((namespace.clone(), name.clone()));
        }
        engine.node_addresses = engine.own_addresses(&engine.settings.node_addresses);
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
        for (_, state) in self.objects.clusters() {
            all.extend(state.parsed.iter().flat_map(|p| p.problems.iter().cloned()));
        }
        for np in self.objects.netpols() {
            all.extend(np.problems.iter().cloned());
        }
        for (_, ep) in self.endpoints.iter() {
            all.extend(ep.problems.iter().cloned());
        }
        all.extend(self.egress_named_port_problems());
        all.extend(self.node_port_problems());
        all.extend(self.address_conflict_problems());
        all.into_iter().collect()
    }

    /// The hostNetwork pods on this node with their pod identity, by `(namespace,
    /// name)`: what the datapath maps their cgroups to (`RF_NODECG`), so their traffic
    /// is judged as theirs, not the node's (docs/semantics.md "What counts as the node"). A hostNetwork pod on another
    /// node is not listed: its traffic comes from its node's address, and only an
    /// ipBlock covering that address can match it there.
    pub fn host_network_pods(&self) -> Vec<(ObjectKey, IdentityId)> {
        self.objects
            .local_host_network()
            .filter_map(|(key, pod)| Some((key.clone(), pod.identity?)))
            .collect()
    }

    /// The identity of hostNetwork pod `namespace/name` if it runs on this node.
    pub fn host_network_identity(&self, namespace: &str, name: &str) -> Option<IdentityId> {
        let key = (namespace.to_owned(), name.to_owned());
        if !self.objects.is_local_host_network(&key) {
            return None;
        }
        self.objects.pod(&key)?.identity
    }

    /// Which of `addresses` are the node's own (identity `HOST`): all but a node-local
    /// DNS cache's (`Settings::dns_node_local`), which a hostNetwork pod serves on a
    /// device of the node and the DNS base flow decides, port by port.
    fn own_addresses(&self, addresses: &[IpAddr]) -> HashSet<IpAddr> {
        addresses
            .iter()
            .filter(|ip| !self.settings.dns_node_local.contains(ip))
            .copied()
            .collect()
    }

    /// Replaces the node's own addresses (identity `HOST`), e.g. after a node IP change.
    pub fn set_node_addresses(&mut self, addresses: Vec<IpAddr>) {
        let old: Vec<IpAddr> = self.node_addresses.drain().collect();
        self.node_addresses = self.own_addresses(&addresses);
        self.settings.node_addresses = addresses.clone();
        for ip in old.iter().chain(&addresses) {
            self.refresh_address(*ip);
        }
        // A backend on a node address counts as allowed: Services may change.
        self.dirty.services(self.objects.service_keys().cloned());
        self.dirty
            .host_ports(self.objects.host_port_pod_keys().cloned());
        self.flush();
    }

    /// The ipBlock prefixes each policy's rules name (cidrs and excepts), so the
    /// runtime can tell which policies need which `cidrs` entries.
    pub fn policy_prefixes(&self) -> impl Iterator<Item = (PolicyId, &[IpNet])> + '_ {
        self.policies
            .iter()
            .map(|(id, state)| (id, state.prefixes()))
    }

    /// Sizes of what the engine holds, for metrics.
    pub fn stats(&self) -> Stats {
        Stats {
            endpoints: self.endpoints.len(),
            policies: self.policies.len(),
            pod_identities: self.identities.pod_count(),
            prefixes: self.identities.prefix_count(),
            services: self.objects.service_count(),
            addresses: self.out.tables.addresses.len(),
            cidrs: self.out.tables.cidrs.len(),
            policy_rows: self.out.tables.policy.len(),
        }
    }

    /// The keys of every object of `kind` the engine holds, so a relist can remove
    /// what it did not see.
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        self.objects.keys(kind)
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
        let key = self.endpoints.key_of(id)?;
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
        self.endpoints.ids().filter_map(|id| self.endpoint_meta(id))
    }

    /// Brings rows and endpoints up to date with everything marked dirty.
    fn flush(&mut self) {
        for key in self.dirty.take_rekey() {
            self.rekey_pod(&key);
        }
        let mut new_policies = BTreeSet::new();
        for key in self.dirty.take_endpoints() {
            self.refresh_endpoint(&key, &mut new_policies);
        }
        new_policies.retain(|p| self.policies.contains(*p));
        let mut pairs = self.dirty.take_pairs();
        for id in self.dirty.take_identities() {
            let mut policies = BTreeSet::new();
            self.policies_for_identity(id, &mut policies);
            for policy in policies {
                pairs.entry(policy).or_default().insert(id);
            }
        }
        let mut changed = BTreeSet::new();
        for (policy, ids) in pairs {
            if new_policies.contains(&policy) || !self.policies.contains(policy) {
                continue;
            }
            for id in ids {
                let rows = self.compute_rows(policy, id);
                if self.policies.replace_rows(policy, id, rows, &mut self.out) {
                    changed.insert(id);
                }
            }
        }
        for &policy in &new_policies {
            for id in self.candidates(policy) {
                let rows = self.compute_rows(policy, id);
                self.policies.replace_rows(policy, id, rows, &mut self.out);
            }
        }
        let mut services = self.dirty.take_services();
        let mut host_ports = self.dirty.take_host_ports();
        for &id in &changed {
            self.services_behind(id, &mut services);
            self.host_ports_behind(id, &mut host_ports);
        }
        for net in self.dirty.take_nets() {
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
            let Some(state) = self.policies.get(policy) else {
                continue;
            };
            if !state.spec().isolate_egress {
                continue;
            }
            let mut candidates = BTreeSet::new();
            let mut host_ports = BTreeSet::new();
            // A backend on this node's address needs no row of the policy's own.
            self.services_at_node(&mut candidates);
            for id in state.rows().keys() {
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
