//! The chained CNI plugin (`rayfence-cni`) that closes a new pod's network until the
//! agent has programmed it: [`plugin`] (the binary's logic; the kernel side is
//! [`crate::datapath::guard`]).
//!
//! Must not: run inside the agent process, or talk to the agent or the API server
//! (it must work while the agent is down, hung or starved).
pub mod plugin;
