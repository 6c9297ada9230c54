//! Test fixtures for rayfence: network namespaces, veths, bridges, cgroups and
//! traffic probes, each cleaned up on drop (also when a test panics).
//!
//! - [`netns`]: `Netns`, a named network namespace and ways to act inside it.
//! - [`topology`]: simulated Kubernetes nodes (`Bridged` like flannel's cni0,
//!   `Routed` like Calico) with dual-stack pods.
//! - [`cgroup`]: `TestCgroup` / `PodCgroup` under the cgroup2 mount.
//! - [`probe`]: running the `rf-probe` binary (servers, connects, pings, held
//!   connections) in a pod, optionally inside a cgroup.
//!
//! Nothing here touches the root namespace's interfaces, routes, sysctls or
//! firewall: every link is created directly inside namespaces this crate made.

pub mod cgroup;
pub mod names;
pub mod netns;
pub mod probe;
pub mod probe_cli;
pub mod topology;

pub use cgroup::{PodCgroup, TestCgroup};
pub use netns::Netns;
pub use probe::{HeldConnection, Outcome, ProbeBin, Prober, Server};
pub use topology::{Layout, Node, Pod, Topology};
