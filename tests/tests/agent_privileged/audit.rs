//! End to end: audit mode per RayCluster, switched live. The real `rayfence agent`
//! in a simulated node (flannel-like bridge) fed by a manifests directory; a
//! DenyAll RayCluster annotated `rayfence.io/audit`, an outsider pod, real packets;
//! what the kernel counted is read from the agent's pinned maps, read-only.
//!
//! Exact counters: audit counts a would-be-dropped flow once (its first packet), a
//! drop counts each packet, and a denied probe whose timeout is shorter than its
//! first retransmission (TCP SYN after 1 s, UDP after 200 ms) sends exactly one.
//!
//! Needs root (network namespaces, bpffs, cgroups). Its own topology, bpffs,
//! manifests directory and kubelet cgroup tree; guards clean up on panic too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rayfence::datapath::paths;
use rayfence_common::{Direction, EndpointInfo, Reason, Verdict, endpoint_flags, map_names};
use rayfence_tests::agent::*;
use rayfence_tests::counters::{self, Counters};
use rayfence_tests::objects::json::*;
use rayfence_tests::pinned::{self, from_bytes};
use rayfence_tests::{Outcome, Pod};
use serde_json::{Value, json};

const NODE: &str = "node-a";
/// Allowed (or audited) flows: room for neighbour resolution.
const OK: Duration = Duration::from_secs(3);
/// Denied TCP: shorter than the first SYN retransmission (1 s).
const DENIED_TCP: Duration = Duration::from_millis(700);
/// Denied UDP: shorter than rf-probe's first resend (200 ms).
const DENIED_UDP: Duration = Duration::from_millis(150);
/// How long an annotation edit may take to reach the datapath (the file source
/// polls every 100 ms; the measured p99 of an edit is ~150 ms).
const SWITCH_BOUND: Duration = Duration::from_secs(5);
/// Longer than a delayed ACK (40 ms), so a probe's last packets are in before the
/// counters are read or the mode switched.
const SETTLE: Duration = Duration::from_millis(300);

/// What the agent's datapath holds, read from its pins.
struct Kernel {
    root: PathBuf,
}

impl Kernel {
    fn map(&self, name: &str) -> Result<pinned::Map> {
        let path = paths::map(&self.root, name);
        pinned::Map::open(&path).map_err(|e| anyhow::anyhow!("open {}: {e}", path.display()))
    }

    /// The endpoint entry of a pod's host veth.
    fn endpoint(&self, pod: &Pod) -> Result<Option<EndpointInfo>> {
        let map = self.map(map_names::ENDPOINTS_TC)?;
        Ok(map
            .lookup(&pod.host_ifindex.to_ne_bytes(), size_of::<EndpointInfo>())?
            .map(|bytes| from_bytes(&bytes)))
    }

    /// Every counter row, summed over CPUs.
    fn counters(&self) -> Result<Counters> {
        counters::pinned(&self.root)
    }

    /// Waits until the pod's entry has the AUDIT flag `audit`; the time it took.
    fn wait_audit(&self, pod: &Pod, audit: bool, since: Instant) -> Result<Duration> {
        loop {
            let info = self.endpoint(pod)?;
            if let Some(info) = info
                && (info.flags & endpoint_flags::AUDIT != 0) == audit
                && info.flags & endpoint_flags::FAIL_CLOSED == 0
            {
                return Ok(since.elapsed());
            }
            ensure!(
                since.elapsed() < SWITCH_BOUND,
                "{}: audit still not {audit} after {SWITCH_BOUND:?}: {info:?}",
                pod.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Packets counted for `endpoint` between two snapshots.
fn delta(
    before: &Counters,
    after: &Counters,
    endpoint: u32,
    direction: Direction,
    verdict: Verdict,
    reason: Reason,
) -> u64 {
    let count = |m: &Counters| counters::packets(m, endpoint, direction, verdict, reason);
    count(after) - count(before)
}

/// Packets of `verdict` for `endpoint` (any direction, any reason) between snapshots.
fn delta_all(before: &Counters, after: &Counters, endpoint: u32, verdict: Verdict) -> u64 {
    let sum = |m: &Counters| -> u64 {
        m.iter()
            .filter(|(k, _)| k.endpoint_id == endpoint && k.verdict == verdict as u8)
            .map(|(_, v)| v.packets)
            .sum()
    };
    sum(after) - sum(before)
}

/// The RayCluster `rc`, DenyAll, with `rayfence.io/audit` = `audit`.
fn cluster(ns: &str, audit: &str) -> Value {
    let mut rc = raycluster(ns, "rc", json!({"mode": "DenyAll"}));
    rc["metadata"]["annotations"] = json!({"rayfence.io/audit": audit});
    rc
}

#[test]
fn audit_annotation_switches_a_raycluster_between_audit_and_enforce_live() -> Result<()> {
    let node = SimNode::new(&["head", "worker", "outsider"], 1)?;
    let (topo, _kubelet, ns, uids) = (&node.topo, &node.kubelet, &node.ns, &node.uids);
    let (head, worker, outsider) = (topo.pod("head"), topo.pod("worker"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;
    let _head_udp = head.serve_udp(8001)?;
    let _worker_tcp = worker.serve_tcp(8000)?;

    let manifests = Manifests::new()?;
    manifests.write(
        "base.yaml",
        &[
            namespace(ns),
            node_object(NODE, topo.node(0)),
            pod_object(ns, head, &uids[0], NODE, &head_labels("rc")),
            pod_object(ns, worker, &uids[1], NODE, &worker_labels("rc")),
            pod_object(ns, outsider, &uids[2], NODE, &[("app", "outsider")]),
        ],
    )?;
    manifests.write("rc.yaml", &[cluster(ns, "true")])?;
    let bpffs = Bpffs::new();
    let agent = node.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
    let kernel = Kernel {
        root: bpffs.path.clone(),
    };
    kernel.wait_audit(head, true, Instant::now())?;
    kernel.wait_audit(worker, true, Instant::now())?;
    let ep = |pod: &Pod| -> Result<EndpointInfo> {
        kernel
            .endpoint(pod)?
            .ok_or_else(|| anyhow::anyhow!("{} has no endpoint entry", pod.name))
    };
    let (head_ep, worker_ep) = (ep(head)?.endpoint_id, ep(worker)?.endpoint_id);
    ensure!(
        ep(head)?.flags & (endpoint_flags::ISOLATE_INGRESS | endpoint_flags::ISOLATE_EGRESS)
            == endpoint_flags::ISOLATE_INGRESS | endpoint_flags::ISOLATE_EGRESS,
        "audit keeps the isolation flags: {:?}",
        ep(head)?
    );

    // 1. Audit: the outsider reaches the head (TCP, UDP) and the worker; each
    // would-be-dropped flow is counted once as audit, nothing is dropped.
    let c0 = kernel.counters()?;
    assert_eq!(outsider.tcp_connect(v4(head), 8000, OK), Outcome::Ok);
    assert_eq!(outsider.udp_probe(v4(head), 8001, OK), Outcome::Ok);
    assert_eq!(outsider.tcp_connect(v4(worker), 8000, OK), Outcome::Ok);
    let mut held = outsider.tcp_hold(v4(worker), 8000, OK)?;
    ensure!(held.roundtrip(), "held outsider connection in audit");
    ensure!(held.roundtrip(), "held outsider connection in audit, again");
    let mut intra = worker.tcp_hold(v4(head), 8000, OK)?;
    ensure!(intra.roundtrip(), "held intra-cluster connection");
    // Delayed ACKs (40 ms) of the held connections land before the switch.
    std::thread::sleep(SETTLE);
    let c1 = kernel.counters()?;
    let audits = |before, after, ep| {
        delta(
            before,
            after,
            ep,
            Direction::Ingress,
            Verdict::Audit,
            Reason::NoPolicy,
        )
    };
    assert_eq!(audits(&c0, &c1, head_ep), 2, "head: one TCP, one UDP flow");
    assert_eq!(audits(&c0, &c1, worker_ep), 2, "worker: two TCP flows");
    assert_eq!(delta_all(&c0, &c1, head_ep, Verdict::Audit), 2, "replies");
    assert_eq!(delta_all(&c0, &c1, worker_ep, Verdict::Audit), 2, "replies");
    assert_eq!(delta_all(&c0, &c1, head_ep, Verdict::Drop), 0);
    assert_eq!(delta_all(&c0, &c1, worker_ep, Verdict::Drop), 0);

    // 2. Enforce: the outsider is dropped, its held connection cut; the cluster's
    // own traffic, held connection included, keeps passing.
    let generation = ep(worker)?.generation;
    let t0 = Instant::now();
    manifests.write("rc.yaml", &[cluster(ns, "false")])?;
    let took = kernel.wait_audit(head, false, t0)?;
    kernel.wait_audit(worker, false, t0)?;
    ensure!(
        ep(worker)?.generation != generation,
        "the switch re-checks established flows"
    );
    println!("audit -> enforce: in the datapath {took:?} after the manifest was written");
    let c2 = kernel.counters()?;
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, DENIED_TCP),
        Outcome::Timeout
    );
    assert_eq!(
        outsider.udp_probe(v4(head), 8001, DENIED_UDP),
        Outcome::Timeout
    );
    assert_eq!(
        outsider.tcp_connect(v4(worker), 8000, DENIED_TCP),
        Outcome::Timeout
    );
    let c3 = kernel.counters()?;
    let drops = |before, after, ep| {
        delta(
            before,
            after,
            ep,
            Direction::Ingress,
            Verdict::Drop,
            Reason::NoPolicy,
        )
    };
    assert_eq!(drops(&c2, &c3, head_ep), 2, "head: one SYN, one datagram");
    assert_eq!(drops(&c2, &c3, worker_ep), 1, "worker: one SYN");
    assert_eq!(delta_all(&c2, &c3, head_ep, Verdict::Drop), 2);
    assert_eq!(delta_all(&c2, &c3, worker_ep, Verdict::Drop), 1);
    assert_eq!(delta_all(&c2, &c3, head_ep, Verdict::Audit), 0);
    assert_eq!(delta_all(&c2, &c3, worker_ep, Verdict::Audit), 0);
    let cut = held.roundtrip_outcome();
    ensure!(
        !cut.is_ok(),
        "the connection held from the audit phase still passes"
    );
    let c4 = kernel.counters()?;
    ensure!(
        drops(&c3, &c4, worker_ep) >= 1,
        "the held connection's data was not counted as dropped"
    );
    assert_eq!(delta_all(&c3, &c4, worker_ep, Verdict::Audit), 0);
    ensure!(
        intra.roundtrip(),
        "intra-cluster held connection after the switch"
    );
    assert_eq!(worker.tcp_connect(v4(head), 8000, OK), Outcome::Ok);
    assert_eq!(head.tcp_connect(v4(worker), 8000, OK), Outcome::Ok);
    // The held connection's retransmissions would pass again in audit: end it.
    drop(held);
    std::thread::sleep(SETTLE);

    // 3. Audit again: the outsider passes at once.
    let t0 = Instant::now();
    manifests.write("rc.yaml", &[cluster(ns, "true")])?;
    let took = kernel.wait_audit(head, true, t0)?;
    println!("enforce -> audit: in the datapath {took:?} after the manifest was written");
    let c5 = kernel.counters()?;
    assert_eq!(outsider.tcp_connect(v4(head), 8000, OK), Outcome::Ok);
    assert_eq!(outsider.udp_probe(v4(head), 8001, OK), Outcome::Ok);
    let c6 = kernel.counters()?;
    assert_eq!(audits(&c5, &c6, head_ep), 2);
    assert_eq!(delta_all(&c5, &c6, head_ep, Verdict::Audit), 2);
    assert_eq!(delta_all(&c5, &c6, head_ep, Verdict::Drop), 0);
    ensure!(
        intra.roundtrip(),
        "intra-cluster held connection back in audit"
    );
    std::thread::sleep(SETTLE);

    // 4. An invalid value: enforced, and the problem is logged naming the field.
    let t0 = Instant::now();
    manifests.write("rc.yaml", &[cluster(ns, "yes")])?;
    kernel.wait_audit(head, false, t0)?;
    kernel.wait_audit(worker, false, t0)?;
    agent.wait_log(
        &[
            "invalid input",
            "rayfence.io/audit",
            "value=yes",
            "enforced",
        ],
        SWITCH_BOUND,
    )?;
    let c7 = kernel.counters()?;
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, DENIED_TCP),
        Outcome::Timeout
    );
    let c8 = kernel.counters()?;
    assert_eq!(drops(&c7, &c8, head_ep), 1);
    assert_eq!(delta_all(&c7, &c8, head_ep, Verdict::Audit), 0);
    ensure!(intra.roundtrip(), "intra-cluster held connection, enforced");
    Ok(())
}
