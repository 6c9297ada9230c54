//! IP fragments: only the first fragment of a datagram carries its ports, so the ports
//! of an allowed first fragment are remembered (LRU, keyed by endpoint, fragment id,
//! protocol and addresses) and lent to the later fragments of the same datagram. A
//! later fragment whose first was never allowed has no ports and no flow: the verdict
//! drops it where the direction is isolated (`fragment-unknown`). The model is
//! Cilium's `bpf/lib/ipfrag.h`. Must not decide anything itself.
use rayfence_common::{FragKey, FragValue};

use crate::kernel::{maps, parse::Flow};

#[inline(always)]
fn key(endpoint_id: u32, id: u32, flow: &Flow) -> FragKey {
    FragKey {
        endpoint_id,
        id,
        protocol: flow.protocol,
        _pad: [0; 3],
        src: flow.src,
        dst: flow.dst,
    }
}

/// Fills a later fragment's ports from its first fragment; `false` if unknown.
#[inline(never)]
pub fn fill_ports(endpoint_id: u32, id: u32, flow: &mut Flow) -> bool {
    // SAFETY: plain data, copied out.
    match unsafe { maps::FRAGMENTS.get(&key(endpoint_id, id, flow)) } {
        Some(ports) => {
            flow.src_port = ports.src_port;
            flow.dst_port = ports.dst_port;
            true
        }
        None => false,
    }
}

/// Remembers an allowed first fragment's ports for the fragments that follow it.
#[inline(never)]
pub fn remember(endpoint_id: u32, id: u32, flow: &Flow) {
    let ports = FragValue {
        src_port: flow.src_port,
        dst_port: flow.dst_port,
    };
    // A full LRU evicts the oldest datagram: its later fragments are then dropped as
    // unknown, never passed.
    let _ = maps::FRAGMENTS.insert(&key(endpoint_id, id, flow), &ports, 0);
}
