//! End to end: restarting the agent with other map sizes (a resize, or a release
//! with other defaults) or over maps pinned in an older layout replaces the pinned
//! maps without a window: a connection held across the switch keeps flowing, an
//! outsider knocking all the while never gets through, counters carry on, and a
//! shrink that does not fit is refused with enforcement left as it was.
//!
//! Needs root (network namespaces, bpffs, cgroups). Everything is unique per test
//! and removed by guards, on panic too.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, Map, MapData, MapInfo};
use rayfence::datapath::migrate::Conversion;
use rayfence::datapath::{Datapath, DatapathOptions, paths};
use rayfence_common::{CtKey, CtValue, EndpointInfo, map_names};
use rayfence_tests::agent::*;
use rayfence_tests::background::Background;
use rayfence_tests::objects::json::*;
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::{HeldConnection, Outcome, Prober};
use serde_json::json;

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);
const EVERY: Duration = Duration::from_millis(20);

/// Knocks on `addr:port` every [`EVERY`] until stopped: (attempts, when each
/// success came).
fn knocking(prober: Prober, addr: IpAddr, port: u16) -> Background<(u32, Vec<Duration>)> {
    Background::start(move |flag| {
        let t0 = Instant::now();
        let (mut attempts, mut through) = (0u32, Vec::new());
        while !flag.load(Ordering::Relaxed) {
            attempts += 1;
            if prober.tcp_connect(addr, port, EVERY) == Outcome::Ok {
                through.push(t0.elapsed());
            }
            std::thread::sleep(EVERY);
        }
        (attempts, through)
    })
}

/// Round trips on a held connection every [`EVERY`] until stopped: (round trips,
/// failures as (when, why)). Hands the connection back for the last checks.
type Held = (u32, Vec<(Duration, String)>, Option<HeldConnection>);
fn holding(mut held: HeldConnection) -> Background<Held> {
    Background::start(move |flag| {
        let t0 = Instant::now();
        let (mut trips, mut failures) = (0u32, Vec::new());
        while !flag.load(Ordering::Relaxed) {
            trips += 1;
            let outcome = held.roundtrip_outcome();
            if !outcome.is_ok() {
                failures.push((t0.elapsed(), outcome.as_line()));
            }
            std::thread::sleep(EVERY);
        }
        (trips, failures, Some(held))
    })
}

/// Stops the background probers and judges the switch they ran through, printed as
/// `label`: the outsider never got through, no round trip on either held
/// connection failed, and there were enough of each to show it. Hands back both
/// held connections (in, and out: conntrack only), still open.
fn probes_held(
    label: &str,
    outside: Background<(u32, Vec<Duration>)>,
    inside: Background<Held>,
    out: Background<Held>,
) -> Result<(HeldConnection, HeldConnection)> {
    let (attempts, through) = outside.finish();
    let (trips, failures, held) = inside.finish();
    let (out_trips, out_failures, out_held) = out.finish();
    println!(
        "{label}: outsider attempts {attempts}, through {}; held round trips {trips} and \
         {out_trips}, failed {} and {}",
        through.len(),
        failures.len(),
        out_failures.len()
    );
    ensure!(
        through.is_empty(),
        "the outsider got through at {through:?}"
    );
    ensure!(
        failures.is_empty(),
        "the held connection failed: {failures:?}"
    );
    ensure!(
        out_failures.is_empty(),
        "the held connection out (conntrack only) failed: {out_failures:?}"
    );
    ensure!(
        attempts > 20 && trips > 20 && out_trips > 20,
        "too few probes to show anything"
    );
    let (mut held, mut out_held) = (
        held.context("held connection")?,
        out_held.context("held connection out")?,
    );
    ensure!(held.roundtrip(), "held connection at the end");
    ensure!(out_held.roundtrip(), "held connection out at the end");
    Ok((held, out_held))
}

/// The RayCluster's policy: DenyAll, but the head may reach the outsider's port
/// 9000: the replies of such a connection pass only on its conntrack entry (the
/// head's ingress is isolated), so a connection held there shows that
/// conntrack survived. `outsider_in`: the outsider may reach the head's port 8001.
fn policy(outsider_in: bool) -> serde_json::Value {
    let mut head = json!({"egressRules": [{
        "to": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
        "ports": [{"protocol": "TCP", "port": 9000}]}]});
    if outsider_in {
        head["ingressRules"] = json!([{
            "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
            "ports": [{"protocol": "TCP", "port": 8001}]}]);
    }
    json!({"mode": "DenyAll", "head": head})
}

/// head, worker (one RayCluster, [`policy`]) and an outsider on one node; the head
/// serves echo ports 8000 and 8001, the outsider 9000.
struct Lab {
    node: SimNode,
    manifests: Manifests,
    bpffs: Bpffs,
}

impl Lab {
    fn new(first_uid: u32) -> Result<(Lab, [rayfence_tests::Server; 3])> {
        let node = SimNode::new(&["head", "worker", "outsider"], first_uid)?;
        let head = node.topo.pod("head");
        let outsider = node.topo.pod("outsider");
        let echo = [
            head.serve_tcp(8000)?,
            head.serve_tcp(8001)?,
            outsider.serve_tcp(9000)?,
        ];
        let manifests = Manifests::new()?;
        let (ns, topo, uids) = (&node.ns, &node.topo, &node.uids);
        manifests.write(
            "base.yaml",
            &[
                namespace(ns),
                node_object(NODE, topo.node(0)),
                pod_object(ns, topo.pod("head"), &uids[0], NODE, &head_labels("rc")),
                pod_object(ns, topo.pod("worker"), &uids[1], NODE, &worker_labels("rc")),
                pod_object(
                    ns,
                    topo.pod("outsider"),
                    &uids[2],
                    NODE,
                    &[("app", "outsider")],
                ),
            ],
        )?;
        manifests.write("rc.yaml", &[raycluster(ns, "rc", policy(false))])?;
        let lab = Lab {
            node,
            manifests,
            bpffs: Bpffs::new(),
        };
        Ok((lab, echo))
    }

    /// The agent's writes reach the programs on the links: an edit that lets the
    /// outsider reach the head's second port takes effect, and so does taking it
    /// back (the prober knocks on the first port only).
    fn edits_take_effect(&self) -> Result<()> {
        let (ns, outsider) = (&self.node.ns, self.node.topo.pod("outsider"));
        let probe = || outsider.tcp_connect(self.head(), 8001, Duration::from_millis(50));
        self.manifests
            .write("rc.yaml", &[raycluster(ns, "rc", policy(true))])?;
        wait_outcome("allowing edit", Duration::from_secs(3), probe, true)?;
        self.manifests
            .write("rc.yaml", &[raycluster(ns, "rc", policy(false))])?;
        wait_outcome("revoking edit", Duration::from_secs(3), probe, false)?;
        Ok(())
    }

    fn start(&self, args: &[&str]) -> Result<Agent> {
        self.node
            .start_agent(NODE, &self.manifests.dir, &self.bpffs, args)
    }

    fn head(&self) -> IpAddr {
        v4(self.node.topo.pod("head"))
    }

    fn max_entries(&self, map: &str) -> Result<u32> {
        let path = paths::map(&self.bpffs.path, map);
        Ok(MapInfo::from_pin(&path)
            .with_context(|| format!("{}", path.display()))?
            .max_entries())
    }

    /// The conntrack entries pinned now.
    fn conntrack(&self) -> Result<std::collections::HashMap<CtKey, CtValue>> {
        Self::conntrack_at(&self.bpffs.path)
    }

    fn conntrack_at(dir: &Path) -> Result<std::collections::HashMap<CtKey, CtValue>> {
        let path = paths::map(dir, map_names::CONNTRACK);
        let map = Map::LruHashMap(MapData::from_pin(&path)?);
        let map: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(map)?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    /// Every entry of `before` is pinned now, for a flow opened the same way (the
    /// idle connection's entry included: no packet recreated it).
    fn conntrack_kept(&self, before: &std::collections::HashMap<CtKey, CtValue>) -> Result<()> {
        let now = self.conntrack()?;
        let lost: Vec<_> = before
            .iter()
            .filter(|(key, value)| {
                // The generation moves on with edits (a re-check refreshes it).
                now.get(key).is_none_or(|v| v.origin != value.origin)
            })
            .collect();
        ensure!(
            lost.is_empty(),
            "{} of {} conntrack entries lost: {lost:?}",
            lost.len(),
            before.len()
        );
        Ok(())
    }

    /// The outsider's drops at the head, as the agent reports them.
    fn drops(&self, agent: &Agent) -> Result<f64> {
        let (_, body) = agent.http_get(self.node.topo.node(0), "/metrics")?;
        Ok(metric_sum(
            &body,
            "rayfence_drops_total",
            &[("raycluster", "rc"), ("direction", "ingress")],
        ))
    }

    /// Checks the drop count carried on from `floor` (the first value the agent
    /// reports is not below it: not reset), then waits until it is above it (the
    /// prober keeps knocking).
    fn drops_above(&self, agent: &Agent, floor: f64) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut first = None;
        loop {
            let now = self.drops(agent)?;
            // No series until the agent's first counter tick.
            if now > 0.0 && first.is_none() {
                ensure!(now >= floor, "drops went from {floor} back to {now}");
                first = Some(now);
            }
            if now > floor {
                return Ok(now);
            }
            ensure!(
                Instant::now() < deadline,
                "drops stuck at {now} (before the switch: {floor})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How long an agent took from planning the migration to swapping the links, from
/// its log's timestamps (`2026-12-04T17:05:27.917216Z ...`).
fn switch_time(log: &str) -> Option<Duration> {
    let seconds = |needle: &str| -> Option<f64> {
        let line = log.lines().find(|l| l.contains(needle))?;
        let time = line.split_whitespace().next()?.split('T').nth(1)?;
        let mut parts = time.trim_end_matches('Z').split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let (from, to) = (
        seconds("migrating pinned map")?,
        seconds("swapped the programs")?,
    );
    Some(Duration::from_secs_f64((to - from).max(0.0)))
}

fn swap_line(log: &str) -> String {
    log.lines()
        .find(|l| l.contains("swapped the programs"))
        .unwrap_or_default()
        .to_owned()
}

/// Larger than every default.
const LARGER: &[&str] = &[
    "--max-endpoints",
    "8192",
    "--max-identities",
    "131072",
    "--max-cidrs",
    "32768",
    "--max-policy",
    "131072",
    "--max-conntrack",
    "524288",
    "--max-fragments",
    "16384",
    "--max-counters",
    "32768",
    "--events-bytes",
    "524288",
];

/// Smaller than the defaults, still room for what this node holds.
const SMALLER: &[&str] = &[
    "--max-endpoints",
    "256",
    "--max-identities",
    "2048",
    "--max-cidrs",
    "1024",
    "--max-policy",
    "1024",
    "--max-conntrack",
    "16384",
    "--max-counters",
    "2048",
];

#[test]
fn a_resize_keeps_a_held_connection_and_never_lets_the_outsider_through() -> Result<()> {
    let (lab, _echo) = Lab::new(201)?;
    let topo = &lab.node.topo;
    let (worker, outsider) = (topo.pod("worker"), topo.pod("outsider"));

    let mut first = lab.start(&[])?;
    let outside = knocking(outsider.prober(), lab.head(), 8000);
    let inside = holding(worker.tcp_hold(lab.head(), 8000, SHORT)?);
    let head = topo.pod("head");
    let out = holding(head.tcp_hold(v4(outsider), 9000, SHORT)?);
    // A connection left idle through the switches: only a carried entry keeps it.
    let mut idle = head.tcp_hold(v4(outsider), 9000, SHORT)?;
    ensure!(idle.roundtrip(), "idle connection before");
    let drops_first = lab.drops_above(&first, 0.0)?;
    let conntrack = lab.conntrack()?;
    ensure!(lab.max_entries(map_names::POLICY)? == 65536, "default size");

    // Larger: every sized map is replaced under traffic. A map left pinned aside
    // by an interrupted attempt (here: not even of the right kind) is removed.
    first.kill();
    let leftover: HashMap<MapData, u32, u32> = HashMap::create(16, 0)?;
    leftover.pin(paths::map(&lab.bpffs.path, "RF_POLICY_V1-new"))?;
    let second = lab.start(LARGER)?;
    second.wait_log(&["swapped the programs on the pinned links"], SHORT)?;
    for map in [
        map_names::POLICY,
        map_names::CONNTRACK,
        map_names::ENDPOINTS_TC,
    ] {
        ensure!(
            second
                .log_text()
                .lines()
                .any(|l| l.contains("migrating pinned map") && l.contains(map)),
            "{map} not migrated:\n{}",
            second.log_text()
        );
    }
    ensure!(
        lab.max_entries(map_names::POLICY)? == 131_072,
        "policy resized"
    );
    ensure!(
        lab.max_entries(map_names::CONNTRACK)? == 524_288,
        "conntrack resized"
    );
    lab.conntrack_kept(&conntrack)?;
    let drops_second = lab.drops_above(&second, drops_first)?;
    let grow = switch_time(&second.log_text());
    println!("{}", swap_line(&second.log_text()));
    assert_eq!(worker.tcp_connect(lab.head(), 8000, SHORT), Outcome::Ok);
    lab.edits_take_effect()?;
    let mut second = second;

    // Smaller, still fits.
    second.kill();
    let third = lab.start(SMALLER)?;
    third.wait_log(&["swapped the programs on the pinned links"], SHORT)?;
    ensure!(lab.max_entries(map_names::POLICY)? == 1024, "policy shrunk");
    ensure!(
        lab.max_entries(map_names::ENDPOINTS_TC)? == 256,
        "endpoints shrunk"
    );
    lab.conntrack_kept(&conntrack)?;
    let drops_third = lab.drops_above(&third, drops_second)?;
    let shrink = switch_time(&third.log_text());
    println!("{}", swap_line(&third.log_text()));
    assert_eq!(worker.tcp_connect(lab.head(), 8000, SHORT), Outcome::Ok);
    lab.edits_take_effect()?;
    let mut third = third;

    // A shrink that does not fit: refused, naming the map and the numbers, and
    // nothing changed.
    third.kill();
    let refused = lab.start_refused(&["--max-policy", "4"])?;
    ensure!(
        refused.contains(map_names::POLICY)
            && refused.contains("more than the 4 this agent is configured for")
            && refused.contains("room for 1024"),
        "refusal does not name the map and the numbers:\n{refused}"
    );
    println!(
        "refused: {}",
        refused
            .lines()
            .find(|l| l.starts_with("Error"))
            .unwrap_or_default()
    );
    ensure!(
        lab.max_entries(map_names::POLICY)? == 1024,
        "pins untouched"
    );
    std::thread::sleep(Duration::from_millis(300));

    // The same sizes as the pins: adopted as they are.
    let fourth = lab.start(SMALLER)?;
    ensure!(
        !fourth.log_text().contains("migrating pinned map"),
        "nothing to migrate:\n{}",
        fourth.log_text()
    );
    let drops_fourth = lab.drops_above(&fourth, drops_third)?;
    lab.edits_take_effect()?;
    std::thread::sleep(Duration::from_millis(300));

    println!(
        "resize: drops {drops_first} -> {drops_second} -> {drops_third} -> {drops_fourth}; \
         plan to swap: larger {grow:?}, smaller {shrink:?}"
    );
    let (_held, _out_held) = probes_held("resize", outside, inside, out)?;
    ensure!(idle.roundtrip(), "idle connection at the end");
    assert_eq!(
        outsider.tcp_connect(lab.head(), 8000, SHORT),
        Outcome::Timeout
    );
    assert_eq!(worker.tcp_connect(lab.head(), 8000, SHORT), Outcome::Ok);
    Ok(())
}

impl Lab {
    /// Starts an agent that must refuse to start; returns its log.
    fn start_refused(&self, args: &[&str]) -> Result<String> {
        let agent = Agent::start(&AgentOptions {
            node: self.node.topo.node(0),
            node_name: NODE,
            manifests: &self.manifests.dir,
            bpffs: &self.bpffs.path,
            cgroup_root: self.node.kubelet.root.path(),
            kubeconfig: None,
            extra_args: args,
        })?;
        agent.wait_log(&["entries, more than"], Duration::from_secs(20))?;
        // It exits: never ready.
        std::thread::sleep(Duration::from_millis(200));
        ensure!(
            agent.http_get(self.node.topo.node(0), "/readyz").is_err(),
            "the refusing agent serves"
        );
        Ok(agent.log_text())
    }
}

/// The endpoint entry of an older release, as this test pretends it was: 12 bytes,
/// a 16-bit generation and 16-bit flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EndpointInfoV0 {
    endpoint_id: u32,
    policy_id: u32,
    generation: u16,
    flags: u16,
}

// SAFETY: repr(C), no padding (4 + 4 + 2 + 2), every bit pattern valid.
unsafe impl aya::Pod for EndpointInfoV0 {}

const OLD_TC_MAP: &str = "RF_EP_TC_V0";

fn widen(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let word = |at: usize| u32::from_ne_bytes(value[at..at + 4].try_into().unwrap_or_default());
    let half = |at: usize| u16::from_ne_bytes(value[at..at + 2].try_into().unwrap_or_default());
    if value.len() != 12 {
        return None;
    }
    let mut new = Vec::with_capacity(16);
    for field in [word(0), word(4), u32::from(half(8)), u32::from(half(10))] {
        new.extend_from_slice(&field.to_ne_bytes());
    }
    Some((key.to_vec(), new))
}

static OLD_LAYOUT: [Conversion; 1] = [Conversion {
    from: OLD_TC_MAP,
    from_key_size: 4,
    from_value_size: 12,
    to: map_names::ENDPOINTS_TC,
    convert: widen,
}];

fn endpoints(path: &Path) -> Result<Vec<(u32, EndpointInfo)>> {
    let map = Map::HashMap(MapData::from_pin(path)?);
    let map: HashMap<MapData, u32, EndpointInfo> = HashMap::try_from(map)?;
    let mut all = map.iter().collect::<Result<Vec<_>, _>>()?;
    all.sort_by_key(|(k, _)| *k);
    Ok(all)
}

#[test]
fn an_older_layout_under_an_older_name_is_converted_without_a_window() -> Result<()> {
    let (lab, _echo) = Lab::new(221)?;
    let topo = &lab.node.topo;
    let (worker, outsider) = (topo.pod("worker"), topo.pod("outsider"));
    let mut first = lab.start(&[])?;
    let outside = knocking(outsider.prober(), lab.head(), 8000);
    let inside = holding(worker.tcp_hold(lab.head(), 8000, SHORT)?);
    let head = topo.pod("head");
    let out = holding(head.tcp_hold(v4(outsider), 9000, SHORT)?);
    lab.drops_above(&first, 0.0)?;
    first.kill();

    // What an older release would have left pinned: the endpoints of the host
    // veths under an older name, in an older layout. The running programs keep
    // the map they were loaded with; only the pins change.
    let current = paths::map(&lab.bpffs.path, map_names::ENDPOINTS_TC);
    let before = endpoints(&current)?;
    ensure!(before.len() >= 3, "three host veths: {before:?}");
    let mut old: HashMap<MapData, u32, EndpointInfoV0> = HashMap::create(4096, 0)?;
    for (ifindex, info) in &before {
        let v0 = EndpointInfoV0 {
            endpoint_id: info.endpoint_id,
            policy_id: info.policy_id,
            generation: u16::try_from(info.generation)?,
            flags: u16::try_from(info.flags)?,
        };
        old.insert(ifindex, &v0, 0)?;
    }
    old.pin(paths::map(&lab.bpffs.path, OLD_TC_MAP))?;
    std::fs::remove_file(&current)?;

    // This build's loader, with the conversion an upgrade to the new layout ships.
    let options = DatapathOptions {
        bpffs_dir: Some(lab.bpffs.path.clone()),
        ..DatapathOptions::default()
    };
    let datapath = Datapath::load_with(&options, &OLD_LAYOUT)?;
    drop(datapath);
    ensure!(
        !paths::map(&lab.bpffs.path, OLD_TC_MAP).exists(),
        "the older map is still pinned"
    );
    ensure!(
        endpoints(&current)? == before,
        "converted entries differ from the originals"
    );
    std::thread::sleep(Duration::from_millis(500));

    // The agent of this release adopts the converted map as it is.
    let second = lab.start(&[])?;
    ensure!(
        !second.log_text().contains("migrating pinned map"),
        "nothing left to migrate:\n{}",
        second.log_text()
    );
    lab.edits_take_effect()?;
    let (_held, _out_held) = probes_held("layout", outside, inside, out)?;
    assert_eq!(
        outsider.tcp_connect(lab.head(), 8000, SHORT),
        Outcome::Timeout
    );
    Ok(())
}

/// The cost of a migration with full maps: 60,000 policy rows and 200,000
/// conntrack entries carried into maps twice as large. Measured against a load
/// that adopts the same maps as they are; bounded loosely (a debug build, two
/// shared CPUs), the point is the figure.
#[test]
fn full_maps_migrate_in_bounded_time() -> Result<()> {
    use rayfence::datapath::Capacities;
    use rayfence::tables::{PolicyEntry, Tables};
    use rayfence_common::Direction;

    let bpffs = Bpffs::new();
    let options = |caps: Capacities| DatapathOptions {
        bpffs_dir: Some(bpffs.path.clone()),
        capacities: caps,
        ..DatapathOptions::default()
    };
    let small = Capacities::default();
    let large = Capacities {
        policy: small.policy * 2,
        conntrack: small.conntrack * 2,
        ..small
    };
    let mut datapath = Datapath::load(&options(small))?;
    let mut tables = Tables::default();
    for identity in 0..30_000u32 {
        for direction in Direction::ALL {
            tables
                .policy
                .insert(PolicyEntry::any(7, direction, 1000 + identity));
        }
    }
    datapath.apply(&tables)?;
    drop(datapath);
    {
        let path = paths::map(&bpffs.path, map_names::CONNTRACK);
        let map = Map::LruHashMap(MapData::from_pin(&path)?);
        let mut ct: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(map)?;
        for i in 0..200_000u32 {
            let key = CtKey {
                endpoint_id: i / 1000,
                local_port: (i % 1000) as u16,
                peer_port: 9000,
                protocol: 6,
                ..CtKey::default()
            };
            ct.insert(&key, &CtValue::default(), 0)?;
        }
    }
    let t0 = Instant::now();
    drop(Datapath::load(&options(small))?);
    let adopt = t0.elapsed();
    let t0 = Instant::now();
    let datapath = Datapath::load(&options(large))?;
    let migrate = t0.elapsed();
    ensure!(
        datapath.tables().policy.len() == 60_000,
        "policy rows carried"
    );
    drop(datapath);
    let ct = Lab::conntrack_at(&bpffs.path)?;
    ensure!(
        ct.len() >= 200_000,
        "conntrack entries carried: {}",
        ct.len()
    );
    println!(
        "full maps: load adopting them {adopt:?}, load migrating them (60,000 policy rows, \
         {} conntrack entries) {migrate:?}",
        ct.len()
    );
    ensure!(
        migrate < adopt + Duration::from_secs(30),
        "migration took {migrate:?}"
    );
    Ok(())
}

/// SIGKILLed at every point of a migration (the kills are spread over the whole
/// window from start to ready, sizes alternating), the node keeps enforcing: each
/// kill leaves either the old maps and programs or the new ones, and the next
/// agent converges from there.
#[test]
fn a_migration_killed_at_any_point_leaves_enforcement_working() -> Result<()> {
    let (lab, _echo) = Lab::new(241)?;
    let topo = &lab.node.topo;
    let (worker, outsider, head) = (topo.pod("worker"), topo.pod("outsider"), topo.pod("head"));
    let mut first = lab.start(&[])?;
    let outside = knocking(outsider.prober(), lab.head(), 8000);
    let inside = holding(worker.tcp_hold(lab.head(), 8000, SHORT)?);
    let out = holding(head.tcp_hold(v4(outsider), 9000, SHORT)?);
    let drops = lab.drops_above(&first, 0.0)?;
    first.kill();

    // When a migration swaps the programs here, from the agent's start.
    let t0 = Instant::now();
    let mut timed = lab.start(LARGER)?;
    timed.wait_log(&["swapped the programs"], Duration::from_secs(20))?;
    let swap_at = t0.elapsed();
    timed.kill();
    // Kills from well before the swap to just after it, each round migrating from
    // whatever the pins hold to the other size.
    let mut kills = Vec::new();
    for round in 0..16u32 {
        let larger = lab.max_entries(map_names::POLICY)? != 65536;
        let args = if larger { &[][..] } else { LARGER };
        let mut agent = Agent::start(&AgentOptions {
            node: topo.node(0),
            node_name: NODE,
            manifests: &lab.manifests.dir,
            bpffs: &lab.bpffs.path,
            cgroup_root: lab.node.kubelet.root.path(),
            kubeconfig: None,
            extra_args: args,
        })?;
        let delay = swap_at * (6 + round) / 16;
        std::thread::sleep(delay);
        agent.kill();
        let log = agent.log_text();
        let reached = [
            ("migrating pinned map", "planned"),
            ("swapped the programs", "committed"),
            ("first full sync programmed", "ready"),
        ]
        .iter()
        .filter(|(needle, _)| log.contains(needle))
        .map(|(_, step)| *step)
        .next_back()
        .unwrap_or("loading");
        kills.push(format!("{}ms:{reached}", delay.as_millis()));
    }

    let last = lab.start(&[])?;
    lab.drops_above(&last, drops)?;
    lab.edits_take_effect()?;
    ensure!(
        lab.max_entries(map_names::POLICY)? == 65536,
        "back to the default size"
    );
    ensure!(
        kills.iter().any(|k| k.ends_with(":planned"))
            && kills
                .iter()
                .any(|k| k.ends_with(":committed") || k.ends_with(":ready")),
        "the kills did not cover the migration: {kills:?}"
    );
    println!("killed during migrations (swap {swap_at:?} after start) at {kills:?}");
    probes_held("kills", outside, inside, out)?;
    Ok(())
}
