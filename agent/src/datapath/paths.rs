//! Where pinned objects live under the agent's bpffs directory, in one place.
//!
//! ```text
//! <dir>/maps/RF_*_V1                 maps (adopted by a restarted agent)
//! <dir>/links/tc_<ifindex>_<dir>     TCX links on a pod's host veth
//! <dir>/links/cg_<cgroup id>_<dir>   cgroup_skb links on a pod's cgroup
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

pub fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

/// `hook` is `ingress` or `egress` (of the hook, not of the pod).
pub fn tc_link(root: &Path, ifindex: u32, hook: &str) -> PathBuf {
    links_dir(root).join(format!("tc_{ifindex}_{hook}"))
}

pub fn cgroup_link(root: &Path, cgroup_id: u64, hook: &str) -> PathBuf {
    links_dir(root).join(format!("cg_{cgroup_id}_{hook}"))
}
