//! Kubernetes object builders, one place for every test and benchmark that makes
//! objects: [`typed`] on the real types (the policy engine's input: the policy tests,
//! the engine benchmark) and [`json`] as manifests and the fake API server carry
//! them (the end-to-end tests, the demo, the scale benchmark). Must not: decide or
//! assert anything.

pub mod json;
pub mod typed;
