//! Counters and flow events. Per-CPU counters need no atomics; flow events go to the
//! ring buffer under a per-CPU budget per second, and what is over budget (or finds
//! the ring full) is counted as lost.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use rayfence_common::{CounterKey, CounterValue, CtKey, Direction, FlowEvent, Reason, Verdict};

use crate::kernel::maps;

const WINDOW_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn count(endpoint_id: u32, direction: Direction, verdict: Verdict, reason: Reason, bytes: u32) {
    let key = CounterKey {
        endpoint_id,
        direction: direction as u8,
        verdict: verdict as u8,
        reason: reason as u8,
        _pad: 0,
    };
    if let Some(value) = maps::COUNTERS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot; programs do not migrate mid-run.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
        return;
    }
    let first = CounterValue {
        packets: 1,
        bytes: u64::from(bytes),
    };
    if maps::COUNTERS
        .insert(&key, &first, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(value) = maps::COUNTERS.get_ptr_mut(&key)
    {
        // Created by another CPU in between.
        // SAFETY: as above.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
    }
}

/// Sends a flow event if this CPU's budget allows.
#[inline(always)]
pub fn event(flow: &CtKey, direction: Direction, verdict: Verdict, reason: Reason, bytes: u32) {
    let limit = match maps::CONFIG.get(0) {
        Some(config) if config.events_per_second > 0 => config.events_per_second,
        _ => return,
    };
    let Some(budget) = maps::EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot.
    let budget = unsafe { &mut *budget };
    if now.wrapping_sub(budget.window_start_ns) >= WINDOW_NS {
        budget.window_start_ns = now;
        budget.emitted = 0;
    }
    if budget.emitted >= limit {
        budget.lost += 1;
        return;
    }
    let Some(mut entry) = maps::EVENTS.reserve::<FlowEvent>(0) else {
        budget.lost += 1;
        return;
    };
    entry.write(FlowEvent {
        timestamp_ns: now,
        endpoint_id: flow.endpoint_id,
        direction: direction as u8,
        verdict: verdict as u8,
        reason: reason as u8,
        protocol: flow.protocol,
        local: flow.local,
        peer: flow.peer,
        local_port: flow.local_port,
        peer_port: flow.peer_port,
        packet_len: bytes,
    });
    entry.submit(0);
    budget.emitted += 1;
}
