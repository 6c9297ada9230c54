//! The desired datapath state: what the policy engine computes and the datapath
//! applies. Plain data with a diff; no I/O, no aya.
//!
//! Contract between `policy` (producer) and `datapath` (consumer):
//! - `endpoints`: per local pod (by the engine's [`EndpointId`]), its policy id and
//!   which directions are isolated. Where the pod is attached (veth ifindex, cgroup)
//!   is the agent's business, not the engine's.
//! - `addresses`: exact addresses (pod IPs, the node's own addresses as
//!   [`identity::HOST`], Service ClusterIPs) to identities. A hostNetwork pod's
//!   address is its node's and is never entered for it: on this node the datapath
//!   knows it by its cgroup ([`Tables::allows_identified`]).
//! - `cidrs`: ipBlock prefixes to identities of the *set of ipBlocks* containing the
//!   prefix; the longest match for an address gives exactly the blocks it is in, so
//!   `except` needs no special casing in the datapath.
//! - `policy`: allowed (policy, direction, peer identity, protocol, port prefix)
//!   rows, already split into LPM prefixes; presence means allowed.
//! - `node_ports`: ports the node DNATs elsewhere on every one of its addresses (a
//!   Service's `nodePort`, a local pod's `hostPort`) to the identity egress to a node
//!   address on that port is decided on (docs/semantics.md "What counts as the node": by the backends, as for a
//!   ClusterIP). The engine gives that identity rows only where every backend is
//!   allowed; a port two sources claim maps to an identity with no rows.
//!
//! A packet is allowed when a row matches the peer's exact identity or its CIDR
//! identity. A rule with no peers is expressed by the engine as the ipBlocks
//! `0.0.0.0/0` and `::/0`.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
pub use rayfence_common::{Direction, identity};

/// A local pod, for its lifetime. Allocated by the policy engine.
pub type EndpointId = u32;
/// A policy table shared by local pods whose compiled policy is identical.
pub type PolicyId = u32;
/// A peer identity; see [`identity`] for the reserved ones.
pub type IdentityId = u32;

/// IANA protocol numbers the policy can name.
pub mod protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// What the datapath must know about one local pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPolicy {
    pub policy_id: PolicyId,
    pub isolate_ingress: bool,
    pub isolate_egress: bool,
    /// Evaluate and count, do not drop.
    pub audit: bool,
}

/// One allowed row of the policy table: an LPM prefix over (protocol, port).
///
/// `protocol: None` allows every protocol and port (a NetworkPolicy rule without
/// ports); otherwise `port`/`port_bits` is an aligned prefix of the port space
/// (`port_bits: 0` is every port of that protocol, 16 one port). Build rows for a
/// range with [`PolicyEntry::for_port_range`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntry {
    pub policy_id: PolicyId,
    pub direction: Direction,
    pub identity: IdentityId,
    pub protocol: Option<u8>,
    pub port: u16,
    pub port_bits: u8,
}

impl PolicyEntry {
    /// Every protocol and port to/from `identity`.
    pub fn any(policy_id: PolicyId, direction: Direction, identity: IdentityId) -> Self {
        Self {
            policy_id,
            direction,
            identity,
            protocol: None,
            port: 0,
            port_bits: 0,
        }
    }

    /// The rows that allow `protocol` on ports `start..=end` (at most 30).
    pub fn for_port_range(
        policy_id: PolicyId,
        direction: Direction,
        identity: IdentityId,
        protocol: u8,
        start: u16,
        end: u16,
    ) -> impl Iterator<Item = Self> {
        rayfence_common::port_range_prefixes(start, end).map(move |(port, port_bits)| Self {
            policy_id,
            direction,
            identity,
            protocol: Some(protocol),
            port,
            port_bits,
        })
    }

    /// Whether this row allows `protocol`/`port` (the datapath's LPM semantics).
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        match self.protocol {
            None => true,
            Some(p) if p != protocol => false,
            Some(_) => {
                let shift = 16 - u32::from(self.port_bits);
                shift == 16 || (u32::from(port) >> shift) == (u32::from(self.port) >> shift)
            }
        }
    }
}

/// A port the node rewrites to somewhere else, on any of its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePort {
    pub protocol: u8,
    pub port: u16,
}

/// The whole desired state. `BTree*` so diffs and dumps are deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub endpoints: BTreeMap<EndpointId, EndpointPolicy>,
    pub addresses: BTreeMap<IpAddr, IdentityId>,
    pub cidrs: BTreeMap<IpNet, IdentityId>,
    pub policy: BTreeSet<PolicyEntry>,
    pub node_ports: BTreeMap<NodePort, IdentityId>,
}

/// The change from one [`Tables`] to another. Apply order that never opens a gap:
/// upserts before removals; a removal that can revoke flows is followed by a
/// generation bump of the endpoints it touches (the datapath's job).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TablesDiff {
    pub endpoints_upsert: BTreeMap<EndpointId, EndpointPolicy>,
    pub endpoints_remove: BTreeSet<EndpointId>,
    pub addresses_upsert: BTreeMap<IpAddr, IdentityId>,
    pub addresses_remove: BTreeSet<IpAddr>,
    pub cidrs_upsert: BTreeMap<IpNet, IdentityId>,
    pub cidrs_remove: BTreeSet<IpNet>,
    pub policy_add: BTreeSet<PolicyEntry>,
    pub policy_remove: BTreeSet<PolicyEntry>,
    pub node_ports_upsert: BTreeMap<NodePort, IdentityId>,
    pub node_ports_remove: BTreeSet<NodePort>,
}

impl TablesDiff {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Whether applying this diff can take away something that allowed a flow
    /// (then established flows must be re-checked).
    pub fn may_revoke(&self) -> bool {
        !self.policy_remove.is_empty()
            || !self.addresses_remove.is_empty()
            || !self.addresses_upsert.is_empty()
            || !self.cidrs_remove.is_empty()
            || !self.cidrs_upsert.is_empty()
            || !self.endpoints_upsert.is_empty()
            || !self.node_ports_upsert.is_empty()
            || !self.node_ports_remove.is_empty()
    }

    /// Folds `later` into `self`, as if both had been applied in order.
    pub fn merge(&mut self, later: TablesDiff) {
        fn fold<K: Ord, V>(
            upsert: &mut BTreeMap<K, V>,
            remove: &mut BTreeSet<K>,
            later_upsert: BTreeMap<K, V>,
            later_remove: BTreeSet<K>,
        ) {
            for key in later_remove {
                upsert.remove(&key);
                remove.insert(key);
            }
            for (key, value) in later_upsert {
                remove.remove(&key);
                upsert.insert(key, value);
            }
        }
        fold(
            &mut self.endpoints_upsert,
            &mut self.endpoints_remove,
            later.endpoints_upsert,
            later.endpoints_remove,
        );
        fold(
            &mut self.addresses_upsert,
            &mut self.addresses_remove,
            later.addresses_upsert,
            later.addresses_remove,
        );
        fold(
            &mut self.cidrs_upsert,
            &mut self.cidrs_remove,
            later.cidrs_upsert,
            later.cidrs_remove,
        );
        fold(
            &mut self.node_ports_upsert,
            &mut self.node_ports_remove,
            later.node_ports_upsert,
            later.node_ports_remove,
        );
        for entry in later.policy_remove {
            if !self.policy_add.remove(&entry) {
                self.policy_remove.insert(entry);
            }
        }
        for entry in later.policy_add {
            if !self.policy_remove.remove(&entry) {
                self.policy_add.insert(entry);
            }
        }
    }
}

impl Tables {
    /// What turns `self` into `desired`.
    pub fn diff(&self, desired: &Tables) -> TablesDiff {
        fn map_diff<K: Ord + Clone, V: PartialEq + Clone>(
            current: &BTreeMap<K, V>,
            desired: &BTreeMap<K, V>,
        ) -> (BTreeMap<K, V>, BTreeSet<K>) {
            let upsert = desired
                .iter()
                .filter(|(key, value)| current.get(*key) != Some(*value))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            let remove = current
                .keys()
                .filter(|key| !desired.contains_key(*key))
                .cloned()
                .collect();
            (upsert, remove)
        }
        let (endpoints_upsert, endpoints_remove) = map_diff(&self.endpoints, &desired.endpoints);
        let (addresses_upsert, addresses_remove) = map_diff(&self.addresses, &desired.addresses);
        let (cidrs_upsert, cidrs_remove) = map_diff(&self.cidrs, &desired.cidrs);
        let (node_ports_upsert, node_ports_remove) =
            map_diff(&self.node_ports, &desired.node_ports);
        TablesDiff {
            endpoints_upsert,
            endpoints_remove,
            addresses_upsert,
            addresses_remove,
            cidrs_upsert,
            cidrs_remove,
            policy_add: desired.policy.difference(&self.policy).copied().collect(),
            policy_remove: self.policy.difference(&desired.policy).copied().collect(),
            node_ports_upsert,
            node_ports_remove,
        }
    }

    /// Applies `diff` to this userspace copy.
    pub fn apply(&mut self, diff: &TablesDiff) {
        for (id, policy) in &diff.endpoints_upsert {
            self.endpoints.insert(*id, *policy);
        }
        for id in &diff.endpoints_remove {
            self.endpoints.remove(id);
        }
        for (addr, identity) in &diff.addresses_upsert {
            self.addresses.insert(*addr, *identity);
        }
        for addr in &diff.addresses_remove {
            self.addresses.remove(addr);
        }
        for (net, identity) in &diff.cidrs_upsert {
            self.cidrs.insert(*net, *identity);
        }
        for net in &diff.cidrs_remove {
            self.cidrs.remove(net);
        }
        self.policy.extend(diff.policy_add.iter().copied());
        for entry in &diff.policy_remove {
            self.policy.remove(entry);
        }
        for (port, identity) in &diff.node_ports_upsert {
            self.node_ports.insert(*port, *identity);
        }
        for port in &diff.node_ports_remove {
            self.node_ports.remove(port);
        }
    }

    /// The verdict these tables give a new flow, computed the way the datapath does
    /// (exact identity, then longest-prefix CIDR identity). Used by tests and by
    /// `explain` to check the engine against the datapath's lookup semantics.
    pub fn allows(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.verdict(endpoint, direction, peer, None, protocol, port)
    }

    /// The verdict for a new flow whose peer the datapath knows by its socket's cgroup
    /// (`RF_NODECG`: a hostNetwork pod of this node, or [`identity::OTHER_POD`]) rather
    /// than by its address `peer` (one of the node's): `peer_identity`'s rows, or an
    /// ipBlock's rows for `peer` (docs/semantics.md "What counts as the node": a hostNetwork pod is a peer with its own
    /// labels, and its node's address for ipBlocks). Egress to a port in `node_ports`
    /// is still decided on that port's identity: the node rewrites it before any
    /// socket is involved.
    pub fn allows_identified(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        peer_identity: IdentityId,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.verdict(
            endpoint,
            direction,
            peer,
            Some(peer_identity),
            protocol,
            port,
        )
    }

    /// [`Self::allows`] and [`Self::allows_identified`]: `identified` replaces the
    /// address's exact identity (behind a node address: someone other than the node).
    fn verdict(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peer: IpAddr,
        identified: Option<IdentityId>,
        protocol: u8,
        port: u16,
    ) -> bool {
        let Some(endpoint) = self.endpoints.get(&endpoint) else {
            return false;
        };
        let isolated = match direction {
            Direction::Ingress => endpoint.isolate_ingress,
            Direction::Egress => endpoint.isolate_egress,
        };
        if !isolated {
            return true;
        }
        let peer = canonical(peer);
        let exact = self.addresses.get(&peer).copied();
        if exact == Some(identity::HOST) {
            // Egress to a port the node DNATs is decided on its backends' identity
            // alone (no ipBlock matches it); any other node traffic from the node's
            // own host processes (what the datapath finds by socket) is allowed.
            if direction == Direction::Egress
                && let Some(id) = self.node_ports.get(&NodePort { protocol, port })
            {
                return self.row_allows(endpoint.policy_id, direction, *id, protocol, port);
            }
            if identified.is_none() {
                return true;
            }
        }
        let cidr = self.longest_cidr_identity(peer);
        [identified.or(exact), cidr]
            .into_iter()
            .flatten()
            .any(|peer_identity| {
                self.row_allows(endpoint.policy_id, direction, peer_identity, protocol, port)
            })
    }

    /// Whether a row of `policy_id` allows `protocol`/`port` to/from `peer_identity`.
    fn row_allows(
        &self,
        policy_id: PolicyId,
        direction: Direction,
        peer_identity: IdentityId,
        protocol: u8,
        port: u16,
    ) -> bool {
        let start = PolicyEntry::any(policy_id, direction, peer_identity);
        self.policy
            .range(start..)
            .take_while(|row| {
                row.policy_id == policy_id
                    && row.direction == direction
                    && row.identity == peer_identity
            })
            .any(|row| row.matches(protocol, port))
    }

    fn longest_cidr_identity(&self, addr: IpAddr) -> Option<IdentityId> {
        self.cidrs
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, identity)| *identity)
    }
}

/// The datapath stores IPv4 as IPv4-mapped IPv6, so `::ffff:a.b.c.d` and `a.b.c.d`
/// are one address to it; decide on the IPv4 form.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_then_apply_reaches_the_desired_tables() {
        let mut current = Tables::default();
        current.addresses.insert("10.0.0.1".parse().unwrap(), 300);
        current
            .policy
            .insert(PolicyEntry::any(1, Direction::Ingress, 300));
        let mut desired = Tables::default();
        desired.addresses.insert("10.0.0.2".parse().unwrap(), 301);
        desired.policy.extend(PolicyEntry::for_port_range(
            1,
            Direction::Egress,
            301,
            protocol::TCP,
            80,
            81,
        ));
        desired.endpoints.insert(
            5,
            EndpointPolicy {
                policy_id: 1,
                isolate_ingress: true,
                isolate_egress: true,
                audit: false,
            },
        );
        let diff = current.diff(&desired);
        assert!(diff.may_revoke());
        current.apply(&diff);
        assert_eq!(current, desired);
        assert!(current.diff(&desired).is_empty());
    }

    #[test]
    fn merged_diffs_equal_the_direct_diff() {
        let a = Tables::default();
        let mut b = a.clone();
        b.policy
            .insert(PolicyEntry::any(1, Direction::Ingress, 300));
        b.addresses.insert("10.0.0.1".parse().unwrap(), 300);
        let mut c = b.clone();
        c.policy.clear();
        c.addresses.insert("10.0.0.1".parse().unwrap(), 301);
        let mut merged = a.diff(&b);
        merged.merge(b.diff(&c));
        let mut applied = a.clone();
        applied.apply(&merged);
        assert_eq!(applied, c);
    }

    #[test]
    fn allows_follows_lpm_semantics() {
        let mut tables = Tables::default();
        tables.endpoints.insert(
            1,
            EndpointPolicy {
                policy_id: 9,
                isolate_ingress: true,
                isolate_egress: false,
                audit: false,
            },
        );
        tables.cidrs.insert("10.0.0.0/8".parse().unwrap(), 400);
        tables.cidrs.insert("10.1.0.0/16".parse().unwrap(), 401); // an `except`
        tables
            .addresses
            .insert("192.168.0.1".parse().unwrap(), identity::HOST);
        tables.policy.extend(PolicyEntry::for_port_range(
            9,
            Direction::Ingress,
            400,
            protocol::TCP,
            1000,
            2000,
        ));
        let allows = |peer: &str, port| {
            tables.allows(
                1,
                Direction::Ingress,
                peer.parse().unwrap(),
                protocol::TCP,
                port,
            )
        };
        assert!(allows("10.2.3.4", 1500));
        assert!(!allows("10.2.3.4", 2001));
        assert!(!allows("10.1.3.4", 1500));
        assert!(allows("192.168.0.1", 22));
        assert!(
            allows("::ffff:192.168.0.1", 22),
            "an IPv4-mapped address is the IPv4 address"
        );
        assert!(allows("::ffff:10.2.3.4", 1500));
        assert!(tables.allows(
            1,
            Direction::Egress,
            "8.8.8.8".parse().unwrap(),
            protocol::UDP,
            53
        ));
        assert!(!tables.allows(
            1,
            Direction::Ingress,
            "10.2.3.4".parse().unwrap(),
            protocol::UDP,
            1500
        ));
    }

    #[test]
    fn egress_to_a_node_port_is_decided_on_its_identity_and_the_rest_is_the_node() {
        let node: IpAddr = "192.168.0.1".parse().unwrap();
        let mut tables = Tables::default();
        tables.endpoints.insert(
            1,
            EndpointPolicy {
                policy_id: 9,
                isolate_ingress: true,
                isolate_egress: true,
                audit: false,
            },
        );
        tables.addresses.insert(node, identity::HOST);
        tables.cidrs.insert("0.0.0.0/0".parse().unwrap(), 400);
        let node_port = |port| NodePort {
            protocol: protocol::TCP,
            port,
        };
        tables.node_ports.insert(node_port(30080), 500);
        tables.node_ports.insert(node_port(30081), 501);
        tables.policy.extend(PolicyEntry::for_port_range(
            9,
            Direction::Egress,
            500,
            protocol::TCP,
            30080,
            30080,
        ));
        // Every address allowed by an ipBlock: still no way around a node port.
        tables
            .policy
            .insert(PolicyEntry::any(9, Direction::Egress, 400));
        let egress = |port| tables.allows(1, Direction::Egress, node, protocol::TCP, port);
        assert!(egress(30080));
        assert!(!egress(30081), "a node port without rows is denied");
        assert!(egress(10250), "a port nothing rewrites is the node");
        assert!(tables.allows(1, Direction::Ingress, node, protocol::TCP, 30081));
        assert!(!tables.allows_identified(1, Direction::Egress, node, 700, protocol::TCP, 30081));
    }

    #[test]
    fn a_peer_known_by_identity_is_judged_by_its_rows_or_an_ip_block_on_its_address() {
        let node: IpAddr = "192.168.0.1".parse().unwrap();
        let mut tables = Tables::default();
        tables.endpoints.insert(
            1,
            EndpointPolicy {
                policy_id: 9,
                isolate_ingress: true,
                isolate_egress: false,
                audit: false,
            },
        );
        tables.addresses.insert(node, identity::HOST);
        tables.policy.extend(PolicyEntry::for_port_range(
            9,
            Direction::Ingress,
            700,
            protocol::TCP,
            8080,
            8080,
        ));
        let from = |tables: &Tables, id, port| {
            tables.allows_identified(1, Direction::Ingress, node, id, protocol::TCP, port)
        };
        assert!(from(&tables, 700, 8080));
        assert!(!from(&tables, 700, 8081));
        assert!(!from(&tables, identity::OTHER_POD, 8080));
        tables.cidrs.insert("192.168.0.0/24".parse().unwrap(), 400);
        tables
            .policy
            .insert(PolicyEntry::any(9, Direction::Ingress, 400));
        assert!(
            from(&tables, identity::OTHER_POD, 8080),
            "an ipBlock on the node's address"
        );
        assert!(tables.allows_identified(
            1,
            Direction::Egress,
            node,
            identity::OTHER_POD,
            protocol::TCP,
            1
        ));
    }
}
