//! Peer address -> identity: the exact map (pods, node addresses, ClusterIPs) and the
//! CIDR trie (ipBlocks, `except` already folded in by the engine). One lookup each.
use aya_ebpf::maps::lpm_trie::Key;
use rayfence_common::Addr;

use crate::kernel::maps;

#[inline(always)]
pub fn exact(addr: &Addr) -> Option<u32> {
    // SAFETY: plain data, copied out.
    unsafe { maps::IDENTITIES.get(addr) }.copied()
}

#[inline(always)]
pub fn cidr(addr: &Addr) -> Option<u32> {
    maps::CIDRS.get(&Key::new(128, *addr)).copied()
}
