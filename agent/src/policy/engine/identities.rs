//! Identities: pod identities (hash-consed on [`IdentityKey`]), CIDR identities (one
//! per ipBlock prefix, kept while any policy uses it), and the identity every address
//! and prefix maps to in the output tables.
//!
//! Must not: renumber an identity that still exists, reuse a freed one, or decide
//! which policies have rows for an identity (`index` and `rows` do).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{Engine, NamedPort, ObjectKey, unlink};
use crate::policy::selector::Labels;
use crate::tables::{IdentityId, identity};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct IdentityKey {
    pub(super) namespace: String,
    pub(super) labels: Labels,
    pub(super) named_ports: Arc<Vec<NamedPort>>,
    /// Backs the DNS Service (the DNS base flow's peer), so that flow is exact.
    pub(super) dns_backend: bool,
}

#[derive(Debug)]
pub(super) struct PodIdentity {
    pub(super) key: IdentityKey,
    pub(super) members: BTreeSet<ObjectKey>,
}

impl Engine {
    pub(super) fn join_identity(&mut self, key: IdentityKey, member: &ObjectKey) -> IdentityId {
        let id = match self.identity_keys.get(&key) {
            Some(id) => *id,
            None => {
                let id = self.allocate_identity(super::ids::stable_hash("pod-identity", &key));
                self.ids_by_ns
                    .entry(key.namespace.clone())
                    .or_default()
                    .insert(id);
                for (k, v) in &key.labels {
                    self.ids_by_label
                        .entry((k.clone(), v.clone()))
                        .or_default()
                        .insert(id);
                }
                self.identity_keys.insert(key.clone(), id);
                self.pod_identities.insert(
                    id,
                    PodIdentity {
                        key,
                        members: BTreeSet::new(),
                    },
                );
                self.dirty.identities.insert(id);
                id
            }
        };
        if let Some(identity) = self.pod_identities.get_mut(&id) {
            identity.members.insert(member.clone());
        }
        id
    }

    pub(super) fn leave_identity(&mut self, id: IdentityId, member: &ObjectKey) {
        let Some(identity) = self.pod_identities.get_mut(&id) else {
            return;
        };
        identity.members.remove(member);
        if !identity.members.is_empty() {
            return;
        }
        let Some(identity) = self.pod_identities.remove(&id) else {
            return;
        };
        self.identity_keys.remove(&identity.key);
        unlink(&mut self.ids_by_ns, &identity.key.namespace, &id);
        for (k, v) in &identity.key.labels {
            unlink(&mut self.ids_by_label, &(k.clone(), v.clone()), &id);
        }
        self.dirty.identities.remove(&id);
        self.purge_identity(id);
    }

    pub(super) fn purge_identity(&mut self, id: IdentityId) {
        self.used_identities.remove(&id);
        for policy in self.row_owners.remove(&id).into_iter().flatten() {
            if let Some(rows) = self
                .policies
                .get_mut(&policy)
                .and_then(|p| p.rows.remove(&id))
            {
                for row in rows {
                    self.out.remove_row(row);
                }
            }
        }
    }

    fn address_identity(&self, ip: IpAddr) -> Option<IdentityId> {
        if self.node_addresses.contains(&ip) {
            return Some(identity::HOST);
        }
        if let Some(svc) = self.cluster_ips.get(&ip) {
            return self.services.get(svc).map(|s| s.identity);
        }
        // Two pods claiming one address (a reused IP while the old Pod object
        // lingers): neither is trusted there, rather than guessing.
        let mut claimants = self.addr_pods.get(&ip)?.iter();
        match (claimants.next(), claimants.next()) {
            (Some(key), None) => self.pods.get(key)?.identity,
            _ => None,
        }
    }

    pub(super) fn refresh_address(&mut self, ip: IpAddr) {
        let value = self.address_identity(ip);
        self.out.set_address(ip, value);
    }

    pub(super) fn refresh_cidr(&mut self, net: IpNet) {
        let service = (net.prefix_len() == net.max_prefix_len())
            .then(|| self.cluster_ips.get(&net.addr()))
            .flatten()
            .and_then(|svc| self.services.get(svc))
            .map(|s| s.identity);
        let value = service.or_else(|| self.prefixes.get(&net).map(|(id, _)| *id));
        self.out.set_cidr(net, value);
    }

    pub(super) fn add_prefix(&mut self, net: IpNet) {
        if let Some((_, refs)) = self.prefixes.get_mut(&net) {
            *refs += 1;
            return;
        }
        let id = self.allocate_identity(super::ids::stable_hash("cidr", &net));
        self.prefixes.insert(net, (id, 1));
        self.prefix_by_id.insert(id, net);
        *self
            .prefix_lens
            .entry((net.addr().is_ipv6(), net.prefix_len()))
            .or_default() += 1;
        self.refresh_cidr(net);
        self.dirty.identities.insert(id);
        self.dirty.nets.push(net);
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

    pub(super) fn remove_prefix(&mut self, net: IpNet) {
        let Some((id, refs)) = self.prefixes.get_mut(&net) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
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
        self.refresh_cidr(net);
        self.dirty.identities.remove(&id);
        self.purge_identity(id);
        self.dirty.nets.push(net);
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
}
