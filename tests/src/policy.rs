//! The policy engine's verdicts as the policy tests ask for them: a node's settings,
//! feeding a fixture file's documents, the verdict of `Tables::allows` for a flow of
//! a local pod (with `explain` checked to agree), and truth-table assertions. The
//! objects themselves come from [`crate::objects::typed`]. Must not: build objects.

use std::net::IpAddr;

use rayfence::policy::{Engine, Settings};
use rayfence::tables::{Direction, protocol};

use crate::objects::typed::fixture_docs;

pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "192.168.0.10";
pub const OTHER_NODE_IP: &str = "192.168.0.11";

pub fn settings() -> Settings {
    Settings::new(NODE, vec![NODE_IP.parse().unwrap()])
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
