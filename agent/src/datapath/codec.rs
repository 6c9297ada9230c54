//! Conversions between the tables' types and the maps' keys and values.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rayfence_common::{Addr, Direction, EndpointInfo, NodePortKey, PolicyKey, endpoint_flags};

use crate::tables::{EndpointPolicy, NodePort, PolicyEntry};

pub fn addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn ip(addr: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// LPM key of a prefix: IPv4 lives at `::ffff:0:0/96`.
pub fn prefix(net: IpNet) -> (u32, Addr) {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => (96 + u32::from(v4.prefix_len()), addr(IpAddr::V4(v4.addr()))),
        IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.addr().octets()),
    }
}

/// The CIDR trie's barrier: `::ffff:0:0/96` maps to no identity so that an IPv6
/// prefix covering it (`::/0`) never answers for IPv4 peers.
pub fn v4_barrier() -> (u32, Addr) {
    (96, addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
}

pub fn net(prefix_len: u32, addr: Addr) -> Option<IpNet> {
    let v6 = Ipv6Addr::from(addr);
    if prefix_len >= 96
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Ipv4Net::new(v4, (prefix_len - 96) as u8)
            .ok()
            .map(IpNet::V4);
    }
    Ipv6Net::new(v6, prefix_len as u8).ok().map(IpNet::V6)
}

pub fn policy_key(row: &PolicyEntry) -> (u32, PolicyKey) {
    match row.protocol {
        None => (
            PolicyKey::ANY_PROTOCOL_BITS,
            PolicyKey::new(row.policy_id, row.identity, row.direction, 0, 0),
        ),
        Some(protocol) => (
            PolicyKey::ANY_PORT_BITS + u32::from(row.port_bits.min(16)),
            PolicyKey::new(
                row.policy_id,
                row.identity,
                row.direction,
                protocol,
                row.port,
            ),
        ),
    }
}

pub fn policy_row(prefix_len: u32, key: &PolicyKey) -> Option<PolicyEntry> {
    let direction = Direction::from_u8(key.direction)?;
    Some(if prefix_len < PolicyKey::ANY_PORT_BITS {
        PolicyEntry::any(key.policy_id(), direction, key.identity())
    } else {
        PolicyEntry {
            policy_id: key.policy_id(),
            direction,
            identity: key.identity(),
            protocol: Some(key.protocol),
            port: key.port(),
            port_bits: (prefix_len - PolicyKey::ANY_PORT_BITS) as u8,
        }
    })
}

pub fn flags(policy: &EndpointPolicy) -> u32 {
    let mut flags = 0;
    if policy.isolate_ingress {
        flags |= endpoint_flags::ISOLATE_INGRESS;
    }
    if policy.isolate_egress {
        flags |= endpoint_flags::ISOLATE_EGRESS;
    }
    if policy.audit {
        flags |= endpoint_flags::AUDIT;
    }
    flags
}

/// The policy an endpoint entry was written from, unless it is fail-closed (then
/// the next full apply rewrites it).
pub fn endpoint_policy(info: &EndpointInfo) -> Option<EndpointPolicy> {
    if info.flags & endpoint_flags::FAIL_CLOSED != 0 {
        return None;
    }
    Some(EndpointPolicy {
        policy_id: info.policy_id,
        isolate_ingress: info.flags & endpoint_flags::ISOLATE_INGRESS != 0,
        isolate_egress: info.flags & endpoint_flags::ISOLATE_EGRESS != 0,
        audit: info.flags & endpoint_flags::AUDIT != 0,
    })
}

pub fn node_port_key(port: &NodePort) -> NodePortKey {
    NodePortKey {
        protocol: port.protocol,
        _pad: 0,
        port: port.port,
    }
}

pub fn node_port(key: &NodePortKey) -> NodePort {
    NodePort {
        protocol: key.protocol,
        port: key.port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_round_trip_for_both_families() {
        for text in ["10.0.0.0/8", "0.0.0.0/0", "10.1.2.3/32", "fd00::/8", "::/0"] {
            let parsed: IpNet = text.parse().unwrap();
            let (len, key) = prefix(parsed);
            assert_eq!(net(len, key), Some(parsed), "{text}");
        }
        assert_eq!(prefix("10.0.0.0/8".parse().unwrap()).0, 104);
    }

    #[test]
    fn policy_rows_round_trip() {
        let rows = [
            PolicyEntry::any(3, Direction::Ingress, 300),
            PolicyEntry {
                policy_id: 3,
                direction: Direction::Egress,
                identity: 301,
                protocol: Some(6),
                port: 1024,
                port_bits: 6,
            },
        ];
        for row in rows {
            let (len, key) = policy_key(&row);
            assert_eq!(policy_row(len, &key), Some(row));
        }
    }
}
