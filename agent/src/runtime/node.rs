//! This node's own addresses: those on the agent's network namespace's interfaces
//! (netlink) and those in the Node object's `status.addresses`.
//!
//! Must not: include loopback (node-local traffic never comes from it on a pod's
//! veth) or anything of another node.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use netlink_packet_route::address::AddressAttribute;

use crate::discovery::netlink::Rtnl;

/// Every non-loopback address of the agent's network namespace, sorted.
pub fn interface_addresses() -> Vec<IpAddr> {
    let messages = match Rtnl::in_current().and_then(|mut r| r.addresses()) {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(%error, "listing the node's interface addresses");
            return Vec::new();
        }
    };
    let mut out: Vec<IpAddr> = messages
        .iter()
        .flat_map(|m| {
            m.attributes.iter().filter_map(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The IP addresses in a Node's `status.addresses` (host names skipped).
pub fn node_object_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}
