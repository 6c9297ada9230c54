//! The eBPF datapath, root only (it loads programs): crafted packets through
//! BPF_PROG_TEST_RUN and real traffic between network namespaces. Packet builders
//! come from the kit (`rayfence_tests::packet`), namespaces and probes too.
//!
//! - [`programs`]: one behaviour of the programs per test, private unpinned maps.
//! - [`contract`]: the programs' verdicts equal `Tables::allows` on random tables.
//! - [`guard`]: the CNI guard's entry through the agent's pins.
//! - [`traffic`]: the programs attached by `Datapath` on real TCP, UDP and ICMP.

mod contract;
mod guard;
mod programs;
mod traffic;
