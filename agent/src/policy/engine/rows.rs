//! Rows: the [`PolicyEntry`] rows a policy's rules give one peer identity (named
//! ports resolved), and which rules give them (for `explain`). Read-only: the rows
//! are stored, and written to the output, by [`super::Policies::replace_rows`].
//!
//! Must not: change state, decide which (policy, identity) pairs to recompute
//! (`index` and `flush` do), or handle Service identities (`services` does).

use std::sync::Arc;

use ipnet::IpNet;

use super::identities::PodIdentity;
use super::{Engine, NamedPort};
use crate::policy::problem::ObjectRef;
use crate::policy::rule::{NamespaceMatch, Peer, PortMatch, Rule, RuleOrigin};
use crate::tables::{Direction, IdentityId, PolicyEntry, PolicyId};

/// A peer identity that rules can give rows to.
pub(super) enum RulePeer<'a> {
    Pod(&'a PodIdentity),
    Prefix(&'a IpNet),
}

impl RulePeer<'_> {
    /// The peer's named ports, on which egress named ports resolve.
    fn named_ports(&self) -> Option<&[NamedPort]> {
        match self {
            RulePeer::Pod(identity) => Some(&identity.key.named_ports),
            RulePeer::Prefix(_) => None,
        }
    }
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
    pub(super) fn peer_matches_pod(&self, peer: &Peer, identity: &PodIdentity) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let ns = &identity.key.namespace;
                let ns_ok = match namespaces {
                    NamespaceMatch::Names(names) => names.contains(ns),
                    NamespaceMatch::Selector(s) => {
                        s.is_everything() || s.matches(&self.ns_labels_ref(ns))
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
                // A hostNetwork pod's addresses are its node's: not a backend peer.
                identity.members.iter().any(|m| {
                    self.objects.pod(m).is_some_and(|p| {
                        !p.host_network
                            && p.ips
                                .iter()
                                .any(|ip| self.objects.is_backend_of(ip, &service))
                    })
                })
            }
        }
    }

    /// `peer` as rules see it: a pod identity or a CIDR identity's prefix (Service and
    /// host identities get no rows from rules).
    pub(super) fn rule_peer(&self, peer: IdentityId) -> Option<RulePeer<'_>> {
        if let Some(identity) = self.identities.pod(peer) {
            Some(RulePeer::Pod(identity))
        } else {
            self.identities.prefix_of(peer).map(RulePeer::Prefix)
        }
    }

    /// Whether one of `rule`'s peers selects `peer`.
    pub(super) fn rule_selects(&self, rule: &Rule, peer: &RulePeer<'_>) -> bool {
        match peer {
            RulePeer::Pod(identity) => rule
                .peers
                .iter()
                .any(|p| self.peer_matches_pod(p, identity)),
            RulePeer::Prefix(net) => rule
                .peers
                .iter()
                .any(|p| matches!(p, Peer::Block(b) if b.covers(net))),
        }
    }

    pub(super) fn compute_rows(&self, policy: PolicyId, peer: IdentityId) -> Vec<PolicyEntry> {
        let mut out = Vec::new();
        let (Some(state), Some(rule_peer)) = (self.policies.get(policy), self.rule_peer(peer))
        else {
            return out;
        };
        let spec = state.spec();
        let positions = match &rule_peer {
            RulePeer::Pod(identity) => state
                .rule_index()
                .for_pod(identity, &self.ns_labels_ref(&identity.key.namespace)),
            RulePeer::Prefix(net) => state.rule_index().for_prefix(net),
        };
        for (direction, rule) in positions.into_iter().filter_map(|p| spec.rule_at(p)) {
            if self.rule_selects(rule, &rule_peer) {
                push_rule_rows(
                    &mut out,
                    policy,
                    direction,
                    peer,
                    rule,
                    rule_peer.named_ports(),
                    &spec.local_ports,
                );
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Which rules allow a flow, for `explain`: (direction, identity) rows per rule.
    pub(super) fn rule_rows(
        &self,
        policy: PolicyId,
        peer: IdentityId,
    ) -> Vec<(RuleOrigin, Arc<ObjectRef>, Vec<PolicyEntry>)> {
        let mut out = Vec::new();
        let (Some(state), Some(rule_peer)) = (self.policies.get(policy), self.rule_peer(peer))
        else {
            return out;
        };
        let spec = state.spec();
        for (direction, rule) in spec.rules() {
            if !self.rule_selects(rule, &rule_peer) {
                continue;
            }
            let mut rows = Vec::new();
            push_rule_rows(
                &mut rows,
                policy,
                direction,
                peer,
                rule,
                rule_peer.named_ports(),
                &spec.local_ports,
            );
            if !rows.is_empty() {
                out.push((rule.origin.clone(), rule.object.clone(), rows));
            }
        }
        out
    }
}
