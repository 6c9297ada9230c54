//! A small packet builder for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 + TCP/UDP/ICMP
//! with correct lengths (checksums are not needed: the datapath never reads them).
//! Shared by the datapath tests and the datapath benchmark. Must not: load or run
//! anything.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// IPv4 header + payload; `frag` is the flags/fragment-offset field.
pub fn ipv4_packet(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("ipv4_packet needs IPv4 addresses");
    };
    let total = (20 + payload.len()) as u16;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&frag.to_be_bytes());
    packet.extend_from_slice(&[64, protocol, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// IPv6 header + payload, `next` the first next-header value.
pub fn ipv6_packet(src: IpAddr, dst: IpAddr, next: u8, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (src, dst) else {
        panic!("ipv6_packet needs IPv6 addresses");
    };
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[next, 64]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    packet.extend_from_slice(payload);
    packet
}

/// An IP packet of the family of `src` (no Ethernet header).
pub fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    match src {
        IpAddr::V4(_) => ipv4_packet(src, dst, protocol, 1, 0, payload),
        IpAddr::V6(_) => ipv6_packet(src, dst, protocol, payload),
    }
}

pub fn frame_of(ip_packet: &[u8]) -> Vec<u8> {
    let ethertype = if ip_packet.first().is_some_and(|b| b >> 4 == 6) {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    ethernet(ethertype, ip_packet)
}

pub fn tcp_header(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(&src_port.to_be_bytes());
    header.extend_from_slice(&dst_port.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    header
}

pub fn udp_datagram(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst_port.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    datagram
}

/// ICMP or ICMPv6 header with the 4-byte rest-of-header (`id`, `seq` for echo).
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend_from_slice(&rest);
    message.extend_from_slice(payload);
    message
}

pub fn echo_rest(id: u16) -> [u8; 4] {
    let id = id.to_be_bytes();
    [id[0], id[1], 0, 1]
}

/// A TCP segment as a full frame.
pub fn tcp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Vec<u8> {
    frame_of(&ip_packet(
        ip(src),
        ip(dst),
        TCP,
        &tcp_header(src_port, dst_port),
    ))
}

pub fn udp(src: &str, src_port: u16, dst: &str, dst_port: u16) -> Vec<u8> {
    frame_of(&ip_packet(
        ip(src),
        ip(dst),
        UDP,
        &udp_datagram(src_port, dst_port, b"x"),
    ))
}

/// ICMP(v6) echo request (`reply: false`) or reply.
pub fn echo(src: &str, dst: &str, id: u16, reply: bool) -> Vec<u8> {
    let (source, destination) = (ip(src), ip(dst));
    let (protocol, kind) = match (source, reply) {
        (IpAddr::V4(_), false) => (ICMP, 8),
        (IpAddr::V4(_), true) => (ICMP, 0),
        (IpAddr::V6(_), false) => (ICMPV6, 128),
        (IpAddr::V6(_), true) => (ICMPV6, 129),
    };
    frame_of(&ip_packet(
        source,
        destination,
        protocol,
        &icmp_message(kind, 0, echo_rest(id), b"ping"),
    ))
}

/// An ICMP(v6) error from `src` to `dst` quoting the start of `quoted` (an IP
/// packet without Ethernet header).
pub fn icmp_error(src: &str, dst: &str, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let (source, destination) = (ip(src), ip(dst));
    let protocol = if source.is_ipv4() { ICMP } else { ICMPV6 };
    let quote_len = quoted.len().min(if source.is_ipv4() { 28 } else { 48 });
    let rest = if kind == 3 && code == 4 {
        [0, 0, 0x05, 0xdc]
    } else {
        [0, 0, 0x05, 0x00]
    };
    frame_of(&ip_packet(
        source,
        destination,
        protocol,
        &icmp_message(kind, code, rest, &quoted[..quote_len]),
    ))
}

/// A minimal ARP request.
pub fn arp() -> Vec<u8> {
    let mut body = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    body.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 0, 0, 8]);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 7]);
    ethernet(ETH_P_ARP, &body)
}
