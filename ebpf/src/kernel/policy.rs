//! Is a new flow allowed? At most two LPM lookups: the peer's exact identity, then
//! its CIDR identity. Port ranges are prefixes in the trie, so the cost does not
//! depend on the number of rules.
use aya_ebpf::maps::lpm_trie::Key;
use rayfence_common::{Addr, Direction, PolicyKey, identity::NONE};

use crate::kernel::{identity, maps};

#[inline(always)]
fn lookup(policy_id: u32, identity: u32, direction: Direction, protocol: u8, port: u16) -> bool {
    let key = Key::new(
        PolicyKey::FULL_BITS,
        PolicyKey::new(policy_id, identity, direction, protocol, port),
    );
    maps::POLICY.get(&key).is_some()
}

/// `exact` is the peer's exact identity (`NONE` if it has none); `address`, when
/// given, is matched by its CIDR identity too (a port the node DNATs is not: no
/// ipBlock matches it). A CIDR identity of `NONE` is the trie's IPv4 barrier: no
/// rows.
#[inline(always)]
pub fn allows(
    policy_id: u32,
    direction: Direction,
    exact: u32,
    address: Option<&Addr>,
    protocol: u8,
    port: u16,
) -> bool {
    if exact != NONE && lookup(policy_id, exact, direction, protocol, port) {
        return true;
    }
    match address.and_then(identity::cidr) {
        Some(id) if id != NONE => lookup(policy_id, id, direction, protocol, port),
        _ => false,
    }
}
