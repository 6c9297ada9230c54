//! The identity allocator: every identity in use (pod, CIDR, Service, node port), pod
//! identities hash-consed on [`IdentityKey`] with their members and the indexes that
//! find them (by namespace, by label), CIDR identities (one per ipBlock prefix, kept
//! while any policy names it, counted by reference), and the identity of each port
//! several objects claim.
//!
//! Ids are content-derived ([`super::ids`]) and probe past the ids in use.
//!
//! Must not: renumber an identity that still exists, reuse a freed one while it is in
//! use, touch rows or the output (the engine purges an identity's rows when this
//! frees it), or decide which policies have rows for an identity.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{NamedPort, ObjectKey, ids, unlink};
use crate::policy::selector::Labels;
use crate::tables::{IdentityId, NodePort, identity};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct IdentityKey {
    pub(super) namespace: String,
    pub(super) labels: Labels,
    pub(super) named_ports: Arc<Vec<NamedPort>>,
    /// Backs the DNS Service (the DNS base flow's peer), so that flow is exact.
    pub(super) dns_backend: bool,
}

/// A pod identity; only [`Identities`] changes it (others get `&PodIdentity`).
#[derive(Debug)]
pub(super) struct PodIdentity {
    pub(super) key: IdentityKey,
    pub(super) members: BTreeSet<ObjectKey>,
}

#[derive(Debug, Default)]
pub(super) struct Identities {
    /// Every identity in use: ids are derived from content and probe past these on a
    /// collision.
    used: HashSet<IdentityId>,
    by_key: HashMap<IdentityKey, IdentityId>,
    pods: HashMap<IdentityId, PodIdentity>,
    by_ns: HashMap<String, BTreeSet<IdentityId>>,
    by_label: HashMap<(String, String), BTreeSet<IdentityId>>,
    /// Each prefix's identity and how many policies name it.
    prefixes: BTreeMap<IpNet, (IdentityId, usize)>,
    prefix_by_id: HashMap<IdentityId, IpNet>,
    /// How many prefixes of each (is IPv6, length): the lengths a longest match tries.
    prefix_lens: BTreeMap<(bool, u8), usize>,
    /// The identity (never given rows) of each port several objects claim.
    node_port_conflicts: HashMap<NodePort, IdentityId>,
}

impl Identities {
    /// A new identity for what `seed` hashes (see [`ids`]), marked in use.
    pub(super) fn allocate(&mut self, seed: u64) -> IdentityId {
        let used = &self.used;
        let id = ids::pick(seed, identity::FIRST_ALLOCATED, |id| used.contains(&id));
        self.used.insert(id);
        id
    }

    /// Frees an identity allocated with [`Identities::allocate`] (a Service's, a node
    /// port's): its id may be allocated again.
    pub(super) fn release(&mut self, id: IdentityId) {
        self.used.remove(&id);
    }

    /// Adds `member` to the pod identity of `key`; the id, and whether it is new.
    pub(super) fn join(&mut self, key: IdentityKey, member: &ObjectKey) -> (IdentityId, bool) {
        let (id, created) = match self.by_key.get(&key) {
            Some(id) => (*id, false),
            None => {
                let id = self.allocate(ids::stable_hash("pod-identity", &key));
                self.by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(id);
                for (k, v) in &key.labels {
                    self.by_label
                        .entry((k.clone(), v.clone()))
                        .or_default()
                        .insert(id);
                }
                self.by_key.insert(key.clone(), id);
                self.pods.insert(
                    id,
                    PodIdentity {
                        key,
                        members: BTreeSet::new(),
                    },
                );
                (id, true)
            }
        };
        if let Some(identity) = self.pods.get_mut(&id) {
            identity.members.insert(member.clone());
        }
        (id, created)
    }

    /// Removes `member` from pod identity `id`; whether that freed the identity.
    pub(super) fn leave(&mut self, id: IdentityId, member: &ObjectKey) -> bool {
        let Some(identity) = self.pods.get_mut(&id) else {
            return false;
        };
        identity.members.remove(member);
        if !identity.members.is_empty() {
            return false;
        }
        let Some(identity) = self.pods.remove(&id) else {
            return false;
        };
        self.by_key.remove(&identity.key);
        unlink(&mut self.by_ns, &identity.key.namespace, &id);
        for (k, v) in &identity.key.labels {
            unlink(&mut self.by_label, &(k.clone(), v.clone()), &id);
        }
        self.used.remove(&id);
        true
    }

    pub(super) fn pod(&self, id: IdentityId) -> Option<&PodIdentity> {
        self.pods.get(&id)
    }

    pub(super) fn pod_ids(&self) -> impl Iterator<Item = IdentityId> + '_ {
        self.pods.keys().copied()
    }

    pub(super) fn pods(&self) -> impl Iterator<Item = &PodIdentity> + '_ {
        self.pods.values()
    }

    pub(super) fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The pod identities of namespace `ns`.
    pub(super) fn in_namespace(&self, ns: &str) -> Option<&BTreeSet<IdentityId>> {
        self.by_ns.get(ns)
    }

    /// The pod identities whose labels have `key: value`.
    pub(super) fn with_label(&self, key: &str, value: &str) -> Option<&BTreeSet<IdentityId>> {
        self.by_label.get(&(key.to_owned(), value.to_owned()))
    }

    /// One more policy names `net`; its identity when this made it exist.
    pub(super) fn add_prefix(&mut self, net: IpNet) -> Option<IdentityId> {
        if let Some((_, refs)) = self.prefixes.get_mut(&net) {
            *refs += 1;
            return None;
        }
        let id = self.allocate(ids::stable_hash("cidr", &net));
        self.prefixes.insert(net, (id, 1));
        self.prefix_by_id.insert(id, net);
        *self
            .prefix_lens
            .entry((net.addr().is_ipv6(), net.prefix_len()))
            .or_default() += 1;
        Some(id)
    }

    /// One policy fewer names `net`; its identity when this freed it.
    pub(super) fn remove_prefix(&mut self, net: IpNet) -> Option<IdentityId> {
        let (id, refs) = self.prefixes.get_mut(&net)?;
        *refs -= 1;
        if *refs > 0 {
            return None;
        }
        let id = *id;
        self.prefixes.remove(&net);
        self.prefix_by_id.remove(&id);
        let len = (net.addr().is_ipv6(), net.prefix_len());
        if let Some(n) = self.prefix_lens.get_mut(&len) {
            *n -= 1;
            if *n == 0 {
                self.prefix_lens.remove(&len);
            }
        }
        self.used.remove(&id);
        Some(id)
    }

    /// The identity of prefix `net`, if a policy names it.
    pub(super) fn prefix_identity(&self, net: &IpNet) -> Option<IdentityId> {
        self.prefixes.get(net).map(|(id, _)| *id)
    }

    /// The prefix of CIDR identity `id`.
    pub(super) fn prefix_of(&self, id: IdentityId) -> Option<&IpNet> {
        self.prefix_by_id.get(&id)
    }

    #[cfg(test)]
    pub(super) fn prefix_ids(&self) -> impl Iterator<Item = IdentityId> + '_ {
        self.prefix_by_id.keys().copied()
    }

    pub(super) fn prefix_count(&self) -> usize {
        self.prefixes.len()
    }

    /// The identities of the prefixes inside `cidr` (itself included): a range of the
    /// sorted prefixes (by address, then length), not a scan of all of them.
    pub(super) fn prefixes_within(&self, cidr: IpNet) -> impl Iterator<Item = IdentityId> + '_ {
        let cidr = cidr.trunc();
        let bounds = IpNet::new(cidr.network(), 0)
            .ok()
            .zip(IpNet::new(cidr.broadcast(), cidr.max_prefix_len()).ok());
        bounds
            .into_iter()
            .flat_map(move |(first, last)| self.prefixes.range(first..=last))
            .filter(move |(net, _)| cidr.contains(*net))
            .map(|(_, (id, _))| *id)
    }

    /// The CIDR identity the datapath's longest match gives `ip` (ClusterIPs aside).
    pub(super) fn longest_prefix(&self, ip: IpAddr) -> Option<IdentityId> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let v6 = ip.is_ipv6();
        self.prefix_lens
            .keys()
            .rev()
            .filter(|(is_v6, _)| *is_v6 == v6)
            .find_map(|(_, len)| {
                let net = IpNet::new(ip, *len).ok()?.trunc();
                self.prefixes.get(&net).map(|(id, _)| *id)
            })
    }

    /// The identity of `port` while several objects claim it, allocated on first use.
    pub(super) fn node_port_conflict(&mut self, port: NodePort) -> IdentityId {
        if let Some(id) = self.node_port_conflicts.get(&port) {
            return *id;
        }
        let id = self.allocate(ids::stable_hash("node-port-conflict", &port));
        self.node_port_conflicts.insert(port, id);
        id
    }

    /// `port`'s conflict identity unless it is `keep`, forgotten and freed; it is
    /// returned so its rows can go too.
    pub(super) fn drop_node_port_conflict(
        &mut self,
        port: NodePort,
        keep: Option<IdentityId>,
    ) -> Option<IdentityId> {
        if keep == self.node_port_conflicts.get(&port).copied() {
            return None;
        }
        let id = self.node_port_conflicts.remove(&port)?;
        self.used.remove(&id);
        Some(id)
    }
}
