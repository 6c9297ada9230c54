//! Empty on purpose: the programs are the `rayfence-datapath` binary (`main.rs`).
//!
//! The agent lists this crate as a build-dependency so that cargo knows the agent's
//! build script (which builds the binary for bpfel with aya-build) depends on it;
//! cargo ignores a dependency without a library target, with a warning on every
//! command. aya-template does the same.
#![no_std]
