//! Types shared by the eBPF datapath and the agent: map names, map keys and values,
//! flag bits, drop reasons and reserved identities.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree byte for
//! byte; the layout tests at the bottom pin sizes and offsets. Values that are stored
//! in pinned maps are never renumbered: a layout change gets a new map name (`_V2`)
//! so an agent never reads an old pinned map wrongly.
//!
//! This crate must not grow logic beyond small pure helpers both sides need.
#![no_std]

/// An address as the datapath stores it: IPv6, or IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`), network byte order. One key type for both families keeps the
/// maps single and the lookups the same.
pub type Addr = [u8; 16];

/// Names of the maps (BPF object names are at most 15 characters). Pinned under the
/// agent's bpffs directory with the same names.
pub mod map_names {
    pub const ENDPOINTS_TC: &str = "RF_EP_TC_V1";
    pub const ENDPOINTS_CGROUP: &str = "RF_EP_CG_V1";
    pub const IDENTITIES: &str = "RF_IDENT_V1";
    pub const CIDRS: &str = "RF_CIDR_V1";
    pub const POLICY: &str = "RF_POLICY_V1";
    pub const CONNTRACK: &str = "RF_CT_V1";
    pub const FRAGMENTS: &str = "RF_FRAG_V1";
    pub const COUNTERS: &str = "RF_COUNT_V1";
    pub const EVENTS: &str = "RF_EVENTS_V1";
    pub const EVENT_BUDGET: &str = "RF_EVBUDGET_V1";
    pub const CONFIG: &str = "RF_CONFIG_V1";
    pub const NODE_PORTS: &str = "RF_NODEPORT_V1";
    pub const NODE_CGROUPS: &str = "RF_NODECG_V1";
    pub const NODE_FLOWS: &str = "RF_NODEFLOW_V1";
    /// Namespaces whose new pods the CNI plugin guards ([`super::GuardNsKey`]).
    /// Read by the plugin only; no program looks at it.
    pub const GUARDED_NAMESPACES: &str = "RF_GUARDNS_V1";
    /// Host veth ifindex -> which pod the plugin guarded there and since when
    /// ([`super::GuardRecord`]). Read by the agent only; no program looks at it.
    pub const GUARDS: &str = "RF_GUARD_V1";
    /// Addresses a guarded pod may query on port 53 (the DNS Service's ClusterIPs and
    /// endpoints), or [`super::GUARD_DNS_ANY`] for any address.
    pub const GUARD_DNS: &str = "RF_GUARDDNS_V1";

    /// Every map, in the order the agent pins them.
    pub const ALL: [&str; 17] = [
        ENDPOINTS_TC,
        ENDPOINTS_CGROUP,
        IDENTITIES,
        CIDRS,
        POLICY,
        CONNTRACK,
        FRAGMENTS,
        COUNTERS,
        EVENTS,
        EVENT_BUDGET,
        CONFIG,
        NODE_PORTS,
        NODE_CGROUPS,
        NODE_FLOWS,
        GUARDED_NAMESPACES,
        GUARDS,
        GUARD_DNS,
    ];
}

/// Direction as seen from the local pod.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the pod.
    Ingress = 0,
    /// Away from the pod.
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// Flag bits of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Traffic towards the pod is limited to what the policy allows.
    pub const ISOLATE_INGRESS: u32 = 1 << 0;
    /// Traffic from the pod is limited to what the policy allows.
    pub const ISOLATE_EGRESS: u32 = 1 << 1;
    /// Evaluate and count, but do not drop (would-drops are counted as audit).
    pub const AUDIT: u32 = 1 << 2;
    /// The endpoint's policy is not (fully) programmed, e.g. a new pod or a policy
    /// that did not fit the maps: drop everything but link control and node traffic.
    pub const FAIL_CLOSED: u32 = 1 << 3;
    /// Written by the CNI plugin (always with [`FAIL_CLOSED`] and both isolation
    /// bits, endpoint id [`super::GUARD_ENDPOINT_ID`]) for a pod the agent has not
    /// programmed yet. The datapath treats it as any fail-closed endpoint; the bit
    /// tells the agent the entry is not one of its own, so it never takes it for a
    /// leftover of a previous run. The agent's own write replaces it.
    pub const GUARD: u32 = 1 << 4;
}

/// Endpoint id of every guard entry (see [`endpoint_flags::GUARD`]). The agent
/// allocates its ids below `2^31`, so this one is never a pod's.
pub const GUARD_ENDPOINT_ID: u32 = u32::MAX;

/// The `RF_GUARDDNS` key that lets guarded pods query port 53 on any address (the
/// agent's `--dns-mode anywhere`).
pub const GUARD_DNS_ANY: Addr = [0; 16];

/// The longest Kubernetes namespace name (a DNS label).
pub const NAMESPACE_MAX: usize = 63;
/// The longest Kubernetes pod name (a DNS subdomain).
pub const POD_NAME_MAX: usize = 253;

/// Key of `RF_GUARDNS`: a namespace name, NUL-padded. Names are at most 63 bytes,
/// so the key is the name itself, never a hash that two names could share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardNsKey {
    pub name: [u8; 64],
}

impl GuardNsKey {
    /// `None` for a name no namespace can have (empty or too long).
    pub fn new(namespace: &str) -> Option<Self> {
        let bytes = namespace.as_bytes();
        if bytes.is_empty() || bytes.len() > NAMESPACE_MAX {
            return None;
        }
        let mut name = [0u8; 64];
        name[..bytes.len()].copy_from_slice(bytes);
        Some(Self { name })
    }

    /// The name, if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        let len = self.name.iter().position(|b| *b == 0).unwrap_or(64);
        core::str::from_utf8(&self.name[..len]).ok()
    }
}

/// Bits of a `RF_GUARDNS` value: why the namespace is guarded.
pub mod guard_reasons {
    /// It holds a RayCluster.
    pub const RAYCLUSTER: u32 = 1 << 0;
    /// It carries the label `rayfence.io/guard: "true"`.
    pub const LABEL: u32 = 1 << 1;
}

/// Value of `RF_GUARD`: the pod the plugin guarded on a host veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardRecord {
    /// When the guard was first written, Unix milliseconds.
    pub since_unix_ms: u64,
    /// NUL-padded.
    pub namespace: [u8; 64],
    /// NUL-padded.
    pub name: [u8; 256],
}

impl GuardRecord {
    /// `None` when a name is too long to be Kubernetes'.
    pub fn new(namespace: &str, name: &str, since_unix_ms: u64) -> Option<Self> {
        let ns = GuardNsKey::new(namespace)?;
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > POD_NAME_MAX {
            return None;
        }
        let mut padded = [0u8; 256];
        padded[..bytes.len()].copy_from_slice(bytes);
        Some(Self {
            since_unix_ms,
            namespace: ns.name,
            name: padded,
        })
    }

    pub fn namespace(&self) -> Option<&str> {
        let len = self.namespace.iter().position(|b| *b == 0).unwrap_or(64);
        core::str::from_utf8(&self.namespace[..len]).ok()
    }

    pub fn name(&self) -> Option<&str> {
        let len = self.name.iter().position(|b| *b == 0).unwrap_or(256);
        core::str::from_utf8(&self.name[..len]).ok()
    }
}

/// What the datapath knows about a local endpoint (a pod's host veth or its cgroup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Stable per pod for its lifetime; scopes conntrack and counters.
    pub endpoint_id: u32,
    /// Which policy table rows apply (shared by pods with identical policy).
    pub policy_id: u32,
    /// Bumped by the agent whenever a change could revoke an allowed flow; conntrack
    /// entries decided under an older generation are re-checked.
    pub generation: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
}

/// Reserved identities. Identities from [`identity::FIRST_ALLOCATED`] up are handed
/// out by the policy engine (pods, CIDR sets, service frontends).
pub mod identity {
    /// No identity: the address is unknown.
    pub const NONE: u32 = 0;
    /// An address of the node the pod runs on. What it means depends on who is
    /// behind it (docs/semantics.md "What counts as the node"): the node's own host processes are always allowed;
    /// traffic the node NATs is judged by its original source, a port the node DNATs
    /// (`RF_NODEPORT`) by its backends, a hostNetwork pod by its own identity.
    pub const HOST: u32 = 1;
    /// In `RF_NODECG`: a cgroup holding pods (the kubelet's `kubepods` root). A
    /// process below it that is no known hostNetwork pod is not the node either; it
    /// is matched by ipBlocks on the node's address only.
    pub const OTHER_POD: u32 = 2;
    pub const FIRST_ALLOCATED: u32 = 256;
}

/// Key data of the policy LPM trie. Prefix lengths: [`PolicyKey::ANY_PROTOCOL_BITS`]
/// matches every protocol and port, [`PolicyKey::ANY_PORT_BITS`] one protocol on
/// every port, and `ANY_PORT_BITS + n` a port prefix of n bits, so a port range is a
/// handful of prefixes ([`port_range_prefixes`]), never one entry per port.
///
/// Multi-byte fields are big-endian so that prefixes run over them in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub policy_id_be: u32,
    pub identity_be: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_be: u16,
}

impl PolicyKey {
    /// Policy id, identity and direction: always matched in full.
    pub const ANY_PROTOCOL_BITS: u32 = 72;
    /// ... plus the protocol.
    pub const ANY_PORT_BITS: u32 = 80;
    /// ... plus the whole port.
    pub const FULL_BITS: u32 = 96;

    pub const fn new(
        policy_id: u32,
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            policy_id_be: policy_id.to_be(),
            identity_be: identity.to_be(),
            direction: direction as u8,
            protocol,
            port_be: port.to_be(),
        }
    }

    pub const fn policy_id(&self) -> u32 {
        u32::from_be(self.policy_id_be)
    }

    pub const fn identity(&self) -> u32 {
        u32::from_be(self.identity_be)
    }

    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// Value of a policy trie entry: presence means "allowed"; the cookie lets the agent
/// say which rule allowed a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub cookie: u32,
}

/// Splits the inclusive port range `start..=end` into the fewest aligned prefixes,
/// yielding `(first_port, prefix_bits)` with `prefix_bits` in `0..=16`. At most 30
/// prefixes for any range.
pub fn port_range_prefixes(start: u16, end: u16) -> PortPrefixes {
    PortPrefixes {
        next: start as u32,
        end: end as u32,
        done: start > end,
    }
}

pub struct PortPrefixes {
    next: u32,
    end: u32,
    done: bool,
}

impl Iterator for PortPrefixes {
    type Item = (u16, u8);

    fn next(&mut self) -> Option<(u16, u8)> {
        if self.done || self.next > self.end {
            return None;
        }
        // Largest block aligned at `next` that stays within `end`.
        let mut size_log2 = if self.next == 0 {
            16
        } else {
            self.next.trailing_zeros().min(16)
        };
        while size_log2 > 0 && self.next + (1 << size_log2) - 1 > self.end {
            size_log2 -= 1;
        }
        let item = (self.next as u16, (16 - size_log2) as u8);
        self.next += 1 << size_log2;
        Some(item)
    }
}

/// Conntrack key, always from the endpoint's point of view (local = the pod's side),
/// so both directions of a flow hit one entry. Scoped by endpoint so one pod's
/// entries can never answer for another's. Ports in host byte order (the datapath
/// converts once while parsing); for ICMP echo both ports hold the echo identifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub endpoint_id: u32,
    pub local_port: u16,
    pub peer_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub local: Addr,
    pub peer: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// The endpoint generation the flow was last allowed under.
    pub generation: u32,
    /// [`Direction`] of the packet that opened the flow.
    pub origin: u8,
    /// [`ct_flags`].
    pub flags: u8,
    pub _pad: [u8; 2],
    pub last_seen_ns: u64,
}

/// Flag bits of [`CtValue::flags`].
pub mod ct_flags {
    /// The flow passes only because its endpoint is in audit mode (no rule allows
    /// it). Once the endpoint enforces, the flow is dropped as `no-policy` in both
    /// directions and its entry stays so that neither side re-opens it.
    pub const AUDITED: u8 = 1 << 0;
    /// Set on a revoked flow's (stale) entry when the peer sent a TCP SYN the other
    /// way and it was allowed as a new connection: the entry stays the revoked
    /// flow's until the pod answers with a SYN-ACK (proof that its kernel, too, sees
    /// a new connection), and only then becomes the new flow's.
    pub const REOPENING: u8 = 1 << 1;
    /// The flow's peer is the node itself (a host process in no pod cgroup), as
    /// decided at its first packet: a socket never changes its cgroup, so re-checks
    /// of the flow need not ask again (and could not, from the pod's side).
    pub const NODE: u8 = 1 << 2;
}

/// Key of `RF_NODEPORT`: a port the node DNATs elsewhere on every one of its
/// addresses (a Service's `nodePort`, a local pod's `hostPort`). Egress to a node
/// address on it is decided on the map's identity, never as the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortKey {
    pub protocol: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
}

/// Key of the fragment map: the first fragment of an allowed datagram records its
/// ports here so the later fragments (which carry no L4 header) can be matched.
/// Addresses as on the wire (`src` = the packet's source).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub endpoint_id: u32,
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub src: Addr,
    pub dst: Addr,
}

/// Ports of a fragmented datagram, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub src_port: u16,
    pub dst_port: u16,
}

/// Per-CPU state of the flow-event rate limit (array of one entry per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventBudget {
    /// Start of the current one-second window (`bpf_ktime_get_ns`).
    pub window_start_ns: u64,
    /// Events emitted in the current window.
    pub emitted: u32,
    pub _pad: u32,
    /// Events not emitted (over budget or ring buffer full), ever. Summed over CPUs
    /// by the agent.
    pub lost: u64,
}

/// Why a packet got its verdict. Stable values, never reused: a retired reason keeps
/// its number as a placeholder.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    // Allow reasons.
    /// A new flow allowed by a policy entry.
    PolicyAllow = 1,
    /// A packet of a flow in conntrack (either direction).
    Established = 2,
    /// An ICMP error about a flow in conntrack.
    Related = 3,
    /// To or from the pod's own node.
    Host = 4,
    /// The direction is not isolated for this endpoint.
    NotIsolated = 5,
    /// ARP, IPv6 neighbour discovery, MLD, IGMP.
    LinkControl = 6,
    // Drop reasons.
    /// No policy entry allows the flow.
    NoPolicy = 64,
    /// The flow was allowed, but a policy change has since removed what allowed it.
    Revoked = 65,
    /// The endpoint is fail-closed (not programmed yet, or its policy did not fit).
    FailClosed = 66,
    /// Truncated or malformed headers.
    Malformed = 67,
    /// Neither IPv4, IPv6 nor ARP.
    UnsupportedL3 = 68,
    /// A non-first fragment whose first fragment was not seen.
    FragmentUnknown = 69,
}

impl Reason {
    pub const fn is_drop(self) -> bool {
        self as u8 >= 64
    }

    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::PolicyAllow,
            2 => Self::Established,
            3 => Self::Related,
            4 => Self::Host,
            5 => Self::NotIsolated,
            6 => Self::LinkControl,
            64 => Self::NoPolicy,
            65 => Self::Revoked,
            66 => Self::FailClosed,
            67 => Self::Malformed,
            68 => Self::UnsupportedL3,
            69 => Self::FragmentUnknown,
            _ => return None,
        })
    }

    /// Bounded metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PolicyAllow => "policy-allow",
            Self::Established => "established",
            Self::Related => "related",
            Self::Host => "host",
            Self::NotIsolated => "not-isolated",
            Self::LinkControl => "link-control",
            Self::NoPolicy => "no-policy",
            Self::Revoked => "revoked",
            Self::FailClosed => "fail-closed",
            Self::Malformed => "malformed",
            Self::UnsupportedL3 => "unsupported-l3",
            Self::FragmentUnknown => "fragment-unknown",
        }
    }
}

/// What happened to a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow = 0,
    Drop = 1,
    /// Would have been dropped, passed because the endpoint is in audit mode.
    Audit = 2,
}

impl Verdict {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Allow),
            1 => Some(Self::Drop),
            2 => Some(Self::Audit),
            _ => None,
        }
    }
}

/// Key of the per-CPU counters. Drops are counted per packet; allows and audits per
/// flow (its first packet, and once more each time a policy change re-checks it), so
/// the established fast path adds no counter work.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    pub endpoint_id: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// A sampled drop (or audit) event sent to userspace through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub endpoint_id: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub protocol: u8,
    pub local: Addr,
    pub peer: Addr,
    pub local_port: u16,
    pub peer_port: u16,
    pub packet_len: u32,
}

/// Global datapath settings (array map of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// Flow events each CPU may emit per second; the rest are counted as lost.
    pub events_per_second: u32,
    pub flags: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit padding
    // (checked by the layout tests), so any byte pattern is a valid value.
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for NodePortKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for GuardNsKey {}
    unsafe impl aya::Pod for GuardRecord {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{offset_of, size_of};
    use std::vec::Vec;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EndpointInfo>(), 16);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, direction), 8);
        assert_eq!(offset_of!(PolicyKey, port_be), 10);
        assert_eq!(size_of::<PolicyValue>(), 4);
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(offset_of!(CtKey, local), 12);
        assert_eq!(offset_of!(CtKey, peer), 28);
        assert_eq!(size_of::<CtValue>(), 16);
        assert_eq!(offset_of!(CtValue, last_seen_ns), 8);
        assert_eq!(size_of::<CounterKey>(), 8);
        assert_eq!(size_of::<CounterValue>(), 16);
        assert_eq!(size_of::<FlowEvent>(), 56);
        assert_eq!(offset_of!(FlowEvent, local), 16);
        assert_eq!(offset_of!(FlowEvent, packet_len), 52);
        assert_eq!(size_of::<DatapathConfig>(), 8);
        assert_eq!(size_of::<FragKey>(), 44);
        assert_eq!(offset_of!(FragKey, src), 12);
        assert_eq!(size_of::<FragValue>(), 4);
        assert_eq!(size_of::<NodePortKey>(), 4);
        assert_eq!(offset_of!(NodePortKey, port), 2);
        assert_eq!(size_of::<EventBudget>(), 24);
        assert_eq!(offset_of!(EventBudget, lost), 16);
        assert_eq!(size_of::<GuardNsKey>(), 64);
        assert_eq!(size_of::<GuardRecord>(), 328);
        assert_eq!(offset_of!(GuardRecord, namespace), 8);
        assert_eq!(offset_of!(GuardRecord, name), 72);
    }

    #[test]
    fn guard_names_round_trip_and_bound() {
        let key = GuardNsKey::new("ray-team").unwrap();
        assert_eq!(key.as_str(), Some("ray-team"));
        assert!(GuardNsKey::new("").is_none());
        assert!(GuardNsKey::new(&"a".repeat(64)).is_none());
        assert!(GuardNsKey::new(&"a".repeat(63)).is_some());
        let record = GuardRecord::new("ns", &"p".repeat(253), 7).unwrap();
        assert_eq!(record.namespace(), Some("ns"));
        assert_eq!(record.name().map(|n| n.len()), Some(253));
        assert!(GuardRecord::new("ns", &"p".repeat(254), 7).is_none());
    }

    #[test]
    fn policy_key_prefix_bits_cover_the_fields_in_order() {
        assert_eq!(
            PolicyKey::ANY_PROTOCOL_BITS as usize,
            offset_of!(PolicyKey, protocol) * 8
        );
        assert_eq!(
            PolicyKey::ANY_PORT_BITS as usize,
            offset_of!(PolicyKey, port_be) * 8
        );
        assert_eq!(PolicyKey::FULL_BITS as usize, size_of::<PolicyKey>() * 8);
        let key = PolicyKey::new(7, 300, Direction::Egress, 6, 8080);
        assert_eq!(
            (key.policy_id(), key.identity(), key.port()),
            (7, 300, 8080)
        );
    }

    fn expand(start: u16, end: u16) -> Vec<u32> {
        let mut ports = Vec::new();
        for (first, bits) in port_range_prefixes(start, end) {
            let size = 1u32 << (16 - bits as u32);
            assert_eq!(
                first as u32 % size,
                0,
                "prefix {first}/{bits} is not aligned"
            );
            ports.extend(first as u32..first as u32 + size);
        }
        ports
    }

    #[test]
    fn port_range_prefixes_cover_exactly_the_range() {
        for (start, end) in [
            (0, 65535),
            (80, 80),
            (1, 65535),
            (1000, 2000),
            (32768, 60999),
            (65535, 65535),
            (0, 0),
        ] {
            let ports = expand(start, end);
            let expected: Vec<u32> = (start as u32..=end as u32).collect();
            assert_eq!(ports, expected, "range {start}-{end}");
        }
        assert_eq!(port_range_prefixes(0, 65535).collect::<Vec<_>>(), [(0, 0)]);
        assert_eq!(port_range_prefixes(9, 8).count(), 0);
    }

    #[test]
    fn port_range_prefixes_are_few() {
        let worst = (0..=65535u32)
            .step_by(257)
            .map(|start| port_range_prefixes(start as u16, 65534).count())
            .max()
            .unwrap_or(0);
        assert!(worst <= 30, "{worst} prefixes");
        assert!(port_range_prefixes(1, 65534).count() <= 30);
    }
}
