//! `explain`: why a flow of a local pod gets its verdict, from the same rows and
//! identities the tables hold.
//!
//! Also who an address belongs to, a pod's addresses and a Service's backends: what
//! flow events and the flow-level explanation (`crate::explain`) need to name the
//! ends of a flow.
//!
//! Must not: change state, or reach a verdict the tables would not.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Engine, Explanation, ObjectKey};
use crate::tables::{Direction, EndpointId, identity};

impl Engine {
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

/// What the engine knows an address to be, for flow events and `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressOwner {
    /// One of this node's own addresses.
    Node,
    /// A pod's IP: `(namespace, name)` and its `ray.io/cluster`.
    Pod {
        pod: ObjectKey,
        raycluster: Option<String>,
    },
    /// A Service ClusterIP.
    Service(ObjectKey),
    /// In an ipBlock prefix some policy names (the longest one).
    Cidr(IpNet),
    /// Nothing the policy names.
    World,
}

/// A pod as the engine knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub ips: Vec<IpAddr>,
    /// Scheduled on this node (an endpoint if rayfence isolates it here).
    pub local: bool,
    pub raycluster: Option<String>,
}

impl Engine {
    /// Who `ip` belongs to (the first pod by name when several claim it).
    pub fn address_owner(&self, ip: IpAddr) -> AddressOwner {
        if self.node_addresses.contains(&ip) {
            return AddressOwner::Node;
        }
        if let Some(service) = self.cluster_ips.get(&ip) {
            return AddressOwner::Service(service.clone());
        }
        if let Some(key) = self.addr_pods.get(&ip).and_then(|keys| keys.first()) {
            return AddressOwner::Pod {
                pod: key.clone(),
                raycluster: self.pods.get(key).and_then(pod_cluster),
            };
        }
        match self
            .longest_prefix(ip)
            .and_then(|id| self.prefix_by_id.get(&id))
        {
            Some(net) => AddressOwner::Cidr(*net),
            None => AddressOwner::World,
        }
    }

    /// A pod's addresses and whether it is scheduled here.
    pub fn pod_facts(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let pod = self.pods.get(&(namespace.to_owned(), name.to_owned()))?;
        Some(PodFacts {
            ips: pod.ips.clone(),
            local: pod.local,
            raycluster: pod_cluster(pod),
        })
    }

    /// Where a Service's `protocol`/`port` leads: `(backend IP, protocol, target port)`.
    pub fn service_backends(
        &self,
        service: &ObjectKey,
        protocol: u8,
        port: u16,
    ) -> Vec<(IpAddr, u8, u16)> {
        let Some(svc) = self.services.get(service) else {
            return Vec::new();
        };
        let mut out: Vec<(IpAddr, u8, u16)> = svc
            .ports
            .iter()
            .filter(|p| p.protocol == protocol && p.port == port)
            .flat_map(|p| self.backends(service, p))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The local endpoint that owns `ip`, if any.
    pub fn endpoint_at(&self, ip: IpAddr) -> Option<EndpointId> {
        self.addr_pods
            .get(&ip)
            .into_iter()
            .flatten()
            .find_map(|key| self.endpoints.get(key).map(|ep| ep.id))
    }
}

fn pod_cluster(pod: &super::PodState) -> Option<String> {
    pod.labels
        .get(crate::policy::raycluster::LABEL_CLUSTER)
        .cloned()
}
