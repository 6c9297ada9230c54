//! Identities as the output sees them: joining and leaving a pod identity, the
//! prefixes policies name coming and going, freeing an identity with its rows, and
//! the identity each address and prefix maps to in the output tables.
//!
//! Must not: allocate or free an identity other than through [`super::Identities`],
//! or decide which policies have rows for an identity (`index` and `rows` do).

use std::net::IpAddr;

use ipnet::IpNet;

use super::identities::IdentityKey;
use super::{Engine, ObjectKey};
use crate::tables::{IdentityId, identity};

impl Engine {
    pub(super) fn join_identity(&mut self, key: IdentityKey, member: &ObjectKey) -> IdentityId {
        let (id, created) = self.identities.join(key, member);
        if created {
            self.dirty.identity(id);
        }
        id
    }

    pub(super) fn leave_identity(&mut self, id: IdentityId, member: &ObjectKey) {
        if self.identities.leave(id, member) {
            self.dirty.forget_identity(id);
            self.policies.purge_rows(id, &mut self.out);
        }
    }

    /// Frees an identity allocated for a Service, a node port or a host port, with
    /// every row for it.
    pub(super) fn purge_identity(&mut self, id: IdentityId) {
        self.identities.release(id);
        self.policies.purge_rows(id, &mut self.out);
    }

    fn address_identity(&self, ip: IpAddr) -> Option<IdentityId> {
        // A ClusterIP on a device of the node (NodeLocal DNSCache binding kube-dns's,
        // kube-proxy's IPVS mode binding all) is still the Service: what answers
        // there stands in for its backends, never for the node's own processes.
        if let Some(svc) = self.objects.service_at(&ip) {
            return self.objects.service(svc).and_then(|s| s.identity_of(ip));
        }
        if self.node_addresses.contains(&ip) {
            return Some(identity::HOST);
        }
        // Two pods claiming one address (a reused IP while the old Pod object
        // lingers): neither is trusted there, rather than guessing.
        let mut claimants = self.objects.pods_at(&ip);
        match (claimants.next(), claimants.next()) {
            (Some(key), None) => self.objects.pod(key)?.identity,
            _ => None,
        }
    }

    pub(super) fn refresh_address(&mut self, ip: IpAddr) {
        let value = self.address_identity(ip);
        self.out.set_address(ip, value);
    }

    pub(super) fn refresh_cidr(&mut self, net: IpNet) {
        let service = (net.prefix_len() == net.max_prefix_len())
            .then(|| self.objects.service_at(&net.addr()))
            .flatten()
            .and_then(|svc| self.objects.service(svc))
            .and_then(|s| s.identity_of(net.addr()));
        let value = service.or_else(|| self.identities.prefix_identity(&net));
        self.out.set_cidr(net, value);
    }

    /// One more policy names `net`.
    pub(super) fn add_prefix(&mut self, net: IpNet) {
        if let Some(id) = self.identities.add_prefix(net) {
            self.refresh_cidr(net);
            self.dirty.identity(id);
            self.dirty.net(net);
        }
    }

    /// One policy fewer names `net`.
    pub(super) fn remove_prefix(&mut self, net: IpNet) {
        if let Some(id) = self.identities.remove_prefix(net) {
            self.refresh_cidr(net);
            self.dirty.forget_identity(id);
            self.policies.purge_rows(id, &mut self.out);
            self.dirty.net(net);
        }
    }
}
