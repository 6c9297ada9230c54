//! Ports the node DNATs elsewhere on its own addresses (docs/semantics.md "What counts as the node"): a Service's
//! `nodePort` (type NodePort or LoadBalancer) and a local pod's `hostPort` (the CNI
//! portmap plugin). Who claims each port, the identity `Tables::node_ports` maps it
//! to, two claims of one port, and the post-DNAT rows of a local pod's host-port
//! identity. (A Service's node-port rows are written with its ClusterIP rows, in
//! `services`: they have the same backends and the same triggers.)
//!
//! Must not: leave a claimed port out of `Tables::node_ports` (egress to it would pass
//! as the node), or give rows for a port two objects claim: it maps to a conflict
//! identity that never has rows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Engine, ObjectKey};
use crate::policy::problem::{ObjectRef, Problem, Severity};
use crate::tables::{Direction, IdentityId, NodePort, PolicyEntry, PolicyId, protocol};

/// An object that makes the node DNAT a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Claimant {
    /// A Service with a `nodePort` (its node-port identity).
    Service(ObjectKey),
    /// A local pod with a `hostPort` (its host-port identity).
    Pod(ObjectKey),
}

impl Claimant {
    fn object(&self) -> ObjectRef {
        match self {
            Claimant::Service((ns, name)) => ObjectRef::new("Service", ns, name),
            Claimant::Pod((ns, name)) => ObjectRef::new("Pod", ns, name),
        }
    }
}

/// A `hostPort` of a local pod: the node DNATs `protocol`/`host_port` on its
/// addresses to the pod's `container_port` (whatever `hostIP` says: a port claimed on
/// one address is decided by the pod on all of them, which never loosens anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HostPort {
    pub(super) protocol: u8,
    pub(super) host_port: u16,
    pub(super) container_port: u16,
    /// `spec.containers[i].ports[j].hostPort`.
    pub(super) field: String,
}

/// Who a node port leads to, for `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortOwner {
    /// A Service's `nodePort`: its backends.
    Service(ObjectKey),
    /// A local pod's `hostPort`: that pod.
    HostPort(ObjectKey),
    /// Claimed by several objects: no egress to it is allowed.
    Conflict(Vec<ObjectRef>),
}

/// `TCP`, `UDP`, `SCTP`: how Kubernetes objects spell the protocol.
fn protocol_name(number: u8) -> String {
    match number {
        protocol::TCP => "TCP".into(),
        protocol::UDP => "UDP".into(),
        protocol::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

impl Engine {
    /// Replaces the ports `claimant` claims (each with the fields that claim it) and
    /// updates what those ports map to. Its identity must already be in its state.
    pub(super) fn set_node_port_claims(
        &mut self,
        claimant: &Claimant,
        claims: BTreeMap<NodePort, Vec<String>>,
    ) {
        let Some(touched) = self.objects.set_node_port_claims(claimant, claims) else {
            return;
        };
        // Its rows lose or gain ports, whatever happens to the others.
        self.mark_claimant(claimant);
        for port in touched {
            self.refresh_node_port(port);
        }
    }

    /// Maps `port` to its one claimant's identity, to the port's conflict identity
    /// (no rows) when several claim it, or to nothing.
    fn refresh_node_port(&mut self, port: NodePort) {
        let claimants: Vec<Claimant> = self
            .objects
            .node_port_claims(&port)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let single = match claimants.as_slice() {
            [only] => self.claimant_identity(only),
            _ => None,
        };
        let value = match (claimants.is_empty(), single) {
            (true, _) => None,
            (false, Some(id)) => Some(id),
            // Several claimants (or, defensively, one without an identity): fail closed.
            (false, None) => Some(self.identities.node_port_conflict(port)),
        };
        if let Some(id) = self.identities.drop_node_port_conflict(port, value) {
            self.policies.purge_rows(id, &mut self.out);
        }
        // Whether each claimant owns the port alone may have flipped.
        for claimant in &claimants {
            self.mark_claimant(claimant);
        }
        self.out.set_node_port(port, value);
    }

    fn claimant_identity(&self, claimant: &Claimant) -> Option<IdentityId> {
        match claimant {
            Claimant::Service(key) => self.objects.service(key)?.node_port_identity,
            Claimant::Pod(key) => self.objects.pod(key)?.host_port_identity,
        }
    }

    fn mark_claimant(&mut self, claimant: &Claimant) {
        match claimant {
            Claimant::Service(key) => self.dirty.service(key.clone()),
            Claimant::Pod(key) => self.dirty.host_port(key.clone()),
        }
    }

    /// Whether `claimant` is the only object claiming `port` (only then does its
    /// identity get rows for it).
    pub(super) fn owns_node_port(&self, port: NodePort, claimant: &Claimant) -> bool {
        self.objects
            .node_port_claims(&port)
            .is_some_and(|m| m.len() == 1 && m.contains_key(claimant))
    }

    /// One warning per claiming field of every port several objects claim, naming the
    /// others.
    pub(super) fn node_port_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (port, claims) in self.objects.all_node_port_claims() {
            if claims.len() < 2 {
                continue;
            }
            for (claimant, fields) in claims {
                let others: Vec<String> = claims
                    .iter()
                    .filter(|(other, _)| *other != claimant)
                    .map(|(other, fields)| format!("{} {}", other.object(), fields.join(", ")))
                    .collect();
                for field in fields {
                    out.push(Problem {
                        object: claimant.object(),
                        field: field.clone(),
                        value: port.port.to_string(),
                        message: format!(
                            "{} port {} of this node is also claimed by {}; egress to the node on it is denied until only one claims it",
                            protocol_name(port.protocol),
                            port.port,
                            others.join(" and ")
                        ),
                        severity: Severity::Warning,
                    });
                }
            }
        }
        out
    }

    /// Rows for a local pod's host-port identity: a host port is allowed iff egress to
    /// the pod (each of its addresses) on the container port it leads to is.
    pub(super) fn refresh_host_port_rows(&mut self, policy: PolicyId, key: &ObjectKey) {
        let Some(pod) = self.objects.pod(key) else {
            return;
        };
        let Some(hp) = pod.host_port_identity else {
            return;
        };
        let claimant = Claimant::Pod(key.clone());
        let mut rows = Vec::new();
        if let Some(state) = self.policies.get(policy)
            && state.spec().isolate_egress
        {
            let mut ports: BTreeMap<NodePort, Vec<(IpAddr, u8, u16)>> = BTreeMap::new();
            for mapping in &pod.host_ports {
                let port = NodePort {
                    protocol: mapping.protocol,
                    port: mapping.host_port,
                };
                ports.entry(port).or_default().extend(
                    pod.ips
                        .iter()
                        .map(|ip| (*ip, mapping.protocol, mapping.container_port)),
                );
            }
            for (port, backends) in ports {
                if self.owns_node_port(port, &claimant) && self.all_egress_allowed(state, &backends)
                {
                    rows.extend(PolicyEntry::for_port_range(
                        policy,
                        Direction::Egress,
                        hp,
                        port.protocol,
                        port.port,
                        port.port,
                    ));
                }
            }
        }
        rows.sort();
        rows.dedup();
        self.policies.replace_rows(policy, hp, rows, &mut self.out);
    }

    /// Host-port pods whose rows may follow `id`'s rows (their pod or CIDR identity).
    pub(super) fn host_ports_behind(&self, id: IdentityId, out: &mut BTreeSet<ObjectKey>) {
        if let Some(net) = self.identities.prefix_of(id) {
            self.host_ports_in(*net, out);
            return;
        }
        out.extend(
            self.objects
                .host_port_pods()
                .filter(|(_, p)| p.identity == Some(id))
                .map(|(k, _)| k.clone()),
        );
    }

    /// Host-port pods with an address in `net`.
    pub(super) fn host_ports_in(&self, net: IpNet, out: &mut BTreeSet<ObjectKey>) {
        out.extend(
            self.objects
                .host_port_pods()
                .filter(|(_, p)| p.ips.iter().any(|ip| net.contains(ip)))
                .map(|(k, _)| k.clone()),
        );
    }

    /// Host-port pods at `ip` (whose address identity may have changed).
    pub(super) fn host_ports_at(&self, ip: IpAddr, out: &mut BTreeSet<ObjectKey>) {
        out.extend(
            self.objects
                .host_port_pods()
                .filter(|(_, p)| p.ips.contains(&ip))
                .map(|(k, _)| k.clone()),
        );
    }

    /// Policies whose rows for a host-port pod may change: those that hold rows for
    /// its host-port identity or for any identity of its addresses.
    pub(super) fn policies_for_host_ports(&self, key: &ObjectKey, out: &mut BTreeSet<PolicyId>) {
        let Some(pod) = self.objects.pod(key) else {
            return;
        };
        let mut ids: Vec<IdentityId> = pod.host_port_identity.into_iter().collect();
        if pod.host_network {
            // Its ports lead to itself: its own identity's rows decide them.
            ids.extend(pod.identity);
        }
        for ip in &pod.ips {
            ids.extend(self.out.tables.addresses.get(ip).copied());
            ids.extend(self.identities.longest_prefix(*ip));
        }
        for id in ids {
            out.extend(self.policies.row_owners(id));
        }
    }

    /// Who `protocol`/`port` on this node's addresses leads to, if the node DNATs it.
    pub fn node_port_owner(&self, protocol: u8, port: u16) -> Option<NodePortOwner> {
        let claims = self
            .objects
            .node_port_claims(&NodePort { protocol, port })?;
        Some(match claims.keys().collect::<Vec<_>>().as_slice() {
            [Claimant::Service(key)] => NodePortOwner::Service(key.clone()),
            [Claimant::Pod(key)] => NodePortOwner::HostPort(key.clone()),
            all => NodePortOwner::Conflict(all.iter().map(|c| c.object()).collect()),
        })
    }

    /// Where `protocol`/`port` on this node's addresses leads: `(backend IP, protocol,
    /// target port)`, for every claimant (several only in a conflict).
    pub fn node_port_backends(&self, protocol: u8, port: u16) -> Vec<(IpAddr, u8, u16)> {
        let mut out = Vec::new();
        let claims = self.objects.node_port_claims(&NodePort { protocol, port });
        for claimant in claims.into_iter().flat_map(|m| m.keys()) {
            match claimant {
                Claimant::Service(key) => {
                    let Some(svc) = self.objects.service(key) else {
                        continue;
                    };
                    for np in svc
                        .node_ports
                        .iter()
                        .filter(|np| np.port.protocol == protocol && np.node_port == port)
                    {
                        out.extend(self.backends(key, &np.port));
                    }
                }
                Claimant::Pod(key) => {
                    let Some(pod) = self.objects.pod(key) else {
                        continue;
                    };
                    for mapping in pod
                        .host_ports
                        .iter()
                        .filter(|m| m.protocol == protocol && m.host_port == port)
                    {
                        out.extend(
                            pod.ips
                                .iter()
                                .map(|ip| (*ip, mapping.protocol, mapping.container_port)),
                        );
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}
