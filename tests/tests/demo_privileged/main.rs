//! The demo (`cargo xtask demo`) as tests, root only: its scenario with and without
//! the agent, and its set-up on a machine with no bpf filesystem mounted.

mod bpffs_unmounted;
mod scenario;
