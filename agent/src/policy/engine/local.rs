//! Local endpoints: the policy spec each local pod's RayCluster and NetworkPolicies
//! give it, hash-consing of equal specs into one policy id, and the policies' lifetime
//! (index keys, ipBlock prefixes, rows) by reference count.
//!
//! Policy ids: a new policy takes the id its content derives ([`super::ids`]); an
//! edit of a policy only one endpoint uses keeps its id and changes only the rows of
//! the rules that changed (a one-rule edit of a 10,000-rule RayCluster writes one
//! rule's rows to the kernel, not 10,000). So an id is not always its content's, and
//! two orders of arrival may number policies differently: after a restart the agent
//! gives each policy back the id the pinned maps show for its endpoints
//! ([`AdoptedPolicyIds`]), which keeps "a restart renumbers nothing" and never puts
//! a pinned id's rows behind an endpoint that now has another policy.
//!
//! Must not: compute rows (a new policy's rows are computed by `flush`), or reuse a
//! policy or endpoint id.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use super::identities::PodIdentity;
use super::index::{IndexKey, index_keys};
use super::pods::PodState;
use super::rule_index::{RuleIndex, RulePos};
use super::{Engine, NamedPort, ObjectKey, unlink};
use crate::policy::problem::{Problem, Severity};
use crate::policy::raycluster::{LABEL_CLUSTER, LABEL_GROUP, LABEL_NODE_TYPE};
use crate::policy::rule::{Peer, PortSpec, Role, Rule};
use crate::tables::{Direction, EndpointId, EndpointPolicy, IdentityId, PolicyEntry, PolicyId};

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
}

/// Policy ids the pinned maps gave endpoints before a restart (see the module docs).
/// Until the first full program, these ids are reserved: a new policy never takes
/// one, and [`Engine::take_pinned_policy_ids`] moves each policy to the id its
/// endpoints had when that cannot put another pod's rows behind a pinned entry.
#[derive(Debug, Default)]
pub(super) struct AdoptedPolicyIds {
    by_endpoint: HashMap<EndpointId, PolicyId>,
    /// Which pinned endpoints point at each id.
    users: HashMap<PolicyId, Vec<EndpointId>>,
}

impl Engine {
    /// What the pinned maps hold after a restart: each endpoint's policy id. Call
    /// before the first compile, and [`Engine::take_pinned_policy_ids`] before that
    /// compile is applied.
    pub fn adopt_policy_ids(&mut self, pinned: impl IntoIterator<Item = (EndpointId, PolicyId)>) {
        let mut adopted = AdoptedPolicyIds::default();
        for (endpoint, policy) in pinned {
            adopted.by_endpoint.insert(endpoint, policy);
            adopted.users.entry(policy).or_default().push(endpoint);
        }
        self.adopted = adopted;
    }

    /// Gives each policy back the id the pinned maps show for its endpoints, so the
    /// first apply after a restart renumbers nothing, then forgets them. A policy
    /// moves to pinned id `p` only when every endpoint it has pointed at `p` and
    /// every endpoint still here that pointed at `p` has it (else `p`'s rows would
    /// be another pod's policy behind that endpoint's pinned entry until the apply
    /// re-points it). Userspace only: rows move between ids in the engine, and
    /// the apply that follows finds them where the maps have them. Returns how many
    /// policies moved.
    pub fn take_pinned_policy_ids(&mut self) -> usize {
        let adopted = std::mem::take(&mut self.adopted);
        if adopted.by_endpoint.is_empty() {
            return 0;
        }
        let mut users: HashMap<PolicyId, Vec<EndpointId>> = HashMap::new();
        for ep in self.endpoints.values() {
            users.entry(ep.policy).or_default().push(ep.id);
        }
        let mut moved = 0;
        // A move can free the id another policy wants: repeat until nothing moves.
        loop {
            let mut progress = false;
            let mut candidates: Vec<(PolicyId, PolicyId)> = Vec::new();
            for (policy, endpoints) in &users {
                let mut hints = endpoints.iter().map(|ep| adopted.by_endpoint.get(ep));
                let Some(Some(&pinned)) = hints.next() else {
                    continue;
                };
                if pinned == *policy || !hints.all(|h| h == Some(&pinned)) {
                    continue;
                }
                let pinned_users = adopted.users.get(&pinned).map(Vec::as_slice).unwrap_or(&[]);
                let all_here_agree = pinned_users
                    .iter()
                    .all(|ep| !self.endpoint_keys.contains_key(ep) || endpoints.contains(ep));
                if all_here_agree {
                    candidates.push((*policy, pinned));
                }
            }
            candidates.sort_unstable();
            for (from, to) in candidates {
                if self.policies.contains_key(&to) || !self.policies.contains_key(&from) {
                    continue;
                }
                self.move_policy(from, to);
                if let Some(endpoints) = users.remove(&from) {
                    users.insert(to, endpoints);
                }
                moved += 1;
                progress = true;
            }
            if !progress {
                return moved;
            }
        }
    }

    /// Renumbers policy `from` as `to` (free): its rows, index entries and endpoints.
    fn move_policy(&mut self, from: PolicyId, to: PolicyId) {
        let Some(mut state) = self.policies.remove(&from) else {
            return;
        };
        for key in &state.keys {
            unlink(&mut self.index, key, &from);
            self.index.entry(key.clone()).or_default().insert(to);
        }
        for (peer, rows) in state.rows.iter_mut() {
            unlink(&mut self.row_owners, peer, &from);
            self.row_owners.entry(*peer).or_default().insert(to);
            for row in rows.iter_mut() {
                self.out.remove_row(*row);
                row.policy_id = to;
                self.out.add_row(*row);
            }
            rows.sort();
        }
        self.policy_ids.insert(state.spec.clone(), to);
        self.policies.insert(to, state);
        for ep in self.endpoints.values_mut().filter(|ep| ep.policy == from) {
            ep.policy = to;
            if let Some(value) = self.out.tables.endpoints.get(&ep.id).copied() {
                self.out.set_endpoint(
                    ep.id,
                    Some(EndpointPolicy {
                        policy_id: to,
                        ..value
                    }),
                );
            }
        }
    }

    /// The id for a new policy: its content's, past ids in use and pinned ids not
    /// yet given back ([`AdoptedPolicyIds`]).
    fn new_policy_id(&self, spec: &PolicySpec) -> PolicyId {
        let (policies, adopted) = (&self.policies, &self.adopted);
        super::ids::pick(super::ids::stable_hash("policy", spec), 1, |id| {
            policies.contains_key(&id) || adopted.users.contains_key(&id)
        })
    }
}

#[derive(Debug)]
pub(super) struct PolicyState {
    pub(super) spec: Arc<PolicySpec>,
    pub(super) refs: usize,
    /// Rows by peer identity; sorted, never empty.
    pub(super) rows: HashMap<IdentityId, Vec<PolicyEntry>>,
    pub(super) prefixes: Vec<IpNet>,
    pub(super) keys: Vec<IndexKey>,
    /// Which of `spec`'s rules can select a given peer.
    pub(super) rule_index: RuleIndex,
}

#[derive(Debug)]
pub(super) struct LocalEndpoint {
    pub(super) id: EndpointId,
    pub(super) uid: String,
    pub(super) policy: PolicyId,
    pub(super) cluster: Option<String>,
    pub(super) role: Option<Role>,
    pub(super) problems: Vec<Problem>,
}

impl Engine {
    fn spec_for(
        &self,
        key: &ObjectKey,
        pod: &PodState,
    ) -> (PolicySpec, Option<String>, Option<Role>, bool, Vec<Problem>) {
        let labels = &pod.labels;
        let mut ingress: Vec<Arc<Rule>> = Vec::new();
        let mut egress: Vec<Arc<Rule>> = Vec::new();
        let (mut isolate_ingress, mut isolate_egress) = (false, false);
        let cluster = labels.get(LABEL_CLUSTER).cloned();
        let role =
            cluster
                .as_ref()
                .and_then(|_| match labels.get(LABEL_NODE_TYPE).map(String::as_str) {
                    Some("head") => Some(Role::Head),
                    Some("worker") => Some(match labels.get(LABEL_GROUP) {
                        Some(group) => Role::Group(group.clone()),
                        None => Role::Worker,
                    }),
                    _ => None,
                });
        // The pods the RayCluster's policy applies to are the pods its audit switch
        // applies to (their NetworkPolicy rows included: one mode per endpoint).
        let state = match (&cluster, &role) {
            (Some(cluster), Some(_)) => self.clusters.get(&(key.0.clone(), cluster.clone())),
            _ => None,
        };
        let audit = self.settings.audit || state.is_some_and(|c| c.audit);
        if let Some(role) = &role
            && let Some(compiled) = state.and_then(|c| c.compiled.as_ref())
        {
            isolate_ingress |= compiled.mode.isolates(Direction::Ingress);
            isolate_egress |= compiled.mode.isolates(Direction::Egress);
            let rules = compiled.role(role);
            ingress.extend(rules.ingress.iter().cloned());
            egress.extend(rules.egress.iter().cloned());
        }
        if self.settings.enforce_networkpolicies {
            for np in self
                .netpols
                .get(&key.0)
                .into_iter()
                .flat_map(|m| m.values())
            {
                if !np.selector.as_ref().is_some_and(|s| s.matches(labels)) {
                    continue;
                }
                if np.isolate_ingress {
                    isolate_ingress = true;
                    ingress.extend(np.ingress.iter().cloned());
                }
                if np.isolate_egress {
                    isolate_egress = true;
                    egress.extend(np.egress.iter().cloned());
                }
            }
        }
        let mut problems = Vec::new();
        let mut uses_named = false;
        for rule in &ingress {
            for (spec, name) in rule.named_ports() {
                uses_named = true;
                if !pod
                    .named_ports
                    .iter()
                    .any(|p| p.name == name && p.protocol == spec.protocol)
                {
                    problems.push(Problem {
                        object: (*rule.object).clone(),
                        field: format!("{}.ports", rule.field),
                        value: name.to_owned(),
                        message: format!(
                            "named port resolves to no container port of pod {}/{} for this protocol; it allows nothing there",
                            key.0, key.1
                        ),
                        severity: Severity::Warning,
                    });
                }
            }
        }
        let spec = PolicySpec {
            isolate_ingress,
            isolate_egress,
            ingress,
            egress,
            local_ports: if uses_named {
                pod.named_ports.clone()
            } else {
                Arc::default()
            },
        };
        (spec, cluster, role, audit, problems)
    }

    pub(super) fn refresh_endpoint(
        &mut self,
        key: &ObjectKey,
        new_policies: &mut BTreeSet<PolicyId>,
    ) {
        let Some(pod) = self.pods.get(key).filter(|p| p.is_endpoint()) else {
            if let Some(ep) = self.endpoints.remove(key) {
                self.endpoint_keys.remove(&ep.id);
                self.out.set_endpoint(ep.id, None);
                self.release_policy(ep.policy);
            }
            return;
        };
        let uid = pod.uid.clone();
        let (spec, cluster, role, audit, problems) = self.spec_for(key, pod);
        let value = |policy_id| EndpointPolicy {
            policy_id,
            isolate_ingress: spec.isolate_ingress,
            isolate_egress: spec.isolate_egress,
            audit,
        };
        let endpoint_policy = value(0);
        let current = self.endpoints.get(key).map(|ep| ep.policy);
        // Most refreshes find the spec unchanged (its rules are the same `Arc`s, so
        // this is cheap): nothing to intern, hash or release.
        let unchanged = current
            .and_then(|id| self.policies.get(&id))
            .is_some_and(|state| *state.spec == spec);
        let respecced = match current {
            Some(id) if unchanged => Ok(id),
            Some(id) => self.respec_policy(id, spec, new_policies),
            None => Err(spec),
        };
        // From the UID: the pod keeps its id across agent restarts.
        let id = match self.endpoints.get(key) {
            Some(ep) => ep.id,
            None => {
                let seed = if uid.is_empty() {
                    super::ids::stable_hash("endpoint-name", key)
                } else {
                    super::ids::stable_hash("endpoint", uid.as_str())
                };
                let taken = &self.endpoint_keys;
                super::ids::pick(seed, 1, |id| taken.contains_key(&id))
            }
        };
        // In place, the endpoint keeps its reference; interned, it took a new one.
        let (policy, in_place) = match respecced {
            Ok(policy) => (policy, true),
            Err(spec) => (self.intern_policy(spec, new_policies), false),
        };
        match self.endpoints.get_mut(key) {
            Some(ep) => {
                let old = std::mem::replace(&mut ep.policy, policy);
                ep.cluster = cluster;
                ep.role = role;
                ep.problems = problems;
                if !in_place {
                    self.release_policy(old);
                }
            }
            None => {
                self.endpoints.insert(
                    key.clone(),
                    LocalEndpoint {
                        id,
                        uid,
                        policy,
                        cluster,
                        role,
                        problems,
                    },
                );
                self.endpoint_keys.insert(id, key.clone());
            }
        }
        self.out.set_endpoint(
            id,
            Some(EndpointPolicy {
                policy_id: policy,
                ..endpoint_policy
            }),
        );
    }

    /// Gives policy `id` the spec `spec` in place, when only this endpoint uses it and
    /// no other policy has that spec: `flush` then recomputes the rows of the peers the
    /// added and removed rules can select (every peer when more than rules changed),
    /// and the policy keeps its
    /// id, so its other rows stay as they are in the kernel too (a one-rule edit of a
    /// 10,000-rule RayCluster costs about one rule's matching and one rule's map
    /// writes). Returns the id, or hands `spec` back for [`Engine::intern_policy`].
    fn respec_policy(
        &mut self,
        id: PolicyId,
        spec: PolicySpec,
        new_policies: &mut BTreeSet<PolicyId>,
    ) -> Result<PolicyId, PolicySpec> {
        let Some(state) = self.policies.get(&id) else {
            return Err(spec);
        };
        let old = state.spec.clone();
        if state.refs != 1 || self.policy_ids.contains_key(&spec) {
            return Err(spec);
        }
        let rules_only = old.isolate_ingress == spec.isolate_ingress
            && old.isolate_egress == spec.isolate_egress
            && old.local_ports == spec.local_ports;
        let peers = if rules_only {
            let changed = changed_rules(&old, &spec);
            self.candidates_of(changed.iter().map(|rule| &**rule))
        } else {
            BTreeSet::new()
        };
        let prefixes = spec_prefixes(&spec);
        let keys = index_keys(&spec);
        let (old_keys, old_prefixes) = (state.keys.clone(), state.prefixes.clone());
        // New prefixes before old ones go, as everywhere: never a moment with less.
        for net in prefixes
            .iter()
            .filter(|n| old_prefixes.binary_search(n).is_err())
        {
            self.add_prefix(*net);
        }
        for net in old_prefixes
            .iter()
            .filter(|n| prefixes.binary_search(n).is_err())
        {
            self.remove_prefix(*net);
        }
        for key in &old_keys {
            unlink(&mut self.index, key, &id);
        }
        for key in &keys {
            self.index.entry(key.clone()).or_default().insert(id);
        }
        // Still there: checked above, and prefixes going only purge rows.
        let Some(state) = self.policies.get_mut(&id) else {
            return Err(spec);
        };
        state.rule_index = RuleIndex::new(&spec);
        let spec = Arc::new(spec);
        self.policy_ids.remove(&old);
        self.policy_ids.insert(spec.clone(), id);
        state.spec = spec;
        state.keys = keys;
        state.prefixes = prefixes;
        if rules_only {
            self.dirty.pairs.entry(id).or_default().extend(peers);
        } else {
            // Isolation or the pod's named ports changed: any row may differ. The
            // rows are computed afresh, as for a new policy; in the diff, only what
            // differs reaches the maps.
            for (peer, rows) in std::mem::take(&mut state.rows) {
                unlink(&mut self.row_owners, &peer, &id);
                for row in rows {
                    self.out.remove_row(row);
                }
            }
            new_policies.insert(id);
        }
        Ok(id)
    }

    fn intern_policy(
        &mut self,
        spec: PolicySpec,
        new_policies: &mut BTreeSet<PolicyId>,
    ) -> PolicyId {
        if let Some(id) = self.policy_ids.get(&spec) {
            if let Some(state) = self.policies.get_mut(id) {
                state.refs += 1;
            }
            return *id;
        }
        let id = self.new_policy_id(&spec);
        let prefixes = spec_prefixes(&spec);
        for net in &prefixes {
            self.add_prefix(*net);
        }
        let keys = index_keys(&spec);
        for key in &keys {
            self.index.entry(key.clone()).or_default().insert(id);
        }
        let rule_index = RuleIndex::new(&spec);
        let spec = Arc::new(spec);
        self.policy_ids.insert(spec.clone(), id);
        self.policies.insert(
            id,
            PolicyState {
                spec,
                refs: 1,
                rows: HashMap::new(),
                prefixes,
                keys,
                rule_index,
            },
        );
        new_policies.insert(id);
        id
    }

    fn release_policy(&mut self, id: PolicyId) {
        let Some(state) = self.policies.get_mut(&id) else {
            return;
        };
        state.refs -= 1;
        if state.refs > 0 {
            return;
        }
        let Some(state) = self.policies.remove(&id) else {
            return;
        };
        self.policy_ids.remove(&state.spec);
        for key in state.keys {
            unlink(&mut self.index, &key, &id);
        }
        for (peer, rows) in state.rows {
            unlink(&mut self.row_owners, &peer, &id);
            for row in rows {
                self.out.remove_row(row);
            }
        }
        for net in state.prefixes {
            self.remove_prefix(net);
        }
    }

    /// Named egress ports that the pods a rule selects do not have (with that
    /// protocol). Computed on demand: such rules are rare and the answer depends on
    /// every peer pod.
    pub(super) fn egress_named_port_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for state in self.policies.values() {
            for rule in &state.spec.egress {
                if rule.named_ports().next().is_none() || !seen.insert(Arc::as_ptr(rule)) {
                    continue;
                }
                let selected: Vec<&PodIdentity> = self
                    .pod_identities
                    .values()
                    .filter(|i| rule.peers.iter().any(|p| self.peer_matches_pod(p, i)))
                    .collect();
                if selected.is_empty() {
                    continue;
                }
                for (spec, name) in rule.named_ports() {
                    let resolves = selected.iter().any(|i| {
                        i.key
                            .named_ports
                            .iter()
                            .any(|p| p.name == name && p.protocol == spec.protocol)
                    });
                    if !resolves {
                        out.push(Problem {
                            object: (*rule.object).clone(),
                            field: format!("{}.ports", rule.field),
                            value: name.to_owned(),
                            message: "named port resolves to no container port of the selected pods for this protocol; it allows nothing".into(),
                            severity: Severity::Warning,
                        });
                    }
                }
            }
        }
        out
    }
}

/// The ipBlock prefixes (`cidr`s and `except`s) `spec` names, sorted, once each.
fn spec_prefixes(spec: &PolicySpec) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = spec
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

/// The rules of `old` and `new` that the other does not have, by what they allow
/// (direction, peers, ports; not where they are written, which only explain reads).
fn changed_rules(old: &PolicySpec, new: &PolicySpec) -> Vec<Arc<Rule>> {
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
