//! Per-packet cost of the datapath through BPF_PROG_TEST_RUN, at 10, 10k and 100k
//! policy and identity entries: an allowed new flow (distinct flows, one run per
//! call, the kernel's own timing), a dropped packet, a reply (conntrack hit), and
//! the pass-through `tc_floor` classifier on the same hook as the floor.
//!
//! What counts as the node (docs/semantics.md "What counts as the node") adds three rows at every size: `node-new`
//! (a new flow from a node address: the test run's packet carries a socket, of a host
//! process, so it is classified and opened as the node's), `node-established`
//! (that flow's later packets: the ordinary conntrack hit), and `node-port-new` (a
//! new egress flow to a node address on a node port, decided on its identity).
//!
//! Rows: `<kind> <entries> entries <ns> ns`, `floor <ns> ns` (repeated runs, like
//! drop and reply) and `floor-single <ns> ns` (one run per call, like allow-new and
//! drop-single: a new flow cannot be repeated, and a single run pays the per-call
//! overhead and colder caches, so compare allow-new with drop-single and
//! floor-single, and drop/reply with floor).
//! Run with `cargo xtask bench datapath` (root).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rayfence::datapath::{Capacities, Datapath, DatapathOptions, Hook};
use rayfence::tables::{EndpointPolicy, PolicyEntry, Tables, protocol};
use rayfence_common::Direction;
use rayfence_tests::packet;

const EP: u32 = 1;
const POLICY: u32 = 1;
const POD: &str = "10.0.0.7";
const NODE: &str = "10.0.0.1";
const NODE_PORT: u16 = 30080;
const NODE_PORT_ID: u32 = 900;
const REPEAT: u32 = 200_000;
const NEW_FLOWS: u32 = 20_000;

fn peer(index: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + index))
}

/// `entries` peers, each with its own identity and one policy row (TCP 8080 in).
fn tables(entries: u32) -> Tables {
    let mut tables = Tables::default();
    tables.endpoints.insert(
        EP,
        EndpointPolicy {
            policy_id: POLICY,
            isolate_ingress: true,
            isolate_egress: true,
            audit: false,
        },
    );
    for index in 0..entries {
        let identity = 1000 + index;
        tables.addresses.insert(peer(index), identity);
        tables.policy.extend(PolicyEntry::for_port_range(
            POLICY,
            Direction::Ingress,
            identity,
            protocol::TCP,
            8080,
            8080,
        ));
    }
    tables.addresses.insert(
        NODE.parse().expect("node address"),
        rayfence_common::identity::HOST,
    );
    tables.node_ports.insert(
        rayfence::tables::NodePort {
            protocol: protocol::TCP,
            port: NODE_PORT,
        },
        NODE_PORT_ID,
    );
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Egress,
        NODE_PORT_ID,
        protocol::TCP,
        NODE_PORT,
        NODE_PORT,
    ));
    tables
}

/// Mean single-run time of new flows built by `frame` (one per source port).
fn new_node_flows(datapath: &Datapath, hook: Hook, frame: impl Fn(u16) -> Vec<u8>) -> Result<f64> {
    let mut total = 0.0;
    for flow in 0..NEW_FLOWS {
        let outcome = datapath.test_run(hook, &frame(1024 + flow as u16), 1)?;
        ensure!(outcome.passed, "node flow {flow} dropped");
        total += ns(outcome.duration);
    }
    Ok(total / f64::from(NEW_FLOWS))
}

fn load(entries: u32) -> Result<Datapath> {
    let options = DatapathOptions {
        bpffs_dir: None,
        capacities: Capacities {
            identities: entries + 64,
            policy: entries + 64,
            conntrack: 1 << 17,
            ..Capacities::small()
        },
        events_per_second: 100,
        ..DatapathOptions::private()
    };
    let mut datapath = Datapath::load(&options).context("load (root needed)")?;
    datapath.register_tc(EP, 1)?;
    datapath.apply(&tables(entries))?;
    Ok(datapath)
}

fn ns(duration: Duration) -> f64 {
    duration.as_nanos() as f64
}

fn repeated(datapath: &Datapath, hook: Hook, frame: &[u8], expect_pass: bool) -> Result<f64> {
    let outcome = datapath.test_run(hook, frame, REPEAT)?;
    ensure!(
        outcome.passed == expect_pass,
        "{hook:?}: unexpected verdict {outcome:?}"
    );
    Ok(ns(outcome.duration))
}

/// Mean kernel-reported time of single runs over distinct new flows.
fn new_flows(datapath: &Datapath, entries: u32) -> Result<f64> {
    let mut total = 0.0;
    for flow in 0..NEW_FLOWS {
        let source = peer(flow % entries).to_string();
        let port = 1024 + flow as u16;
        let frame = packet::tcp(&source, port, POD, 8080);
        let outcome = datapath.test_run(Hook::TcEgress, &frame, 1)?;
        ensure!(outcome.passed, "allowed flow {flow} dropped");
        total += ns(outcome.duration);
    }
    Ok(total / f64::from(NEW_FLOWS))
}

/// Mean kernel-reported time of single runs of one packet (the same per-call
/// overhead and cache state as [`new_flows`]).
fn single(datapath: &Datapath, hook: Hook, frame: &[u8]) -> Result<f64> {
    let mut total = 0.0;
    for _ in 0..NEW_FLOWS {
        total += ns(datapath.test_run(hook, frame, 1)?.duration);
    }
    Ok(total / f64::from(NEW_FLOWS))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut floor = None;
    for entries in [10, 10_000, 100_000] {
        let datapath = load(entries)?;
        if floor.is_none() {
            let frame = packet::tcp("11.0.0.0", 1024, POD, 8080);
            floor = Some((
                repeated(&datapath, Hook::TcFloor, &frame, true)?,
                single(&datapath, Hook::TcFloor, &frame)?,
            ));
        }
        let allow = new_flows(&datapath, entries)?;
        println!("allow-new {entries} entries {allow:.1} ns");
        let denied = packet::tcp("10.9.9.9", 5555, POD, 22);
        let drop = repeated(&datapath, Hook::TcEgress, &denied, false)?;
        println!("drop {entries} entries {drop:.1} ns");
        let drop_single = single(&datapath, Hook::TcEgress, &denied)?;
        println!("drop-single {entries} entries {drop_single:.1} ns");
        // Open a flow from the last peer, then measure its replies.
        let last = peer(entries - 1).to_string();
        ensure!(
            datapath
                .test_run(Hook::TcEgress, &packet::tcp(&last, 999, POD, 8080), 1)?
                .passed
        );
        let reply = packet::tcp(POD, 8080, &last, 999);
        let reply_ns = repeated(&datapath, Hook::TcIngress, &reply, true)?;
        println!("reply {entries} entries {reply_ns:.1} ns");
        let node_new = new_node_flows(&datapath, Hook::TcEgress, |port| {
            packet::tcp(NODE, port, POD, 10250)
        })?;
        println!("node-new {entries} entries {node_new:.1} ns");
        let probe = packet::tcp(NODE, 1024, POD, 10250);
        let node_established = repeated(&datapath, Hook::TcEgress, &probe, true)?;
        println!("node-established {entries} entries {node_established:.1} ns");
        let node_port_new = new_node_flows(&datapath, Hook::TcIngress, |port| {
            packet::tcp(POD, port, NODE, NODE_PORT)
        })?;
        println!("node-port-new {entries} entries {node_port_new:.1} ns");
    }
    if let Some((repeated, single)) = floor {
        println!("floor {repeated:.1} ns");
        println!("floor-single {single:.1} ns");
    }
    Ok(())
}
