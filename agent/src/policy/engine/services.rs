//! Services and EndpointSlices: Service identities on ClusterIPs, the backends each
//! slice lists, the DNS-backend bit of pod identities, and the post-DNAT rows of a
//! Service identity (a service port is allowed iff every backend is).
//!
//! Must not: let an ipBlock match a ClusterIP, or allow a service port that has no
//! backend or a backend the policy's own rows deny.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::identities::IdentityKey;
use super::local::PolicyState;
use super::{Engine, ObjectKey, key_of};
use crate::policy::rule::parse_protocol;
use crate::tables::{Direction, IdentityId, PolicyEntry, PolicyId};

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

#[derive(Debug)]
pub(super) struct ServiceState {
    pub(super) identity: IdentityId,
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
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
        let (identity, old_ips) = match self.services.remove(&key) {
            Some(old) => (old.identity, old.cluster_ips),
            None => (
                self.allocate_identity(super::ids::stable_hash("service", &key)),
                Vec::new(),
            ),
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

    pub(super) fn is_dns_backend(&self, ips: &[IpAddr]) -> bool {
        self.dns_service.as_ref().is_some_and(|svc| {
            ips.iter().any(|ip| {
                self.backend_ips
                    .get(ip)
                    .is_some_and(|m| m.contains_key(svc))
            })
        })
    }

    /// Moves a pod to the identity its DNS-backend bit now calls for.
    pub(super) fn rekey_pod(&mut self, key: &ObjectKey) {
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

    /// `(backend address, protocol, target port)` of one service port.
    pub(super) fn backends(
        &self,
        service: &ObjectKey,
        port: &ServicePort,
    ) -> Vec<(IpAddr, u8, u16)> {
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
    pub(super) fn refresh_service_rows(&mut self, policy: PolicyId, service: &ObjectKey) {
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

    pub(super) fn services_behind(&self, id: IdentityId, out: &mut BTreeSet<ObjectKey>) {
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

    pub(super) fn services_in(&self, net: IpNet, out: &mut BTreeSet<ObjectKey>) {
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

    /// Policies whose rows for `service` may change: those that hold rows for it or
    /// for any backend's identities (a port is only allowed if every backend is).
    pub(super) fn policies_for_service(&self, service: &ObjectKey, out: &mut BTreeSet<PolicyId>) {
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
}
