//! The demo (`cargo xtask demo`, binary `rf-demo`): one simulated node (two on
//! some shapes), the agent running against manifests, every flow probed, the
//! matrix printed.
//!
//! What it builds, in the node's network namespace, on the default shape
//! ([`crate::shape`]; `--shape` changes the wiring, the kube-proxy mode, the runtime
//! cgroups, the cgroup mount or the DNS, never the expected matrix):
//! - a flannel-like bridged node ([`crate::topology::Layout::Bridged`]): pods on a
//!   bridge holding the pod-subnet gateway, node address `10.0.0.1` on `host0`;
//! - kube-proxy-like DNAT ([`crate::node_nat::install_cluster_ips`], iptables or
//!   nftables mode) from each ClusterIP:port to its one backend. On a bridge the reply
//!   of a DNATed flow between two pods of the same subnet is bridged, not routed,
//!   so conntrack would never undo the DNAT: as on a real kube-proxy node,
//!   `br_netfilter` is loaded and `net.bridge.bridge-nf-call-iptables=1` is set,
//!   inside the node namespace only (per-namespace since Linux 5.3);
//! - the pods of [`scenario::PODS`]: CoreDNS (UDP+TCP echo on 53, behind
//!   `kube-system/kube-dns`), the KubeRay operator, an impostor with the operator's
//!   labels in another namespace, an outsider, Prometheus and Grafana in
//!   `monitoring`, and the head and a worker of RayClusters `alpha` (DenyAll, one
//!   user ingress rule) and `beta` (DenyAllIngress), each serving its Ray ports;
//! - what counts as the node (docs/semantics.md "What counts as the node"): alpha's head Service as a NodePort
//!   (kube-proxy's NodePort chains with the masquerade mark 0x4000, in front of
//!   the dashboard and client ports), the outsider's hostPort 18080 (the portmap
//!   plugin's DNAT), a hostNetwork pod (`monitoring/node-exporter`: a process in its
//!   pod cgroup in the node's namespace, on 9100), and an external client on an
//!   underlay (10.1.0.200 / fd00:10:1::c8, neither node nor pod) that alpha's head
//!   lets in on its dashboard port by an ipBlock;
//! - the manifests of all that in a temporary directory, for `--manifests`.
//!
//! Pods are dual-stack; Services are single-stack IPv4 (kube-proxy's DNAT is
//! IPv4 only here), so pod and node targets are probed over both families and
//! ClusterIPs over IPv4.
//!
//! Then it starts `rayfence agent` in the node namespace, waits for `/readyz`,
//! probes every (source, target) cell in parallel, prints the matrix next to the
//! hand-written expectation ([`expected`]), prints the agent's drop counters, and
//! removes everything: agent (and `rayfence cleanup`), namespaces (the iptables
//! rules live in the node namespace and go with it), bpffs directory, temporary
//! directory, also on panic ([`Drop`] guards) and on Ctrl-C ([`guard`]).
//!
//! Without an agent ([`Options::rayfence`] `None`) the same run is a self-check of
//! the harness: every flow passes, so exactly the `D` cells must show up as
//! `LEAK`, and the run fails.

pub mod agent;
pub mod dashboard;
pub mod expected;
pub mod guard;
pub mod matrix;
pub mod scenario;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cgroup::CgroupMount;
use crate::kubelet::{KubeletTree, NodeLocalDns, QosClass};
use crate::node_nat::{self, ClusterIpRule, Endpoint, HostPort, NodePortService, Protocol};
use crate::probe::{Outcome, ProbeBin, Prober, Server};
use crate::shape::{self, Dns, Shape};
use crate::topology::Topology;
use crate::topology::{NODE_LOCAL_DNS_DEVICE, NODE_LOCAL_DNS4, NODE_LOCAL_DNS6};

use expected::Expect;
use scenario::{
    Dest, EXTERNAL, HOST_NETWORK_PODS, HOST_PORTS, PODS, Proto, SERVICES, Source, TARGETS,
};

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `rayfence` binary; `None` runs without an agent (harness self-check).
    pub rayfence: Option<PathBuf>,
    pub probe: ProbeBin,
    /// How long a probe waits for an answer (a drop costs this much).
    pub timeout: Duration,
    /// Probes in flight at once.
    pub parallel: usize,
    /// How long the agent may take to become ready.
    pub ready_timeout: Duration,
    /// Also probe pod and node targets over IPv6 (the pods are dual-stack).
    pub ipv6: bool,
    /// The node's shape (`--shape`): the matrix and its expectation are the same
    /// on every shape.
    pub shape: Shape,
    /// Also show the shipped Grafana dashboard's panels on the run's data
    /// (`--dashboard`: a Prometheus server scrapes the first node's agent).
    pub dashboard: bool,
}

impl Options {
    pub fn new(rayfence: Option<PathBuf>, probe: ProbeBin) -> Self {
        Options {
            rayfence,
            probe,
            timeout: Duration::from_millis(1500),
            parallel: 40,
            ready_timeout: Duration::from_secs(30),
            ipv6: true,
            shape: shape::DEFAULT,
            dashboard: false,
        }
    }
}

/// What the run found.
#[derive(Debug)]
pub struct Report {
    /// Cells probed.
    pub probed: usize,
    /// Cells the hand-written table expects dropped.
    pub expected_dropped: usize,
    /// Cells whose flow got through.
    pub observed_allowed: usize,
    /// One line per cell whose verdict differs from the expectation.
    pub mismatches: Vec<String>,
    /// Whether the agent ran.
    pub with_agent: bool,
    /// The shape it ran on.
    pub shape: &'static str,
    /// The `rayfence_drops_total` lines of `/metrics`.
    pub drop_counters: Vec<String>,
    /// Probed flows `rayfence explain` was asked about.
    pub explained: usize,
    /// With `--dashboard`: how many panels were shown, and those without data.
    pub dashboard_panels: usize,
    pub dashboard_empty: Vec<String>,
    /// One line per probed flow whose explanation disagrees with what the
    /// datapath did (or that could not be explained).
    pub explain_disagreements: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.with_agent && self.mismatches.is_empty() && self.explain_disagreements.is_empty()
    }
}

fn say(started: Instant, what: &str) {
    println!("[{:5.1}s] {what}", started.elapsed().as_secs_f64());
}

/// A directory removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the whole demo and prints as it goes. Errors are harness failures
/// (a namespace could not be made, the agent never got ready); policy mismatches
/// are in the [`Report`].
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let table = expected::table()?;
    if let Some(bin) = &opts.rayfence
        && !agent::has_agent_command(bin)
    {
        bail!(
            "{} has no `agent` command: the demo needs the node agent (branch `runtime`); \
             rf-demo --no-agent runs the harness self-check",
            bin.display()
        );
    }
    // rf-demo-<pid>-<n>: unique even when a test binary runs two demos at once.
    let run_name = crate::names::unique_name("demo");
    let run = scenario::run_id(&run_name);
    let tmp = TempDir(std::env::temp_dir().join(&run_name));
    std::fs::create_dir_all(&tmp.0)?;
    let shape = opts.shape;
    let node_count = 1 + usize::from(shape.second_node.is_some());
    // One pin directory per node's agent.
    let bpffs: Vec<PathBuf> = (0..node_count)
        .map(|i| match i {
            0 => PathBuf::from("/sys/fs/bpf").join(&run_name),
            _ => PathBuf::from("/sys/fs/bpf").join(format!("{run_name}-node{}", i + 1)),
        })
        .collect();
    for dir in &bpffs {
        guard::remember(
            opts.rayfence.clone(),
            Some(dir.clone()),
            Some(tmp.0.clone()),
        );
    }

    say(
        started,
        &format!("shape {}: {}", shape.name, shape.stands_for),
    );
    ensure_br_netfilter()?;
    let mut topo = Topology::new(shape.layout, opts.probe.clone())?;
    topo.set_host_if_names(shape.host_if_names)?;
    if let Some(transport) = shape.second_node {
        topo.set_transport(transport)?;
        topo.add_node()?;
    }
    for p in PODS {
        topo.add_pod(scenario::node_of(p.key, node_count), p.key)?;
    }
    topo.add_external_client(EXTERNAL)?;
    for (i, n) in topo.nodes().iter().enumerate() {
        let on_it: Vec<&str> = PODS
            .iter()
            .map(|p| p.key)
            .filter(|k| scenario::node_of(k, node_count) == i)
            .collect();
        say(
            started,
            &format!(
                "node {}: netns {}, {}, pods' gateway {}, host0 {}{}; {} pods{}",
                scenario::node_name(i),
                n.netns.name(),
                match &n.bridge {
                    Some(bridge) => format!("bridge {bridge}"),
                    None => "a route per pod to its host veth".to_owned(),
                },
                n.gateway4,
                n.ip4,
                match &n.vxlan {
                    Some([v4, v6]) => format!(", VXLAN {v4} and {v6} to the other node"),
                    None => String::new(),
                },
                on_it.len(),
                if i == 0 {
                    String::new()
                } else {
                    format!(" ({})", on_it.join(", "))
                }
            ),
        );
        n.netns
            .sysctl("net.bridge.bridge-nf-call-iptables", "1")
            .context("br_netfilter: bridged replies of DNATed flows must see conntrack")?;
    }
    let cluster_ips: Vec<ClusterIpRule> = SERVICES
        .iter()
        .flat_map(|s| {
            let backend = IpAddr::from(topo.pod(s.backend).ip4);
            s.ports.iter().map(move |(port, proto, _)| ClusterIpRule {
                namespace: s.namespace.to_owned(),
                name: s.name.to_owned(),
                cluster_ip: s.cluster_ip.into(),
                protocol: match proto {
                    Proto::Tcp => Protocol::Tcp,
                    Proto::Udp => Protocol::Udp,
                },
                port: *port,
                backend,
                target_port: *port,
            })
        })
        .collect();
    // kube-proxy runs on every node, in the shape's mode.
    node_nat::set_kube_proxy_mode(topo.nodes(), shape.kube_proxy)?;
    for node in topo.nodes() {
        node_nat::install_cluster_ips(node, shape.kube_proxy, &cluster_ips)?;
    }
    install_node_nat(&topo)?;
    say(
        started,
        &format!(
            "kube-proxy-like ClusterIP DNAT ({} mode, on every node): {}",
            match shape.kube_proxy {
                node_nat::KubeProxyMode::Iptables => "iptables",
                node_nat::KubeProxyMode::Nftables => "nftables",
            },
            SERVICES
                .iter()
                .map(|s| format!("{}/{} {}", s.namespace, s.name, s.cluster_ip))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    say(
        started,
        &format!(
            "kube-proxy-like NodePorts (masquerade mark 0x4000) {}; portmap-like hostPorts {}; external client {} on the underlay",
            SERVICES
                .iter()
                .flat_map(|s| s
                    .node_ports
                    .iter()
                    .map(move |(p, n)| format!("{}:{n}->{p}", s.key)))
                .collect::<Vec<_>>()
                .join(", "),
            HOST_PORTS
                .iter()
                .map(|(k, c, h)| format!("{k}:{h}->{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            topo.external(EXTERNAL).ip4
        ),
    );
    // A kubelet-like cgroup tree for the shape's runtime and cgroup driver: each
    // pod's processes run in its container cgroup (e.g. `kubepods/besteffort/
    // pod<uid>/ctr`), which is how the agent reaches a pod's network namespace from
    // kernel state alone; hostNetwork pods' processes run in the node's namespace.
    // CRI-O's conmon runs beside each container, in the pod cgroup but in the
    // node's namespace.
    let kubelet = KubeletTree::with_runtime(shape.driver, shape.runtime)?;
    let mut ctrs = HashMap::new();
    let mut conmons = Vec::new();
    let uids = PODS
        .iter()
        .enumerate()
        .map(|(i, p)| (p.key, scenario::pod_uid(run, i)))
        .chain(
            HOST_NETWORK_PODS
                .iter()
                .enumerate()
                .map(|(i, p)| (p.key, scenario::host_network_pod_uid(run, i))),
        );
    for (n, (key, uid)) in uids.enumerate() {
        ctrs.insert(key, kubelet.pod_cgroup(&uid, QosClass::BestEffort)?);
        if let Some(dir) = kubelet.conmon_cgroup(&uid, QosClass::BestEffort)? {
            let node = topo.node(scenario::node_of(key, node_count));
            conmons.push(
                node.prober()
                    .in_cgroup(&dir)
                    .serve_tcp(CONMON_PORTS + n as u16)?,
            );
        }
    }
    say(
        started,
        &format!(
            "kubelet cgroups: {} driver, {} container names{}, under {}",
            shape.driver.name(),
            shape.runtime.name(),
            if conmons.is_empty() {
                String::new()
            } else {
                format!(
                    " (conmon beside each: {} processes in the node's namespace)",
                    conmons.len()
                )
            },
            kubelet.root().display()
        ),
    );
    let node_local_dns = match shape.dns {
        Dns::NodeLocal => {
            let cache = start_node_local_dns(&topo, &kubelet, run)?;
            say(
                started,
                &format!(
                    "NodeLocal DNSCache: hostNetwork pod kube-system/{} answering on {} and on kube-dns's ClusterIP (bound on {NODE_LOCAL_DNS_DEVICE}, NOTRACK)",
                    cache.pod.name,
                    cache.flag_value()
                ),
            );
            Some(cache)
        }
        Dns::Service => None,
    };
    let servers = start_servers(&topo, &ctrs)?;
    say(
        started,
        &format!(
            "{} servers listening (Ray ports, DNS on 53 UDP+TCP, kubelet 10250, node-exporter 9100 with host networking)",
            servers.len()
        ),
    );
    guard::check()?;
    preflight(&topo, opts.timeout)?;
    say(
        started,
        "preflight: node reaches every pod, DNS and a head Service answer through their ClusterIPs",
    );
    if node_local_dns.is_some() {
        let untracked = notrack_hits(&topo.node(0).netns)?;
        if untracked == 0 {
            bail!(
                "preflight: no DNS query to kube-dns's ClusterIP went to the NodeLocal cache (NOTRACK rules never matched)"
            );
        }
        say(
            started,
            &format!(
                "preflight: the DNS queries to kube-dns's ClusterIP were answered by the NodeLocal cache ({untracked} packets untracked, none DNATed)"
            ),
        );
    }

    let manifests = tmp.0.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let node_addrs: Vec<scenario::NodeAddrs> = topo
        .nodes()
        .iter()
        .map(|n| scenario::NodeAddrs {
            internal_ip: n.ip4,
            internal_ip6: n.ip6,
            pod_cidr: n.pod_cidr4,
        })
        .collect();
    let pod_ip = |k: &str| (topo.pod(k).ip4, topo.pod(k).ip6);
    for (name, text) in scenario::manifests(run, &node_addrs, &pod_ip) {
        std::fs::write(manifests.join(&name), text)?;
    }
    if let Some(cache) = &node_local_dns {
        std::fs::write(
            manifests.join("11-node-local-dns.yaml"),
            scenario::yaml_docs(&[cache.manifest(scenario::node_name(0))]),
        )?;
    }
    let extra_args: Vec<String> = match &node_local_dns {
        Some(cache) => vec!["--dns-node-local".into(), cache.flag_value()],
        None => Vec::new(),
    };
    say(
        started,
        &format!(
            "manifests written to {}: Namespaces, Node, Pods, Services + EndpointSlices, RayClusters alpha (networkPolicy DenyAll) and beta (networkIsolation DenyAllIngress)",
            manifests.display()
        ),
    );

    // One agent per node, each knowing every object and enforcing its own pods.
    let mut agents = Vec::new();
    if let Some(bin) = &opts.rayfence {
        for (i, n) in topo.nodes().iter().enumerate() {
            let node_name = scenario::node_name(i);
            let log = tmp.0.join(match i {
                0 => "agent.log".to_owned(),
                _ => format!("agent-node{}.log", i + 1),
            });
            let mut a = agent::Agent::start(
                &n.netns,
                &agent::Launch {
                    bin,
                    node_name,
                    manifests: &manifests,
                    bpffs: &bpffs[i],
                    cgroup_root: kubelet.root(),
                    cgroup_mount: shape.cgroups,
                    extra_args: &extra_args,
                    log: &log,
                },
            )?;
            say(
                started,
                &format!(
                    "agent started (pid {}): nsenter --net={} {} agent --node-name {node_name} --manifests {} --bpffs {} {} --metrics-addr {}{}",
                    a.pid().unwrap_or(0),
                    n.netns.path().display(),
                    bin.display(),
                    manifests.display(),
                    bpffs[i].display(),
                    match shape.cgroups {
                        CgroupMount::Hybrid =>
                            format!("--cgroup-root {}", kubelet.root().display()),
                        other => format!(
                            "(no --cgroup-root: in a mount namespace with the {} layout at /sys/fs/cgroup)",
                            other.name()
                        ),
                    },
                    agent::METRICS_ADDR,
                    extra_args
                        .iter()
                        .fold(String::new(), |line, arg| format!("{line} {arg}"))
                ),
            );
            let took = a.wait_ready(&n.netns, opts.ready_timeout)?;
            say(
                started,
                &format!("agent on {node_name} ready (/readyz 200) after {took:.1?}"),
            );
            agents.push(a);
        }
    } else {
        say(
            started,
            "NO AGENT (--no-agent): nothing enforces anything, every flow gets through; \
             this checks the harness: every expected-dropped cell must show LEAK",
        );
    }

    // Scraping starts before the probes, so the panels' rates span them.
    let scraper = match (opts.dashboard, agents.first()) {
        (true, Some(_)) => {
            let s = dashboard::Scraper::start(
                &topo.node(0).netns,
                scenario::node_name(0),
                &tmp.0.join("prometheus"),
            )?;
            say(
                started,
                &format!(
                    "Prometheus scraping the agent on {} every second (job rayfence-agent, as the shipped PodMonitor labels it)",
                    scenario::node_name(0)
                ),
            );
            Some(s)
        }
        (true, None) => bail!("--dashboard needs the agent"),
        _ => None,
    };

    guard::check()?;
    let sources = scenario::sources();
    let cells = build_cells(&topo, &ctrs, &sources, &table, opts.ipv6)?;
    say(
        started,
        &format!(
            "probing {} flows ({} sources x {} targets minus self; pod and node targets over {}), {} at a time, timeout {:?}",
            cells.len(),
            sources.len(),
            TARGETS.len(),
            if opts.ipv6 {
                "IPv4 and IPv6, ClusterIPs over IPv4"
            } else {
                "IPv4"
            },
            opts.parallel,
            opts.timeout
        ),
    );
    let probe_start = Instant::now();
    let observed = matrix::run(&cells, opts.timeout, opts.parallel);
    guard::check()?;
    say(started, &format!("probed in {:.1?}", probe_start.elapsed()));
    println!();
    print!("{}", matrix::render(&sources, TARGETS, &cells, &observed));

    let mut mismatches = Vec::new();
    for (c, o) in cells.iter().zip(&observed) {
        if !matrix::agrees(c.expect, &o.outcome) {
            let t = &TARGETS[c.col];
            mismatches.push(format!(
                "{} -> {} {}:{}/{}: expected {}, observed {}{}",
                sources[c.row],
                t.who,
                c.addr,
                c.port,
                match c.proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                },
                match c.expect {
                    Expect::Allowed => "allowed",
                    _ => "dropped",
                },
                o.outcome.as_line(),
                if o.retried { " (twice)" } else { "" }
            ));
        } else if o.retried {
            println!(
                "note: {} -> {} disagreed once, then agreed on a second probe",
                sources[c.row], TARGETS[c.col].who
            );
        }
    }
    let allowed = observed.iter().filter(|o| o.allowed()).count();
    println!(
        "\n{} flows: {} allowed, {} blocked; {} differ from the expected matrix",
        cells.len(),
        allowed,
        cells.len() - allowed,
        mismatches.len()
    );
    const SHOWN: usize = 40;
    for m in mismatches.iter().take(SHOWN) {
        println!("  MISMATCH {m}");
    }
    if mismatches.len() > SHOWN {
        println!("  ... and {} more", mismatches.len() - SHOWN);
    }

    let (mut dashboard_panels, mut dashboard_empty) = (0, Vec::new());
    if let Some(scraper) = &scraper {
        // Two more scrapes, so the last counters are in.
        std::thread::sleep(Duration::from_secs(2));
        let shipped = crate::deploy::monitoring::dashboard()?;
        let rendered = dashboard::render(&shipped, scraper)?;
        println!(
            "\nthe Grafana dashboard (deploy/components/monitoring/dashboard.json), each panel's queries on this run's data:\n{}",
            rendered.text
        );
        dashboard_panels = rendered.panels;
        dashboard_empty = rendered.empty;
    }
    drop(scraper);
    let mut drop_counters = Vec::new();
    let mut explain_disagreements = Vec::new();
    let mut explained = 0;
    if let (Some(a), Some(bin)) = (agents.first(), &opts.rayfence) {
        // Each explain is a short-lived `rayfence` process: a few at a time is plenty.
        let explainers = opts.parallel.clamp(1, 8);
        let explain_start = Instant::now();
        let sockets: Vec<&Path> = agents.iter().map(agent::Agent::socket).collect();
        let checked = explain_every_probe(
            bin, &sockets, &topo, &sources, &cells, &observed, explainers,
        )?;
        explained = checked.asked;
        explain_disagreements = checked.disagreements;
        println!(
            "\nrayfence explain (the agents' engines, over their sockets; each node's agent decides its own pods' sides) agrees with the datapath (verdict and exit status) on {} of {} probed flows ({} commands in {:.1?}, {} at a time)",
            explained - explain_disagreements.len(),
            explained,
            explained * agents.len(),
            explain_start.elapsed(),
            explainers
        );
        for d in explain_disagreements.iter().take(SHOWN) {
            println!("  EXPLAIN DISAGREES {d}");
        }
        if let Some((command, text)) = checked.example {
            println!("\nwhy was a flow dropped? {command}\n{text}");
        }
        for (what, args) in [
            ("the last dropped flows", &["flows", "--limit", "4"][..]),
            ("the local endpoints", &["status"][..]),
        ] {
            println!("{what}: rayfence {}", args.join(" "));
            match agent::command(bin, a.socket(), args) {
                Ok(text) => println!("{text}"),
                Err(error) => println!("  {error:#}\n"),
            }
        }
    }
    for (i, a) in agents.iter_mut().enumerate() {
        let on = if node_count > 1 {
            format!(" on {}", scenario::node_name(i))
        } else {
            String::new()
        };
        match agent::http_get(&topo.node(i).netns, "/metrics") {
            Ok((200, body)) => {
                let counters: Vec<String> = body
                    .lines()
                    .filter(|l| l.starts_with("rayfence_drops_total"))
                    .map(str::to_owned)
                    .collect();
                println!("\ndrop counters{on} (GET /metrics | grep rayfence_drops_total):");
                if counters.is_empty() {
                    println!("  (none)");
                }
                for l in &counters {
                    println!("  {l}");
                }
                drop_counters.extend(counters);
            }
            Ok((code, _)) => println!("\n/metrics answered {code}"),
            Err(e) => println!("\n/metrics: {e:#}"),
        }
        if !mismatches.is_empty() {
            println!("\nagent log{on} (last lines):\n{}", a.log_tail(30));
        }
        say(
            started,
            &format!("stopping the agent{on} (SIGTERM), then rayfence cleanup"),
        );
        let said = a.stop()?;
        say(started, &format!("agent stopped; rayfence cleanup: {said}"));
    }
    drop(agents);
    drop(servers);
    drop(node_local_dns);
    drop(conmons);
    drop(kubelet);
    drop(topo);
    drop(tmp);
    say(
        started,
        "cleaned up: agent, servers, namespaces (with their iptables rules), bpffs and temporary directories",
    );
    Ok(Report {
        probed: cells.len(),
        expected_dropped: cells.iter().filter(|c| c.expect == Expect::Dropped).count(),
        observed_allowed: allowed,
        mismatches,
        with_agent: opts.rayfence.is_some(),
        shape: shape.name,
        drop_counters,
        explained,
        explain_disagreements,
        dashboard_panels,
        dashboard_empty,
    })
}

struct ExplainCheck {
    asked: usize,
    disagreements: Vec<String>,
    /// A dropped pod-to-pod flow: the command line and what it prints.
    example: Option<(String, String)>,
}

/// Asks the running agents (`rayfence explain --json`, the real command over an
/// agent's socket, several at a time) to explain every probed flow and compares its
/// verdict with what the probe saw: the engine's explanation and the kernel must
/// agree. A flow to a pod is asked of the agent on that pod's node (which decides
/// its ingress; the `node` row is that node's address), anything else of the
/// first node's.
fn explain_every_probe(
    bin: &Path,
    sockets: &[&Path],
    topo: &Topology,
    sources: &[&str],
    cells: &[matrix::Cell],
    observed: &[matrix::Observed],
    parallel: usize,
) -> Result<ExplainCheck> {
    // `explain` exits with its verdict: 0 allowed, 1 denied, 3 unknown (a side
    // is another node's to decide).
    let run =
        |socket: &Path, args: &[&str]| agent::command_with_status(bin, socket, args, &[0, 1, 3]);
    // (from, to, what the datapath did, pod to pod, which agent) for every probed cell.
    let flows: Vec<(String, String, &str, bool, usize)> = cells
        .iter()
        .zip(observed)
        .filter(|(c, _)| c.expect != Expect::NotProbed)
        .map(|(c, o)| {
            let source = sources[c.row];
            let external = topo.external(EXTERNAL);
            let asked = node_probing(&TARGETS[c.col], sockets.len());
            let node = topo.node(asked);
            let from = match scenario::source(source) {
                Some(Source::Pod(p) | Source::HostNetwork(p)) => {
                    format!("{}/{}", p.namespace, p.name)
                }
                Some(Source::External) if c.addr.is_ipv4() => external.ip4.to_string(),
                Some(Source::External) => external.ip6.to_string(),
                _ if c.addr.is_ipv4() => node.ip4.to_string(),
                _ => node.ip6.to_string(),
            };
            let proto = match c.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let to = match c.addr {
                IpAddr::V4(v4) => format!("{v4}:{}/{proto}", c.port),
                IpAddr::V6(v6) => format!("[{v6}]:{}/{proto}", c.port),
            };
            let pod_to_pod = scenario::pod(source).is_some() && TARGETS[c.col].who != source;
            let datapath = if o.allowed() { "allowed" } else { "denied" };
            (from, to, datapath, pod_to_pod, asked)
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let disagreements = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((from, to, datapath, ..)) = flows.get(i) else {
                        break;
                    };
                    // Each agent decides the sides on its node; the flow passes only
                    // if no side is denied (what `kubectl rayfence explain` combines).
                    let verdict = sockets
                        .iter()
                        .map(|socket| {
                            let (status, out) = run(
                                socket,
                                &["explain", "-o", "json", "--from", from, "--to", to],
                            )?;
                            let v: serde_json::Value = serde_json::from_str(&out)?;
                            let verdict = v["verdict"].as_str().unwrap_or("?").to_owned();
                            // The exit status must say the same as the verdict.
                            let expected = match verdict.as_str() {
                                "allowed" => 0,
                                "unknown" => 3,
                                _ => 1,
                            };
                            anyhow::ensure!(
                                status == expected,
                                "verdict {verdict} but exit status {status}"
                            );
                            Ok(verdict)
                        })
                        .collect::<Result<Vec<String>>>()
                        .and_then(|verdicts| combine_nodes(&verdicts));
                    let line = match verdict {
                        Ok(v) if v == *datapath => continue,
                        Ok(v) => {
                            format!("{from} -> {to}: explain says {v}, the datapath {datapath}")
                        }
                        Err(error) => format!("{from} -> {to}: no explanation: {error:#}"),
                    };
                    if let Ok(mut d) = disagreements.lock() {
                        d.push(line);
                    }
                }
            });
        }
    });
    let mut disagreements = disagreements.into_inner().unwrap_or_default();
    disagreements.sort();
    let example = flows
        .iter()
        // Preferably someone reaching for a head's dashboard: what Ray users meet first.
        .filter(|(_, _, datapath, pod_to_pod, _)| *datapath == "denied" && *pod_to_pod)
        .min_by_key(|(_, to, ..)| !to.ends_with(":8265/tcp"))
        .and_then(|(from, to, .., asked)| {
            let (_, text) = run(sockets[*asked], &["explain", "--from", from, "--to", to]).ok()?;
            Some((format!("rayfence explain --from {from} --to {to}"), text))
        });
    Ok(ExplainCheck {
        asked: flows.len(),
        disagreements,
        example,
    })
}

/// br_netfilter provides the `net.bridge.*` sysctls (per namespace since Linux
/// 5.3); the demo turns `bridge-nf-call-iptables` on in its node namespace only.
fn ensure_br_netfilter() -> Result<()> {
    if Path::new("/proc/sys/net/bridge").exists() {
        return Ok(());
    }
    println!("loading br_netfilter (kube-proxy needs it on bridged nodes too)");
    let st = std::process::Command::new("modprobe")
        .arg("br_netfilter")
        .status()
        .context("running modprobe br_netfilter")?;
    if !st.success() {
        bail!("modprobe br_netfilter failed: the bridged DNAT path needs it");
    }
    Ok(())
}

/// What kube-proxy programs for the Services' NodePorts (one rule set per port,
/// on the node's IPv4 addresses; its ClusterIP rules come after the ones above and
/// never match first) and what the portmap plugin programs for the hostPorts.
fn install_node_nat(topo: &Topology) -> Result<()> {
    for s in SERVICES {
        let backend = scenario::pod(s.backend).context("service backend")?;
        for (port, node_port) in s.node_ports {
            let mut np = NodePortService::tcp(s.namespace, s.name, *port, *node_port);
            np.cluster_ips = vec![s.cluster_ip.into()];
            let mut endpoint = Endpoint::of(backend.namespace, topo.pod(s.backend));
            endpoint.ips.retain(IpAddr::is_ipv4);
            np.endpoints.push(endpoint);
            topo.install_node_port(&np)?;
        }
    }
    for (pod, container_port, host_port) in HOST_PORTS {
        topo.install_host_port(&HostPort::tcp(pod, *host_port, *container_port))?;
    }
    Ok(())
}

/// Each pod's servers, in its container cgroup; a pod that serves nothing gets a
/// pause-like process (a TCP listener on port 9, never probed) so that its
/// cgroup holds a process in its network namespace, as a real pod's does.
fn start_servers(topo: &Topology, ctrs: &HashMap<&str, PathBuf>) -> Result<Vec<Server>> {
    let mut servers = Vec::new();
    for p in PODS {
        let prober = topo.pod(p.key).prober_in(&ctrs[p.key]);
        if p.ports.is_empty() {
            servers.push(prober.serve_tcp(9)?);
        }
        for (port, proto, _) in p.ports {
            servers.push(match proto {
                Proto::Tcp => prober.serve_tcp(*port),
                Proto::Udp => prober.serve_udp(*port),
            }?);
        }
    }
    for p in HOST_NETWORK_PODS {
        let prober = topo.node(0).prober().in_cgroup(&ctrs[p.key]);
        for (port, _, _) in p.ports {
            servers.push(prober.serve_tcp(*port)?);
        }
    }
    for node in topo.nodes() {
        servers.push(node.serve_tcp(10250)?);
    }
    Ok(servers)
}

/// Checks the plumbing before anything enforces: the node reaches every pod
/// (which also teaches the bridge and the neighbour table every pod's MAC, as the
/// kubelet's probes do on a real node), and the ClusterIPs answer from a pod.
fn preflight(topo: &Topology, timeout: Duration) -> Result<()> {
    let node = topo.node(0);
    for p in PODS {
        let own = topo.node(scenario::node_of(p.key, topo.nodes().len()));
        let o = own.ping(IpAddr::V4(topo.pod(p.key).ip4), timeout);
        if o != Outcome::Ok {
            bail!("preflight: node cannot ping pod {}: {}", p.key, o.as_line());
        }
    }
    let from = topo.pod("outsider");
    for (svc, port, proto) in [
        ("kube-dns", 53, Proto::Udp),
        ("kube-dns", 53, Proto::Tcp),
        ("svc-a", 8265, Proto::Tcp),
    ] {
        let ip = IpAddr::V4(scenario::service(svc).context("service")?.cluster_ip);
        let o = match proto {
            Proto::Tcp => from.tcp_connect(ip, port, timeout),
            Proto::Udp => from.udp_probe(ip, port, timeout),
        };
        if o != Outcome::Ok {
            bail!(
                "preflight: outsider -> {svc} {ip}:{port} {proto:?} through DNAT: {} (iptables or br_netfilter problem)",
                o.as_line()
            );
        }
    }
    let external = topo.external(EXTERNAL);
    for (what, o) in [
        (
            "external -> alpha's NodePort 30265",
            external.tcp_connect(node.ip4.into(), 30265, timeout),
        ),
        (
            "a-worker -> the outsider's hostPort 18080",
            topo.pod("a-worker")
                .tcp_connect(node.ip4.into(), 18080, timeout),
        ),
    ] {
        if o != Outcome::Ok {
            bail!("preflight: {what}: {} (iptables problem)", o.as_line());
        }
    }
    Ok(())
}

fn build_cells(
    topo: &Topology,
    ctrs: &HashMap<&str, PathBuf>,
    sources: &[&str],
    table: &[(&str, Vec<Expect>)],
    ipv6: bool,
) -> Result<Vec<matrix::Cell>> {
    let node = topo.node(0);
    let mut cells = Vec::new();
    for (row, (source, expects)) in sources.iter().zip(table).enumerate() {
        let prober: Prober = match scenario::source(source) {
            Some(Source::Pod(_)) => topo.pod(source).prober_in(&ctrs[source]),
            Some(Source::HostNetwork(_)) => node.prober().in_cgroup(&ctrs[source]),
            Some(Source::External) => topo.external(EXTERNAL).prober(),
            Some(Source::Node) | None => node.prober(),
        };
        let node_count = topo.nodes().len();
        for (col, (t, expect)) in TARGETS.iter().zip(&expects.1).enumerate() {
            if *expect == Expect::NotProbed {
                continue;
            }
            // The `node` row is the kubelet of the pod it probes: its own node.
            let prober = match scenario::source(source) {
                Some(Source::Node) | None => topo.node(node_probing(t, node_count)).prober(),
                _ => prober.clone(),
            };
            // The semantics never depend on the address family: an IPv6 probe of
            // a pod or the node expects what the IPv4 one does.
            let addrs: Vec<IpAddr> = match t.dest {
                Dest::Pod(k) => vec![topo.pod(k).ip4.into(), topo.pod(k).ip6.into()],
                Dest::Service(k) => {
                    vec![scenario::service(k).context("service")?.cluster_ip.into()]
                }
                Dest::Node => vec![node.ip4.into(), node.ip6.into()],
                Dest::NodePort(_) => vec![node.ip4.into()],
            };
            for addr in addrs {
                if addr.is_ipv6() && !ipv6 {
                    continue;
                }
                cells.push(matrix::Cell {
                    row,
                    col,
                    prober: prober.clone(),
                    addr,
                    port: t.port,
                    proto: t.proto,
                    expect: *expect,
                });
            }
        }
    }
    Ok(cells)
}

/// NodeLocal DNSCache in its iptables mode on the first node: its device holds
/// 169.254.20.10, fd00:10:ffff::a and kube-dns's ClusterIP; NOTRACK rules in the
/// raw table keep kube-proxy's DNAT off queries to that ClusterIP (and off their
/// answers), so they reach the cache's own sockets, as `node-cache` sets it up.
fn start_node_local_dns(topo: &Topology, kubelet: &KubeletTree, run: u32) -> Result<NodeLocalDns> {
    let node = topo.node(0);
    let cluster_ip = scenario::service("kube-dns")
        .context("the kube-dns Service")?
        .cluster_ip
        .to_string();
    let cache: Vec<IpAddr> = vec![NODE_LOCAL_DNS4.into(), NODE_LOCAL_DNS6.into()];
    let mut bound = cache.clone();
    bound.push(
        scenario::service("kube-dns")
            .context("kube-dns")?
            .cluster_ip
            .into(),
    );
    node.add_node_local_dns_interface(&bound)?;
    for proto in ["udp", "tcp"] {
        for (chain, side, port) in [
            ("PREROUTING", "-d", "--dport"),
            ("OUTPUT", "-d", "--dport"),
            ("OUTPUT", "-s", "--sport"),
        ] {
            node.netns.exec(&[
                "iptables",
                "-w",
                "-t",
                "raw",
                "-A",
                chain,
                side,
                &cluster_ip,
                "-p",
                proto,
                port,
                "53",
                "-j",
                "NOTRACK",
            ])?;
        }
    }
    let uid = scenario::pod_uid(run, PODS.len() + HOST_NETWORK_PODS.len());
    NodeLocalDns::start(
        kubelet,
        node,
        "kube-system",
        "node-local-dns-8vq4m",
        &uid,
        &cache,
    )
}

/// Packets the NOTRACK rules of [`start_node_local_dns`] matched on the way in.
fn notrack_hits(node: &crate::Netns) -> Result<u64> {
    let listing = node.exec(&[
        "iptables",
        "-w",
        "-t",
        "raw",
        "-L",
        "PREROUTING",
        "-v",
        "-n",
        "-x",
    ])?;
    Ok(listing
        .lines()
        .filter(|line| line.contains("NOTRACK"))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// The ports of the conmon-like processes (one per pod, in the node's namespace),
/// clear of every port the matrix probes.
const CONMON_PORTS: u16 = 7100;

/// The node whose host probes `target` in the `node` row (and whose agent
/// explains it): a pod's own node (its kubelet); the first node for anything else.
fn node_probing(target: &scenario::Target, node_count: usize) -> usize {
    match target.dest {
        Dest::Pod(key) => scenario::node_of(key, node_count),
        _ => 0,
    }
}

/// One verdict from the agents' answers about a flow (one per node): denied if a
/// node denies its side, allowed if every side is allowed somewhere (`unknown`
/// only says a side is another node's).
fn combine_nodes(verdicts: &[String]) -> Result<String> {
    if verdicts.iter().any(|v| v == "denied") {
        Ok("denied".into())
    } else if verdicts.iter().any(|v| v == "allowed") || verdicts.len() > 1 {
        Ok("allowed".into())
    } else {
        bail!("the only agent says {}", verdicts.join(", "))
    }
}
