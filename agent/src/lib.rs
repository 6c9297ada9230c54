//! rayfence: RayCluster network isolation enforced in eBPF on every node.
//!
//! Module map (one concern each; the `//!` header of each says what it must not do):
//! - [`capabilities`]: the Linux capabilities the agent needs, checked at start.
//! - [`crd`]: the RayCluster resource type, policy fields kept raw.
//! - [`tables`]: the desired datapath state, the contract between policy and datapath.
//! - [`policy`]: pure translation of cluster objects into [`tables::Tables`]; no I/O.
//! - [`datapath`]: the only module that touches aya: load, attach, pin, apply tables.
//! - [`discovery`]: where local pods live in the kernel (cgroup, host veth) and which hook fits.
//! - [`source`]: cluster objects from the API server or a manifests directory, as events.
//! - [`runtime`]: the node agent's reconcile loop: sources -> engine -> datapath, endpoints.
//! - [`serve`]: `/metrics`, `/healthz`, `/readyz`, and the operator API (`/v1/...`) over
//!   HTTP and the local socket.
//! - [`api`]: the operator API's wire types (status, explain, flow events).
//! - [`explain`]: a flow's verdict on each side and the rules that decide it.
//! - [`cli`]: the operator commands' client side (`status`, `explain`, `flows`).
//! - [`cni`]: the chained CNI plugin that guards new pods until they are programmed,
//!   and its installation into the node's CNI config.
//! - [`logging`]: the agent's log (text or JSON lines on stdout, flow events included).
pub mod api;
pub mod capabilities;
pub mod cli;
pub mod cni;
pub mod crd;
pub mod datapath;
pub mod discovery;
pub mod explain;
pub mod logging;
pub mod policy;
pub mod runtime;
pub mod serve;
pub mod source;
pub mod tables;
