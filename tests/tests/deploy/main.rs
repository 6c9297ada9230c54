//! deploy/ as a user applies it, no privilege needed: the Kustomize base and
//! overlays (through `kubectl kustomize`) and the Helm chart (through the kit's
//! small evaluator, `rayfence_tests::deploy::chart`) parse to their Kubernetes
//! types, pass the agent flags it accepts, and grant exactly what it needs. The
//! DaemonSet's capabilities, which need root, are checked in `agent_privileged`.

mod chart;
mod manifests;
mod rbac;
