//! Pods: what the engine keeps of a pod (labels, IPs, named ports, locality), its
//! identity membership, the address index, and which endpoints, identities and
//! Services a pod change marks dirty.
//!
//! Must not: allocate identities or compute rows itself (`identities` and `flush` do),
//! or treat host-network or terminal pods as selectable peers.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::identities::IdentityKey;
use super::{Engine, NamedPort, ObjectKey, key_of, unlink};
use crate::policy::raycluster::LABEL_CLUSTER;
use crate::policy::rule::parse_protocol;
use crate::policy::selector::Labels;
use crate::tables::IdentityId;

#[derive(Debug)]
pub(super) struct PodState {
    pub(super) uid: String,
    pub(super) labels: Labels,
    pub(super) ips: Vec<IpAddr>,
    pub(super) local: bool,
    pub(super) named_ports: Arc<Vec<NamedPort>>,
    pub(super) identity: Option<IdentityId>,
}

impl Engine {
    pub fn upsert_pod(&mut self, pod: &Pod) {
        let key = key_of(&pod.metadata);
        let uid = pod
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", key.0, key.1));
        if self.pods.get(&key).is_some_and(|old| old.uid != uid) {
            // Same name, new pod: a new endpoint.
            self.remove_pod_state(&key);
            self.flush();
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let terminal = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let host_network = spec.host_network == Some(true);
        // Host-network pods are the node (HOST), terminal pods no longer hold an IP.
        let selectable = !terminal && !host_network;
        let local =
            selectable && spec.node_name.as_deref() == Some(self.settings.node_name.as_str());
        let labels: Labels = pod.metadata.labels.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = Vec::new();
        if selectable {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.clone());
            for ip in status.pod_ip.iter().cloned().chain(listed) {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    ips.push(ip);
                }
            }
        }
        ips.sort();
        ips.dedup();
        let mut named: Vec<NamedPort> = Vec::new();
        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for port in containers.flat_map(|c| c.ports.iter().flatten()) {
            let (Some(name), Some(protocol), Ok(number)) = (
                &port.name,
                parse_protocol(port.protocol.as_deref()),
                u16::try_from(port.container_port),
            ) else {
                continue;
            };
            named.push(NamedPort {
                name: name.clone(),
                protocol,
                port: number,
            });
        }
        named.sort();
        named.dedup();
        let named_ports = Arc::new(named);
        let dns_backend = self.is_dns_backend(&ips);
        let new_identity = selectable.then(|| {
            self.join_identity(
                IdentityKey {
                    namespace: key.0.clone(),
                    labels: labels.clone(),
                    named_ports: named_ports.clone(),
                    dns_backend,
                },
                &key,
            )
        });
        let old = self.pods.insert(
            key.clone(),
            PodState {
                uid,
                labels,
                ips: ips.clone(),
                local,
                named_ports,
                identity: new_identity,
            },
        );
        let (old_ips, old_identity, was_local) = match old {
            Some(old) => {
                self.unindex_local(&key, &old);
                (old.ips, old.identity, old.local)
            }
            None => (Vec::new(), None, false),
        };
        if local
            && let Some(cluster) = self
                .pods
                .get(&key)
                .and_then(|p| p.labels.get(LABEL_CLUSTER))
        {
            self.local_by_cluster
                .entry((key.0.clone(), cluster.clone()))
                .or_default()
                .insert(key.clone());
        }
        if old_identity != new_identity
            && let Some(id) = old_identity
        {
            self.leave_identity(id, &key);
        }
        self.ips_changed(
            &key,
            &old_ips,
            &ips,
            old_identity != new_identity,
            [old_identity, new_identity],
        );
        if local || was_local {
            self.dirty.endpoints.insert(key);
        }
        self.flush();
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.remove_pod_state(&key);
        self.flush();
    }

    fn remove_pod_state(&mut self, key: &ObjectKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        self.unindex_local(key, &old);
        if let Some(id) = old.identity {
            self.leave_identity(id, key);
        }
        self.ips_changed(key, &old.ips, &[], true, [old.identity, None]);
        self.dirty.endpoints.insert(key.clone());
    }

    fn unindex_local(&mut self, key: &ObjectKey, old: &PodState) {
        if let Some(cluster) = old.labels.get(LABEL_CLUSTER).filter(|_| old.local) {
            let group = (key.0.clone(), cluster.clone());
            unlink(&mut self.local_by_cluster, &group, key);
        }
    }

    fn ips_changed(
        &mut self,
        key: &ObjectKey,
        old: &[IpAddr],
        new: &[IpAddr],
        identity_changed: bool,
        identities: [Option<IdentityId>; 2],
    ) {
        for ip in old {
            if !new.contains(ip) {
                unlink(&mut self.addr_pods, ip, key);
            }
        }
        for ip in new {
            self.addr_pods.entry(*ip).or_default().insert(key.clone());
        }
        let changed = identity_changed || old != new;
        for ip in old.iter().chain(new) {
            self.refresh_address(*ip);
            if changed && let Some(services) = self.backend_ips.get(ip) {
                // Backend of a Service: its rows, and ServiceBackends peers, may change.
                self.dirty.services.extend(services.keys().cloned());
                self.dirty
                    .identities
                    .extend(identities.into_iter().flatten());
            }
        }
    }
}
