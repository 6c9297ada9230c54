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
//! - [`runtime`]: the node agent's reconcile loop: sources -> engine -> datapath,
//!   endpoints; it also answers operator queries (`runtime::answers`).
//! - [`operator`]: what the agent tells its operator: metrics, health, flow events,
//!   Kubernetes Events, and the operator API's queries. A query's story:
//!   [`operator::wire`] (the wire types) -> [`operator::query`] (the channel to the
//!   loop, which answers) -> [`operator::explain`] (a flow's verdict on each side,
//!   from the engine's `policy::engine::explain`) -> [`serve`] (JSON) or
//!   [`cli`]'s `render` (for a person).
//! - [`serve`]: HTTP only: `/metrics`, `/healthz`, `/readyz` and `/v1/...` over TCP and
//!   the local socket, with their auth, TLS and limits.
//! - [`cli`]: the operator commands' client side (`status`, `explain`, `flows`).
//! - [`cni`]: the chained CNI plugin that guards new pods until they are programmed,
//!   and its installation into the node's CNI config.
//! - [`kubectl`]: the `kubectl rayfence` plugin: the operator commands over every
//!   node's agent, by exec into the agent pods through the API server, as the user.
//! - [`logging`]: the agent's log (text or JSON lines on stdout, flow events included).
pub mod capabilities;
pub mod cli;
pub mod cni;
pub mod crd;
pub mod datapath;
pub mod discovery;
pub mod kubectl;
pub mod logging;
pub mod operator;
pub mod policy;
pub mod runtime;
pub mod serve;
pub mod source;
pub mod tables;
