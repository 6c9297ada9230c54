//! Everything that runs in the kernel, split by concern like Cilium's `bpf/lib`:
//! - [`programs`]: the entry points (TC on the host veth, cgroup_skb), thin.
//! - [`verdict`]: the decision, the same for every hook.
//! - [`parse`]: headers, in bounds, into a flow.
//! - [`endpoint`]: which endpoint a packet belongs to (ifindex or cgroup).
//! - [`identity`]: an address's identity (exact, then longest prefix).
//! - [`policy`]: the one policy lookup per new flow.
//! - [`conntrack`]: the flow table and its generation re-check.
//! - [`ipfrag`]: ports for later IP fragments.
//! - [`node`]: what counts as the node (host cgroups, the kernel's conntrack).
//! - [`metrics`]: counters and sampled flow events.
//! - [`maps`]: every map the agent sees, by name.
mod conntrack;
mod endpoint;
mod identity;
mod ipfrag;
mod maps;
mod metrics;
mod node;
mod parse;
mod policy;
mod programs;
mod verdict;
