//! Where pinned objects live under the agent's bpffs directory, in one place.
//!
//! ```text
//! <dir>/maps/RF_*_V1                 maps (adopted by a restarted agent)
//! <dir>/progs/tc_ingress, tc_egress  the running agent's TC programs, for the CNI
//!                                    plugin to attach to a new pod's veth
//! <dir>/links/tc_<ifindex>_<dir>     TCX links on a pod's host veth
//! <dir>/links/cg_<cgroup id>_<dir>   cgroup_skb links on a pod's cgroup
//! <dir>/links/nl_<netns>_<ifindex>_<dir>/  marker of a clsact filter (no TCX)
//!   prio_<priority>_handle_<handle>/  inside it: which filter (to replace its program)
//! ```
use std::path::{Path, PathBuf};

/// Where a node usually has its bpf filesystem.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/rayfence";

pub fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

pub fn map(root: &Path, name: &str) -> PathBuf {
    maps_dir(root).join(name)
}

pub fn progs_dir(root: &Path) -> PathBuf {
    root.join("progs")
}

/// A pinned program (`tc_ingress` or `tc_egress`).
pub fn prog(root: &Path, name: &str) -> PathBuf {
    progs_dir(root).join(name)
}

pub fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

/// Name (under [`links_dir`]) of the TCX link on a host veth; `hook` is `ingress`
/// or `egress` of the hook, not of the pod.
pub fn tc_link_name(ifindex: u32, hook: &str) -> String {
    format!("tc_{ifindex}_{hook}")
}

/// Name of the cgroup_skb link on a pod cgroup.
pub fn cgroup_link_name(cgroup_id: u64, hook: &str) -> String {
    format!("cg_{cgroup_id}_{hook}")
}

/// Name of the marker directory of a clsact filter (kernels without TCX): netlink
/// filters cannot be pinned, and an ifindex only means something in its network
/// namespace, so the marker names both.
pub fn clsact_marker_name(netns: u64, ifindex: u32, hook: &str) -> String {
    format!("nl_{netns}_{ifindex}_{hook}")
}
