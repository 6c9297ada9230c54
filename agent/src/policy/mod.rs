//! Policy engine: RayClusters, pods, namespaces, services (and optionally plain
//! NetworkPolicies) in, [`crate::tables::Tables`] and their diffs out.
//!
//! Pure: no I/O, no clock, no aya, no Kubernetes client.
