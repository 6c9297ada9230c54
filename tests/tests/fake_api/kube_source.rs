//! The agent's Kubernetes source (`rayfence::source::kube`) and Event reporter
//! (`rayfence::operator::events`) against the fake API server over real HTTP: what
//! the runtime receives on the initial sync, on live changes, on a relist, during an
//! outage and while the RayCluster CRD is missing; and which Events bad input posts.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rayfence::operator::events::{EventReporterConfig, KubeEventReporter, REPORTING_CONTROLLER};
use rayfence::policy::{ObjectRef, Problem, Severity};
use rayfence::source::kube::{KubeSourceConfig, run};
use rayfence::source::{ObjectKind, ProblemReporter, SourceEvent, SourceStatus};
use rayfence_tests::fake_api::{FakeApiServer, eventually};
use rayfence_tests::objects::json::namespace;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Long enough for the watchers' backoff (0.8 s, 1.6 s, 3.2 s, 6.4 s, ...) to retry.
const WAIT: Duration = Duration::from_secs(30);

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}],
            "images": [{"names": ["rayproject/ray:2.40.0"], "sizeBytes": 1}]}})
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ray",
            "labels": {"ray.io/cluster": "rc", "ray.io/node-type": "worker", "ray.io/group": "g"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": node, "containers": [{"name": "ray", "image": "rayproject/ray",
            "env": [{"name": "RAY_ADDRESS", "value": "rc-head:6379"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn raycluster(name: &str, mode: &str) -> Value {
    json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": name, "namespace": "ray"},
        "spec": {"networkPolicy": {"mode": mode},
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}}}})
}

fn seed(server: &FakeApiServer) {
    server.apply(&namespace("ray"));
    server.apply(&node("node-a", "192.168.0.1"));
    server.apply(&node("node-b", "192.168.0.2"));
    server.apply(&pod("w-a", "node-a", "10.1.0.10"));
    server.apply(&pod("w-b", "node-b", "10.2.0.10"));
    server.apply(&json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "rc-head", "namespace": "ray"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 8265}]}}));
    server.apply(
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "rc-head-abc", "namespace": "ray",
            "labels": {"kubernetes.io/service-name": "rc-head"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.10"]}]}),
    );
}

/// The source under test, run in a task; everything it sent, in order.
struct Source {
    events: Arc<Mutex<Vec<SourceEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Source {
    fn start(server: &FakeApiServer, config: KubeSourceConfig) -> anyhow::Result<Self> {
        let client = server.client()?;
        // Small on purpose: the source must live with backpressure.
        let (tx, mut rx) = mpsc::channel(4);
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let source = tokio::spawn(run(client, config, tx));
            while let Some(event) = rx.recv().await {
                sink.lock().unwrap().push(event);
            }
            let _ = source.await;
        });
        Ok(Self { events, task })
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    fn since(&self, from: usize) -> Vec<SourceEvent> {
        self.events.lock().unwrap()[from..].to_vec()
    }

    fn all(&self) -> Vec<SourceEvent> {
        self.since(0)
    }

    fn resyncs(&self, kind: ObjectKind) -> Vec<Vec<String>> {
        resyncs(&self.all(), kind)
    }

    /// The kinds of the `WatchRestarted` statuses since event `from`, in order.
    fn restarts_since(&self, from: usize) -> Vec<ObjectKind> {
        self.since(from)
            .into_iter()
            .filter_map(|e| match e {
                SourceEvent::Status(SourceStatus::WatchRestarted { kind }) => Some(kind),
                _ => None,
            })
            .collect()
    }

    fn statuses(&self) -> Vec<SourceStatus> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                SourceEvent::Status(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

/// The names in each Resync of `kind`, sorted.
fn resyncs(events: &[SourceEvent], kind: ObjectKind) -> Vec<Vec<String>> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Resync(k, objects) if *k == kind => {
                let mut names: Vec<String> = objects.iter().map(|o| o.key().name).collect();
                names.sort();
                Some(names)
            }
            _ => None,
        })
        .collect()
}

fn applied(events: &[SourceEvent], kind: ObjectKind, name: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, SourceEvent::Apply(o) if o.kind() == kind && o.key().name == name))
}

fn deleted(events: &[SourceEvent], kind: ObjectKind, name: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, SourceEvent::Delete(k, key) if *k == kind && key.name == name))
}

fn implies_deletion(event: &SourceEvent) -> bool {
    matches!(event, SourceEvent::Delete(..) | SourceEvent::Resync(..))
}

fn config(enforce_networkpolicies: bool) -> KubeSourceConfig {
    KubeSourceConfig {
        enforce_networkpolicies,
        ..KubeSourceConfig::new("node-a")
    }
}

async fn synced(source: &Source, kinds: &[ObjectKind]) -> anyhow::Result<()> {
    eventually(WAIT, "a Resync of every kind", || {
        kinds.iter().all(|k| !source.resyncs(*k).is_empty())
    })
    .await
}

#[tokio::test]
async fn initial_sync_is_one_resync_per_kind_with_pods_of_all_nodes_and_only_this_node()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    server.apply(&raycluster("rc", "DenyAll"));
    let config = config(false);
    let kinds = config.kinds();
    let source = Source::start(&server, config)?;
    synced(&source, &kinds).await?;

    for kind in &kinds {
        assert_eq!(source.resyncs(*kind).len(), 1, "one Resync of {kind:?}");
    }
    assert_eq!(source.resyncs(ObjectKind::Pod)[0], ["w-a", "w-b"]);
    assert_eq!(source.resyncs(ObjectKind::Node)[0], ["node-a"]);
    assert_eq!(source.resyncs(ObjectKind::RayCluster)[0], ["rc"]);
    assert_eq!(source.resyncs(ObjectKind::Namespace)[0], ["ray"]);
    assert_eq!(source.resyncs(ObjectKind::Service)[0], ["rc-head"]);
    assert_eq!(
        source.resyncs(ObjectKind::EndpointSlice)[0],
        ["rc-head-abc"]
    );
    assert!(source.statuses().contains(&SourceStatus::Connected));
    assert!(
        !source
            .all()
            .iter()
            .any(|e| matches!(e, SourceEvent::Delete(..))),
        "no deletes on a sync"
    );
    assert_eq!(source.restarts_since(0), [], "no watch restarted");

    // The Node watch asks the server for this node only.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.path == "/api/v1/nodes")
            .all(|r| r.param("fieldSelector").as_deref() == Some("metadata.name=node-a")),
        "{requests:?}"
    );

    // Delivered objects are trimmed: no managedFields, no env, no node images.
    for event in source.all() {
        if let SourceEvent::Resync(ObjectKind::Pod, pods) = event {
            for o in pods {
                let rayfence::source::Object::Pod(p) = o else {
                    panic!("a Pod Resync holds pods")
                };
                assert!(p.metadata.managed_fields.is_none());
                let spec = p.spec.unwrap();
                assert!(spec.containers[0].env.is_none());
                assert!(spec.node_name.is_some());
                assert!(p.status.unwrap().pod_ip.is_some());
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn adds_modifies_and_deletes_arrive_as_apply_and_delete() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    server.apply(&raycluster("rc", "DenyAll"));
    let config = config(false);
    let kinds = config.kinds();
    let source = Source::start(&server, config)?;
    synced(&source, &kinds).await?;
    let mark = source.len();

    server.apply(&pod("w-c", "node-b", "10.2.0.11"));
    server.apply(&raycluster("rc", "DenyAllIngress"));
    server.delete(&pod("w-a", "node-a", "10.1.0.10"));
    server.apply(&node("node-b", "192.168.0.22"));
    server.apply(&node("node-a", "192.168.0.11"));
    eventually(WAIT, "the add, edit, delete and node change", || {
        let events = source.since(mark);
        applied(&events, ObjectKind::Pod, "w-c")
            && deleted(&events, ObjectKind::Pod, "w-a")
            && applied(&events, ObjectKind::Node, "node-a")
            && events.iter().any(|e| match e {
                SourceEvent::Apply(rayfence::source::Object::RayCluster(rc)) => {
                    rc.spec.network_policy == Some(json!({"mode": "DenyAllIngress"}))
                }
                _ => false,
            })
    })
    .await?;
    let events = source.since(mark);
    assert!(
        !applied(&events, ObjectKind::Node, "node-b"),
        "another node's changes are not watched"
    );
    assert!(resyncs(&events, ObjectKind::Pod).is_empty(), "no relist");
    Ok(())
}

#[tokio::test]
async fn network_policies_are_watched_only_when_enforced() -> anyhow::Result<()> {
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "ray"}, "spec": {"podSelector": {}}});
    let watched = |server: &FakeApiServer| {
        server
            .requests()
            .iter()
            .any(|r| r.path.contains("networkpolicies"))
    };

    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    server.apply(&np);
    let off = config(false);
    let kinds = off.kinds();
    let source = Source::start(&server, off)?;
    synced(&source, &kinds).await?;
    assert!(
        !watched(&server),
        "NetworkPolicies requested while disabled"
    );
    assert!(source.resyncs(ObjectKind::NetworkPolicy).is_empty());
    drop(source);

    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    server.apply(&np);
    let on = config(true);
    let kinds = on.kinds();
    assert!(kinds.contains(&ObjectKind::NetworkPolicy));
    let source = Source::start(&server, on)?;
    synced(&source, &kinds).await?;
    assert!(watched(&server));
    assert_eq!(source.resyncs(ObjectKind::NetworkPolicy), [["deny"]]);
    Ok(())
}

#[tokio::test]
async fn compaction_relists_and_an_object_deleted_unseen_is_left_out_of_the_resync()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    let config = config(false);
    let kinds = config.kinds();
    let source = Source::start(&server, config)?;
    synced(&source, &kinds).await?;

    assert_eq!(
        source.restarts_since(0),
        [],
        "no restart before the compaction"
    );

    // compact + close: every watch resumes into a 410 and relists.
    server.compact_history();
    server.close_watches();
    eventually(WAIT, "a second Resync of every kind", || {
        kinds.iter().all(|k| source.resyncs(*k).len() >= 2)
    })
    .await?;
    assert_eq!(source.resyncs(ObjectKind::Pod)[1], ["w-a", "w-b"]);
    // Each relist is a watch restart of its kind.
    let restarted: BTreeSet<ObjectKind> = source.restarts_since(0).into_iter().collect();
    assert_eq!(
        restarted,
        kinds.iter().copied().collect::<BTreeSet<_>>(),
        "a WatchRestarted per kind"
    );

    // A delete the watch cannot see (the server is down), then the history is gone:
    // the relist's Resync is how the runtime learns of it, never a made-up Delete.
    let mark = source.len();
    server.set_available(false);
    server.delete(&pod("w-b", "node-b", "10.2.0.10"));
    server.compact_history();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.set_available(true);
    eventually(WAIT, "a Pod Resync without w-b", || {
        resyncs(&source.since(mark), ObjectKind::Pod).contains(&vec!["w-a".to_owned()])
    })
    .await?;
    assert!(!deleted(&source.since(mark), ObjectKind::Pod, "w-b"));
    Ok(())
}

#[tokio::test]
async fn an_outage_is_unreachable_without_deletions_then_connected_and_live_again()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    seed(&server);
    server.apply(&raycluster("rc", "DenyAll"));
    let config = config(false);
    let kinds = config.kinds();
    let source = Source::start(&server, config)?;
    synced(&source, &kinds).await?;
    let mark = source.len();

    server.set_available(false);
    eventually(WAIT, "Status(Unreachable)", || {
        source
            .since(mark)
            .iter()
            .any(|e| matches!(e, SourceEvent::Status(SourceStatus::Unreachable { .. })))
    })
    .await?;
    // Let the watchers fail and retry a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = source.since(mark);
    assert!(
        !during.iter().any(implies_deletion),
        "nothing that implies a deletion during the outage: {during:?}"
    );
    let unreachable = during
        .iter()
        .filter(|e| matches!(e, SourceEvent::Status(SourceStatus::Unreachable { .. })))
        .count();
    assert_eq!(unreachable, 1, "Unreachable is said once: {during:?}");
    assert!(server.refused_connections() > 0);
    // Every failed attempt is a restart (counted), unlike Unreachable (said once).
    assert!(
        source.restarts_since(mark).len() > 1,
        "watch restarts during the outage: {:?}",
        source.restarts_since(mark)
    );

    let back = source.len();
    server.set_available(true);
    eventually(WAIT, "Status(Connected)", || {
        source
            .since(back)
            .iter()
            .any(|e| matches!(e, SourceEvent::Status(SourceStatus::Connected)))
    })
    .await?;
    server.apply(&pod("w-new", "node-a", "10.1.0.12"));
    eventually(WAIT, "a change after the outage", || {
        applied(&source.since(back), ObjectKind::Pod, "w-new")
    })
    .await?;
    // The history was kept: the watches resumed without a relist.
    assert!(!source.since(mark).iter().any(implies_deletion));
    Ok(())
}

#[tokio::test]
async fn a_missing_raycluster_crd_is_kind_missing_and_waited_for() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    seed(&server);
    let config = config(false);
    let source = Source::start(&server, config)?;
    eventually(
        WAIT,
        "KindMissing(RayCluster) and the other kinds synced",
        || {
            source.statuses().iter().any(|s| {
                matches!(
                    s,
                    SourceStatus::KindMissing {
                        kind: ObjectKind::RayCluster,
                        ..
                    }
                )
            }) && !source.resyncs(ObjectKind::Pod).is_empty()
                && !source.resyncs(ObjectKind::Node).is_empty()
        },
    )
    .await?;
    // Several retries (backoff 0.8 s, 1.6 s, ...) still say it once, and do not
    // flap to Connected on each attempt (Connected once, for the other kinds).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let said_missing = |s: &SourceStatus| matches!(s, SourceStatus::KindMissing { .. });
    let statuses = source.statuses();
    assert_eq!(
        statuses.iter().filter(|s| said_missing(s)).count(),
        1,
        "{statuses:?}"
    );
    let connected = statuses
        .iter()
        .filter(|s| **s == SourceStatus::Connected)
        .count();
    assert!(connected <= 1, "no Connected per retry: {statuses:?}");
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| r.is_list_of("/apis/ray.io/v1/rayclusters"))
            .count()
            >= 2,
        "the RayCluster list is retried"
    );
    assert!(source.resyncs(ObjectKind::RayCluster).is_empty());
    assert!(
        !source
            .statuses()
            .iter()
            .any(|s| matches!(s, SourceStatus::Unreachable { .. })),
        "a missing kind is not an outage"
    );

    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&raycluster("rc", "DenyAll"));
    eventually(
        WAIT,
        "a Resync of RayClusters once the CRD is served",
        || source.resyncs(ObjectKind::RayCluster) == [["rc"]],
    )
    .await?;
    let missing = source
        .statuses()
        .iter()
        .filter(|s| matches!(s, SourceStatus::KindMissing { .. }))
        .count();
    assert_eq!(missing, 1, "KindMissing said once while retrying");
    assert_eq!(source.statuses().last(), Some(&SourceStatus::Connected));
    Ok(())
}

fn problem(field: &str, value: &str) -> Problem {
    Problem {
        object: ObjectRef::new("RayCluster", "ray", "rc"),
        field: field.to_owned(),
        value: value.to_owned(),
        message: "invalid; the last good policy stays".to_owned(),
        severity: Severity::Warning,
    }
}

#[tokio::test]
async fn the_reporter_posts_one_event_per_distinct_problem_naming_field_and_value()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&namespace("ray"));
    let stored = server.apply(&raycluster("rc", "Sometimes"));
    let uid = stored["metadata"]["uid"].as_str().unwrap().to_owned();
    let reporter = KubeEventReporter::spawn(server.client()?, EventReporterConfig::new("node-a"));

    let mode = problem("spec.networkPolicy.mode", "Sometimes");
    let cidr = problem(
        "spec.networkPolicy.worker.egressRules[0].to[0].ipBlock.cidr",
        "10.0.0.0/33",
    );
    for _ in 0..5 {
        reporter.report(&mode);
        reporter.report(&cidr);
    }
    // A problem on an object that does not exist (any more) posts nothing.
    reporter.report(&Problem {
        object: ObjectRef::new("RayCluster", "ray", "gone"),
        ..mode.clone()
    });
    eventually(WAIT, "two Events", || server.events().len() >= 2).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    reporter.report(&mode);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events = server.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let notes: BTreeSet<String> = events
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("spec.networkPolicy.mode") && n.contains("Sometimes"))
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ipBlock.cidr") && n.contains("10.0.0.0/33"))
    );
    for e in &events {
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["metadata"]["namespace"], "ray");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["reason"], "InvalidRayCluster");
        assert_eq!(e["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(e["reportingInstance"], "node-a");
        assert_eq!(e["regarding"]["kind"], "RayCluster");
        assert_eq!(e["regarding"]["apiVersion"], "ray.io/v1");
        assert_eq!(e["regarding"]["name"], "rc");
        assert_eq!(e["regarding"]["uid"], uid.as_str());
    }
    let stats = reporter.stats();
    assert_eq!((stats.posted, stats.dropped, stats.failed), (2, 0, 0));
    Ok(())
}

#[tokio::test]
async fn the_reporter_posts_a_problem_again_only_for_a_new_generation() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&raycluster("rc", "Sometimes"));
    let repeat_after = Duration::from_millis(100);
    let reporter = KubeEventReporter::spawn(
        server.client()?,
        EventReporterConfig {
            repeat_after,
            ..EventReporterConfig::new("node-a")
        },
    );
    let mode = problem("spec.networkPolicy.mode", "Sometimes");
    reporter.report(&mode);
    eventually(WAIT, "the first Event", || server.events().len() == 1).await?;

    // Past repeat_after, same generation: looked up again, not posted again.
    for _ in 0..3 {
        tokio::time::sleep(repeat_after * 2).await;
        reporter.report(&mode);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 1, "same generation, same problem");

    // An edit elsewhere in the spec (new generation) that keeps the bad mode.
    let mut edited = raycluster("rc", "Sometimes");
    edited["spec"]["networkPolicy"]["worker"] = json!({"ingressRules": []});
    let stored = server.apply(&edited);
    assert_eq!(stored["metadata"]["generation"], 2);
    tokio::time::sleep(repeat_after * 2).await;
    reporter.report(&mode);
    eventually(WAIT, "a second Event for generation 2", || {
        server.events().len() == 2
    })
    .await?;
    tokio::time::sleep(repeat_after * 2).await;
    reporter.report(&mode);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.events().len(), 2);
    assert_eq!(reporter.stats().posted, 2);
    Ok(())
}

#[tokio::test]
async fn a_full_reporter_queue_drops_and_counts_without_blocking() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&raycluster("rc", "Sometimes"));
    // The API server is down: the background task is stuck retrying nothing, posts
    // fail, the queue of one fills.
    server.set_available(false);
    let reporter = KubeEventReporter::spawn(
        server.client()?,
        EventReporterConfig {
            queue_capacity: 1,
            ..EventReporterConfig::new("node-a")
        },
    );
    let started = std::time::Instant::now();
    for i in 0..50 {
        reporter.report(&problem("spec.networkPolicy.mode", &format!("v{i}")));
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "report() blocked"
    );
    assert!(reporter.stats().dropped > 0);
    Ok(())
}
