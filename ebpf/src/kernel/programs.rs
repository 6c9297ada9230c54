//! The programs' entry points, one per hook and direction: each finds the endpoint
//! and hands the packet to [`verdict::decide`]. Nothing is decided here.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use rayfence_common::Direction;

use crate::kernel::{
    endpoint,
    parse::{Layer, Skb},
    verdict,
};

/// cgroup_skb return values.
const CG_PASS: i32 = 1;
const CG_DROP: i32 = 0;

/// The packet is not ours to judge (no endpoint for this interface or cgroup).
struct NotOurs;

/// On the pod's host veth, ingress: packets the pod sends.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    try_tc(&ctx, Direction::Egress).unwrap_or(TC_ACT_OK)
}

/// On the pod's host veth, egress: packets to the pod.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    try_tc(&ctx, Direction::Ingress).unwrap_or(TC_ACT_OK)
}

#[cgroup_skb(ingress)]
pub fn cgroup_skb_ingress(ctx: SkBuffContext) -> i32 {
    try_cgroup(&ctx, Direction::Ingress).unwrap_or(CG_PASS)
}

#[cgroup_skb(egress)]
pub fn cgroup_skb_egress(ctx: SkBuffContext) -> i32 {
    try_cgroup(&ctx, Direction::Egress).unwrap_or(CG_PASS)
}

/// Passes everything and touches nothing: the benchmark's floor (the cost of the
/// hook and of BPF_PROG_TEST_RUN itself). Never attached by the agent.
#[classifier]
pub fn tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn try_tc(ctx: &TcContext, direction: Direction) -> Result<i32, NotOurs> {
    let skb = Skb::new(ctx.as_ptr().cast());
    let endpoint = endpoint::by_ifindex(&skb).ok_or(NotOurs)?;
    Ok(if verdict::decide(skb, Layer::L2, &endpoint, direction) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    })
}

#[inline(always)]
fn try_cgroup(ctx: &SkBuffContext, direction: Direction) -> Result<i32, NotOurs> {
    let skb = Skb::new(ctx.as_ptr().cast());
    let endpoint = endpoint::by_cgroup(&skb).ok_or(NotOurs)?;
    Ok(if verdict::decide(skb, Layer::L3, &endpoint, direction) {
        CG_PASS
    } else {
        CG_DROP
    })
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
