//! What a change marked for `flush` to bring up to date: endpoints to refresh,
//! identities and (policy, identity) pairs whose rows to recompute, Services and
//! host-port pods whose post-DNAT rows to recompute, prefixes that came or went, pods
//! whose DNS-backend bit to re-check.
//!
//! Must not: decide anything; input handlers only mark, `flush` only takes.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::ObjectKey;
use crate::tables::{IdentityId, PolicyId};

#[derive(Debug, Default)]
pub(super) struct Dirty {
    endpoints: BTreeSet<ObjectKey>,
    identities: BTreeSet<IdentityId>,
    services: BTreeSet<ObjectKey>,
    nets: Vec<IpNet>,
    /// Local pods whose host-port rows may change.
    host_ports: BTreeSet<ObjectKey>,
    /// Pods whose DNS-backend bit may have changed.
    rekey: BTreeSet<ObjectKey>,
    /// Identities to recompute in one policy only (namespace relabels).
    pairs: BTreeMap<PolicyId, BTreeSet<IdentityId>>,
}

impl Dirty {
    pub(super) fn endpoint(&mut self, key: ObjectKey) {
        self.endpoints.insert(key);
    }

    pub(super) fn endpoints(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        self.endpoints.extend(keys);
    }

    pub(super) fn identity(&mut self, id: IdentityId) {
        self.identities.insert(id);
    }

    pub(super) fn identities(&mut self, ids: impl IntoIterator<Item = IdentityId>) {
        self.identities.extend(ids);
    }

    /// `id` is gone: nothing to recompute for it (its rows were purged).
    pub(super) fn forget_identity(&mut self, id: IdentityId) {
        self.identities.remove(&id);
    }

    pub(super) fn service(&mut self, key: ObjectKey) {
        self.services.insert(key);
    }

    pub(super) fn services(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        self.services.extend(keys);
    }

    /// A prefix identity came or went: Services and host ports with an address in it.
    pub(super) fn net(&mut self, net: IpNet) {
        self.nets.push(net);
    }

    pub(super) fn host_port(&mut self, key: ObjectKey) {
        self.host_ports.insert(key);
    }

    pub(super) fn host_ports(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        self.host_ports.extend(keys);
    }

    pub(super) fn rekey(&mut self, key: ObjectKey) {
        self.rekey.insert(key);
    }

    pub(super) fn pairs(&mut self, policy: PolicyId, ids: impl IntoIterator<Item = IdentityId>) {
        self.pairs.entry(policy).or_default().extend(ids);
    }

    pub(super) fn take_rekey(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.rekey)
    }

    pub(super) fn take_endpoints(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.endpoints)
    }

    pub(super) fn take_pairs(&mut self) -> BTreeMap<PolicyId, BTreeSet<IdentityId>> {
        std::mem::take(&mut self.pairs)
    }

    pub(super) fn take_identities(&mut self) -> BTreeSet<IdentityId> {
        std::mem::take(&mut self.identities)
    }

    pub(super) fn take_services(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.services)
    }

    pub(super) fn take_host_ports(&mut self) -> BTreeSet<ObjectKey> {
        std::mem::take(&mut self.host_ports)
    }

    pub(super) fn take_nets(&mut self) -> Vec<IpNet> {
        std::mem::take(&mut self.nets)
    }
}
