//! End to end, the container runtimes and cgroup layouts a node may have: the real
//! `rayfence agent` on a simulated bridged node whose kubelet tree is laid out for
//! each (runtime, cgroup driver, cgroup mount) shape, with the same small
//! connectivity matrix on every shape that can work, and the agent's own words on
//! the shapes that cannot.
//!
//! Shapes: containerd (`cri-containerd-<id>.scope` / `ctr`) and CRI-O
//! (`crio-<id>[.scope]`, with conmon in a `crio-conmon-<id>[.scope]` sibling, in
//! the node's network namespace), each with the systemd and the cgroupfs driver,
//! each on this machine's hybrid mounts (cgroup2 at `/sys/fs/cgroup/unified`, the
//! agent given its test tree as `--cgroup-root`) and on a pure cgroup v2 host (the
//! agent in its own mount namespace with cgroup2 at `/sys/fs/cgroup` and nothing
//! else, no `--cgroup-root`: it finds the mount and the pods itself).
//!
//! The matrix (RayCluster `rc` under DenyAll): `head` and `worker` on veths (the TC
//! hook), `mworker`, a worker on a macvlan (no host veth: the cgroup hook), an
//! `outsider` on a veth, the hostNetwork pod `exporter` (its socket's cgroup makes
//! it a pod, not the node) and a host process (the node). Allowed: the cluster's
//! pods among themselves across both hooks, the node to the head. Dropped: the
//! outsider to and from the cluster's pods on both hooks, and the exporter to the
//! head; each drop is one packet on the right endpoint's pinned counters, and
//! nothing else is dropped.
//!
//! Shapes that cannot work: the cgroupfs driver on a hybrid host keeps pod cgroups
//! in cgroup v1 only (the agent names that at start, and names it for the macvlan
//! pod, which stays pending; veth pods are found by the bridge after traffic and
//! enforced on TC, where neither a hostNetwork pod nor the kubelet counts as the
//! node, since nothing tells them apart); a host with cgroup v1 only (the agent refuses to
//! start, naming the v1 hierarchies). Needs root. Every shape has its own
//! namespaces, cgroups, bpffs directory and agent, removed on drop.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence_common::{Direction, Verdict};
use rayfence_tests::agent::{Agent, AgentOptions, Bpffs, CgroupMount, Manifests};
use rayfence_tests::counters::{self, Counters};
use rayfence_tests::kubelet::{
    CgroupDriver, ContainerRuntime, HostNetworkPod, KubeletTree, QosClass,
};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::{Layout, Outcome, Pod, Prober, Server, Topology, probe_bin};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const PORT: u16 = 8000;
const EXPORTER: u16 = 9100;
/// Allowed flows: plenty for one connection inside a machine.
const OK: Duration = Duration::from_secs(1);
/// Denied TCP: shorter than the first SYN retransmission, so one packet.
const DENIED: Duration = Duration::from_millis(700);

static SHAPES: AtomicU32 = AtomicU32::new(0);

fn uid(shape: u32, n: u32) -> String {
    format!(
        "5a9e{shape:02x}{n:02x}-aaaa-4bbb-8ccc-{:012x}",
        std::process::id()
    )
}

/// A pod of the matrix: topology name, labels, QoS class.
type PodSpec = (&'static str, Vec<(&'static str, &'static str)>, QosClass);

/// The pods of the matrix (all three QoS classes, so every layout of the kubelet
/// is used).
fn matrix_pods() -> [PodSpec; 4] {
    [
        ("head", head_labels("rc"), QosClass::Guaranteed),
        ("worker", worker_labels("rc"), QosClass::Burstable),
        ("mworker", worker_labels("rc"), QosClass::BestEffort),
        ("outsider", vec![("app", "outsider")], QosClass::Burstable),
    ]
}

/// A node laid out for one shape: the pods' processes in their container cgroups,
/// CRI-O's conmon beside them (a node-namespace process in the pod cgroup), a
/// hostNetwork exporter, servers on every pod.
struct Node {
    // Field order is drop order: processes first, then cgroups, then namespaces.
    _servers: Vec<Server>,
    exporter: HostNetworkPod,
    manifests: Manifests,
    tree: KubeletTree,
    topo: Topology,
    bpffs: Bpffs,
    ns: String,
    monitoring: String,
    /// Pod name -> UID.
    uids: Vec<(String, String)>,
}

impl Node {
    fn new(tree: KubeletTree) -> Result<Node> {
        let shape = SHAPES.fetch_add(1, Ordering::Relaxed);
        let mut topo = Topology::new(Layout::Bridged, probe_bin())?;
        topo.add_pod(0, "head")?;
        topo.add_pod(0, "worker")?;
        topo.add_macvlan_pod(0, "mworker")?;
        topo.add_pod(0, "outsider")?;
        let tag = topo.tag().to_owned();
        let (ns, monitoring) = (format!("ray-{tag}"), format!("monitoring-{tag}"));
        let node = topo.node(0);
        let mut docs = vec![
            namespace(&ns),
            namespace(&monitoring),
            node_object(NODE, node),
            raycluster(&ns, "rc", json!({"mode": "DenyAll"})),
        ];
        let mut servers = Vec::new();
        let mut uids = Vec::new();
        let conmon = |servers: &mut Vec<Server>, uid: &str, qos, n: u16| -> Result<()> {
            if let Some(dir) = tree.conmon_cgroup(uid, qos)? {
                // conmon: a process of the pod cgroup in the node's namespace.
                servers.push(node.prober().in_cgroup(&dir).serve_tcp(7100 + n)?);
            }
            Ok(())
        };
        for (i, (name, labels, qos)) in matrix_pods().into_iter().enumerate() {
            let pod = topo.pod(name);
            let uid = uid(shape, i as u32);
            let ctr = tree.pod_cgroup(&uid, qos)?;
            pod.set_cgroup_dir(Some(&ctr));
            conmon(&mut servers, &uid, qos, i as u16)?;
            servers.push(pod.serve_tcp(PORT)?);
            let mut object = pod_object(&ns, pod, &uid, NODE, &labels);
            object["status"]["qosClass"] = Value::from(qos.api());
            docs.push(object);
            uids.push((name.to_owned(), uid));
        }
        let exporter_uid = uid(shape, 10);
        let exporter = HostNetworkPod::new(
            &tree,
            node,
            &monitoring,
            "exporter",
            &exporter_uid,
            QosClass::Burstable,
        )?;
        conmon(&mut servers, &exporter_uid, QosClass::Burstable, 10)?;
        servers.push(exporter.serve_tcp(EXPORTER)?);
        docs.push(exporter.manifest(NODE, &[("app", "exporter")], &[EXPORTER]));
        let manifests = Manifests::new()?;
        manifests.write("all.yaml", &docs)?;
        Ok(Node {
            _servers: servers,
            exporter,
            manifests,
            tree,
            topo,
            bpffs: Bpffs::new(),
            ns,
            monitoring,
            uids,
        })
    }

    fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    fn uid(&self, name: &str) -> &str {
        self.uids
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, uid)| uid.as_str())
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn start_agent(&self, mount: CgroupMount, extra_args: &[&str]) -> Result<Agent> {
        Agent::start_with(
            &AgentOptions {
                node: self.topo.node(0),
                node_name: NODE,
                manifests: &self.manifests.dir,
                bpffs: &self.bpffs.path,
                cgroup_root: self.tree.root(),
                kubeconfig: None,
                extra_args,
            },
            mount,
        )
    }
}

/// The endpoint id the agent gave `pod` when it attached it on `hook`.
fn endpoint_of(agent: &Agent, ns: &str, pod: &str, hook: &str) -> Result<u32> {
    let want = format!("{ns}/{pod} ");
    let hook = format!("hook=\"{hook}\"");
    agent.wait_log(
        &["endpoint attached", &want, &hook],
        Duration::from_secs(10),
    )?;
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("endpoint attached") && l.contains(&want) && l.contains(&hook))
        .context("the attach line")?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("endpoint="))
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("no endpoint id in {line}"))
}

/// Dropped packets per (endpoint, direction), any reason.
fn drops(counters: &Counters, endpoint: u32, direction: Direction) -> u64 {
    counters
        .iter()
        .filter(|(k, _)| {
            k.endpoint_id == endpoint
                && k.direction == direction as u8
                && k.verdict == Verdict::Drop as u8
        })
        .map(|(_, v)| v.packets)
        .sum()
}

/// One probe of the matrix: what, whether it must pass, and the probe.
type Probe<'a> = (String, bool, Box<dyn Fn() -> Outcome + Send + Sync + 'a>);

/// Runs every probe at once (a dropped one costs its whole timeout) and checks
/// each outcome.
fn run_probes(probes: Vec<Probe<'_>>) -> Result<()> {
    let outcomes: Vec<(String, bool, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(what, want_ok, probe)| s.spawn(move || (what.clone(), *want_ok, probe())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    let wrong: Vec<String> = outcomes
        .iter()
        .filter(|(_, want_ok, o)| {
            if *want_ok {
                *o != Outcome::Ok
            } else {
                !o.is_blocked()
            }
        })
        .map(|(what, want_ok, o)| {
            format!(
                "{what}: wanted {}, got {o:?}",
                if *want_ok { "ok" } else { "dropped" }
            )
        })
        .collect();
    ensure!(
        wrong.is_empty(),
        "{} mismatches:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// A TCP connection from `from` (a pod's prober: its namespace and cgroup) that
/// must pass or be dropped.
fn tcp(what: String, want_ok: bool, from: Prober, to: IpAddr, port: u16) -> Probe<'static> {
    let timeout = if want_ok { OK } else { DENIED };
    (
        what,
        want_ok,
        Box::new(move || from.tcp_connect(to, port, timeout)),
    )
}

/// The matrix on one shape that can work.
fn connectivity_matrix(
    runtime: ContainerRuntime,
    driver: CgroupDriver,
    mount: CgroupMount,
) -> Result<()> {
    let t0 = Instant::now();
    let node = Node::new(KubeletTree::with_runtime(driver, runtime)?)?;
    let agent = node.start_agent(mount, &[])?;
    let lab = node.topo.node(0);
    agent.wait_ready(lab, Duration::from_secs(30))?;
    // The agent found the cgroup2 mount itself on a pure v2 host.
    let mount_seen = match mount {
        CgroupMount::PureV2 => "/sys/fs/cgroup".to_owned(),
        _ => node.tree.root().display().to_string(),
    };
    agent.wait_log(
        &["pod discovery ready", &format!("cgroup_mount={mount_seen}")],
        Duration::from_secs(5),
    )?;
    let ns = node.ns.as_str();
    let head = endpoint_of(&agent, ns, "head", "tc")?;
    let worker = endpoint_of(&agent, ns, "worker", "tc")?;
    let mworker = endpoint_of(&agent, ns, "mworker", "cgroup")?;
    agent.wait_log(
        &[
            "hostNetwork pod: its traffic is its own",
            &format!("{}/exporter", node.monitoring),
        ],
        Duration::from_secs(10),
    )?;
    // A CRI-O pod with conmon in its cgroup is still found through its own
    // namespace, not taken for a host-networked pod.
    for pod in ["head", "worker"] {
        agent.wait_log(
            &[
                "endpoint attached",
                &format!("{ns}/{pod} "),
                "via=pod-netns",
            ],
            Duration::from_secs(5),
        )?;
    }
    let before = counters::pinned(&node.bpffs.path)?;

    let (h, w, mw, out) = (
        node.pod("head"),
        node.pod("worker"),
        node.pod("mworker"),
        node.pod("outsider"),
    );
    let exporter = node.exporter.prober();
    let host = lab.prober();
    let mut probes: Vec<Probe> = Vec::new();
    for family in 0..2 {
        let (hip, mwip, outip) = (h.ips()[family], mw.ips()[family], out.ips()[family]);
        let v = if family == 0 { "v4" } else { "v6" };
        let flows = [
            ("worker -> head", true, w.prober(), hip, PORT),
            ("mworker -> head", true, mw.prober(), hip, PORT),
            ("head -> mworker", true, h.prober(), mwip, PORT),
            ("node (host process) -> head", true, host.clone(), hip, PORT),
            ("outsider -> head", false, out.prober(), hip, PORT),
            ("outsider -> mworker", false, out.prober(), mwip, PORT),
            ("head -> outsider", false, h.prober(), outip, PORT),
            ("mworker -> outsider", false, mw.prober(), outip, PORT),
            (
                "hostNetwork exporter -> head",
                false,
                exporter.clone(),
                hip,
                PORT,
            ),
        ];
        for (what, want_ok, from, to, port) in flows {
            probes.push(tcp(format!("{what} {v}"), want_ok, from, to, port));
        }
    }
    run_probes(probes)?;

    // One packet per dropped probe, on the endpoint that dropped it; nothing else.
    let after = counters::pinned(&node.bpffs.path)?;
    let want = [
        (
            head,
            Direction::Ingress,
            4,
            "head ingress (outsider, exporter)",
        ),
        (head, Direction::Egress, 2, "head egress (to the outsider)"),
        (mworker, Direction::Ingress, 2, "mworker ingress (outsider)"),
        (
            mworker,
            Direction::Egress,
            2,
            "mworker egress (to the outsider)",
        ),
        (worker, Direction::Ingress, 0, "worker ingress"),
        (worker, Direction::Egress, 0, "worker egress"),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(endpoint, direction, n, what)| {
            let got = drops(&after, *endpoint, *direction) - drops(&before, *endpoint, *direction);
            (got != *n).then(|| format!("{what}: {got} drops, expected {n}"))
        })
        .collect();
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    eprintln!(
        "{} {} {}: 18 flows, 0 mismatches, in {:?}",
        runtime.name(),
        driver.name(),
        mount.name(),
        t0.elapsed()
    );
    Ok(())
}

#[test]
fn containerd_systemd_on_a_hybrid_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Containerd,
        CgroupDriver::Systemd,
        CgroupMount::Hybrid,
    )
}

#[test]
fn containerd_systemd_on_a_pure_cgroup_v2_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Containerd,
        CgroupDriver::Systemd,
        CgroupMount::PureV2,
    )
}

#[test]
fn containerd_cgroupfs_on_a_pure_cgroup_v2_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Containerd,
        CgroupDriver::Cgroupfs,
        CgroupMount::PureV2,
    )
}

#[test]
fn crio_systemd_on_a_hybrid_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Crio,
        CgroupDriver::Systemd,
        CgroupMount::Hybrid,
    )
}

#[test]
fn crio_systemd_on_a_pure_cgroup_v2_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Crio,
        CgroupDriver::Systemd,
        CgroupMount::PureV2,
    )
}

#[test]
fn crio_cgroupfs_on_a_pure_cgroup_v2_host() -> Result<()> {
    connectivity_matrix(
        ContainerRuntime::Crio,
        CgroupDriver::Cgroupfs,
        CgroupMount::PureV2,
    )
}

/// The cgroupfs driver on a hybrid host: pod cgroups in cgroup v1 only. The agent
/// says so at start, and for the macvlan pod (which only the cgroup hook could
/// enforce) says why it stays pending; it never claims it attached. A veth pod is
/// found by the bridge once it had traffic, and enforced on TC; there, since no
/// process can be told from the node's, none is the node (fail closed): the
/// hostNetwork exporter and the kubelet are only the node's address.
fn cgroupfs_on_a_hybrid_host(runtime: ContainerRuntime) -> Result<()> {
    let tree = KubeletTree::cgroupfs_on_hybrid(runtime)?;
    let kubelet_root = tree.kubelet_cgroup_root().context("a v1 kubelet root")?;
    let v1_root = tree.v1_root().context("a v1 tree")?.to_owned();
    let node = Node::new(tree)?;
    let lab = node.topo.node(0);
    // The kubelet: a host process in `system.slice/kubelet.service`, there before
    // the agent.
    let kubelet = node.tree.root().join("system.slice/kubelet.service");
    std::fs::create_dir_all(&kubelet)?;
    let agent = node.start_agent(
        CgroupMount::Hybrid,
        &["--kubelet-cgroup-root", &kubelet_root],
    )?;
    agent.wait_ready(lab, Duration::from_secs(30))?;
    agent.wait_log(
        &[
            "the kubelet's pod cgroups are in cgroup v1 only",
            &v1_root.join("kubepods").display().to_string(),
            "cgroupfs cgroup driver on a hybrid host",
            "hostNetwork pods cannot be told from the node",
        ],
        Duration::from_secs(5),
    )?;
    let mworker_v1 = v1_root.join(format!("kubepods/besteffort/pod{}", node.uid("mworker")));
    let why = format!("its cgroup is in cgroup v1 only ({})", mworker_v1.display());
    let mworker = format!("{}/mworker ", node.ns);
    agent.wait_log(
        &["pod not found in the kernel yet; pending", &mworker, &why],
        Duration::from_secs(10),
    )?;
    let (_, status, _) = agent.command(lab, &["status"])?;
    ensure!(
        status.contains("mworker") && status.contains(&why),
        "rayfence status does not say why mworker is pending:\n{status}"
    );
    ensure!(
        !agent
            .log_text()
            .lines()
            .any(|l| l.contains("endpoint attached") && l.contains(&mworker)),
        "mworker was attached:\n{}",
        agent.log_text()
    );
    // A pod with a host veth has no cgroup to be found through either; once it
    // has had traffic the bridge's FDB finds its port, and TC enforces it.
    let head = node.pod("head");
    ensure!(lab.tcp_connect(head.ip4.into(), PORT, OK) == Outcome::Ok);
    agent.wait_log(
        &[
            "endpoint attached",
            &format!("{}/head ", node.ns),
            "hook=\"tc\"",
            "via=bridge-fdb",
        ],
        Duration::from_secs(15),
    )?;
    let head_id = endpoint_of(&agent, &node.ns, "head", "tc")?;
    // Nothing tells the exporter's processes (in the runtime's service cgroup)
    // from the node's: fail closed, no process of the node is the node, the
    // kubelet included.
    let before = counters::pinned(&node.bpffs.path)?;
    let to = IpAddr::from(head.ip4);
    run_probes(vec![
        tcp(
            "outsider -> head".into(),
            false,
            node.pod("outsider").prober(),
            to,
            PORT,
        ),
        tcp(
            "hostNetwork exporter -> head".into(),
            false,
            node.exporter.prober(),
            to,
            PORT,
        ),
        tcp(
            "kubelet -> head".into(),
            false,
            lab.prober().in_cgroup(&kubelet),
            to,
            PORT,
        ),
        tcp(
            "worker -> head".into(),
            true,
            node.pod("worker").prober(),
            to,
            PORT,
        ),
    ])?;
    let after = counters::pinned(&node.bpffs.path)?;
    let got =
        drops(&after, head_id, Direction::Ingress) - drops(&before, head_id, Direction::Ingress);
    ensure!(got == 3, "head ingress drops: {got}, expected 3");
    Ok(())
}

#[test]
fn containerd_cgroupfs_on_a_hybrid_host_is_named_and_fails_closed() -> Result<()> {
    cgroupfs_on_a_hybrid_host(ContainerRuntime::Containerd)
}

#[test]
fn crio_cgroupfs_on_a_hybrid_host_is_named_and_fails_closed() -> Result<()> {
    cgroupfs_on_a_hybrid_host(ContainerRuntime::Crio)
}

/// A host with cgroup v1 only: the agent refuses to start, naming the v1
/// hierarchies and what it needs cgroup v2 for, and attaches and pins nothing.
#[test]
fn on_a_cgroup_v1_only_host_the_agent_refuses_to_start_and_says_why() -> Result<()> {
    let topo = Topology::new(Layout::Bridged, probe_bin())?;
    let manifests = Manifests::new()?;
    let bpffs = Bpffs::new();
    let mut agent = Agent::start_with(
        &AgentOptions {
            node: topo.node(0),
            node_name: NODE,
            manifests: &manifests.dir,
            bpffs: &bpffs.path,
            cgroup_root: std::path::Path::new("/nonexistent"),
            kubeconfig: None,
            extra_args: &[],
        },
        CgroupMount::V1Only,
    )?;
    let code = agent.wait_exit(Duration::from_secs(20))?;
    let log = agent.log_text();
    ensure!(code.is_some_and(|c| c != 0), "exit {code:?}; log:\n{log}");
    for needle in [
        "no cgroup2 mount in /proc/self/mountinfo (cgroup v1 only: hierarchies at /sys/fs/cgroup/pids)",
        "rayfence needs cgroup v2",
    ] {
        ensure!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
    ensure!(
        !log.contains("endpoint attached"),
        "attached something:\n{log}"
    );
    // Refused before the datapath is loaded: nothing is pinned.
    let pinned: Vec<_> = match std::fs::read_dir(&bpffs.path) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect(),
        Err(_) => Vec::new(),
    };
    ensure!(pinned.is_empty(), "pinned {pinned:?}; log:\n{log}");
    Ok(())
}

/// The premise of the shapes: what a process started with each [`CgroupMount`]
/// sees (its mountinfo), and that it is the machine's own cgroup2 hierarchy (a
/// test cgroup has the same inode, so the same cgroup id, inside and out).
#[test]
fn each_cgroup_mount_shows_the_started_process_only_its_cgroup_filesystems() -> Result<()> {
    let test_cgroup = rayfence_tests::TestCgroup::new()?;
    let name = test_cgroup
        .path()
        .file_name()
        .context("name")?
        .to_string_lossy()
        .into_owned();
    for mount in CgroupMount::ALL {
        let mut command = std::process::Command::new("sh");
        command.args([
            "-c",
            &format!(
                "cat /proc/self/mountinfo; stat -c 'inode %i' /sys/fs/cgroup/{name} \
                 /sys/fs/cgroup/unified/{name} 2>/dev/null; true"
            ),
        ]);
        rayfence_tests::cgroup::set_cgroup_mount(&mut command, mount);
        let out = command.output()?;
        ensure!(out.status.success(), "{mount:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let cgroup_mounts: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let fstype = right.split_whitespace().next()?;
                let point = left.split_whitespace().nth(4)?;
                fstype.starts_with("cgroup").then_some((point, fstype))
            })
            .collect();
        let inode = text
            .lines()
            .find_map(|l| l.strip_prefix("inode "))
            .map(str::to_owned);
        match mount {
            CgroupMount::Hybrid => ensure!(
                cgroup_mounts.contains(&("/sys/fs/cgroup/unified", "cgroup2"))
                    && cgroup_mounts.len() > 1,
                "{cgroup_mounts:?}"
            ),
            CgroupMount::PureV2 => ensure!(
                cgroup_mounts == [("/sys/fs/cgroup", "cgroup2")],
                "{cgroup_mounts:?}"
            ),
            CgroupMount::V1Only => ensure!(
                cgroup_mounts == [("/sys/fs/cgroup/pids", "cgroup")],
                "{cgroup_mounts:?}"
            ),
        }
        let want = match mount {
            CgroupMount::V1Only => None,
            _ => Some(test_cgroup.id()?.to_string()),
        };
        ensure!(inode == want, "{mount:?}: inode {inode:?}, want {want:?}");
    }
    Ok(())
}
