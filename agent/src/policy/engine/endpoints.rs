//! The local endpoints: each local pod's endpoint id (from its UID, so it survives
//! agent restarts), the policy it points at, and what status reports of it.
//!
//! Must not: reuse an endpoint id still in use, or hold a pod that is not an endpoint
//! of this node (hostNetwork pods never are).

use std::collections::{BTreeMap, HashMap};

use super::{ObjectKey, ids};
use crate::policy::output::Output;
use crate::policy::problem::Problem;
use crate::policy::rule::Role;
use crate::tables::{EndpointId, EndpointPolicy, PolicyId};

/// One local endpoint; only [`LocalEndpoints`] changes it.
#[derive(Debug)]
pub(super) struct LocalEndpoint {
    pub(super) id: EndpointId,
    pub(super) uid: String,
    pub(super) policy: PolicyId,
    pub(super) cluster: Option<String>,
    pub(super) role: Option<Role>,
    pub(super) problems: Vec<Problem>,
}

#[derive(Debug, Default)]
pub(super) struct LocalEndpoints {
    by_key: HashMap<ObjectKey, LocalEndpoint>,
    keys: BTreeMap<EndpointId, ObjectKey>,
}

impl LocalEndpoints {
    pub(super) fn get(&self, key: &ObjectKey) -> Option<&LocalEndpoint> {
        self.by_key.get(key)
    }

    /// The pod of endpoint `id`.
    pub(super) fn key_of(&self, id: EndpointId) -> Option<&ObjectKey> {
        self.keys.get(&id)
    }

    pub(super) fn ids(&self) -> impl Iterator<Item = EndpointId> + '_ {
        self.keys.keys().copied()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &LocalEndpoint)> + '_ {
        self.by_key.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The id `key`'s endpoint has, or the one it gets: from the UID (the name when
    /// it has none), past the ids in use.
    pub(super) fn id_for(&self, key: &ObjectKey, uid: &str) -> EndpointId {
        if let Some(ep) = self.by_key.get(key) {
            return ep.id;
        }
        let seed = if uid.is_empty() {
            ids::stable_hash("endpoint-name", key)
        } else {
            ids::stable_hash("endpoint", uid)
        };
        let taken = &self.keys;
        ids::pick(seed, 1, |id| taken.contains_key(&id))
    }

    /// Sets `key`'s endpoint (with the id [`LocalEndpoints::id_for`] gave it); the
    /// policy it pointed at before, if it was there.
    pub(super) fn set(&mut self, key: &ObjectKey, endpoint: LocalEndpoint) -> Option<PolicyId> {
        match self.by_key.get_mut(key) {
            Some(ep) => {
                let old = ep.policy;
                ep.policy = endpoint.policy;
                ep.cluster = endpoint.cluster;
                ep.role = endpoint.role;
                ep.problems = endpoint.problems;
                Some(old)
            }
            None => {
                self.keys.insert(endpoint.id, key.clone());
                self.by_key.insert(key.clone(), endpoint);
                None
            }
        }
    }

    pub(super) fn remove(&mut self, key: &ObjectKey) -> Option<LocalEndpoint> {
        let ep = self.by_key.remove(key)?;
        self.keys.remove(&ep.id);
        Some(ep)
    }

    /// Points the endpoints of policy `from` at `to` (renumbered), in the output too.
    pub(super) fn repoint(&mut self, from: PolicyId, to: PolicyId, out: &mut Output) {
        for ep in self.by_key.values_mut().filter(|ep| ep.policy == from) {
            ep.policy = to;
            if let Some(value) = out.tables.endpoints.get(&ep.id).copied() {
                out.set_endpoint(
                    ep.id,
                    Some(EndpointPolicy {
                        policy_id: to,
                        ..value
                    }),
                );
            }
        }
    }
}
