//! The declared policies: RayCluster isolation blocks (with the last good policy kept
//! for invalid ones) and plain NetworkPolicies, stored as parsed and compiled rules.
//!
//! Must not: compute rows or policy specs; a change only marks the local endpoints it
//! can affect in [`super::Dirty`].

use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{Engine, ObjectKey, key_of};
use crate::crd::RayCluster;
use crate::policy::netpol;
use crate::policy::raycluster::{self, CompiledCluster, Declared, UserPolicy};

#[derive(Debug, Default)]
pub(super) struct ClusterState {
    pub(super) parsed: Option<raycluster::ParsedCluster>,
    pub(super) last_good: Option<UserPolicy>,
    pub(super) compiled: Option<CompiledCluster>,
    /// `rayfence.io/audit` (false when invalid).
    pub(super) audit: bool,
}

impl Engine {
    pub fn upsert_raycluster(&mut self, cluster: &RayCluster) {
        let key = key_of(&cluster.metadata);
        let parsed = raycluster::parse(cluster);
        let mut state = self.objects.remove_cluster(&key).unwrap_or_default();
        let effective = match &parsed.declared {
            Declared::Nothing => {
                state.last_good = None;
                None
            }
            Declared::Valid(policy) => {
                state.last_good = Some(policy.clone());
                Some(policy.clone())
            }
            Declared::Invalid(source) => Some(
                state
                    .last_good
                    .clone()
                    .unwrap_or_else(|| UserPolicy::deny_all(*source)),
            ),
        };
        let compiled = effective.map(|p| raycluster::compile(&parsed, &p, &self.settings));
        // An audit switch alone touches the endpoints' entries, never their rows.
        let audit_changed = state.audit != parsed.audit;
        state.audit = parsed.audit;
        state.parsed = Some(parsed);
        let changed = state.compiled != compiled || audit_changed;
        if changed {
            state.compiled = compiled;
        }
        self.objects.set_cluster(key.clone(), state);
        if changed {
            self.cluster_changed(&key);
        }
        self.flush();
    }

    pub fn remove_raycluster(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.objects.remove_cluster(&key).is_some() {
            self.cluster_changed(&key);
        }
        self.flush();
    }

    fn cluster_changed(&mut self, key: &ObjectKey) {
        self.dirty
            .endpoints(self.objects.local_in_cluster(key).cloned());
    }

    pub fn upsert_network_policy(&mut self, policy: &NetworkPolicy) {
        let (namespace, name) = key_of(&policy.metadata);
        let parsed = Arc::new(netpol::parse(policy));
        self.objects.set_netpol(namespace.clone(), name, parsed);
        self.netpols_changed(&namespace);
    }

    pub fn remove_network_policy(&mut self, namespace: &str, name: &str) {
        self.objects.remove_netpol(namespace, name);
        self.netpols_changed(namespace);
    }

    fn netpols_changed(&mut self, namespace: &str) {
        if self.settings.enforce_networkpolicies {
            let members = self
                .endpoints
                .iter()
                .map(|(key, _)| key)
                .filter(|k| k.0 == namespace)
                .cloned();
            self.dirty.endpoints(members);
        }
        self.flush();
    }
}
