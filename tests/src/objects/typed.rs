//! Kubernetes objects on their real types (k8s-openapi, the agent's `RayCluster`), as
//! the policy engine takes them: metadata, namespaces, pods with container ports,
//! Services, EndpointSlices, and RayClusters / NetworkPolicies from YAML. Shared by
//! the policy tests and the engine benchmark. Must not: decide or assert anything.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rayfence::crd::RayCluster;

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn meta(ns: &str, name: &str, l: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: (!ns.is_empty()).then(|| ns.to_owned()),
        name: Some(name.to_owned()),
        uid: Some(format!("uid-{ns}-{name}")),
        labels: (!l.is_empty()).then(|| labels(l)),
        ..Default::default()
    }
}

pub fn namespace(name: &str, l: &[(&str, &str)]) -> Namespace {
    let mut all = labels(l);
    all.insert("kubernetes.io/metadata.name".into(), name.into());
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(all),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A pod; `ports` are (name, protocol, port).
pub fn pod(
    ns: &str,
    name: &str,
    l: &[(&str, &str)],
    ip: &str,
    node: &str,
    ports: &[(&str, &str, i32)],
) -> Pod {
    Pod {
        metadata: meta(ns, name, l),
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "c".into(),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .iter()
                        .map(|(n, p, port)| ContainerPort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            protocol: Some(p.to_string()),
                            container_port: *port,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    }
}

/// A ClusterIP service; `ports` are (name, protocol, port).
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, &str, i32)]) -> Service {
    Service {
        metadata: meta(ns, name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, port)| ServicePort {
                        name: Some(n.to_string()),
                        protocol: Some(p.to_string()),
                        port: *port,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service of `type_` (`NodePort`, `LoadBalancer`, ...); `ports` are (name,
/// protocol, port, nodePort), a nodePort of 0 meaning none.
pub fn exposed_service(
    ns: &str,
    name: &str,
    type_: &str,
    cluster_ip: &str,
    ports: &[(&str, &str, i32, i32)],
) -> Service {
    let mut svc = service(
        ns,
        name,
        cluster_ip,
        &ports
            .iter()
            .map(|(n, p, port, _)| (*n, *p, *port))
            .collect::<Vec<_>>(),
    );
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some(type_.into());
    for (port, (.., node_port)) in spec.ports.iter_mut().flatten().zip(ports) {
        port.node_port = (*node_port != 0).then_some(*node_port);
    }
    svc
}

/// `pod` with one more container port: `protocol` `container_port`, published on the
/// node as `host_port` (what the CNI portmap plugin DNATs).
pub fn with_host_port(mut pod: Pod, protocol: &str, container_port: i32, host_port: i32) -> Pod {
    let container = &mut pod.spec.as_mut().unwrap().containers[0];
    container
        .ports
        .get_or_insert_with(Vec::new)
        .push(ContainerPort {
            protocol: Some(protocol.into()),
            container_port,
            host_port: Some(host_port),
            ..Default::default()
        });
    pod
}

/// `pod` as a hostNetwork pod: `spec.hostNetwork: true`, its IPs those given (its
/// node's address, as the kubelet reports them).
pub fn host_network(mut pod: Pod) -> Pod {
    pod.spec.as_mut().unwrap().host_network = Some(true);
    pod
}

/// An EndpointSlice of `service`; `ports` are (name, protocol, target port).
pub fn slice(
    ns: &str,
    service: &str,
    ports: &[(&str, &str, i32)],
    addresses: &[&str],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            ns,
            &format!("{service}-slice"),
            &[("kubernetes.io/service-name", service)],
        ),
        address_type: "IPv4".into(),
        endpoints: Some(
            addresses
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.to_string()],
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|(n, p, port)| EndpointPort {
                    name: Some(n.to_string()),
                    protocol: Some(p.to_string()),
                    port: Some(*port),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

pub fn raycluster(yaml: &str) -> RayCluster {
    serde_norway::from_str(yaml).expect("RayCluster YAML")
}

pub fn netpol(yaml: &str) -> NetworkPolicy {
    serde_norway::from_str(yaml).expect("NetworkPolicy YAML")
}

/// Every document of a fixture file, as JSON values.
pub fn fixture_docs(text: &str) -> Vec<serde_json::Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("fixture YAML"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}
