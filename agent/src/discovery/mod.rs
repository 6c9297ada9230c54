//! Pod discovery: where in the kernel a local pod lives, from kernel state alone.
//!
//! [`cgroup`]: the pod's cgroup v2 directory and id from its UID and QoS class.
//!
//! This module must not talk to the API server or a container runtime, must not
//! change any kernel state (links, routes, cgroups) and must not attach
//! programs: that is `datapath`'s job.

pub mod cgroup;
