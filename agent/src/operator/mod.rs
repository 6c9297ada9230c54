//! What the agent tells the people who run it, and the shapes it says it in:
//! metrics, the probes' health, the operator queries and their answers, flow
//! events, and Kubernetes Events about bad input.
//!
//! The story of a query (`rayfence explain`, `/v1/explain`):
//! - [`wire`]: the wire types, what `/v1/status`, `/v1/explain` and `/v1/flows`
//!   answer and what the commands read;
//! - [`query`]: the channel the question travels on, from the server to the
//!   reconcile loop; the loop answers it (`runtime::answers`), from one
//!   consistent state;
//! - [`explain`]: how a flow's verdict is explained, on each side, from the
//!   engine's rows (the engine's own `policy::engine::explain` says why one
//!   side of one pod gets its verdict);
//! - the server (`serve`) encodes the answer as JSON; the commands
//!   (`cli::render`) print it for a person.
//!
//! Beside it: [`metrics`] (one registry; callers say what happened, it picks the
//! series and labels; [`exposition`] is the format a scrape asks for; `process`
//! the standard `process_*` series), [`health`] (liveness and readiness for the probes),
//! [`flows`] (the datapath's flow events named, limited, logged, and kept for
//! `/v1/flows`), [`events`] (bad input posted as Kubernetes Events).
//!
//! Must not: program anything or serve HTTP. The runtime writes here and the
//! server reads here; nothing here reaches back into either.
pub mod events;
pub mod explain;
pub mod exposition;
pub mod flows;
pub mod health;
pub mod metrics;
mod process;
pub mod query;
pub mod wire;
