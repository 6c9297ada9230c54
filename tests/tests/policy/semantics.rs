//! Table tests for every part of docs/semantics.md (what counts as the node included: node ports, host ports,
//! hostNetwork pods) and the example manifests, decided through `Tables::allows` (the
//! datapath's lookup semantics) and, for a peer known by its socket,
//! `Tables::allows_identified`.

use rayfence::policy::{
    DnsMode, Engine, Explanation, ObjectRef, Role, RuleOrigin, Settings, Severity,
};
use rayfence::tables::{Direction, NodePort, identity};
use rayfence_tests::objects::typed::*;
use rayfence_tests::policy::*;

const OPERATOR: &[(&str, &str)] = &[
    ("app.kubernetes.io/name", "kuberay-operator"),
    ("app.kubernetes.io/component", "kuberay-operator"),
];

/// A RayCluster in `ns` named `name` with `block` (YAML, indented under `spec:`).
fn rc(ns: &str, name: &str, spec: &str) -> rayfence::crd::RayCluster {
    raycluster(&format!(
        "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    ))
}

fn ray_pod(
    ns: &str,
    name: &str,
    cluster: &str,
    node_type: &str,
    group: &str,
    ip: &str,
) -> k8s_openapi::api::core::v1::Pod {
    pod(
        ns,
        name,
        &[
            ("ray.io/cluster", cluster),
            ("ray.io/node-type", node_type),
            ("ray.io/group", group),
        ],
        ip,
        NODE,
        &[],
    )
}

/// The common scene: team-a/training (head 10.0.0.1, cpu worker 10.0.0.2, gpu worker
/// 10.0.0.3), a pod of another cluster, monitoring, registry, kube-dns, the operator.
fn scene(settings: Settings) -> Engine {
    let mut e = Engine::new(settings);
    for (ns, l) in [
        ("team-a", vec![]),
        ("team-b", vec![]),
        ("monitoring", vec![("purpose", "metrics")]),
        ("registry", vec![]),
        ("kube-system", vec![]),
        ("ray-system", vec![]),
    ] {
        e.upsert_namespace(&namespace(ns, &l));
    }
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-head",
        "training",
        "head",
        "headgroup",
        "10.0.0.1",
    ));
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-cpu",
        "training",
        "worker",
        "cpu",
        "10.0.0.2",
    ));
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-gpu",
        "training",
        "worker",
        "gpu",
        "10.0.0.3",
    ));
    e.upsert_pod(&ray_pod(
        "team-a",
        "other-head",
        "other",
        "head",
        "headgroup",
        "10.0.0.9",
    ));
    e.upsert_pod(&pod(
        "team-a",
        "plain",
        &[("app", "plain")],
        "10.0.0.20",
        "node-b",
        &[],
    ));
    e.upsert_pod(&pod(
        "team-b",
        "plain",
        &[("app", "plain")],
        "10.0.1.20",
        "node-b",
        &[],
    ));
    e.upsert_pod(&pod(
        "monitoring",
        "prom",
        &[("app", "prometheus")],
        "10.1.0.1",
        "node-b",
        &[],
    ));
    e.upsert_pod(&pod(
        "registry",
        "registry",
        &[("app", "model-registry")],
        "10.2.0.1",
        "node-b",
        &[("http", "TCP", 8000)],
    ));
    e.upsert_pod(&pod(
        "kube-system",
        "coredns",
        &[("k8s-app", "kube-dns")],
        "10.3.0.10",
        "node-b",
        &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
    ));
    e.upsert_service(&service(
        "kube-system",
        "kube-dns",
        "10.96.0.10",
        &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
    ));
    e.upsert_endpoint_slice(&slice(
        "kube-system",
        "kube-dns",
        &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
        &["10.3.0.10"],
    ));
    e.upsert_pod(&pod(
        "ray-system",
        "kuberay-operator",
        OPERATOR,
        "10.4.0.1",
        "node-b",
        &[],
    ));
    e
}

const DENY_ALL: &str = "  networkPolicy: {mode: DenyAll}";

// ---------------------------------------------------------------- section 1: inputs

#[test]
fn example_networkpolicy_v1_7_is_enforced() {
    let mut e = scene(settings());
    feed(
        &mut e,
        include_str!("fixtures/raycluster-networkpolicy-v1.7.yaml"),
    );
    let (h, cpu, gpu) = ("training-head", "training-cpu", "training-gpu");
    // head: Prometheus from namespace monitoring on 8080/TCP only.
    assert!(ingress(&e, "team-a", h, "10.1.0.1", "TCP", 8080));
    assert!(!ingress(&e, "team-a", h, "10.1.0.1", "TCP", 8081));
    assert!(!ingress(&e, "team-a", h, "10.1.0.1", "UDP", 8080));
    assert!(!ingress(&e, "team-a", h, "10.0.1.20", "TCP", 8080));
    // dashboard-port 8266 from rayStartParams for the operator.
    assert!(ingress(&e, "team-a", h, "10.4.0.1", "TCP", 8266));
    assert!(!ingress(&e, "team-a", h, "10.4.0.1", "TCP", 8265));
    // cpu uses `worker`: the object store range except 10.20.99.0/24, HTTPS only.
    assert!(egress(&e, "team-a", cpu, "10.20.1.1", "TCP", 443));
    assert!(!egress(&e, "team-a", cpu, "10.20.99.1", "TCP", 443));
    assert!(!egress(&e, "team-a", cpu, "10.20.1.1", "TCP", 80));
    assert!(!egress(&e, "team-a", cpu, "10.2.0.1", "TCP", 8000));
    // gpu's entry replaces `worker`: registry by named port, no object store.
    assert!(egress(&e, "team-a", gpu, "10.2.0.1", "TCP", 8000));
    assert!(!egress(&e, "team-a", gpu, "10.2.0.1", "TCP", 8001));
    assert!(!egress(&e, "team-a", gpu, "10.20.1.1", "TCP", 443));
    // Head egress: DenyAll with no head egress rules.
    assert!(!egress(&e, "team-a", h, "10.20.1.1", "TCP", 443));
    assert!(
        e.problems().iter().all(|p| p.severity == Severity::Notice),
        "{:?}",
        e.problems()
    );
}

#[test]
fn example_networkisolation_pr4638_is_enforced() {
    let mut e = scene(settings());
    let mut cluster = raycluster(include_str!(
        "fixtures/raycluster-networkisolation-pr4638.yaml"
    ));
    cluster.metadata.namespace = Some("team-a".into());
    cluster.metadata.name = Some("training".into());
    e.upsert_raycluster(&cluster);
    e.upsert_pod(&pod(
        "team-a",
        "nb",
        &[("app", "notebook")],
        "10.0.0.30",
        "node-b",
        &[],
    ));
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.0.0.30", "TCP", 10001, ALLOW),
            ("10.0.0.30", "TCP", 8265, DENY),
        ],
    );
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.0.30",
        "TCP",
        10001
    ));
    // DenyAllIngress: egress stays open.
    assert!(egress(&e, "team-a", "training-cpu", "8.8.8.8", "UDP", 53));
    // Every worker, whatever its group, gets `worker` (here: none).
    assert!(!ingress(
        &e,
        "team-a",
        "training-gpu",
        "10.0.0.30",
        "TCP",
        10001
    ));
}

#[test]
fn example_annotation_pre_v1_7_is_enforced() {
    let mut e = scene(settings());
    let mut cluster = raycluster(include_str!("fixtures/raycluster-annotation-pre-v1.7.yaml"));
    cluster.metadata.namespace = Some("team-a".into());
    cluster.metadata.name = Some("training".into());
    e.upsert_raycluster(&cluster);
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("1.2.3.4", "TCP", 443, ALLOW),
            ("169.254.169.254", "TCP", 443, DENY),
            ("1.2.3.4", "TCP", 80, DENY),
        ],
    );
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "1.2.3.4",
        "TCP",
        443
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.20",
        "TCP",
        8265
    ));
}

#[test]
fn example_pods_as_kuberay_labels_them_become_endpoints_by_node() {
    let mut e = Engine::new(settings());
    feed(
        &mut e,
        include_str!("fixtures/pods-as-kuberay-labels-them.yaml"),
    );
    feed(
        &mut e,
        include_str!("fixtures/raycluster-networkpolicy-v1.7.yaml"),
    );
    // Only the head runs on node-a.
    let id = e
        .endpoint_id("team-a", "training-head-8x2kq")
        .expect("head is local");
    assert!(
        e.endpoint_id("team-a", "training-cpu-worker-4m7zt")
            .is_none()
    );
    let meta = e.endpoint_meta(id).unwrap();
    assert_eq!(meta.uid, "0b6f3c52-2f0e-4a7b-9d35-51f3e0a1c001");
    assert_eq!(meta.cluster.as_deref(), Some("training"));
    assert_eq!(meta.role, Some(Role::Head));
    assert!(meta.policy.isolate_ingress && meta.policy.isolate_egress);
    // The remote worker is still a peer of the same cluster.
    assert!(ingress(
        &e,
        "team-a",
        "training-head-8x2kq",
        "10.244.2.11",
        "UDP",
        6379
    ));
    assert!(egress(
        &e,
        "team-a",
        "training-head-8x2kq",
        "10.244.2.11",
        "TCP",
        1234
    ));
}

#[test]
fn example_rayjob_owned_cluster_admits_its_submitter_to_the_dashboard() {
    let mut e = Engine::new(settings());
    e.upsert_pod(&ray_pod(
        "team-a",
        "eval-head",
        "nightly-eval-raycluster-x7k2p",
        "head",
        "headgroup",
        "10.0.0.1",
    ));
    feed(
        &mut e,
        include_str!("fixtures/raycluster-rayjob-owned.yaml"),
    );
    // DenyAllEgress: ingress not isolated at all.
    assert!(ingress(&e, "team-a", "eval-head", "10.9.9.9", "TCP", 22));
    assert!(!egress(&e, "team-a", "eval-head", "10.9.9.9", "TCP", 22));
    // Same cluster under DenyAll: the submitter gets the dashboard port only.
    let mut cluster = raycluster(
        &include_str!("fixtures/raycluster-rayjob-owned.yaml")
            .split("\n---")
            .next()
            .unwrap()
            .replace("mode: DenyAllEgress", "mode: DenyAll"),
    );
    e.upsert_raycluster(&cluster);
    e.upsert_pod(&pod(
        "team-a",
        "nightly-eval-submitter-5hq2d",
        &[
            ("ray.io/originated-from-cr-name", "nightly-eval"),
            ("ray.io/originated-from-crd", "RayJob"),
        ],
        "10.0.0.50",
        "node-b",
        &[],
    ));
    expect_ingress(
        &e,
        "team-a",
        "eval-head",
        &[
            ("10.0.0.50", "TCP", 8265, ALLOW),
            ("10.0.0.50", "TCP", 10001, DENY),
        ],
    );
    // Without the K8sJobMode label there is no submitter rule.
    cluster.metadata.labels = None;
    e.upsert_raycluster(&cluster);
    assert!(!ingress(
        &e,
        "team-a",
        "eval-head",
        "10.0.0.50",
        "TCP",
        8265
    ));
}

#[test]
fn submitter_rule_needs_controller_rayjob_owner_and_matching_labels() {
    let owned = |api: &str, kind: &str, controller: bool| {
        format!(
            "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata:\n  name: training\n  namespace: team-a\n  labels: {{ray.io/job-submission-mode: K8sJobMode}}\n  ownerReferences:\n  - {{apiVersion: {api}, kind: {kind}, name: job1, uid: u, controller: {controller}}}\nspec:\n  networkPolicy: {{mode: DenyAll}}\n"
        )
    };
    let submitter = |ns: &str, name: &str, job: &str, ip: &str| {
        pod(
            ns,
            name,
            &[
                ("ray.io/originated-from-cr-name", job),
                ("ray.io/originated-from-crd", "RayJob"),
            ],
            ip,
            "node-b",
            &[],
        )
    };
    let mut e = scene(settings());
    e.upsert_pod(&submitter("team-a", "sub", "job1", "10.0.0.50"));
    e.upsert_pod(&submitter("team-a", "sub-other-job", "job2", "10.0.0.51"));
    e.upsert_pod(&submitter("team-b", "sub-other-ns", "job1", "10.0.1.50"));
    e.upsert_raycluster(&raycluster(&owned("ray.io/v1", "RayJob", true)));
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.0.0.50", "TCP", 8265, ALLOW),
            ("10.0.0.51", "TCP", 8265, DENY),
            ("10.0.1.50", "TCP", 8265, DENY),
        ],
    );
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.0.50",
        "TCP",
        8265
    ));
    for (api, kind, controller) in [
        ("ray.io/v1", "RayJob", false),
        ("batch/v1", "RayJob", true),
        ("ray.io/v1", "RayService", true),
    ] {
        e.upsert_raycluster(&raycluster(&owned(api, kind, controller)));
        assert!(
            !ingress(&e, "team-a", "training-head", "10.0.0.50", "TCP", 8265),
            "{api} {kind} {controller}"
        );
    }
}

#[test]
fn annotation_accepts_json_and_the_spec_field_wins_over_it() {
    let mut e = scene(settings());
    let mut cluster = rc("team-a", "training", "  rayVersion: '2.52.0'");
    cluster.metadata.annotations = Some(labels(&[(
        "rayfence.io/network-policy",
        r#"{"mode":"DenyAllEgress","worker":{"egressRules":[{"ports":[{"port":443}]}]}}"#,
    )]));
    e.upsert_raycluster(&cluster);
    assert!(egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 443));
    assert!(!egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    assert!(ingress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    cluster.spec.network_policy = Some(serde_json::json!({"mode": "DenyAllIngress"}));
    e.upsert_raycluster(&cluster);
    assert!(egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    assert!(!ingress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    let problems = e.problems();
    assert!(
        problems.iter().any(
            |p| p.field == "metadata.annotations[rayfence.io/network-policy]"
                && p.severity == Severity::Notice
        ),
        "{problems:?}"
    );
}

#[test]
fn both_fields_set_network_policy_wins_and_is_reported() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy: {mode: DenyAllIngress}\n  networkIsolation: {mode: DenyAllEgress}",
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.0.20",
        "TCP",
        80
    ));
    assert!(egress(&e, "team-a", "training-cpu", "10.0.0.20", "TCP", 80));
    let problems = e.problems_for(&ObjectRef::new("RayCluster", "team-a", "training"));
    assert!(problems.iter().any(|p| p.field == "spec.networkIsolation" && p.message.contains("networkPolicy wins")));
}

#[test]
fn mode_defaults_to_deny_all_when_the_block_has_none() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", "  networkPolicy: {}"));
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.0.20",
        "TCP",
        80
    ));
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.0.20",
        "TCP",
        80
    ));
}

#[test]
fn cluster_without_isolation_leaves_its_pods_alone() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", "  rayVersion: '2.52.0'"));
    let id = e.endpoint_id("team-a", "training-head").unwrap();
    let policy = e.tables().endpoints[&id];
    assert!(!policy.isolate_ingress && !policy.isolate_egress);
    assert!(ingress(&e, "team-a", "training-head", "10.9.9.9", "TCP", 1));
    assert!(egress(&e, "team-a", "training-head", "10.9.9.9", "TCP", 1));
}

#[test]
fn worker_group_entry_replaces_worker_and_other_groups_use_worker() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAllEgress\n    worker:\n      egressRules: [{ports: [{port: 443}]}]\n    workerGroups:\n    - groupName: gpu\n      egressRules: [{ports: [{port: 8443}]}]",
    ));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("1.1.1.1", "TCP", 443, ALLOW),
            ("1.1.1.1", "TCP", 8443, DENY),
        ],
    );
    assert!(egress(&e, "team-a", "training-gpu", "1.1.1.1", "TCP", 8443));
    assert!(!egress(&e, "team-a", "training-gpu", "1.1.1.1", "TCP", 443));
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "1.1.1.1",
        "TCP",
        443
    ));
}

#[test]
fn rules_of_a_direction_the_mode_does_not_isolate_are_ignored() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAllIngress\n    worker:\n      egressRules: [{ports: [{port: 443}]}]\n      ingressRules: [{ports: [{port: 80}]}]",
    ));
    assert!(egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 22));
    assert!(ingress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    assert!(!ingress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 22));
    let id = e.endpoint_id("team-a", "training-cpu").unwrap();
    let policy_id = e.tables().endpoints[&id].policy_id;
    assert!(
        e.tables()
            .policy
            .iter()
            .filter(|r| r.policy_id == policy_id)
            .all(|r| r.direction == Direction::Ingress)
    );
}

#[test]
fn dashboard_and_client_ports_come_from_ray_start_params_with_fallback() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy: {mode: DenyAll}\n  headGroupSpec:\n    rayStartParams: {dashboard-port: '9000', ray-client-server-port: 'ten'}",
    ));
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.4.0.1", "TCP", 9000, ALLOW),
            ("10.4.0.1", "TCP", 8265, DENY),
            ("10.4.0.1", "TCP", 10001, ALLOW),
        ],
    );
    assert!(e.problems().iter().any(|p| p.field
        == "spec.headGroupSpec.rayStartParams[ray-client-server-port]"
        && p.value == "ten"));
}

// ------------------------------------------------------- section 2: which pods

#[test]
fn pods_with_only_the_cluster_label_are_not_isolated() {
    let mut e = scene(settings());
    e.upsert_pod(&pod(
        "team-a",
        "sidecar",
        &[("ray.io/cluster", "training")],
        "10.0.0.4",
        NODE,
        &[],
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(ingress(&e, "team-a", "sidecar", "10.9.9.9", "TCP", 1));
    assert!(egress(&e, "team-a", "sidecar", "10.9.9.9", "TCP", 1));
    // ... but it is a member of the cluster for the base flows.
    assert!(ingress(&e, "team-a", "training-head", "10.0.0.4", "TCP", 1));
}

#[test]
fn same_cluster_name_in_another_namespace_is_a_different_cluster() {
    let mut e = scene(settings());
    e.upsert_pod(&ray_pod(
        "team-b",
        "training-head",
        "training",
        "head",
        "headgroup",
        "10.0.1.1",
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let id = e.endpoint_id("team-b", "training-head").unwrap();
    assert!(!e.tables().endpoints[&id].isolate_ingress);
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.1.1",
        "TCP",
        1
    ));
}

#[test]
fn only_pods_on_this_node_are_endpoints() {
    let e = scene(settings());
    assert!(e.endpoint_id("team-a", "training-head").is_some());
    assert!(e.endpoint_id("team-a", "plain").is_none());
    assert!(e.endpoint_id("monitoring", "prom").is_none());
}

// ----------------------------------------------- section 3: what an isolated pod may do

#[test]
fn same_cluster_pods_may_talk_on_every_port_and_protocol() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    for (proto, port) in [("TCP", 6379), ("UDP", 1), ("SCTP", 9), ("ICMP", 0)] {
        assert!(ingress(
            &e,
            "team-a",
            "training-head",
            "10.0.0.2",
            proto,
            port
        ));
        assert!(egress(
            &e,
            "team-a",
            "training-head",
            "10.0.0.3",
            proto,
            port
        ));
        assert!(!ingress(
            &e,
            "team-a",
            "training-head",
            "10.0.0.9",
            proto,
            port
        ));
        assert!(!egress(
            &e,
            "team-a",
            "training-cpu",
            "10.0.0.20",
            proto,
            port
        ));
    }
}

#[test]
fn own_node_is_always_allowed_other_nodes_are_ordinary_peers() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(ingress(&e, "team-a", "training-head", NODE_IP, "TCP", 8080));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 10250));
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        OTHER_NODE_IP,
        "TCP",
        8080
    ));
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    head:\n      ingressRules: [{from: [{ipBlock: {cidr: 192.168.0.0/24}}]}]",
    ));
    assert!(ingress(
        &e,
        "team-a",
        "training-head",
        OTHER_NODE_IP,
        "TCP",
        8080
    ));
}

#[test]
fn operator_reaches_head_dashboard_and_client_ports_only() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.4.0.1", "TCP", 8265, ALLOW),
            ("10.4.0.1", "TCP", 10001, ALLOW),
            ("10.4.0.1", "UDP", 8265, DENY),
            ("10.4.0.1", "TCP", 6379, DENY),
        ],
    );
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.4.0.1",
        "TCP",
        8265
    ));
    let id = e.endpoint_id("team-a", "training-head").unwrap();
    let why = e.explain(id, Direction::Ingress, "10.4.0.1".parse().unwrap(), 6, 8265);
    assert!(
        matches!(&why, rayfence::policy::Explanation::Allowed(r) if r.iter().any(|(_, o)| *o == RuleOrigin::Operator)),
        "{why:?}"
    );
}

#[test]
fn operator_label_outside_operator_namespace_is_denied() {
    let mut e = scene(settings());
    e.upsert_pod(&pod(
        "team-b",
        "fake-operator",
        OPERATOR,
        "10.0.1.66",
        "node-b",
        &[],
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.1.66",
        "TCP",
        8265
    ));
    // Configurable: the operator namespace list is a setting.
    let mut s = settings();
    s.operator_namespaces = vec!["team-b".into()];
    let mut e = scene(s);
    e.upsert_pod(&pod(
        "team-b",
        "fake-operator",
        OPERATOR,
        "10.0.1.66",
        "node-b",
        &[],
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.0.1.66", "TCP", 8265, ALLOW),
            ("10.4.0.1", "TCP", 8265, DENY),
        ],
    );
}

#[test]
fn dns_service_and_its_pods_are_reachable_on_port_53_only() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    for p in ["UDP", "TCP"] {
        assert!(egress(&e, "team-a", "training-cpu", "10.96.0.10", p, 53));
        assert!(egress(&e, "team-a", "training-cpu", "10.3.0.10", p, 53));
        assert!(!egress(&e, "team-a", "training-cpu", "8.8.8.8", p, 53));
    }
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.3.0.10", "TCP", 9153, DENY),
            ("10.96.0.10", "TCP", 9153, DENY),
        ],
    );
    let id = e.endpoint_id("team-a", "training-cpu").unwrap();
    let why = e.explain(id, Direction::Egress, "10.96.0.10".parse().unwrap(), 17, 53);
    assert!(
        matches!(&why, rayfence::policy::Explanation::AllowedViaService { rules, .. } if rules.iter().any(|(_, o)| *o == RuleOrigin::Dns)),
        "{why:?}"
    );
}

#[test]
fn dns_peers_are_exactly_the_backends_of_the_dns_service() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    // A replica with the same labels that is not (yet) in the EndpointSlice.
    let spare = pod(
        "kube-system",
        "coredns-2",
        &[("k8s-app", "kube-dns")],
        "10.3.0.11",
        "node-b",
        &[("dns", "UDP", 53), ("dns-tcp", "TCP", 53)],
    );
    e.upsert_pod(&spare);
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.3.0.10", "UDP", 53, ALLOW),
            ("10.3.0.11", "UDP", 53, DENY),
        ],
    );
    let ports = [("dns", "UDP", 53), ("dns-tcp", "TCP", 53)];
    e.upsert_endpoint_slice(&slice(
        "kube-system",
        "kube-dns",
        &ports,
        &["10.3.0.10", "10.3.0.11"],
    ));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.3.0.11", "UDP", 53, ALLOW),
            ("10.96.0.10", "TCP", 53, ALLOW),
        ],
    );
    e.upsert_endpoint_slice(&slice("kube-system", "kube-dns", &ports, &["10.3.0.11"]));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.3.0.10", "UDP", 53, DENY),
            ("10.96.0.10", "UDP", 53, ALLOW),
        ],
    );
    e.remove_endpoint_slice("kube-system", "kube-dns-slice");
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.3.0.11", "UDP", 53, DENY),
            ("10.96.0.10", "UDP", 53, DENY),
        ],
    );
}

#[test]
fn dns_anywhere_and_off_settings() {
    let mut s = settings();
    s.dns = DnsMode::Anywhere;
    let mut e = scene(s);
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("8.8.8.8", "UDP", 53, ALLOW),
            ("2001:4860::8888", "TCP", 53, ALLOW),
            ("10.96.0.10", "UDP", 53, ALLOW),
            ("8.8.8.8", "UDP", 54, DENY),
        ],
    );
    let mut s = settings();
    s.dns = DnsMode::Off;
    let mut e = scene(s);
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.96.0.10", "UDP", 53, DENY),
            ("10.3.0.10", "UDP", 53, DENY),
        ],
    );
}

#[test]
fn everything_else_is_dropped() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    for peer in [
        "10.0.0.20",
        "10.1.0.1",
        "8.8.8.8",
        "2001:db8::1",
        "10.0.0.9",
    ] {
        assert!(!ingress(&e, "team-a", "training-head", peer, "TCP", 8265));
        assert!(!egress(&e, "team-a", "training-head", peer, "TCP", 443));
    }
}

// ----------------------------------------------- section 4: NetworkPolicy rule semantics

fn with_rules(e: &mut Engine, role: &str, direction: &str, rules: &str) {
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        &format!("  networkPolicy:\n    mode: DenyAll\n    {role}:\n      {direction}: {rules}"),
    ));
}

#[test]
fn empty_rule_and_empty_lists_allow_everything_in_their_direction() {
    for rules in ["[{}]", "[{from: [], ports: []}]"] {
        let mut e = scene(settings());
        with_rules(&mut e, "worker", "ingressRules", rules);
        assert!(
            ingress(&e, "team-a", "training-cpu", "8.8.8.8", "UDP", 7),
            "{rules}"
        );
        assert!(
            ingress(&e, "team-a", "training-cpu", "2001:db8::1", "SCTP", 7),
            "{rules}"
        );
        assert!(
            ingress(&e, "team-a", "training-cpu", "10.0.1.20", "ICMP", 0),
            "{rules}"
        );
        assert!(
            !egress(&e, "team-a", "training-cpu", "8.8.8.8", "UDP", 7),
            "{rules}"
        );
    }
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_two_peers_is_or() {
    let mut e = scene(settings());
    e.upsert_pod(&pod(
        "monitoring",
        "other",
        &[("app", "other")],
        "10.1.0.2",
        "node-b",
        &[],
    ));
    e.upsert_pod(&pod(
        "team-b",
        "prom",
        &[("app", "prometheus")],
        "10.0.1.30",
        "node-b",
        &[],
    ));
    with_rules(
        &mut e,
        "worker",
        "ingressRules",
        "[{from: [{namespaceSelector: {matchLabels: {purpose: metrics}}, podSelector: {matchLabels: {app: prometheus}}}]}]",
    );
    expect_ingress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.1.0.1", "TCP", 1, ALLOW),
            ("10.1.0.2", "TCP", 1, DENY),
            ("10.0.1.30", "TCP", 1, DENY),
        ],
    );
    with_rules(
        &mut e,
        "worker",
        "ingressRules",
        "[{from: [{namespaceSelector: {matchLabels: {purpose: metrics}}}, {podSelector: {matchLabels: {app: prometheus}}}]}]",
    );
    expect_ingress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.1.0.1", "TCP", 1, ALLOW),
            ("10.1.0.2", "TCP", 1, ALLOW),
            // podSelector alone: the RayCluster's namespace only.
            ("10.0.1.30", "TCP", 1, DENY),
        ],
    );
    e.upsert_pod(&pod(
        "team-a",
        "prom",
        &[("app", "prometheus")],
        "10.0.0.31",
        "node-b",
        &[],
    ));
    assert!(ingress(&e, "team-a", "training-cpu", "10.0.0.31", "TCP", 1));
}

#[test]
fn empty_namespace_selector_means_all_namespaces() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}}]}]",
    );
    for ip in ["10.0.1.20", "10.1.0.1", "10.2.0.1", "10.0.0.20"] {
        assert!(egress(&e, "team-a", "training-cpu", ip, "TCP", 1), "{ip}");
    }
    assert!(!egress(&e, "team-a", "training-cpu", "8.8.8.8", "TCP", 1));
}

#[test]
fn match_expressions_in_not_in_exists_does_not_exist() {
    let mut e = scene(settings());
    for (name, l, ip) in [
        ("a", vec![("tier", "a")], "10.0.0.41"),
        ("b", vec![("tier", "b")], "10.0.0.42"),
        ("c", vec![("tier", "c")], "10.0.0.43"),
        ("d", vec![], "10.0.0.44"),
        ("e", vec![("tier", "a"), ("legacy", "x")], "10.0.0.45"),
    ] {
        e.upsert_pod(&pod("team-a", name, &l, ip, "node-b", &[]));
    }
    let cases = [
        (
            "{key: tier, operator: In, values: [a, b]}",
            [true, true, false, false, true],
        ),
        (
            "{key: tier, operator: NotIn, values: [a]}",
            [false, true, true, true, false],
        ),
        (
            "{key: tier, operator: Exists}",
            [true, true, true, false, true],
        ),
        (
            "{key: tier, operator: DoesNotExist}",
            [false, false, false, true, false],
        ),
        (
            "{key: legacy, operator: DoesNotExist}",
            [true, true, true, true, false],
        ),
    ];
    for (expr, want) in cases {
        with_rules(
            &mut e,
            "worker",
            "ingressRules",
            &format!("[{{from: [{{podSelector: {{matchExpressions: [{expr}]}}}}]}}]"),
        );
        for (i, ip) in [
            "10.0.0.41",
            "10.0.0.42",
            "10.0.0.43",
            "10.0.0.44",
            "10.0.0.45",
        ]
        .iter()
        .enumerate()
        {
            assert_eq!(
                ingress(&e, "team-a", "training-cpu", ip, "TCP", 1),
                want[i],
                "{expr} {ip}"
            );
        }
    }
}

#[test]
fn ip_block_with_except_in_both_families_and_union_with_other_rules() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 10.20.0.0/16, except: [10.20.99.0/24]}}, {ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}}]}, {to: [{ipBlock: {cidr: 10.20.99.128/25}}], ports: [{port: 22}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.20.0.1", "TCP", 80, ALLOW),
            ("10.20.99.1", "TCP", 80, DENY),
            ("10.20.99.200", "TCP", 80, DENY),
            // In the except of one rule, allowed by another.
            ("10.20.99.200", "TCP", 22, ALLOW),
            ("10.21.0.1", "TCP", 80, DENY),
            ("2001:db8:2::1", "UDP", 5, ALLOW),
            ("2001:db8:1::1", "UDP", 5, DENY),
            // IPv4-mapped IPv6 peers are the IPv4 address.
            ("::ffff:10.20.0.1", "TCP", 80, ALLOW),
        ],
    );
}

#[test]
fn pod_ip_inside_an_ip_block_is_matched_by_the_block() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 10.2.0.0/24}}], ports: [{port: 8000}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.2.0.1", "TCP", 8000, ALLOW),
            ("10.2.0.1", "TCP", 8001, DENY),
        ],
    );
}

#[test]
fn ports_protocols_and_ranges() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "ingressRules",
        "[{ports: [{port: 80}, {protocol: UDP, port: 53}, {protocol: SCTP}, {port: 30000, endPort: 32767}]}]",
    );
    let p = |proto, port| ingress(&e, "team-a", "training-cpu", "8.8.8.8", proto, port);
    assert!(p("TCP", 80));
    assert!(!p("UDP", 80));
    assert!(p("UDP", 53));
    assert!(!p("TCP", 53));
    assert!(p("SCTP", 1) && p("SCTP", 65535));
    assert!(p("TCP", 30000) && p("TCP", 31000) && p("TCP", 32767));
    assert!(!p("TCP", 29999) && !p("TCP", 32768) && !p("UDP", 31000));
    assert!(!p("ICMP", 0));
    // The range is a handful of prefixes, never one row per port.
    let id = e.endpoint_id("team-a", "training-cpu").unwrap();
    let pid = e.tables().endpoints[&id].policy_id;
    let rows = e
        .tables()
        .policy
        .iter()
        .filter(|r| r.policy_id == pid && r.direction == Direction::Ingress)
        .count();
    assert!(rows < 40, "{rows} rows");
}

#[test]
fn udp_only_rule_never_allows_tcp_and_sctp_only_never_udp() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{ports: [{protocol: UDP}]}]",
    );
    assert!(egress(&e, "team-a", "training-cpu", "8.8.8.8", "UDP", 123));
    assert!(!egress(&e, "team-a", "training-cpu", "8.8.8.8", "TCP", 123));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{ports: [{protocol: SCTP, port: 9}]}]",
    );
    assert!(egress(&e, "team-a", "training-cpu", "8.8.8.8", "SCTP", 9));
    assert!(!egress(&e, "team-a", "training-cpu", "8.8.8.8", "UDP", 9));
}

#[test]
fn named_ports_resolve_on_the_receiving_pod_with_name_and_protocol() {
    let mut e = scene(settings());
    e.upsert_pod(&pod(
        "team-a",
        "training-head",
        &[
            ("ray.io/cluster", "training"),
            ("ray.io/node-type", "head"),
            ("ray.io/group", "headgroup"),
        ],
        "10.0.0.1",
        NODE,
        &[("metrics", "TCP", 8080), ("dns", "UDP", 5353)],
    ));
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    head:\n      ingressRules: [{ports: [{port: metrics}, {port: dns}]}]\n      egressRules: [{to: [{namespaceSelector: {}}], ports: [{port: http}]}]",
    ));
    // Ingress: the local pod's ports; `dns` exists only for UDP.
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[
            ("8.8.8.8", "TCP", 8080, ALLOW),
            ("8.8.8.8", "TCP", 5353, DENY),
            ("8.8.8.8", "UDP", 5353, DENY),
        ],
    );
    // Egress: each peer's ports (the registry has http=8000).
    expect_egress(
        &e,
        "team-a",
        "training-head",
        &[
            ("10.2.0.1", "TCP", 8000, ALLOW),
            ("10.3.0.10", "TCP", 8000, DENY),
        ],
    );
    // The ingress name that resolves to nothing is reported.
    assert!(e.problems().iter().any(|p| p.value == "dns" && p.field == "spec.networkPolicy.head.ingressRules[0].ports"), "{:?}", e.problems());
    // So is an egress name no selected pod has.
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    head:\n      egressRules: [{to: [{namespaceSelector: {}}], ports: [{port: grpc}]}]",
    ));
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "10.2.0.1",
        "TCP",
        8000
    ));
    assert!(e.problems().iter().any(|p| p.value == "grpc" && p.field == "spec.networkPolicy.head.egressRules[0].ports"), "{:?}", e.problems());
}

#[test]
fn named_egress_port_with_an_ip_block_peer_matches_nothing() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 10.2.0.0/16}}], ports: [{port: http}]}]",
    );
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        "10.2.0.1",
        "TCP",
        8000
    ));
    assert!(e.problems().iter().any(
        |p| p.severity == Severity::Notice && p.field.ends_with("egressRules[0].ports[0].port")
    ));
}

#[test]
fn label_namespace_pod_and_cluster_changes_take_effect() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "ingressRules",
        "[{from: [{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {role: client}}}]}]",
    );
    e.upsert_pod(&pod(
        "team-b",
        "client",
        &[("role", "client")],
        "10.0.1.40",
        "node-b",
        &[],
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.1.40",
        "TCP",
        1
    ));
    e.upsert_namespace(&namespace("team-b", &[("team", "x")]));
    assert!(ingress(&e, "team-a", "training-cpu", "10.0.1.40", "TCP", 1));
    e.upsert_pod(&pod(
        "team-b",
        "client",
        &[("role", "server")],
        "10.0.1.40",
        "node-b",
        &[],
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.1.40",
        "TCP",
        1
    ));
    e.upsert_pod(&pod(
        "team-b",
        "client2",
        &[("role", "client")],
        "10.0.1.41",
        "node-b",
        &[],
    ));
    assert!(ingress(&e, "team-a", "training-cpu", "10.0.1.41", "TCP", 1));
    e.remove_pod("team-b", "client2");
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.1.41",
        "TCP",
        1
    ));
    e.upsert_namespace(&namespace("team-b", &[]));
    e.upsert_pod(&pod(
        "team-b",
        "client2",
        &[("role", "client")],
        "10.0.1.41",
        "node-b",
        &[],
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-cpu",
        "10.0.1.41",
        "TCP",
        1
    ));
    with_rules(
        &mut e,
        "worker",
        "ingressRules",
        "[{from: [{podSelector: {}, namespaceSelector: {}}]}]",
    );
    assert!(ingress(&e, "team-a", "training-cpu", "10.0.1.41", "TCP", 1));
    e.remove_raycluster("team-a", "training");
    assert!(ingress(&e, "team-a", "training-cpu", "8.8.8.8", "TCP", 1));
    // A worker relabelled into another cluster follows that cluster.
    e.upsert_raycluster(&rc("team-a", "other", DENY_ALL));
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-cpu",
        "other",
        "worker",
        "cpu",
        "10.0.0.2",
    ));
    assert!(ingress(&e, "team-a", "training-cpu", "10.0.0.9", "TCP", 1));
    assert!(!ingress(&e, "team-a", "training-cpu", "10.0.0.1", "TCP", 1));
}

// ------------------------------------------------------- section 5: where it is decided

#[test]
fn cluster_ip_egress_is_decided_on_the_backends_after_dnat() {
    let mut e = scene(settings());
    e.upsert_service(&service(
        "registry",
        "registry",
        "10.96.1.1",
        &[("web", "TCP", 80)],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: registry}}}], ports: [{port: 8000}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.96.1.1", "TCP", 80, ALLOW),
            ("10.96.1.1", "TCP", 8000, DENY),
        ],
    );
    // A rule for the service port itself does not allow the backend port.
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}}], ports: [{port: 80}]}]",
    );
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        "10.96.1.1",
        "TCP",
        80
    ));
    // An ipBlock covering the ClusterIP does not match it (real CNIs see the backend).
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 10.96.0.0/12}}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.96.1.1", "TCP", 80, DENY),
            ("10.96.200.1", "TCP", 80, ALLOW),
        ],
    );
}

#[test]
fn cluster_ip_with_disagreeing_backends_is_denied_fail_closed() {
    let mut e = scene(settings());
    e.upsert_pod(&pod(
        "registry",
        "registry2",
        &[("app", "other")],
        "10.2.0.2",
        "node-b",
        &[],
    ));
    e.upsert_service(&service(
        "registry",
        "registry",
        "10.96.1.1",
        &[("web", "TCP", 80)],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1", "10.2.0.2"],
    ));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.2.0.1", "TCP", 8000, ALLOW),
            ("10.96.1.1", "TCP", 80, DENY),
        ],
    );
    // The unwanted backend goes away: the ClusterIP becomes allowed.
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    assert!(egress(&e, "team-a", "training-cpu", "10.96.1.1", "TCP", 80));
    // Service removed: nothing is left for its address.
    e.remove_service("registry", "registry");
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        "10.96.1.1",
        "TCP",
        80
    ));
}

const REGISTRY_V4: &str = "10.96.1.1";
const REGISTRY_V6: &str = "fd00:96::1";

/// `slice` of one family, named for it as the EndpointSlice controller does (one
/// slice per family of a dual-stack Service).
fn family_slice(
    ns: &str,
    service: &str,
    ports: &[(&str, &str, i32)],
    family: &str,
    addresses: &[&str],
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let mut slice = slice(ns, service, ports, addresses);
    slice.metadata.name = Some(format!("{service}-{}", family.to_lowercase()));
    slice.address_type = family.into();
    slice
}

/// The scene with the registry pod dual-stack (10.2.0.1, fd00:2::1) behind a
/// dual-stack Service (ClusterIPs [`REGISTRY_V4`], [`REGISTRY_V6`]; TCP 80 -> 8000),
/// one EndpointSlice per family.
fn scene_with_dual_stack_registry() -> Engine {
    let mut e = scene(settings());
    let mut registry = pod(
        "registry",
        "registry",
        &[("app", "model-registry")],
        "10.2.0.1",
        "node-b",
        &[("http", "TCP", 8000)],
    );
    if let Some(status) = registry.status.as_mut() {
        status
            .pod_ips
            .get_or_insert_with(Vec::new)
            .push(k8s_openapi::api::core::v1::PodIP {
                ip: "fd00:2::1".into(),
            });
    }
    e.upsert_pod(&registry);
    let mut svc = service("registry", "registry", REGISTRY_V4, &[("web", "TCP", 80)]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ips = Some(vec![REGISTRY_V4.into(), REGISTRY_V6.into()]);
    }
    e.upsert_service(&svc);
    let ports = [("web", "TCP", 8000)];
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &ports,
        "IPv4",
        &["10.2.0.1"],
    ));
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &ports,
        "IPv6",
        &["fd00:2::1"],
    ));
    e
}

/// kube-proxy DNATs a ClusterIP only to endpoints of its own family: an ipBlock of
/// one family allows that family's ClusterIP and not the other's; a pod selector
/// allows both (the pod has an address of each).
#[test]
fn dual_stack_cluster_ips_are_decided_on_the_backends_of_their_own_family() {
    let mut e = scene_with_dual_stack_registry();
    let cases = [
        ("fd00:2::/64", DENY, ALLOW),
        ("10.2.0.0/16", ALLOW, DENY),
        ("fd00:2::1/128", DENY, ALLOW),
    ];
    for (cidr, v4, v6) in cases {
        with_rules(
            &mut e,
            "worker",
            "egressRules",
            &format!("[{{to: [{{ipBlock: {{cidr: \"{cidr}\"}}}}], ports: [{{port: 8000}}]}}]"),
        );
        for (ip, want) in [(REGISTRY_V4, v4), (REGISTRY_V6, v6)] {
            assert_eq!(
                egress(&e, "team-a", "training-cpu", ip, "TCP", 80),
                want,
                "{cidr}: {ip}"
            );
        }
    }
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (REGISTRY_V4, "TCP", 80, ALLOW),
            (REGISTRY_V6, "TCP", 80, ALLOW),
            (REGISTRY_V6, "TCP", 8000, DENY),
        ],
    );
    // Each family has its identity: a row for one never allows the other.
    let ids = |e: &Engine| {
        [REGISTRY_V4, REGISTRY_V6].map(|ip| e.tables().addresses[&ip.parse().unwrap()])
    };
    let [v4_id, v6_id] = ids(&e);
    assert_ne!(v4_id, v6_id);
    // explain names the backends of the ClusterIP's family only.
    assert_eq!(
        e.cluster_ip_backends(REGISTRY_V6.parse().unwrap(), proto("TCP"), 80),
        vec![("fd00:2::1".parse().unwrap(), proto("TCP"), 8000)]
    );
    assert_eq!(
        e.cluster_ip_backends(REGISTRY_V4.parse().unwrap(), proto("TCP"), 80),
        vec![("10.2.0.1".parse().unwrap(), proto("TCP"), 8000)]
    );
    // A denied IPv4 backend fails only the IPv4 ClusterIP closed.
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        "IPv4",
        &["10.2.0.1", "10.0.1.20"],
    ));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (REGISTRY_V4, "TCP", 80, DENY),
            (REGISTRY_V6, "TCP", 80, ALLOW),
        ],
    );
    // The Service turns IPv4-only: its IPv6 ClusterIP and identity go, the IPv4 one
    // stays.
    e.upsert_service(&service(
        "registry",
        "registry",
        REGISTRY_V4,
        &[("web", "TCP", 80)],
    ));
    assert!(
        !e.tables()
            .addresses
            .contains_key(&REGISTRY_V6.parse().unwrap())
    );
    assert_eq!(e.tables().addresses[&REGISTRY_V4.parse().unwrap()], v4_id);
    assert!(!e.tables().policy.iter().any(|row| row.identity == v6_id));
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        REGISTRY_V6,
        "TCP",
        80
    ));
}

/// A single-stack Service is decided as before, on its one family; backends of the
/// other family alone (a hand-written slice kube-proxy ignores for it) allow nothing.
#[test]
fn single_stack_cluster_ips_are_decided_on_their_family_as_before() {
    let mut e = scene(settings());
    e.upsert_service(&service(
        "registry",
        "registry6",
        REGISTRY_V6,
        &[("web", "TCP", 80)],
    ));
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry6",
        &[("web", "TCP", 8000)],
        "IPv6",
        &["fd00:2::1"],
    ));
    e.upsert_service(&service(
        "registry",
        "registry",
        REGISTRY_V4,
        &[("web", "TCP", 80)],
    ));
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        "IPv6",
        &["fd00:2::1"],
    ));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: \"fd00:2::/64\"}}, {ipBlock: {cidr: 10.2.0.0/16}}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (REGISTRY_V6, "TCP", 80, ALLOW),
            (REGISTRY_V4, "TCP", 80, DENY),
        ],
    );
    // The IPv4 slice comes: the IPv4 Service is allowed on it.
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        "IPv4",
        &["10.2.0.1"],
    ));
    assert!(egress(&e, "team-a", "training-cpu", REGISTRY_V4, "TCP", 80));
}

/// An endpoint change in one family re-decides that family's ClusterIPs only: the
/// diff revokes rows of its identity and leaves the other family's alone.
#[test]
fn an_endpoint_change_in_one_family_redecides_only_that_family() {
    let mut e = scene_with_dual_stack_registry();
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    let v4_id = e.tables().addresses[&REGISTRY_V4.parse().unwrap()];
    let v6_id = e.tables().addresses[&REGISTRY_V6.parse().unwrap()];
    assert!(egress(&e, "team-a", "training-cpu", REGISTRY_V6, "TCP", 80));
    e.take_diff();
    // An IPv6 backend nobody allows joins.
    let ports = [("web", "TCP", 8000)];
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &ports,
        "IPv6",
        &["fd00:2::1", "fd00:2::99"],
    ));
    let diff = e.take_diff();
    assert!(diff.may_revoke());
    assert!(
        diff.policy_remove.iter().any(|r| r.identity == v6_id),
        "{diff:?}"
    );
    let touches_v4 = |d: &rayfence::tables::TablesDiff| {
        d.policy_remove
            .iter()
            .chain(&d.policy_add)
            .any(|r| r.identity == v4_id)
    };
    assert!(!touches_v4(&diff), "{diff:?}");
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (REGISTRY_V4, "TCP", 80, ALLOW),
            (REGISTRY_V6, "TCP", 80, DENY),
        ],
    );
    // It leaves: the IPv6 ClusterIP is allowed again, the IPv4 rows untouched.
    e.upsert_endpoint_slice(&family_slice(
        "registry",
        "registry",
        &ports,
        "IPv6",
        &["fd00:2::1"],
    ));
    let diff = e.take_diff();
    assert!(
        diff.policy_add.iter().any(|r| r.identity == v6_id),
        "{diff:?}"
    );
    assert!(!touches_v4(&diff), "{diff:?}");
    assert!(egress(&e, "team-a", "training-cpu", REGISTRY_V6, "TCP", 80));
    // The same objects fed to a fresh engine give the same tables.
    let mut fresh = scene_with_dual_stack_registry();
    with_rules(
        &mut fresh,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    assert_eq!(fresh.tables(), e.tables());
}

#[test]
fn icmp_echo_only_where_all_protocols_are_allowed() {
    let mut e = scene(settings());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 1.0.0.0/8}}], ports: [{port: 443}]}, {to: [{ipBlock: {cidr: 2.0.0.0/8}}]}]",
    );
    assert!(egress(&e, "team-a", "training-cpu", "10.0.0.1", "ICMP", 0));
    assert!(!egress(&e, "team-a", "training-cpu", "1.1.1.1", "ICMP", 0));
    assert!(egress(&e, "team-a", "training-cpu", "2.2.2.2", "ICMP", 0));
}

#[test]
fn revoking_a_rule_removes_its_rows_in_the_diff() {
    let mut e = scene(settings());
    with_rules(&mut e, "worker", "egressRules", "[{ports: [{port: 443}]}]");
    e.take_diff();
    with_rules(&mut e, "worker", "egressRules", "[]");
    let diff = e.take_diff();
    assert!(diff.may_revoke());
    assert!(!diff.policy_remove.is_empty());
    assert!(!egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 443));
}

// ------------------------------------------------- section 5a: what counts as the node

/// The registry Service as NodePort 30080 (TCP 80 -> the registry pod's 8000), and a
/// worker egress rule to the registry namespace on 8000.
fn scene_with_registry_node_port() -> Engine {
    let mut e = scene(settings());
    e.upsert_service(&exposed_service(
        "registry",
        "registry",
        "NodePort",
        "10.96.1.1",
        &[("web", "TCP", 80, 30080)],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: registry}}}], ports: [{port: 8000}]}]",
    );
    e
}

fn node_port(protocol: &str, port: u16) -> NodePort {
    NodePort {
        protocol: proto(protocol),
        port,
    }
}

/// The rows any policy holds for `identity`.
fn rows_for(e: &Engine, identity: u32) -> Vec<rayfence::tables::PolicyEntry> {
    e.tables()
        .policy
        .iter()
        .filter(|r| r.identity == identity)
        .copied()
        .collect()
}

#[test]
fn node_port_egress_is_decided_on_the_services_backends() {
    let e = scene_with_registry_node_port();
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            // Through the node's NodePort to the registry pod: allowed like the pod.
            (NODE_IP, "TCP", 30080, ALLOW),
            (NODE_IP, "UDP", 30080, ALLOW), // no UDP node port: the node itself
            (NODE_IP, "TCP", 10250, ALLOW), // nothing rewrites it: the node itself
        ],
    );
    // The head has no egress rule for the registry: the NodePort does not go around it.
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        NODE_IP,
        "TCP",
        30080
    ));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 10250));
    // Its own identity, not the ClusterIP's: a rule for one never allows the other.
    let np = e.tables().node_ports[&node_port("TCP", 30080)];
    let cluster_ip = e.tables().addresses[&"10.96.1.1".parse().unwrap()];
    assert_ne!(np, cluster_ip);
    assert_ne!(np, identity::HOST);
    assert!(
        rows_for(&e, np)
            .iter()
            .all(|r| r.direction == Direction::Egress && r.port == 30080),
        "{:?}",
        rows_for(&e, np)
    );
}

#[test]
fn node_port_with_one_denied_backend_is_denied_fail_closed() {
    let mut e = scene_with_registry_node_port();
    e.upsert_pod(&pod(
        "team-b",
        "imposter",
        &[("app", "other")],
        "10.0.1.50",
        "node-b",
        &[],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1", "10.0.1.50"],
    ));
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    // No backend at all: nothing to be allowed to.
    e.upsert_endpoint_slice(&slice("registry", "registry", &[("web", "TCP", 8000)], &[]));
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
}

#[test]
fn relabelled_backend_revokes_the_node_port_row_incrementally() {
    let mut e = scene(settings());
    e.upsert_service(&exposed_service(
        "registry",
        "registry",
        "NodePort",
        "10.96.1.1",
        &[("web", "TCP", 80, 30080)],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    let np = e.tables().node_ports[&node_port("TCP", 30080)];
    e.take_diff();
    e.upsert_pod(&pod(
        "registry",
        "registry",
        &[("app", "retired")],
        "10.2.0.1",
        "node-b",
        &[("http", "TCP", 8000)],
    ));
    let diff = e.take_diff();
    assert!(
        diff.policy_remove.iter().any(|r| r.identity == np),
        "{diff:?}"
    );
    assert!(diff.may_revoke());
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    // The same objects fed to a fresh engine give the same tables.
    let mut fresh = scene(settings());
    fresh.upsert_pod(&pod(
        "registry",
        "registry",
        &[("app", "retired")],
        "10.2.0.1",
        "node-b",
        &[("http", "TCP", 8000)],
    ));
    fresh.upsert_endpoint_slice(&slice(
        "registry",
        "registry",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    with_rules(
        &mut fresh,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: model-registry}}}]}]",
    );
    fresh.upsert_service(&exposed_service(
        "registry",
        "registry",
        "NodePort",
        "10.96.1.1",
        &[("web", "TCP", 80, 30080)],
    ));
    assert_eq!(fresh.tables(), e.tables());
}

#[test]
fn removed_node_port_service_leaves_no_entry_and_no_rows() {
    let mut e = scene_with_registry_node_port();
    let np = e.tables().node_ports[&node_port("TCP", 30080)];
    assert!(!rows_for(&e, np).is_empty());
    e.take_diff();
    e.remove_service("registry", "registry");
    let diff = e.take_diff();
    assert!(diff.node_ports_remove.contains(&node_port("TCP", 30080)));
    assert!(diff.policy_remove.iter().any(|r| r.identity == np));
    assert!(e.tables().node_ports.is_empty());
    assert!(rows_for(&e, np).is_empty());
    // Nothing rewrites the port any more: it is the node's again.
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
}

#[test]
fn load_balancer_services_have_node_ports_cluster_ip_and_external_name_do_not() {
    let mut e = scene_with_registry_node_port();
    e.upsert_service(&exposed_service(
        "registry",
        "registry",
        "LoadBalancer",
        "10.96.1.1",
        &[("web", "TCP", 80, 31080)],
    ));
    assert!(e.tables().node_ports.contains_key(&node_port("TCP", 31080)));
    assert!(!e.tables().node_ports.contains_key(&node_port("TCP", 30080)));
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 31080));
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        NODE_IP,
        "TCP",
        31080
    ));
    for type_ in ["ClusterIP", "ExternalName"] {
        e.upsert_service(&exposed_service(
            "registry",
            "registry",
            type_,
            "10.96.1.1",
            &[("web", "TCP", 80, 31080)],
        ));
        assert!(e.tables().node_ports.is_empty(), "{type_}");
    }
}

#[test]
fn service_port_without_node_port_is_not_claimed() {
    let mut e = scene(settings());
    e.upsert_service(&exposed_service(
        "registry",
        "registry",
        "LoadBalancer",
        "10.96.1.1",
        &[("web", "TCP", 80, 0), ("admin", "TCP", 81, 30081)],
    ));
    assert_eq!(
        e.tables().node_ports.keys().copied().collect::<Vec<_>>(),
        vec![node_port("TCP", 30081)]
    );
}

/// A pod on this node publishing container port 80 as hostPort 8080, and one on
/// another node publishing 9090.
fn scene_with_host_ports() -> Engine {
    let mut e = scene(settings());
    e.upsert_pod(&with_host_port(
        pod("team-b", "web", &[("app", "web")], "10.0.0.40", NODE, &[]),
        "TCP",
        80,
        8080,
    ));
    e.upsert_pod(&with_host_port(
        pod(
            "team-b",
            "remote-web",
            &[("app", "web")],
            "10.0.1.40",
            "node-b",
            &[],
        ),
        "TCP",
        80,
        9090,
    ));
    e
}

#[test]
fn host_port_egress_is_decided_on_the_local_pod_behind_it() {
    let mut e = scene_with_host_ports();
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]",
    );
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (NODE_IP, "TCP", 8080, ALLOW),
            (NODE_IP, "UDP", 8080, ALLOW), // not published for UDP: the node itself
            (NODE_IP, "TCP", 9090, ALLOW), // another node's pod: nothing rewrites it here
        ],
    );
    assert!(!egress(&e, "team-a", "training-head", NODE_IP, "TCP", 8080));
    // A rule for the host port itself does not allow the pod behind it.
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]",
    );
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 8080));
    assert_eq!(
        e.tables().node_ports.keys().copied().collect::<Vec<_>>(),
        vec![node_port("TCP", 8080)]
    );
}

#[test]
fn host_port_rows_follow_the_pod_and_go_with_it() {
    let mut e = scene_with_host_ports();
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]}]",
    );
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 8080));
    let hp = e.tables().node_ports[&node_port("TCP", 8080)];
    e.upsert_pod(&with_host_port(
        pod("team-b", "web", &[("app", "other")], "10.0.0.40", NODE, &[]),
        "TCP",
        80,
        8080,
    ));
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 8080));
    assert!(rows_for(&e, hp).is_empty());
    e.remove_pod("team-b", "web");
    assert!(e.tables().node_ports.is_empty());
}

#[test]
fn node_port_claimed_twice_allows_nothing_and_both_claims_are_reported() {
    let mut e = scene_with_registry_node_port();
    let service_np = e.tables().node_ports[&node_port("TCP", 30080)];
    e.upsert_pod(&with_host_port(
        pod(
            "team-b",
            "squatter",
            &[("app", "web")],
            "10.0.0.41",
            NODE,
            &[],
        ),
        "TCP",
        8000,
        30080,
    ));
    let conflict = e.tables().node_ports[&node_port("TCP", 30080)];
    assert_ne!(conflict, service_np);
    assert!(rows_for(&e, conflict).is_empty());
    assert!(rows_for(&e, service_np).is_empty());
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    let problems = e.problems();
    let service = ObjectRef::new("Service", "registry", "registry");
    let pod_ref = ObjectRef::new("Pod", "team-b", "squatter");
    let about = |object: &ObjectRef, field: &str, other: &str| {
        problems.iter().any(|p| {
            &p.object == object
                && p.field == field
                && p.value == "30080"
                && p.severity == Severity::Warning
                && p.message.contains(other)
        })
    };
    assert!(
        about(
            &service,
            "spec.ports[0].nodePort",
            "Pod team-b/squatter spec.containers[0].ports[0].hostPort"
        ),
        "{problems:#?}"
    );
    assert!(
        about(
            &pod_ref,
            "spec.containers[0].ports[0].hostPort",
            "Service registry/registry spec.ports[0].nodePort"
        ),
        "{problems:#?}"
    );
    // One claim goes: the other owns the port again.
    e.remove_pod("team-b", "squatter");
    assert_eq!(e.tables().node_ports[&node_port("TCP", 30080)], service_np);
    assert!(egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    assert!(e.problems().iter().all(|p| p.object != service));
}

#[test]
fn two_services_on_one_node_port_allow_nothing() {
    let mut e = scene_with_registry_node_port();
    e.upsert_service(&exposed_service(
        "registry",
        "copy",
        "NodePort",
        "10.96.1.2",
        &[("web", "TCP", 80, 30080)],
    ));
    e.upsert_endpoint_slice(&slice(
        "registry",
        "copy",
        &[("web", "TCP", 8000)],
        &["10.2.0.1"],
    ));
    assert!(!egress(&e, "team-a", "training-cpu", NODE_IP, "TCP", 30080));
    let fields: Vec<(String, String)> = e
        .problems()
        .into_iter()
        .filter(|p| p.field == "spec.ports[0].nodePort")
        .map(|p| (p.object.name, p.value))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("copy".to_owned(), "30080".to_owned()),
            ("registry".to_owned(), "30080".to_owned())
        ]
    );
}

/// A hostNetwork node exporter on this node (labels app=node-exporter in monitoring,
/// serving 9100), another hostNetwork pod on this node, and one on node-b.
fn scene_with_host_network_pods() -> Engine {
    let mut e = scene(settings());
    e.upsert_pod(&host_network(pod(
        "monitoring",
        "node-exporter",
        &[("app", "node-exporter")],
        NODE_IP,
        NODE,
        &[("metrics", "TCP", 9100)],
    )));
    e.upsert_pod(&host_network(pod(
        "kube-system",
        "ingress",
        &[("app", "ingress")],
        NODE_IP,
        NODE,
        &[],
    )));
    e.upsert_pod(&host_network(pod(
        "monitoring",
        "node-exporter-b",
        &[("app", "node-exporter")],
        OTHER_NODE_IP,
        "node-b",
        &[("metrics", "TCP", 9100)],
    )));
    e
}

fn host_network_id(e: &Engine, ns: &str, name: &str) -> u32 {
    e.host_network_pods()
        .into_iter()
        .find(|(key, _)| key == &(ns.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("{ns}/{name} is not a local hostNetwork pod"))
        .1
}

#[test]
fn host_network_pod_selected_by_namespace_and_pod_selector_gets_rows_as_itself() {
    let mut e = scene_with_host_network_pods();
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAll\n    head:\n      ingressRules: [{from: [{namespaceSelector: {matchLabels: {purpose: metrics}}, podSelector: {matchLabels: {app: node-exporter}}}], ports: [{port: 8080}]}]\n      egressRules: [{to: [{namespaceSelector: {matchLabels: {purpose: metrics}}, podSelector: {matchLabels: {app: node-exporter}}}], ports: [{port: metrics}]}]",
    ));
    let exporter = host_network_id(&e, "monitoring", "node-exporter");
    let ingress_controller = host_network_id(&e, "kube-system", "ingress");
    assert!(!rows_for(&e, exporter).is_empty());
    let head = |dir, who, port| {
        allows_identified(
            &e,
            "team-a",
            "training-head",
            dir,
            NODE_IP,
            who,
            "TCP",
            port,
        )
    };
    assert!(head(Direction::Ingress, exporter, 8080));
    assert!(!head(Direction::Ingress, exporter, 8081));
    assert!(!head(Direction::Ingress, ingress_controller, 8080));
    // Egress to it, by the named port it declares: the node's address on 9100 leads
    // to the exporter, whoever else listens on the node.
    assert!(head(Direction::Egress, exporter, 9100));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 9100));
    // The node's own processes are still the node.
    assert!(ingress(
        &e,
        "team-a",
        "training-head",
        NODE_IP,
        "TCP",
        10250
    ));
}

#[test]
fn host_network_pod_address_never_enters_the_address_table() {
    let mut e = scene_with_host_network_pods();
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let addresses = &e.tables().addresses;
    assert_eq!(
        addresses.get(&NODE_IP.parse().unwrap()),
        Some(&identity::HOST)
    );
    assert_eq!(addresses.get(&OTHER_NODE_IP.parse().unwrap()), None);
    // Not endpoints: nothing isolates them.
    assert!(e.endpoint_id("monitoring", "node-exporter").is_none());
    assert!(e.endpoint_id("kube-system", "ingress").is_none());
    // Gone: still the node's address.
    e.remove_pod("monitoring", "node-exporter");
    assert_eq!(
        e.tables().addresses.get(&NODE_IP.parse().unwrap()),
        Some(&identity::HOST)
    );
}

#[test]
fn host_network_pods_are_listed_only_when_on_this_node() {
    let mut e = scene_with_host_network_pods();
    let listed: Vec<(String, String)> = e
        .host_network_pods()
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        listed,
        vec![
            ("kube-system".to_owned(), "ingress".to_owned()),
            ("monitoring".to_owned(), "node-exporter".to_owned())
        ]
    );
    // Same labels, same namespace, same named ports: one identity, like any pods.
    e.upsert_pod(&pod(
        "monitoring",
        "exporter-pod",
        &[("app", "node-exporter")],
        "10.1.0.9",
        "node-b",
        &[("metrics", "TCP", 9100)],
    ));
    assert_eq!(
        e.tables().addresses[&"10.1.0.9".parse().unwrap()],
        host_network_id(&e, "monitoring", "node-exporter")
    );
    e.remove_pod("kube-system", "ingress");
    assert_eq!(e.host_network_pods().len(), 1);
}

#[test]
fn remote_host_network_pod_is_matched_only_by_an_ip_block_on_its_node() {
    let mut e = scene_with_host_network_pods();
    with_rules(
        &mut e,
        "head",
        "ingressRules",
        "[{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: node-exporter}}}]}]",
    );
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        OTHER_NODE_IP,
        "TCP",
        8080
    ));
    with_rules(
        &mut e,
        "head",
        "ingressRules",
        "[{from: [{ipBlock: {cidr: 192.168.0.11/32}}]}]",
    );
    assert!(ingress(
        &e,
        "team-a",
        "training-head",
        OTHER_NODE_IP,
        "TCP",
        8080
    ));
    // On this node an ipBlock on the node's address matches its hostNetwork pods too.
    with_rules(
        &mut e,
        "head",
        "ingressRules",
        "[{from: [{ipBlock: {cidr: 192.168.0.0/24}}]}]",
    );
    let ingress_controller = host_network_id(&e, "kube-system", "ingress");
    assert!(allows_identified(
        &e,
        "team-a",
        "training-head",
        Direction::Ingress,
        NODE_IP,
        ingress_controller,
        "TCP",
        8080
    ));
}

#[test]
fn cluster_ip_backed_by_a_host_network_pod_is_decided_by_that_pod() {
    let mut e = scene_with_host_network_pods();
    e.upsert_service(&service(
        "monitoring",
        "node-exporter",
        "10.96.2.1",
        &[("metrics", "TCP", 9100)],
    ));
    e.upsert_endpoint_slice(&slice(
        "monitoring",
        "node-exporter",
        &[("metrics", "TCP", 9100)],
        &[NODE_IP],
    ));
    // A Service on this node's address on a port no hostNetwork pod declares: the node.
    e.upsert_service(&service(
        "default",
        "kubelet",
        "10.96.2.2",
        &[("https", "TCP", 10250)],
    ));
    e.upsert_endpoint_slice(&slice(
        "default",
        "kubelet",
        &[("https", "TCP", 10250)],
        &[NODE_IP],
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            ("10.96.2.1", "TCP", 9100, DENY),
            ("10.96.2.2", "TCP", 10250, ALLOW),
        ],
    );
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: node-exporter}}}]}]",
    );
    assert!(egress(
        &e,
        "team-a",
        "training-cpu",
        "10.96.2.1",
        "TCP",
        9100
    ));
    // explain names the rule that selects the hostNetwork pod behind the ClusterIP.
    let cpu = e.endpoint_id("team-a", "training-cpu").unwrap();
    let why = e.explain(
        cpu,
        Direction::Egress,
        "10.96.2.1".parse().unwrap(),
        proto("TCP"),
        9100,
    );
    let Explanation::AllowedViaService { rules, .. } = why else {
        panic!("{why:?}");
    };
    assert_eq!(
        rules,
        vec![(
            ObjectRef::new("RayCluster", "team-a", "training"),
            RuleOrigin::User {
                role: Role::Worker,
                direction: Direction::Egress,
                index: 0
            }
        )]
    );
    // The exporter relabelled: revoked.
    e.upsert_pod(&host_network(pod(
        "monitoring",
        "node-exporter",
        &[("app", "exporter-v2")],
        NODE_IP,
        NODE,
        &[("metrics", "TCP", 9100)],
    )));
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        "10.96.2.1",
        "TCP",
        9100
    ));
}

// --------------------------------------------------- explain, docs/semantics.md "What counts as the node"

/// The head's dashboard exposed as NodePort 30265 (and its cpu worker's hostPort
/// 8080 -> 80), DenyAll.
fn scene_with_exposed_head() -> Engine {
    let mut e = scene(settings());
    e.upsert_service(&exposed_service(
        "team-a",
        "training-head-svc",
        "NodePort",
        "10.96.3.1",
        &[("dashboard", "TCP", 8265, 30265)],
    ));
    e.upsert_endpoint_slice(&slice(
        "team-a",
        "training-head-svc",
        &[("dashboard", "TCP", 8265)],
        &["10.0.0.1"],
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    e
}

fn explain(e: &Engine, from: &str, to: &str) -> rayfence::operator::wire::ExplainReport {
    rayfence::operator::explain::explain_flow(e, from, to).unwrap()
}

#[test]
fn explain_to_a_node_port_names_the_service_and_judges_each_backend() {
    let e = scene_with_exposed_head();
    let report = explain(&e, "team-a/training-cpu", &format!("{NODE_IP}:30265"));
    assert_eq!(report.verdict, "allowed", "{report:#?}");
    let egress = &report.sides[0];
    assert_eq!(egress.verdict, "allowed");
    assert!(
        egress
            .because
            .contains("nodePort of Service team-a/training-head-svc"),
        "{egress:#?}"
    );
    assert!(
        egress.rules.iter().any(|r| r.contains("same RayCluster")),
        "{egress:#?}"
    );
    let backend = &report.sides[1];
    assert_eq!(
        (
            backend.direction.as_str(),
            backend.pod.as_deref(),
            backend.verdict.as_str()
        ),
        ("ingress", Some("team-a/training-head"), "allowed")
    );
    // Another cluster's head gets nowhere through the node.
    let report = explain(&e, "team-a/other-head", &format!("{NODE_IP}:30265"));
    assert_eq!(report.verdict, "denied");
}

#[test]
fn explain_from_an_external_client_through_a_node_port_judges_the_backend_by_the_client() {
    let mut e = scene_with_exposed_head();
    let to = format!("{NODE_IP}:30265");
    let report = explain(&e, "203.0.113.7", &to);
    assert_eq!(report.verdict, "denied", "{report:#?}");
    assert_eq!(report.sides[0].verdict, "not-enforced");
    assert_eq!(report.sides[1].pod.as_deref(), Some("team-a/training-head"));
    assert!(
        report.sides[1].because.contains("from 203.0.113.7"),
        "{report:#?}"
    );
    with_rules(
        &mut e,
        "head",
        "ingressRules",
        "[{from: [{ipBlock: {cidr: 203.0.113.0/24}}], ports: [{port: 8265}]}]",
    );
    let report = explain(&e, "203.0.113.7", &to);
    assert_eq!(report.verdict, "allowed", "{report:#?}");
    assert_eq!(
        report.sides[1].rules,
        vec!["RayCluster team-a/training head.ingressRules[0]".to_owned()]
    );
    // Another client is not in the ipBlock; a rule with no `from` admits any client.
    assert_eq!(explain(&e, "198.51.100.1", &to).verdict, "denied");
    with_rules(&mut e, "head", "ingressRules", "[{ports: [{port: 8265}]}]");
    assert_eq!(explain(&e, "198.51.100.1", &to).verdict, "allowed");
}

#[test]
fn explain_to_a_host_port_names_the_pod_behind_it() {
    let mut e = scene_with_exposed_head();
    e.upsert_pod(&with_host_port(
        pod("team-b", "web", &[("app", "web")], "10.0.0.40", NODE, &[]),
        "TCP",
        80,
        8080,
    ));
    let report = explain(&e, "team-a/training-cpu", &format!("{NODE_IP}:8080"));
    assert_eq!(report.verdict, "denied", "{report:#?}");
    assert_eq!(report.sides[1].pod.as_deref(), Some("team-b/web"));
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]",
    );
    let report = explain(&e, "team-a/training-cpu", &format!("{NODE_IP}:8080"));
    assert_eq!(report.verdict, "allowed", "{report:#?}");
    assert!(
        report.sides[0]
            .because
            .contains("hostPort of pod team-b/web"),
        "{report:#?}"
    );
    assert_eq!(
        report.sides[0].rules,
        vec!["RayCluster team-a/training worker.egressRules[0]".to_owned()]
    );
}

#[test]
fn explain_to_a_node_port_nothing_rewrites_is_the_node() {
    let e = scene_with_exposed_head();
    let report = explain(&e, "team-a/training-cpu", &format!("{NODE_IP}:10250"));
    assert_eq!(report.verdict, "allowed");
    assert!(
        report.sides[0]
            .because
            .contains("this node's own processes")
    );
    assert_eq!(
        e.explain(
            e.endpoint_id("team-a", "training-cpu").unwrap(),
            Direction::Egress,
            NODE_IP.parse().unwrap(),
            proto("TCP"),
            10250
        ),
        Explanation::Host
    );
}

#[test]
fn explain_from_a_host_network_pod_uses_its_identity_not_the_node() {
    let mut e = scene_with_host_network_pods();
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let report = explain(&e, "monitoring/node-exporter", "team-a/training-head:8080");
    assert_eq!(report.verdict, "denied", "{report:#?}");
    assert_eq!(
        (report.from.kind.as_str(), report.from.name.as_deref()),
        ("pod", Some("node-exporter"))
    );
    assert!(
        report.sides[0].because.contains("hostNetwork pod"),
        "{report:#?}"
    );
    with_rules(
        &mut e,
        "head",
        "ingressRules",
        "[{from: [{namespaceSelector: {matchLabels: {purpose: metrics}}, podSelector: {matchLabels: {app: node-exporter}}}]}]",
    );
    let report = explain(&e, "monitoring/node-exporter", "team-a/training-head:8080");
    assert_eq!(report.verdict, "allowed", "{report:#?}");
    assert_eq!(
        report.sides[1].rules,
        vec!["RayCluster team-a/training head.ingressRules[0]".to_owned()]
    );
    // The reverse direction: egress to it is judged by its identity as well.
    let report = explain(&e, "team-a/training-head", "monitoring/node-exporter:9100");
    assert_eq!(report.verdict, "denied", "{report:#?}");
}

// ------------------------------------------------------------- section 6: bad input

#[test]
fn invalid_mode_keeps_the_last_good_policy_and_is_reported() {
    let mut e = scene(settings());
    with_rules(&mut e, "worker", "egressRules", "[{ports: [{port: 443}]}]");
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy: {mode: AllowAll, worker: {egressRules: [{}]}}",
    ));
    assert!(egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 443));
    assert!(!egress(&e, "team-a", "training-cpu", "1.1.1.1", "TCP", 80));
    let problems = e.problems_for(&ObjectRef::new("RayCluster", "team-a", "training"));
    assert!(
        problems.iter().any(|p| p.field == "spec.networkPolicy.mode"
            && p.value == "AllowAll"
            && p.severity == Severity::Warning),
        "{problems:?}"
    );
}

#[test]
fn invalid_mode_without_a_last_good_policy_is_deny_all_and_other_clusters_are_unaffected() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc(
        "team-a",
        "other",
        "  networkPolicy: {mode: DenyAllEgress, head: {egressRules: [{ports: [{port: 443}]}]}}",
    ));
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkIsolation: {mode: Bogus}",
    ));
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.20",
        "TCP",
        1
    ));
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.20",
        "TCP",
        1
    ));
    assert!(ingress(&e, "team-a", "training-head", "10.0.0.2", "TCP", 1));
    assert!(egress(&e, "team-a", "other-head", "1.1.1.1", "TCP", 443));
    assert!(ingress(&e, "team-a", "other-head", "1.1.1.1", "TCP", 80));
    let mut annotated = rc("team-a", "training", "  rayVersion: x");
    annotated.metadata.annotations = Some(labels(&[("rayfence.io/network-policy", "mode: [")]));
    e.upsert_raycluster(&annotated);
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.20",
        "TCP",
        1
    ));
}

#[test]
fn invalid_rules_allow_nothing_are_reported_with_field_and_value_and_others_still_apply() {
    let cases = [
        (
            "[{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
            "spec.networkPolicy.worker.egressRules[0].to[0].ipBlock.cidr",
            "10.0.0.0/33",
        ),
        (
            "[{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
            "spec.networkPolicy.worker.egressRules[0].to[0].ipBlock.except[0]",
            "11.0.0.0/16",
        ),
        (
            "[{ports: [{protocol: ICMP, port: 1}]}]",
            "spec.networkPolicy.worker.egressRules[0].ports[0].protocol",
            "ICMP",
        ),
        (
            "[{to: [{podSelector: {matchExpressions: [{key: a, operator: Equals, values: [b]}]}}]}]",
            "spec.networkPolicy.worker.egressRules[0].to[0].podSelector.matchExpressions[0].operator",
            "Equals",
        ),
        (
            "[{ports: [{port: 100, endPort: 50}]}]",
            "spec.networkPolicy.worker.egressRules[0].ports[0].endPort",
            "50",
        ),
        (
            "[{ports: 443}]",
            "spec.networkPolicy.worker.egressRules[0]",
            "{\"ports\":443}",
        ),
    ];
    for (bad, field, value) in cases {
        let mut e = scene(settings());
        e.upsert_raycluster(&rc("team-b", "fine", DENY_ALL));
        with_rules(
            &mut e,
            "worker",
            "egressRules",
            &format!("{}, {{ports: [{{port: 22}}]}}]", bad.trim_end_matches(']')),
        );
        assert!(
            !egress(&e, "team-a", "training-cpu", "10.0.0.5", "TCP", 443),
            "{bad}"
        );
        assert!(
            !egress(&e, "team-a", "training-cpu", "8.8.8.8", "TCP", 443),
            "{bad}"
        );
        assert!(
            egress(&e, "team-a", "training-cpu", "8.8.8.8", "TCP", 22),
            "{bad}"
        );
        let problems = e.problems();
        assert!(
            problems
                .iter()
                .any(|p| p.field == field && p.value == value && p.object.name == "training"),
            "{bad}: {problems:?}"
        );
        assert!(
            problems.iter().all(|p| p.object.name != "fine"),
            "{problems:?}"
        );
    }
}

#[test]
fn malformed_block_is_reported_and_treated_as_deny_all() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", "  networkPolicy: 'deny please'"));
    assert!(!egress(
        &e,
        "team-a",
        "training-head",
        "8.8.8.8",
        "TCP",
        443
    ));
    assert!(e.problems().iter().any(|p| p.field == "spec.networkPolicy"));
}

// --------------------------------------------------------------- ids and sharing

#[test]
fn pods_of_a_group_share_one_policy_id_and_endpoint_ids_are_stable() {
    let mut e = scene(settings());
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-cpu-2",
        "training",
        "worker",
        "cpu",
        "10.0.0.5",
    ));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let a = e.endpoint_id("team-a", "training-cpu").unwrap();
    let b = e.endpoint_id("team-a", "training-cpu-2").unwrap();
    assert_ne!(a, b);
    assert_eq!(
        e.tables().endpoints[&a].policy_id,
        e.tables().endpoints[&b].policy_id
    );
    let head = e.endpoint_id("team-a", "training-head").unwrap();
    assert_ne!(
        e.tables().endpoints[&a].policy_id,
        e.tables().endpoints[&head].policy_id
    );
    // Both workers have the same labels apart from the name: one pod identity.
    let ia = e.tables().addresses[&"10.0.0.2".parse().unwrap()];
    let ib = e.tables().addresses[&"10.0.0.5".parse().unwrap()];
    assert_eq!(ia, ib);
    with_rules(&mut e, "worker", "egressRules", "[{ports: [{port: 443}]}]");
    assert_eq!(e.endpoint_id("team-a", "training-cpu"), Some(a));
    // A new pod with the same name is a new endpoint.
    let mut again = ray_pod(
        "team-a",
        "training-cpu",
        "training",
        "worker",
        "cpu",
        "10.0.0.2",
    );
    again.metadata.uid = Some("new-uid".into());
    e.upsert_pod(&again);
    assert_ne!(e.endpoint_id("team-a", "training-cpu"), Some(a));
}

#[test]
fn finished_pods_are_not_endpoints_or_peers() {
    let mut e = scene(settings());
    let mut done = ray_pod("team-a", "done", "training", "worker", "cpu", "10.0.0.77");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    e.upsert_pod(&done);
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(e.endpoint_id("team-a", "done").is_none());
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.77",
        "TCP",
        1
    ));
}

#[test]
fn host_network_ray_pod_is_not_an_endpoint_and_its_address_stays_the_node() {
    let mut e = scene(settings());
    e.upsert_pod(&host_network(ray_pod(
        "team-a", "hostnet", "training", "worker", "cpu", NODE_IP,
    )));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(e.endpoint_id("team-a", "hostnet").is_none());
    assert_eq!(
        e.tables().addresses.get(&NODE_IP.parse().unwrap()),
        Some(&identity::HOST)
    );
    // It is a peer by its labels: a pod of the same RayCluster (docs/semantics.md "What counts as the node").
    let id = e.host_network_identity("team-a", "hostnet").unwrap();
    assert!(allows_identified(
        &e,
        "team-a",
        "training-head",
        Direction::Ingress,
        NODE_IP,
        id,
        "TCP",
        1
    ));
}

#[test]
fn node_address_change_moves_the_host_identity() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        OTHER_NODE_IP,
        "TCP",
        1
    ));
    e.set_node_addresses(vec![OTHER_NODE_IP.parse().unwrap()]);
    expect_ingress(
        &e,
        "team-a",
        "training-head",
        &[(OTHER_NODE_IP, "TCP", 1, ALLOW), (NODE_IP, "TCP", 1, DENY)],
    );
    let stats = e.stats();
    assert_eq!((stats.endpoints, stats.services), (4, 1));
    assert_eq!(stats.policy_rows, e.tables().policy.len());
}

#[test]
fn keys_list_what_the_engine_holds_for_relists() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    use rayfence::policy::Kind;
    assert_eq!(
        e.keys(Kind::RayCluster),
        vec![("team-a".to_owned(), "training".to_owned())]
    );
    assert_eq!(e.keys(Kind::Pod).len(), 10);
    assert_eq!(
        e.keys(Kind::Service),
        vec![("kube-system".to_owned(), "kube-dns".to_owned())]
    );
    e.remove_pod("team-a", "plain");
    assert_eq!(e.keys(Kind::Pod).len(), 9);
}

#[test]
fn take_diff_replays_to_the_same_tables() {
    let mut e = scene(settings());
    let mut mirror = rayfence::tables::Tables::default();
    mirror.apply(&e.take_diff());
    assert_eq!(&mirror, e.tables());
    with_rules(
        &mut e,
        "worker",
        "egressRules",
        "[{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/24]}}]}]",
    );
    e.upsert_pod(&pod(
        "team-b",
        "x",
        &[("a", "b")],
        "10.0.1.99",
        "node-b",
        &[],
    ));
    mirror.apply(&e.take_diff());
    assert_eq!(&mirror, e.tables());
    e.remove_raycluster("team-a", "training");
    mirror.apply(&e.take_diff());
    assert_eq!(&mirror, e.tables());
    assert!(e.take_diff().is_empty());
}

#[test]
fn single_changes_yield_minimal_diffs() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    e.take_diff();
    // Another replica of an existing identity: one address, no rows.
    e.upsert_pod(
        &ray_pod(
            "team-a",
            "training-cpu-remote",
            "training",
            "worker",
            "cpu",
            "10.0.0.6",
        )
        .tap_node("node-b"),
    );
    let diff = e.take_diff();
    assert_eq!(diff.addresses_upsert.len(), 1);
    assert!(
        diff.policy_add.is_empty()
            && diff.policy_remove.is_empty()
            && diff.endpoints_upsert.is_empty()
    );
    // A namespace relabel no selector looks at: nothing.
    e.upsert_namespace(&namespace("team-b", &[("unrelated", "x")]));
    assert!(e.take_diff().is_empty());
    // Re-applying an unchanged RayCluster: nothing.
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    assert!(e.take_diff().is_empty());
}

trait TapNode {
    fn tap_node(self, node: &str) -> Self;
}

impl TapNode for k8s_openapi::api::core::v1::Pod {
    fn tap_node(mut self, node: &str) -> Self {
        if let Some(spec) = self.spec.as_mut() {
            spec.node_name = Some(node.into());
        }
        self
    }
}

// ------------------------------------------------------------------ audit mode

/// `rc` with `rayfence.io/audit` set to `value` (absent for `None`).
fn rc_audit(ns: &str, name: &str, value: Option<&str>, spec: &str) -> rayfence::crd::RayCluster {
    let mut cluster = rc(ns, name, spec);
    if let Some(value) = value {
        cluster.metadata.annotations =
            Some([("rayfence.io/audit".to_owned(), value.to_owned())].into());
    }
    cluster
}

/// `(pod, audit)` of every local endpoint, as `endpoint_meta` and the tables say
/// (which must agree).
fn audit_of(e: &Engine) -> Vec<(String, bool)> {
    e.endpoints()
        .map(|meta| {
            assert_eq!(meta.audit, e.tables().endpoints[&meta.id].audit);
            assert_eq!(meta.audit, meta.policy.audit);
            (meta.pod, meta.audit)
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

fn audited(e: &Engine) -> Vec<String> {
    audit_of(e)
        .into_iter()
        .filter(|(_, audit)| *audit)
        .map(|(pod, _)| pod)
        .collect()
}

const TRAINING_PODS: [&str; 3] = ["training-cpu", "training-gpu", "training-head"];

#[test]
fn audit_annotation_true_makes_only_that_clusters_pods_audit_only() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), DENY_ALL));
    e.upsert_raycluster(&rc("team-a", "other", DENY_ALL));
    assert_eq!(audited(&e), TRAINING_PODS);
    // Audit changes no verdict the tables give: would-drops are still denied there
    // (the datapath passes and counts them).
    assert!(!ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.1.20",
        "TCP",
        8265
    ));
    assert!(ingress(
        &e,
        "team-a",
        "training-head",
        "10.0.0.2",
        "TCP",
        6379
    ));
    let head = e.endpoint_id("team-a", "training-head").unwrap();
    let meta = e.endpoint_meta(head).unwrap();
    assert!(meta.policy.isolate_ingress && meta.policy.isolate_egress && meta.audit);
}

#[test]
fn audit_annotation_false_or_absent_enforces_and_case_does_not_matter() {
    for (value, audit) in [
        (None, false),
        (Some("false"), false),
        (Some("False"), false),
        (Some("FALSE"), false),
        (Some("true"), true),
        (Some("True"), true),
        (Some("TRUE"), true),
    ] {
        let mut e = scene(settings());
        e.upsert_raycluster(&rc_audit("team-a", "training", value, DENY_ALL));
        let expected: Vec<&str> = if audit {
            TRAINING_PODS.to_vec()
        } else {
            vec![]
        };
        assert_eq!(audited(&e), expected, "rayfence.io/audit: {value:?}");
        assert!(
            e.problems_for(&ObjectRef::new("RayCluster", "team-a", "training"))
                .is_empty(),
            "{value:?}"
        );
    }
}

#[test]
fn invalid_audit_annotation_is_enforced_and_reported_with_field_and_value() {
    for value in ["yes", "1", "", " true", "true ", "on", "audit"] {
        let mut e = scene(settings());
        // Even from audit: an invalid value is not "keep the last good one".
        e.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), DENY_ALL));
        assert_eq!(audited(&e), TRAINING_PODS);
        e.upsert_raycluster(&rc_audit("team-a", "training", Some(value), DENY_ALL));
        assert!(audited(&e).is_empty(), "{value:?} must enforce");
        let problems = e.problems_for(&ObjectRef::new("RayCluster", "team-a", "training"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let problem = &problems[0];
        assert_eq!(
            problem.field,
            r#"metadata.annotations["rayfence.io/audit"]"#
        );
        assert_eq!(problem.value, value);
        assert_eq!(problem.severity, Severity::Warning);
        assert!(problem.message.contains("enforced"), "{problem}");
        // Still isolated as declared.
        assert!(!ingress(
            &e,
            "team-a",
            "training-head",
            "10.0.1.20",
            "TCP",
            8265
        ));
        // Fixed: the problem goes.
        e.upsert_raycluster(&rc_audit("team-a", "training", Some("false"), DENY_ALL));
        assert!(e.problems().is_empty(), "{:?}", e.problems());
    }
}

#[test]
fn global_audit_makes_every_endpoint_audit_only_whatever_the_annotation() {
    let mut s = settings();
    s.audit = true;
    let mut e = scene(s);
    e.upsert_raycluster(&rc_audit("team-a", "training", Some("false"), DENY_ALL));
    e.upsert_raycluster(&rc_audit("team-a", "other", Some("bogus"), DENY_ALL));
    assert!(
        audit_of(&e).iter().all(|(_, audit)| *audit),
        "{:?}",
        audit_of(&e)
    );
    assert_eq!(audit_of(&e).len(), 4);
    // The invalid value is still reported.
    assert_eq!(
        e.problems_for(&ObjectRef::new("RayCluster", "team-a", "other"))
            .len(),
        1
    );
}

#[test]
fn audit_annotation_on_an_unisolated_cluster_only_sets_the_flag() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), "  {}"));
    assert_eq!(audited(&e), TRAINING_PODS);
    let head = e.endpoint_id("team-a", "training-head").unwrap();
    let policy = e.tables().endpoints[&head];
    assert!(!policy.isolate_ingress && !policy.isolate_egress);
    // Removing the RayCluster removes its audit switch with it.
    e.remove_raycluster("team-a", "training");
    assert!(audited(&e).is_empty());
}

#[test]
fn editing_only_the_audit_annotation_changes_only_the_endpoint_entries() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    e.upsert_raycluster(&rc("team-a", "other", DENY_ALL));
    e.take_diff();
    let before = e.tables().clone();
    let ids: Vec<u32> = TRAINING_PODS
        .iter()
        .map(|pod| e.endpoint_id("team-a", pod).unwrap())
        .collect();
    for (value, audit) in [("true", true), ("false", false), ("TRUE", true)] {
        e.upsert_raycluster(&rc_audit("team-a", "training", Some(value), DENY_ALL));
        let diff = e.take_diff();
        assert!(
            diff.policy_add.is_empty()
                && diff.policy_remove.is_empty()
                && diff.addresses_upsert.is_empty()
                && diff.addresses_remove.is_empty()
                && diff.cidrs_upsert.is_empty()
                && diff.cidrs_remove.is_empty()
                && diff.endpoints_remove.is_empty(),
            "{value}: {diff:?}"
        );
        let expected: std::collections::BTreeMap<u32, rayfence::tables::EndpointPolicy> = ids
            .iter()
            .map(|id| {
                let old = before.endpoints[id];
                (*id, rayfence::tables::EndpointPolicy { audit, ..old })
            })
            .collect();
        assert_eq!(diff.endpoints_upsert, expected, "{value}");
        // Nothing renumbered.
        for (pod, id) in TRAINING_PODS.iter().zip(&ids) {
            assert_eq!(e.endpoint_id("team-a", pod), Some(*id));
        }
    }
    // The same value again (in another spelling of it): nothing.
    e.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), DENY_ALL));
    assert!(e.take_diff().is_empty());
    // The incremental state equals a rebuild from the same inputs.
    let mut rebuilt = scene(settings());
    rebuilt.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), DENY_ALL));
    rebuilt.upsert_raycluster(&rc("team-a", "other", DENY_ALL));
    assert_eq!(rebuilt.tables(), e.tables());
    let mut back = e.tables().clone();
    for id in &ids {
        back.endpoints.get_mut(id).unwrap().audit = false;
    }
    assert_eq!(back, before, "only the audit bits differ");
}

#[test]
fn audit_annotation_covers_the_networkpolicies_of_its_pods_but_not_other_pods() {
    let mut s = settings();
    s.enforce_networkpolicies = true;
    let mut e = scene(s);
    // Only the cluster label: not a pod the RayCluster's policy applies to.
    e.upsert_pod(&pod(
        "team-a",
        "sidecar",
        &[("ray.io/cluster", "training")],
        "10.0.0.4",
        NODE,
        &[],
    ));
    // A NetworkPolicy isolating every pod of team-a.
    e.upsert_network_policy(&netpol(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: team-a}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    ));
    e.upsert_raycluster(&rc_audit("team-a", "training", Some("true"), DENY_ALL));
    assert_eq!(audited(&e), TRAINING_PODS);
    let sidecar = e.endpoint_id("team-a", "sidecar").unwrap();
    assert!(e.tables().endpoints[&sidecar].isolate_ingress);
    assert!(!ingress(&e, "team-a", "sidecar", "10.9.9.9", "TCP", 1));
}

#[test]
fn egress_to_a_port_a_host_network_pod_declares_needs_a_rule_that_selects_it() {
    let mut e = scene_with_host_network_pods();
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAllEgress",
    ));
    // 9100 is the exporter's: not the node's, so the base flow to the node does not
    // cover it; any other port of the node is the node.
    assert!(!egress(&e, "team-a", "training-head", NODE_IP, "TCP", 9100));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 9101));
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAllEgress\n    head:\n      egressRules: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: node-exporter}}}]}]",
    ));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 9100));
    // An ipBlock covering the node also covers a hostNetwork pod on it.
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy:\n    mode: DenyAllEgress\n    head:\n      egressRules: [{to: [{ipBlock: {cidr: 192.168.0.0/16}}]}]",
    ));
    assert!(egress(&e, "team-a", "training-head", NODE_IP, "TCP", 9100));
}

// ------------------------------------------- issue 17: who an address belongs to

#[test]
fn a_local_pods_address_stops_carrying_its_identity_when_its_sandbox_is_gone() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let worker = "10.0.0.2";
    assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    // The kubelet removed the worker's sandbox; its Pod object lingers. Whoever
    // gets the address next is not the worker.
    assert!(e.set_sandbox_gone("team-a", "training-cpu", "uid-team-a-training-cpu", true));
    assert!(!ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    assert_eq!(e.tables().addresses.get(&worker.parse().unwrap()), None);
    // It stays an endpoint, and a status update of the same pod keeps the reading.
    assert!(e.endpoint_id("team-a", "training-cpu").is_some());
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-cpu",
        "training",
        "worker",
        "cpu",
        worker,
    ));
    assert!(!ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    // Another UID is another pod: nothing changes for it.
    assert!(!e.set_sandbox_gone("team-a", "training-cpu", "some-other-uid", false));
    // A new sandbox of the same pod: trusted again.
    assert!(e.set_sandbox_gone("team-a", "training-cpu", "uid-team-a-training-cpu", false));
    assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    assert!(!e.set_sandbox_gone("team-a", "training-cpu", "uid-team-a-training-cpu", false));
}

#[test]
fn an_address_two_pods_claim_carries_neither_and_both_are_reported() {
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let worker = "10.0.0.2";
    // A remote outsider reports the worker's address while the worker's Pod lingers.
    e.upsert_pod(&pod(
        "team-b",
        "outsider",
        &[("app", "x")],
        worker,
        "node-b",
        &[],
    ));
    assert!(!ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    let problems: Vec<_> = e
        .problems()
        .into_iter()
        .filter(|p| p.field == "status.podIPs")
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems
            .iter()
            .all(|p| p.value == worker && p.severity == Severity::Warning)
    );
    assert!(
        problems
            .iter()
            .any(|p| p.object == ObjectRef::new("Pod", "team-b", "outsider")
                && p.message.contains("Pod team-a/training-cpu"))
    );
    // The old Pod object goes: the address is the outsider's, no longer a member's.
    e.remove_pod("team-a", "training-cpu");
    assert!(!ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    assert!(e.problems().iter().all(|p| p.field != "status.podIPs"));
    // A new worker that got the address is trusted once it alone claims it.
    e.remove_pod("team-b", "outsider");
    e.upsert_pod(&ray_pod(
        "team-a",
        "training-cpu-2",
        "training",
        "worker",
        "cpu",
        worker,
    ));
    assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
}

#[test]
fn a_pod_being_deleted_with_every_container_terminated_holds_no_address() {
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus};
    let mut e = scene(settings());
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    let worker = "10.0.0.2";
    let status = |terminated: bool| ContainerStatus {
        name: "c".into(),
        state: Some(ContainerState {
            terminated: terminated.then(|| ContainerStateTerminated {
                exit_code: 0,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut p = ray_pod(
        "team-a",
        "training-cpu",
        "training",
        "worker",
        "cpu",
        worker,
    );
    // Terminated but not being deleted: a restart in progress, still the pod's.
    p.status.as_mut().unwrap().container_statuses = Some(vec![status(true)]);
    e.upsert_pod(&p);
    assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    // Being deleted, one container still running: still the pod's.
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Default::default(),
    ));
    p.status.as_mut().unwrap().container_statuses = Some(vec![status(true), status(false)]);
    e.upsert_pod(&p);
    assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    // Being deleted, every container terminated: the sandbox goes next.
    p.status.as_mut().unwrap().container_statuses = Some(vec![status(true), status(true)]);
    e.upsert_pod(&p);
    assert!(!ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
    assert!(e.endpoint_id("team-a", "training-cpu").is_some());
    // Failed, or no address at all: nothing to trust either.
    for (phase, ip) in [(Some("Failed"), Some(worker)), (Some("Running"), None)] {
        let mut p = ray_pod(
            "team-a",
            "training-cpu",
            "training",
            "worker",
            "cpu",
            worker,
        );
        let st = p.status.as_mut().unwrap();
        st.phase = phase.map(str::to_owned);
        if ip.is_none() {
            st.pod_ip = None;
            st.pod_ips = None;
        }
        e.upsert_pod(&ray_pod(
            "team-a",
            "training-cpu",
            "training",
            "worker",
            "cpu",
            worker,
        ));
        assert!(ingress(&e, "team-a", "training-head", worker, "TCP", 8265));
        e.upsert_pod(&p);
        assert!(
            !ingress(&e, "team-a", "training-head", worker, "TCP", 8265),
            "{phase:?} {ip:?}"
        );
    }
}

/// The CNI guard's scope: namespaces holding a RayCluster (any, isolated or not) and
/// namespaces labelled `rayfence.io/guard: "true"`, nothing else.
#[test]
fn guarded_namespaces_are_those_with_a_raycluster_or_the_guard_label() {
    use rayfence_common::guard_reasons::{LABEL, RAYCLUSTER};
    let mut e = scene(settings());
    e.upsert_namespace(&namespace("labelled", &[("rayfence.io/guard", "true")]));
    e.upsert_namespace(&namespace("off", &[("rayfence.io/guard", "false")]));
    e.upsert_raycluster(&rc(
        "team-a",
        "training",
        "  networkPolicy: {mode: DenyAll}",
    ));
    e.upsert_raycluster(&rc("plain-rc", "unisolated", "  rayVersion: '2.9'"));
    let guarded = e.guarded_namespaces();
    assert_eq!(guarded.get("team-a"), Some(&RAYCLUSTER), "{guarded:?}");
    assert_eq!(guarded.get("labelled"), Some(&LABEL));
    assert_eq!(guarded.get("plain-rc"), Some(&RAYCLUSTER));
    assert_eq!(guarded.get("off"), None);
    assert_eq!(guarded.get("monitoring"), None);
    e.upsert_namespace(&namespace("team-a", &[("rayfence.io/guard", "true")]));
    assert_eq!(
        e.guarded_namespaces().get("team-a"),
        Some(&(RAYCLUSTER | LABEL))
    );
    e.remove_raycluster("plain-rc", "unisolated");
    assert_eq!(e.guarded_namespaces().get("plain-rc"), None);
}

/// What a guarded pod may query on port 53 follows `--dns-mode`: the DNS Service's
/// ClusterIP and endpoints, any address, or nothing.
#[test]
fn the_guards_dns_is_the_dns_base_flows() {
    let e = scene(settings());
    let (addresses, any) = e.guard_dns();
    let expected: Vec<std::net::IpAddr> =
        vec!["10.3.0.10".parse().unwrap(), "10.96.0.10".parse().unwrap()];
    assert_eq!(addresses.into_iter().collect::<Vec<_>>(), expected);
    assert!(!any);
    let mut anywhere = settings();
    anywhere.dns = DnsMode::Anywhere;
    assert_eq!(scene(anywhere).guard_dns(), (Default::default(), true));
    let mut off = settings();
    off.dns = DnsMode::Off;
    assert_eq!(scene(off).guard_dns(), (Default::default(), false));
}

// ------------------------------------------------ the DNS base flow: NodeLocal DNSCache

const NODE_LOCAL_DNS4: &str = "169.254.20.10";
const NODE_LOCAL_DNS6: &str = "fd00:10:ffff::a";

/// A node with NodeLocal DNSCache: its addresses on a device of the node, its
/// hostNetwork pod declaring port 53 (UDP, TCP) and 9253 as the DaemonSet does;
/// `node_local` is what `--dns-node-local` says.
fn scene_with_node_local_dns(dns: DnsMode, node_local: &[&str], extra_node: &[&str]) -> Engine {
    node_local_dns_scene(node_local_dns_settings(dns, node_local, extra_node))
}

fn node_local_dns_settings(dns: DnsMode, node_local: &[&str], extra_node: &[&str]) -> Settings {
    let mut s = settings();
    s.dns = dns;
    s.node_addresses.extend(
        [NODE_LOCAL_DNS4, NODE_LOCAL_DNS6]
            .iter()
            .chain(extra_node)
            .map(|ip| ip.parse::<std::net::IpAddr>().unwrap()),
    );
    s.dns_node_local = node_local.iter().map(|ip| ip.parse().unwrap()).collect();
    s
}

fn node_local_dns_scene(s: Settings) -> Engine {
    let mut e = scene(s);
    e.upsert_pod(&host_network(pod(
        "kube-system",
        "node-local-dns-x1",
        &[("k8s-app", "node-local-dns")],
        NODE_IP,
        NODE,
        &[
            ("dns", "UDP", 53),
            ("dns-tcp", "TCP", 53),
            ("metrics", "TCP", 9253),
        ],
    )));
    e.upsert_raycluster(&rc("team-a", "training", DENY_ALL));
    e
}

/// `--dns-node-local`: UDP and TCP 53 to the cache's addresses join the DNS base flow
/// (with the DNS Service, whichever it is, or port 53 anywhere), nothing else to them;
/// `off` removes them; the node's own addresses stay the node, and port 53 there
/// stays the hostNetwork pod's (a rule must select it).
#[test]
fn node_local_dns_addresses_join_the_dns_base_flow_on_port_53_only() {
    let both = [NODE_LOCAL_DNS4, NODE_LOCAL_DNS6];
    let kube_dns = DnsMode::default();
    let e = scene_with_node_local_dns(kube_dns.clone(), &both, &[]);
    for p in ["UDP", "TCP"] {
        for ip in both {
            assert!(egress(&e, "team-a", "training-cpu", ip, p, 53), "{ip} {p}");
            assert!(egress(&e, "team-a", "training-head", ip, p, 53), "{ip} {p}");
        }
        assert!(egress(&e, "team-a", "training-cpu", "10.96.0.10", p, 53));
    }
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (NODE_LOCAL_DNS4, "TCP", 9253, DENY),
            (NODE_LOCAL_DNS4, "TCP", 8080, DENY),
            (NODE_LOCAL_DNS6, "UDP", 54, DENY),
            (NODE_IP, "UDP", 53, DENY),
            (NODE_IP, "TCP", 10250, ALLOW),
        ],
    );
    let id = e.endpoint_id("team-a", "training-cpu").unwrap();
    let why = e.explain(
        id,
        Direction::Egress,
        NODE_LOCAL_DNS4.parse().unwrap(),
        17,
        53,
    );
    assert!(
        matches!(&why, Explanation::Allowed(rules) if rules.iter().any(|(_, o)| *o == RuleOrigin::Dns)),
        "{why:?}"
    );
    // The CNI guard's DNS map holds them too.
    let (guard, any) = e.guard_dns();
    assert!(!any);
    for ip in both.iter().chain(&["10.96.0.10", "10.3.0.10"]) {
        assert!(guard.contains(&ip.parse().unwrap()), "{ip}: {guard:?}");
    }

    // Without the flag the cache's address is the node's, and its port 53 the
    // hostNetwork pod's: no rule selects it.
    let e = scene_with_node_local_dns(kube_dns, &[], &[]);
    for ip in both {
        assert!(!egress(&e, "team-a", "training-cpu", ip, "UDP", 53), "{ip}");
    }
    assert!(!e.guard_dns().0.contains(&NODE_LOCAL_DNS4.parse().unwrap()));

    // --dns-service naming another Service: the cache still answers.
    let other = DnsMode::Service {
        namespace: "dns-system".into(),
        name: "resolver".into(),
    };
    let e = scene_with_node_local_dns(other, &both, &[]);
    expect_egress(
        &e,
        "team-a",
        "training-cpu",
        &[
            (NODE_LOCAL_DNS4, "UDP", 53, ALLOW),
            (NODE_LOCAL_DNS6, "TCP", 53, ALLOW),
            ("10.96.0.10", "UDP", 53, DENY),
        ],
    );
    // Anywhere covers them; off removes them (and they are still not the node).
    let e = scene_with_node_local_dns(DnsMode::Anywhere, &both, &[]);
    assert!(egress(
        &e,
        "team-a",
        "training-cpu",
        NODE_LOCAL_DNS4,
        "UDP",
        53
    ));
    assert!(!egress(
        &e,
        "team-a",
        "training-cpu",
        NODE_LOCAL_DNS4,
        "TCP",
        8080
    ));
    let e = scene_with_node_local_dns(DnsMode::Off, &both, &[]);
    for ip in both {
        assert!(!egress(&e, "team-a", "training-cpu", ip, "UDP", 53), "{ip}");
        assert!(
            !egress(&e, "team-a", "training-cpu", ip, "TCP", 8080),
            "{ip}"
        );
    }
    assert_eq!(e.guard_dns(), (Default::default(), false));
}

/// NodeLocal DNSCache's iptables mode also binds kube-dns's ClusterIP on its device:
/// that address is still the DNS Service (port 53 by the DNS base flow, nothing
/// else), not the node, whether or not `--dns-node-local` names it.
#[test]
fn a_dns_cluster_ip_bound_on_a_node_device_stays_the_dns_service() {
    for node_local in [&[NODE_LOCAL_DNS4][..], &[NODE_LOCAL_DNS4, "10.96.0.10"]] {
        let e = scene_with_node_local_dns(DnsMode::default(), node_local, &["10.96.0.10"]);
        expect_egress(
            &e,
            "team-a",
            "training-cpu",
            &[
                ("10.96.0.10", "UDP", 53, ALLOW),
                ("10.96.0.10", "TCP", 53, ALLOW),
                ("10.96.0.10", "TCP", 8080, DENY),
                (NODE_LOCAL_DNS4, "UDP", 53, ALLOW),
            ],
        );
        let owner = e.address_owner("10.96.0.10".parse().unwrap());
        assert!(
            matches!(&owner, rayfence::policy::AddressOwner::Service(key) if key.1 == "kube-dns"),
            "{owner:?}"
        );
    }
}

/// A NetworkPolicy's usual rule for NodeLocal DNSCache (an ipBlock on its address,
/// port 53) allows it once `--dns-node-local` names the address; as the node's
/// address, port 53 there is the cache pod's and no ipBlock reaches it.
#[test]
fn a_network_policy_ip_block_reaches_the_node_local_cache_only_when_it_is_named() {
    for (node_local, allowed) in [(&[NODE_LOCAL_DNS4][..], ALLOW), (&[][..], DENY)] {
        let mut s = node_local_dns_settings(DnsMode::default(), node_local, &[]);
        s.enforce_networkpolicies = true;
        let mut e = node_local_dns_scene(s);
        e.upsert_pod(&pod(
            "team-b",
            "app",
            &[("app", "web")],
            "10.0.1.30",
            NODE,
            &[],
        ));
        e.upsert_network_policy(&netpol(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: dns, namespace: team-b}}\nspec: {{podSelector: {{}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: {NODE_LOCAL_DNS4}/32}}}}], ports: [{{protocol: UDP, port: 53}}]}}]}}\n"
        )));
        expect_egress(
            &e,
            "team-b",
            "app",
            &[
                (NODE_LOCAL_DNS4, "UDP", 53, allowed),
                (NODE_LOCAL_DNS4, "TCP", 53, DENY),
            ],
        );
    }
}
