//! The cluster objects as received (namespaces, pods, RayClusters, NetworkPolicies,
//! Services, EndpointSlices) and the reverse indexes that find them: namespaces by
//! label, pods by address (and addresses two pods claim), local pods by RayCluster,
//! with host ports and on the host network, Services by ClusterIP, slices by Service,
//! Services by backend address, and who claims each port the node DNATs.
//!
//! Each index changes with the object it indexes, here and only here, so none can
//! fall out of step with what it indexes.
//!
//! Must not: allocate identities, compute rows, or decide what a change touches (the
//! input handlers do, from what these methods return).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::declared::ClusterState;
use super::node_ports::Claimant;
use super::pods::PodState;
use super::services::{ServiceState, SliceState};
use super::{Kind, ObjectKey, unlink};
use crate::policy::netpol::ParsedNetpol;
use crate::policy::raycluster::LABEL_CLUSTER;
use crate::policy::selector::Labels;
use crate::tables::{IdentityId, NodePort};

/// A pod's indexed addresses before and after a change, and its identity.
pub(super) struct AddressMove {
    pub(super) old: Vec<IpAddr>,
    pub(super) new: Vec<IpAddr>,
    pub(super) identity: Option<IdentityId>,
}

#[derive(Debug, Default)]
pub(super) struct Objects {
    namespaces: HashMap<String, Labels>,
    /// Known namespaces by label.
    ns_by_label: HashMap<(String, String), BTreeSet<String>>,
    pods: HashMap<ObjectKey, PodState>,
    /// Pods by the addresses that map to their identity (see `PodState::indexed_ips`).
    addr_pods: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Addresses more than one pod claims: they map to no pod identity.
    addr_conflicts: BTreeSet<IpAddr>,
    /// Local pods by (namespace, `ray.io/cluster`).
    local_by_cluster: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Local pods with `hostPort`s.
    host_port_pods: BTreeSet<ObjectKey>,
    /// hostNetwork pods on this node.
    local_host_network: BTreeSet<ObjectKey>,
    clusters: HashMap<ObjectKey, ClusterState>,
    netpols: BTreeMap<String, BTreeMap<String, Arc<ParsedNetpol>>>,
    services: HashMap<ObjectKey, ServiceState>,
    cluster_ips: HashMap<IpAddr, ObjectKey>,
    slices: HashMap<ObjectKey, SliceState>,
    slices_by_service: HashMap<ObjectKey, BTreeSet<String>>,
    /// Services by backend address, with how many of their slices list it.
    backend_ips: BTreeMap<IpAddr, BTreeMap<ObjectKey, usize>>,
    /// Who claims each port the node DNATs, with the claiming fields.
    node_port_claims: BTreeMap<NodePort, BTreeMap<Claimant, Vec<String>>>,
    /// The ports each claimant claims.
    claims_by: HashMap<Claimant, Vec<NodePort>>,
}

impl Objects {
    /// The keys of every object of `kind`, sorted.
    pub(super) fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
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

    // Namespaces.

    pub(super) fn namespace(&self, name: &str) -> Option<&Labels> {
        self.namespaces.get(name)
    }

    pub(super) fn namespaces(&self) -> impl Iterator<Item = (&String, &Labels)> + '_ {
        self.namespaces.iter()
    }

    /// The known namespaces labelled `key: value`.
    pub(super) fn namespaces_with_label(
        &self,
        key: &str,
        value: &str,
    ) -> impl Iterator<Item = &String> + '_ {
        self.ns_by_label
            .get(&(key.to_owned(), value.to_owned()))
            .into_iter()
            .flatten()
    }

    /// Sets (or with `None` removes) namespace `name`'s labels.
    pub(super) fn set_namespace(&mut self, name: &str, labels: Option<Labels>) {
        if let Some(old) = self.namespaces.remove(name) {
            for pair in old {
                unlink(&mut self.ns_by_label, &pair, name);
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

    // Pods.

    pub(super) fn pod(&self, key: &ObjectKey) -> Option<&PodState> {
        self.pods.get(key)
    }

    /// Stores pod `key`, indexed by what makes it local; the pod it replaces. Its
    /// addresses are indexed apart ([`Objects::move_pod_addresses`]).
    pub(super) fn insert_pod(&mut self, key: &ObjectKey, pod: PodState) -> Option<PodState> {
        let old = self.pods.insert(key.clone(), pod);
        if let Some(old) = &old {
            self.unindex_local(key, old);
        }
        self.index_local(key);
        old
    }

    /// Removes pod `key` and its locality indexes (not its addresses).
    pub(super) fn remove_pod(&mut self, key: &ObjectKey) -> Option<PodState> {
        let old = self.pods.remove(key)?;
        self.unindex_local(key, &old);
        Some(old)
    }

    /// Moves pod `key` to `identity` (its DNS-backend bit changed).
    pub(super) fn set_pod_identity(&mut self, key: &ObjectKey, identity: IdentityId) {
        if let Some(pod) = self.pods.get_mut(key) {
            pod.identity = Some(identity);
        }
    }

    /// Records whether local pod `key` (UID `uid`) has lost its sandbox; when that
    /// changed, how its indexed addresses move.
    pub(super) fn set_sandbox_gone(
        &mut self,
        key: &ObjectKey,
        uid: &str,
        gone: bool,
    ) -> Option<AddressMove> {
        let pod = self.pods.get_mut(key)?;
        if pod.uid != uid || !pod.local || pod.sandbox_gone == gone {
            return None;
        }
        let old = pod.indexed_ips().to_vec();
        pod.sandbox_gone = gone;
        Some(AddressMove {
            old,
            new: pod.indexed_ips().to_vec(),
            identity: pod.identity,
        })
    }

    /// Indexes a pod by what makes it local: an endpoint of its RayCluster, a
    /// hostNetwork pod of this node, a pod with host ports.
    fn index_local(&mut self, key: &ObjectKey) {
        let Some(pod) = self.pods.get(key) else {
            return;
        };
        let cluster = pod
            .labels
            .get(LABEL_CLUSTER)
            .filter(|_| pod.is_endpoint())
            .cloned();
        let host_network = pod.local && pod.host_network;
        let host_ports = pod.host_port_identity.is_some();
        if let Some(cluster) = cluster {
            self.local_by_cluster
                .entry((key.0.clone(), cluster))
                .or_default()
                .insert(key.clone());
        }
        if host_network {
            self.local_host_network.insert(key.clone());
        }
        if host_ports {
            self.host_port_pods.insert(key.clone());
        }
    }

    fn unindex_local(&mut self, key: &ObjectKey, old: &PodState) {
        if let Some(cluster) = old.labels.get(LABEL_CLUSTER).filter(|_| old.is_endpoint()) {
            let group = (key.0.clone(), cluster.clone());
            unlink(&mut self.local_by_cluster, &group, key);
        }
        self.local_host_network.remove(key);
        self.host_port_pods.remove(key);
    }

    /// Moves pod `key` in the address index from `old` to `new` addresses, and keeps
    /// the addresses several pods claim.
    pub(super) fn move_pod_addresses(&mut self, key: &ObjectKey, old: &[IpAddr], new: &[IpAddr]) {
        for ip in old {
            if !new.contains(ip) {
                unlink(&mut self.addr_pods, ip, key);
            }
        }
        for ip in new {
            self.addr_pods.entry(*ip).or_default().insert(key.clone());
        }
        for ip in old.iter().chain(new) {
            if self.addr_pods.get(ip).is_some_and(|pods| pods.len() > 1) {
                self.addr_conflicts.insert(*ip);
            } else {
                self.addr_conflicts.remove(ip);
            }
        }
    }

    /// The pods whose addresses include `ip`, by key.
    pub(super) fn pods_at(&self, ip: &IpAddr) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.addr_pods.get(ip).into_iter().flatten()
    }

    /// The addresses several pods claim, with the claimants.
    pub(super) fn address_conflicts(
        &self,
    ) -> impl Iterator<Item = (&IpAddr, impl Iterator<Item = &ObjectKey> + '_)> + '_ {
        self.addr_conflicts.iter().map(|ip| (ip, self.pods_at(ip)))
    }

    /// The local endpoints of RayCluster `key` (its `ray.io/cluster` pods here).
    pub(super) fn local_in_cluster(
        &self,
        key: &ObjectKey,
    ) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.local_by_cluster.get(key).into_iter().flatten()
    }

    /// The hostNetwork pods of this node.
    pub(super) fn local_host_network(&self) -> impl Iterator<Item = (&ObjectKey, &PodState)> + '_ {
        self.local_host_network
            .iter()
            .filter_map(|key| Some((key, self.pods.get(key)?)))
    }

    pub(super) fn is_local_host_network(&self, key: &ObjectKey) -> bool {
        self.local_host_network.contains(key)
    }

    /// The local pods with host ports.
    pub(super) fn host_port_pods(&self) -> impl Iterator<Item = (&ObjectKey, &PodState)> + '_ {
        self.host_port_pods
            .iter()
            .filter_map(|key| Some((key, self.pods.get(key)?)))
    }

    pub(super) fn host_port_pod_keys(&self) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.host_port_pods.iter()
    }

    // RayClusters and NetworkPolicies.

    pub(super) fn cluster(&self, key: &ObjectKey) -> Option<&ClusterState> {
        self.clusters.get(key)
    }

    pub(super) fn clusters(&self) -> impl Iterator<Item = (&ObjectKey, &ClusterState)> + '_ {
        self.clusters.iter()
    }

    pub(super) fn set_cluster(&mut self, key: ObjectKey, state: ClusterState) {
        self.clusters.insert(key, state);
    }

    pub(super) fn remove_cluster(&mut self, key: &ObjectKey) -> Option<ClusterState> {
        self.clusters.remove(key)
    }

    /// The NetworkPolicies of namespace `ns`.
    pub(super) fn netpols_in(&self, ns: &str) -> impl Iterator<Item = &Arc<ParsedNetpol>> + '_ {
        self.netpols.get(ns).into_iter().flat_map(|m| m.values())
    }

    pub(super) fn netpols(&self) -> impl Iterator<Item = &Arc<ParsedNetpol>> + '_ {
        self.netpols.values().flat_map(|m| m.values())
    }

    pub(super) fn set_netpol(&mut self, namespace: String, name: String, np: Arc<ParsedNetpol>) {
        self.netpols.entry(namespace).or_default().insert(name, np);
    }

    pub(super) fn remove_netpol(&mut self, namespace: &str, name: &str) {
        if let Some(map) = self.netpols.get_mut(namespace) {
            map.remove(name);
            if map.is_empty() {
                self.netpols.remove(namespace);
            }
        }
    }

    // Services and EndpointSlices.

    pub(super) fn service(&self, key: &ObjectKey) -> Option<&ServiceState> {
        self.services.get(key)
    }

    pub(super) fn service_keys(&self) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.services.keys()
    }

    pub(super) fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The Service whose ClusterIP is `ip`.
    pub(super) fn service_at(&self, ip: &IpAddr) -> Option<&ObjectKey> {
        self.cluster_ips.get(ip)
    }

    /// Stores Service `key` and maps its ClusterIPs to it.
    pub(super) fn insert_service(&mut self, key: ObjectKey, state: ServiceState) {
        for ip in &state.cluster_ips {
            self.cluster_ips.insert(*ip, key.clone());
        }
        self.services.insert(key, state);
    }

    /// Removes Service `key` and its ClusterIPs.
    pub(super) fn remove_service(&mut self, key: &ObjectKey) -> Option<ServiceState> {
        let old = self.services.remove(key)?;
        for ip in &old.cluster_ips {
            self.cluster_ips.remove(ip);
        }
        Some(old)
    }

    /// The EndpointSlices of Service `service`.
    pub(super) fn slices_of<'a>(
        &'a self,
        service: &'a ObjectKey,
    ) -> impl Iterator<Item = &'a SliceState> + 'a {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(service.0.clone(), name.clone())))
    }

    /// Stores slice `key` and indexes its addresses as backends of its Service.
    pub(super) fn insert_slice(&mut self, key: ObjectKey, slice: SliceState) {
        for ip in &slice.addresses {
            *self
                .backend_ips
                .entry(*ip)
                .or_default()
                .entry(slice.service.clone())
                .or_default() += 1;
        }
        self.slices_by_service
            .entry(slice.service.clone())
            .or_default()
            .insert(key.1.clone());
        self.slices.insert(key, slice);
    }

    /// Removes slice `key` and its backends.
    pub(super) fn remove_slice(&mut self, key: &ObjectKey) -> Option<SliceState> {
        let old = self.slices.remove(key)?;
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
        Some(old)
    }

    /// The Services with a backend at `ip`.
    pub(super) fn backend_services(&self, ip: &IpAddr) -> impl Iterator<Item = &ObjectKey> + '_ {
        self.backend_ips.get(ip).into_iter().flat_map(|s| s.keys())
    }

    /// Whether `ip` is a backend of `service`.
    pub(super) fn is_backend_of(&self, ip: &IpAddr, service: &ObjectKey) -> bool {
        self.backend_ips
            .get(ip)
            .is_some_and(|s| s.contains_key(service))
    }

    /// The Services with a backend in `net`.
    pub(super) fn services_backed_in(&self, net: IpNet, out: &mut BTreeSet<ObjectKey>) {
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

    // Ports the node DNATs.

    /// Replaces the ports `claimant` claims (each with the fields that claim it); the
    /// ports whose claims changed, or `None` when nothing did.
    pub(super) fn set_node_port_claims(
        &mut self,
        claimant: &Claimant,
        claims: BTreeMap<NodePort, Vec<String>>,
    ) -> Option<BTreeSet<NodePort>> {
        let old = self.claims_by.remove(claimant).unwrap_or_default();
        let unchanged = old.len() == claims.len()
            && old.iter().all(|port| {
                self.node_port_claims
                    .get(port)
                    .and_then(|m| m.get(claimant))
                    == claims.get(port)
            });
        if unchanged {
            if !old.is_empty() {
                self.claims_by.insert(claimant.clone(), old);
            }
            return None;
        }
        for port in &old {
            if let Some(map) = self.node_port_claims.get_mut(port) {
                map.remove(claimant);
                if map.is_empty() {
                    self.node_port_claims.remove(port);
                }
            }
        }
        let mut touched: BTreeSet<NodePort> = old.into_iter().collect();
        if !claims.is_empty() {
            self.claims_by
                .insert(claimant.clone(), claims.keys().copied().collect());
        }
        for (port, fields) in claims {
            self.node_port_claims
                .entry(port)
                .or_default()
                .insert(claimant.clone(), fields);
            touched.insert(port);
        }
        Some(touched)
    }

    /// Who claims `port`, with the claiming fields.
    pub(super) fn node_port_claims(
        &self,
        port: &NodePort,
    ) -> Option<&BTreeMap<Claimant, Vec<String>>> {
        self.node_port_claims.get(port)
    }

    /// Every claimed port with its claims.
    pub(super) fn all_node_port_claims(
        &self,
    ) -> impl Iterator<Item = (&NodePort, &BTreeMap<Claimant, Vec<String>>)> + '_ {
        self.node_port_claims.iter()
    }
}
