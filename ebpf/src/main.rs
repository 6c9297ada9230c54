//! rayfence's eBPF programs. Thin entry points per hook and direction; the decision
//! logic lives in the modules of [`kernel`], which exist only for the BPF target.
//!
//! Direction is always the pod's: TC ingress on the pod's host-side veth sees what
//! the pod sends (pod egress), TC egress what it receives (pod ingress). cgroup_skb
//! hooks sit on the pod's own sockets, so their direction is the pod's directly.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Hand-written kfunc calls (see `kernel::node`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

// The programs and their library: the BPF target only.
#[cfg(target_arch = "bpf")]
mod kernel;

// On the host the crate is an empty binary, so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
