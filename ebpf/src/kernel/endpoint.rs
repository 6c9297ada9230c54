//! Which local endpoint a packet belongs to: by the host veth's ifindex (TC) or by the
//! socket's cgroup (cgroup_skb). An unknown endpoint is not ours: the caller passes
//! the packet untouched.
use aya_ebpf::helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id};
use rayfence_common::EndpointInfo;

use crate::kernel::{maps, parse::Skb};

/// Cgroup levels walked when the socket's own cgroup is not registered (containers
/// live in cgroups below the pod's; kubelet nests pods 3-4 levels deep).
pub const MAX_CGROUP_DEPTH: i32 = 12;

#[inline(always)]
pub fn by_ifindex(skb: &Skb) -> Option<EndpointInfo> {
    // SAFETY: map values are plain data; copied out at once.
    unsafe { maps::EP_TC.get(&skb.ifindex()) }.copied()
}

#[inline(always)]
pub fn by_cgroup(skb: &Skb) -> Option<EndpointInfo> {
    // SAFETY: the helper only reads the skb's socket.
    let own = unsafe { bpf_skb_cgroup_id(skb.raw()) };
    if own == 0 {
        return None;
    }
    // SAFETY: as in by_ifindex.
    if let Some(info) = unsafe { maps::EP_CG.get(&own) } {
        return Some(*info);
    }
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: as above; 0 means "no cgroup at that level".
        let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(skb.raw(), level) };
        if ancestor == 0 || ancestor == own {
            return None;
        }
        // SAFETY: as in by_ifindex.
        if let Some(info) = unsafe { maps::EP_CG.get(&ancestor) } {
            return Some(*info);
        }
    }
    None
}
