//! deploy/ as a user applies it, no privilege needed: the Kustomize base and
//! overlays (through `kubectl kustomize`) and the Helm chart (through the kit's
//! small evaluator, `rayfence_tests::deploy::chart`) parse to their Kubernetes
//! types and pass the agent flags and settings it accepts. What needs the running
//! agent (its RBAC, its capabilities) is in `deploy_privileged`.

mod chart;
mod manifests;
mod monitoring;
