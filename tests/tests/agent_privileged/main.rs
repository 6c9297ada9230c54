//! The real `rayfence` binaries end to end, root only (network namespaces, bpffs,
//! cgroups, eBPF): the agent on simulated nodes started through the kit
//! (`rayfence_tests::agent`: kubelet cgroup trees, bpffs and manifests directories,
//! the fake API server, the agent's start-up and its guards), and the CNI plugin.
//! Each test has its own topology, pins and directories,
//! removed by guards on panic too, so tests run side by side.

mod api;
mod audit;
mod bundle;
mod capacity;
mod cni_guard;
mod cni_install;
mod ip_reuse;
mod kube_proxy_nft;
mod kubectl_plugin;
mod listener_limits;
mod manifests_conflicts;
mod metrics;
mod metrics_auth;
mod multinode;
mod node_local_dns;
mod node_trust;
mod observe;
mod routed;
mod runtime;
mod runtime_shapes;
mod upgrade;
