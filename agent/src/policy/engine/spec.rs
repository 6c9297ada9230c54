//! A local pod's policy spec: everything that decides its rows (isolation, the rules
//! of its RayCluster and NetworkPolicies, its named ports), and what follows from a
//! spec alone: its rules by position, the ipBlock prefixes it names, and the rules two
//! specs do not share.
//!
//! Must not: look at any state of the engine; a spec is a value, compared and hashed
//! to share one policy id between equal specs.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::NamedPort;
use crate::policy::rule::{Peer, PortSpec, Rule};
use crate::tables::Direction;

/// A rule's position in [`PolicySpec::rules`] (ingress first, then egress).
pub(super) type RulePos = u32;

/// Everything that decides a local pod's rows: pods with equal specs share a policy id.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct PolicySpec {
    pub(super) isolate_ingress: bool,
    pub(super) isolate_egress: bool,
    pub(super) ingress: Vec<Arc<Rule>>,
    pub(super) egress: Vec<Arc<Rule>>,
    /// The local pod's named ports, only when an ingress rule names a port.
    pub(super) local_ports: Arc<Vec<NamedPort>>,
}

impl PolicySpec {
    pub(super) fn rules(&self) -> impl Iterator<Item = (Direction, &Arc<Rule>)> {
        self.ingress
            .iter()
            .map(|r| (Direction::Ingress, r))
            .chain(self.egress.iter().map(|r| (Direction::Egress, r)))
    }

    /// The rule at `pos` in [`PolicySpec::rules`].
    pub(super) fn rule_at(&self, pos: RulePos) -> Option<(Direction, &Arc<Rule>)> {
        let pos = pos as usize;
        match pos.checked_sub(self.ingress.len()) {
            None => self.ingress.get(pos).map(|r| (Direction::Ingress, r)),
            Some(egress) => self.egress.get(egress).map(|r| (Direction::Egress, r)),
        }
    }

    /// The ipBlock prefixes (`cidr`s and `except`s) the spec names, sorted, once each.
    pub(super) fn prefixes(&self) -> Vec<IpNet> {
        let mut prefixes: Vec<IpNet> = self
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
        prefixes
    }

    /// Whether `other` differs from this spec in its rules only (same isolation, same
    /// local named ports): then only the rows of the changed rules' peers can differ.
    pub(super) fn same_but_rules(&self, other: &PolicySpec) -> bool {
        self.isolate_ingress == other.isolate_ingress
            && self.isolate_egress == other.isolate_egress
            && self.local_ports == other.local_ports
    }
}

/// The rules of `old` and `new` that the other does not have, by what they allow
/// (direction, peers, ports; not where they are written, which only explain reads).
pub(super) fn changed_rules(old: &PolicySpec, new: &PolicySpec) -> Vec<Arc<Rule>> {
    type Effect<'a> = (Direction, &'a [Peer], &'a Option<Vec<PortSpec>>);
    fn effect<'a>((direction, rule): (Direction, &'a Arc<Rule>)) -> Effect<'a> {
        (direction, rule.peers.as_slice(), &rule.ports)
    }
    let mut counts: HashMap<Effect<'_>, isize> = HashMap::new();
    for item in old.rules() {
        *counts.entry(effect(item)).or_default() += 1;
    }
    for item in new.rules() {
        *counts.entry(effect(item)).or_default() -= 1;
    }
    old.rules()
        .chain(new.rules())
        .filter(|&item| counts.get(&effect(item)).is_some_and(|n| *n != 0))
        .map(|(_, rule)| rule.clone())
        .collect()
}
