//! BPF_PROG_TEST_RUN on the loaded programs (aya's `TestRun`), for the unit tests and
//! the benchmark. For TC programs the kernel sets `skb->dev` from the context's
//! ifindex, which defaults to the loopback device (ifindex 1): register ifindex 1 as
//! the endpoint under test. Packets always start with an Ethernet header; for
//! cgroup_skb programs the kernel pulls it off, so they see L3 as on a real socket,
//! and the socket belongs to the calling thread's cgroup.
use std::time::Duration;

use aya::programs::{CgroupSkb, SchedClassifier, TestRun as _, TestRunOptions};

use super::{Datapath, DatapathError};

/// A program of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Host veth ingress: the pod's egress.
    TcIngress,
    /// Host veth egress: the pod's ingress.
    TcEgress,
    CgroupIngress,
    CgroupEgress,
    /// Pass-through classifier, the benchmark's floor.
    TcFloor,
}

impl Hook {
    pub const fn program(self) -> &'static str {
        match self {
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
            Self::CgroupIngress => "cgroup_skb_ingress",
            Self::CgroupEgress => "cgroup_skb_egress",
            Self::TcFloor => "tc_floor",
        }
    }

    const fn is_cgroup(self) -> bool {
        matches!(self, Self::CgroupIngress | Self::CgroupEgress)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value (TC: 0 pass, 2 drop; cgroup: 1 pass, 0 drop).
    pub return_value: u32,
    /// Whether the packet would have passed.
    pub passed: bool,
    /// Kernel-measured time per run (averaged over `repeat`).
    pub duration: Duration,
}

impl Datapath {
    /// Runs `hook` on `packet` (Ethernet frame) `repeat` times.
    pub fn test_run(
        &self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let program = hook.program();
        let options = TestRunOptions {
            data_in: Some(packet),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        };
        let found = self
            .ebpf()
            .program(program)
            .ok_or(DatapathError::MissingProgram { program })?;
        let result = if hook.is_cgroup() {
            let prog: &CgroupSkb = found
                .try_into()
                .map_err(|e| DatapathError::program(program, e))?;
            prog.test_run(options)
        } else {
            let prog: &SchedClassifier = found
                .try_into()
                .map_err(|e| DatapathError::program(program, e))?;
            prog.test_run(options)
        }
        .map_err(|e| DatapathError::program(program, e))?;
        let passed = if hook.is_cgroup() {
            result.return_value == 1
        } else {
            result.return_value == 0
        };
        Ok(TestRunOutcome {
            return_value: result.return_value,
            passed,
            duration: result.duration,
        })
    }
}
