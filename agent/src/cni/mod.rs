//! The chained CNI plugin `rayfence-cni`: how it is installed into and removed from
//! a node's CNI configuration ([`install`]).
pub mod install;
