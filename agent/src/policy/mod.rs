//! Policy engine: RayClusters, pods, namespaces, services (and optionally plain
//! NetworkPolicies) in, [`crate::tables::Tables`] and their diffs out.
//!
//! Pure: no I/O, no clock, no aya, no Kubernetes client.
//!
//! Modules, one concern each:
//! - [`selector`]: label selectors.
//! - [`rule`]: the normalised allow rule and its parser from the NetworkPolicy types.
//! - [`raycluster`]: RayCluster isolation blocks to per-role rules with base flows.
//! - [`netpol`]: plain NetworkPolicies to the same rules.
//! - [`settings`]: node, operator, DNS and source settings.
//! - [`problem`]: bad-input reports.
//! - [`engine`]: the incremental engine that owns identities, policies and tables.
pub mod engine;
pub mod netpol;
mod output;
pub mod problem;
pub mod raycluster;
pub mod rule;
pub mod selector;
pub mod settings;

pub use engine::{EndpointMeta, Engine, Explanation, NamedPort, ObjectKey};
pub use problem::{ObjectRef, Problem, Severity};
pub use rule::{Role, RuleOrigin};
pub use settings::{DnsMode, Settings};
