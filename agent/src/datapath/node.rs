//! Who is behind a node address (docs/semantics.md "What counts as the node"), the userspace half: which cgroups
//! a node socket may sit in that are not the node (`RF_NODECG`: each local
//! hostNetwork pod's cgroup with its identity, and the kubelet's pod cgroup roots
//! as `identity::OTHER_POD`), and how this kernel lets the datapath tell traffic
//! the node forwards from its own ([`NodeTrust`]).
//!
//! Must not: decide which pods are hostNetwork pods or where their cgroups are
//! (the runtime and discovery do); it only mirrors what it is given into the map.
use std::collections::BTreeMap;

use super::{Datapath, DatapathError, maps};

/// How the datapath tells traffic the node forwards (NodePort, hostPort, any
/// masquerade) from what the node's own processes send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeTrust {
    /// The kernel's conntrack gives a NATed flow's original source.
    Conntrack,
    /// No conntrack lookup: forwarded traffic is judged by the node address it
    /// carries (only an ipBlock covering it allows it), and why.
    AddressOnly { reason: String },
}

impl NodeTrust {
    /// For status and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Conntrack => "conntrack: NATed traffic is judged by its original source".into(),
            Self::AddressOnly { reason } => {
                format!("address-only: NATed traffic is judged by the node address ({reason})")
            }
        }
    }
}

impl Datapath {
    pub fn node_trust(&self) -> &NodeTrust {
        &self.node_trust
    }

    /// What `RF_NODECG` holds.
    pub fn node_cgroups(&self) -> &BTreeMap<u64, u32> {
        &self.node_cgroups
    }

    /// Makes `RF_NODECG` equal to `desired` (cgroup id -> hostNetwork pod identity,
    /// or `identity::OTHER_POD`): new and changed entries first, then removals, so a
    /// pod cgroup is never briefly a host process's.
    pub fn set_node_cgroups(&mut self, desired: &BTreeMap<u64, u32>) -> Result<(), DatapathError> {
        let mut map = maps::node_cgroups(&mut self.ebpf)?;
        for (cgroup, class) in desired {
            if self.node_cgroups.get(cgroup) != Some(class) {
                map.insert(cgroup, class, 0).map_err(map.error())?;
                self.node_cgroups.insert(*cgroup, *class);
            }
        }
        let gone: Vec<u64> = self
            .node_cgroups
            .keys()
            .filter(|cgroup| !desired.contains_key(cgroup))
            .copied()
            .collect();
        for cgroup in gone {
            match map.remove(&cgroup) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(error) => return Err(map.fail(error)),
            }
            self.node_cgroups.remove(&cgroup);
        }
        Ok(())
    }
}
