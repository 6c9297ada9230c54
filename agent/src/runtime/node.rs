//! This node's own addresses: those on the agent's network namespace's interfaces
//! (netlink) and those in the Node object's `status.addresses`.
//!
//! Must not: include loopback (node-local traffic never comes from it on a pod's
//! veth), anything of another node, or a Service's address that a service proxy
//! bound to a dummy device of the node ([`SERVICE_ADDRESS_DEVICES`]): those are
//! local addresses of the node's stack but lead to a Service's backends, and must
//! keep the Service's identity, not the node's.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};

use crate::discovery::netlink::{LinkFacts, Rtnl};

/// Dummy devices that hold Service addresses, not the node's: kube-proxy's IPVS
/// mode binds every ClusterIP (and external and load-balancer IP) to `kube-ipvs0`
/// so that IPVS sees them as local; kube-router's service proxy does the same on
/// `kube-dummy-if`.
pub const SERVICE_ADDRESS_DEVICES: &[&str] = &["kube-ipvs0", "kube-dummy-if"];

/// Every non-loopback address of the agent's network namespace, sorted, except
/// those on [`SERVICE_ADDRESS_DEVICES`].
pub fn interface_addresses() -> Vec<IpAddr> {
    let dumps = Rtnl::in_current().and_then(|mut r| Ok((r.links()?, r.addresses()?)));
    let (links, messages) = match dumps {
        Ok(dumps) => dumps,
        Err(error) => {
            tracing::warn!(%error, "listing the node's interface addresses");
            return Vec::new();
        }
    };
    let service_devices: Vec<u32> = links
        .iter()
        .map(LinkFacts::from_message)
        .filter(|l| SERVICE_ADDRESS_DEVICES.contains(&l.name.as_str()))
        .map(|l| l.ifindex)
        .collect();
    own_addresses(&messages, &service_devices)
}

/// The addresses of `messages`, sorted and deduplicated, without loopback and
/// without those on the links `service_devices`.
fn own_addresses(messages: &[AddressMessage], service_devices: &[u32]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = messages
        .iter()
        .filter(|m| !service_devices.contains(&m.header.index))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn address(ifindex: u32, ip: &str) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = ifindex;
        let ip: IpAddr = ip.parse().expect("ip");
        m.attributes.push(AddressAttribute::Address(ip));
        m.attributes.push(AddressAttribute::Local(ip));
        m
    }

    #[test]
    fn cluster_ips_on_kube_ipvs0_are_not_the_node() {
        // lo 1, eth0 2, cni0 3, kube-ipvs0 4 (IPVS mode: every ClusterIP bound there).
        let messages = [
            address(1, "127.0.0.1"),
            address(1, "::1"),
            address(2, "10.0.0.1"),
            address(2, "fd00:10::1"),
            address(3, "10.244.0.1"),
            address(4, "10.96.0.1"),
            address(4, "10.96.0.10"),
            address(4, "fd00:10:96::a"),
        ];
        let want: Vec<IpAddr> = ["10.0.0.1", "10.244.0.1", "fd00:10::1"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(own_addresses(&messages, &[4]), want);
        // Without such a device every address but loopback is the node's.
        assert_eq!(own_addresses(&messages, &[]).len(), 6);
    }
}
