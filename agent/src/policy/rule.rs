//! The engine's normalised rule: one allow rule with its peers and ports, whichever
//! source it came from (a RayCluster's user rules, a base flow, a NetworkPolicy), and
//! the parser from the `networking.k8s.io/v1` rule types.
//!
//! Must not: look at cluster state. A rule is a value; which identities it matches is
//! decided in `engine`, against the current pods and namespaces.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::problem::{Invalid, ObjectRef};
use super::selector::{self, Selector};
use crate::tables::{Direction, protocol};

/// Which namespaces a pod peer may be in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NamespaceMatch {
    /// Exactly these namespaces (the policy's own one for a bare `podSelector`; the
    /// operator namespaces from the settings).
    Names(Vec<String>),
    /// Namespaces whose labels match.
    Selector(Selector),
}

/// An `ipBlock`: `cidr` minus `except`. Prefixes are normalised (host bits cleared).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub cidr: IpNet,
    /// Sorted and deduplicated (the parser makes it so; [`Block::covers`] relies on it).
    pub except: Vec<IpNet>,
}

impl Block {
    /// Every address of both families: what a rule with no peers means.
    pub fn everything() -> [Block; 2] {
        [
            Block {
                cidr: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
                except: Vec::new(),
            },
            Block {
                cidr: IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
                except: Vec::new(),
            },
        ]
    }

    /// Whether every address of `net` is in this block. Exact for the prefixes the
    /// engine inserts, since every `except` is itself one of them.
    pub fn covers(&self, net: &IpNet) -> bool {
        self.cidr.contains(net) && !self.excepted(net)
    }

    /// Whether an except contains `net`. A few are scanned; beyond that the sorted,
    /// truncated excepts are searched for each of `net`'s supernets inside `cidr`, so
    /// a block with 17,000 excepts costs at most 129 binary searches per prefix, not
    /// 17,000 comparisons (every except is itself a prefix the engine asks about).
    fn excepted(&self, net: &IpNet) -> bool {
        const SCANNED: usize = 8;
        if self.except.len() <= SCANNED {
            return self.except.iter().any(|e| e.contains(net));
        }
        (self.cidr.prefix_len()..=net.prefix_len()).any(|len| {
            IpNet::new(net.addr(), len)
                .is_ok_and(|supernet| self.except.binary_search(&supernet.trunc()).is_ok())
        })
    }

    /// Every prefix this block contributes to the CIDR table.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        std::iter::once(self.cidr).chain(self.except.iter().copied())
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods matching `pods` in namespaces matching `namespaces` (one peer: AND).
    Pods {
        namespaces: NamespaceMatch,
        pods: Selector,
    },
    Block(Block),
    /// The pods backing a Service (its EndpointSlices); used by the DNS base flow.
    ServiceBackends {
        namespace: String,
        name: String,
    },
}

/// Which ports of a protocol a rule allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    All,
    /// Inclusive.
    Range(u16, u16),
    /// A container port name; resolved on the receiving pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub protocol: u8,
    pub port: PortMatch,
}

/// The role a RayCluster rule belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Head,
    /// `worker` (also used for groups without an entry).
    Worker,
    /// A `workerGroups[]` entry.
    Group(String),
}

/// Where a rule comes from, for `explain` and problem reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleOrigin {
    /// Base flow: from/to the pods of the same RayCluster.
    SameCluster,
    /// Base flow: the KubeRay operator to the head's dashboard and client ports.
    Operator,
    /// Base flow: the owning RayJob's submitter pods to the head's dashboard port.
    Submitter,
    /// Base flow: DNS.
    Dns,
    /// A user rule of a RayCluster: `index` into that role's ingress/egress rules.
    User {
        role: Role,
        direction: Direction,
        index: usize,
    },
    /// A rule of a plain NetworkPolicy: `index` into its `spec.ingress`/`spec.egress`.
    NetworkPolicy {
        name: String,
        direction: Direction,
        index: usize,
    },
}

/// One allow rule, direction given by where it is stored.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub origin: RuleOrigin,
    /// The object the rule is written in and its field path, for problem reports.
    pub object: Arc<ObjectRef>,
    pub field: String,
    /// Never empty: "any peer" is the two everything-blocks.
    pub peers: Vec<Peer>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortSpec>>,
}

impl Rule {
    pub fn named_ports(&self) -> impl Iterator<Item = (&PortSpec, &str)> {
        self.ports.iter().flatten().filter_map(|p| match &p.port {
            PortMatch::Named(name) => Some((p, name.as_str())),
            _ => None,
        })
    }
}

/// Parses a protocol name as the API does (`TCP` default).
pub fn parse_protocol(value: Option<&str>) -> Option<u8> {
    match value {
        None | Some("TCP") => Some(protocol::TCP),
        Some("UDP") => Some(protocol::UDP),
        Some("SCTP") => Some(protocol::SCTP),
        Some(_) => None,
    }
}

fn selector(field: &str, selector: &LabelSelector) -> Result<Selector, Invalid> {
    Selector::parse(selector).map_err(|e| {
        Invalid::new(
            format!("{field}.matchExpressions[{}].operator", e.index()),
            e.operator(),
            format!("{e}; the rule allows nothing"),
        )
    })
}

fn parse_net(field: &str, value: &str) -> Result<IpNet, Invalid> {
    value
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| Invalid::new(field, value, "not a CIDR; the rule allows nothing"))
}

fn parse_peer(field: &str, peer: &NetworkPolicyPeer, namespace: &str) -> Result<Peer, Invalid> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err(Invalid::new(
                field,
                "ipBlock with a selector",
                "ipBlock cannot be combined with podSelector or namespaceSelector; the rule allows nothing",
            ));
        }
        let cidr = parse_net(&format!("{field}.ipBlock.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for (i, value) in block.except.iter().flatten().enumerate() {
            let f = format!("{field}.ipBlock.except[{i}]");
            let net = parse_net(&f, value)?;
            if !cidr.contains(&net) {
                return Err(Invalid::new(
                    f,
                    value.as_str(),
                    format!("not inside cidr {cidr}; the rule allows nothing"),
                ));
            }
            except.push(net);
        }
        except.sort();
        except.dedup();
        return Ok(Peer::Block(Block { cidr, except }));
    }
    let pods = match &peer.pod_selector {
        Some(s) => selector(&format!("{field}.podSelector"), s)?,
        None => Selector::everything(),
    };
    let namespaces = match &peer.namespace_selector {
        Some(s) => NamespaceMatch::Selector(selector(&format!("{field}.namespaceSelector"), s)?),
        None if peer.pod_selector.is_some() => NamespaceMatch::Names(vec![namespace.to_owned()]),
        None => {
            return Err(Invalid::new(
                field,
                "{}",
                "a peer must set podSelector, namespaceSelector or ipBlock; the rule allows nothing",
            ));
        }
    };
    Ok(Peer::Pods { namespaces, pods })
}

fn parse_port(field: &str, port: &NetworkPolicyPort) -> Result<PortSpec, Invalid> {
    let protocol = parse_protocol(port.protocol.as_deref()).ok_or_else(|| {
        Invalid::new(
            format!("{field}.protocol"),
            port.protocol.clone().unwrap_or_default(),
            "unknown protocol (expected TCP, UDP or SCTP); the rule allows nothing",
        )
    })?;
    let in_range = |v: i32| u16::try_from(v).ok().filter(|p| *p > 0);
    let port = match (&port.port, port.end_port) {
        (None, None) => PortMatch::All,
        (None, Some(end)) => {
            return Err(Invalid::new(
                format!("{field}.endPort"),
                end.to_string(),
                "endPort without port; the rule allows nothing",
            ));
        }
        (Some(IntOrString::Int(p)), end) => {
            let start = in_range(*p).ok_or_else(|| {
                Invalid::new(
                    format!("{field}.port"),
                    p.to_string(),
                    "port out of range 1-65535; the rule allows nothing",
                )
            })?;
            match end {
                None => PortMatch::Range(start, start),
                Some(e) => match in_range(e).filter(|e| *e >= start) {
                    Some(end) => PortMatch::Range(start, end),
                    None => {
                        return Err(Invalid::new(
                            format!("{field}.endPort"),
                            e.to_string(),
                            "endPort must be within 1-65535 and not below port; the rule allows nothing",
                        ));
                    }
                },
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if let Some(e) = end {
                return Err(Invalid::new(
                    format!("{field}.endPort"),
                    e.to_string(),
                    "endPort cannot be used with a named port; the rule allows nothing",
                ));
            }
            if name.is_empty() {
                return Err(Invalid::new(
                    format!("{field}.port"),
                    "",
                    "empty port name; the rule allows nothing",
                ));
            }
            PortMatch::Named(name.clone())
        }
    };
    Ok(PortSpec { protocol, port })
}

/// The fields of a `NetworkPolicyPeer`.
pub const PEER_FIELDS: &[&str] = &["podSelector", "namespaceSelector", "ipBlock"];
/// The fields of an `IPBlock`.
pub const IP_BLOCK_FIELDS: &[&str] = &["cidr", "except"];
/// The fields of a `NetworkPolicyPort`.
pub const PORT_FIELDS: &[&str] = &["protocol", "port", "endPort"];

/// The first field of the raw rule `value` (at path `field`) that its
/// `networking.k8s.io/v1` type does not have, at any depth: the rule, its peers, their
/// selectors and `ipBlock`, its ports. A rule with one is invalid and allows nothing
/// (docs/semantics.md "Bad input"): deserialised, the field would vanish and the rule could
/// only get wider (`frm` reads as "from anyone", `namespaceSelector: {matchLabel:
/// ...}` as "every namespace"). An ingress rule's `to` (or an egress rule's `from`)
/// is unknown too. Values of the wrong type are left to deserialisation.
pub fn unknown_field(field: &str, direction: Direction, value: &Value) -> Option<Invalid> {
    let peers_key = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    if let Some(invalid) = Invalid::unknown_field(field, value, &[peers_key, "ports"]) {
        return Some(invalid);
    }
    let items = |key: &str| match value.get(key) {
        Some(Value::Array(items)) => items.as_slice(),
        _ => &[],
    };
    for (i, peer) in items(peers_key).iter().enumerate() {
        let f = format!("{field}.{peers_key}[{i}]");
        let found = Invalid::unknown_field(&f, peer, PEER_FIELDS)
            .or_else(|| {
                ["podSelector", "namespaceSelector"].iter().find_map(|key| {
                    peer.get(key)
                        .and_then(|s| selector::unknown_field(&format!("{f}.{key}"), s))
                })
            })
            .or_else(|| {
                peer.get("ipBlock").and_then(|b| {
                    Invalid::unknown_field(&format!("{f}.ipBlock"), b, IP_BLOCK_FIELDS)
                })
            });
        if found.is_some() {
            return found;
        }
    }
    items("ports").iter().enumerate().find_map(|(i, port)| {
        Invalid::unknown_field(&format!("{field}.ports[{i}]"), port, PORT_FIELDS)
    })
}

/// What [`parse_rule`] also has to say about a valid rule.
#[derive(Debug)]
pub struct Parsed {
    pub rule: Rule,
    /// Valid-but-noteworthy readings (e.g. a named port with an ipBlock peer).
    pub notices: Vec<Invalid>,
}

/// Parses one `NetworkPolicyIngressRule`/`EgressRule` (`peers` is `from`/`to`).
/// `field` is the rule's path (e.g. `spec.ingress[0]`), `namespace` the policy's.
pub fn parse_rule(
    origin: RuleOrigin,
    object: &Arc<ObjectRef>,
    field: &str,
    direction: Direction,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    namespace: &str,
) -> Result<Parsed, Invalid> {
    let peers_field = match direction {
        Direction::Ingress => "from",
        Direction::Egress => "to",
    };
    let mut parsed_peers = Vec::new();
    for (i, peer) in peers.into_iter().flatten().enumerate() {
        parsed_peers.push(parse_peer(
            &format!("{field}.{peers_field}[{i}]"),
            peer,
            namespace,
        )?);
    }
    let mut parsed_ports = Vec::new();
    for (i, port) in ports.into_iter().flatten().enumerate() {
        parsed_ports.push(parse_port(&format!("{field}.ports[{i}]"), port)?);
    }
    if parsed_peers.is_empty() {
        parsed_peers.extend(Block::everything().map(Peer::Block));
        let named = parsed_ports
            .iter()
            .any(|p| matches!(p.port, PortMatch::Named(_)));
        if direction == Direction::Egress && named {
            // A named egress port resolves on destination pods, which blocks cannot
            // name: every pod is a peer too (only then, to keep `{}` rules small).
            parsed_peers.push(Peer::Pods {
                namespaces: NamespaceMatch::Selector(Selector::everything()),
                pods: Selector::everything(),
            });
        }
    }
    let mut notices = Vec::new();
    let explicit_blocks = peers.is_some_and(|p| p.iter().any(|p| p.ip_block.is_some()));
    if direction == Direction::Egress && explicit_blocks {
        for (i, port) in parsed_ports.iter().enumerate() {
            if let PortMatch::Named(name) = &port.port {
                notices.push(Invalid::new(
                    format!("{field}.ports[{i}].port"),
                    name.as_str(),
                    "a named egress port is resolved on destination pods; it matches nothing for ipBlock peers",
                ));
            }
        }
    }
    Ok(Parsed {
        rule: Rule {
            origin,
            object: object.clone(),
            field: field.to_owned(),
            peers: parsed_peers,
            ports: (!parsed_ports.is_empty()).then_some(parsed_ports),
        },
        notices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary search over supernets agrees with a scan of every except, for
    /// blocks past the scanned size, nested excepts and both families.
    #[test]
    fn covers_many_excepts_as_a_scan_would() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        let mut except: Vec<IpNet> = (0..40u32)
            .map(|i| net(&format!("10.{}.{}.0/24", i % 7, i * 3)))
            .chain([net("10.3.0.0/16"), net("10.6.9.128/25"), net("10.5.4.4/32")])
            .collect();
        except.sort();
        except.dedup();
        let v4 = Block {
            cidr: net("10.0.0.0/8"),
            except,
        };
        let v6 = Block {
            cidr: net("2001:db8::/32"),
            except: (0..20u32)
                .map(|i| net(&format!("2001:db8:{i:x}::/48")))
                .collect(),
        };
        let probes = [
            "10.3.7.0/24",
            "10.3.0.0/16",
            "10.3.0.0/15",
            "10.0.0.0/24",
            "10.0.3.0/24",
            "10.0.3.1/32",
            "10.6.9.200/32",
            "10.6.9.100/32",
            "10.5.4.4/32",
            "10.5.4.5/32",
            "10.0.0.0/8",
            "11.0.0.0/24",
            "10.1.4.0/23",
            "2001:db8:3::1/128",
            "2001:db8:14::/48",
            "2001:db8:13:ff::/64",
            "2001:db8::/32",
            "2001:db9::/48",
        ];
        for block in [&v4, &v6] {
            assert!(block.except.len() > 8, "past the scanned size");
            for probe in probes.map(net) {
                let scanned =
                    block.cidr.contains(&probe) && !block.except.iter().any(|e| e.contains(&probe));
                assert_eq!(block.covers(&probe), scanned, "{probe} in {:?}", block.cidr);
            }
        }
    }

    fn rule_from(json: serde_json::Value, direction: Direction) -> Result<Parsed, Invalid> {
        let object = Arc::new(ObjectRef::new("NetworkPolicy", "ns", "p"));
        let origin = RuleOrigin::NetworkPolicy {
            name: "p".into(),
            direction,
            index: 0,
        };
        match direction {
            Direction::Ingress => {
                let r: k8s_openapi::api::networking::v1::NetworkPolicyIngressRule =
                    serde_json::from_value(json).unwrap();
                parse_rule(
                    origin,
                    &object,
                    "spec.ingress[0]",
                    direction,
                    r.from.as_deref(),
                    r.ports.as_deref(),
                    "ns",
                )
            }
            Direction::Egress => {
                let r: k8s_openapi::api::networking::v1::NetworkPolicyEgressRule =
                    serde_json::from_value(json).unwrap();
                parse_rule(
                    origin,
                    &object,
                    "spec.egress[0]",
                    direction,
                    r.to.as_deref(),
                    r.ports.as_deref(),
                    "ns",
                )
            }
        }
    }

    #[test]
    fn no_peers_is_both_everything_blocks_and_no_ports_is_any() {
        let parsed = rule_from(serde_json::json!({}), Direction::Ingress).unwrap();
        assert_eq!(
            parsed.rule.peers,
            Block::everything().map(Peer::Block).to_vec()
        );
        assert_eq!(parsed.rule.ports, None);
        let parsed = rule_from(
            serde_json::json!({"from": [], "ports": []}),
            Direction::Ingress,
        )
        .unwrap();
        assert_eq!(parsed.rule.ports, None);
        assert_eq!(parsed.rule.peers.len(), 2);
    }

    #[test]
    fn bare_pod_selector_is_the_policy_namespace() {
        let parsed = rule_from(
            serde_json::json!({"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]}),
            Direction::Ingress,
        )
        .unwrap();
        assert_eq!(
            parsed.rule.peers,
            vec![Peer::Pods {
                namespaces: NamespaceMatch::Names(vec!["ns".into()]),
                pods: Selector::from_labels([("a", "b")]),
            }]
        );
    }

    #[test]
    fn cidrs_are_normalised_and_excepts_must_be_inside() {
        let parsed = rule_from(
            serde_json::json!({"to": [{"ipBlock": {"cidr": "10.1.2.3/16", "except": ["10.1.9.0/24"]}}]}),
            Direction::Egress,
        )
        .unwrap();
        assert_eq!(
            parsed.rule.peers,
            vec![Peer::Block(Block {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: vec!["10.1.9.0/24".parse().unwrap()],
            })]
        );
        let err = rule_from(
            serde_json::json!({"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.2.0.0/24"]}}]}),
            Direction::Egress,
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.egress[0].to[0].ipBlock.except[0]");
        let err = rule_from(
            serde_json::json!({"to": [{"ipBlock": {"cidr": "10.1.0.0"}}]}),
            Direction::Egress,
        )
        .unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.value.as_str()),
            ("spec.egress[0].to[0].ipBlock.cidr", "10.1.0.0")
        );
    }

    #[test]
    fn ports_parse_as_the_api_defines_them() {
        let parsed = rule_from(
            serde_json::json!({"ports": [{"port": 80}, {"protocol": "UDP"}, {"port": "http"}, {"port": 1000, "endPort": 2000, "protocol": "SCTP"}]}),
            Direction::Ingress,
        )
        .unwrap();
        assert_eq!(
            parsed.rule.ports.unwrap(),
            vec![
                PortSpec {
                    protocol: protocol::TCP,
                    port: PortMatch::Range(80, 80)
                },
                PortSpec {
                    protocol: protocol::UDP,
                    port: PortMatch::All
                },
                PortSpec {
                    protocol: protocol::TCP,
                    port: PortMatch::Named("http".into())
                },
                PortSpec {
                    protocol: protocol::SCTP,
                    port: PortMatch::Range(1000, 2000)
                },
            ]
        );
        for (bad, field) in [
            (
                serde_json::json!({"port": 0}),
                "spec.ingress[0].ports[0].port",
            ),
            (
                serde_json::json!({"port": 70000}),
                "spec.ingress[0].ports[0].port",
            ),
            (
                serde_json::json!({"endPort": 9}),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                serde_json::json!({"port": "http", "endPort": 9}),
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                serde_json::json!({"protocol": "tcp"}),
                "spec.ingress[0].ports[0].protocol",
            ),
        ] {
            let err =
                rule_from(serde_json::json!({"ports": [bad]}), Direction::Ingress).unwrap_err();
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn peer_needs_a_selector_or_block_and_not_both() {
        let err = rule_from(serde_json::json!({"from": [{}]}), Direction::Ingress).unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].from[0]");
        let err = rule_from(
            serde_json::json!({"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}),
            Direction::Ingress,
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.ingress[0].from[0]");
    }

    #[test]
    fn unknown_fields_name_their_full_path_at_every_depth() {
        use serde_json::json;
        for (direction, rule, path, value) in [
            (
                Direction::Ingress,
                json!({"frm": [{"podSelector": {}}]}),
                "r.frm",
                r#"[{"podSelector":{}}]"#,
            ),
            (
                Direction::Ingress,
                json!({"to": [{"podSelector": {}}]}),
                "r.to",
                r#"[{"podSelector":{}}]"#,
            ),
            (Direction::Egress, json!({"from": []}), "r.from", "[]"),
            (
                Direction::Ingress,
                json!({"from": [{"podSelector": {}}, {"namespaceSelector": {"matchLabel": {"a": "b"}}}]}),
                "r.from[1].namespaceSelector.matchLabel",
                r#"{"a":"b"}"#,
            ),
            (
                Direction::Ingress,
                json!({"from": [{"namespaceSelector": {"nested": {"matchLabels": {"a": "b"}}}}]}),
                "r.from[0].namespaceSelector.nested",
                r#"{"matchLabels":{"a":"b"}}"#,
            ),
            (
                Direction::Egress,
                json!({"to": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "value": ["x"]}]}}]}),
                "r.to[0].podSelector.matchExpressions[0].value",
                r#"["x"]"#,
            ),
            (
                Direction::Egress,
                json!({"to": [{"podSelectr": {"matchLabels": {"a": "b"}}}]}),
                "r.to[0].podSelectr",
                r#"{"matchLabels":{"a":"b"}}"#,
            ),
            (
                Direction::Egress,
                json!({"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "excpt": ["10.1.0.0/16"]}}]}),
                "r.to[0].ipBlock.excpt",
                r#"["10.1.0.0/16"]"#,
            ),
            (
                Direction::Ingress,
                json!({"ports": [{"port": 80}, {"prot": "UDP"}]}),
                "r.ports[1].prot",
                r#""UDP""#,
            ),
        ] {
            let invalid = unknown_field("r", direction, &rule).unwrap();
            assert_eq!(
                (invalid.field.as_str(), invalid.value.as_str()),
                (path, value),
                "{rule}"
            );
            assert!(invalid.message.contains("allows nothing"), "{invalid:?}");
        }
    }

    #[test]
    fn known_fields_and_label_keys_are_not_unknown() {
        let rule = serde_json::json!({
            "from": [
                {"podSelector": {"matchLabels": {"frm": "x", "nested": "y"},
                                 "matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]},
                 "namespaceSelector": {}},
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                {"podSelector": null}
            ],
            "ports": [{"protocol": "TCP", "port": 80, "endPort": 90}]
        });
        assert_eq!(unknown_field("r", Direction::Ingress, &rule), None);
        // Wrong types are for deserialisation to report.
        for rule in [
            serde_json::json!("nope"),
            serde_json::json!({"from": {"podSelector": {}}}),
            serde_json::json!({"ports": [7]}),
        ] {
            assert_eq!(unknown_field("r", Direction::Ingress, &rule), None);
        }
    }

    #[test]
    fn named_egress_port_without_peers_adds_an_all_pods_peer() {
        let parsed = rule_from(
            serde_json::json!({"ports": [{"port": "http"}]}),
            Direction::Egress,
        )
        .unwrap();
        assert_eq!(parsed.rule.peers.len(), 3);
        let parsed = rule_from(
            serde_json::json!({"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": "http"}]}),
            Direction::Egress,
        )
        .unwrap();
        assert_eq!(parsed.notices.len(), 1);
    }
}
