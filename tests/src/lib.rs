//! Test fixtures for rayfence: network namespaces, veths, bridges, cgroups and
//! traffic probes, each cleaned up on drop (also when a test panics).
