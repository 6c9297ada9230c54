//! Namespaces: their labels (with the automatic `kubernetes.io/metadata.name`, kept
//! in [`super::Objects`]), the namespaces the CNI plugin guards, and the
//! recomputation a relabel calls for.
//!
//! Must not: recompute rows itself (a relabel only marks (policy, identity) pairs in
//! [`super::Dirty`] for `flush`), or mark policies whose namespace selectors do not
//! flip.

use std::borrow::Cow;
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Namespace;

use super::index::IndexKey;
use super::{Engine, NAMESPACE_NAME_LABEL};
use crate::policy::rule::{NamespaceMatch, Peer};
use crate::policy::selector::Labels;
use crate::tables::{IdentityId, PolicyId};

/// The namespace label that asks for new pods to be guarded by the CNI plugin until
/// the agent has programmed them, even before the namespace holds a RayCluster.
pub const GUARD_LABEL: &str = "rayfence.io/guard";

impl Engine {
    /// Namespaces whose new pods the CNI plugin guards, with why
    /// ([`rayfence_common::guard_reasons`]): those holding a RayCluster, and those
    /// labelled `rayfence.io/guard: "true"`.
    pub fn guarded_namespaces(&self) -> std::collections::BTreeMap<String, u32> {
        use rayfence_common::guard_reasons;
        let mut out = std::collections::BTreeMap::new();
        for ((namespace, _), _) in self.objects.clusters() {
            *out.entry(namespace.clone()).or_insert(0) |= guard_reasons::RAYCLUSTER;
        }
        for (namespace, labels) in self.objects.namespaces() {
            if labels.get(GUARD_LABEL).map(String::as_str) == Some("true") {
                *out.entry(namespace.clone()).or_insert(0) |= guard_reasons::LABEL;
            }
        }
        out
    }

    pub(super) fn ns_labels(&self, namespace: &str) -> Labels {
        self.ns_labels_ref(namespace).into_owned()
    }

    /// [`Engine::ns_labels`] without copying a known namespace's labels: rows ask for
    /// them once per rule they check.
    pub(super) fn ns_labels_ref(&self, namespace: &str) -> Cow<'_, Labels> {
        match self.objects.namespace(namespace) {
            Some(labels) => Cow::Borrowed(labels),
            // Unknown namespace: the API server's automatic label is still known.
            None => Cow::Owned([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())].into()),
        }
    }

    pub fn upsert_namespace(&mut self, ns: &Namespace) {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.clone());
        if self.objects.namespace(&name) == Some(&labels) {
            return;
        }
        let old = self.ns_labels(&name);
        self.objects.set_namespace(&name, Some(labels));
        self.namespace_changed(&name, &old);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.objects.namespace(name).is_some() {
            let old = self.ns_labels(name);
            self.objects.set_namespace(name, None);
            self.namespace_changed(name, &old);
        }
    }

    /// Only policies with a namespace selector whose verdict flips for this namespace
    /// recompute, and only for the identities in it.
    fn namespace_changed(&mut self, name: &str, old: &Labels) {
        let new = self.ns_labels(name);
        let Some(ids) = self.identities.in_namespace(name).cloned() else {
            self.flush();
            return;
        };
        let mut candidates: BTreeSet<PolicyId> = BTreeSet::new();
        let changed = old
            .keys()
            .chain(new.keys())
            .filter(|k| old.get(*k) != new.get(*k));
        for key in changed {
            candidates.extend(self.policies.indexed(&IndexKey::NsDepKey(key.clone())));
        }
        for policy in candidates {
            let Some(state) = self.policies.get(policy) else {
                continue;
            };
            let mut affected: BTreeSet<IdentityId> = BTreeSet::new();
            for peer in state.spec().rules().flat_map(|(_, r)| r.peers.iter()) {
                let Peer::Pods {
                    namespaces: NamespaceMatch::Selector(s),
                    pods,
                } = peer
                else {
                    continue;
                };
                if s.matches(old) == s.matches(&new) {
                    continue;
                }
                // Only identities the peer's pod selector can match are affected.
                match pods.required_pair() {
                    Some((k, v)) => {
                        let with_label = self.identities.with_label(k, v);
                        affected.extend(
                            with_label
                                .into_iter()
                                .flatten()
                                .filter(|id| ids.contains(id)),
                        );
                    }
                    None => affected.extend(ids.iter().copied()),
                }
            }
            if !affected.is_empty() {
                self.dirty.pairs(policy, affected);
            }
        }
        self.flush();
    }
}
