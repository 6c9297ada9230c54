//! End to end, issue 17: a pod IP reused while the old Pod object lingers. In the
//! kubelet's order, a worker's sandbox goes first (its veth, its processes, its pod
//! cgroup), the Pod object only later; meanwhile the IP may be handed to a new pod.
//! That new pod must never reach what the old worker could (the head's dashboard
//! port), however long the old object stays: not before its own Pod object appears,
//! not while both objects claim the address, not after the old one goes.
//!
//! A continuous prober in the new pod knocks on the head's dashboard port every
//! ~20 ms from the moment its network is up; none of its probes may get through.
//!
//! Needs root (network namespaces, bpffs, cgroups). Everything is unique per test
//! and removed by guards, on panic too.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence_tests::agent::*;
use rayfence_tests::background::Background;
use rayfence_tests::objects::json::*;
use rayfence_tests::probe_bin;
use rayfence_tests::{Layout, Netns, Outcome, Prober, Server, Topology};
use serde_json::json;

const NODE: &str = "node-a";
const DASHBOARD: u16 = 8265;
const SHORT: Duration = Duration::from_millis(300);
/// The prober's cadence, as in the report that found this.
const EVERY: Duration = Duration::from_millis(20);

/// Probes sent, and when and to which address each success went.
type Tally = (u32, Vec<(Duration, IpAddr)>);

/// Probes `addr:port` over TCP every [`EVERY`] until stopped, alternating between
/// the two addresses; counts attempts and records the successes.
fn continuous(prober: Prober, addrs: [IpAddr; 2], port: u16) -> Background<Tally> {
    Background::start(move |flag| {
        let t0 = Instant::now();
        let (mut attempts, mut through) = (0u32, Vec::new());
        let mut next = t0;
        while !flag.load(Ordering::Relaxed) {
            let addr = addrs[attempts as usize % 2];
            attempts += 1;
            if prober.tcp_connect(addr, port, EVERY) == Outcome::Ok {
                through.push((t0.elapsed(), addr));
            }
            next += EVERY;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (attempts, through)
    })
}

/// A pod's sandbox as the kubelet tears it down: processes killed, then its
/// container and pod cgroups removed (the veth goes with the CNI's DEL, before).
fn remove_sandbox(sandbox: Sandbox) -> Result<()> {
    let ctr = sandbox.ctr.clone();
    drop(sandbox);
    let pod_dir = ctr.parent().context("pod cgroup")?.to_path_buf();
    // rmdir fails while the killed process is still being reaped: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in [&ctr, &pod_dir] {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
            }
        }
    }
    Ok(())
}

/// A new pod the CNI wired to the node's bridge with `ips` (the old worker's), in
/// a network namespace and pod cgroup of its own, with a sandbox process. Its
/// namespace (and with it both ends of its veth) goes on drop; its cgroup goes
/// with the kubelet tree.
struct NewPod {
    netns: Netns,
    ctr: PathBuf,
    _pause: Server,
}

impl NewPod {
    fn create(topo: &Topology, kubelet: &Kubelet, uid: &str, ips: [IpAddr; 2]) -> Result<Self> {
        let node = topo.node(0);
        let bridge = node.bridge.as_deref().context("a bridged node")?;
        let netns = Netns::new("pod-reuse")?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let host_if = format!("rf{}ru", topo.tag());
        node.netns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        node.netns
            .ip(&["link", "set", &host_if, "master", bridge, "up"])?;
        netns.ip(&["addr", "add", &format!("{}/24", ips[0]), "dev", "eth0"])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{}/64", ips[1]),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &node.gateway4.to_string()])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &node.gateway6.to_string(),
        ])?;
        let ctr = kubelet.pod_cgroup(uid)?;
        let pause = Prober::new(probe_bin(), &netns)
            .in_cgroup(&ctr)
            .serve_tcp(9)?;
        Ok(NewPod {
            netns,
            ctr,
            _pause: pause,
        })
    }

    fn prober(&self) -> Prober {
        Prober::new(probe_bin(), &self.netns).in_cgroup(&self.ctr)
    }
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp
/// (`2026-12-04T17:05:27.917216Z ...`).
fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Seconds since midnight UTC now.
fn time_of_day() -> f64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since_epoch.as_secs_f64() % 86_400.0
}

fn remove_file(dir: &Path, name: &str) -> Result<()> {
    std::fs::remove_file(dir.join(name)).with_context(|| format!("removing {name}"))
}

#[test]
fn a_reused_ip_gets_no_trust_while_the_old_pod_object_lingers() -> Result<()> {
    let topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "worker", "plain"])?;
    let kubelet = Kubelet::new()?;
    let ns = format!("ray-{}", topo.tag());
    let (head, worker, plain) = (topo.pod("head"), topo.pod("worker"), topo.pod("plain"));
    let (head_uid, worker_uid, plain_uid, new_uid) = (uid(1), uid(2), uid(3), uid(4));
    let _head_sandbox = sandbox(&kubelet, head, &head_uid)?;
    let worker_sandbox = sandbox(&kubelet, worker, &worker_uid)?;
    let _plain_sandbox = sandbox(&kubelet, plain, &plain_uid)?;
    let _dashboard = head.serve_tcp(DASHBOARD)?;
    let _plain_tcp = plain.serve_tcp(8000)?;

    let manifests = Manifests::new()?;
    manifests.write(
        "base.yaml",
        &[
            namespace(&ns),
            node_object(NODE, topo.node(0)),
            pod_object(&ns, head, &head_uid, NODE, &head_labels("rc")),
            pod_object(&ns, plain, &plain_uid, NODE, &[("app", "plain")]),
            raycluster(&ns, "rc", json!({"mode": "DenyAll"})),
        ],
    )?;
    manifests.write(
        "worker.yaml",
        &[pod_object(
            &ns,
            worker,
            &worker_uid,
            NODE,
            &worker_labels("rc"),
        )],
    )?;
    let bpffs = Bpffs::new();
    let agent = Agent::start(&AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &manifests.dir,
        bpffs: &bpffs.path,
        cgroup_root: kubelet.root.path(),
        kubeconfig: None,
        extra_args: &[],
    })?;
    agent.wait_ready(topo.node(0), Duration::from_secs(20))?;
    let head_ips = head.ips();
    // The trust at stake: the worker reaches the dashboard, a non-member does not.
    for ip in head_ips {
        assert_eq!(
            worker.tcp_connect(ip, DASHBOARD, SHORT),
            Outcome::Ok,
            "worker -> {ip}"
        );
        assert_eq!(
            plain.tcp_connect(ip, DASHBOARD, SHORT),
            Outcome::Timeout,
            "plain -> {ip}"
        );
    }

    // The kubelet stops the worker: the CNI deletes its veth, its processes and
    // cgroups go. Its Pod object stays (worker.yaml is untouched).
    let removed = Instant::now();
    let removed_at = time_of_day();
    topo.node(0).netns.ip(&["link", "del", &worker.host_if])?;
    remove_sandbox(worker_sandbox)?;
    // At once a new pod gets the worker's addresses, and knocks from the first
    // moment its network is up.
    let new_pod = NewPod::create(&topo, &kubelet, &new_uid, worker.ips())?;
    let probing = continuous(new_pod.prober(), head_ips, DASHBOARD);
    println!(
        "new pod probing {:?} after the veth went",
        removed.elapsed()
    );

    // Phase 1: only the old Pod object claims the address.
    std::thread::sleep(Duration::from_millis(2000));
    // The new pod's network works: it reaches a pod nobody isolates.
    assert_eq!(
        new_pod.prober().tcp_connect(v4(plain), 8000, SHORT),
        Outcome::Ok,
        "the new pod's network"
    );
    // Phase 2: the new pod's object appears with the same addresses while the old
    // one still claims them. The old pod's sandbox is known gone, so the addresses
    // are the newcomer's (an outsider), not a conflict.
    let mut new_object = pod_object(&ns, worker, &new_uid, NODE, &[("app", "outsider")]);
    new_object["metadata"]["name"] = json!("newcomer");
    manifests.write("newcomer.yaml", &[new_object])?;
    agent.wait_log(
        &["endpoint attached", &format!("{ns}/newcomer")],
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let conflict = agent.log_text().contains("also claimed by");
    // Phase 3: the old Pod object is deleted at last; the address is the newcomer's.
    remove_file(&manifests.dir, "worker.yaml")?;
    agent.wait_log(
        &["endpoint removed", &format!("{ns}/worker")],
        Duration::from_secs(5),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let (attempts, through) = probing.finish();

    let log = agent.log_text();
    println!(
        "{attempts} probes at ~{EVERY:?}, {} through: {through:?}",
        through.len()
    );
    let gone_line = log
        .lines()
        .find(|l| l.contains("the pod's sandbox is gone") && l.contains(&format!("{ns}/worker")));
    ensure!(
        gone_line.is_some(),
        "no word of the worker's sandbox going:\n{log}"
    );
    if let Some(at) = gone_line.and_then(log_time_of_day) {
        // Includes the `ip link del` process itself.
        println!(
            "sandbox seen gone {:.1} ms after `ip link del` started",
            (at - removed_at) * 1e3
        );
    }
    // Its old processes outliving its veth are not a new sandbox.
    ensure!(
        !log.contains("a new sandbox of the pod is up"),
        "the worker's trust came back:\n{log}"
    );
    ensure!(attempts >= 120, "only {attempts} probes");
    ensure!(
        through.is_empty(),
        "{} of {attempts} probes from the reused address reached the dashboard: {through:?}\n{log}",
        through.len()
    );
    ensure!(
        !conflict,
        "a conflict with a pod whose sandbox is known gone:\n{log}"
    );
    // Still isolated afterwards, and the new pod's network still fine.
    for ip in head_ips {
        assert_eq!(
            new_pod.prober().tcp_connect(ip, DASHBOARD, SHORT),
            Outcome::Timeout,
            "newcomer -> {ip}"
        );
    }
    assert_eq!(
        new_pod.prober().tcp_connect(v4(plain), 8000, SHORT),
        Outcome::Ok
    );
    Ok(())
}
