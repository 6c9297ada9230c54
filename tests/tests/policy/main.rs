//! The policy engine's semantics, no privilege needed: the compiled tables decided
//! through `Tables::allows` (the datapath's lookup semantics) against docs/semantics.md,
//! the upstream NetworkPolicy e2e cases, and an independent reference evaluator.
//! Object builders and verdict helpers come from the kit (`rayfence_tests::objects`,
//! `rayfence_tests::policy`); the assertions live in the modules.
//!
//! - [`semantics`]: table tests for docs/semantics.md and the example manifests
//!   (`fixtures/`).
//! - [`netpol_e2e`]: the upstream Kubernetes NetworkPolicy e2e cases as truth tables.
//! - [`property`]: property tests against the reference evaluator and a fresh full
//!   compile (its regressions in `property.proptest-regressions`).

mod netpol_e2e;
mod property;
mod semantics;
