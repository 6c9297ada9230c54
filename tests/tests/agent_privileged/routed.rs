//! The agent on routed nodes (Calico without policy, the AWS VPC CNI, kindnet's and
//! the ptp plugin's pods): no bridge, a /32 and /128 route per pod to its host veth,
//! proxy ARP for the pods' link-local gateway 169.254.1.1, host veths named as each
//! CNI names them (`cali*`, `eni*`, `veth*`: [`HostIfNames`]). One node, and two
//! nodes routed to each other (host-gw, as Calico's BGP mode routes; and in VXLAN,
//! as Calico's VXLAN mode carries it).
//!
//! The connectivity matrix, for each name style and shape, over IPv4 and IPv6: a
//! RayCluster (head, worker) under DenyAll with one user rule (the outsider may reach
//! the head on [`USER_PORT`]), an outsider pod, the node's own processes. Allowed
//! flows pass; denied ones are dropped and counted exactly, in the datapath's
//! counters of the node whose pod they were denied for.
//!
//! [`Rig`] is shared with the NodeLocal DNSCache tests: pods in a cgroupfs kubelet
//! tree per node, one manifests directory all agents read, one agent per node.
//!
//! Needs root (network namespaces, bpffs, cgroups). Guards kill the agents and run
//! `rayfence cleanup` even when a test panics.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rayfence_common::{Direction, Verdict};
use rayfence_tests::agent::{Agent, AgentOptions, Bpffs, Manifests, uid};
use rayfence_tests::counters;
use rayfence_tests::kubelet::{CgroupDriver, KubeletTree, QosClass};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::probe::wait_outcome;
use rayfence_tests::topology::{HostIfNames, Transport};
use rayfence_tests::{Layout, Outcome, Pod, Server, Topology, probe_bin};
use serde_json::{Value, json};

/// Every pod serves TCP and UDP here; the RayCluster's own traffic uses it.
pub(crate) const PORT: u16 = 8000;
/// The one port the user rule opens: the outsider to the head, TCP.
const USER_PORT: u16 = 8001;
/// The node's own process (the kubelet's port).
const KUBELET: u16 = 10250;
pub(crate) const SHORT: Duration = Duration::from_millis(500);
/// Below the first SYN retransmission (1 s): a dropped connection is one packet.
pub(crate) const DENIED: Duration = Duration::from_millis(700);

pub(crate) fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// A pod, the node it runs on, its labels.
pub(crate) type Placement<'a> = (&'a str, usize, Vec<(&'a str, &'a str)>);

/// Nodes with their pods' sandboxes and one agent each. Field order is drop order:
/// the agents first, the pins, directories and namespaces last.
pub(crate) struct Rig {
    pub agents: Vec<Agent>,
    servers: Vec<Server>,
    /// One per node: what its agent gets as `--cgroup-root`.
    pub kubelets: Vec<KubeletTree>,
    pub bpffs: Vec<Bpffs>,
    pub manifests: Manifests,
    pub topo: Topology,
    /// The pods' namespace: `ray-<topology tag>`.
    pub ns: String,
    docs: Vec<Value>,
}

impl Rig {
    /// `topo`'s nodes and the pods of `placement` (made here, in that order) in
    /// their kubelet trees, as the API server would list them, plus `rc` with
    /// `policy`. No agent yet: [`Rig::start`].
    pub(crate) fn new(mut topo: Topology, placement: &[Placement], policy: Value) -> Result<Rig> {
        for (pod, node, _) in placement {
            topo.add_pod(*node, pod)?;
        }
        let ns = format!("ray-{}", topo.tag());
        let mut docs = vec![namespace(&ns), raycluster(&ns, "rc", policy)];
        let mut kubelets = Vec::new();
        for (i, node) in topo.nodes().iter().enumerate() {
            docs.push(node_object(&node_name(i), node));
            kubelets.push(KubeletTree::new(CgroupDriver::Cgroupfs)?);
        }
        let mut servers = Vec::new();
        for (n, (name, node, labels)) in placement.iter().enumerate() {
            let pod = topo.pod(name);
            let uid = uid(0x700 + n as u32);
            let ctr = kubelets[*node].pod_cgroup(&uid, QosClass::Guaranteed)?;
            // The sandbox, and every probe of the pod, in its container cgroup.
            pod.set_cgroup_dir(Some(&ctr));
            servers.push(pod.serve_tcp(9)?);
            docs.push(pod_object(&ns, pod, &uid, &node_name(*node), labels));
        }
        Ok(Rig {
            agents: Vec::new(),
            servers,
            kubelets,
            bpffs: Vec::new(),
            manifests: Manifests::new()?,
            topo,
            ns,
            docs,
        })
    }

    /// More objects for the agents (before [`Rig::start`]).
    pub(crate) fn add_docs(&mut self, docs: impl IntoIterator<Item = Value>) {
        self.docs.extend(docs);
    }

    /// Keeps `server` running as long as the rig.
    pub(crate) fn keep(&mut self, server: Server) {
        self.servers.push(server);
    }

    /// Writes the objects and starts one agent per node (with `extra_args`), each
    /// ready and with every pod of its node attached on its host veth.
    pub(crate) fn start(&mut self, extra_args: &[&str]) -> Result<()> {
        self.manifests.write("all.yaml", &self.docs)?;
        for (i, node) in self.topo.nodes().iter().enumerate() {
            let bpffs = Bpffs::new();
            let agent = Agent::start(&AgentOptions {
                node,
                node_name: &node_name(i),
                manifests: &self.manifests.dir,
                bpffs: &bpffs.path,
                cgroup_root: self.kubelets[i].root(),
                kubeconfig: None,
                extra_args,
            })?;
            self.bpffs.push(bpffs);
            let (ready, _) = agent.wait_ready(node, Duration::from_secs(30))?;
            println!("node-{i}: agent ready after {ready:?}");
            self.agents.push(agent);
        }
        for pod in self.topo.pods() {
            let who = format!("{}/{}", self.ns, pod.name);
            self.agents[pod.node]
                .wait_log(
                    &["endpoint attached", "hook=\"tc\"", &who, &pod.host_if],
                    Duration::from_secs(10),
                )
                .with_context(|| format!("{who} attached on {}", pod.host_if))?;
        }
        Ok(())
    }

    pub(crate) fn pod(&self, name: &str) -> &Pod {
        self.topo.pod(name)
    }

    /// Packets dropped so far on node `node`, in `direction`, every endpoint
    /// together (the datapath's pinned counters).
    pub(crate) fn drops(&self, node: usize, direction: Direction) -> Result<u64> {
        drops_under(&self.bpffs[node].path, direction)
    }

    /// Every node's agent still runs.
    pub(crate) fn alive(&self) -> Result<()> {
        for (i, agent) in self.agents.iter().enumerate() {
            ensure!(
                Path::new(&format!("/proc/{}", agent.pid())).exists(),
                "the agent on node-{i} exited; log:\n{}",
                agent.log_text()
            );
        }
        Ok(())
    }
}

fn drops_under(bpffs: &Path, direction: Direction) -> Result<u64> {
    Ok(counters::pinned(bpffs)?
        .iter()
        .filter(|(k, _)| k.verdict == Verdict::Drop as u8 && k.direction == direction as u8)
        .map(|(_, v)| v.packets)
        .sum())
}

/// What a matrix expects to be dropped: (node, direction) -> packets.
#[derive(Default)]
pub(crate) struct Tally(BTreeMap<(usize, u8), u64>);

impl Tally {
    /// The counts now, as the base the expectations add to.
    pub(crate) fn now(rig: &Rig) -> Result<Tally> {
        let mut t = Tally::default();
        for node in 0..rig.topo.nodes().len() {
            for dir in [Direction::Ingress, Direction::Egress] {
                t.0.insert((node, dir as u8), rig.drops(node, dir)?);
            }
        }
        Ok(t)
    }

    pub(crate) fn add(&mut self, node: usize, dir: Direction) {
        *self.0.entry((node, dir as u8)).or_default() += 1;
    }

    /// Waits a little for the counters to reach the expectation, then checks they
    /// are exactly that (nothing counted that the test did not cause).
    pub(crate) fn check(&self, rig: &Rig, what: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let now = Tally::now(rig)?;
            if now.0 == self.0 || t0.elapsed() > Duration::from_secs(2) {
                ensure!(
                    now.0 == self.0,
                    "{what}: drops counted (node, direction 0=ingress 1=egress): {:?}, expected {:?}",
                    now.0,
                    self.0
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub(crate) fn allowed(what: &str, o: Outcome) -> Result<()> {
    ensure!(o == Outcome::Ok, "{what}: {o:?}");
    Ok(())
}

pub(crate) fn dropped(what: &str, o: Outcome) -> Result<()> {
    ensure!(o.is_blocked(), "{what}: not dropped ({o:?})");
    Ok(())
}

/// The two routed shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Head, worker and outsider on one node.
    OneNode,
    /// The head on node-0; the worker and the outsider on node-1.
    TwoNodes,
    /// The same, pod traffic between the nodes in VXLAN (Calico's VXLAN mode).
    TwoNodesVxlan,
}

/// The connectivity matrix on a routed node (or two) whose host veths are named as
/// `names` says.
fn routed_matrix(names: HostIfNames, shape: Shape) -> Result<()> {
    let mut topo = Topology::new(Layout::Routed, probe_bin())?;
    topo.set_host_if_names(names)?;
    let far = match shape {
        Shape::OneNode => 0,
        Shape::TwoNodes => topo.add_node()?,
        Shape::TwoNodesVxlan => {
            topo.set_transport(Transport::Vxlan)?;
            topo.add_node()?
        }
    };
    let placement: [Placement; 3] = [
        ("head", 0, head_labels("rc")),
        ("worker", far, worker_labels("rc")),
        ("outsider", far, vec![("app", "outsider")]),
    ];
    let user_rule = json!([{
        "from": [{"podSelector": {"matchLabels": {"app": "outsider"}}}],
        "ports": [{"protocol": "TCP", "port": USER_PORT}]}]);
    let policy = json!({"mode": "DenyAll", "head": {"ingressRules": user_rule}});
    let mut rig = Rig::new(topo, &placement, policy)?;
    let prefix = names.prefix().unwrap_or("rf");
    for pod in rig.topo.pods() {
        ensure!(
            pod.host_if.starts_with(prefix) && pod.host_if.len() <= 15,
            "{}'s host veth is {}",
            pod.name,
            pod.host_if
        );
    }
    for name in ["head", "worker", "outsider"] {
        let pod = rig.pod(name);
        let servers = [pod.serve_tcp(PORT)?, pod.serve_udp(PORT)?];
        for server in servers {
            rig.keep(server);
        }
    }
    let head_user = rig.pod("head").serve_tcp(USER_PORT)?;
    rig.keep(head_user);
    for i in 0..rig.topo.nodes().len() {
        let kubelet = rig.topo.node(i).serve_tcp(KUBELET)?;
        rig.keep(kubelet);
    }
    // The lab: every path open before any agent, both families, across nodes too
    // (which also resolves every neighbour the matrix needs).
    let names = ["head", "worker", "outsider"];
    for (from, to) in names.iter().flat_map(|a| names.map(|b| (*a, b))) {
        if from == to {
            continue;
        }
        for dst in rig.pod(to).ips() {
            wait_outcome(
                &format!("lab: {from} -> {to} {dst}"),
                Duration::from_secs(10),
                || rig.pod(from).tcp_connect(dst, PORT, SHORT),
                true,
            )?;
        }
    }

    rig.start(&[])?;
    let (head, worker, outsider) = (rig.pod("head"), rig.pod("worker"), rig.pod("outsider"));
    let mut want = Tally::now(&rig)?;
    for family in 0..2 {
        let at = |pod: &Pod| pod.ips()[family];
        // The RayCluster, both ways, TCP and UDP.
        for (from, to) in [(head, worker), (worker, head)] {
            let what = format!("{} -> {} {}", from.name, to.name, at(to));
            allowed(&what, from.tcp_connect(at(to), PORT, SHORT))?;
            allowed(&format!("{what} UDP"), from.udp_probe(at(to), PORT, SHORT))?;
        }
        // The user rule, and nothing more than it.
        allowed(
            &format!("outsider -> head {}:{USER_PORT}", at(head)),
            outsider.tcp_connect(at(head), USER_PORT, SHORT),
        )?;
        dropped(
            &format!("outsider -> head {}:{PORT}", at(head)),
            outsider.tcp_connect(at(head), PORT, DENIED),
        )?;
        want.add(head.node, Direction::Ingress);
        dropped(
            &format!("outsider -> worker {}", at(worker)),
            outsider.tcp_connect(at(worker), PORT, DENIED),
        )?;
        want.add(worker.node, Direction::Ingress);
        // DenyAll isolates egress: neither may reach the outsider.
        dropped(
            &format!("worker -> outsider {}", at(outsider)),
            worker.tcp_connect(at(outsider), PORT, DENIED),
        )?;
        want.add(worker.node, Direction::Egress);
        dropped(
            &format!("head -> outsider {}", at(outsider)),
            head.tcp_connect(at(outsider), PORT, DENIED),
        )?;
        want.add(head.node, Direction::Egress);
        // The node's own processes and the pods, both ways.
        let home = rig.topo.node(head.node);
        let node_ip: IpAddr = home.ips()[family];
        allowed(
            &format!("head's node -> head {}", at(head)),
            home.tcp_connect(at(head), PORT, SHORT),
        )?;
        allowed(
            &format!("head -> its node {node_ip}:{KUBELET}"),
            head.tcp_connect(node_ip, KUBELET, SHORT),
        )?;
        // Another node's host is an ordinary peer.
        if shape != Shape::OneNode {
            let other = rig.topo.node(far);
            dropped(
                &format!("node-{far}'s host -> head {}", at(head)),
                other.tcp_connect(at(head), PORT, DENIED),
            )?;
            want.add(head.node, Direction::Ingress);
        }
        want.check(&rig, &format!("family {}", if family == 0 { 4 } else { 6 }))?;
    }
    // Nothing else gets counted afterwards (retransmissions, neighbour discovery).
    std::thread::sleep(Duration::from_millis(1200));
    want.check(&rig, "settled")?;
    if shape == Shape::TwoNodesVxlan {
        for node in rig.topo.nodes() {
            let mut carried = 0;
            for dev in node.vxlan.as_ref().context("VXLAN devices")? {
                let (rx, tx) = node.link_packets(dev)?;
                carried += rx + tx;
            }
            ensure!(
                carried > 20,
                "node-{}: {carried} packets over VXLAN",
                node.index
            );
        }
    }
    rig.alive()
}

#[test]
fn calico_named_routed_node_enforces_the_matrix() -> Result<()> {
    routed_matrix(HostIfNames::Calico, Shape::OneNode)
}

#[test]
fn aws_eni_named_routed_node_enforces_the_matrix() -> Result<()> {
    routed_matrix(HostIfNames::AwsEni, Shape::OneNode)
}

#[test]
fn veth_named_routed_node_enforces_the_matrix() -> Result<()> {
    routed_matrix(HostIfNames::Veth, Shape::OneNode)
}

#[test]
fn calico_named_routed_nodes_enforce_the_matrix_across_nodes() -> Result<()> {
    routed_matrix(HostIfNames::Calico, Shape::TwoNodes)
}

#[test]
fn aws_eni_named_routed_nodes_enforce_the_matrix_across_nodes() -> Result<()> {
    routed_matrix(HostIfNames::AwsEni, Shape::TwoNodes)
}

#[test]
fn veth_named_routed_nodes_enforce_the_matrix_across_nodes() -> Result<()> {
    routed_matrix(HostIfNames::Veth, Shape::TwoNodes)
}

#[test]
fn calico_named_routed_nodes_enforce_the_matrix_across_nodes_over_vxlan() -> Result<()> {
    routed_matrix(HostIfNames::Calico, Shape::TwoNodesVxlan)
}
