//! Namespaces: their labels (with the automatic `kubernetes.io/metadata.name`), the
//! namespace-by-label index, and the recomputation a relabel calls for.
//!
//! Must not: recompute rows itself (a relabel only marks (policy, identity) pairs in
//! [`super::Dirty`] for `flush`), or mark policies whose namespace selectors do not
//! flip.

use std::borrow::Cow;
use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Namespace;

use super::index::IndexKey;
use super::{Engine, NAMESPACE_NAME_LABEL, unlink};
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
        for (namespace, _) in self.clusters.keys() {
            *out.entry(namespace.clone()).or_insert(0) |= guard_reasons::RAYCLUSTER;
        }
        for (namespace, labels) in &self.namespaces {
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
        match self.namespaces.get(namespace) {
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
        if self.namespaces.get(&name) == Some(&labels) {
            return;
        }
        let old = self.ns_labels(&name);
        self.set_namespace(&name, Some(labels));
        self.namespace_changed(&name, &old);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.namespaces.contains_key(name) {
            let old = self.ns_labels(name);
            self.set_namespace(name, None);
            self.namespace_changed(name, &old);
        }
    }

    fn set_namespace(&mut self, name: &str, labels: Option<Labels>) {
        if let Some(old) = self.namespaces.remove(name) {
            for pair in old {
                unlink(&mut self.ns_by_label, &pair, name);
            }
        }
        if let Some(labels) = labels {
            for pair in &labels {
                self.ns_by_label
                    .entry((pair.0.clone(), pair.1.clone()))
                    .or_default()
                    .insert(name.to_owned());
            }
            self.namespaces.insert(name.to_owned(), labels);
        }
    }

    /// Only policies with a namespace selector whose verdict flips for this namespace
    /// recompute, and only for the identities in it.
    fn namespace_changed(&mut self, name: &str, old: &Labels) {
        let new = self.ns_labels(name);
        let Some(ids) = self.ids_by_ns.get(name).cloned() else {
            self.flush();
            return;
        };
        let mut candidates: BTreeSet<PolicyId> = BTreeSet::new();
        let changed = old
            .keys()
            .chain(new.keys())
            .filter(|k| old.get(*k) != new.get(*k));
        for key in changed {
            if let Some(set) = self.index.get(&IndexKey::NsDepKey(key.clone())) {
                candidates.extend(set);
            }
        }
        for policy in candidates {
            let Some(state) = self.policies.get(&policy) else {
                continue;
            };
            let mut affected: BTreeSet<IdentityId> = BTreeSet::new();
            for peer in state.spec.rules().flat_map(|(_, r)| r.peers.iter()) {
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
                        let with_label = self.ids_by_label.get(&(k.to_owned(), v.to_owned()));
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
                self.dirty.pairs.entry(policy).or_default().extend(affected);
            }
        }
        self.flush();
    }
}
