//! The hash-consed local policies: one [`PolicyState`] per distinct [`PolicySpec`],
//! with its reference count, its rows by peer identity, the [`IndexKey`]s it is found
//! under, which policies hold rows for each identity, and the policy ids pinned maps
//! gave endpoints before a restart ([`AdoptedPolicyIds`]).
//!
//! Policy ids: a new policy takes the id its content derives ([`super::ids`]); an
//! edit of a policy only one endpoint uses keeps its id and changes only the rows of
//! the rules that changed (a one-rule edit of a 10,000-rule RayCluster writes one
//! rule's rows to the kernel, not 10,000). So an id is not always its content's, and
//! two orders of arrival may number policies differently: after a restart the agent
//! gives each policy back the id the pinned maps show for its endpoints, which keeps
//! "a restart renumbers nothing" and never puts a pinned id's rows behind an
//! endpoint that now has another policy.
//!
//! Must not: compute rows (it stores the rows it is given and writes them to the
//! output), allocate identities (the engine adds and removes the prefixes a policy
//! names), or reuse a policy id still in use or pinned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;

use super::index::{IndexKey, index_keys};
use super::rule_index::RuleIndex;
use super::spec::PolicySpec;
use super::{ids, unlink};
use crate::policy::output::Output;
use crate::tables::{Direction, EndpointId, IdentityId, PolicyEntry, PolicyId};

/// One policy; only [`Policies`] changes it.
#[derive(Debug)]
pub(super) struct PolicyState {
    spec: Arc<PolicySpec>,
    refs: usize,
    /// Rows by peer identity; sorted, never empty.
    rows: HashMap<IdentityId, Vec<PolicyEntry>>,
    prefixes: Vec<IpNet>,
    keys: Vec<IndexKey>,
    /// Which of `spec`'s rules can select a given peer.
    rule_index: RuleIndex,
}

impl PolicyState {
    fn new(spec: PolicySpec) -> Self {
        Self {
            prefixes: spec.prefixes(),
            keys: index_keys(&spec),
            rule_index: RuleIndex::new(&spec),
            spec: Arc::new(spec),
            refs: 1,
            rows: HashMap::new(),
        }
    }

    pub(super) fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// Rows by peer identity; sorted, never empty.
    pub(super) fn rows(&self) -> &HashMap<IdentityId, Vec<PolicyEntry>> {
        &self.rows
    }

    /// The ipBlock prefixes the spec names, sorted, once each.
    pub(super) fn prefixes(&self) -> &[IpNet] {
        &self.prefixes
    }

    pub(super) fn rule_index(&self) -> &RuleIndex {
        &self.rule_index
    }

    /// Whether the policy has a row for `id` that allows `protocol`/`port`.
    pub(super) fn allows(
        &self,
        id: IdentityId,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.rows.get(&id).is_some_and(|rows| {
            rows.iter()
                .any(|r| r.direction == direction && r.matches(protocol, port))
        })
    }
}

/// Policy ids the pinned maps gave endpoints before a restart (see the module docs).
/// Until the first full program, these ids are reserved: a new policy never takes
/// one, and [`Policies::take_pinned`] moves each policy to the id its endpoints had
/// when that cannot put another pod's rows behind a pinned entry.
#[derive(Debug, Default)]
struct AdoptedPolicyIds {
    by_endpoint: HashMap<EndpointId, PolicyId>,
    /// Which pinned endpoints point at each id.
    users: HashMap<PolicyId, Vec<EndpointId>>,
}

/// What [`Policies::respec`] did.
pub(super) enum Respec {
    /// Only rules changed: the rows of their peers are to be recomputed.
    Rules,
    /// Isolation or the pod's named ports changed: every row went, the policy is to
    /// be computed afresh, as a new one.
    Everything,
}

#[derive(Debug, Default)]
pub(super) struct Policies {
    ids: HashMap<Arc<PolicySpec>, PolicyId>,
    states: BTreeMap<PolicyId, PolicyState>,
    index: HashMap<IndexKey, BTreeSet<PolicyId>>,
    /// Which policies hold rows for an identity.
    row_owners: HashMap<IdentityId, BTreeSet<PolicyId>>,
    /// The policy ids pinned maps gave endpoints before a restart, until the first
    /// full program has re-pointed every endpoint.
    adopted: AdoptedPolicyIds,
}

impl Policies {
    pub(super) fn get(&self, id: PolicyId) -> Option<&PolicyState> {
        self.states.get(&id)
    }

    pub(super) fn contains(&self, id: PolicyId) -> bool {
        self.states.contains_key(&id)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (PolicyId, &PolicyState)> + '_ {
        self.states.iter().map(|(id, state)| (*id, state))
    }

    pub(super) fn len(&self) -> usize {
        self.states.len()
    }

    /// The policies found under `key`.
    pub(super) fn indexed(&self, key: &IndexKey) -> impl Iterator<Item = PolicyId> + '_ {
        self.index.get(key).into_iter().flatten().copied()
    }

    /// The policies that hold rows for `id`.
    pub(super) fn row_owners(&self, id: IdentityId) -> impl Iterator<Item = PolicyId> + '_ {
        self.row_owners.get(&id).into_iter().flatten().copied()
    }

    /// The policy of `spec`, one more reference to it; whether it is new (then its
    /// prefixes are to be added, and its rows computed).
    pub(super) fn intern(&mut self, spec: PolicySpec) -> (PolicyId, bool) {
        if let Some(id) = self.ids.get(&spec) {
            if let Some(state) = self.states.get_mut(id) {
                state.refs += 1;
            }
            return (*id, false);
        }
        let id = self.new_id(&spec);
        let state = PolicyState::new(spec);
        for key in &state.keys {
            self.index.entry(key.clone()).or_default().insert(id);
        }
        self.ids.insert(state.spec.clone(), id);
        self.states.insert(id, state);
        (id, true)
    }

    /// Whether policy `id` may take a new spec in place: only its endpoint uses it
    /// and no other policy has that spec.
    pub(super) fn can_respec(&self, id: PolicyId, spec: &PolicySpec) -> bool {
        self.states.get(&id).is_some_and(|state| state.refs == 1) && !self.ids.contains_key(spec)
    }

    /// Gives policy `id` the spec `spec` in place (see [`Policies::can_respec`]); with
    /// more than rules changed, its rows go. Returns what changed and the prefixes the
    /// old spec named (the engine adds the new ones, then removes these); `spec` back
    /// when there is no policy `id`.
    pub(super) fn respec(
        &mut self,
        id: PolicyId,
        spec: PolicySpec,
        out: &mut Output,
    ) -> Result<(Respec, Vec<IpNet>), PolicySpec> {
        let Some(state) = self.states.get_mut(&id) else {
            return Err(spec);
        };
        let rules_only = state.spec.same_but_rules(&spec);
        for key in &state.keys {
            unlink(&mut self.index, key, &id);
        }
        let fresh = PolicyState::new(spec);
        for key in &fresh.keys {
            self.index.entry(key.clone()).or_default().insert(id);
        }
        self.ids.remove(&state.spec);
        self.ids.insert(fresh.spec.clone(), id);
        state.spec = fresh.spec;
        state.keys = fresh.keys;
        state.rule_index = fresh.rule_index;
        let old_prefixes = std::mem::replace(&mut state.prefixes, fresh.prefixes);
        if rules_only {
            return Ok((Respec::Rules, old_prefixes));
        }
        // Any row may differ. The rows are computed afresh, as for a new policy; in
        // the diff, only what differs reaches the maps.
        for (peer, rows) in std::mem::take(&mut state.rows) {
            unlink(&mut self.row_owners, &peer, &id);
            for row in rows {
                out.remove_row(row);
            }
        }
        Ok((Respec::Everything, old_prefixes))
    }

    /// One reference fewer to policy `id`; when that was the last, the policy and its
    /// rows go, and the prefixes it named are returned to be removed.
    pub(super) fn release(&mut self, id: PolicyId, out: &mut Output) -> Vec<IpNet> {
        let Some(state) = self.states.get_mut(&id) else {
            return Vec::new();
        };
        state.refs -= 1;
        if state.refs > 0 {
            return Vec::new();
        }
        let Some(state) = self.states.remove(&id) else {
            return Vec::new();
        };
        self.ids.remove(&state.spec);
        for key in state.keys {
            unlink(&mut self.index, &key, &id);
        }
        for (peer, rows) in state.rows {
            unlink(&mut self.row_owners, &peer, &id);
            for row in rows {
                out.remove_row(row);
            }
        }
        state.prefixes
    }

    /// Replaces `policy`'s rows for `peer` (sorted) in the policy and the output, as a
    /// set difference; whether they changed.
    pub(super) fn replace_rows(
        &mut self,
        policy: PolicyId,
        peer: IdentityId,
        rows: Vec<PolicyEntry>,
        out: &mut Output,
    ) -> bool {
        let Some(state) = self.states.get_mut(&policy) else {
            return false;
        };
        let old = if rows.is_empty() {
            state.rows.remove(&peer).unwrap_or_default()
        } else {
            state.rows.insert(peer, rows.clone()).unwrap_or_default()
        };
        if old == rows {
            return false;
        }
        if rows.is_empty() {
            unlink(&mut self.row_owners, &peer, &policy);
        } else if old.is_empty() {
            self.row_owners.entry(peer).or_default().insert(policy);
        }
        for row in &old {
            if rows.binary_search(row).is_err() {
                out.remove_row(*row);
            }
        }
        for row in &rows {
            if old.binary_search(row).is_err() {
                out.add_row(*row);
            }
        }
        true
    }

    /// Every policy's rows for identity `id`, which is gone.
    pub(super) fn purge_rows(&mut self, id: IdentityId, out: &mut Output) {
        for policy in self.row_owners.remove(&id).into_iter().flatten() {
            if let Some(rows) = self
                .states
                .get_mut(&policy)
                .and_then(|p| p.rows.remove(&id))
            {
                for row in rows {
                    out.remove_row(row);
                }
            }
        }
    }

    /// What the pinned maps hold after a restart: each endpoint's policy id.
    pub(super) fn adopt(&mut self, pinned: impl IntoIterator<Item = (EndpointId, PolicyId)>) {
        let mut adopted = AdoptedPolicyIds::default();
        for (endpoint, policy) in pinned {
            adopted.by_endpoint.insert(endpoint, policy);
            adopted.users.entry(policy).or_default().push(endpoint);
        }
        self.adopted = adopted;
    }

    /// Gives each policy back the id the pinned maps show for its endpoints, then
    /// forgets them. `users` are the endpoints of each policy now; `is_endpoint` tells
    /// whether an endpoint id is still here. A policy moves to pinned id `p` only when
    /// every endpoint it has pointed at `p` and every endpoint still here that
    /// pointed at `p` has it (else `p`'s rows would be another pod's policy behind
    /// that endpoint's pinned entry until the apply re-points it). Returns the moves
    /// `(from, to)` in the order made, for the endpoints to follow.
    pub(super) fn take_pinned(
        &mut self,
        mut users: HashMap<PolicyId, Vec<EndpointId>>,
        is_endpoint: impl Fn(EndpointId) -> bool,
        out: &mut Output,
    ) -> Vec<(PolicyId, PolicyId)> {
        let adopted = std::mem::take(&mut self.adopted);
        let mut moves = Vec::new();
        if adopted.by_endpoint.is_empty() {
            return moves;
        }
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
                    .all(|ep| !is_endpoint(*ep) || endpoints.contains(ep));
                if all_here_agree {
                    candidates.push((*policy, pinned));
                }
            }
            candidates.sort_unstable();
            for (from, to) in candidates {
                if self.states.contains_key(&to) || !self.states.contains_key(&from) {
                    continue;
                }
                self.renumber(from, to, out);
                if let Some(endpoints) = users.remove(&from) {
                    users.insert(to, endpoints);
                }
                moves.push((from, to));
                progress = true;
            }
            if !progress {
                return moves;
            }
        }
    }

    /// Renumbers policy `from` as `to` (free): its rows and index entries.
    fn renumber(&mut self, from: PolicyId, to: PolicyId, out: &mut Output) {
        let Some(mut state) = self.states.remove(&from) else {
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
                out.remove_row(*row);
                row.policy_id = to;
                out.add_row(*row);
            }
            rows.sort();
        }
        self.ids.insert(state.spec.clone(), to);
        self.states.insert(to, state);
    }

    /// The id for a new policy: its content's, past ids in use and pinned ids not
    /// yet given back.
    fn new_id(&self, spec: &PolicySpec) -> PolicyId {
        let (states, adopted) = (&self.states, &self.adopted);
        ids::pick(ids::stable_hash("policy", spec), 1, |id| {
            states.contains_key(&id) || adopted.users.contains_key(&id)
        })
    }
}
