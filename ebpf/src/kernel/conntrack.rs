//! The datapath's own conntrack: one LRU entry per flow and endpoint, keyed from the
//! endpoint's point of view so both directions hit it. The value carries the endpoint
//! generation the flow was last allowed under; the established path reads it and
//! writes nothing.
//!
//! Must not delete entries: a revoked flow's entry is what keeps it cut (see
//! `verdict`); entries leave only by LRU eviction when the map is full, or are
//! replaced by a new flow on the same tuple.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use rayfence_common::{CtKey, CtValue, Direction};

use crate::kernel::{maps, parse::Flow};

/// The flow of `flow` (a packet travelling in `direction`) as the endpoint sees it.
#[inline(always)]
pub fn key(endpoint_id: u32, direction: Direction, flow: &Flow) -> CtKey {
    match direction {
        Direction::Egress => CtKey {
            endpoint_id,
            local_port: flow.src_port,
            peer_port: flow.dst_port,
            protocol: flow.protocol,
            _pad: [0; 3],
            local: flow.src,
            peer: flow.dst,
        },
        Direction::Ingress => CtKey {
            endpoint_id,
            local_port: flow.dst_port,
            peer_port: flow.src_port,
            protocol: flow.protocol,
            _pad: [0; 3],
            local: flow.dst,
            peer: flow.src,
        },
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtValue> {
    maps::CONNTRACK.get_ptr_mut(key)
}

#[inline(always)]
pub fn create(key: &CtKey, generation: u32, origin: Direction, flags: u8) {
    let value = CtValue {
        generation,
        origin: origin as u8,
        flags,
        _pad: [0; 2],
        // SAFETY: no preconditions.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full LRU evicts the oldest entry; a failure here only means the next packet
    // is decided again, never that it passes unchecked.
    let _ = maps::CONNTRACK.insert(key, &value, u64::from(BPF_ANY));
}
