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
//! - [`serve`]: `/metrics`, `/healthz`, `/readyz`.
pub mod capabilities;
pub mod crd;
pub mod datapath;
pub mod discovery;
pub mod policy;
pub mod runtime;
pub mod serve;
pub mod source;
pub mod tables;
