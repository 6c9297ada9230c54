//! Datapath: loads rayfence's eBPF programs, attaches them to endpoints, pins
//! programs, maps and links, and applies [`crate::tables::Tables`] to the maps.
//!
//! The only module that uses aya. It knows nothing of Kubernetes.
//!
//! - [`bpffs`]: the bpf filesystem under the pins (mounted at /sys/fs/bpf when
//!   missing).
//! - [`load`]: load the object, size and pin (or adopt) the maps, rebuild the
//!   userspace mirror from what the maps hold.
//! - [`migrate`]: a resize or an upgrade of the pinned maps: new maps beside the
//!   old, state carried across, programs swapped on their links, then the pins.
//! - [`attach`]: TCX (clsact before Linux 6.6) on a pod's host veth, cgroup_skb on
//!   its cgroup; links pinned so enforcement outlives the agent.
//! - [`guard`]: the CNI plugin's hold on pods not programmed yet (written by the
//!   plugin through the pins, taken over or released by the agent).
//! - [`apply`]: tables and diffs to maps, in an order that never opens a gap.
//! - [`node`]: who is behind a node address: the pod cgroups a node socket may sit
//!   in, and what the kernel offers ([`kfuncs`]: its conntrack) to tell NATed
//!   traffic from the node's own (docs/semantics.md "What counts as the node").
//! - [`maps`]: one typed accessor per map, naming the map in its errors.
//! - [`observe`]: counters and flow events.
//! - `testrun`: BPF_PROG_TEST_RUN, for the tests and the benchmark only (feature
//!   `testrun`: the agent's own builds leave it out).
//! - [`cleanup`]: remove everything pinned or attached.
pub mod apply;
pub mod attach;
pub mod bpffs;
pub mod cleanup;
mod codec;
pub mod error;
pub mod guard;
pub mod kfuncs;
pub mod load;
mod maps;
pub mod migrate;
pub mod node;
pub mod observe;
pub mod paths;
#[cfg(feature = "testrun")]
pub mod testrun;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aya::Ebpf;
use aya::programs::{links::FdLink, tc::SchedClassifierLink};

pub use attach::Interface;
pub use cleanup::cleanup;
pub use error::DatapathError;
pub use load::{Capacities, DatapathOptions, TcBackend};
pub use node::NodeTrust;
pub use observe::{AsyncEventStream, Counters, EventStream};
#[cfg(feature = "testrun")]
pub use testrun::{Hook, TestRunOutcome};

use crate::tables::{EndpointId, Tables};

/// The loaded datapath: programs, maps, and where each endpoint is attached.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    tc_backend: TcBackend,
    /// What the maps hold, as tables (rebuilt from pinned maps on adoption).
    mirror: Tables,
    attachments: BTreeMap<EndpointId, Attachments>,
    generations: BTreeMap<EndpointId, u32>,
    /// Endpoints whose policy did not fit the maps.
    forced_fail_closed: BTreeSet<EndpointId>,
    /// Endpoints the agent holds fail-closed (their RayCluster's policy was not
    /// admitted for lack of room; see [`Datapath::hold`]).
    held: BTreeSet<EndpointId>,
    /// Links held by this process when nothing is pinned; dropping one detaches it.
    owned_links: BTreeMap<String, OwnedLink>,
    /// How forwarded traffic from a node address is told apart from the node's own.
    node_trust: NodeTrust,
    /// What `RF_NODECG` holds: cgroup id -> hostNetwork pod identity or `OTHER_POD`.
    node_cgroups: BTreeMap<u64, u32>,
    /// How long (ms) each guard the agent took over had held its pod, not yet read.
    guard_waits: Vec<u64>,
}

/// Where one endpoint is attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachments {
    pub ifindexes: BTreeSet<u32>,
    pub cgroups: BTreeSet<u64>,
}

enum OwnedLink {
    Fd(#[expect(dead_code, reason = "held for its Drop, which detaches")] FdLink),
    Tc(#[expect(dead_code, reason = "held for its Drop, which detaches")] SchedClassifierLink),
}

impl Datapath {
    /// The bpffs directory everything is pinned under, if any.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pin_dir.as_deref()
    }

    /// What the maps hold, as tables.
    pub fn tables(&self) -> &Tables {
        &self.mirror
    }

    /// Where each endpoint is attached (or registered).
    pub fn attachments(&self) -> &BTreeMap<EndpointId, Attachments> {
        &self.attachments
    }

    /// Endpoints currently fail-closed because their policy did not fit.
    pub fn fail_closed(&self) -> &BTreeSet<EndpointId> {
        &self.forced_fail_closed
    }

    /// The endpoint's current policy generation.
    pub fn generation(&self, endpoint: EndpointId) -> u32 {
        self.generations.get(&endpoint).copied().unwrap_or(1)
    }
}
