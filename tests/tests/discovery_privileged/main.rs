//! The agent's pod discovery against real kernel state, root only: link events from
//! a node namespace, and the locator finding each pod's veth and cgroup in
//! simulated nodes with kubelet cgroup trees (`rayfence_tests::discovery`), CRI-O's
//! among them.

mod events;
mod locate;
mod runtimes;
