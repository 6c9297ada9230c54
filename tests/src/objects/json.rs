//! Kubernetes objects as JSON, the way the agent reads them from a manifests
//! directory or the fake API server serves them: Namespaces, Nodes and running Pods
//! with a topology's addresses, Ray's head and worker labels, RayClusters with a
//! `spec.networkPolicy`. Shared by the end-to-end tests and the scale benchmark.
//! Must not: start anything or write files (see [`crate::agent::Manifests`]).

use serde_json::{Value, json};

use crate::{Node, Pod};

/// A label map (`metadata.labels`) from `(key, value)` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect(),
    )
}

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

pub fn node_object(name: &str, node: &Node) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [
               {"type": "InternalIP", "address": node.ip4.to_string()},
               {"type": "InternalIP", "address": node.ip6.to_string()}]}})
}

/// A running pod on `node_name` with the topology pod's addresses.
pub fn pod_object(
    ns: &str,
    pod: &Pod,
    uid: &str,
    node_name: &str,
    labels: &[(&str, &str)],
) -> Value {
    let labels = self::labels(labels);
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod.name, "namespace": ns, "uid": uid, "labels": labels},
           "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "qosClass": "Guaranteed",
                      "podIP": pod.ip4.to_string(),
                      "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}]}})
}

pub fn head_labels(cluster: &str) -> Vec<(&str, &str)> {
    vec![
        ("ray.io/cluster", cluster),
        ("ray.io/node-type", "head"),
        ("ray.io/group", "headgroup"),
    ]
}

pub fn worker_labels(cluster: &str) -> Vec<(&str, &str)> {
    vec![
        ("ray.io/cluster", cluster),
        ("ray.io/node-type", "worker"),
        ("ray.io/group", "small"),
    ]
}

/// A RayCluster with `spec.networkPolicy` = `policy`.
pub fn raycluster(ns: &str, name: &str, policy: Value) -> Value {
    json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
           "metadata": {"name": name, "namespace": ns, "uid": format!("rc-{name}")},
           "spec": {"networkPolicy": policy}})
}
