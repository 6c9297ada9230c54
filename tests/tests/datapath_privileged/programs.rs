//! The eBPF programs on crafted packets through BPF_PROG_TEST_RUN, one behaviour per
//! test. Each test loads its own private (unpinned) maps and registers ifindex 1
//! (the loopback device the kernel gives a TC test run) as the endpoint under test,
//! so tests run in parallel and leave nothing behind. Needs root.

use std::collections::BTreeMap;

use rayfence::datapath::{Capacities, Datapath, DatapathError, DatapathOptions, Hook};
use rayfence::tables::{EndpointPolicy, PolicyEntry, Tables, protocol};
use rayfence_common::{CounterValue, Direction, Reason, Verdict, endpoint_flags, identity};
use rayfence_tests::counters::{self, Counters};
use rayfence_tests::packet::*;

const EP: u32 = 7;
const POLICY: u32 = 1;
const POD: &str = "10.0.0.7";
const POD6: &str = "fd00::7";
const NODE: &str = "10.0.0.1";
/// Same RayCluster: everything, both ways.
const PEER: &str = "10.0.0.8";
const PEER6: &str = "fd00::8";
const PEER_ID: u32 = 300;
/// Allowed in on TCP 8000-8999 and out on UDP 53.
const CLIENT: &str = "10.0.1.9";
const CLIENT_ID: u32 = 301;
/// 192.168.0.0/16 except 192.168.1.0/24: allowed out on TCP 443.
const BLOCK_ID: u32 = 400;
const EXCEPT_ID: u32 = 401;
const OUTSIDE: &str = "192.168.5.5";
const EXCEPTED: &str = "192.168.1.5";
const STRANGER: &str = "10.9.9.9";

fn endpoint(isolate_ingress: bool, isolate_egress: bool, audit: bool) -> EndpointPolicy {
    EndpointPolicy {
        policy_id: POLICY,
        isolate_ingress,
        isolate_egress,
        audit,
    }
}

fn tables() -> Tables {
    let mut tables = Tables::default();
    tables.endpoints.insert(EP, endpoint(true, true, false));
    tables.addresses.insert(ip(POD), 299);
    tables.addresses.insert(ip(PEER), PEER_ID);
    tables.addresses.insert(ip(PEER6), PEER_ID);
    tables.addresses.insert(ip(CLIENT), CLIENT_ID);
    tables.addresses.insert(ip(NODE), identity::HOST);
    tables
        .cidrs
        .insert("192.168.0.0/16".parse().unwrap(), BLOCK_ID);
    tables
        .cidrs
        .insert("192.168.1.0/24".parse().unwrap(), EXCEPT_ID);
    for direction in Direction::ALL {
        tables
            .policy
            .insert(PolicyEntry::any(POLICY, direction, PEER_ID));
    }
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Ingress,
        CLIENT_ID,
        protocol::TCP,
        8000,
        8999,
    ));
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Egress,
        CLIENT_ID,
        protocol::UDP,
        53,
        53,
    ));
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Egress,
        BLOCK_ID,
        protocol::TCP,
        443,
        443,
    ));
    tables
}

fn load(options: &DatapathOptions, tables: &Tables) -> Datapath {
    let mut datapath = Datapath::load(options).expect("load the datapath (root needed)");
    datapath.register_tc(EP, 1).expect("register ifindex 1");
    datapath.apply(tables).expect("apply tables");
    datapath
}

fn datapath_with(tables: &Tables) -> Datapath {
    load(&DatapathOptions::private(), tables)
}

fn datapath() -> Datapath {
    datapath_with(&tables())
}

/// Pod egress: what the pod sends, seen at TC ingress of its host veth.
fn send(datapath: &Datapath, frame: &[u8]) -> bool {
    datapath
        .test_run(Hook::TcIngress, frame, 1)
        .expect("test run")
        .passed
}

/// Pod ingress: what the pod receives, seen at TC egress of its host veth.
fn receive(datapath: &Datapath, frame: &[u8]) -> bool {
    datapath
        .test_run(Hook::TcEgress, frame, 1)
        .expect("test run")
        .passed
}

fn counter(
    datapath: &Datapath,
    direction: Direction,
    verdict: Verdict,
    reason: Reason,
) -> CounterValue {
    counters::value(&counters(datapath), EP, direction, verdict, reason)
}

fn counters(datapath: &Datapath) -> Counters {
    datapath.counters().expect("read counters")
}

fn packets(datapath: &Datapath, direction: Direction, verdict: Verdict, reason: Reason) -> u64 {
    counter(datapath, direction, verdict, reason).packets
}

/// TCP flags (`rayfence_tests::packet::tcp` sends a bare SYN).
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A TCP segment with `flags`.
fn tcp_with(src: &str, src_port: u16, dst: &str, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut header = tcp_header(src_port, dst_port);
    header[13] = flags;
    frame_of(&ip_packet(ip(src), ip(dst), TCP, &header))
}

/// A data segment of an established connection (PSH, ACK).
fn data(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Vec<u8> {
    tcp_with(src, src_port, dst, dst_port, PSH | ACK)
}

/// Every counter row of the endpoint, as (direction, verdict, reason) -> packets.
fn rows(datapath: &Datapath) -> BTreeMap<(Direction, Verdict, Reason), u64> {
    counters::rows(&counters(datapath), EP)
}

#[test]
fn allowed_egress_to_cluster_peer_passes_and_counts_one_new_flow() {
    let dp = datapath();
    let frame = tcp(POD, 40000, PEER, 80);
    assert!(send(&dp, &frame));
    let row = counter(&dp, Direction::Egress, Verdict::Allow, Reason::PolicyAllow);
    assert_eq!(row.packets, 1);
    assert_eq!(row.bytes, frame.len() as u64);
}

#[test]
fn established_packets_add_no_counter_work() {
    let dp = datapath();
    for _ in 0..5 {
        assert!(send(&dp, &tcp(POD, 40000, PEER, 80)));
    }
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Allow, Reason::PolicyAllow),
        1
    );
    assert_eq!(counters(&dp).len(), 1);
}

#[test]
fn denied_ingress_is_dropped_and_counted() {
    let dp = datapath();
    let frame = tcp(STRANGER, 5555, POD, 22);
    assert!(!receive(&dp, &frame));
    assert!(!receive(&dp, &frame));
    let row = counter(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy);
    assert_eq!(row.packets, 2);
    assert_eq!(row.bytes, 2 * frame.len() as u64);
}

#[test]
fn denied_egress_is_dropped_and_counted() {
    let dp = datapath();
    assert!(!send(&dp, &tcp(POD, 40000, STRANGER, 80)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn reply_to_allowed_egress_passes() {
    let dp = datapath();
    assert!(send(&dp, &tcp(POD, 40001, OUTSIDE, 443)));
    assert!(receive(&dp, &tcp(OUTSIDE, 443, POD, 40001)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        0
    );
}

#[test]
fn unsolicited_packet_from_an_egress_peer_is_dropped() {
    let dp = datapath();
    assert!(send(&dp, &tcp(POD, 40001, OUTSIDE, 443)));
    assert!(!receive(&dp, &tcp(OUTSIDE, 443, POD, 40002)));
}

#[test]
fn reply_to_allowed_ingress_passes() {
    let dp = datapath();
    assert!(receive(&dp, &tcp(CLIENT, 50000, POD, 8080)));
    assert!(send(&dp, &tcp(POD, 8080, CLIENT, 50000)));
    assert_eq!(counters(&dp).len(), 1, "{:?}", counters(&dp));
}

#[test]
fn port_range_edges_are_exact() {
    let dp = datapath();
    assert!(!receive(&dp, &tcp(CLIENT, 50000, POD, 7999)));
    assert!(receive(&dp, &tcp(CLIENT, 50000, POD, 8000)));
    assert!(receive(&dp, &tcp(CLIENT, 50000, POD, 8999)));
    assert!(!receive(&dp, &tcp(CLIENT, 50000, POD, 9000)));
}

#[test]
fn tcp_rule_does_not_allow_udp() {
    let dp = datapath();
    assert!(!receive(&dp, &udp(CLIENT, 50000, POD, 8080)));
    assert!(send(&dp, &udp(POD, 50000, CLIENT, 53)));
    assert!(!send(&dp, &tcp(POD, 50000, CLIENT, 53)));
}

#[test]
fn cidr_except_is_denied_and_the_rest_of_the_block_allowed() {
    let dp = datapath();
    assert!(send(&dp, &tcp(POD, 40000, "192.168.2.5", 443)));
    assert!(!send(&dp, &tcp(POD, 40000, EXCEPTED, 443)));
    assert!(!send(&dp, &tcp(POD, 40000, "192.168.2.5", 80)));
    assert!(!send(&dp, &tcp(POD, 40000, "192.169.0.1", 443)));
}

#[test]
fn ipv6_flows_are_enforced() {
    let dp = datapath();
    assert!(receive(&dp, &tcp(PEER6, 40000, POD6, 22)));
    assert!(!receive(&dp, &tcp("fd00::99", 40000, POD6, 22)));
    assert!(send(&dp, &udp(POD6, 40000, PEER6, 9999)));
    assert!(receive(&dp, &udp(PEER6, 9999, POD6, 40000)));
}

#[test]
fn ipv4_block_does_not_leak_to_ipv6_and_back() {
    let mut tables = tables();
    tables.cidrs.insert("::/0".parse().unwrap(), 402);
    tables
        .policy
        .insert(PolicyEntry::any(POLICY, Direction::Ingress, 402));
    let dp = datapath_with(&tables);
    assert!(receive(&dp, &tcp("fd00::99", 40000, POD6, 22)));
    assert!(!receive(&dp, &tcp(STRANGER, 40000, POD, 22)));
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    let dp = datapath();
    // Hop-by-hop options (8 bytes) then TCP.
    let mut payload = vec![TCP, 0, 1, 4, 0, 0, 0, 0];
    payload.extend_from_slice(&tcp_header(40000, 22));
    let allowed = frame_of(&ipv6_packet(ip(PEER6), ip(POD6), 0, &payload));
    assert!(receive(&dp, &allowed));
    let denied = frame_of(&ipv6_packet(ip("fd00::99"), ip(POD6), 0, &payload));
    assert!(!receive(&dp, &denied));
}

/// Headers past the window of direct packet reads go through bpf_skb_load_bytes.
#[test]
fn ports_far_into_the_packet_are_still_read() {
    let dp = datapath();
    // A 600-byte destination-options header (length field 74: (74 + 1) * 8).
    let mut payload = vec![TCP, 74];
    payload.resize(600, 0);
    payload.extend_from_slice(&tcp_header(40000, 8080));
    let allowed = frame_of(&ipv6_packet(ip(PEER6), ip(POD6), 60, &payload));
    assert!(receive(&dp, &allowed));
    let mut denied_payload = payload.clone();
    let ports = denied_payload.len() - 20;
    denied_payload[ports + 2..ports + 4].copy_from_slice(&22u16.to_be_bytes());
    let denied = frame_of(&ipv6_packet(ip("fd00::99"), ip(POD6), 60, &denied_payload));
    assert!(!receive(&dp, &denied));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn ipv6_extension_chain_longer_than_walked_is_malformed() {
    let dp = datapath();
    let mut payload = Vec::new();
    for _ in 0..8 {
        payload.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    payload.extend_from_slice(&tcp_header(40000, 22));
    let frame = frame_of(&ipv6_packet(ip(PEER6), ip(POD6), 60, &payload));
    assert!(!receive(&dp, &frame));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Malformed),
        1
    );
}

#[test]
fn related_icmp_fragmentation_needed_passes() {
    let dp = datapath();
    let original = ip_packet(ip(POD), ip(OUTSIDE), TCP, &tcp_header(40003, 443));
    assert!(send(&dp, &frame_of(&original)));
    // From a router on the path, not from the peer itself.
    assert!(receive(
        &dp,
        &icmp_error("10.0.0.254", POD, 3, 4, &original)
    ));
    assert_eq!(counters(&dp).len(), 1, "{:?}", counters(&dp));
}

#[test]
fn icmp_error_about_an_unknown_flow_is_dropped() {
    let dp = datapath();
    let original = ip_packet(ip(POD), ip(OUTSIDE), TCP, &tcp_header(40004, 443));
    assert!(!receive(
        &dp,
        &icmp_error("10.0.0.254", POD, 3, 4, &original)
    ));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn related_icmpv6_packet_too_big_passes() {
    let dp = datapath();
    let original = ip_packet(ip(POD6), ip(PEER6), TCP, &tcp_header(40005, 443));
    assert!(send(&dp, &frame_of(&original)));
    assert!(receive(&dp, &icmp_error("fd00::1", POD6, 2, 0, &original)));
    assert!(!receive(
        &dp,
        &icmp_error(
            "fd00::1",
            POD6,
            2,
            0,
            &ip_packet(ip(POD6), ip(PEER6), TCP, &tcp_header(40006, 443))
        )
    ));
}

#[test]
fn related_icmp_time_exceeded_for_an_allowed_ingress_flow_passes_outwards() {
    let dp = datapath();
    let original = ip_packet(ip(CLIENT), ip(POD), TCP, &tcp_header(50001, 8080));
    assert!(receive(&dp, &frame_of(&original)));
    // The pod reports an error about the packet it received.
    assert!(send(&dp, &icmp_error(POD, CLIENT, 11, 0, &original)));
}

#[test]
fn icmp_echo_needs_an_all_protocols_row() {
    let dp = datapath();
    assert!(send(&dp, &echo(POD, PEER, 77, false)));
    assert!(receive(&dp, &echo(PEER, POD, 77, true)));
    assert!(!send(&dp, &echo(POD, OUTSIDE, 78, false)));
    assert!(!receive(&dp, &echo(CLIENT, POD, 79, false)));
    assert!(send(&dp, &echo(POD6, PEER6, 80, false)));
}

#[test]
fn revoked_flow_is_dropped_after_the_policy_change() {
    let mut dp = datapath();
    assert!(send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    assert!(receive(&dp, &tcp_with(OUTSIDE, 443, POD, 40010, SYN | ACK)));
    let before = dp.generation(EP);
    let mut revoked = tables();
    revoked.policy.retain(|row| row.identity != BLOCK_ID);
    dp.apply(&revoked).expect("apply");
    assert!(dp.generation(EP) > before);
    assert!(!receive(&dp, &data(OUTSIDE, 443, POD, 40010)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Revoked),
        1
    );
    // The entry stays: the pod's next packet is re-checked as well, and revoked.
    assert!(!send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        0
    );
}

#[test]
fn flow_still_allowed_survives_an_unrelated_change() {
    let mut dp = datapath();
    assert!(send(&dp, &tcp(POD, 40011, OUTSIDE, 443)));
    let mut changed = tables();
    changed.policy.retain(|row| row.identity != CLIENT_ID);
    dp.apply(&changed).expect("apply");
    assert!(receive(&dp, &tcp(OUTSIDE, 443, POD, 40011)));
    assert!(send(&dp, &tcp(POD, 40011, OUTSIDE, 443)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Revoked),
        0
    );
}

#[test]
fn a_new_peer_address_does_not_make_established_flows_recheck() {
    let mut dp = datapath();
    let before = dp.generation(EP);
    let mut grown = tables();
    grown.addresses.insert(ip("10.0.0.99"), PEER_ID);
    dp.apply(&grown).expect("apply");
    assert_eq!(dp.generation(EP), before);
}

#[test]
fn peer_moving_to_another_identity_revokes_its_flows() {
    let mut dp = datapath();
    assert!(receive(&dp, &tcp(PEER, 40012, POD, 6379)));
    let mut moved = tables();
    moved.addresses.insert(ip(PEER), 999);
    dp.apply(&moved).expect("apply");
    assert!(!send(&dp, &data(POD, 6379, PEER, 40012)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        1
    );
}

/// DenyAllIngress (`true`: ingress isolated, egress not) or DenyAllEgress.
fn one_way(isolate_ingress: bool) -> Tables {
    let mut tables = tables();
    tables
        .endpoints
        .insert(EP, endpoint(isolate_ingress, !isolate_ingress, false));
    tables
}

/// `tables` without the rows for `identity` in `direction`: what revokes its flows.
fn without(mut tables: Tables, identity: u32, direction: Direction) -> Tables {
    tables
        .policy
        .retain(|row| !(row.identity == identity && row.direction == direction));
    tables
}

/// DenyAllIngress: CLIENT connected in on an ingress rule (TCP 8080), with the
/// handshake done; then the rule is removed.
fn revoked_ingress_connection() -> Datapath {
    let mut dp = datapath_with(&one_way(true));
    assert!(receive(&dp, &tcp(CLIENT, 50000, POD, 8080)));
    assert!(send(&dp, &tcp_with(POD, 8080, CLIENT, 50000, SYN | ACK)));
    assert!(receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    assert!(send(&dp, &data(POD, 8080, CLIENT, 50000)));
    let before = dp.generation(EP);
    dp.apply(&without(one_way(true), CLIENT_ID, Direction::Ingress))
        .expect("apply");
    assert!(dp.generation(EP) > before);
    dp
}

/// DenyAllEgress: the pod connected out to OUTSIDE on an egress rule (TCP 443),
/// with the handshake done; then the rule is removed.
fn revoked_egress_connection() -> Datapath {
    let mut dp = datapath_with(&one_way(false));
    assert!(send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    assert!(receive(&dp, &tcp_with(OUTSIDE, 443, POD, 40010, SYN | ACK)));
    assert!(send(&dp, &data(POD, 40010, OUTSIDE, 443)));
    assert!(receive(&dp, &data(OUTSIDE, 443, POD, 40010)));
    dp.apply(&without(one_way(false), BLOCK_ID, Direction::Egress))
        .expect("apply");
    dp
}

#[test]
fn revoked_ingress_flow_stays_cut_when_the_pod_sends_next_under_deny_all_ingress() {
    let mut dp = revoked_ingress_connection();
    let mut events = dp.take_events().expect("events");
    // The pod writes first, then retransmits: without the entry, its packet would
    // open an egress flow (egress is not isolated) and the peer's would pass as
    // replies.
    let write = data(POD, 8080, CLIENT, 50000);
    assert!(!send(&dp, &write));
    assert!(!send(&dp, &write));
    assert!(!receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    assert!(!receive(&dp, &tcp_with(CLIENT, 50000, POD, 8080, ACK)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 2),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 2),
        ])
    );
    assert_eq!(
        counter(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked).bytes,
        2 * write.len() as u64
    );
    let events = events.drain();
    assert_eq!(events.len(), 4, "{events:?}");
    for (event, direction) in events.iter().zip([
        Direction::Egress,
        Direction::Egress,
        Direction::Ingress,
        Direction::Ingress,
    ]) {
        assert_eq!(event.direction, direction as u8);
        assert_eq!(event.verdict, Verdict::Drop as u8);
        assert_eq!(event.reason, Reason::Revoked as u8);
        assert_eq!((event.local_port, event.peer_port), (8080, 50000));
        assert_eq!(rayfence_common_addr(event.peer), ip(CLIENT));
    }
    // The pod's other connections are untouched: its egress is not isolated.
    assert!(send(&dp, &tcp(POD, 40100, CLIENT, 9000)));
    assert!(receive(&dp, &tcp_with(CLIENT, 9000, POD, 40100, SYN | ACK)));
}

#[test]
fn revoked_egress_flow_stays_cut_when_the_peer_sends_next_under_deny_all_egress() {
    let dp = revoked_egress_connection();
    let push = data(OUTSIDE, 443, POD, 40010);
    assert!(!receive(&dp, &push));
    assert!(!receive(&dp, &push));
    assert!(!send(&dp, &data(POD, 40010, OUTSIDE, 443)));
    assert!(!send(&dp, &tcp_with(POD, 40010, OUTSIDE, 443, ACK)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Egress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 2),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 2),
        ])
    );
    // New connections to the pod are untouched: its ingress is not isolated.
    assert!(receive(&dp, &tcp(OUTSIDE, 5000, POD, 8080)));
    assert!(send(&dp, &tcp_with(POD, 8080, OUTSIDE, 5000, SYN | ACK)));
}

#[test]
fn re_allowing_a_revoked_flow_restores_it_in_both_directions() {
    let mut dp = revoked_ingress_connection();
    assert!(!send(&dp, &data(POD, 8080, CLIENT, 50000)));
    assert!(!receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    dp.apply(&one_way(true)).expect("apply");
    for _ in 0..2 {
        assert!(send(&dp, &data(POD, 8080, CLIENT, 50000)));
        assert!(receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    }
    // Refreshed, not re-opened: no new flow counted, no more drops.
    let expected = BTreeMap::from([
        ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
        ((Direction::Egress, Verdict::Drop, Reason::Revoked), 1),
        ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
    ]);
    assert_eq!(rows(&dp), expected);
    // Revoked again: cut again, from the first packet either way.
    dp.apply(&without(one_way(true), CLIENT_ID, Direction::Ingress))
        .expect("apply");
    assert!(!receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    assert!(!send(&dp, &data(POD, 8080, CLIENT, 50000)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        2
    );
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Revoked),
        2
    );
}

#[test]
fn the_pods_syn_on_a_revoked_tuple_is_decided_as_a_new_flow() {
    let dp = revoked_ingress_connection();
    assert!(!send(&dp, &data(POD, 8080, CLIENT, 50000)));
    // The pod connects out from the same port to the same peer port: a new
    // connection, and egress is not isolated.
    assert!(send(&dp, &tcp(POD, 8080, CLIENT, 50000)));
    assert!(receive(&dp, &tcp_with(CLIENT, 50000, POD, 8080, SYN | ACK)));
    assert!(send(&dp, &tcp_with(POD, 8080, CLIENT, 50000, ACK)));
    assert!(receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Egress, Verdict::Allow, Reason::NotIsolated), 1),
        ])
    );
}

#[test]
fn a_revoked_ipv6_flow_stays_cut_and_the_pods_syn_is_still_a_new_flow() {
    let mut dp = datapath_with(&one_way(true));
    assert!(receive(&dp, &tcp(PEER6, 50000, POD6, 8080)));
    assert!(send(&dp, &tcp_with(POD6, 8080, PEER6, 50000, SYN | ACK)));
    let mut moved = one_way(true);
    moved.addresses.insert(ip(PEER6), 999);
    dp.apply(&moved).expect("apply");
    assert!(!send(&dp, &data(POD6, 8080, PEER6, 50000)));
    assert!(!receive(&dp, &data(PEER6, 50000, POD6, 8080)));
    assert!(send(&dp, &tcp(POD6, 8080, PEER6, 50000)));
    assert!(receive(&dp, &tcp_with(PEER6, 50000, POD6, 8080, SYN | ACK)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Egress, Verdict::Allow, Reason::NotIsolated), 1),
        ])
    );
}

#[test]
fn a_syn_on_a_revoked_tuple_that_no_rule_allows_is_dropped_and_the_flow_stays_cut() {
    // Both directions isolated: CLIENT may only be reached on UDP 53.
    let mut dp = datapath();
    assert!(receive(&dp, &tcp(CLIENT, 50000, POD, 8080)));
    assert!(send(&dp, &tcp_with(POD, 8080, CLIENT, 50000, SYN | ACK)));
    dp.apply(&without(tables(), CLIENT_ID, Direction::Ingress))
        .expect("apply");
    assert!(!send(&dp, &tcp(POD, 8080, CLIENT, 50000)));
    assert!(!receive(&dp, &data(CLIENT, 50000, POD, 8080)));
    assert!(!send(&dp, &data(POD, 8080, CLIENT, 50000)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::NoPolicy), 1),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 1),
        ])
    );
}

#[test]
fn the_peers_syn_on_a_revoked_tuple_opens_a_new_flow_only_once_the_pod_answers_syn_ack() {
    let dp = revoked_egress_connection();
    // The peer's SYN the other way: a new flow, and ingress is not isolated.
    let syn = tcp(OUTSIDE, 443, POD, 40010);
    assert!(receive(&dp, &syn));
    // A pod still on the revoked connection answers with a challenge ACK: dropped,
    // and so is the peer's data before a handshake.
    assert!(!send(&dp, &tcp_with(POD, 40010, OUTSIDE, 443, ACK)));
    assert!(!send(&dp, &data(POD, 40010, OUTSIDE, 443)));
    assert!(!receive(&dp, &data(OUTSIDE, 443, POD, 40010)));
    // A retransmitted SYN passes, counted with the first.
    assert!(receive(&dp, &syn));
    // A pod without a connection on the tuple answers SYN-ACK: the new connection.
    assert!(send(&dp, &tcp_with(POD, 40010, OUTSIDE, 443, SYN | ACK)));
    assert!(receive(&dp, &tcp_with(OUTSIDE, 443, POD, 40010, ACK)));
    assert!(send(&dp, &data(POD, 40010, OUTSIDE, 443)));
    assert!(receive(&dp, &data(OUTSIDE, 443, POD, 40010)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Egress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Ingress, Verdict::Allow, Reason::NotIsolated), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 2),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
        ])
    );
}

#[test]
fn a_revoked_udp_flow_stays_cut_both_ways() {
    // UDP has no connection start: the pod's datagram the other way is the revoked
    // flow's, not a new one.
    let mut dp = datapath_with(&one_way(true));
    assert!(receive(&dp, &udp(PEER, 5000, POD, 9999)));
    assert!(send(&dp, &udp(POD, 9999, PEER, 5000)));
    let mut moved = one_way(true);
    moved.addresses.insert(ip(PEER), 999);
    dp.apply(&moved).expect("apply");
    assert!(!send(&dp, &udp(POD, 9999, PEER, 5000)));
    assert!(!send(&dp, &udp(POD, 9999, PEER, 5000)));
    assert!(!receive(&dp, &udp(PEER, 5000, POD, 9999)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 2),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
        ])
    );
    // Another tuple to the same peer is a new flow of the pod's.
    assert!(send(&dp, &udp(POD, 9998, PEER, 5000)));
    assert!(receive(&dp, &udp(PEER, 5000, POD, 9998)));
}

#[test]
fn an_icmp_error_about_a_revoked_flow_is_not_related() {
    let mut dp = datapath();
    let original = ip_packet(ip(POD), ip(OUTSIDE), TCP, &tcp_header(40003, 443));
    assert!(send(&dp, &frame_of(&original)));
    let error = icmp_error("10.0.0.254", POD, 3, 4, &original);
    dp.apply(&without(tables(), BLOCK_ID, Direction::Egress))
        .expect("apply");
    // Before and after a packet of the flow has found it revoked.
    assert!(!receive(&dp, &error));
    assert!(!send(&dp, &data(POD, 40003, OUTSIDE, 443)));
    assert!(!receive(&dp, &error));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Egress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Ingress, Verdict::Drop, Reason::NoPolicy), 2),
        ])
    );
}

#[test]
fn an_icmp_error_about_a_flow_still_allowed_passes_after_an_unrelated_change() {
    let mut dp = datapath();
    let original = ip_packet(ip(POD), ip(OUTSIDE), TCP, &tcp_header(40003, 443));
    assert!(send(&dp, &frame_of(&original)));
    let before = dp.generation(EP);
    dp.apply(&without(tables(), CLIENT_ID, Direction::Ingress))
        .expect("apply");
    assert!(dp.generation(EP) > before);
    assert!(receive(
        &dp,
        &icmp_error("10.0.0.254", POD, 3, 4, &original)
    ));
    assert_eq!(counters(&dp).len(), 1, "{:?}", counters(&dp));
}

fn audit_tables(audit: bool) -> Tables {
    let mut tables = tables();
    tables.endpoints.insert(EP, endpoint(true, true, audit));
    tables
}

#[test]
fn audit_mode_passes_a_would_be_dropped_flow_and_counts_it_once() {
    let dp = datapath_with(&audit_tables(true));
    let first = tcp(STRANGER, 5555, POD, 22);
    assert!(receive(&dp, &first));
    assert!(receive(&dp, &first));
    // The pod's reply hits the audited flow's entry: passes, counted nowhere.
    assert!(send(&dp, &tcp(POD, 22, STRANGER, 5555)));
    let audited = counter(&dp, Direction::Ingress, Verdict::Audit, Reason::NoPolicy);
    assert_eq!((audited.packets, audited.bytes), (1, first.len() as u64));
    // Another flow is another would-drop.
    assert!(receive(&dp, &tcp(STRANGER, 5556, POD, 22)));
    assert!(send(&dp, &udp(POD, 40001, STRANGER, 9)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Audit, Reason::NoPolicy),
        2
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Audit, Reason::NoPolicy),
        1
    );
    let drops: u64 = counters(&dp)
        .iter()
        .filter(|(key, _)| key.verdict == Verdict::Drop as u8)
        .map(|(_, value)| value.packets)
        .sum();
    assert_eq!(drops, 0);
}

#[test]
fn switching_audit_to_enforce_drops_the_next_packet_of_an_audited_flow() {
    let mut dp = datapath_with(&audit_tables(true));
    assert!(receive(&dp, &tcp(STRANGER, 5555, POD, 22)));
    let before = dp.generation(EP);
    dp.apply(&audit_tables(false)).expect("apply");
    assert!(dp.generation(EP) > before, "the audit flip re-checks flows");
    assert!(!receive(&dp, &data(STRANGER, 5555, POD, 22)));
    assert!(!receive(&dp, &data(STRANGER, 5555, POD, 22)));
    assert!(!send(&dp, &data(POD, 22, STRANGER, 5555)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        2
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Audit, Reason::NoPolicy),
        1
    );
}

#[test]
fn an_audited_flow_cut_by_enforce_is_not_reopened_by_the_pods_own_packet() {
    // DenyAllIngress: the pod's egress is not isolated, so a packet it sends would
    // open a flow of its own if the audited entry were gone.
    let ingress_only = |audit| {
        let mut tables = tables();
        tables.endpoints.insert(EP, endpoint(true, false, audit));
        tables
    };
    let mut dp = datapath_with(&ingress_only(true));
    assert!(receive(&dp, &tcp(STRANGER, 5555, POD, 8265)));
    assert!(send(&dp, &tcp_with(POD, 8265, STRANGER, 5555, SYN | ACK)));
    dp.apply(&ingress_only(false)).expect("apply");
    assert!(!send(&dp, &data(POD, 8265, STRANGER, 5555)));
    assert!(!receive(&dp, &data(STRANGER, 5555, POD, 8265)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    // The pod's own new flows still pass: egress is not isolated.
    assert!(send(&dp, &tcp(POD, 40100, STRANGER, 80)));
}

#[test]
fn an_allowed_flow_keeps_passing_across_audit_flips() {
    let mut dp = datapath_with(&audit_tables(true));
    assert!(receive(&dp, &tcp(CLIENT, 40000, POD, 8080)));
    assert!(send(&dp, &tcp(POD, 8080, CLIENT, 40000)));
    for audit in [false, true, false] {
        let before = dp.generation(EP);
        dp.apply(&audit_tables(audit)).expect("apply");
        assert!(dp.generation(EP) > before);
        assert!(
            receive(&dp, &tcp(CLIENT, 40000, POD, 8080)),
            "audit {audit}"
        );
        assert!(send(&dp, &tcp(POD, 8080, CLIENT, 40000)), "audit {audit}");
    }
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Allow, Reason::PolicyAllow),
        1
    );
    let not_allowed: u64 = counters(&dp)
        .iter()
        .filter(|(key, _)| key.verdict != Verdict::Allow as u8)
        .map(|(_, value)| value.packets)
        .sum();
    assert_eq!(not_allowed, 0);
}

#[test]
fn switching_enforce_to_audit_passes_the_next_packet_at_once() {
    let mut dp = datapath_with(&audit_tables(false));
    assert!(!receive(&dp, &tcp(STRANGER, 5555, POD, 22)));
    dp.apply(&audit_tables(true)).expect("apply");
    assert!(receive(&dp, &tcp(STRANGER, 5555, POD, 22)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Audit, Reason::NoPolicy),
        1
    );
}

#[test]
fn a_flow_revoked_in_audit_mode_passes_counted_once_then_drops_when_enforced() {
    let mut dp = datapath_with(&audit_tables(true));
    assert!(send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    let mut revoked = audit_tables(true);
    revoked.policy.retain(|row| row.identity != BLOCK_ID);
    dp.apply(&revoked).expect("apply");
    assert!(receive(&dp, &tcp(OUTSIDE, 443, POD, 40010)));
    assert!(send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Audit, Reason::Revoked),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Audit, Reason::Revoked),
        0
    );
    revoked.endpoints.insert(EP, endpoint(true, true, false));
    dp.apply(&revoked).expect("apply");
    assert!(!send(&dp, &tcp(POD, 40010, OUTSIDE, 443)));
    // It passed only by audit since the revocation: no policy allows it.
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn endpoint_without_policy_is_fail_closed() {
    let mut tables = tables();
    tables.endpoints.clear();
    let dp = datapath_with(&tables);
    let info = dp.tc_endpoint(1).expect("read").expect("entry");
    assert_ne!(info.flags & endpoint_flags::FAIL_CLOSED, 0);
    assert!(!receive(&dp, &tcp(PEER, 40000, POD, 80)));
    assert!(!send(&dp, &tcp(POD, 40000, PEER, 80)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::FailClosed),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::FailClosed),
        1
    );
    // Node traffic and link control still pass.
    assert!(receive(&dp, &tcp(NODE, 40000, POD, 10250)));
    assert!(receive(&dp, &arp()));
}

#[test]
fn node_traffic_always_passes() {
    let dp = datapath();
    assert!(receive(&dp, &tcp(NODE, 40000, POD, 10250)));
    assert!(send(&dp, &udp(POD, 40000, NODE, 9999)));
    assert!(counters(&dp).is_empty());
}

#[test]
fn arp_and_neighbour_discovery_pass() {
    let dp = datapath();
    assert!(receive(&dp, &arp()));
    assert!(send(&dp, &arp()));
    let solicitation = frame_of(&ipv6_packet(
        ip("fe80::99"),
        ip("ff02::1:ff00:7"),
        ICMPV6,
        &icmp_message(135, 0, [0; 4], &[0; 16]),
    ));
    assert!(receive(&dp, &solicitation));
    let mld_report = frame_of(&ipv6_packet(
        ip("fe80::7"),
        ip("ff02::16"),
        ICMPV6,
        &icmp_message(143, 0, [0; 4], &[]),
    ));
    assert!(send(&dp, &mld_report));
    let igmp = frame_of(&ipv4_packet(
        ip(STRANGER),
        ip("224.0.0.1"),
        2,
        1,
        0,
        &[0x11, 0, 0, 0, 0, 0, 0, 0],
    ));
    assert!(receive(&dp, &igmp));
    assert!(counters(&dp).is_empty());
}

/// (The kernel's test run itself refuses frames shorter than an IP header, so the
/// shortest truncation we can feed is an IPv4 header that claims options it lacks.)
#[test]
fn ipv4_header_longer_than_the_packet_is_dropped_as_malformed() {
    let dp = datapath();
    let mut frame = tcp(PEER, 5555, POD, 22);
    frame.truncate(14 + 20 + 8);
    frame[14] = 0x4f; // IHL 15: 60 bytes of header in a 28-byte packet
    assert!(!receive(&dp, &frame));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Malformed),
        1
    );
}

#[test]
fn truncated_transport_header_is_dropped_as_malformed() {
    let dp = datapath();
    let frame = tcp(PEER, 5555, POD, 22);
    assert!(!receive(&dp, &frame[..14 + 20 + 2]));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Malformed),
        1
    );
}

#[test]
fn bad_ip_version_and_header_length_are_malformed() {
    let dp = datapath();
    let mut frame = tcp(PEER, 5555, POD, 22);
    frame[14] = 0x44; // IHL 4
    assert!(!receive(&dp, &frame));
    frame[14] = 0x65; // version 6 in an IPv4 frame
    assert!(!receive(&dp, &frame));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::Malformed),
        2
    );
}

#[test]
fn unsupported_ethertype_is_dropped_on_an_isolated_direction() {
    let dp = datapath();
    let frame = ethernet(0x8847, &[0; 40]);
    assert!(!receive(&dp, &frame));
    assert_eq!(
        packets(
            &dp,
            Direction::Ingress,
            Verdict::Drop,
            Reason::UnsupportedL3
        ),
        1
    );
}

#[test]
fn later_fragment_without_a_first_fragment_is_dropped() {
    let dp = datapath();
    let frame = frame_of(&ipv4_packet(ip(PEER), ip(POD), UDP, 42, 185, &[0; 32]));
    assert!(!receive(&dp, &frame));
    assert_eq!(
        packets(
            &dp,
            Direction::Ingress,
            Verdict::Drop,
            Reason::FragmentUnknown
        ),
        1
    );
}

#[test]
fn later_fragments_of_an_allowed_datagram_pass() {
    let dp = datapath();
    let first = frame_of(&ipv4_packet(
        ip(CLIENT),
        ip(POD),
        TCP,
        43,
        0x2000,
        &tcp_header(50000, 8080),
    ));
    assert!(receive(&dp, &first));
    let later = frame_of(&ipv4_packet(ip(CLIENT), ip(POD), TCP, 43, 3, &[0; 24]));
    assert!(receive(&dp, &later));
    // A later fragment of a denied datagram does not pass.
    let denied_first = frame_of(&ipv4_packet(
        ip(CLIENT),
        ip(POD),
        TCP,
        44,
        0x2000,
        &tcp_header(50000, 22),
    ));
    assert!(!receive(&dp, &denied_first));
    let denied_later = frame_of(&ipv4_packet(ip(CLIENT), ip(POD), TCP, 44, 3, &[0; 24]));
    assert!(!receive(&dp, &denied_later));
}

fn ipv6_fragment(src: &str, id: u32, offset_flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![TCP, 0];
    body.extend_from_slice(&offset_flags.to_be_bytes());
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(payload);
    frame_of(&ipv6_packet(ip(src), ip(POD6), 44, &body))
}

#[test]
fn ipv6_later_fragments_follow_their_first_fragment() {
    let dp = datapath();
    // First fragment (offset 0, M set) from a cluster peer, then a later one.
    assert!(receive(
        &dp,
        &ipv6_fragment(PEER6, 7, 1, &tcp_header(40000, 22))
    ));
    assert!(receive(&dp, &ipv6_fragment(PEER6, 7, 8 << 3, &[0; 24])));
    // A later fragment nobody saw the start of.
    assert!(!receive(&dp, &ipv6_fragment(PEER6, 8, 8 << 3, &[0; 24])));
    assert_eq!(
        packets(
            &dp,
            Direction::Ingress,
            Verdict::Drop,
            Reason::FragmentUnknown
        ),
        1
    );
}

#[test]
fn unknown_interface_passes_untouched() {
    let dp = Datapath::load(&DatapathOptions::private()).expect("load");
    assert!(
        dp.test_run(Hook::TcEgress, &tcp(STRANGER, 1, POD, 22), 1)
            .expect("run")
            .passed
    );
    assert!(counters(&dp).is_empty());
}

#[test]
fn not_isolated_direction_passes_and_lets_replies_in() {
    let mut tables = tables();
    tables.endpoints.insert(EP, endpoint(true, false, false));
    let dp = datapath_with(&tables);
    assert!(send(&dp, &tcp(POD, 40020, STRANGER, 80)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Allow, Reason::NotIsolated),
        1
    );
    assert!(receive(&dp, &tcp(STRANGER, 80, POD, 40020)));
    assert!(!receive(&dp, &tcp(STRANGER, 80, POD, 40021)));
}

#[test]
fn conntrack_entries_answer_only_for_their_endpoint() {
    let mut tables = tables();
    tables.endpoints.insert(8, endpoint(true, true, false));
    let mut dp = datapath_with(&tables);
    assert!(send(&dp, &tcp(POD, 40030, OUTSIDE, 443)));
    // The interface now belongs to another endpoint with the same policy.
    dp.register_tc(8, 1).expect("register");
    assert!(!receive(&dp, &tcp(OUTSIDE, 443, POD, 40030)));
}

#[test]
fn drop_events_carry_the_flow() {
    let mut dp = datapath();
    let mut events = dp.take_events().expect("events");
    assert!(!receive(&dp, &tcp(STRANGER, 5555, POD, 22)));
    let event = events.next_event().expect("one event");
    assert_eq!(event.endpoint_id, EP);
    assert_eq!(event.direction, Direction::Ingress as u8);
    assert_eq!(event.verdict, Verdict::Drop as u8);
    assert_eq!(event.reason, Reason::NoPolicy as u8);
    assert_eq!(event.protocol, TCP);
    assert_eq!((event.local_port, event.peer_port), (22, 5555));
    assert_eq!(rayfence_common_addr(event.peer), ip(STRANGER));
    assert!(events.next_event().is_none());
}

#[test]
fn drop_events_reach_async_readers() {
    let mut dp = datapath();
    let events = dp.take_events().expect("events");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let event = runtime.block_on(async {
        let mut events = events.into_async().expect("async stream");
        assert!(!receive(&dp, &tcp(STRANGER, 5556, POD, 23)));
        tokio::time::timeout(std::time::Duration::from_secs(5), events.next_event())
            .await
            .expect("an event within 5 s")
            .expect("read")
    });
    assert_eq!((event.local_port, event.peer_port), (23, 5556));
}

#[test]
fn events_over_budget_are_counted_as_lost() {
    let options = DatapathOptions {
        events_per_second: 2,
        ..DatapathOptions::private()
    };
    let mut dp = load(&options, &tables());
    let mut events = dp.take_events().expect("events");
    for _ in 0..5 {
        assert!(!receive(&dp, &tcp(STRANGER, 5555, POD, 22)));
    }
    // Test runs may land on either CPU, each with its own budget.
    let delivered = events.drain().len() as u64;
    assert!((2..=4).contains(&delivered), "{delivered}");
    assert_eq!(delivered + dp.lost_events().expect("lost"), 5);
}

#[test]
fn full_policy_map_fails_closed_and_reports_the_map() {
    let options = DatapathOptions {
        capacities: Capacities {
            policy: 4,
            ..Capacities::small()
        },
        ..DatapathOptions::private()
    };
    let mut dp = Datapath::load(&options).expect("load");
    dp.register_tc(EP, 1).expect("register");
    match dp.apply(&tables()) {
        Err(DatapathError::MapFull {
            map,
            failed,
            fail_closed,
        }) => {
            assert_eq!(map, "RF_POLICY_V1");
            assert!(failed > 0);
            assert_eq!(fail_closed, vec![EP]);
        }
        other => panic!("expected MapFull, got {other:?}"),
    }
    let info = dp.tc_endpoint(1).expect("read").expect("entry");
    assert_ne!(info.flags & endpoint_flags::FAIL_CLOSED, 0);
    assert!(!receive(&dp, &tcp(PEER, 40000, POD, 80)));
    // A policy that fits lifts it.
    let mut small = tables();
    small.policy.retain(|row| row.identity == PEER_ID);
    dp.apply(&small).expect("fits");
    let info = dp.tc_endpoint(1).expect("read").expect("entry");
    assert_eq!(info.flags & endpoint_flags::FAIL_CLOSED, 0);
    assert!(receive(&dp, &tcp(PEER, 40000, POD, 80)));
}

#[test]
fn full_identity_map_fails_every_isolated_endpoint_closed() {
    let options = DatapathOptions {
        capacities: Capacities {
            identities: 2,
            ..Capacities::small()
        },
        ..DatapathOptions::private()
    };
    let mut dp = Datapath::load(&options).expect("load");
    dp.register_tc(EP, 1).expect("register");
    let error = dp.apply(&tables()).expect_err("identities do not fit");
    assert!(
        matches!(
            error,
            DatapathError::MapFull {
                map: "RF_IDENT_V1",
                ..
            }
        ),
        "{error}"
    );
    assert!(!receive(&dp, &tcp(PEER, 40000, POD, 80)));
}

fn rayfence_common_addr(addr: [u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map(Into::into).unwrap_or(v6.into())
}

/// The cgroup (v2) id of this process: the socket of a cgroup_skb test run belongs
/// to it.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|root| {
            std::fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .lines()
                .any(|line| line.contains(&format!(" {root} cgroup2 ")))
        })
        .expect("a cgroup2 mount");
    std::fs::metadata(format!("{root}{path}"))
        .expect("cgroup directory")
        .ino()
}

fn cgroup_datapath(tables: &Tables) -> Datapath {
    let mut datapath = Datapath::load(&DatapathOptions::private()).expect("load");
    datapath
        .register_cgroup(EP, own_cgroup_id())
        .expect("register cgroup");
    datapath.apply(tables).expect("apply");
    datapath
}

#[test]
fn cgroup_hooks_enforce_the_same_policy() {
    let dp = cgroup_datapath(&tables());
    let run = |hook, frame: &[u8]| dp.test_run(hook, frame, 1).expect("test run").passed;
    assert!(run(Hook::CgroupEgress, &tcp(POD, 40040, OUTSIDE, 443)));
    assert!(run(Hook::CgroupIngress, &tcp(OUTSIDE, 443, POD, 40040)));
    assert!(!run(Hook::CgroupIngress, &tcp(STRANGER, 5555, POD, 22)));
    assert!(!run(Hook::CgroupEgress, &tcp(POD, 40041, EXCEPTED, 443)));
    assert!(run(Hook::CgroupIngress, &tcp(CLIENT, 50000, POD, 8080)));
    assert!(run(Hook::CgroupEgress, &udp(POD6, 40000, PEER6, 9999)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Allow, Reason::PolicyAllow),
        2
    );
    // cgroup_skb sees no Ethernet header: bytes count from the IP header.
    let frame = tcp(STRANGER, 5555, POD, 22);
    assert_eq!(
        counter(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy).bytes,
        (frame.len() - 14) as u64
    );
}

#[test]
fn cgroup_hook_ignores_sockets_of_unknown_cgroups() {
    let mut dp = Datapath::load(&DatapathOptions::private()).expect("load");
    dp.register_cgroup(EP, u64::MAX).expect("register");
    dp.apply(&tables()).expect("apply");
    assert!(
        dp.test_run(Hook::CgroupIngress, &tcp(STRANGER, 5555, POD, 22), 1)
            .expect("run")
            .passed
    );
    assert!(counters(&dp).is_empty());
}

#[test]
fn cgroup_hooks_keep_a_revoked_flow_cut_and_read_the_syn_without_an_ethernet_header() {
    let mut dp = cgroup_datapath(&one_way(true));
    let run =
        |dp: &Datapath, hook, frame: &[u8]| dp.test_run(hook, frame, 1).expect("test run").passed;
    assert!(run(
        &dp,
        Hook::CgroupIngress,
        &tcp(CLIENT, 50000, POD, 8080)
    ));
    assert!(run(
        &dp,
        Hook::CgroupEgress,
        &tcp_with(POD, 8080, CLIENT, 50000, SYN | ACK)
    ));
    dp.apply(&without(one_way(true), CLIENT_ID, Direction::Ingress))
        .expect("apply");
    assert!(!run(
        &dp,
        Hook::CgroupEgress,
        &data(POD, 8080, CLIENT, 50000)
    ));
    assert!(!run(
        &dp,
        Hook::CgroupEgress,
        &data(POD, 8080, CLIENT, 50000)
    ));
    assert!(!run(
        &dp,
        Hook::CgroupIngress,
        &data(CLIENT, 50000, POD, 8080)
    ));
    // The pod's SYN the other way: a new flow.
    assert!(run(&dp, Hook::CgroupEgress, &tcp(POD, 8080, CLIENT, 50000)));
    assert!(run(
        &dp,
        Hook::CgroupIngress,
        &tcp_with(CLIENT, 50000, POD, 8080, SYN | ACK)
    ));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::Revoked), 2),
            ((Direction::Ingress, Verdict::Drop, Reason::Revoked), 1),
            ((Direction::Egress, Verdict::Allow, Reason::NotIsolated), 1),
        ])
    );
}

// What counts as the node (docs/semantics.md "What counts as the node"). A TC test run's packet carries a socket
// the kernel makes for it, in the test process's cgroup: to the datapath, a packet
// the node itself generated. Registering that cgroup in RF_NODECG makes the same
// packet a hostNetwork pod's.

/// A nodePort (TCP 30080) whose identity the policy allows on egress, and one
/// (TCP 30081) it does not.
const NODE_PORT_ALLOWED: u16 = 30080;
const NODE_PORT_DENIED: u16 = 30081;
const NODE_PORT_ID: u32 = 500;
const OTHER_NODE_PORT_ID: u32 = 501;
/// A hostNetwork pod's identity.
const HOST_POD_ID: u32 = 600;

fn node_port_tables() -> Tables {
    use rayfence::tables::NodePort;
    let mut tables = tables();
    for (port, id) in [
        (NODE_PORT_ALLOWED, NODE_PORT_ID),
        (NODE_PORT_DENIED, OTHER_NODE_PORT_ID),
    ] {
        tables.node_ports.insert(
            NodePort {
                protocol: protocol::TCP,
                port,
            },
            id,
        );
    }
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Egress,
        NODE_PORT_ID,
        protocol::TCP,
        NODE_PORT_ALLOWED,
        NODE_PORT_ALLOWED,
    ));
    tables
}

#[test]
fn egress_to_a_node_port_is_decided_on_its_backends_identity() {
    let dp = datapath_with(&node_port_tables());
    assert!(send(&dp, &tcp(POD, 40000, NODE, NODE_PORT_ALLOWED)));
    assert!(!send(&dp, &tcp(POD, 40001, NODE, NODE_PORT_DENIED)));
    assert_eq!(
        rows(&dp),
        BTreeMap::from([
            ((Direction::Egress, Verdict::Allow, Reason::PolicyAllow), 1),
            ((Direction::Egress, Verdict::Drop, Reason::NoPolicy), 1),
        ])
    );
}

#[test]
fn egress_to_a_node_port_nothing_rewrites_is_the_node() {
    let dp = datapath_with(&node_port_tables());
    assert!(send(&dp, &tcp(POD, 40000, NODE, 10250)));
    assert!(send(&dp, &udp(POD, 40000, NODE, NODE_PORT_DENIED)));
    assert!(counters(&dp).is_empty(), "{:?}", rows(&dp));
}

#[test]
fn an_ipblock_covering_the_node_does_not_open_its_node_ports() {
    let mut tables = node_port_tables();
    tables.cidrs.insert("10.0.0.0/24".parse().unwrap(), 402);
    tables
        .policy
        .insert(PolicyEntry::any(POLICY, Direction::Egress, 402));
    let dp = datapath_with(&tables);
    assert!(!send(&dp, &tcp(POD, 40000, NODE, NODE_PORT_DENIED)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn a_node_port_flow_is_revoked_when_its_backends_stop_being_allowed() {
    let mut tables = node_port_tables();
    let mut dp = datapath_with(&tables);
    assert!(send(&dp, &tcp(POD, 40000, NODE, NODE_PORT_ALLOWED)));
    tables.policy.retain(|row| row.identity != NODE_PORT_ID);
    dp.apply(&tables).expect("apply");
    assert!(!send(&dp, &data(POD, 40000, NODE, NODE_PORT_ALLOWED)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        1
    );
}

#[test]
fn a_port_becoming_a_node_port_revokes_flows_to_it() {
    let mut tables = tables();
    let mut dp = datapath_with(&tables);
    assert!(send(&dp, &tcp(POD, 40000, NODE, NODE_PORT_DENIED)));
    tables.node_ports.insert(
        rayfence::tables::NodePort {
            protocol: protocol::TCP,
            port: NODE_PORT_DENIED,
        },
        OTHER_NODE_PORT_ID,
    );
    dp.apply(&tables).expect("apply");
    assert!(!send(&dp, &data(POD, 40000, NODE, NODE_PORT_DENIED)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        1
    );
}

#[test]
fn a_hostnetwork_pods_socket_is_not_the_node() {
    let mut dp = datapath();
    dp.set_node_cgroups(&BTreeMap::from([(own_cgroup_id(), HOST_POD_ID)]))
        .expect("register the hostNetwork pod's cgroup");
    assert!(!receive(&dp, &tcp(NODE, 40000, POD, 8265)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        1
    );
}

#[test]
fn a_hostnetwork_pod_selected_by_a_rule_passes_and_its_flow_is_rechecked_as_it() {
    let mut tables = tables();
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Ingress,
        HOST_POD_ID,
        protocol::TCP,
        8265,
        8265,
    ));
    let mut dp = datapath_with(&tables);
    dp.set_node_cgroups(&BTreeMap::from([(own_cgroup_id(), HOST_POD_ID)]))
        .expect("register the hostNetwork pod's cgroup");
    assert!(receive(&dp, &tcp(NODE, 40000, POD, 8265)));
    // The pod's side carries no socket of the node: re-checked as the same pod.
    tables
        .policy
        .insert(PolicyEntry::any(POLICY, Direction::Egress, 777));
    dp.apply(&tables).expect("apply (bumps the generation)");
    assert!(send(&dp, &data(POD, 8265, NODE, 40000)));
    tables.policy.retain(|row| row.identity != HOST_POD_ID);
    dp.apply(&tables).expect("apply");
    assert!(!send(&dp, &data(POD, 8265, NODE, 40000)));
    assert_eq!(
        packets(&dp, Direction::Egress, Verdict::Drop, Reason::Revoked),
        1
    );
}

#[test]
fn a_socket_in_an_unknown_pod_cgroup_is_only_the_node_address() {
    let mut tables = tables();
    let mut dp = datapath_with(&tables);
    dp.set_node_cgroups(&BTreeMap::from([(own_cgroup_id(), identity::OTHER_POD)]))
        .expect("register a pod cgroup root");
    assert!(!receive(&dp, &tcp(NODE, 40000, POD, 8265)));
    tables.cidrs.insert("10.0.0.1/32".parse().unwrap(), 403);
    tables
        .policy
        .insert(PolicyEntry::any(POLICY, Direction::Ingress, 403));
    dp.apply(&tables).expect("apply");
    assert!(receive(&dp, &tcp(NODE, 40001, POD, 8265)));
}

#[test]
fn the_kubelets_probe_passes_a_fail_closed_pod_but_a_hostnetwork_pod_does_not() {
    let mut tables = tables();
    tables.endpoints.clear();
    let mut dp = datapath_with(&tables);
    assert!(receive(&dp, &tcp(NODE, 40000, POD, 10250)));
    dp.set_node_cgroups(&BTreeMap::from([(own_cgroup_id(), HOST_POD_ID)]))
        .expect("register the hostNetwork pod's cgroup");
    assert!(!receive(&dp, &tcp(NODE, 40001, POD, 10250)));
    assert_eq!(
        packets(&dp, Direction::Ingress, Verdict::Drop, Reason::FailClosed),
        1
    );
}
