//! The chained CNI plugin (`rayfence-cni`) that closes a new pod's network until the
//! agent has programmed it: [`plugin`] (the binary's logic; the kernel side is
//! [`crate::datapath::guard`]) and [`install`] (how the agent puts it into, and
//! `rayfence cleanup` takes it out of, a node's CNI configuration).
//!
//! Must not: run the plugin inside the agent process, or have it talk to the agent or
//! the API server (it must work while the agent is down, hung or starved).
pub mod install;
pub mod plugin;
