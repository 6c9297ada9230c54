//! The upstream Kubernetes NetworkPolicy e2e cases (test/e2e/network/netpol) as truth
//! tables, written from their meaning: namespaces x/y/z, pods a/b/c labelled
//! `pod=<name>`, servers on TCP/UDP/SCTP 80 and 81 with named ports `serve-80-tcp`
//! etc., one Service per pod; every pod probes every other pod by pod IP and by
//! ClusterIP. A probe passes iff the source's egress AND the destination's ingress
//! allow it, decided through `Tables::allows`.
//!
//! Each case is run as a plain NetworkPolicy (with `enforce_networkpolicies`) and,
//! where the target is the single pod x/a, as a RayCluster whose worker x/a is.

use rayfence::policy::Engine;
use rayfence::tables::Direction;
use rayfence_tests::objects::typed::*;
use rayfence_tests::policy::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
type P = (&'static str, &'static str);
const XA: P = ("x", "a");

/// 1-based (namespace, pod) numbers, the last two octets of the pod's addresses.
fn numbers(p: P) -> (usize, usize) {
    let n = NAMESPACES.iter().position(|n| *n == p.0).unwrap() + 1;
    let i = PODS.iter().position(|x| *x == p.1).unwrap() + 1;
    (n, i)
}

fn pod_ip(p: P) -> String {
    let (n, i) = numbers(p);
    format!("10.{n}.0.{i}")
}

fn service_ip(p: P) -> String {
    let (n, i) = numbers(p);
    format!("10.96.{n}.{i}")
}

fn all_pods() -> Vec<P> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| (*n, *p)))
        .collect()
}

const SERVE: [(&str, &str, i32); 6] = [
    ("serve-80-tcp", "TCP", 80),
    ("serve-80-udp", "UDP", 80),
    ("serve-80-sctp", "SCTP", 80),
    ("serve-81-tcp", "TCP", 81),
    ("serve-81-udp", "UDP", 81),
    ("serve-81-sctp", "SCTP", 81),
];

fn pod_labels(p: P, ray: bool) -> Vec<(&'static str, &'static str)> {
    let mut l = vec![("pod", p.1)];
    if ray && p == XA {
        l.extend([
            ("ray.io/cluster", "rc"),
            ("ray.io/node-type", "worker"),
            ("ray.io/group", "g"),
        ]);
    }
    l
}

/// Pod `p` on this node, at its address, serving every port of [`SERVE`].
fn serving_pod(p: P, labels: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Pod {
    pod(p.0, p.1, labels, &pod_ip(p), NODE, &SERVE)
}

fn setup(ray: bool) -> Engine {
    let mut s = settings();
    s.enforce_networkpolicies = true;
    let mut e = Engine::new(s);
    for n in NAMESPACES {
        e.upsert_namespace(&namespace(n, &[("ns", n)]));
    }
    for p in all_pods() {
        e.upsert_pod(&serving_pod(p, &pod_labels(p, ray)));
        let svc = format!("s-{}", p.1);
        // Service port names as upstream: service-port-<proto>-<port>, target = port.
        let ports: Vec<(String, &str, i32)> = SERVE
            .iter()
            .map(|(_, proto, port)| {
                (
                    format!("service-port-{}-{port}", proto.to_lowercase()),
                    *proto,
                    *port,
                )
            })
            .collect();
        let ports_ref: Vec<(&str, &str, i32)> = ports
            .iter()
            .map(|(n, p, port)| (n.as_str(), *p, *port))
            .collect();
        e.upsert_service(&service(p.0, &svc, &service_ip(p), &ports_ref));
        e.upsert_endpoint_slice(&slice(p.0, &svc, &ports_ref, &[&pod_ip(p)]));
    }
    e
}

fn allowed(e: &Engine, local: P, direction: Direction, peer: &str, proto: &str, port: u16) -> bool {
    allows(e, local.0, local.1, direction, peer, proto, port)
}

/// Pod-IP probe and ClusterIP probe from `from` to `to`.
fn probe(e: &Engine, from: P, to: P, proto: &str, port: u16) -> (bool, bool) {
    let ingress = allowed(e, to, Direction::Ingress, &pod_ip(from), proto, port);
    let by_ip = allowed(e, from, Direction::Egress, &pod_ip(to), proto, port) && ingress;
    let by_service = allowed(e, from, Direction::Egress, &service_ip(to), proto, port) && ingress;
    (by_ip, by_service)
}

type Expect = fn(P, P, &str, u16) -> bool;

const PROBES: [(&str, u16); 6] = [
    ("TCP", 80),
    ("TCP", 81),
    ("UDP", 80),
    ("UDP", 81),
    ("SCTP", 80),
    ("SCTP", 81),
];

/// Checks the whole truth table; self-probes are skipped (loopback never reaches
/// the pod's boundary).
fn check(e: &Engine, case: &str, expect: Expect) {
    let mut wrong = Vec::new();
    for from in all_pods() {
        for to in all_pods() {
            if from == to {
                continue;
            }
            for (proto, port) in PROBES {
                let want = expect(from, to, proto, port);
                let (ip, svc) = probe(e, from, to, proto, port);
                if ip != want || svc != want {
                    wrong.push(format!(
                        "{}/{} -> {}/{} {proto}/{port}: want {want}, pod IP {ip}, service {svc}",
                        from.0, from.1, to.0, to.1
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "case {case}:\n{}", wrong.join("\n"));
}

/// A NetworkPolicy in x selecting `pod=a` (or every pod when `target` is `{}`).
fn netpol_yaml(
    name: &str,
    target: &str,
    types: &str,
    ingress: Option<&str>,
    egress: Option<&str>,
) -> String {
    let mut s = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {target}\n  policyTypes: {types}\n"
    );
    if let Some(i) = ingress {
        s += &format!("  ingress: {i}\n");
    }
    if let Some(eg) = egress {
        s += &format!("  egress: {eg}\n");
    }
    s
}

/// `deny` in x: every pod of x isolated in both directions, nothing allowed.
fn deny_all_in_x() -> k8s_openapi::api::networking::v1::NetworkPolicy {
    netpol(&netpol_yaml("deny", "{}", "[Ingress, Egress]", None, None))
}

/// A RayCluster `rc` in x whose only pod is the worker x/a.
fn raycluster_yaml(ingress: Option<&str>, egress: Option<&str>) -> String {
    let mode = match (ingress, egress) {
        (Some(_), Some(_)) => "DenyAll",
        (Some(_), None) => "DenyAllIngress",
        _ => "DenyAllEgress",
    };
    let mut s = format!(
        "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {{name: rc, namespace: x}}\nspec:\n  networkPolicy:\n    mode: {mode}\n    worker:\n"
    );
    if let Some(i) = ingress {
        s += &format!("      ingressRules: {}\n", i);
    }
    if let Some(eg) = egress {
        s += &format!("      egressRules: {eg}\n");
    }
    s
}

/// Runs a case that targets x/a both as a NetworkPolicy and as RayCluster rules.
fn run_on_xa(case: &str, ingress: Option<&str>, egress: Option<&str>, expect: Expect) {
    let types = match (ingress, egress) {
        (Some(_), Some(_)) => "[Ingress, Egress]",
        (Some(_), None) => "[Ingress]",
        _ => "[Egress]",
    };
    let mut e = setup(false);
    e.upsert_network_policy(&netpol(&netpol_yaml(
        "p",
        "{matchLabels: {pod: a}}",
        types,
        ingress,
        egress,
    )));
    check(&e, &format!("{case} (NetworkPolicy)"), expect);
    let mut e = setup(true);
    e.upsert_raycluster(&raycluster(&raycluster_yaml(ingress, egress)));
    check(&e, &format!("{case} (RayCluster)"), expect);
}

#[test]
fn no_policy_allows_everything() {
    check(&setup(false), "no policy", |_, _, _, _| true);
}

#[test]
fn default_deny_ingress() {
    let mut e = setup(false);
    e.upsert_network_policy(&netpol(&netpol_yaml("deny", "{}", "[Ingress]", None, None)));
    check(&e, "default deny ingress", |_, to, _, _| to.0 != "x");
}

#[test]
fn default_deny_egress() {
    let mut e = setup(false);
    e.upsert_network_policy(&netpol(&netpol_yaml("deny", "{}", "[Egress]", None, None)));
    check(&e, "default deny egress", |from, _, _, _| from.0 != "x");
}

#[test]
fn default_deny_all() {
    let mut e = setup(false);
    e.upsert_network_policy(&deny_all_in_x());
    check(&e, "default deny all", |from, to, _, _| {
        from.0 != "x" && to.0 != "x"
    });
}

#[test]
fn deny_ingress_to_one_pod_as_raycluster_and_netpol() {
    run_on_xa("deny ingress x/a", Some("[]"), None, |_, to, _, _| to != XA);
}

#[test]
fn allow_from_pod_selector_in_the_same_namespace() {
    run_on_xa(
        "pod selector",
        Some("[{from: [{podSelector: {matchLabels: {pod: b}}}]}]"),
        None,
        |from, to, _, _| to != XA || from == ("x", "b"),
    );
}

#[test]
fn allow_from_namespace_selector() {
    run_on_xa(
        "namespace selector",
        Some("[{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"),
        None,
        |from, to, _, _| to != XA || from.0 == "y",
    );
}

#[test]
fn allow_from_namespace_match_expressions_not_in() {
    run_on_xa(
        "namespace NotIn",
        Some(
            "[{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]}]",
        ),
        None,
        |from, to, _, _| to != XA || from.0 != "x",
    );
}

#[test]
fn allow_from_pod_match_expressions_in() {
    run_on_xa(
        "pod In",
        Some(
            "[{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]",
        ),
        None,
        |from, to, _, _| to != XA || (from.0 == "x" && from.1 != "a"),
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and() {
    run_on_xa(
        "AND",
        Some(
            "[{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, podSelector: {matchLabels: {pod: b}}}]}]",
        ),
        None,
        |from, to, _, _| to != XA || (from.0 != "x" && from.1 == "b"),
    );
}

#[test]
fn namespace_and_pod_selector_as_two_peers_is_or() {
    run_on_xa(
        "OR",
        Some(
            "[{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}, {podSelector: {matchLabels: {pod: b}}}]}]",
        ),
        None,
        |from, to, _, _| to != XA || from.0 != "x" || from.1 == "b",
    );
}

#[test]
fn allow_on_one_numeric_port() {
    run_on_xa(
        "port 81",
        Some(
            "[{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81, protocol: TCP}]}]",
        ),
        None,
        |from, to, proto, port| to != XA || (from.0 == "y" && proto == "TCP" && port == 81),
    );
}

#[test]
fn allow_on_one_named_port() {
    run_on_xa(
        "named port serve-81-tcp",
        Some("[{ports: [{port: serve-81-tcp, protocol: TCP}]}]"),
        None,
        |_, to, proto, port| to != XA || (proto == "TCP" && port == 81),
    );
}

#[test]
fn named_port_with_another_protocol_matches_nothing() {
    run_on_xa(
        "serve-81-tcp as UDP",
        Some("[{ports: [{port: serve-81-tcp, protocol: UDP}]}]"),
        None,
        |_, to, _, _| to != XA,
    );
}

#[test]
fn allow_on_a_port_range() {
    run_on_xa(
        "endPort 81-90",
        Some("[{ports: [{port: 81, endPort: 90, protocol: TCP}]}]"),
        None,
        |_, to, proto, port| to != XA || (proto == "TCP" && port == 81),
    );
}

#[test]
fn protocol_only_rules() {
    run_on_xa(
        "UDP only",
        Some("[{ports: [{protocol: UDP}]}]"),
        None,
        |_, to, proto, _| to != XA || proto == "UDP",
    );
    run_on_xa(
        "SCTP only",
        Some("[{ports: [{protocol: SCTP}]}]"),
        None,
        |_, to, proto, _| to != XA || proto == "SCTP",
    );
}

#[test]
fn egress_to_another_namespace() {
    run_on_xa(
        "egress to y",
        None,
        Some("[{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"),
        |from, to, _, _| from != XA || to.0 == "y",
    );
}

#[test]
fn egress_on_a_named_port_resolves_on_each_destination() {
    run_on_xa(
        "egress serve-80-udp",
        None,
        Some("[{ports: [{port: serve-80-udp, protocol: UDP}]}]"),
        |from, _, proto, port| from != XA || (proto == "UDP" && port == 80),
    );
}

#[test]
fn egress_ip_block_with_except() {
    // 10.0.0.0/8 minus y's pods (10.2.0.0/24) but y/b (10.2.0.2) back in via a /32.
    run_on_xa(
        "ipBlock except",
        None,
        Some(
            "[{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.2.0.0/24]}}]}, {to: [{ipBlock: {cidr: 10.2.0.2/32}}], ports: [{port: 80}]}]",
        ),
        |from, to, proto, port| {
            from != XA || to.0 != "y" || (to.1 == "b" && proto == "TCP" && port == 80)
        },
    );
}

#[test]
fn ingress_ip_block_with_except() {
    run_on_xa(
        "ingress ipBlock",
        Some("[{from: [{ipBlock: {cidr: 10.0.0.0/14, except: [10.3.0.0/16]}}]}]"),
        None,
        |from, to, _, _| to != XA || from.0 != "z",
    );
}

#[test]
fn stacked_policies_are_a_union() {
    let mut e = setup(false);
    let p1 = netpol_yaml(
        "p1",
        "{matchLabels: {pod: a}}",
        "[Ingress]",
        Some("[{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]"),
        None,
    );
    let p2 = netpol_yaml(
        "p2",
        "{matchLabels: {pod: a}}",
        "[Ingress]",
        Some("[{from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]"),
        None,
    );
    e.upsert_network_policy(&netpol(&p1));
    e.upsert_network_policy(&netpol(&p2));
    let expect: Expect = |from, to, proto, port| {
        to != XA
            || (proto == "TCP" && ((from.0 == "y" && port == 80) || (from.0 == "z" && port == 81)))
    };
    check(&e, "stacked", expect);
    // The same as two user rules of a RayCluster.
    let mut e = setup(true);
    e.upsert_raycluster(&raycluster(&raycluster_yaml(
        Some("[{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}, {from: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: 81}]}]"),
        None,
    )));
    check(&e, "stacked (RayCluster)", expect);
    // A RayCluster and a NetworkPolicy on the same pod are a union too.
    e.upsert_network_policy(&netpol(&netpol_yaml(
        "p3",
        "{matchLabels: {pod: a}}",
        "[Ingress]",
        Some("[{from: [{podSelector: {matchLabels: {pod: c}}}]}]"),
        None,
    )));
    check(&e, "RayCluster + NetworkPolicy", |from, to, proto, port| {
        to != XA
            || from == ("x", "c")
            || (proto == "TCP" && ((from.0 == "y" && port == 80) || (from.0 == "z" && port == 81)))
    });
}

#[test]
fn ingress_and_egress_together_on_both_ends() {
    let mut e = setup(false);
    // x/a may only talk to x/b; x/b only accepts from x/a.
    e.upsert_network_policy(&netpol(&netpol_yaml(
        "a",
        "{matchLabels: {pod: a}}",
        "[Egress]",
        None,
        Some("[{to: [{podSelector: {matchLabels: {pod: b}}}]}]"),
    )));
    e.upsert_network_policy(&netpol(&netpol_yaml(
        "b",
        "{matchLabels: {pod: b}}",
        "[Ingress]",
        Some("[{from: [{podSelector: {matchLabels: {pod: a}}}]}]"),
        None,
    )));
    check(&e, "both ends", |from, to, _, _| {
        let a_ok = from != XA || to == ("x", "b");
        let b_ok = to != ("x", "b") || from == XA;
        a_ok && b_ok
    });
}

#[test]
fn updated_pod_and_namespace_labels_take_effect() {
    let mut e = setup(false);
    e.upsert_network_policy(&netpol(&netpol_yaml(
        "p",
        "{matchLabels: {pod: a}}",
        "[Ingress]",
        Some("[{from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {role: client}}}]}]"),
        None,
    )));
    check(&e, "nothing matches yet", |_, to, _, _| to != XA);
    e.upsert_namespace(&namespace("y", &[("ns", "y"), ("team", "blue")]));
    check(&e, "namespace labelled, no pod yet", |_, to, _, _| to != XA);
    e.upsert_pod(&serving_pod(
        ("y", "c"),
        &[("pod", "c"), ("role", "client")],
    ));
    check(&e, "pod labelled", |from, to, _, _| {
        to != XA || from == ("y", "c")
    });
    e.upsert_namespace(&namespace("y", &[("ns", "y")]));
    check(&e, "namespace unlabelled", |_, to, _, _| to != XA);
    // The policy's own selector follows pod labels too.
    e.upsert_namespace(&namespace("y", &[("ns", "y"), ("team", "blue")]));
    e.upsert_pod(&serving_pod(XA, &[("pod", "moved")]));
    check(&e, "target relabelled away", |_, _, _, _| true);
}

#[test]
fn deleting_a_policy_restores_access() {
    let mut e = setup(false);
    e.upsert_network_policy(&deny_all_in_x());
    check(&e, "deny all", |from, to, _, _| {
        from.0 != "x" && to.0 != "x"
    });
    e.remove_network_policy("x", "deny");
    check(&e, "deleted", |_, _, _, _| true);
    let mut e = setup(true);
    e.upsert_raycluster(&raycluster(&raycluster_yaml(Some("[]"), Some("[]"))));
    check(&e, "RayCluster deny", |from, to, _, _| {
        from != XA && to != XA
    });
    e.remove_raycluster("x", "rc");
    check(&e, "RayCluster deleted", |_, _, _, _| true);
}

#[test]
fn networkpolicies_are_ignored_unless_enforced() {
    let mut e = Engine::new(settings());
    for p in all_pods() {
        e.upsert_pod(&serving_pod(p, &pod_labels(p, false)));
    }
    e.upsert_network_policy(&deny_all_in_x());
    assert!(allowed(
        &e,
        XA,
        Direction::Ingress,
        &pod_ip(("y", "b")),
        "TCP",
        80
    ));
}
