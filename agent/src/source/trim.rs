//! Dropping the fields the engine never reads from every object a source hands
//! on (the Kubernetes watches and the manifests directory alike), so holding every
//! pod of a large cluster stays cheap.
//!
//! Must not: drop anything the engine, discovery or the explain/status answers read.
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Object;
use crate::crd::RayCluster;
use crate::policy::netpol::UNKNOWN_RULE_FIELDS_ANNOTATION;

/// The kubectl annotation that holds a whole copy of the object: never read, often
/// the biggest field.
pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Trims `object` in place (see the module docs).
pub fn trim(object: &mut Object) {
    match object {
        Object::RayCluster(o) => trim_raycluster(o),
        Object::Pod(o) => trim_pod(o),
        Object::Namespace(o) => trim_namespace(o),
        Object::Service(o) => trim_service(o),
        Object::EndpointSlice(o) => trim_endpointslice(o),
        Object::NetworkPolicy(o) => trim_networkpolicy(o),
        Object::Node(o) => trim_node(o),
    }
}

/// Metadata every kind keeps: identity, labels, and (where asked) annotations; never
/// `managedFields` or the last-applied copy.
pub(super) fn trim_meta(meta: &mut ObjectMeta, keep_annotations: bool) {
    meta.managed_fields = None;
    if keep_annotations {
        if let Some(a) = meta.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
    } else {
        meta.annotations = None;
    }
}

/// RayCluster: annotations stay (`rayfence.io/network-policy`), ownerReferences stay
/// (RayJob submitters); of `headGroupSpec` only `rayStartParams` is read.
pub(super) fn trim_raycluster(rc: &mut RayCluster) {
    trim_meta(&mut rc.metadata, true);
    if let Some(head) = rc.spec.head_group_spec.as_mut() {
        let params = head.get("rayStartParams").cloned();
        let mut kept = serde_json::Map::new();
        if let Some(params) = params {
            kept.insert("rayStartParams".to_owned(), params);
        }
        *head = serde_json::Value::Object(kept);
    }
}

/// Pod: labels, uid, node, host network, container ports (named ports), phase,
/// IPs and QoS class (the cgroup path). Everything else goes: images, env, volumes,
/// probes and statuses are most of a pod's size.
pub(super) fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata, false);
    pod.metadata.owner_references = None;
    if let Some(spec) = pod.spec.take() {
        let ports_only = |c: Container| Container {
            name: c.name,
            ports: c.ports,
            ..Container::default()
        };
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec.containers.into_iter().map(ports_only).collect(),
            init_containers: spec
                .init_containers
                .map(|cs| cs.into_iter().map(ports_only).collect()),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            host_ips: status.host_ips,
            qos_class: status.qos_class,
            ..PodStatus::default()
        });
    }
}

pub(super) fn trim_namespace(ns: &mut Namespace) {
    trim_meta(&mut ns.metadata, false);
    ns.status = None;
}

pub(super) fn trim_service(svc: &mut Service) {
    trim_meta(&mut svc.metadata, false);
    svc.status = None;
}

pub(super) fn trim_endpointslice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata, false);
}

/// NetworkPolicy: of its annotations only the one the manifests source sets on a
/// policy whose rules have fields it does not know (it makes the policy stricter).
pub(super) fn trim_networkpolicy(np: &mut NetworkPolicy) {
    let unknown = np
        .metadata
        .annotations
        .as_mut()
        .and_then(|a| a.remove_entry(UNKNOWN_RULE_FIELDS_ANNOTATION));
    trim_meta(&mut np.metadata, false);
    if let Some((key, value)) = unknown {
        np.metadata.annotations = Some([(key, value)].into_iter().collect());
    }
}

/// Node: only its addresses (and pod CIDRs) are read; `status.images` alone can be
/// tens of kilobytes.
pub(super) fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata, false);
    node.spec = node.spec.take().map(|s| NodeSpec {
        pod_cidr: s.pod_cidr,
        pod_cidrs: s.pod_cidrs,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}
