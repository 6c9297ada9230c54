//! Flow-level explanation: `explain --from A --to B[:port[/proto]]` resolved to
//! addresses, each side (egress at A, ingress at B or at each backend of a
//! ClusterIP or of a port the node DNATs: a `nodePort`, a `hostPort`) explained by
//! [`Engine::explain`] from the rows the datapath holds, and the verdict combined the
//! way the datapath combines them (a flow passes only if every side lets it). Also
//! names the ends of a flow for flow events.
//!
//! docs/semantics.md "What counts as the node": a backend behind a node port judges the flow by its original source
//! (`--from`), whatever the node's SNAT makes of it; a hostNetwork pod of this node is
//! judged by its identity ([`Engine::explain_identified`]), not as the node.
//!
//! The running agent answers from its own engine: a side on another node is
//! `elsewhere`. Offline (`--manifests`), the CLI builds an engine in which every pod
//! is local, so both sides are decided.
//!
//! In a query's story this is who explains: the loop (`runtime::answers`) or the
//! offline command (`cli`) calls [`explain_flow`], which asks the engine one side
//! at a time (`policy::engine::explain`) and fills in the [`super::wire`] report
//! that the server encodes and `cli::render` prints.
//!
//! Must not: hold state or do I/O; every answer comes from the engine as it is.
use std::net::IpAddr;

use super::wire::{ExplainReport, ExplainSide, FlowEnd};
use crate::policy::{
    AddressOwner, Engine, Explanation, NodePortOwner, ObjectRef, Role, RuleOrigin,
};
use crate::tables::{Direction, EndpointId, IdentityId, protocol};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("{flag} {value:?}: {why}")]
    BadArgument {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("{flag} {value:?}: pod {namespace}/{name} is not known to the agent")]
    UnknownPod {
        flag: &'static str,
        value: String,
        namespace: String,
        name: String,
    },
    #[error("{flag} {value:?}: pod {namespace}/{name} has no IP address yet")]
    NoAddress {
        flag: &'static str,
        value: String,
        namespace: String,
        name: String,
    },
    #[error("--from and --to have no address family in common ({from} and {to})")]
    NoCommonFamily { from: String, to: String },
    /// The pod has no Pod object at the agent yet, but the CNI plugin holds it.
    #[error("pod {pod} is not known to the agent yet: denied, {because}")]
    Guarded { pod: String, because: String },
}

/// One end as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamedEnd {
    Pod { namespace: String, name: String },
    Address(IpAddr),
}

/// `--to`, parsed: the end, the protocol and the port (0 with ICMP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub end: NamedEnd,
    /// `None`: ICMP echo (the family's ICMP, chosen once addresses are known).
    pub protocol: Option<u8>,
    pub port: u16,
}

/// `ns/pod` or an IP address.
pub fn parse_end(flag: &'static str, value: &str) -> Result<NamedEnd, ExplainError> {
    let bad = |why: &str| ExplainError::BadArgument {
        flag,
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let trimmed = value.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(NamedEnd::Address(ip));
    }
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(NamedEnd::Pod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(bad("expected NAMESPACE/POD or an IP address")),
    }
}

/// `ns/pod`, `ns/pod:8265`, `ns/pod:53/udp`, `10.0.0.7:6379`, `[fd00::7]:6379/tcp`,
/// `fd00::7` (no port: ICMP echo).
pub fn parse_destination(value: &str) -> Result<Destination, ExplainError> {
    const FLAG: &str = "--to";
    let bad = |why: String| ExplainError::BadArgument {
        flag: FLAG,
        value: value.to_owned(),
        why,
    };
    // A bare IPv6 address has colons but no port.
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(Destination {
            end: NamedEnd::Address(ip),
            protocol: None,
            port: 0,
        });
    }
    let (end, rest) = if let Some(stripped) = value.strip_prefix('[') {
        let (addr, rest) = stripped
            .split_once(']')
            .ok_or_else(|| bad("unclosed '['".into()))?;
        let rest = match rest {
            "" => None,
            r => Some(
                r.strip_prefix(':')
                    .ok_or_else(|| bad("expected ':PORT' after ']'".into()))?,
            ),
        };
        (addr, rest)
    } else {
        match value.rsplit_once(':') {
            Some((end, rest)) => (end, Some(rest)),
            None => (value, None),
        }
    };
    let end = parse_end(FLAG, end).map_err(|_| bad("expected NAMESPACE/POD or an IP".into()))?;
    let Some(rest) = rest else {
        return Ok(Destination {
            end,
            protocol: None,
            port: 0,
        });
    };
    let (port, proto) = match rest.split_once('/') {
        Some((port, proto)) => (port, proto),
        None => (rest, "tcp"),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(format!("port {port:?} is not a number from 1 to 65535")))?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => protocol::TCP,
        "udp" => protocol::UDP,
        "sctp" => protocol::SCTP,
        other => {
            return Err(bad(format!(
                "protocol {other:?}: expected tcp, udp or sctp"
            )));
        }
    };
    Ok(Destination {
        end,
        protocol: Some(protocol),
        port,
    })
}

/// The protocol's name in reports.
pub fn protocol_name(number: u8) -> String {
    match number {
        protocol::TCP => "tcp".into(),
        protocol::UDP => "udp".into(),
        protocol::SCTP => "sctp".into(),
        protocol::ICMP => "icmp".into(),
        protocol::ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// `head`, `worker` or `worker/<group>`.
pub fn role_name(role: &Role) -> String {
    match role {
        Role::Head => "head".into(),
        Role::Worker => "worker".into(),
        Role::Group(group) => format!("worker/{group}"),
    }
}

/// Names an address the way flow events and explain show it.
pub fn describe(engine: &Engine, ip: IpAddr, port: u16) -> FlowEnd {
    let mut end = FlowEnd {
        ip,
        port,
        kind: "world".into(),
        namespace: None,
        name: None,
        raycluster: None,
        cidr: None,
    };
    match engine.address_owner(ip) {
        AddressOwner::Node => end.kind = "node".into(),
        AddressOwner::Pod {
            pod: (namespace, name),
            raycluster,
        } => {
            end.kind = "pod".into();
            end.namespace = Some(namespace);
            end.name = Some(name);
            end.raycluster = raycluster;
        }
        AddressOwner::Service((namespace, name)) => {
            end.kind = "service".into();
            end.namespace = Some(namespace);
            end.name = Some(name);
        }
        AddressOwner::Cidr(net) => {
            end.kind = "cidr".into();
            end.cidr = Some(net.to_string());
        }
        AddressOwner::World => {}
    }
    end
}

/// A rule, as a person finds it in the object: `RayCluster ray/rc head.ingressRules[1]`.
pub fn render_rule(object: &ObjectRef, origin: &RuleOrigin) -> String {
    let who = format!("{} {}/{}", object.kind, object.namespace, object.name);
    let rules = |direction: &Direction| match direction {
        Direction::Ingress => "ingressRules",
        Direction::Egress => "egressRules",
    };
    match origin {
        RuleOrigin::SameCluster => format!("base flow: pods of the same RayCluster ({who})"),
        RuleOrigin::Operator => format!("base flow: the KubeRay operator ({who})"),
        RuleOrigin::Submitter => format!("base flow: the RayJob submitter ({who})"),
        RuleOrigin::Dns => format!("base flow: cluster DNS ({who})"),
        RuleOrigin::User {
            role,
            direction,
            index,
        } => {
            let role = match role {
                Role::Head => "head".to_owned(),
                Role::Worker => "worker".to_owned(),
                Role::Group(group) => format!("workerGroups[{group}]"),
            };
            format!("{who} {role}.{}[{index}]", rules(direction))
        }
        RuleOrigin::NetworkPolicy {
            direction, index, ..
        } => {
            let field = match direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            };
            format!("{who} spec.{field}[{index}]")
        }
    }
}

/// Explains a flow from the engine's current state.
pub fn explain_flow(engine: &Engine, from: &str, to: &str) -> Result<ExplainReport, ExplainError> {
    let source = parse_end("--from", from)?;
    let destination = parse_destination(to)?;
    let from_ips = addresses(engine, "--from", from, &source)?;
    let to_ips = addresses(engine, "--to", to, &destination.end)?;
    let (from_ip, to_ip) = pick_family(&from_ips, &to_ips)?;
    let (proto, port) = match destination.protocol {
        Some(p) => (p, destination.port),
        None if to_ip.is_ipv4() => (protocol::ICMP, 0),
        None => (protocol::ICMPV6, 0),
    };
    // A hostNetwork pod of this node is judged by its identity, not as the node.
    let from_identity = host_network_identity(engine, &source);
    let to_identity = host_network_identity(engine, &destination.end);

    let mut sides = vec![side(
        engine,
        Direction::Egress,
        from_ip,
        (to_ip, to_identity),
        proto,
        port,
        &source,
    )];
    let peer = (from_ip, from_identity);
    let backend_sides = |backends: Vec<(IpAddr, u8, u16)>, sides: &mut Vec<ExplainSide>| {
        for (backend, proto, target) in backends {
            let end = match engine.address_owner(backend) {
                AddressOwner::Pod { pod, .. } => NamedEnd::Pod {
                    namespace: pod.0,
                    name: pod.1,
                },
                _ => NamedEnd::Address(backend),
            };
            // Judged by the original source, as the node saw it before any SNAT.
            sides.push(side(
                engine,
                Direction::Ingress,
                backend,
                peer,
                proto,
                target,
                &end,
            ));
        }
    };
    let no_backend = |what: String| ExplainSide {
        direction: "ingress".into(),
        pod: None,
        verdict: "not-enforced".into(),
        because: format!("{what} has no backend for {}/{port}", protocol_name(proto)),
        rules: Vec::new(),
        audit: false,
    };
    let node_port = match engine.address_owner(to_ip) {
        AddressOwner::Node => engine.node_port_owner(proto, port),
        _ => None,
    };
    match (engine.address_owner(to_ip), node_port) {
        (AddressOwner::Service(service), _) => {
            let backends = engine.cluster_ip_backends(to_ip, proto, port);
            if backends.is_empty() {
                sides.push(no_backend(format!("Service {}/{}", service.0, service.1)));
            }
            backend_sides(backends, &mut sides);
        }
        (_, Some(owner)) => {
            // The node DNATs this port: the flow lands on the backends, wherever they
            // run (in a conflict, on either claimant's).
            let backends = engine.node_port_backends(proto, port);
            if backends.is_empty() {
                sides.push(no_backend(node_port_words(&owner)));
            }
            backend_sides(backends, &mut sides);
        }
        _ => sides.push(side(
            engine,
            Direction::Ingress,
            to_ip,
            peer,
            proto,
            port,
            &destination.end,
        )),
    }
    let verdict = combine(&sides);
    Ok(ExplainReport {
        from: named_end(engine, &source, from_ip, 0),
        to: named_end(engine, &destination.end, to_ip, port),
        protocol: protocol_name(proto),
        verdict,
        sides,
    })
}

/// The identity of a named end that is a hostNetwork pod of this node.
fn host_network_identity(engine: &Engine, end: &NamedEnd) -> Option<IdentityId> {
    match end {
        NamedEnd::Pod { namespace, name } => engine.host_network_identity(namespace, name),
        NamedEnd::Address(_) => None,
    }
}

/// An end as reports show it: a hostNetwork pod by its name, not as its node.
fn named_end(engine: &Engine, end: &NamedEnd, ip: IpAddr, port: u16) -> FlowEnd {
    let mut out = describe(engine, ip, port);
    if let NamedEnd::Pod { namespace, name } = end
        && let Some(facts) = engine.pod_facts(namespace, name).filter(|f| f.host_network)
    {
        out.kind = "pod".into();
        out.namespace = Some(namespace.clone());
        out.name = Some(name.clone());
        out.raycluster = facts.raycluster;
    }
    out
}

/// `Service ns/name's nodePort`, `hostPort of pod ns/name`, `both ...`.
fn node_port_words(owner: &NodePortOwner) -> String {
    match owner {
        NodePortOwner::Service((ns, name)) => format!("the nodePort of Service {ns}/{name}"),
        NodePortOwner::HostPort((ns, name)) => format!("the hostPort of pod {ns}/{name}"),
        NodePortOwner::Conflict(objects) => format!(
            "the node port claimed by {}",
            objects
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    }
}

/// Denied anywhere (and not only in audit) → `denied`; denied only where audit
/// mode passes it → `audit`; a side on another node → `unknown`; else `allowed`.
pub fn combine(sides: &[ExplainSide]) -> String {
    let denied: Vec<&ExplainSide> = sides.iter().filter(|s| s.verdict == "denied").collect();
    if denied.iter().any(|s| !s.audit) {
        "denied".into()
    } else if !denied.is_empty() {
        "audit".into()
    } else if sides.iter().any(|s| s.verdict == "elsewhere") {
        "unknown".into()
    } else {
        "allowed".into()
    }
}

fn addresses(
    engine: &Engine,
    flag: &'static str,
    value: &str,
    end: &NamedEnd,
) -> Result<Vec<IpAddr>, ExplainError> {
    match end {
        NamedEnd::Address(ip) => Ok(vec![*ip]),
        NamedEnd::Pod { namespace, name } => {
            let facts =
                engine
                    .pod_facts(namespace, name)
                    .ok_or_else(|| ExplainError::UnknownPod {
                        flag,
                        value: value.to_owned(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                    })?;
            if facts.ips.is_empty() {
                return Err(ExplainError::NoAddress {
                    flag,
                    value: value.to_owned(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
            Ok(facts.ips)
        }
    }
}

/// IPv4 when both ends have it, else IPv6.
fn pick_family(from: &[IpAddr], to: &[IpAddr]) -> Result<(IpAddr, IpAddr), ExplainError> {
    for v4 in [true, false] {
        let f = from.iter().find(|ip| ip.is_ipv4() == v4);
        let t = to.iter().find(|ip| ip.is_ipv4() == v4);
        if let (Some(f), Some(t)) = (f, t) {
            return Ok((*f, *t));
        }
    }
    let list = |ips: &[IpAddr]| {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    Err(ExplainError::NoCommonFamily {
        from: list(from),
        to: list(to),
    })
}

/// One side: `direction` at the pod that owns `local` (if rayfence isolates it here),
/// with `peer` (its address, and its identity when the datapath knows it by socket).
fn side(
    engine: &Engine,
    direction: Direction,
    local: IpAddr,
    peer: (IpAddr, Option<IdentityId>),
    proto: u8,
    port: u16,
    named: &NamedEnd,
) -> ExplainSide {
    let (peer, peer_identity) = peer;
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let mut out = ExplainSide {
        direction: dir.into(),
        pod: None,
        verdict: "not-enforced".into(),
        because: String::new(),
        rules: Vec::new(),
        audit: false,
    };
    let pod = match (named, engine.address_owner(local)) {
        (NamedEnd::Pod { namespace, name }, _) => Some((namespace.clone(), name.clone())),
        (_, AddressOwner::Pod { pod, .. }) => Some(pod),
        _ => None,
    };
    let Some((namespace, name)) = pod else {
        out.because = format!("{local} is not a pod: rayfence enforces nothing at that end");
        return out;
    };
    out.pod = Some(format!("{namespace}/{name}"));
    let facts = engine.pod_facts(&namespace, &name);
    if facts.as_ref().is_some_and(|f| f.host_network) {
        out.because = format!(
            "{namespace}/{name} is a hostNetwork pod: rayfence isolates none (its peers judge its traffic by its labels and namespace)"
        );
        return out;
    }
    let Some(endpoint) = engine
        .endpoint_id(&namespace, &name)
        .or_else(|| engine.endpoint_at(local))
    else {
        if facts.is_some_and(|f| f.local) {
            out.because = format!("{namespace}/{name} is not isolated by rayfence");
        } else {
            out.verdict = "elsewhere".into();
            out.because =
                format!("{namespace}/{name} runs on another node: its agent decides this side");
        }
        return out;
    };
    out.audit = engine
        .tables()
        .endpoints
        .get(&endpoint)
        .is_some_and(|e| e.audit);
    let what = format!("{}/{port}", protocol_name(proto));
    let peer_words = match direction {
        Direction::Ingress => format!("from {peer}"),
        Direction::Egress => format!("to {peer}"),
    };
    let explanation = match peer_identity {
        Some(id) => engine.explain_identified(endpoint, direction, peer, id, proto, port),
        None => engine.explain(endpoint, direction, peer, proto, port),
    };
    fill(
        &mut out,
        explanation,
        &format!("{dir} of {namespace}/{name}"),
        &format!("{what} {peer_words}"),
    );
    out
}

fn fill(out: &mut ExplainSide, explanation: Explanation, who: &str, flow: &str) {
    let render = |rules: &[(ObjectRef, RuleOrigin)]| {
        rules
            .iter()
            .map(|(object, origin)| render_rule(object, origin))
            .collect::<Vec<_>>()
    };
    match explanation {
        Explanation::UnknownEndpoint => out.because = format!("{who}: not a local endpoint"),
        Explanation::NotIsolated => out.because = format!("{who} is not isolated"),
        Explanation::Host => {
            out.verdict = "allowed".into();
            out.because = format!(
                "{flow}: this node's own processes are always allowed (nothing rewrites this port)"
            );
        }
        Explanation::Allowed(rules) => {
            out.verdict = "allowed".into();
            out.because = format!("{who} is isolated; {flow} is allowed");
            out.rules = render(&rules);
        }
        Explanation::AllowedViaService { service, rules } => {
            out.verdict = "allowed".into();
            out.because = format!(
                "{who} is isolated; {flow} is allowed: every backend of Service {}/{} is",
                service.0, service.1
            );
            out.rules = render(&rules);
        }
        Explanation::AllowedViaNodePort { owner, rules } => {
            out.verdict = "allowed".into();
            out.because = format!(
                "{who} is isolated; {flow} is allowed: the node forwards it ({}) and every backend is",
                node_port_words(&owner)
            );
            out.rules = render(&rules);
        }
        Explanation::Denied => {
            out.verdict = "denied".into();
            out.because = format!("{who} is isolated and no rule allows {flow}");
            if out.audit {
                out.because.push_str(" (audit mode: counted, not dropped)");
            }
        }
    }
}

/// The endpoint's role and cluster, as flow events and status show them.
pub fn endpoint_labels(engine: &Engine, endpoint: EndpointId) -> (Option<String>, Option<String>) {
    engine
        .endpoint_meta(endpoint)
        .map(|m| (m.cluster, m.role.as_ref().map(role_name)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_with_and_without_port_and_protocol() {
        let pod = |ns: &str, n: &str| NamedEnd::Pod {
            namespace: ns.into(),
            name: n.into(),
        };
        assert_eq!(
            parse_destination("ray/head").unwrap(),
            Destination {
                end: pod("ray", "head"),
                protocol: None,
                port: 0
            }
        );
        assert_eq!(
            parse_destination("ray/head:8265").unwrap(),
            Destination {
                end: pod("ray", "head"),
                protocol: Some(protocol::TCP),
                port: 8265
            }
        );
        assert_eq!(
            parse_destination("kube-system/dns:53/UDP")
                .unwrap()
                .protocol,
            Some(protocol::UDP)
        );
        let v6 = parse_destination("[fd00::7]:6379/sctp").unwrap();
        assert_eq!(v6.end, NamedEnd::Address("fd00::7".parse().unwrap()));
        assert_eq!((v6.protocol, v6.port), (Some(protocol::SCTP), 6379));
        assert_eq!(
            parse_destination("fd00::7").unwrap().end,
            NamedEnd::Address("fd00::7".parse().unwrap())
        );
        assert_eq!(
            parse_destination("10.0.0.1:80").unwrap().end,
            NamedEnd::Address("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn bad_destinations_name_the_flag_and_the_part() {
        for (value, part) in [
            ("ray/head:0", "port"),
            ("ray/head:http", "port"),
            ("ray/head:80/icmp", "protocol"),
            ("head", "NAMESPACE/POD"),
            ("[fd00::1", "'['"),
        ] {
            let error = parse_destination(value).unwrap_err().to_string();
            assert!(
                error.starts_with("--to") && error.contains(part),
                "{value}: {error}"
            );
        }
        assert!(
            parse_end("--from", "a/b/c")
                .unwrap_err()
                .to_string()
                .starts_with("--from")
        );
    }
}
