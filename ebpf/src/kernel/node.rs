//! What counts as the node (docs/semantics.md "What counts as the node"): who is behind one of the node's own
//! addresses, for one flow of a local pod. Asked only off the established fast
//! path, for a new (or re-checked) flow whose peer address maps to
//! `identity::HOST`, and only on the TC hook (the host side of the pod's veth).
//!
//! - Egress to a node address on a port the node DNATs or a hostNetwork pod serves
//!   (`RF_NODEPORT`: a Service's `nodePort`, a local pod's `hostPort`, a local
//!   hostNetwork pod's declared port) is decided on that port's identity, whose rows
//!   the engine gives only where every backend, or that pod, is allowed; no ipBlock
//!   matches. Any other port of a node address is the node.
//! - Ingress: a packet the node generated still carries its socket. A socket in a
//!   pod cgroup is not the node: a known hostNetwork pod is its own identity
//!   (`RF_NODECG`; the flow is remembered in `RF_NODEFLOW` so the pod's side can be
//!   re-checked too), any other pod cgroup (`identity::OTHER_POD`, the kubelet's
//!   `kubepods` root) only its address. A socket in no pod cgroup is a host process:
//!   the node.
//! - Ingress that carries a node address but no socket was forwarded: the kernel's
//!   conntrack (a kfunc, from either side of the flow) gives its original source
//!   before the node's SNAT, and that source is the peer. With neither a socket nor a
//!   NAT record it is only an address (ipBlocks decide).
//!
//! The cgroup hook sits in the pod's own network namespace: it sees neither the
//! node's sockets nor its conntrack, so there a node address is an ordinary address
//! except for its node ports ([`node_port`], compiled, so the same on both hooks);
//! the caller does not ask [`classify`] there. The agent says so for every pod so
//! hooked.
//!
//! Cost: one hash lookup (egress), or a bounded cgroup walk, one conntrack lookup
//! and one hash lookup, on the first packet of a node flow only; the answer "the
//! node" is kept on the flow's conntrack entry (`ct_flags::NODE`).
use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_ANY, BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::map,
    maps::PerCpuArray,
};
use rayfence_common::{Addr, CtKey, Direction, NodePortKey, identity};

use crate::kernel::{
    endpoint::MAX_CGROUP_DEPTH,
    identity as ident, maps,
    parse::{IPPROTO_TCP, IPPROTO_UDP, Skb},
};

/// Where the original source address sits in the kernel's `struct nf_conn`
/// (`tuplehash[IP_CT_DIR_ORIGINAL].tuple.src.u3`), read from the running kernel's
/// BTF by the agent at load time; 0 when the kernel offers no conntrack lookup to
/// TC programs (then forwarded traffic is only an address: fail closed). Also the
/// switch for the kfunc calls below.
#[unsafe(no_mangle)]
static RF_NF_CONN_ORIGINAL_SRC: u32 = 0;

/// `struct bpf_ct_opts` as the kernel's conntrack kfuncs read it (the 12-byte size
/// every kernel since 6.0 accepts).
#[repr(C)]
pub struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}

/// The conntrack lookup's arguments and result, kept in a per-CPU map rather than
/// on the stack: this runs at the bottom of the deepest call chain, and the BPF
/// stack is 512 bytes for all of it.
#[repr(C)]
struct CtScratch {
    tuple: bpf_sock_tuple,
    opts: CtOpts,
    original: [u8; 16],
}

/// Per-CPU room for the kernel conntrack lookup; never pinned, never read by the
/// agent. Declared here, beside its only user, so `maps` depends on nothing.
#[map(name = "RF_CT_SCRATCH")]
static CT_SCRATCH: PerCpuArray<CtScratch> = PerCpuArray::with_max_entries(1, 0);

/// Opaque `struct nf_conn`.
#[repr(C)]
struct NfConn {
    _opaque: [u8; 0],
}

/// Placeholder call immediates the agent rewrites at load time into calls of the
/// kernel's conntrack kfuncs (`bpf_skb_ct_lookup`, `bpf_ct_release`, Linux 6.0+),
/// by their BTF ids in the running kernel (`datapath::kfuncs`). The toolchain emits
/// no BTF for extern functions, so the calls are written here by hand. Where the
/// kernel has no such kfunc the placeholders stay, behind `RF_NF_CONN_ORIGINAL_SRC
/// == 0`, which the verifier knows (a frozen read-only global) and prunes.
pub const KFUNC_CT_LOOKUP: u32 = 0x5246_4301;
pub const KFUNC_CT_RELEASE: u32 = 0x5246_4302;

/// `bpf_skb_ct_lookup(skb, tuple, tuple_size, opts, opts_size)`.
#[inline(always)]
unsafe fn ct_lookup(
    skb: *mut __sk_buff,
    tuple: *mut bpf_sock_tuple,
    tuple_size: u32,
    opts: *mut CtOpts,
) -> *mut NfConn {
    let ct: *mut NfConn;
    // SAFETY: a kfunc call under the BPF calling convention (r1-r5 arguments, r0
    // result, r1-r5 clobbered); the caller keeps the pointed-to memory alive.
    unsafe {
        core::arch::asm!(
            "call {id}",
            id = const KFUNC_CT_LOOKUP,
            inlateout("r1") skb => _,
            inlateout("r2") tuple => _,
            inlateout("r3") u64::from(tuple_size) => _,
            inlateout("r4") opts => _,
            inlateout("r5") size_of::<CtOpts>() as u64 => _,
            lateout("r0") ct,
        );
    }
    ct
}

/// `bpf_ct_release(ct)`.
#[inline(always)]
unsafe fn ct_release(ct: *mut NfConn) {
    // SAFETY: as in `ct_lookup`.
    unsafe {
        core::arch::asm!(
            "call {id}",
            id = const KFUNC_CT_RELEASE,
            inlateout("r1") ct => _,
            lateout("r0") _,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
}

/// Who is behind a node address for one flow.
pub enum NodePeer {
    /// A host process of the node: always allowed.
    Node,
    /// Someone else: decided by the policy rows of `exact` (`NONE`: none) and, if
    /// `by_address`, the CIDR identity of `addr`.
    Peer {
        exact: u32,
        addr: Addr,
        by_address: bool,
    },
}

impl NodePeer {
    /// Only the address: an ipBlock covering it may allow it.
    #[inline(always)]
    pub fn address(addr: Addr) -> Self {
        NodePeer::Peer {
            exact: identity::NONE,
            addr,
            by_address: true,
        }
    }
}

/// Who is behind the node address `key.peer` for the flow `key`, opened in
/// direction `origin`; `direction` is the current packet's. TC hook only: on the
/// cgroup hook a node address is only an address ([`NodePeer::address`]).
#[inline(never)]
pub fn classify(skb: Skb, key: &CtKey, origin: Direction, direction: Direction) -> NodePeer {
    if origin == Direction::Egress {
        return node_port(key).unwrap_or(NodePeer::Node);
    }
    if direction == Direction::Ingress {
        // Sent from the node side: a locally generated packet still has its socket.
        // SAFETY: the helper only reads the skb's socket.
        let own = unsafe { bpf_skb_cgroup_id(skb.raw()) };
        if own != 0 {
            return match skb_cgroup_class(skb, own) {
                identity::NONE => NodePeer::Node,
                identity::OTHER_POD => NodePeer::address(key.peer),
                pod => {
                    // So that the pod's side of the flow is re-checked as this pod.
                    let _ = maps::NODE_FLOWS.insert(key, &pod, u64::from(BPF_ANY));
                    NodePeer::Peer {
                        exact: pod,
                        addr: key.peer,
                        by_address: true,
                    }
                }
            };
        }
    }
    if let Some(source) = nat_original_source(skb, key) {
        let exact = match ident::exact(&source) {
            // Another of the node's addresses (a host process through a NodePort
            // is caught by its socket above): only an address.
            Some(identity::HOST) | None => identity::NONE,
            Some(id) => id,
        };
        return NodePeer::Peer {
            exact,
            addr: source,
            by_address: true,
        };
    }
    // SAFETY: plain data, copied out.
    if let Some(pod) = unsafe { maps::NODE_FLOWS.get(key) } {
        return NodePeer::Peer {
            exact: *pod,
            addr: key.peer,
            by_address: true,
        };
    }
    // Neither a socket of the node nor a NAT record: not the node's own.
    NodePeer::address(key.peer)
}

/// Egress to the node's address on a port it DNATs (or a hostNetwork pod serves):
/// decided on the port's identity alone, no ipBlock matches it.
#[inline(always)]
pub fn node_port(key: &CtKey) -> Option<NodePeer> {
    let port = NodePortKey {
        protocol: key.protocol,
        _pad: 0,
        port: key.peer_port,
    };
    // SAFETY: plain data, copied out.
    unsafe { maps::NODE_PORTS.get(&port) }.map(|id| NodePeer::Peer {
        exact: *id,
        addr: key.peer,
        by_address: false,
    })
}

/// The deepest registered cgroup at or above the sending socket's: a hostNetwork
/// pod's identity, `OTHER_POD`, or `NONE` (a host process).
#[inline(always)]
fn skb_cgroup_class(skb: Skb, own: u64) -> u32 {
    // SAFETY: plain data, copied out.
    if let Some(found) = unsafe { maps::NODE_CGROUPS.get(&own) } {
        return *found;
    }
    let mut class = identity::NONE;
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: the helper only reads the skb's socket; 0 past the deepest level.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb.raw(), level) };
        if id == 0 {
            break;
        }
        // SAFETY: plain data, copied out.
        if let Some(found) = unsafe { maps::NODE_CGROUPS.get(&id) } {
            class = *found;
        }
        if id == own {
            break;
        }
    }
    class
}

/// The flow's original source, when the node's conntrack has it NATed: the flow
/// was opened towards the node (the lookup hits its reply direction) and its
/// source was rewritten to the node's address.
#[inline(always)]
fn nat_original_source(skb: Skb, key: &CtKey) -> Option<Addr> {
    // SAFETY: a read of a global the agent wrote before loading (frozen).
    let offset = unsafe { core::ptr::read_volatile(&RF_NF_CONN_ORIGINAL_SRC) };
    if offset == 0 {
        return None;
    }
    let scratch = CT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by nothing else while this program runs.
    let scratch = unsafe { &mut *scratch };
    let size = sock_tuple(key, &mut scratch.tuple)?;
    scratch.opts = CtOpts {
        netns_id: BPF_F_CURRENT_NETNS,
        error: 0,
        l4proto: key.protocol,
        dir: 0,
        reserved: [0; 2],
    };
    // SAFETY: tuple and opts live in the map value for the call; the entry is
    // released below on every path. Only called with the offset set, i.e. when the
    // agent found the kfunc in the kernel's BTF.
    let ct = unsafe { ct_lookup(skb.raw(), &mut scratch.tuple, size, &mut scratch.opts) };
    if ct.is_null() {
        return None;
    }
    let at = (ct as usize + offset as usize) as *const u8;
    // SAFETY: reads kernel memory through the helper into the map value.
    let read = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            scratch.original.as_mut_ptr().cast(),
            16,
            at.cast(),
        )
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { ct_release(ct) };
    if read != 0 {
        return None;
    }
    let original = scratch.original;
    let source = if is_v4(&key.local) {
        let mut mapped = key.local;
        mapped[12] = original[0];
        mapped[13] = original[1];
        mapped[14] = original[2];
        mapped[15] = original[3];
        mapped
    } else {
        original
    };
    (source != key.peer).then_some(source)
}

#[inline(always)]
fn is_v4(addr: &Addr) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// The flow as a packet from the pod to the node carries it: the reply direction
/// of a flow the node NATed towards the pod. Written in place (the stack is
/// short); returns the tuple's size.
#[inline(always)]
fn sock_tuple(key: &CtKey, tuple: &mut bpf_sock_tuple) -> Option<u32> {
    if key.protocol != IPPROTO_TCP && key.protocol != IPPROTO_UDP {
        return None;
    }
    let sport = key.local_port.to_be();
    let dport = key.peer_port.to_be();
    // Fixed indices only: a computed one would bring a bounds check (and a panic
    // path the verifier rejects).
    let words = |a: &Addr| {
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    };
    if is_v4(&key.local) {
        tuple.__bindgen_anon_1 = bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: words(&key.local)[3],
                daddr: words(&key.peer)[3],
                sport,
                dport,
            },
        };
        // The size of the IPv4 member of the union.
        Some(12)
    } else {
        tuple.__bindgen_anon_1 = bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: words(&key.local),
                daddr: words(&key.peer),
                sport,
                dport,
            },
        };
        Some(36)
    }
}
