//! Local endpoints and their policies: the policy spec each local pod's RayCluster
//! and NetworkPolicies give it, interning equal specs into one policy, editing a
//! policy in place when only its endpoint uses it, releasing it, and giving policies
//! back the ids pinned maps show after a restart (see [`super::policies`]).
//!
//! Must not: compute rows (a new policy's rows are computed by `flush`), or reuse a
//! policy or endpoint id.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::endpoints::LocalEndpoint;
use super::identities::PodIdentity;
use super::pods::PodState;
use super::policies::Respec;
use super::spec::{PolicySpec, changed_rules};
use super::{Engine, ObjectKey};
use crate::policy::problem::{Problem, Severity};
use crate::policy::raycluster::{LABEL_CLUSTER, LABEL_GROUP, LABEL_NODE_TYPE};
use crate::policy::rule::{Role, Rule};
use crate::tables::{Direction, EndpointId, EndpointPolicy, PolicyId};

impl Engine {
    /// What the pinned maps hold after a restart: each endpoint's policy id. Call
    /// before the first compile, and [`Engine::take_pinned_policy_ids`] before that
    /// compile is applied.
    pub fn adopt_policy_ids(&mut self, pinned: impl IntoIterator<Item = (EndpointId, PolicyId)>) {
        self.policies.adopt(pinned);
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
        let mut users: HashMap<PolicyId, Vec<EndpointId>> = HashMap::new();
        for (_, ep) in self.endpoints.iter() {
            users.entry(ep.policy).or_default().push(ep.id);
        }
        let endpoints = &self.endpoints;
        let moves =
            self.policies
                .take_pinned(users, |ep| endpoints.key_of(ep).is_some(), &mut self.out);
        for &(from, to) in &moves {
            self.endpoints.repoint(from, to, &mut self.out);
        }
        moves.len()
    }
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
            (Some(cluster), Some(_)) => self.objects.cluster(&(key.0.clone(), cluster.clone())),
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
            for np in self.objects.netpols_in(&key.0) {
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
        let Some(pod) = self.objects.pod(key).filter(|p| p.is_endpoint()) else {
            if let Some(ep) = self.endpoints.remove(key) {
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
            .and_then(|id| self.policies.get(id))
            .is_some_and(|state| *state.spec() == spec);
        let respecced = match current {
            Some(id) if unchanged => Ok(id),
            Some(id) => self.respec_policy(id, spec, new_policies),
            None => Err(spec),
        };
        // From the UID: the pod keeps its id across agent restarts.
        let id = self.endpoints.id_for(key, &uid);
        // In place, the endpoint keeps its reference; interned, it took a new one.
        let (policy, in_place) = match respecced {
            Ok(policy) => (policy, true),
            Err(spec) => (self.intern_policy(spec, new_policies), false),
        };
        let endpoint = LocalEndpoint {
            id,
            uid,
            policy,
            cluster,
            role,
            problems,
        };
        if let Some(old) = self.endpoints.set(key, endpoint)
            && !in_place
        {
            self.release_policy(old);
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
    /// and the policy keeps its id, so its other rows stay as they are in the kernel
    /// too (a one-rule edit of a 10,000-rule RayCluster costs about one rule's
    /// matching and one rule's map writes). Returns the id, or hands `spec` back for
    /// [`Engine::intern_policy`].
    fn respec_policy(
        &mut self,
        id: PolicyId,
        spec: PolicySpec,
        new_policies: &mut BTreeSet<PolicyId>,
    ) -> Result<PolicyId, PolicySpec> {
        if !self.policies.can_respec(id, &spec) {
            return Err(spec);
        }
        let Some(old) = self.policies.get(id).map(|state| state.spec()) else {
            return Err(spec);
        };
        let peers = if old.same_but_rules(&spec) {
            let changed = changed_rules(old, &spec);
            self.candidates_of(changed.iter().map(|rule| &**rule))
        } else {
            BTreeSet::new()
        };
        let (respec, old_prefixes) = self.policies.respec(id, spec, &mut self.out)?;
        let prefixes = self
            .policies
            .get(id)
            .map(|state| state.prefixes().to_vec())
            .unwrap_or_default();
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
        match respec {
            Respec::Rules => self.dirty.pairs(id, peers),
            Respec::Everything => {
                new_policies.insert(id);
            }
        }
        Ok(id)
    }

    fn intern_policy(
        &mut self,
        spec: PolicySpec,
        new_policies: &mut BTreeSet<PolicyId>,
    ) -> PolicyId {
        let (id, created) = self.policies.intern(spec);
        if created {
            let prefixes = self
                .policies
                .get(id)
                .map(|state| state.prefixes().to_vec())
                .unwrap_or_default();
            for net in prefixes {
                self.add_prefix(net);
            }
            new_policies.insert(id);
        }
        id
    }

    fn release_policy(&mut self, id: PolicyId) {
        for net in self.policies.release(id, &mut self.out) {
            self.remove_prefix(net);
        }
    }

    /// Named egress ports that the pods a rule selects do not have (with that
    /// protocol). Computed on demand: such rules are rare and the answer depends on
    /// every peer pod.
    pub(super) fn egress_named_port_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (_, state) in self.policies.iter() {
            for rule in &state.spec().egress {
                if rule.named_ports().next().is_none() || !seen.insert(Arc::as_ptr(rule)) {
                    continue;
                }
                let selected: Vec<&PodIdentity> = self
                    .identities
                    .pods()
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
