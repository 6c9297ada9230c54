//! Datapath: loads rayfence's eBPF programs, attaches them to endpoints, pins
//! programs, maps and links, and applies [`crate::tables::Tables`] to the maps.
//!
//! The only module that uses aya. It knows nothing of Kubernetes.
