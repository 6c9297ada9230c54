//! `explain`: why a flow of a local pod gets its verdict, from the same rows and
//! identities the tables hold.
//!
//! Also who an address belongs to, a pod's addresses, a Service's backends and where
//! a node port leads: what flow events and the flow-level explanation
//! (`crate::operator::explain`) need to name the ends of a flow.
//!
//! Must not: change state, or reach a verdict the tables would not
//! ([`crate::tables::Tables::allows`], and `allows_identified` for a peer known by its
//! identity).

use std::net::IpAddr;

use ipnet::IpNet;

use super::pods::PodState;
use super::services::Family;
use super::{Engine, Explanation, ObjectKey};
use crate::tables::{Direction, EndpointId, EndpointPolicy, IdentityId, NodePort, identity};

impl Engine {
    /// Explains the verdict [`Tables::allows`] gives a new flow of a local pod.
    ///
    /// [`Tables::allows`]: crate::tables::Tables::allows
    pub fn explain(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Explanation {
        let ep = match self.isolated(endpoint, direction) {
            Ok(ep) => ep,
            Err(answer) => return answer,
        };
        let exact = self.out.tables.addresses.get(&peer).copied();
        if exact == Some(identity::HOST) {
            return self
                .explain_node_port(endpoint, ep, direction, protocol, port)
                .unwrap_or(Explanation::Host);
        }
        if let Some(service) = self.objects.service_at(&peer) {
            if direction == Direction::Ingress {
                return Explanation::Denied;
            }
            let Some(svc) = self.objects.service(service) else {
                return Explanation::Denied;
            };
            let allowed = self
                .policies
                .get(ep.policy_id)
                .zip(svc.identity_of(peer))
                .is_some_and(|(p, id)| p.allows(id, direction, protocol, port));
            if !allowed {
                return Explanation::Denied;
            }
            let backends = self.cluster_ip_backends(peer, protocol, port);
            return Explanation::AllowedViaService {
                service: service.clone(),
                rules: self.backend_rules(endpoint, &backends),
            };
        }
        self.explain_rows(
            ep,
            direction,
            [exact, self.identities.longest_prefix(peer)],
            protocol,
            port,
        )
    }

    /// Explains the verdict for a peer the datapath knows by its socket's cgroup rather
    /// than by its address `peer` (one of this node's): a hostNetwork pod of this node
    /// with identity `peer_identity` (see [`Engine::host_network_pods`]). Agrees with
    /// [`Tables::allows_identified`].
    ///
    /// [`Tables::allows_identified`]: crate::tables::Tables::allows_identified
    pub fn explain_identified(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        peer_identity: IdentityId,
        protocol: u8,
        port: u16,
    ) -> Explanation {
        let ep = match self.isolated(endpoint, direction) {
            Ok(ep) => ep,
            Err(answer) => return answer,
        };
        if self.out.tables.addresses.get(&peer) == Some(&identity::HOST)
            && let Some(answer) = self.explain_node_port(endpoint, ep, direction, protocol, port)
        {
            return answer;
        }
        let ids = [Some(peer_identity), self.identities.longest_prefix(peer)];
        self.explain_rows(ep, direction, ids, protocol, port)
    }

    /// The endpoint's entry if `direction` is isolated for it, else the answer.
    fn isolated(
        &self,
        endpoint: EndpointId,
        direction: Direction,
    ) -> Result<&EndpointPolicy, Explanation> {
        let Some(ep) = self.out.tables.endpoints.get(&endpoint) else {
            return Err(Explanation::UnknownEndpoint);
        };
        let isolated = match direction {
            Direction::Ingress => ep.isolate_ingress,
            Direction::Egress => ep.isolate_egress,
        };
        if isolated {
            Ok(ep)
        } else {
            Err(Explanation::NotIsolated)
        }
    }

    /// Egress to this node's address on a port the node DNATs: decided on the port's
    /// identity, as `Tables::allows` does. `None` when the port is not one of those.
    fn explain_node_port(
        &self,
        endpoint: EndpointId,
        ep: &EndpointPolicy,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<Explanation> {
        if direction != Direction::Egress {
            return None;
        }
        let id = *self
            .out
            .tables
            .node_ports
            .get(&NodePort { protocol, port })?;
        let allowed = self
            .policies
            .get(ep.policy_id)
            .is_some_and(|p| p.allows(id, direction, protocol, port));
        let owner = self.node_port_owner(protocol, port);
        Some(match owner {
            Some(owner) if allowed => Explanation::AllowedViaNodePort {
                owner,
                rules: self.backend_rules(endpoint, &self.node_port_backends(protocol, port)),
            },
            _ => Explanation::Denied,
        })
    }

    /// Every rule that lets `endpoint` reach these backends (post-DNAT); on this
    /// node's address, the hostNetwork pods there that declare the port.
    fn backend_rules(
        &self,
        endpoint: EndpointId,
        backends: &[(IpAddr, u8, u16)],
    ) -> Vec<(crate::policy::ObjectRef, crate::policy::RuleOrigin)> {
        let mut rules = Vec::new();
        for &(ip, proto, target) in backends {
            let answers: Vec<Explanation> = if self.node_addresses.contains(&ip) {
                // The pods listening there, by their rows (not through the node
                // port they claim: that port's rows are these rows).
                let ep = self.out.tables.endpoints.get(&endpoint);
                self.node_listeners(proto, target)
                    .filter_map(|id| {
                        let ids = [Some(id), self.identities.longest_prefix(ip)];
                        Some(self.explain_rows(ep?, Direction::Egress, ids, proto, target))
                    })
                    .collect()
            } else {
                vec![self.explain(endpoint, Direction::Egress, ip, proto, target)]
            };
            for answer in answers {
                if let Explanation::Allowed(r) = answer {
                    rules.extend(r);
                }
            }
        }
        rules.sort();
        rules.dedup();
        rules
    }

    /// The rules whose rows for these peer identities allow the flow.
    fn explain_rows(
        &self,
        ep: &EndpointPolicy,
        direction: Direction,
        ids: [Option<IdentityId>; 2],
        protocol: u8,
        port: u16,
    ) -> Explanation {
        let mut rules = Vec::new();
        for id in ids.into_iter().flatten() {
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
    /// Its addresses (a hostNetwork pod's are its node's).
    pub ips: Vec<IpAddr>,
    /// Scheduled on this node (an endpoint if rayfence isolates it here, unless it is
    /// a hostNetwork pod).
    pub local: bool,
    /// `spec.hostNetwork`: a peer by its own identity, never an endpoint.
    pub host_network: bool,
    pub raycluster: Option<String>,
}

impl Engine {
    /// Who `ip` belongs to (the first pod by name when several claim it).
    pub fn address_owner(&self, ip: IpAddr) -> AddressOwner {
        // As the datapath sees it: a ClusterIP even on a device of the node.
        if let Some(service) = self.objects.service_at(&ip) {
            return AddressOwner::Service(service.clone());
        }
        if self.node_addresses.contains(&ip) {
            return AddressOwner::Node;
        }
        if let Some(key) = self.objects.pods_at(&ip).next() {
            return AddressOwner::Pod {
                pod: key.clone(),
                raycluster: self.objects.pod(key).and_then(pod_cluster),
            };
        }
        match self
            .identities
            .longest_prefix(ip)
            .and_then(|id| self.identities.prefix_of(id))
        {
            Some(net) => AddressOwner::Cidr(*net),
            None => AddressOwner::World,
        }
    }

    /// A pod's addresses and whether it is scheduled here.
    pub fn pod_facts(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let pod = self.objects.pod(&(namespace.to_owned(), name.to_owned()))?;
        Some(PodFacts {
            ips: pod.ips.clone(),
            local: pod.local,
            host_network: pod.host_network,
            raycluster: pod_cluster(pod),
        })
    }

    /// Where `protocol`/`port` of a Service's ClusterIP `cluster_ip` leads: `(backend
    /// IP, protocol, target port)` of the backends of the ClusterIP's family (the
    /// only ones kube-proxy DNATs it to). Empty when `cluster_ip` is no ClusterIP.
    pub fn cluster_ip_backends(
        &self,
        cluster_ip: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Vec<(IpAddr, u8, u16)> {
        let Some(service) = self.objects.service_at(&cluster_ip) else {
            return Vec::new();
        };
        let Some(svc) = self.objects.service(service) else {
            return Vec::new();
        };
        let family = Family::of(cluster_ip);
        let mut out: Vec<(IpAddr, u8, u16)> = svc
            .ports
            .iter()
            .filter(|p| p.protocol == protocol && p.port == port)
            .flat_map(|p| self.backends_of_family(service, p, family))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The local endpoint that owns `ip`, if any.
    pub fn endpoint_at(&self, ip: IpAddr) -> Option<EndpointId> {
        self.objects
            .pods_at(&ip)
            .find_map(|key| self.endpoints.get(key).map(|ep| ep.id))
    }
}

fn pod_cluster(pod: &PodState) -> Option<String> {
    pod.labels
        .get(crate::policy::raycluster::LABEL_CLUSTER)
        .cloned()
}
