//! Services and EndpointSlices: Service identities on ClusterIPs (one per address
//! family: kube-proxy DNATs a ClusterIP only to endpoints of its own family), the
//! backends each slice lists, the DNS-backend bit of pod identities, and the
//! post-DNAT rows of a Service identity (a service port is allowed iff every backend
//! of that family is) and of its node-port identity (a `nodePort` likewise, on every
//! backend; which ports it owns is `node_ports`' business).
//!
//! A backend on one of this node's addresses is the node, unless a hostNetwork pod on
//! this node declares that port (docs/semantics.md "What counts as the node"): then it is that pod, by its identity
//! (or an ipBlock covering the address).
//!
//! Must not: let an ipBlock match a ClusterIP, allow a service port or node port
//! that has no backend or a backend the policy's own rows deny, or decide a ClusterIP
//! on the backends of the other family (neither more nor less than kube-proxy does).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::identities::IdentityKey;
use super::node_ports::Claimant;
use super::policies::PolicyState;
use super::{Engine, ObjectKey, key_of};
use crate::policy::rule::parse_protocol;
use crate::tables::{Direction, IdentityId, NodePort, PolicyEntry, PolicyId};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ServicePort {
    pub(super) name: String,
    pub(super) protocol: u8,
    pub(super) port: u16,
}

impl ServicePort {
    /// A Service or EndpointSlice port as the engine keeps it; `None` when the
    /// protocol is unknown or the port is missing or out of range.
    fn new(name: Option<&String>, protocol: Option<&str>, port: Option<i32>) -> Option<Self> {
        Some(Self {
            name: name.cloned().unwrap_or_default(),
            protocol: parse_protocol(protocol)?,
            port: u16::try_from(port?).ok()?,
        })
    }
}

/// The address family of a ClusterIP or a backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// What a family's Service identity is derived from: the IPv4 one keeps the
    /// seed a Service's single identity had.
    fn seed(self) -> &'static str {
        match self {
            Family::V4 => "service",
            Family::V6 => "service-ipv6",
        }
    }
}

/// A service port the node also exposes on `node_port` of each of its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceNodePort {
    pub(super) port: ServicePort,
    pub(super) node_port: u16,
    /// `spec.ports[i].nodePort`.
    pub(super) field: String,
}

#[derive(Debug)]
pub(super) struct ServiceState {
    /// One identity per family of its ClusterIPs (none when it has none): the
    /// ClusterIPs of a family are decided on that family's backends only, as
    /// kube-proxy DNATs them.
    pub(super) identities: BTreeMap<Family, IdentityId>,
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
    /// Its own identity for egress to a node port (not its ClusterIP identity: rows of
    /// one must never allow the other); present iff `node_ports` is not empty.
    pub(super) node_port_identity: Option<IdentityId>,
    pub(super) node_ports: Vec<ServiceNodePort>,
}

impl ServiceState {
    /// The identity ClusterIP `ip` maps to: its family's.
    pub(super) fn identity_of(&self, ip: IpAddr) -> Option<IdentityId> {
        self.identities.get(&Family::of(ip)).copied()
    }

    /// Every identity of the Service: its ClusterIP identities and its node-port one.
    pub(super) fn all_identities(&self) -> impl Iterator<Item = IdentityId> + '_ {
        self.identities
            .values()
            .copied()
            .chain(self.node_port_identity)
    }
}

#[derive(Debug)]
pub(super) struct SliceState {
    pub(super) service: ObjectKey,
    pub(super) ports: Vec<ServicePort>,
    pub(super) addresses: Vec<IpAddr>,
}

impl Engine {
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
            .filter_map(|p| ServicePort::new(p.name.as_ref(), p.protocol.as_deref(), Some(p.port)))
            .collect();
        ports.sort();
        // kube-proxy opens node ports for these types only (ClusterIP and
        // ExternalName Services cannot have one).
        let exposed = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let node_ports: Vec<ServiceNodePort> = spec
            .ports
            .iter()
            .flatten()
            .enumerate()
            .filter(|_| exposed)
            .filter_map(|(i, p)| {
                Some(ServiceNodePort {
                    node_port: u16::try_from(p.node_port?).ok().filter(|n| *n > 0)?,
                    port: ServicePort::new(p.name.as_ref(), p.protocol.as_deref(), Some(p.port))?,
                    field: format!("spec.ports[{i}].nodePort"),
                })
            })
            .collect();
        let (mut old_identities, old_ips, old_np) = match self.objects.remove_service(&key) {
            Some(old) => (old.identities, old.cluster_ips, old.node_port_identity),
            None => (BTreeMap::new(), Vec::new(), None),
        };
        let families: BTreeSet<Family> = ips.iter().map(|ip| Family::of(*ip)).collect();
        let identities: BTreeMap<Family, IdentityId> = families
            .into_iter()
            .map(|family| {
                let id = old_identities.remove(&family).unwrap_or_else(|| {
                    self.identities
                        .allocate(super::ids::stable_hash(family.seed(), &key))
                });
                (family, id)
            })
            .collect();
        let node_port_identity = match (node_ports.is_empty(), old_np) {
            (true, _) => None,
            (false, Some(id)) => Some(id),
            (false, None) => Some(
                self.identities
                    .allocate(super::ids::stable_hash("service-nodeport", &key)),
            ),
        };
        let mut claims: BTreeMap<NodePort, Vec<String>> = BTreeMap::new();
        for np in &node_ports {
            let port = NodePort {
                protocol: np.port.protocol,
                port: np.node_port,
            };
            claims.entry(port).or_default().push(np.field.clone());
        }
        self.objects.insert_service(
            key.clone(),
            ServiceState {
                identities,
                cluster_ips: ips.clone(),
                ports,
                node_port_identity,
                node_ports,
            },
        );
        for ip in old_ips.iter().chain(&ips) {
            self.refresh_address(*ip);
            self.refresh_cidr(host_net(*ip));
        }
        self.set_node_port_claims(&Claimant::Service(key.clone()), claims);
        // A family the Service no longer has a ClusterIP of.
        for old in old_identities.into_values() {
            self.purge_identity(old);
        }
        if node_port_identity.is_none()
            && let Some(old) = old_np
        {
            self.purge_identity(old);
        }
        self.dirty.service(key);
        self.flush();
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.objects.remove_service(&key) {
            for ip in &old.cluster_ips {
                self.refresh_address(*ip);
                self.refresh_cidr(host_net(*ip));
            }
            self.set_node_port_claims(&Claimant::Service(key), BTreeMap::new());
            for id in old.all_identities() {
                self.purge_identity(id);
            }
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
            .filter_map(|p| ServicePort::new(p.name.as_ref(), p.protocol.as_deref(), p.port))
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
            self.backends_moved(&addresses);
            self.dirty.service(service.clone());
            self.objects.insert_slice(
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
        let Some(old) = self.objects.remove_slice(key) else {
            return;
        };
        self.backends_moved(&old.addresses);
        self.dirty.service(old.service);
    }

    /// Pods at these addresses gained or lost a Service: `ServiceBackends` peers change.
    fn backends_moved(&mut self, addresses: &[IpAddr]) {
        for ip in addresses {
            for key in self.objects.pods_at(ip) {
                if let Some(id) = self.objects.pod(key).and_then(|p| p.identity) {
                    self.dirty.identity(id);
                    self.dirty.rekey(key.clone());
                }
            }
        }
    }

    /// What a pod under the CNI guard may query on port 53: the DNS Service's
    /// ClusterIPs and endpoint addresses and the node-local DNS cache's addresses
    /// (`--dns-mode service`), any address (`anywhere`: the flag), or nothing
    /// (`off`).
    pub fn guard_dns(&self) -> (std::collections::BTreeSet<IpAddr>, bool) {
        let mut addresses = std::collections::BTreeSet::new();
        match self.settings.dns {
            crate::policy::DnsMode::Anywhere => return (addresses, true),
            crate::policy::DnsMode::Off => return (addresses, false),
            crate::policy::DnsMode::Service { .. } => {}
        }
        addresses.extend(self.settings.dns_node_local.iter().copied());
        if let Some(service) = &self.dns_service {
            if let Some(state) = self.objects.service(service) {
                addresses.extend(state.cluster_ips.iter().copied());
            }
            for slice in self.objects.slices_of(service) {
                addresses.extend(slice.addresses.iter().copied());
            }
        }
        (addresses, false)
    }

    pub(super) fn is_dns_backend(&self, ips: &[IpAddr]) -> bool {
        self.dns_service
            .as_ref()
            .is_some_and(|svc| ips.iter().any(|ip| self.objects.is_backend_of(ip, svc)))
    }

    /// Moves a pod to the identity its DNS-backend bit now calls for.
    pub(super) fn rekey_pod(&mut self, key: &ObjectKey) {
        let Some(pod) = self.objects.pod(key) else {
            return;
        };
        let Some(old) = pod.identity else {
            return;
        };
        // A hostNetwork pod's addresses are its node's: never a Service-backend peer.
        let dns_backend = !pod.host_network && self.is_dns_backend(&pod.ips);
        if self
            .identities
            .pod(old)
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
        self.objects.set_pod_identity(key, new);
        self.leave_identity(old, key);
        let mut host_ports = BTreeSet::new();
        for ip in ips {
            self.refresh_address(ip);
            self.dirty
                .services(self.objects.backend_services(&ip).cloned());
            self.host_ports_at(ip, &mut host_ports);
        }
        self.dirty.host_ports(host_ports);
    }

    /// `(backend address, protocol, target port)` of one service port.
    pub(super) fn backends(
        &self,
        service: &ObjectKey,
        port: &ServicePort,
    ) -> Vec<(IpAddr, u8, u16)> {
        let mut out = Vec::new();
        for slice in self.objects.slices_of(service) {
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

    /// [`Engine::backends`] of one family: where kube-proxy DNATs that family's
    /// ClusterIPs (a dual-stack pod backend counts by its address of that family).
    pub(super) fn backends_of_family(
        &self,
        service: &ObjectKey,
        port: &ServicePort,
        family: Family,
    ) -> Vec<(IpAddr, u8, u16)> {
        let mut out = self.backends(service, port);
        out.retain(|(ip, _, _)| Family::of(*ip) == family);
        out
    }

    /// Whether `policy`'s current rows let its pods open `protocol`/`port` to `ip`.
    fn egress_allows(&self, policy: &PolicyState, ip: IpAddr, protocol: u8, port: u16) -> bool {
        if self.node_addresses.contains(&ip) {
            return self.node_listeners_allow(policy, ip, protocol, port);
        }
        let exact = self.out.tables.addresses.get(&ip).copied();
        let cidr = self.identities.longest_prefix(ip);
        [exact, cidr]
            .into_iter()
            .flatten()
            .any(|id| policy.allows(id, Direction::Egress, protocol, port))
    }

    /// Egress to this node's address `ip` on `protocol`/`port`, landing on whatever
    /// listens there: the node's own processes (allowed), or a hostNetwork pod of
    /// this node that declares the port (a `containerPort`, which for hostNetwork is
    /// the port it binds on every node address), allowed by its identity's rows or an
    /// ipBlock covering `ip`. Every such pod must be allowed (fail closed).
    fn node_listeners_allow(
        &self,
        policy: &PolicyState,
        ip: IpAddr,
        protocol: u8,
        port: u16,
    ) -> bool {
        let cidr = self.identities.longest_prefix(ip);
        self.node_listeners(protocol, port).all(|listener| {
            [Some(listener), cidr]
                .into_iter()
                .flatten()
                .any(|id| policy.allows(id, Direction::Egress, protocol, port))
        })
    }

    /// The identities of this node's hostNetwork pods that declare `protocol`/`port`.
    pub(super) fn node_listeners(
        &self,
        protocol: u8,
        port: u16,
    ) -> impl Iterator<Item = IdentityId> + '_ {
        self.objects
            .local_host_network()
            .map(|(_, pod)| pod)
            .filter(move |pod| pod.listen_ports.contains(&(protocol, port)))
            .filter_map(|pod| pod.identity)
    }

    /// Whether every backend is allowed, and there is one.
    pub(super) fn all_egress_allowed(
        &self,
        policy: &PolicyState,
        backends: &[(IpAddr, u8, u16)],
    ) -> bool {
        !backends.is_empty()
            && backends
                .iter()
                .all(|(ip, proto, target)| self.egress_allows(policy, *ip, *proto, *target))
    }

    /// Rows for a Service's ClusterIP identities and its node-port identity: a
    /// service port is allowed on a family's ClusterIPs iff every backend of that
    /// family is allowed (fail-closed when backends disagree); a node port iff every
    /// backend is, and only while the Service alone claims it.
    pub(super) fn refresh_service_rows(&mut self, policy: PolicyId, service: &ObjectKey) {
        let Some(svc) = self.objects.service(service) else {
            return;
        };
        let np_id = svc.node_port_identity;
        let mut rows: BTreeMap<IdentityId, Vec<PolicyEntry>> = svc
            .identities
            .values()
            .map(|id| (*id, Vec::new()))
            .collect();
        let mut np_rows = Vec::new();
        if let Some(state) = self.policies.get(policy)
            && state.spec().isolate_egress
        {
            for (family, sid) in &svc.identities {
                let family_rows = rows.entry(*sid).or_default();
                for port in &svc.ports {
                    let backends = self.backends_of_family(service, port, *family);
                    if self.all_egress_allowed(state, &backends) {
                        family_rows.extend(PolicyEntry::for_port_range(
                            policy,
                            Direction::Egress,
                            *sid,
                            port.protocol,
                            port.port,
                            port.port,
                        ));
                    }
                }
            }
            if let Some(np_id) = np_id {
                // Entries that share a node port must all be allowed.
                let mut by_port: BTreeMap<NodePort, bool> = BTreeMap::new();
                for np in &svc.node_ports {
                    let port = NodePort {
                        protocol: np.port.protocol,
                        port: np.node_port,
                    };
                    let allowed = self.all_egress_allowed(state, &self.backends(service, &np.port));
                    *by_port.entry(port).or_insert(true) &= allowed;
                }
                let claimant = Claimant::Service(service.clone());
                for (port, allowed) in by_port {
                    if allowed && self.owns_node_port(port, &claimant) {
                        np_rows.extend(PolicyEntry::for_port_range(
                            policy,
                            Direction::Egress,
                            np_id,
                            port.protocol,
                            port.port,
                            port.port,
                        ));
                    }
                }
            }
        }
        for (sid, mut rows) in rows {
            rows.sort();
            rows.dedup();
            self.policies.replace_rows(policy, sid, rows, &mut self.out);
        }
        if let Some(np_id) = np_id {
            np_rows.sort();
            np_rows.dedup();
            self.policies
                .replace_rows(policy, np_id, np_rows, &mut self.out);
        }
    }

    /// Services with a backend on one of this node's addresses (whose rows follow the
    /// hostNetwork pods of this node).
    pub(super) fn services_at_node(&self, out: &mut BTreeSet<ObjectKey>) {
        for ip in &self.node_addresses {
            out.extend(self.objects.backend_services(ip).cloned());
        }
    }

    pub(super) fn services_behind(&self, id: IdentityId, out: &mut BTreeSet<ObjectKey>) {
        if let Some(identity) = self.identities.pod(id) {
            if identity
                .members
                .iter()
                .any(|m| self.objects.is_local_host_network(m))
            {
                self.services_at_node(out);
            }
            for key in &identity.members {
                for ip in self.objects.pod(key).into_iter().flat_map(|p| p.ips.iter()) {
                    out.extend(self.objects.backend_services(ip).cloned());
                }
            }
        } else if let Some(net) = self.identities.prefix_of(id) {
            self.services_in(*net, out);
        }
    }

    pub(super) fn services_in(&self, net: IpNet, out: &mut BTreeSet<ObjectKey>) {
        self.objects.services_backed_in(net, out);
    }

    /// Policies whose rows for `service` may change: those that hold rows for it (or
    /// its node-port identity) or for any backend's identities (a port is only allowed
    /// if every backend is); with a backend on this node's address, where the node
    /// needs no row, every egress-isolating policy.
    pub(super) fn policies_for_service(&self, service: &ObjectKey, out: &mut BTreeSet<PolicyId>) {
        if let Some(svc) = self.objects.service(service) {
            for id in svc.all_identities() {
                out.extend(self.policies.row_owners(id));
            }
        }
        let mut node_backend = false;
        for slice in self.objects.slices_of(service) {
            for ip in &slice.addresses {
                node_backend |= self.node_addresses.contains(ip);
                let ids = [
                    self.out.tables.addresses.get(ip).copied(),
                    self.identities.longest_prefix(*ip),
                ];
                for id in ids.into_iter().flatten() {
                    out.extend(self.policies.row_owners(id));
                }
            }
        }
        if node_backend {
            out.extend(
                self.policies
                    .iter()
                    .filter(|(_, p)| p.spec().isolate_egress)
                    .map(|(id, _)| id),
            );
        }
    }
}
