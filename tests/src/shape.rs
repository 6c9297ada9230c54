//! The shapes of node the lab builds, by name: which CNI wiring, which kube-proxy
//! mode, which container runtime and cgroup driver, which cgroup mount, which DNS.
//! A test or the demo (`cargo xtask demo --shape NAME`) says which shape it runs
//! on; everything that differs between shapes is decided here, once, and the
//! builders ([`crate::topology`], [`crate::node_nat`], [`crate::kubelet`]) act on it.
//!
//! [`SHAPES`] is the support matrix of the README: every shape in it runs the
//! demo's connectivity matrix with the agent in `cargo xtask test`.
//!
//! Must not: build anything itself (it only describes), or name a shape that no
//! test runs.

use anyhow::{Result, bail};

use crate::cgroup::CgroupMount;
use crate::kubelet::{CgroupDriver, ContainerRuntime};
use crate::node_nat::KubeProxyMode;
use crate::topology::{HostIfNames, Layout, Transport};

/// One node shape: a named combination of the lab's choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// What `--shape` takes.
    pub name: &'static str,
    /// What it stands for, in a few words (printed by the demo).
    pub stands_for: &'static str,
    /// How pods are wired to their node, and how the host-side interfaces are
    /// named (a CNI's prefix, or the kit's own names).
    pub layout: Layout,
    pub host_if_names: HostIfNames,
    /// A second node, and how pod traffic crosses to it; `None`: one node.
    pub second_node: Option<Transport>,
    /// How kube-proxy programs Services on every node.
    pub kube_proxy: KubeProxyMode,
    /// The container runtime (its container cgroup names) and the kubelet's
    /// cgroup driver.
    pub runtime: ContainerRuntime,
    pub driver: CgroupDriver,
    /// What the agent sees mounted at `/sys/fs/cgroup`.
    pub cgroups: CgroupMount,
    /// What the pods' DNS queries reach.
    pub dns: Dns,
}

/// Where pods' DNS queries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dns {
    /// The kube-dns Service's ClusterIP, DNATed by kube-proxy to CoreDNS.
    Service,
    /// NodeLocal DNSCache in its iptables mode: a hostNetwork pod on every node
    /// answering on 169.254.20.10 and on kube-dns's ClusterIP, which it binds on
    /// its own device with NOTRACK rules so kube-proxy's DNAT never applies; the
    /// agent is told with `--dns-node-local`.
    NodeLocal,
}

/// The default shape: flannel's host-gw on a bridge, kube-proxy in iptables mode,
/// containerd with the cgroupfs driver, the hybrid cgroup mount (cgroup2 at
/// `/sys/fs/cgroup/unified`, this machine's).
pub const DEFAULT: Shape = Shape {
    name: "flannel",
    stands_for: "flannel-like bridge (cni0), kube-proxy iptables mode, containerd with the cgroupfs driver, cgroup2 on the hybrid mount",
    layout: Layout::Bridged,
    second_node: None,
    kube_proxy: KubeProxyMode::Iptables,
    runtime: ContainerRuntime::Containerd,
    driver: CgroupDriver::Cgroupfs,
    cgroups: CgroupMount::Hybrid,
    dns: Dns::Service,
    host_if_names: HostIfNames::Kit,
};

/// Every shape the lab builds.
pub const SHAPES: &[Shape] = &[
    DEFAULT,
    Shape {
        name: "calico",
        stands_for: "Calico-like routed veths: cali* host interfaces, a /32 per pod, proxy ARP, gateway 169.254.1.1, no bridge",
        layout: Layout::Routed,
        host_if_names: HostIfNames::Calico,
        ..DEFAULT
    },
    Shape {
        name: "aws-eni",
        stands_for: "the AWS VPC CNI's shape: eni* host interfaces, a /32 route per pod, link-local gateway, no bridge",
        layout: Layout::Routed,
        host_if_names: HostIfNames::AwsEni,
        ..DEFAULT
    },
    Shape {
        name: "vxlan",
        stands_for: "flannel's VXLAN backend (k3s's default): two bridged nodes, pod traffic between them encapsulated (VNI 1, port 8472, IPv4 and IPv6)",
        second_node: Some(Transport::Vxlan),
        ..DEFAULT
    },
    Shape {
        name: "nftables",
        stands_for: "kube-proxy in nftables mode (Kubernetes 1.31+): its ip/ip6 kube-proxy tables, verdict maps and chains, on the flannel-like bridge",
        kube_proxy: KubeProxyMode::Nftables,
        ..DEFAULT
    },
    Shape {
        name: "nodelocal-dns",
        stands_for: "NodeLocal DNSCache (iptables mode): a hostNetwork cache on 169.254.20.10 that also binds kube-dns's ClusterIP (NOTRACK), the agent run with --dns-node-local",
        dns: Dns::NodeLocal,
        ..DEFAULT
    },
    Shape {
        name: "crio",
        stands_for: "CRI-O with the systemd cgroup driver: crio-<id>.scope containers, conmon beside each in the pod cgroup (in the node's network namespace)",
        runtime: ContainerRuntime::Crio,
        driver: CgroupDriver::Systemd,
        ..DEFAULT
    },
    Shape {
        name: "systemd",
        stands_for: "containerd with the systemd cgroup driver: kubepods.slice, cri-containerd-<id>.scope",
        driver: CgroupDriver::Systemd,
        ..DEFAULT
    },
    Shape {
        name: "cgroup2",
        stands_for: "a pure cgroup v2 host: cgroup2 alone at /sys/fs/cgroup (the agent finds it itself), containerd with the systemd driver",
        driver: CgroupDriver::Systemd,
        cgroups: CgroupMount::PureV2,
        ..DEFAULT
    },
];

impl Shape {
    /// The shape called `name`, or an error listing the known ones.
    pub fn named(name: &str) -> Result<Shape> {
        match SHAPES.iter().find(|s| s.name == name) {
            Some(shape) => Ok(*shape),
            None => bail!(
                "--shape {name:?}: unknown shape; known: {}",
                SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (i, shape) in SHAPES.iter().enumerate() {
            assert_eq!(Shape::named(shape.name).unwrap(), *shape);
            assert!(SHAPES[..i].iter().all(|s| s.name != shape.name));
        }
        let error = Shape::named("weave").unwrap_err().to_string();
        assert!(
            error.contains("\"weave\"") && error.contains("flannel"),
            "{error}"
        );
    }
}
