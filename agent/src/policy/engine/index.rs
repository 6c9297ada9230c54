//! The policy index: the [`IndexKey`]s under which a policy's peers can be found, and
//! from them which policies a changed identity can touch and which identities a new
//! policy may have rows for.
//!
//! Must not: miss a policy or identity a change can affect (it may over-approximate:
//! `flush` recomputes the rows exactly), or change state.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::spec::PolicySpec;
use super::{Engine, NAMESPACE_NAME_LABEL, ObjectKey};
use crate::policy::rule::{NamespaceMatch, Peer, Rule};
use crate::tables::{IdentityId, PolicyId};

/// How a policy's peers are found from a changed identity or namespace, so a change
/// only recomputes the policies it can affect.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum IndexKey {
    /// A pod peer whose pod selector requires this label.
    PodPair(String, String),
    /// A pod peer without one, whose namespace selector requires this label.
    NsPair(String, String),
    /// A pod peer without one, limited to this namespace.
    NsName(String),
    /// A pod peer that can match any identity.
    Unindexed,
    /// An ipBlock peer with this cidr (found from a prefix through its supernets: a new
    /// prefix touches the policies whose blocks contain it, not every one with a block).
    Block(IpNet),
    /// A `ServiceBackends` peer.
    Service(ObjectKey),
    /// A namespace selector that looks at this label key (for namespace relabels: a
    /// selector's verdict can only flip when a key it mentions changes).
    NsDepKey(String),
}

pub(super) fn index_keys(spec: &PolicySpec) -> Vec<IndexKey> {
    let mut keys = Vec::new();
    for (_, rule) in spec.rules() {
        for peer in &rule.peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    if let NamespaceMatch::Selector(s) = namespaces {
                        keys.extend(
                            s.requirements
                                .iter()
                                .map(|r| IndexKey::NsDepKey(r.key().to_owned())),
                        );
                    }
                    match (pods.required_pair(), namespaces) {
                        (Some((k, v)), _) => {
                            keys.push(IndexKey::PodPair(k.to_owned(), v.to_owned()))
                        }
                        (None, NamespaceMatch::Names(names)) => {
                            keys.extend(names.iter().map(|n| IndexKey::NsName(n.clone())));
                        }
                        (None, NamespaceMatch::Selector(s)) => keys.push(match s.required_pair() {
                            Some((k, v)) => IndexKey::NsPair(k.to_owned(), v.to_owned()),
                            None => IndexKey::Unindexed,
                        }),
                    }
                }
                Peer::Block(b) => keys.push(IndexKey::Block(b.cidr.trunc())),
                Peer::ServiceBackends { namespace, name } => {
                    keys.push(IndexKey::Service((namespace.clone(), name.clone())));
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

impl Engine {
    /// Identities a new policy may have rows for.
    pub(super) fn candidates(&self, policy: PolicyId) -> BTreeSet<IdentityId> {
        match self.policies.get(policy) {
            Some(state) => self.candidates_of(state.spec().rules().map(|(_, rule)| &**rule)),
            None => BTreeSet::new(),
        }
    }

    /// Identities one of `rules` may select.
    pub(super) fn candidates_of<'r>(
        &self,
        rules: impl IntoIterator<Item = &'r Rule>,
    ) -> BTreeSet<IdentityId> {
        let mut ids = BTreeSet::new();
        for rule in rules {
            for peer in &rule.peers {
                match peer {
                    Peer::Pods { namespaces, pods } => {
                        let by_label = pods
                            .required_pair()
                            .map(|(k, v)| self.identities.with_label(k, v));
                        match (namespaces, by_label) {
                            (_, Some(found)) => ids.extend(found.into_iter().flatten()),
                            (NamespaceMatch::Names(names), None) => {
                                for n in names {
                                    ids.extend(
                                        self.identities.in_namespace(n).into_iter().flatten(),
                                    );
                                }
                            }
                            (NamespaceMatch::Selector(s), None) => match s.required_pair() {
                                Some((k, v)) => {
                                    let mut names: BTreeSet<&str> = self
                                        .objects
                                        .namespaces_with_label(k, v)
                                        .map(String::as_str)
                                        .collect();
                                    if k == NAMESPACE_NAME_LABEL {
                                        names.insert(v);
                                    }
                                    for n in names {
                                        ids.extend(
                                            self.identities.in_namespace(n).into_iter().flatten(),
                                        );
                                    }
                                }
                                None => ids.extend(self.identities.pod_ids()),
                            },
                        }
                    }
                    Peer::Block(b) => ids.extend(self.identities.prefixes_within(b.cidr)),
                    Peer::ServiceBackends { namespace, name } => {
                        let service = (namespace.clone(), name.clone());
                        for slice in self.objects.slices_of(&service) {
                            for ip in &slice.addresses {
                                for key in self.objects.pods_at(ip) {
                                    ids.extend(self.objects.pod(key).and_then(|p| p.identity));
                                }
                            }
                        }
                    }
                }
            }
        }
        ids
    }

    /// Policies whose rows for `id` may change when it appears, changes or goes.
    pub(super) fn policies_for_identity(&self, id: IdentityId, out: &mut BTreeSet<PolicyId>) {
        out.extend(self.policies.row_owners(id));
        let mut add = |key: IndexKey| out.extend(self.policies.indexed(&key));
        if let Some(identity) = self.identities.pod(id) {
            let ns = &identity.key.namespace;
            for (k, v) in &identity.key.labels {
                add(IndexKey::PodPair(k.clone(), v.clone()));
            }
            for (k, v) in self.ns_labels(ns) {
                add(IndexKey::NsPair(k, v));
            }
            add(IndexKey::NsName(ns.clone()));
            add(IndexKey::Unindexed);
            for key in &identity.members {
                for ip in self.objects.pod(key).into_iter().flat_map(|p| p.ips.iter()) {
                    for service in self.objects.backend_services(ip) {
                        add(IndexKey::Service(service.clone()));
                    }
                }
            }
        } else if let Some(net) = self.identities.prefix_of(id) {
            for len in 0..=net.prefix_len() {
                if let Ok(supernet) = IpNet::new(net.addr(), len) {
                    add(IndexKey::Block(supernet.trunc()));
                }
            }
        }
    }
}
