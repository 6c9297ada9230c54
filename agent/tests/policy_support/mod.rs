//! Fixture builders on the real Kubernetes types, shared by the policy tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rayfence::crd::RayCluster;
use rayfence::policy::{Engine, Settings};
use rayfence::tables::{Direction, protocol};

pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "192.168.0.10";
pub const OTHER_NODE_IP: &str = "192.168.0.11";

pub fn settings() -> Settings {
    Settings::new(NODE, vec![NODE_IP.parse().unwrap()])
}

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

/// Feeds every document of a fixture (RayCluster, Pod, Namespace, Service, ...).
pub fn feed(engine: &mut Engine, text: &str) {
    for doc in fixture_docs(text) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "RayCluster" => engine.upsert_raycluster(&serde_json::from_value(doc).unwrap()),
            "Pod" => engine.upsert_pod(&serde_json::from_value(doc).unwrap()),
            "Namespace" => engine.upsert_namespace(&serde_json::from_value(doc).unwrap()),
            "Service" => engine.upsert_service(&serde_json::from_value(doc).unwrap()),
            "EndpointSlice" => engine.upsert_endpoint_slice(&serde_json::from_value(doc).unwrap()),
            "NetworkPolicy" => engine.upsert_network_policy(&serde_json::from_value(doc).unwrap()),
            other => panic!("unexpected kind {other}"),
        }
    }
}

pub fn proto(name: &str) -> u8 {
    match name {
        "TCP" => protocol::TCP,
        "UDP" => protocol::UDP,
        "SCTP" => protocol::SCTP,
        "ICMP" => protocol::ICMP,
        _ => panic!("protocol {name}"),
    }
}

/// The verdict the tables give local pod `ns/name` for a new flow.
pub fn allows(
    engine: &Engine,
    ns: &str,
    name: &str,
    direction: Direction,
    peer: &str,
    protocol: &str,
    port: u16,
) -> bool {
    let id = engine
        .endpoint_id(ns, name)
        .unwrap_or_else(|| panic!("{ns}/{name} is not a local endpoint"));
    let peer: IpAddr = peer.parse().unwrap();
    let verdict = engine
        .tables()
        .allows(id, direction, peer, proto(protocol), port);
    // `explain` is computed from the same data and must agree.
    assert_eq!(
        engine
            .explain(id, direction, peer, proto(protocol), port)
            .allowed(),
        verdict,
        "explain disagrees for {ns}/{name} {direction:?} {peer} {protocol}/{port}: {:?}",
        engine.explain(id, direction, peer, proto(protocol), port)
    );
    verdict
}

/// The verdict for a new flow of local pod `ns/name` whose peer the datapath knows by
/// its socket's cgroup (a hostNetwork pod of this node with identity `peer_identity`)
/// at address `peer`; `explain_identified` must agree.
#[expect(clippy::too_many_arguments, reason = "a flow has that many parts")]
pub fn allows_identified(
    engine: &Engine,
    ns: &str,
    name: &str,
    direction: Direction,
    peer: &str,
    peer_identity: u32,
    protocol: &str,
    port: u16,
) -> bool {
    let id = engine
        .endpoint_id(ns, name)
        .unwrap_or_else(|| panic!("{ns}/{name} is not a local endpoint"));
    let peer: IpAddr = peer.parse().unwrap();
    let verdict = engine.tables().allows_identified(
        id,
        direction,
        peer,
        peer_identity,
        proto(protocol),
        port,
    );
    let why = engine.explain_identified(id, direction, peer, peer_identity, proto(protocol), port);
    assert_eq!(
        why.allowed(),
        verdict,
        "explain disagrees for {ns}/{name} {direction:?} {peer} as {peer_identity} {protocol}/{port}: {why:?}"
    );
    verdict
}

pub fn ingress(
    engine: &Engine,
    ns: &str,
    name: &str,
    from: &str,
    protocol: &str,
    port: u16,
) -> bool {
    allows(engine, ns, name, Direction::Ingress, from, protocol, port)
}

pub fn egress(engine: &Engine, ns: &str, name: &str, to: &str, protocol: &str, port: u16) -> bool {
    allows(engine, ns, name, Direction::Egress, to, protocol, port)
}

/// A full rebuild from the engine's own inputs must equal the incremental state.
pub fn tables_after_replay(
    settings: Settings,
    feed_all: impl FnOnce(&mut Engine),
) -> rayfence::tables::Tables {
    let mut engine = Engine::new(settings);
    feed_all(&mut engine);
    engine.tables().clone()
}

/// An expected verdict in [`expect_ingress`] / [`expect_egress`] tables.
pub const ALLOW: bool = true;
pub const DENY: bool = false;

/// Asserts each `(peer, protocol, port, verdict)` of a table for new flows of local pod
/// `ns/name` in `direction`, through [`allows`] (so `explain` must agree too).
#[track_caller]
pub fn expect_flows(
    engine: &Engine,
    ns: &str,
    name: &str,
    direction: Direction,
    table: &[(&str, &str, u16, bool)],
) {
    for &(peer, protocol, port, verdict) in table {
        assert_eq!(
            allows(engine, ns, name, direction, peer, protocol, port),
            verdict,
            "{ns}/{name} {direction:?} {peer} {protocol}/{port} should be {}",
            if verdict { "allowed" } else { "denied" }
        );
    }
}

#[track_caller]
pub fn expect_ingress(engine: &Engine, ns: &str, name: &str, table: &[(&str, &str, u16, bool)]) {
    expect_flows(engine, ns, name, Direction::Ingress, table);
}

#[track_caller]
pub fn expect_egress(engine: &Engine, ns: &str, name: &str, table: &[(&str, &str, u16, bool)]) {
    expect_flows(engine, ns, name, Direction::Egress, table);
}
