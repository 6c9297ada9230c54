//! End to end, "what counts as the node" (docs/semantics.md "What counts as the node"): the real `rayfence agent`
//! on a simulated bridged node with kube-proxy's NodePort NAT and the portmap
//! plugin's hostPort NAT in its namespace, an external client on the underlay,
//! hostNetwork pods (a pod cgroup in the node's namespace) and the kubelet (a host
//! process in no pod cgroup). Real packets; each case asserts what arrived and the
//! agent's drop counters (`rayfence_drops_total` on `/metrics`).
//!
//! Every case runs on both hooks:
//! - `tc`: the Ray pods are veth pods, enforced by TC on their host veth, where
//!   the node's sockets and conntrack are visible: a NATed packet is judged by its
//!   original source, egress to a port the node DNATs by its backend, a
//!   hostNetwork pod by its own identity, a host process is the node.
//! - `cgroup`: the Ray pods are macvlan pods (no host veth), enforced by the
//!   cgroup hook in the pod's own namespace, which sees neither the node's sockets
//!   nor its conntrack. There a node address is an ordinary address, decided by
//!   ipBlocks alone, in both directions: the kubelet's probe, a masqueraded
//!   NodePort connection and a hostNetwork pod are all "an address of the node",
//!   dropped under DenyAll unless an ipBlock covers the node; a Local NodePort keeps
//!   the client's address and is judged by it as anywhere else.
//!
//! Every case takes kube-proxy's mode ([`KubeProxyMode`]): the tests here run them
//! with its iptables mode, `kube_proxy_nft.rs` with its nftables mode.
//!
//! The lab is checked before the agent starts (every NAT path answers, and the
//! head sees the node's address under externalTrafficPolicy Cluster, the client's
//! under Local), so a failure after that is the policy's.
//!
//! Exact counters: a denied TCP probe is shorter than the first SYN retransmission
//! (1 s), so it is exactly one dropped packet; counters reach `/metrics` within a
//! second. Needs root. Every case has its own namespaces, cgroups, bpffs directory
//! and agent, removed on drop (also on panic).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rayfence_tests::agent::{Agent, AgentOptions, Bpffs, Manifests, metric_sum};
use rayfence_tests::kubelet::{CgroupDriver, HostNetworkPod, KubeletTree, QosClass};
use rayfence_tests::node_nat::{
    self, Endpoint, HostPort, KubeProxyMode, NodePortService, ServiceType, TrafficPolicy,
};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::probe_bin;
use rayfence_tests::{ExternalClient, Layout, Node, Outcome, Pod, Server, Topology};
use serde_json::{Value, json};

const NODE: &str = "node-a";
/// Allowed flows: plenty for one connection inside a machine.
const OK: Duration = Duration::from_secs(1);
/// Denied TCP: shorter than the first SYN retransmission, so one packet.
const DENIED: Duration = Duration::from_millis(700);
const PORT: u16 = 8000;
/// NodePorts: in front of the head (Cluster, Local, a LoadBalancer Service), and of
/// a pod of another namespace.
const HEAD_NP: u16 = 30080;
const HEAD_NP_LOCAL: u16 = 30081;
const HEAD_LB: u16 = 30082;
const FOREIGN_NP: u16 = 30090;
/// hostPorts (to container port [`PORT`]).
const HEAD_HP: u16 = 18001;
const FOREIGN_HP: u16 = 18000;
/// Host processes and hostNetwork pods listening on the node.
const KUBELET: u16 = 10250;
const EXPORTER: u16 = 9100;
const NODE_AGENT: u16 = 9101;
const STRAY: u16 = 9102;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    Tc,
    Cgroup,
}

static RIGS: AtomicU32 = AtomicU32::new(0);

/// A pod of the rig: topology name, Kubernetes namespace, labels.
type PodSpec<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// One node with everything of the lab on it, and its agent.
///
/// Pods (namespace `ray-<tag>` unless said): `head` and `worker` of RayCluster `rc`
/// (veth pods on the TC rig, macvlan pods on the cgroup rig); `outsider`
/// (app=outsider, not isolated); `foreign` in `other-<tag>` (app=foreign, not
/// isolated). hostNetwork pods in `monitoring-<tag>`: `exporter` (app=exporter,
/// declares and listens on 9100) and `node-agent` (app=node-agent, 9101); `stray`:
/// a process in a pod cgroup of no known pod (9102). The kubelet: a host process on
/// 10250.
/// Services: `head-np` (Cluster, 30080), `head-np-local` (Local, 30081), `head-lb`
/// (LoadBalancer, Cluster, 30082) in front of the head; `foreign-np` (Cluster,
/// 30090) in front of `foreign`. hostPorts: the head's 18001, foreign's 18000.
/// External clients `client` (10.1.0.200) and `stranger` (10.1.0.201).
struct Rig {
    // Field order is drop order: the agent first, the pins last.
    agent: Agent,
    head_srv: Server,
    foreign_srv: Server,
    _servers: Vec<Server>,
    hostnet: Vec<HostNetworkPod>,
    manifests: Manifests,
    _kubelet: KubeletTree,
    topo: Topology,
    _bpffs: Bpffs,
    ns: String,
    monitoring: String,
}

impl Rig {
    fn new(hook: Hook, mode: KubeProxyMode, driver: CgroupDriver, policy: Value) -> Result<Rig> {
        let rig_no = RIGS.fetch_add(1, Ordering::Relaxed);
        let uid = |n: u32| {
            format!(
                "c0de{rig_no:02x}{n:02x}-aaaa-4bbb-8ccc-{:012x}",
                std::process::id()
            )
        };
        let mut topo = Topology::new(Layout::Bridged, probe_bin())?;
        for name in ["head", "worker"] {
            match hook {
                Hook::Tc => topo.add_pod(0, name)?,
                Hook::Cgroup => topo.add_macvlan_pod(0, name)?,
            };
        }
        topo.add_pod(0, "outsider")?;
        topo.add_pod(0, "foreign")?;
        topo.add_external_client("client")?;
        topo.add_external_client("stranger")?;
        let tag = topo.tag().to_owned();
        let (ns, other, monitoring) = (
            format!("ray-{tag}"),
            format!("other-{tag}"),
            format!("monitoring-{tag}"),
        );

        // The kubelet's tree: each pod's sandbox process in its container cgroup.
        let kubelet = KubeletTree::new(driver)?;
        let pods: [PodSpec; 4] = [
            ("head", &ns, head_labels("rc")),
            ("worker", &ns, worker_labels("rc")),
            ("outsider", &ns, vec![("app", "outsider")]),
            ("foreign", &other, vec![("app", "foreign")]),
        ];
        let mut servers = Vec::new();
        let mut docs = vec![
            namespace(&ns),
            namespace(&other),
            namespace(&monitoring),
            node_object(NODE, topo.node(0)),
        ];
        let host_ports = [
            HostPort::tcp("head", HEAD_HP, PORT),
            HostPort::tcp("foreign", FOREIGN_HP, PORT),
        ];
        // Every probe of a pod runs in its container cgroup, as its processes
        // would (the cgroup hook enforces by the socket's cgroup).
        for (i, (name, pod_ns, pod_labels)) in pods.iter().enumerate() {
            let pod = topo.pod(name);
            let uid = uid(i as u32);
            let ctr = kubelet.pod_cgroup(&uid, QosClass::Guaranteed)?;
            pod.set_cgroup_dir(Some(&ctr));
            servers.push(pod.serve_tcp(9)?);
            let mut object = pod_object(pod_ns, pod, &uid, NODE, pod_labels);
            for hp in host_ports.iter().filter(|hp| hp.pod == *name) {
                object = hp.add_to(object);
            }
            docs.push(object);
        }
        let head_srv = topo.pod("head").prober().serve_tcp_recording(PORT)?;
        servers.push(topo.pod("worker").serve_tcp(PORT)?);
        let foreign_srv = topo.pod("foreign").prober().serve_tcp_recording(PORT)?;

        // hostNetwork pods, a stray pod process, the kubelet.
        let node = topo.node(0);
        let exporter = HostNetworkPod::new(
            &kubelet,
            node,
            &monitoring,
            "exporter",
            &uid(10),
            QosClass::Burstable,
        )?;
        let node_agent = HostNetworkPod::new(
            &kubelet,
            node,
            &monitoring,
            "node-agent",
            &uid(11),
            QosClass::BestEffort,
        )?;
        let stray = HostNetworkPod::new(
            &kubelet,
            node,
            &monitoring,
            "stray",
            &uid(12),
            QosClass::Burstable,
        )?;
        servers.push(exporter.serve_tcp(EXPORTER)?);
        servers.push(node_agent.serve_tcp(NODE_AGENT)?);
        servers.push(stray.serve_tcp(STRAY)?);
        servers.push(node.serve_tcp(KUBELET)?);
        docs.push(exporter.manifest(NODE, &[("app", "exporter")], &[EXPORTER]));
        docs.push(node_agent.manifest(NODE, &[("app", "node-agent")], &[NODE_AGENT]));

        // kube-proxy and portmap.
        let service = |name: &str, backend: (&str, &str), node_port, policy, ip: u8| {
            let mut svc = NodePortService::tcp(backend.0, name, PORT, node_port);
            svc.external_traffic_policy = policy;
            svc.cluster_ips = vec![
                format!("10.96.1.{ip}").parse().expect("ip"),
                format!("fd00:10:96::1:{ip}").parse().expect("ip"),
            ];
            svc.endpoints
                .push(Endpoint::of(backend.0, topo.pod(backend.1)));
            svc
        };
        let mut lb = service("head-lb", (&ns, "head"), HEAD_LB, TrafficPolicy::Cluster, 3);
        lb.kind = ServiceType::LoadBalancer;
        let services = [
            service("head-np", (&ns, "head"), HEAD_NP, TrafficPolicy::Cluster, 1),
            service(
                "head-np-local",
                (&ns, "head"),
                HEAD_NP_LOCAL,
                TrafficPolicy::Local,
                2,
            ),
            lb,
            service(
                "foreign-np",
                (&other, "foreign"),
                FOREIGN_NP,
                TrafficPolicy::Cluster,
                4,
            ),
        ];
        node_nat::set_kube_proxy_mode(topo.nodes(), mode)?;
        ensure!(
            node_nat::kube_proxy_mode(node) == mode,
            "lab: kube-proxy mode"
        );
        for svc in &services {
            topo.install_node_port(svc)?;
            docs.extend(svc.manifests(&|_| NODE.to_owned()));
        }
        for hp in &host_ports {
            topo.install_host_port(hp)?;
        }

        // The lab before any policy: every path answers, with the sources it should.
        let (worker, client) = (topo.pod("worker"), topo.external("client"));
        let node_addrs = node.addresses()?;
        let reach = |what: &str, o: Outcome, srv: &Server, want: &dyn Fn(IpAddr) -> bool| {
            ensure!(o == Outcome::Ok, "lab: {what}: {o:?}");
            let seen = srv.take_peers(OK);
            ensure!(
                seen.len() == 1 && want(seen[0]),
                "lab: {what}: the server saw {seen:?}"
            );
            Ok(())
        };
        let is_node = |ip: IpAddr| node_addrs.contains(&ip);
        let is_client = |ip: IpAddr| client.ips().contains(&ip);
        let is_worker = |ip: IpAddr| worker.ips().contains(&ip);
        for dst in node.ips() {
            let np = client.tcp_connect(dst, HEAD_NP, OK);
            reach("client -> NodePort (Cluster)", np, &head_srv, &is_node)?;
            let local = client.tcp_connect(dst, HEAD_NP_LOCAL, OK);
            reach("client -> NodePort (Local)", local, &head_srv, &is_client)?;
            let via = worker.tcp_connect(dst, FOREIGN_NP, OK);
            reach("worker -> foreign's NodePort", via, &foreign_srv, &is_node)?;
            let hp = worker.tcp_connect(dst, FOREIGN_HP, OK);
            reach("worker -> foreign's hostPort", hp, &foreign_srv, &is_worker)?;
        }
        let lb_probe = client.tcp_connect(node.ip4.into(), HEAD_LB, OK);
        reach(
            "client -> LoadBalancer's NodePort",
            lb_probe,
            &head_srv,
            &is_node,
        )?;
        let exp = exporter.tcp_connect(topo.pod("head").ip4.into(), PORT, OK);
        reach("exporter -> head", exp, &head_srv, &is_node)?;
        for port in [EXPORTER, NODE_AGENT, STRAY, KUBELET] {
            let o = topo.pod("head").tcp_connect(node.ip4.into(), port, OK);
            ensure!(o == Outcome::Ok, "lab: head -> node:{port}: {o:?}");
        }

        let manifests = Manifests::new()?;
        manifests.write("all.yaml", &docs)?;
        manifests.write("rc.yaml", &[raycluster(&ns, "rc", policy)])?;
        let bpffs = Bpffs::new();
        let agent = Agent::start(&AgentOptions {
            node,
            node_name: NODE,
            manifests: &manifests.dir,
            bpffs: &bpffs.path,
            cgroup_root: kubelet.root(),
            kubeconfig: None,
            extra_args: &[],
        })?;
        agent.wait_ready(node, Duration::from_secs(30))?;
        let want = match hook {
            Hook::Tc => "hook=\"tc\"",
            Hook::Cgroup => "hook=\"cgroup\"",
        };
        for pod in ["head", "worker"] {
            agent.wait_log(
                &["endpoint attached", want, &format!("{ns}/{pod}")],
                Duration::from_secs(10),
            )?;
        }
        Ok(Rig {
            agent,
            head_srv,
            foreign_srv,
            _servers: servers,
            hostnet: vec![exporter, node_agent, stray],
            manifests,
            _kubelet: kubelet,
            topo,
            _bpffs: bpffs,
            ns,
            monitoring,
        })
    }

    fn node(&self) -> &Node {
        self.topo.node(0)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    fn client(&self) -> &ExternalClient {
        self.topo.external("client")
    }

    fn stranger(&self) -> &ExternalClient {
        self.topo.external("stranger")
    }

    fn hostnet(&self, name: &str) -> &HostNetworkPod {
        self.hostnet
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no hostNetwork pod {name}"))
    }

    /// Replaces RayCluster `rc`'s `spec.networkPolicy`.
    fn set_policy(&self, policy: Value) -> Result<()> {
        self.manifests
            .write("rc.yaml", &[raycluster(&self.ns, "rc", policy)])
    }

    /// Applies `policy` and waits until `probe` gives `want_ok` (the edit is
    /// programmed).
    fn edit(
        &self,
        policy: Value,
        what: &str,
        probe: impl FnMut() -> Outcome,
        want_ok: bool,
    ) -> Result<()> {
        self.set_policy(policy)?;
        wait_outcome(what, Duration::from_secs(10), probe, want_ok)?;
        Ok(())
    }

    fn metric(&self, role: &str, direction: &str) -> f64 {
        self.agent
            .http_get(self.node(), "/metrics")
            .map(|(_, body)| {
                metric_sum(
                    &body,
                    "rayfence_drops_total",
                    &[
                        ("pod_namespace", &self.ns),
                        ("raycluster", "rc"),
                        ("role", role),
                        ("direction", direction),
                    ],
                )
            })
            .unwrap_or(0.0)
    }

    /// A running count of the drops of `role` in `direction`.
    fn tally(&self, role: &'static str, direction: &'static str) -> Tally<'_> {
        Tally {
            rig: self,
            role,
            direction,
            expected: self.metric(role, direction),
        }
    }

    /// IPv4 and IPv6 of a pod.
    fn ips(&self, pod: &str) -> [IpAddr; 2] {
        self.pod(pod).ips()
    }
}

/// The drops the agent counted for one (role, direction) of `rc`, against what the
/// test caused.
struct Tally<'a> {
    rig: &'a Rig,
    role: &'static str,
    direction: &'static str,
    expected: f64,
}

impl Tally<'_> {
    /// `n` more drops happened: waits for them on `/metrics` (published every
    /// second) and checks there are exactly that many.
    fn expect(&mut self, n: u32, what: &str) -> Result<()> {
        self.expected += f64::from(n);
        let t0 = Instant::now();
        let mut now = self.rig.metric(self.role, self.direction);
        while now < self.expected && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            now = self.rig.metric(self.role, self.direction);
        }
        ensure!(
            now == self.expected,
            "{what}: {} {} drops: {now}, expected {}",
            self.role,
            self.direction,
            self.expected
        );
        Ok(())
    }

    /// No drop beyond the expected ones, once the counters are published.
    fn settled(&self, what: &str) -> Result<()> {
        std::thread::sleep(Duration::from_millis(1200));
        let now = self.rig.metric(self.role, self.direction);
        ensure!(
            now == self.expected,
            "{what}: {} {} drops: {now}, expected {}",
            self.role,
            self.direction,
            self.expected
        );
        Ok(())
    }

    /// Starts over from what `/metrics` says now (after probes that waited for an
    /// edit, whose drops are not counted).
    fn rebase(&mut self) {
        std::thread::sleep(Duration::from_millis(1200));
        self.expected = self.rig.metric(self.role, self.direction);
    }
}

/// A TCP probe that must be dropped, and nothing must arrive at `srv` (if given).
fn dropped(what: &str, o: Outcome, srv: Option<&Server>) -> Result<()> {
    ensure!(o.is_blocked(), "{what}: not dropped ({o:?})");
    if let Some(srv) = srv {
        let seen = srv.take_peers(Duration::from_millis(50));
        ensure!(seen.is_empty(), "{what}: arrived from {seen:?}");
    }
    Ok(())
}

/// The one source address `srv` saw since it was last asked.
fn one_peer(what: &str, srv: &Server) -> Result<IpAddr> {
    let seen = srv.take_peers(OK);
    ensure!(seen.len() == 1, "{what}: the server saw {seen:?}");
    Ok(seen[0])
}

fn allowed(what: &str, o: Outcome) -> Result<()> {
    ensure!(o == Outcome::Ok, "{what}: {o:?}");
    Ok(())
}

fn ip_block_rule(cidrs: &[String], port: u16) -> Value {
    let peers: Vec<Value> = cidrs
        .iter()
        .map(|c| json!({"ipBlock": {"cidr": c}}))
        .collect();
    json!({"from": peers, "ports": [{"protocol": "TCP", "port": port}]})
}

fn host_cidrs(ips: &[IpAddr]) -> Vec<String> {
    ips.iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        })
        .collect()
}

// --- NodePort and LoadBalancer from outside and from pods, to a DenyAll head ---

pub(crate) fn node_port_to_a_deny_all_head_is_dropped(
    hook: Hook,
    mode: KubeProxyMode,
) -> Result<()> {
    let rig = Rig::new(
        hook,
        mode,
        CgroupDriver::Cgroupfs,
        json!({"mode": "DenyAll"}),
    )?;
    let (node, client, head) = (rig.node(), rig.client(), rig.pod("head"));
    let srv = Some(&rig.head_srv);
    let mut ingress = rig.tally("head", "ingress");
    for dst in node.ips() {
        // Cluster: the head sees the node's address; the client is who sent it.
        let o = client.tcp_connect(dst, HEAD_NP, DENIED);
        dropped(&format!("client -> {dst}:{HEAD_NP} (Cluster)"), o, srv)?;
        // Local: the client's own address.
        let o = client.tcp_connect(dst, HEAD_NP_LOCAL, DENIED);
        dropped(&format!("client -> {dst}:{HEAD_NP_LOCAL} (Local)"), o, srv)?;
        // The head's hostPort: the client's own address.
        let o = client.tcp_connect(dst, HEAD_HP, DENIED);
        dropped(&format!("client -> {dst}:{HEAD_HP} (hostPort)"), o, srv)?;
    }
    // A LoadBalancer Service is a NodePort on the node.
    let o = client.tcp_connect(node.ip4.into(), HEAD_LB, DENIED);
    dropped("client -> LoadBalancer NodePort", o, srv)?;
    // A pod of the node that is not in the cluster, through the NodePort
    // (masqueraded to the bridge address on its way back out).
    let o = rig
        .pod("outsider")
        .tcp_connect(node.ip4.into(), HEAD_NP, DENIED);
    dropped("outsider -> NodePort (Cluster)", o, srv)?;
    // As directly.
    let o = client.tcp_connect(head.ip4.into(), PORT, DENIED);
    dropped("client -> head's pod IP", o, srv)?;
    ingress.expect(9, "NodePort, LoadBalancer, hostPort and direct")?;
    ingress.settled("after the NodePort probes")
}

#[test]
fn node_port_from_outside_and_from_a_pod_to_a_deny_all_head_is_dropped_tc() -> Result<()> {
    node_port_to_a_deny_all_head_is_dropped(Hook::Tc, KubeProxyMode::Iptables)
}

#[test]
fn node_port_from_outside_and_from_a_pod_to_a_deny_all_head_is_dropped_cgroup() -> Result<()> {
    node_port_to_a_deny_all_head_is_dropped(Hook::Cgroup, KubeProxyMode::Iptables)
}

// --- an ipBlock for the external client ---

pub(crate) fn ip_block_for_the_client_opens_the_node_port_to_it_alone(
    hook: Hook,
    mode: KubeProxyMode,
) -> Result<()> {
    let rig = Rig::new(
        hook,
        mode,
        CgroupDriver::Cgroupfs,
        json!({"mode": "DenyAll"}),
    )?;
    let (node, client, stranger) = (rig.node(), rig.client(), rig.stranger());
    let srv = &rig.head_srv;
    let node_addrs = node.addresses()?;
    let rule = ip_block_rule(&host_cidrs(&client.ips()), PORT);
    rig.edit(
        json!({"mode": "DenyAll", "head": {"ingressRules": [rule]}}),
        "client -> NodePort (Local) once its ipBlock is programmed",
        || client.tcp_connect(node.ip4.into(), HEAD_NP_LOCAL, DENIED),
        true,
    )?;
    // The probe that saw the rule programmed.
    srv.take_peers_exactly(1, OK)?;
    let mut ingress = rig.tally("head", "ingress");
    ingress.rebase();
    let mut drops = 0;
    for dst in node.ips() {
        // Local keeps the client's address: the ipBlock allows it on both hooks.
        let what = format!("client -> {dst}:{HEAD_NP_LOCAL} (Local)");
        allowed(&what, client.tcp_connect(dst, HEAD_NP_LOCAL, OK))?;
        ensure!(client.ips().contains(&one_peer(&what, srv)?), "{what}");
        let o = client.tcp_connect(dst, HEAD_NP, if hook == Hook::Tc { OK } else { DENIED });
        match hook {
            // TC: the node's conntrack says who it was before the masquerade.
            Hook::Tc => {
                let what = format!("client -> {dst}:{HEAD_NP} (Cluster)");
                allowed(&what, o)?;
                ensure!(node_addrs.contains(&one_peer(&what, srv)?), "{what}");
            }
            // The cgroup hook sees only the node's address, which the client's
            // ipBlock does not cover.
            Hook::Cgroup => {
                dropped(
                    &format!("client -> {dst}:{HEAD_NP} (Cluster)"),
                    o,
                    Some(srv),
                )?;
                drops += 1;
            }
        }
        // Anyone else outside is still dropped, masqueraded or not.
        for port in [HEAD_NP, HEAD_NP_LOCAL] {
            let o = stranger.tcp_connect(dst, port, DENIED);
            dropped(&format!("stranger -> {dst}:{port}"), o, Some(srv))?;
            drops += 1;
        }
    }
    if hook == Hook::Tc {
        allowed(
            "client -> LoadBalancer NodePort",
            client.tcp_connect(node.ip4.into(), HEAD_LB, OK),
        )?;
        srv.take_peers(OK);
    }
    // The rule is for the client, not for pods the node masquerades.
    let o = rig
        .pod("outsider")
        .tcp_connect(node.ip4.into(), HEAD_NP, DENIED);
    dropped("outsider -> NodePort (Cluster)", o, Some(srv))?;
    drops += 1;
    ingress.expect(drops, "the ipBlock's outside")?;
    ingress.settled("after the ipBlock probes")
}

#[test]
fn an_ip_block_for_the_external_client_opens_the_node_port_to_it_alone_tc() -> Result<()> {
    ip_block_for_the_client_opens_the_node_port_to_it_alone(Hook::Tc, KubeProxyMode::Iptables)
}

#[test]
fn an_ip_block_for_the_external_client_opens_only_the_local_node_port_on_the_cgroup_hook()
-> Result<()> {
    ip_block_for_the_client_opens_the_node_port_to_it_alone(Hook::Cgroup, KubeProxyMode::Iptables)
}

// --- the kubelet ---

pub(crate) fn kubelet_probe(hook: Hook, mode: KubeProxyMode) -> Result<()> {
    let rig = Rig::new(
        hook,
        mode,
        CgroupDriver::Cgroupfs,
        json!({"mode": "DenyAll"}),
    )?;
    let node = rig.node();
    let mut head_in = rig.tally("head", "ingress");
    let mut worker_in = rig.tally("worker", "ingress");
    match hook {
        // A host process in no pod cgroup is the node: it reaches head and workers.
        Hook::Tc => {
            for pod in ["head", "worker"] {
                for dst in rig.ips(pod) {
                    allowed(
                        &format!("kubelet -> {pod} {dst}"),
                        node.tcp_connect(dst, PORT, OK),
                    )?;
                }
            }
        }
        // The cgroup hook cannot tell the kubelet from anything else with the node's
        // address: dropped, until an ipBlock covers the node.
        Hook::Cgroup => {
            for dst in rig.ips("head") {
                let o = node.tcp_connect(dst, PORT, DENIED);
                dropped(&format!("kubelet -> head {dst}"), o, Some(&rig.head_srv))?;
            }
            for dst in rig.ips("worker") {
                dropped(
                    &format!("kubelet -> worker {dst}"),
                    node.tcp_connect(dst, PORT, DENIED),
                    None,
                )?;
            }
            head_in.expect(2, "kubelet -> head")?;
            worker_in.expect(2, "kubelet -> worker")?;
            let rule = ip_block_rule(&host_cidrs(&node.ips()), PORT);
            rig.edit(
                json!({"mode": "DenyAll", "head": {"ingressRules": [rule]},
                       "worker": {"ingressRules": [rule]}}),
                "kubelet -> head once the node's ipBlock is programmed",
                || node.tcp_connect(rig.pod("head").ip4.into(), PORT, DENIED),
                true,
            )?;
            head_in.rebase();
            worker_in.rebase();
            for pod in ["head", "worker"] {
                for dst in rig.ips(pod) {
                    allowed(
                        &format!("kubelet -> {pod} {dst} with the node's ipBlock"),
                        node.tcp_connect(dst, PORT, OK),
                    )?;
                }
            }
        }
    }
    head_in.settled("kubelet -> head")?;
    worker_in.settled("kubelet -> worker")
}

#[test]
fn the_kubelet_probe_from_the_node_still_passes_to_head_and_workers_tc() -> Result<()> {
    kubelet_probe(Hook::Tc, KubeProxyMode::Iptables)
}

#[test]
fn the_kubelet_probe_needs_an_ip_block_for_the_node_on_the_cgroup_hook() -> Result<()> {
    kubelet_probe(Hook::Cgroup, KubeProxyMode::Iptables)
}

// --- egress through the node's NodePorts and hostPorts ---

pub(crate) fn egress_through_the_node(hook: Hook, mode: KubeProxyMode) -> Result<()> {
    let rig = Rig::new(
        hook,
        mode,
        CgroupDriver::Cgroupfs,
        json!({"mode": "DenyAllEgress"}),
    )?;
    let (node, worker) = (rig.node(), rig.pod("worker"));
    let foreign = Some(&rig.foreign_srv);
    let mut egress = rig.tally("worker", "egress");
    // Another namespace's pod through the node: on any node address, NodePort or
    // hostPort, exactly as directly.
    let mut drops = 0;
    let targets = [
        IpAddr::from(node.ip4),
        IpAddr::from(node.ip6),
        IpAddr::from(node.gateway4),
    ];
    for dst in targets {
        for port in [FOREIGN_NP, FOREIGN_HP] {
            let o = worker.tcp_connect(dst, port, DENIED);
            dropped(&format!("worker -> {dst}:{port} (foreign)"), o, foreign)?;
            drops += 1;
        }
    }
    let o = worker.tcp_connect(rig.pod("foreign").ip4.into(), PORT, DENIED);
    dropped("worker -> foreign directly", o, foreign)?;
    drops += 1;
    egress.expect(drops, "worker -> foreign")?;

    let head_srv = &rig.head_srv;
    match hook {
        // The head (same RayCluster) through the node, and a host process on a port
        // nothing rewrites (the own node), pass.
        Hook::Tc => {
            let node_addrs = node.addresses()?;
            for dst in node.ips() {
                let what = format!("worker -> {dst}:{HEAD_NP} (head's NodePort)");
                allowed(&what, worker.tcp_connect(dst, HEAD_NP, OK))?;
                ensure!(node_addrs.contains(&one_peer(&what, head_srv)?), "{what}");
                let what = format!("worker -> {dst}:{HEAD_HP} (head's hostPort)");
                allowed(&what, worker.tcp_connect(dst, HEAD_HP, OK))?;
                ensure!(worker.ips().contains(&one_peer(&what, head_srv)?), "{what}");
                allowed(
                    &format!("worker -> {dst}:{KUBELET} (host process)"),
                    worker.tcp_connect(dst, KUBELET, OK),
                )?;
            }
            // With the head's ingress isolated too, the head judges the
            // masqueraded NodePort connection by who sent it: its own worker.
            let outsider = rig.pod("outsider");
            rig.edit(
                json!({"mode": "DenyAll"}),
                "DenyAll programmed (the outsider no longer reaches the head)",
                || outsider.tcp_connect(rig.pod("head").ip4.into(), PORT, DENIED),
                false,
            )?;
            for dst in node.ips() {
                allowed(
                    &format!("DenyAll: worker -> {dst}:{HEAD_NP}"),
                    worker.tcp_connect(dst, HEAD_NP, OK),
                )?;
                allowed(
                    &format!("DenyAll: worker -> {dst}:{HEAD_HP}"),
                    worker.tcp_connect(dst, HEAD_HP, OK),
                )?;
                allowed(
                    &format!("DenyAll: worker -> {dst}:{KUBELET}"),
                    worker.tcp_connect(dst, KUBELET, OK),
                )?;
            }
            let o = worker.tcp_connect(node.ip4.into(), FOREIGN_NP, DENIED);
            dropped("DenyAll: worker -> foreign's NodePort", o, foreign)?;
            egress.expect(1, "DenyAll: worker -> foreign's NodePort")?;
        }
        // On the cgroup hook the ports the node DNATs are still decided on where
        // they lead (they are compiled, not seen): the head's NodePort and hostPort
        // pass. Any other port of a node address is an ordinary address there: the
        // kubelet too, until an ipBlock covers the node.
        Hook::Cgroup => {
            for port in [HEAD_NP, HEAD_HP] {
                allowed(
                    &format!("worker -> node:{port} (the head's) on the cgroup hook"),
                    worker.tcp_connect(node.ip4.into(), port, OK),
                )?;
            }
            let o = worker.tcp_connect(node.ip4.into(), KUBELET, DENIED);
            dropped(&format!("worker -> node:{KUBELET}"), o, None)?;
            egress.expect(1, "worker -> the node's kubelet")?;
            let to_node: Vec<Value> = host_cidrs(&node.ips())
                .iter()
                .map(|c| json!({"ipBlock": {"cidr": c}}))
                .collect();
            rig.edit(
                json!({"mode": "DenyAllEgress", "worker": {"egressRules": [
                    {"to": to_node, "ports": [{"protocol": "TCP", "port": KUBELET}]}]}}),
                "worker -> kubelet once the node's ipBlock is programmed",
                || worker.tcp_connect(node.ip4.into(), KUBELET, DENIED),
                true,
            )?;
            egress.rebase();
            allowed(
                "worker -> kubelet with the node's ipBlock",
                worker.tcp_connect(node.ip6.into(), KUBELET, OK),
            )?;
            let o = worker.tcp_connect(node.ip4.into(), FOREIGN_NP, DENIED);
            dropped(
                "worker -> foreign's NodePort, port not in the ipBlock rule",
                o,
                foreign,
            )?;
            egress.expect(1, "worker -> foreign's NodePort")?;
        }
    }
    egress.settled("after the egress probes")
}

#[test]
fn an_egress_isolated_pod_reaches_through_its_node_only_what_it_may_reach_directly_tc() -> Result<()>
{
    egress_through_the_node(Hook::Tc, KubeProxyMode::Iptables)
}

#[test]
fn an_egress_isolated_pod_on_the_cgroup_hook_treats_node_addresses_as_addresses_but_node_ports_as_their_backends()
-> Result<()> {
    egress_through_the_node(Hook::Cgroup, KubeProxyMode::Iptables)
}

// --- hostNetwork pods ---

pub(crate) fn host_network_pods(hook: Hook, mode: KubeProxyMode) -> Result<()> {
    let rig = Rig::new(
        hook,
        mode,
        CgroupDriver::Systemd,
        json!({"mode": "DenyAll"}),
    )?;
    let (node, head) = (rig.node(), rig.pod("head"));
    let (exporter, node_agent, stray) = (
        rig.hostnet("exporter"),
        rig.hostnet("node-agent"),
        rig.hostnet("stray"),
    );
    let srv = Some(&rig.head_srv);
    let mut ingress = rig.tally("head", "ingress");
    let mut egress = rig.tally("head", "egress");
    // Not the node: a DenyAll head refuses them, IPv4 and IPv6; a process in some
    // pod's cgroup that no Pod object names is no more the node.
    for dst in head.ips() {
        let o = exporter.tcp_connect(dst, PORT, DENIED);
        dropped(&format!("exporter -> head {dst}"), o, srv)?;
    }
    dropped(
        "node-agent -> head",
        node_agent.tcp_connect(head.ip4.into(), PORT, DENIED),
        srv,
    )?;
    dropped(
        "stray pod process -> head",
        stray.tcp_connect(head.ip4.into(), PORT, DENIED),
        srv,
    )?;
    ingress.expect(4, "hostNetwork pods -> head")?;
    // And the reverse: the head to the port the exporter declares, on the node's
    // addresses. (Not asserted: a process of an unknown pod cgroup listening on the
    // node; no Pod object declares its port, so egress to it is the node's.)
    for dst in node.ips() {
        let o = head.tcp_connect(dst, EXPORTER, DENIED);
        dropped(
            &format!("head -> {dst}:{EXPORTER} (the exporter's)"),
            o,
            None,
        )?;
    }
    egress.expect(2, "head -> the exporter")?;

    // A rule whose peer selects the exporter (its namespace AND its labels).
    let exporter_peer = json!([{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": rig.monitoring}},
        "podSelector": {"matchLabels": {"app": "exporter"}},
    }]);
    // (The outsider's rule only shows when the edit is programmed.)
    let outsider_peer = json!([{"podSelector": {"matchLabels": {"app": "outsider"}}}]);
    let selected = json!({"mode": "DenyAll", "head": {
        "ingressRules": [
            {"from": exporter_peer, "ports": [{"protocol": "TCP", "port": PORT}]},
            {"from": outsider_peer, "ports": [{"protocol": "TCP", "port": PORT}]},
        ],
        "egressRules": [{"to": exporter_peer, "ports": [{"protocol": "TCP", "port": EXPORTER}]}],
    }});
    let outsider = rig.pod("outsider");
    rig.edit(
        selected,
        "the selecting rules programmed (the outsider reaches the head)",
        || outsider.tcp_connect(head.ip4.into(), PORT, DENIED),
        true,
    )?;
    ingress.rebase();
    egress.rebase();
    rig.head_srv.take_peers(Duration::from_millis(100));
    match hook {
        Hook::Tc => {
            for dst in head.ips() {
                allowed(
                    &format!("selected exporter -> head {dst}"),
                    exporter.tcp_connect(dst, PORT, OK),
                )?;
            }
            allowed(
                "head -> selected exporter",
                head.tcp_connect(node.ip4.into(), EXPORTER, OK),
            )?;
            // The rule selects the exporter only.
            dropped(
                "node-agent -> head",
                node_agent.tcp_connect(head.ip4.into(), PORT, DENIED),
                None,
            )?;
            dropped(
                "stray -> head",
                stray.tcp_connect(head.ip4.into(), PORT, DENIED),
                None,
            )?;
            ingress.expect(2, "unselected -> head")?;
            dropped(
                "head -> node-agent",
                head.tcp_connect(node.ip4.into(), NODE_AGENT, DENIED),
                None,
            )?;
            egress.expect(1, "head -> unselected")?;
        }
        // The cgroup hook cannot tell a hostNetwork pod's packets from the node's:
        // a selector does not let it in there, an ipBlock for the node's address
        // does. The port it declares is compiled, so egress to it is decided on the
        // pod, as on TC.
        Hook::Cgroup => {
            dropped(
                "selected exporter -> head on the cgroup hook",
                exporter.tcp_connect(head.ip4.into(), PORT, DENIED),
                srv,
            )?;
            ingress.expect(1, "selected exporter -> head")?;
            allowed(
                "head -> selected exporter's port on the cgroup hook",
                head.tcp_connect(node.ip4.into(), EXPORTER, OK),
            )?;
            let rule = ip_block_rule(&host_cidrs(&node.ips()), PORT);
            rig.edit(
                json!({"mode": "DenyAll", "head": {"ingressRules": [rule]}}),
                "exporter -> head once the node's ipBlock is programmed",
                || exporter.tcp_connect(head.ip4.into(), PORT, DENIED),
                true,
            )?;
            ingress.rebase();
            egress.rebase();
        }
    }
    // The kubelet, meanwhile, on TC: still the node.
    if hook == Hook::Tc {
        allowed(
            "kubelet -> head",
            node.tcp_connect(head.ip4.into(), PORT, OK),
        )?;
        allowed(
            "head -> kubelet",
            head.tcp_connect(node.ip4.into(), KUBELET, OK),
        )?;
    }
    ingress.settled("hostNetwork pods -> head")?;
    egress.settled("head -> hostNetwork pods")
}

#[test]
fn a_host_network_pod_is_dropped_by_a_deny_all_head_unless_a_rule_selects_it_tc() -> Result<()> {
    host_network_pods(Hook::Tc, KubeProxyMode::Iptables)
}

#[test]
fn a_host_network_pod_is_only_the_node_address_on_the_cgroup_hook() -> Result<()> {
    host_network_pods(Hook::Cgroup, KubeProxyMode::Iptables)
}
