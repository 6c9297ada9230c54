//! Self-tests of the kit's fixtures, root only (network namespaces, cgroups), no
//! eBPF: topologies, cgroups, the node lab's NAT paths and hostNetwork pods, what
//! probes report, and that everything is gone after drop.

mod cgroup;
mod cleanup;
mod kube_proxy_nft;
mod multinode;
mod node_lab;
mod topology;
