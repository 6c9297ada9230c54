//! rayfence's test kit: fixtures (network namespaces, veths, bridges, cgroups and
//! traffic probes, each cleaned up on drop, also when a test panics) and every
//! helper the test suites and benchmarks share.
//!
//! - [`netns`]: `Netns`, a named network namespace and ways to act inside it.
//! - [`topology`]: simulated Kubernetes nodes (`Bridged` like flannel's cni0,
//!   `Routed` like Calico) with dual-stack pods, and the optional pieces of "the
//!   node" a test adds: external clients, macvlan pods (no host veth), NAT.
//! - [`node_nat`]: kube-proxy's NodePorts and the portmap plugin's hostPorts as
//!   iptables rules in the node namespaces, with their Services, EndpointSlices
//!   and container ports.
//! - [`kubelet`]: kubelet-style pod cgroup trees (systemd and cgroupfs drivers) and
//!   hostNetwork pods (a pod cgroup, the node's network namespace).
//! - [`cgroup`]: `TestCgroup` / `PodCgroup` under the cgroup2 mount.
//! - [`bpffs`]: pin directories under `/sys/fs/bpf`, mounting the bpf filesystem
//!   there first when the machine has none.
//! - [`sweep`]: removing what a SIGKILLed run left behind (explicit call).
//! - [`fake_api`]: `FakeApiServer`, a fake Kubernetes API server speaking real HTTP
//!   list and watch, for the agent's kube-rs client path.
//! - [`http`]: a plain HTTP GET with any headers, as a scraper makes it.
//! - [`shape`]: the shapes of node the lab builds, by name (CNI wiring, kube-proxy
//!   mode, runtime, cgroup layout, DNS), for tests and `cargo xtask demo --shape`.
//! - [`demo`]: the demo scenario (`cargo xtask demo`, binary `rf-demo`).
//! - [`probe`]: running the `rf-probe` binary (servers, connects, pings, held
//!   connections) in a pod, optionally inside a cgroup.
//! - [`objects`]: Kubernetes object builders, typed (the policy engine's input) and
//!   as JSON (manifests, the fake API server).
//! - [`agent`]: the real `rayfence agent` started on a simulated node (bpffs pins,
//!   manifests or a kubeconfig, kubelet cgroups), its metrics, and guards.
//! - [`policy`]: the policy engine's verdicts for a flow, as truth-table assertions.
//! - [`packet`]: crafted packets for BPF_PROG_TEST_RUN.
//! - [`counters`]: the datapath's counter rows, from a `Datapath` or the agent's
//!   pins ([`pinned`]: read-only map access).
//! - [`discovery`]: kubelet cgroup trees and locators for the discovery tests.
//! - [`deploy`]: deploy/ rendered (kustomize, the Helm chart) and read.
//!
//! Shared by every test suite under `tests/` (one test binary each) and the
//! benchmarks under `benches/`: a helper lives here once, public, whichever suites
//! use it.
//!
//! ```no_run
//! use std::time::Duration;
//! use rayfence_tests::{Layout, Outcome, PodCgroup, ProbeBin, Topology};
//!
//! # fn main() -> anyhow::Result<()> {
//! // In this crate's tests and benchmarks: rayfence_tests::probe_bin().
//! let bin = ProbeBin::locate()?;
//! let topo = Topology::with_pods(Layout::Routed, bin, &["head", "worker"])?;
//! let (head, worker) = (topo.pod("head"), topo.pod("worker"));
//! // TC programs attach to worker.host_if / worker.host_ifindex in the node
//! // namespace, e.g. inside topo.node(0).netns.run(|| ...).
//! let _gcs = head.serve_tcp(6379)?;
//! let t = Duration::from_secs(1);
//! assert_eq!(worker.tcp_connect(head.ip4.into(), 6379, t), Outcome::Ok);
//! assert_eq!(worker.tcp_connect(head.ip6.into(), 6379, t), Outcome::Ok);
//! // The cgroup_skb flavour: the same probes, inside a kubelet-like cgroup.
//! let cg = PodCgroup::new()?;
//! worker.set_cgroup(Some(&cg.container));
//! let mut held = worker.tcp_hold(head.ip4.into(), 6379, t)?;
//! assert!(held.roundtrip());
//! # Ok(()) }
//! ```
//!
//! Nothing here touches the root namespace's interfaces, routes, sysctls or
//! firewall: every link is created directly inside namespaces this crate made.

pub mod agent;
pub mod agent_bin;
pub mod background;
pub mod bpffs;
pub mod cgroup;
pub mod counters;
pub mod demo;
pub mod deploy;
pub mod discovery;
pub mod fake_api;
pub mod http;
pub mod kubelet;
pub mod names;
pub mod netns;
pub mod node_nat;
pub mod objects;
pub mod packet;
pub mod pinned;
pub mod policy;
pub mod probe;
pub mod probe_cli;
pub mod shape;
pub mod sweep;
pub mod topology;

pub use cgroup::{PodCgroup, TestCgroup};
pub use netns::Netns;
pub use probe::{HeldConnection, Outcome, ProbeBin, Prober, Server, probe_bin};
pub use topology::{ExternalClient, Layout, Node, Pod, Topology, Wiring};
