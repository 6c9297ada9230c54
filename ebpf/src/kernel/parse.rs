//! Header parsing: Ethernet (TC only), IPv4, IPv6 with a bounded walk over extension
//! headers, TCP/UDP/SCTP ports, ICMP/ICMPv6 (echo identifiers, the flow embedded in an
//! error). Only fixed-size loads, each checked against the packet's end (direct
//! reads of the linear area, `bpf_skb_load_bytes` otherwise): the verifier rejects
//! variable-length reads.
//!
//! Must not look anything up in maps: it only says what the packet is.
use core::mem::MaybeUninit;

use aya_ebpf::{bindings::__sk_buff, helpers::bpf_skb_load_bytes};
use rayfence_common::{Addr, Reason};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// Offsets up to which loads try direct packet access (bounds the verifier's range).
const MAX_DIRECT_OFFSET: u32 = 512;

/// IPv6 extension headers walked before giving up (each costs one load).
const MAX_IPV6_EXTENSIONS: usize = 6;

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The socket buffer of a TC or cgroup_skb program.
#[derive(Clone, Copy)]
pub struct Skb {
    skb: *mut __sk_buff,
}

impl Skb {
    #[inline(always)]
    pub fn new(skb: *mut __sk_buff) -> Self {
        Self { skb }
    }

    #[inline(always)]
    pub fn raw(&self) -> *mut __sk_buff {
        self.skb
    }

    /// A fixed-size load at `offset`; a short packet is malformed. Reads the linear
    /// part of the packet directly when it holds the bytes (no helper call), else
    /// asks `bpf_skb_load_bytes`, which also reaches paged data.
    #[inline(always)]
    fn load<T>(&self, offset: u32) -> Result<T, Reason> {
        // SAFETY: the context pointer is valid; data/data_end are packet pointers
        // the verifier checks every access against.
        let (data, data_end) =
            unsafe { ((*self.skb).data as usize, (*self.skb).data_end as usize) };
        if offset < MAX_DIRECT_OFFSET {
            let start = data + offset as usize;
            if start + size_of::<T>() <= data_end {
                // SAFETY: within [data, data_end), checked just above.
                return Ok(unsafe { (start as *const T).read_unaligned() });
            }
        }
        self.load_slow(offset)
    }

    #[inline(never)]
    fn load_slow<T>(&self, offset: u32) -> Result<T, Reason> {
        let mut value = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.skb.cast(),
                offset,
                value.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            )
        };
        if ret == 0 {
            // SAFETY: initialised by the helper above; T is plain old data.
            Ok(unsafe { value.assume_init() })
        } else {
            Err(Reason::Malformed)
        }
    }

    #[inline(always)]
    pub fn len(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's lifetime.
        unsafe { (*self.skb).len }
    }

    #[inline(always)]
    pub fn ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb).ifindex }
    }

    /// `skb->protocol` (the ethertype), host byte order.
    #[inline(always)]
    fn protocol(&self) -> u16 {
        // SAFETY: as above. The field holds a big-endian u16 in a u32.
        u16::from_be(unsafe { (*self.skb).protocol } as u16)
    }
}

/// Where the program sees the packet start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// TC: at the Ethernet header.
    L2,
    /// cgroup_skb: at the network header.
    L3,
}

/// Addresses and ports as on the wire (`src` sent it), ports in host order.
#[derive(Clone, Copy, Default)]
pub struct Flow {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Class {
    /// An ordinary packet: it belongs to a flow, or opens one.
    #[default]
    Plain,
    /// An ICMP error; [`Packet::inner`] is the flow quoted in it (as its original
    /// sender wrote it).
    IcmpError,
    /// A non-first fragment: no L4 header, ports must come from the fragment map.
    LaterFragment,
}

/// Filled in place by [`parse`] (the BPF stack is too small for copies).
/// Fragment fields are plain, not an `Option`: an uninitialised payload register
/// makes LLVM emit spills of undefined values, which the verifier rejects.
#[derive(Default)]
pub struct Packet {
    pub flow: Flow,
    pub class: Class,
    pub inner: Flow,
    /// Whether this is the first fragment of a fragmented datagram.
    pub is_first_fragment: bool,
    /// The datagram's fragment id (first or later fragments).
    pub fragment_id: u32,
    /// Where the transport header starts; 0 when the packet has none (a later
    /// fragment). Recorded, not read: only decisions off the established fast path
    /// load anything from it ([`tcp_flags_at`]).
    pub l4_offset: u32,
}

#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6Header {
    version_class_label: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: Addr,
    dst: Addr,
}

#[repr(C)]
struct Ipv6Fragment {
    next_header: u8,
    reserved: u8,
    offset_flags: u16,
    id: u32,
}

/// `::ffff:a.b.c.d`
#[inline(always)]
pub fn mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Parses the packet into `out`. `Err(LinkControl)` means "pass, it is
/// ARP/ND/MLD/IGMP"; other errors are the drop reason for an enforced direction.
/// Not inlined, and writing through `out`, to keep the caller's stack frame small.
#[inline(never)]
pub fn parse(skb: Skb, layer: Layer, out: &mut Packet) -> Result<(), Reason> {
    let (ethertype, l3) = match layer {
        Layer::L2 => (u16::from_be(skb.load::<u16>(12)?), 14),
        Layer::L3 => (skb.protocol(), 0),
    };
    match ethertype {
        ETH_P_IP => parse_ipv4(&skb, l3, out),
        ETH_P_IPV6 => parse_ipv6(&skb, l3, out),
        ETH_P_ARP => Err(Reason::LinkControl),
        _ => Err(Reason::UnsupportedL3),
    }
}

#[inline(always)]
fn parse_ipv4(skb: &Skb, l3: u32, out: &mut Packet) -> Result<(), Reason> {
    let ip: Ipv4Header = skb.load(l3)?;
    let ihl = u32::from(ip.version_ihl & 0x0f);
    if ip.version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Reason::Malformed);
    }
    if ip.protocol == IPPROTO_IGMP {
        return Err(Reason::LinkControl);
    }
    out.flow.src = mapped(ip.src);
    out.flow.dst = mapped(ip.dst);
    out.flow.protocol = ip.protocol;
    let frag = u16::from_be(ip.frag);
    out.fragment_id = u32::from(u16::from_be(ip.id));
    if frag & 0x1fff != 0 {
        out.class = Class::LaterFragment;
        return Ok(());
    }
    out.is_first_fragment = frag & 0x2000 != 0;
    parse_l4(skb, l3 + ihl * 4, out, false)
}

#[inline(always)]
fn parse_ipv6(skb: &Skb, l3: u32, out: &mut Packet) -> Result<(), Reason> {
    let ip: Ipv6Header = skb.load(l3)?;
    if ip.version_class_label[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    out.flow.src = ip.src;
    out.flow.dst = ip.dst;
    let mut next = ip.next_header;
    let mut offset = l3 + 40;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let ext: [u8; 2] = skb.load(offset)?;
                next = ext[0];
                offset += (u32::from(ext[1]) + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let ext: [u8; 2] = skb.load(offset)?;
                next = ext[0];
                offset += (u32::from(ext[1]) + 2) * 4;
            }
            44 => {
                let fragment: Ipv6Fragment = skb.load(offset)?;
                let offset_flags = u16::from_be(fragment.offset_flags);
                next = fragment.next_header;
                offset += 8;
                out.fragment_id = u32::from_be(fragment.id);
                if offset_flags & 0xfff8 != 0 {
                    out.flow.protocol = next;
                    out.class = Class::LaterFragment;
                    return Ok(());
                }
                out.is_first_fragment = offset_flags & 1 != 0;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        // More extension headers than we walk: we cannot find the ports.
        return Err(Reason::Malformed);
    }
    out.flow.protocol = next;
    parse_l4(skb, offset, out, true)
}

/// Fills the ports of `out.flow` (protocol already set) from the L4 header at `l4`,
/// and the quoted flow of an ICMP error.
#[inline(always)]
fn parse_l4(skb: &Skb, l4: u32, out: &mut Packet, v6: bool) -> Result<(), Reason> {
    out.l4_offset = l4;
    let flow = &mut out.flow;
    match flow.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            let ports: [u16; 2] = skb.load(l4)?;
            flow.src_port = u16::from_be(ports[0]);
            flow.dst_port = u16::from_be(ports[1]);
        }
        IPPROTO_ICMP if !v6 => {
            let icmp: [u8; 8] = skb.load(l4)?;
            match icmp[0] {
                // Echo reply / request: the identifier stands in for both ports.
                0 | 8 => {
                    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
                    flow.src_port = id;
                    flow.dst_port = id;
                }
                // Destination unreachable (incl. fragmentation needed), time
                // exceeded, parameter problem.
                3 | 11 | 12 => {
                    out.class = Class::IcmpError;
                    parse_embedded_ipv4(skb, l4 + 8, &mut out.inner)?;
                }
                _ => {}
            }
        }
        IPPROTO_ICMPV6 if v6 => {
            let icmp: [u8; 8] = skb.load(l4)?;
            match icmp[0] {
                128 | 129 => {
                    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
                    flow.src_port = id;
                    flow.dst_port = id;
                }
                // Destination unreachable, packet too big, time exceeded, parameter
                // problem.
                1..=4 => {
                    out.class = Class::IcmpError;
                    parse_embedded_ipv6(skb, l4 + 8, &mut out.inner)?;
                }
                // MLD (130-132, 143) and neighbour discovery (133-137).
                130..=137 | 143 => return Err(Reason::LinkControl),
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// The flags of the TCP header at `l4` ([`Packet::l4_offset`]); 0 (no flag) when
/// there is no header there or it cannot be read. Not part of [`parse`], so that
/// packets of established flows never pay the load.
#[inline(never)]
pub fn tcp_flags_at(skb: Skb, l4: u32) -> u8 {
    if l4 == 0 {
        return 0;
    }
    // Bytes 12 and 13 (data offset, flags): a one-byte load's bounds check
    // compiles to a comparison the verifier does not accept as a range.
    skb.load::<[u8; 2]>(l4 + 12).map_or(0, |bytes| bytes[1])
}

/// Ports of an embedded (quoted) header: only its first 8 bytes are guaranteed.
#[inline(always)]
fn embedded_ports(skb: &Skb, l4: u32, flow: &mut Flow, echo_protocol: u8) -> Result<(), Reason> {
    match flow.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            let ports: [u16; 2] = skb.load(l4)?;
            flow.src_port = u16::from_be(ports[0]);
            flow.dst_port = u16::from_be(ports[1]);
        }
        protocol if protocol == echo_protocol => {
            let icmp: [u8; 8] = skb.load(l4)?;
            let id = u16::from_be_bytes([icmp[4], icmp[5]]);
            flow.src_port = id;
            flow.dst_port = id;
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_embedded_ipv4(skb: &Skb, l3: u32, flow: &mut Flow) -> Result<(), Reason> {
    let ip: Ipv4Header = skb.load(l3)?;
    let ihl = u32::from(ip.version_ihl & 0x0f);
    if ip.version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Reason::Malformed);
    }
    flow.src = mapped(ip.src);
    flow.dst = mapped(ip.dst);
    flow.protocol = ip.protocol;
    embedded_ports(skb, l3 + ihl * 4, flow, IPPROTO_ICMP)
}

#[inline(always)]
fn parse_embedded_ipv6(skb: &Skb, l3: u32, flow: &mut Flow) -> Result<(), Reason> {
    let ip: Ipv6Header = skb.load(l3)?;
    if ip.version_class_label[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    // Extension headers in the quoted packet are not walked: such an error is not
    // recognised as related and is decided like any other ICMPv6 packet.
    flow.src = ip.src;
    flow.dst = ip.dst;
    flow.protocol = ip.next_header;
    embedded_ports(skb, l3 + 40, flow, IPPROTO_ICMPV6)
}
