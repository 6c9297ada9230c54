//! `rayfence agent`: the node agent. Its flags ([`args`]), their checking into the
//! agent's configuration ([`config`]), and the start that wires sources, runtime
//! and HTTP listeners together ([`run`](mod@run)).
//!
//! Must not: hold agent logic (that is `rayfence::runtime`).
mod args;
mod config;
mod run;

pub(super) use args::AgentArgs;
pub(super) use run::run;

/// The target of the agent command's own log lines: the binary's name, as it has
/// always been (the default, these modules' paths, would change what `RUST_LOG`
/// directives and log collectors match).
const LOG_TARGET: &str = "rayfence";
