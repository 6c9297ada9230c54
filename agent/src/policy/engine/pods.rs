//! Pods: what the engine keeps of a pod (labels, IPs, named ports, locality, host
//! ports; stored and indexed by address in [`super::Objects`]), its identity
//! membership, and which endpoints, identities, Services and host ports a pod change
//! marks dirty.
//!
//! A hostNetwork pod (docs/semantics.md "What counts as the node": not the node) is a selectable peer with a pod
//! identity like any pod, but never an endpoint, and its addresses (its node's) never
//! enter the address index: this node's addresses stay `identity::HOST`, another
//! node's stay ordinary addresses that only ipBlocks match. On this node the datapath
//! finds it by its cgroup (`Engine::host_network_pods`); a remote one is matched only
//! by an ipBlock on its node's address, since nothing tells it from the rest of that
//! node.
//!
//! An address carries a pod's identity only while the evidence says the pod holds
//! it (issue 17: an IP reused while the old Pod object lingers must not keep the old
//! pod's trust). It does not when the Pod is terminal (`Succeeded`, `Failed`), lists
//! no IP, has every container terminated while being deleted (the kubelet is tearing
//! its sandbox down), or is a local pod whose sandbox the runtime saw go away
//! ([`Engine::set_sandbox_gone`]); and an address two pods claim carries neither's
//! (a warning names both). The pod keeps its labels and identity for selectors, and
//! a local one stays an endpoint: only its address stops vouching for it.
//!
//! Must not: compute rows itself (`node_ports` and `flush` do), treat terminal pods
//! as selectable peers, or index a hostNetwork pod's addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};

use super::identities::IdentityKey;
use super::node_ports::{Claimant, HostPort};
use super::{Engine, NamedPort, ObjectKey, key_of};
use crate::policy::problem::{ObjectRef, Problem, Severity};
use crate::policy::rule::parse_protocol;
use crate::policy::selector::Labels;
use crate::tables::{IdentityId, NodePort};

#[derive(Debug)]
pub(super) struct PodState {
    pub(super) uid: String,
    pub(super) labels: Labels,
    /// Its addresses; for a hostNetwork pod its node's, kept for `explain` only.
    pub(super) ips: Vec<IpAddr>,
    /// On this node and not finished.
    pub(super) local: bool,
    pub(super) host_network: bool,
    pub(super) named_ports: Arc<Vec<NamedPort>>,
    /// A local hostNetwork pod's declared `(protocol, containerPort)`: the ports it
    /// binds on the node's addresses.
    pub(super) listen_ports: Vec<(u8, u16)>,
    /// A local pod's `hostPort`s (never a hostNetwork pod's: nothing is rewritten).
    pub(super) host_ports: Vec<HostPort>,
    /// Present iff `host_ports` is not empty.
    pub(super) host_port_identity: Option<IdentityId>,
    pub(super) identity: Option<IdentityId>,
    /// Every container terminated while the Pod is being deleted: its sandbox is
    /// going, and its address with it.
    pub(super) stopped: bool,
    /// A local pod whose sandbox (host veth, cgroup) the runtime saw disappear.
    pub(super) sandbox_gone: bool,
}

impl PodState {
    /// Whether the pod is one of this node's endpoints (isolated, if a policy says so).
    pub(super) fn is_endpoint(&self) -> bool {
        self.local && !self.host_network
    }

    /// The addresses that map to its identity in the address index.
    pub(super) fn indexed_ips(&self) -> &[IpAddr] {
        if self.host_network || self.stopped || self.sandbox_gone {
            &[]
        } else {
            &self.ips
        }
    }
}

/// Whether the Pod's status says its containers are done and it is on its way out:
/// being deleted, and every container (init containers aside) terminated. The
/// kubelet reports this before it removes the sandbox and long before the object
/// goes. Without a deletion it is a restart in progress: the sandbox and its address
/// stay the pod's.
fn stopped(pod: &Pod, status: &PodStatus) -> bool {
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    pod.metadata.deletion_timestamp.is_some()
        && !statuses.is_empty()
        && statuses
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
}

/// What a pod's container ports declare.
struct DeclaredPorts {
    named: Vec<NamedPort>,
    /// Every `(protocol, containerPort)`: what a hostNetwork pod binds on its node.
    listen: Vec<(u8, u16)>,
    /// Every `hostPort`: what the node DNATs to the pod (unless it is hostNetwork).
    host: Vec<HostPort>,
    /// `listen` with the fields that declare it, as the node ports of a hostNetwork
    /// pod (nothing rewrites them, but they lead to the pod, not the node).
    listen_fields: Vec<HostPort>,
}

/// The ports of every container and init container (sidecars serve ports too).
fn declared_ports(spec: &PodSpec) -> DeclaredPorts {
    let main = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c));
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
    let mut out = DeclaredPorts {
        named: Vec::new(),
        listen: Vec::new(),
        host: Vec::new(),
        listen_fields: Vec::new(),
    };
    for (field, container) in main.chain(init) {
        for (j, port) in container.ports.iter().flatten().enumerate() {
            let (Some(protocol), Ok(number)) = (
                parse_protocol(port.protocol.as_deref()),
                u16::try_from(port.container_port),
            ) else {
                continue;
            };
            if let Some(name) = &port.name {
                out.named.push(NamedPort {
                    name: name.clone(),
                    protocol,
                    port: number,
                });
            }
            out.listen.push((protocol, number));
            out.listen_fields.push(HostPort {
                protocol,
                host_port: number,
                container_port: number,
                field: format!("{field}.ports[{j}].containerPort"),
            });
            if let Some(host_port) = port
                .host_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
            {
                out.host.push(HostPort {
                    protocol,
                    host_port,
                    container_port: number,
                    field: format!("{field}.ports[{j}].hostPort"),
                });
            }
        }
    }
    out.named.sort();
    out.named.dedup();
    out.listen.sort();
    out.listen.dedup();
    out
}

impl Engine {
    pub fn upsert_pod(&mut self, pod: &Pod) {
        let key = key_of(&pod.metadata);
        let uid = pod
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", key.0, key.1));
        if self.objects.pod(&key).is_some_and(|old| old.uid != uid) {
            // Same name, new pod: a new endpoint.
            self.remove_pod_state(&key);
            self.flush();
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        // Terminal pods no longer hold an IP.
        let selectable = !matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let host_network = spec.host_network == Some(true);
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
        let stopped = stopped(pod, &status);
        // Same pod (same UID): what the runtime saw of its sandbox still holds.
        let sandbox_gone = local && self.objects.pod(&key).is_some_and(|old| old.sandbox_gone);
        let declared = declared_ports(&spec);
        let listen_ports = if local && host_network {
            declared.listen
        } else {
            Vec::new()
        };
        // What reaching the node's address on a port leads to: a pod's hostPorts
        // (DNAT to its containerPort), or the ports a local hostNetwork pod declares
        // (the pod itself, docs/semantics.md "What counts as the node"): both decided on the pod, with the same rows.
        let host_ports = match (local, host_network) {
            (true, false) => declared.host,
            (true, true) => declared.listen_fields,
            (false, _) => Vec::new(),
        };
        let named_ports = Arc::new(declared.named);
        let dns_backend = !host_network && self.is_dns_backend(&ips);
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
        let old_host_port_identity = self.objects.pod(&key).and_then(|p| p.host_port_identity);
        let host_port_identity = match (host_ports.is_empty(), old_host_port_identity) {
            (true, _) => None,
            (false, Some(id)) => Some(id),
            (false, None) => Some(
                self.identities
                    .allocate(super::ids::stable_hash("pod-hostport", &key)),
            ),
        };
        let mut claims: BTreeMap<NodePort, Vec<String>> = BTreeMap::new();
        for mapping in &host_ports {
            let port = NodePort {
                protocol: mapping.protocol,
                port: mapping.host_port,
            };
            claims.entry(port).or_default().push(mapping.field.clone());
        }
        let old = self.objects.insert_pod(
            &key,
            PodState {
                uid,
                labels,
                ips,
                local,
                host_network,
                named_ports,
                listen_ports,
                host_ports,
                host_port_identity,
                identity: new_identity,
                stopped,
                sandbox_gone,
            },
        );
        let (old_ips, old_identity, was_local, was_listening) = match old {
            Some(old) => {
                let was_listening = old.local && old.host_network;
                (
                    old.indexed_ips().to_vec(),
                    old.identity,
                    old.local,
                    was_listening,
                )
            }
            None => (Vec::new(), None, false, false),
        };
        if old_identity != new_identity
            && let Some(id) = old_identity
        {
            self.leave_identity(id, &key);
        }
        let new_ips = self
            .objects
            .pod(&key)
            .map(|p| p.indexed_ips().to_vec())
            .unwrap_or_default();
        self.ips_changed(
            &key,
            &old_ips,
            &new_ips,
            old_identity != new_identity,
            [old_identity, new_identity],
        );
        if was_listening || (local && host_network) {
            // What listens on this node's addresses may have changed.
            let mut services = BTreeSet::new();
            self.services_at_node(&mut services);
            self.dirty.services(services);
        }
        self.set_node_port_claims(&Claimant::Pod(key.clone()), claims);
        if host_port_identity.is_none()
            && let Some(old) = old_host_port_identity
        {
            self.purge_identity(old);
        }
        if host_port_identity.is_some() {
            self.dirty.host_port(key.clone());
        }
        if local || was_local {
            self.dirty.endpoint(key);
        }
        self.flush();
    }

    /// The runtime saw the sandbox of local pod `namespace/name` (UID `uid`) go away
    /// (`gone`), or a new one of that same pod appear. While it is gone, the pod's
    /// addresses carry no identity: the IP may already be another pod's (the kubelet
    /// deletes the Pod object well after the sandbox). Whether anything changed; a
    /// different UID (a new pod of that name) changes nothing.
    pub fn set_sandbox_gone(&mut self, namespace: &str, name: &str, uid: &str, gone: bool) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(moved) = self.objects.set_sandbox_gone(&key, uid, gone) else {
            return false;
        };
        let identity = moved.identity;
        self.ips_changed(&key, &moved.old, &moved.new, false, [identity, identity]);
        self.flush();
        true
    }

    /// A warning per pod claiming an address another pod claims too.
    pub(super) fn address_conflict_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (ip, claimants) in self.objects.address_conflicts() {
            let claimants: Vec<&ObjectKey> = claimants.collect();
            for key in &claimants {
                let others: Vec<String> = claimants
                    .iter()
                    .filter(|other| *other != key)
                    .map(|(ns, name)| format!("Pod {ns}/{name}"))
                    .collect();
                out.push(Problem {
                    object: ObjectRef::new("Pod", &key.0, &key.1),
                    field: "status.podIPs".to_owned(),
                    value: ip.to_string(),
                    message: format!(
                        "address also claimed by {}; it carries neither pod's identity until only one claims it",
                        others.join(" and ")
                    ),
                    severity: Severity::Warning,
                });
            }
        }
        out
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.remove_pod_state(&key);
        self.flush();
    }

    fn remove_pod_state(&mut self, key: &ObjectKey) {
        let Some(old) = self.objects.remove_pod(key) else {
            return;
        };
        if let Some(id) = old.identity {
            self.leave_identity(id, key);
        }
        self.ips_changed(key, old.indexed_ips(), &[], true, [old.identity, None]);
        if old.local && old.host_network {
            let mut services = BTreeSet::new();
            self.services_at_node(&mut services);
            self.dirty.services(services);
        }
        self.set_node_port_claims(&Claimant::Pod(key.clone()), BTreeMap::new());
        if let Some(id) = old.host_port_identity {
            self.purge_identity(id);
        }
        self.dirty.endpoint(key.clone());
    }

    fn ips_changed(
        &mut self,
        key: &ObjectKey,
        old: &[IpAddr],
        new: &[IpAddr],
        identity_changed: bool,
        identities: [Option<IdentityId>; 2],
    ) {
        self.objects.move_pod_addresses(key, old, new);
        let changed = identity_changed || old != new;
        let mut host_ports = BTreeSet::new();
        for ip in old.iter().chain(new) {
            self.refresh_address(*ip);
            if !changed {
                continue;
            }
            let mut services = self.objects.backend_services(ip).peekable();
            if services.peek().is_some() {
                // Backend of a Service: its rows, and ServiceBackends peers, may change.
                self.dirty.services(services.cloned());
                self.dirty.identities(identities.into_iter().flatten());
            }
            // A host-port pod at this address: its rows follow the address.
            self.host_ports_at(*ip, &mut host_ports);
        }
        self.dirty.host_ports(host_ports);
    }
}
