//! Policy engine benchmark (`cargo xtask bench engine`): full compile of 1,000
//! RayClusters with 10,000 pods across 200 namespaces, single-change incremental
//! updates with p50/p99, resulting table sizes and peak memory; then one RayCluster
//! with 1,000 to 10,000 rules of its own (a compile that grows faster than its rules
//! shows there, not among many small policies).
//!
//! Plain `harness = false` binary, prints one row per result; the objects are built
//! with the kit's typed builders (`rayfence_tests::objects::typed`) where the shapes
//! are the tests' own, and generated here where they are the benchmark's.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rayfence::crd::RayCluster;
use rayfence::policy::{Engine, Settings};
use rayfence_tests::objects::typed::{self as objects, labels};

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NAMESPACES: usize = 200;
const CLUSTERS: usize = 1000;
const PODS_PER_CLUSTER: usize = 10;
const NODES: usize = 100;
const SAMPLES: usize = 300;

fn ns_name(i: usize) -> String {
    format!("team-{i:03}")
}

fn namespace(i: usize, extra: &str) -> Namespace {
    namespace_tier(i, extra, i.is_multiple_of(2))
}

fn namespace_tier(i: usize, extra: &str, prod: bool) -> Namespace {
    // The kit's builder adds the `kubernetes.io/metadata.name` label.
    objects::namespace(
        &ns_name(i),
        &[
            ("tier", if prod { "prod" } else { "dev" }),
            ("extra", extra),
        ],
    )
}

fn cluster(c: usize, port: u16) -> RayCluster {
    let ns = ns_name(c % NAMESPACES);
    let yaml = format!(
        r#"apiVersion: ray.io/v1
kind: RayCluster
metadata: {{name: rc-{c}, namespace: {ns}}}
spec:
  networkPolicy:
    mode: DenyAll
    head:
      ingressRules:
      - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}}}]
        ports: [{{port: {port}, protocol: TCP}}]
      - from: [{{podSelector: {{matchLabels: {{app: notebook}}}}}}]
        ports: [{{port: 10001}}]
      - from: [{{namespaceSelector: {{matchLabels: {{tier: prod}}}}, podSelector: {{matchLabels: {{app: notebook}}}}}}]
        ports: [{{port: 8265}}]
    worker:
      egressRules:
      - to: [{{ipBlock: {{cidr: 10.20.0.0/16, except: [10.20.{x}.0/24]}}}}]
        ports: [{{port: 443}}]
    workerGroups:
    - groupName: gpu
      egressRules:
      - to:
        - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: registry}}}}
          podSelector: {{matchExpressions: [{{key: app, operator: In, values: [model-registry]}}]}}
        ports: [{{port: http}}]
"#,
        x = c % 200
    );
    serde_norway::from_str(&yaml).expect("cluster yaml")
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

fn pod(i: usize, node: &str, extra: &str) -> Pod {
    let c = i / PODS_PER_CLUSTER;
    let k = i % PODS_PER_CLUSTER;
    let ns = ns_name(c % NAMESPACES);
    let rc = format!("rc-{c}");
    let (node_type, group) = match k {
        0 => ("head", "headgroup"),
        1..=6 => ("worker", "cpu"),
        _ => ("worker", "gpu"),
    };
    let mut l = labels(&[
        ("ray.io/cluster", &rc),
        ("ray.io/node-type", node_type),
        ("ray.io/group", group),
    ]);
    if !extra.is_empty() {
        l.insert("extra".into(), extra.into());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{rc}-{k}")),
            namespace: Some(ns),
            uid: Some(format!("uid-{i}")),
            labels: Some(l),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "ray".into(),
                ports: Some(vec![
                    ContainerPort {
                        name: Some("gcs".into()),
                        container_port: 6379,
                        ..Default::default()
                    },
                    ContainerPort {
                        name: Some("dashboard".into()),
                        container_port: 8265,
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(pod_ip(i)),
            pod_ips: Some(vec![PodIP { ip: pod_ip(i) }]),
            ..Default::default()
        }),
    }
}

fn head_service(c: usize) -> (Service, EndpointSlice) {
    let ns = ns_name(c % NAMESPACES);
    let name = format!("rc-{c}-head-svc");
    let ip = format!("10.96.{}.{}", c / 256, c % 256);
    let service = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![
                ServicePort {
                    name: Some("dashboard".into()),
                    port: 8265,
                    ..Default::default()
                },
                ServicePort {
                    name: Some("client".into()),
                    port: 10001,
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-abcde")),
            namespace: Some(ns),
            labels: Some(labels(&[("kubernetes.io/service-name", &name)])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![pod_ip(c * PODS_PER_CLUSTER)],
            ..Default::default()
        }]),
        ports: Some(vec![
            EndpointPort {
                name: Some("dashboard".into()),
                port: Some(8265),
                ..Default::default()
            },
            EndpointPort {
                name: Some("client".into()),
                port: Some(10001),
                ..Default::default()
            },
        ]),
    };
    (service, slice)
}

struct Input {
    namespaces: Vec<Namespace>,
    clusters: Vec<RayCluster>,
    pods: Vec<Pod>,
    services: Vec<(Service, EndpointSlice)>,
}

fn node_of(i: usize, all_local: bool) -> String {
    // Spread so the local share mixes heads and workers of different clusters.
    if all_local {
        "node-0".into()
    } else {
        format!("node-{}", (i + i / NODES) % NODES)
    }
}

fn input(all_local: bool) -> Input {
    let mut namespaces: Vec<Namespace> = (0..NAMESPACES).map(|i| namespace(i, "a")).collect();
    for extra in ["monitoring", "registry", "kube-system"] {
        namespaces.push(Namespace {
            metadata: ObjectMeta {
                name: Some(extra.into()),
                ..Default::default()
            },
            ..Default::default()
        });
    }
    Input {
        namespaces,
        clusters: (0..CLUSTERS).map(|c| cluster(c, 8080)).collect(),
        pods: (0..CLUSTERS * PODS_PER_CLUSTER)
            .map(|i| pod(i, &node_of(i, all_local), ""))
            .collect(),
        services: (0..CLUSTERS).map(head_service).collect(),
    }
}

fn settings() -> Settings {
    Settings::new("node-0", vec!["192.168.0.1".parse().expect("ip")])
}

fn compile(input: &Input) -> Engine {
    let mut engine = Engine::new(settings());
    for ns in &input.namespaces {
        engine.upsert_namespace(ns);
    }
    for (service, slice) in &input.services {
        engine.upsert_service(service);
        engine.upsert_endpoint_slice(slice);
    }
    for pod in &input.pods {
        engine.upsert_pod(pod);
    }
    for cluster in &input.clusters {
        engine.upsert_raycluster(cluster);
    }
    engine
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn report_full(label: &str, all_local: bool) -> Engine {
    let input = input(all_local);
    let base_live = LIVE.load(Ordering::Relaxed);
    PEAK.store(base_live, Ordering::Relaxed);
    let start = Instant::now();
    let mut engine = compile(&input);
    let diff = engine.take_diff();
    let elapsed = start.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - base_live;
    let retained = LIVE.load(Ordering::Relaxed) - base_live;
    drop(diff);
    let t = engine.tables();
    let policies: std::collections::BTreeSet<u32> =
        t.endpoints.values().map(|e| e.policy_id).collect();
    println!(
        "{label:<28} full compile {:>9.1} ms | endpoints {:>6} | policies {:>5} | addresses {:>6} | cidrs {:>5} | policy rows {:>7} | peak {:>7.1} MiB | retained {:>7.1} MiB",
        elapsed.as_secs_f64() * 1e3,
        t.endpoints.len(),
        policies.len(),
        t.addresses.len(),
        t.cidrs.len(),
        t.policy.len(),
        mib(peak),
        mib(retained),
    );
    engine
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

fn report_changes(label: &str, samples: &mut [Duration]) {
    let p50 = percentile(samples, 0.50);
    let p99 = percentile(samples, 0.99);
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "  {label:<40} n={:<4} p50 {:>8.1} us | p99 {:>8.1} us | max {:>8.1} us",
        samples.len(),
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        max.as_secs_f64() * 1e6,
    );
}

/// Times `change(i)` followed by `take_diff`, `SAMPLES` times.
fn measure(engine: &mut Engine, label: &str, mut change: impl FnMut(&mut Engine, usize)) {
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let start = Instant::now();
        change(engine, i);
        let diff = engine.take_diff();
        samples.push(start.elapsed());
        std::hint::black_box(diff);
    }
    report_changes(label, &mut samples);
}

fn incremental(engine: &mut Engine, all_local: bool) {
    let total = CLUSTERS * PODS_PER_CLUSTER;
    // Pre-built objects, so only the engine is timed.
    let new_pods: Vec<Pod> = (0..SAMPLES)
        .map(|i| {
            let mut p = pod((i * 37) % total, &node_of(i, all_local), "");
            p.metadata.name = Some(format!("extra-{i}"));
            p.metadata.uid = Some(format!("uid-extra-{i}"));
            let ip = format!("10.200.{}.{}", i / 256, i % 256);
            let status = p.status.as_mut().expect("status");
            status.pod_ip = Some(ip.clone());
            status.pod_ips = Some(vec![PodIP { ip }]);
            p
        })
        .collect();
    measure(engine, "pod add (new worker, same identity)", |e, i| {
        e.upsert_pod(&new_pods[i])
    });
    measure(engine, "pod remove", |e, i| {
        let p = &new_pods[i];
        e.remove_pod(
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.metadata.name.as_deref().unwrap_or_default(),
        );
    });
    let relabelled: Vec<Pod> = (0..SAMPLES)
        .map(|i| {
            let idx = (i * 53) % total;
            pod(idx, &node_of(idx, all_local), &format!("v{i}"))
        })
        .collect();
    measure(engine, "pod label edit (new identity)", |e, i| {
        e.upsert_pod(&relabelled[i])
    });
    let local: Vec<Pod> = (0..SAMPLES)
        .map(|i| {
            let idx = (0..total)
                .filter(|j| node_of(*j, all_local) == "node-0")
                .nth(i % 100)
                .unwrap_or(0);
            pod(idx, "node-0", &format!("w{i}"))
        })
        .collect();
    measure(engine, "local pod label edit", |e, i| {
        e.upsert_pod(&local[i])
    });
    let edits: Vec<RayCluster> = (0..SAMPLES)
        .map(|i| cluster((i * 7) % CLUSTERS, 9000 + i as u16))
        .collect();
    measure(engine, "RayCluster edit (rule port)", |e, i| {
        e.upsert_raycluster(&edits[i])
    });
    let relabels: Vec<Namespace> = (0..SAMPLES)
        .map(|i| namespace(i % NAMESPACES, &format!("r{i}")))
        .collect();
    measure(engine, "namespace relabel (no selector flips)", |e, i| {
        e.upsert_namespace(&relabels[i])
    });
    // Every head admits notebooks from `tier: prod` namespaces: flipping a namespace's
    // tier makes every head policy recompute that namespace's identities.
    let flips: Vec<Namespace> = (0..SAMPLES)
        .map(|i| {
            namespace_tier(
                i % NAMESPACES,
                &format!("f{i}"),
                (i / NAMESPACES + i % NAMESPACES) % 2 == 1,
            )
        })
        .collect();
    measure(engine, "namespace relabel (flips a selector)", |e, i| {
        e.upsert_namespace(&flips[i])
    });
}

/// Rule counts of the single large RayCluster.
const LARGE_RULES: [usize; 4] = [1_000, 2_500, 5_000, 10_000];

/// One RayCluster (`team-000/big`, a local head) whose head admits `rules` ingress
/// rules on `port`: even ones a distinct ipBlock /24, odd ones the `cpu` workers of
/// one namespace (each such rule gives rows to that namespace's 5 identities).
fn large_cluster(rules: usize, port: u16) -> RayCluster {
    let mut yaml = String::from(
        "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: big, namespace: team-000}\n\
         spec:\n  networkPolicy:\n    mode: DenyAll\n    head:\n      ingressRules:\n",
    );
    for r in 0..rules {
        if r % 2 == 0 {
            yaml.push_str(&format!(
                "      - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n        ports: [{{port: {port}}}]\n",
                r / 256,
                r % 256
            ));
        } else {
            yaml.push_str(&format!(
                "      - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}, podSelector: {{matchLabels: {{ray.io/group: cpu}}}}}}]\n        ports: [{{port: {port}}}]\n",
                ns_name(r % NAMESPACES)
            ));
        }
    }
    serde_norway::from_str(&yaml).expect("large cluster yaml")
}

fn time_diff(engine: &mut Engine, change: impl FnOnce(&mut Engine)) -> Duration {
    let start = Instant::now();
    change(engine);
    std::hint::black_box(engine.take_diff());
    start.elapsed()
}

fn single_large_cluster() {
    println!(
        "one RayCluster with N head ingress rules (half ipBlock /24, half namespace+pod selectors), 10,000 pods"
    );
    let mut base = input(true);
    let mut head = pod(0, "node-0", "");
    head.metadata.name = Some("big-head".into());
    head.metadata.uid = Some("uid-big-head".into());
    let labels = head.metadata.labels.get_or_insert_default();
    labels.insert("ray.io/cluster".into(), "big".into());
    let status = head.status.get_or_insert_default();
    status.pod_ip = Some("10.250.0.1".into());
    status.pod_ips = Some(vec![PodIP {
        ip: "10.250.0.1".into(),
    }]);
    base.pods.push(head);
    for rules in LARGE_RULES {
        let mut engine = compile(&base);
        engine.take_diff();
        let (cluster, grown, shrunk) = (
            large_cluster(rules, 8080),
            large_cluster(rules + 1, 8080),
            large_cluster(rules, 8080),
        );
        let base_live = LIVE.load(Ordering::Relaxed);
        PEAK.store(base_live, Ordering::Relaxed);
        let compile_time = time_diff(&mut engine, |e| e.upsert_raycluster(&cluster));
        let peak = PEAK.load(Ordering::Relaxed) - base_live;
        let grant = time_diff(&mut engine, |e| e.upsert_raycluster(&grown));
        let revoke = time_diff(&mut engine, |e| e.upsert_raycluster(&shrunk));
        let port_edit = time_diff(&mut engine, |e| {
            e.upsert_raycluster(&large_cluster(rules, 9090))
        });
        let t = engine.tables();
        println!(
            "  N={rules:<6} add {:>9.1} ms | one rule added {:>9.1} ms | one rule removed {:>9.1} ms | every port changed {:>9.1} ms | cidrs {:>6} | policy rows {:>7} | peak {:>7.1} MiB",
            compile_time.as_secs_f64() * 1e3,
            grant.as_secs_f64() * 1e3,
            revoke.as_secs_f64() * 1e3,
            port_edit.as_secs_f64() * 1e3,
            t.cidrs.len(),
            t.policy.len(),
            mib(peak),
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--large-only") {
        single_large_cluster();
        return;
    }
    println!(
        "rayfence policy engine: {CLUSTERS} RayClusters, {} pods, {NAMESPACES} namespaces, {CLUSTERS} head Services",
        CLUSTERS * PODS_PER_CLUSTER
    );
    let mut engine = report_full(&format!("{NODES} nodes (1% local)"), false);
    incremental(&mut engine, false);
    drop(engine);
    let mut engine = report_full("1 node (all pods local)", true);
    incremental(&mut engine, true);
    drop(engine);
    single_large_cluster();
}
