//! The fake API server's single-object and discovery paths through a real
//! kube::Client: a RayCluster CRD that is missing and then installed, typed
//! round-trips, Events posted by a kube-rs Recorder, status codes, pagination,
//! discovery, and the watch wire format (in-stream 410 Gone, bookmarks).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, CustomResource, Resource, ResourceExt};
use rayfence_tests::fake_api::{FakeApiServer, eventually};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// The part of KubeRay's RayCluster the agent reads, typed as kube-derive makes it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ray.io",
    version = "v1",
    kind = "RayCluster",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
struct RayClusterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ray_version: Option<String>,
    head_group_spec: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    worker_group_specs: Vec<Value>,
}

fn raycluster(name: &str) -> RayCluster {
    let mut rc = RayCluster::new(
        name,
        RayClusterSpec {
            ray_version: Some("2.40.0".into()),
            head_group_spec: json!({"rayStartParams": {}, "template": {"spec": {"containers": []}}}),
            worker_group_specs: vec![json!({"groupName": "gpu", "replicas": 2})],
        },
    );
    rc.metadata.namespace = Some("ray".into());
    rc.metadata.labels = Some([("rayfence.io/isolation".to_owned(), "strict".to_owned())].into());
    rc
}

fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test]
async fn missing_raycluster_crd_answers_404_until_installed() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let api: Api<RayCluster> = Api::all(server.client()?);
    let err = api
        .list(&ListParams::default())
        .await
        .expect_err("no CRD yet");
    assert_eq!(status_code(&err), Some(404), "{err:?}");
    assert!(
        server
            .try_apply(&raycluster("rc"))
            .is_err_and(|e| e.code == 404)
    );

    // The agent's pipeline reports the missing CRD and keeps trying.
    let (reader, writer) = reflector::store();
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Err(watcher::Error::InitialListFailed(e)) = item {
                seen.lock().unwrap().push(status_code(&e));
            }
        }
    });
    eventually(WAIT, "the watcher to report 404", || {
        errors.lock().unwrap().contains(&Some(404))
    })
    .await?;
    assert!(reader.is_empty());

    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&raycluster("rc"));
    tokio::time::timeout(WAIT, reader.wait_until_ready()).await??;
    eventually(WAIT, "the RayCluster in the store", || reader.len() == 1).await?;
    task.abort();

    // Installing stores the CRD object too, as an agent checking for it would see.
    let crds: Api<CustomResourceDefinition> = Api::all(server.client()?);
    let crd = crds.get("rayclusters.ray.io").await?;
    assert_eq!(crd.spec.names.kind, "RayCluster");
    assert_eq!(crd.spec.scope, "Namespaced");
    Ok(())
}

#[tokio::test]
async fn raycluster_round_trips_as_typed_json() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    let api: Api<RayCluster> = Api::namespaced(server.client()?, "ray");
    let sent = raycluster("rc");
    let created = api.create(&PostParams::default(), &sent).await?;
    assert_eq!(created.spec, sent.spec);
    assert_eq!(created.labels(), sent.labels());
    assert!(created.uid().is_some() && created.resource_version().is_some());
    assert!(created.creation_timestamp().is_some());
    assert_eq!(created.meta().generation, Some(1));
    let got = api.get("rc").await?;
    assert_eq!(
        (&got.metadata, &got.spec),
        (&created.metadata, &created.spec)
    );

    // As stored: the JSON the typed object serialises to, plus what the server owns.
    let stored = server
        .get("ray.io/v1", "RayCluster", Some("ray"), "rc")
        .expect("stored");
    assert_eq!(stored["apiVersion"], "ray.io/v1");
    assert_eq!(stored["kind"], "RayCluster");
    assert_eq!(stored["spec"], serde_json::to_value(&sent.spec)?);

    // A merge patch of the spec bumps generation and resourceVersion.
    let patched = api
        .patch(
            "rc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rayVersion": "2.41.0"}})),
        )
        .await?;
    assert_eq!(patched.spec.ray_version.as_deref(), Some("2.41.0"));
    assert_eq!(
        patched.spec.worker_group_specs,
        sent.spec.worker_group_specs
    );
    assert_eq!(patched.meta().generation, Some(2));
    assert_ne!(patched.resource_version(), created.resource_version());
    assert_eq!(patched.uid(), created.uid());

    api.delete("rc", &DeleteParams::default()).await?;
    let err = api.get("rc").await.expect_err("deleted");
    assert_eq!(status_code(&err), Some(404));
    Ok(())
}

#[tokio::test]
async fn events_posted_by_a_kube_recorder_are_recorded() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.install_crd("ray.io", "v1", "rayclusters");
    let rc: RayCluster = serde_json::from_value(server.apply(&raycluster("rc")))?;
    let reporter = Reporter {
        controller: "rayfence-agent".into(),
        instance: Some("node-a".into()),
    };
    let recorder = Recorder::new(server.client()?, reporter);
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidIsolation".into(),
        note: Some("metadata.labels[rayfence.io/isolation]: invalid value \"strictest\"".into()),
        action: "Validate".into(),
        secondary: None,
    };
    recorder.publish(&event, &rc.object_ref(&())).await?;

    let events = server.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    let posted = &events[0];
    assert_eq!(posted["apiVersion"], "events.k8s.io/v1");
    assert_eq!(posted["metadata"]["namespace"], "ray");
    assert_eq!(posted["regarding"]["kind"], "RayCluster");
    assert_eq!(posted["regarding"]["name"], "rc");
    assert_eq!(posted["reason"], "InvalidIsolation");
    assert_eq!(posted["type"], "Warning");
    assert_eq!(posted["reportingController"], "rayfence-agent");
    assert!(
        posted["note"]
            .as_str()
            .is_some_and(|n| n.contains("strictest"))
    );
    assert!(server.requests().iter().any(|r| r.method == "POST" && r.path == "/apis/events.k8s.io/v1/namespaces/ray/events"));

    // The same event again: the Recorder patches it into a series, still one Event.
    recorder.publish(&event, &rc.object_ref(&())).await?;
    let events = server.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["series"]["count"], 2);
    Ok(())
}

#[tokio::test]
async fn writes_answer_with_kubernetes_status_codes() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let client = server.client()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ray");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "head"},
        "spec": {"nodeName": "node-a", "containers": [{"name": "ray"}]},
    }))?;
    let created = pods.create(&PostParams::default(), &pod).await?;
    assert_eq!(created.namespace().as_deref(), Some("ray"));

    let again = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect_err("exists");
    assert_eq!(status_code(&again), Some(409));
    let missing = pods.get("nope").await.expect_err("missing");
    assert_eq!(status_code(&missing), Some(404));

    // Replace with the current resourceVersion succeeds, with a stale one conflicts.
    let mut update = created.clone();
    update.labels_mut().insert("a".into(), "b".into());
    let replaced = pods
        .replace("head", &PostParams::default(), &update)
        .await?;
    let stale = pods
        .replace("head", &PostParams::default(), &update)
        .await
        .expect_err("stale");
    assert_eq!(status_code(&stale), Some(409));
    assert_eq!(replaced.labels().get("a").map(String::as_str), Some("b"));

    // Cluster-scoped resources live outside namespaces.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "ray", "labels": {"team": "ml"}}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let listed = namespaces
        .list(&ListParams::default().labels("team=ml"))
        .await?;
    assert_eq!(listed.items.len(), 1);
    assert!(server.get("v1", "Namespace", None, "ray").is_some());
    Ok(())
}

#[tokio::test]
async fn list_with_limit_pages_through_every_object_once() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    for i in 0..5 {
        server.apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": "ray"},
            "spec": {"containers": []},
        }));
    }
    let pods: Api<Pod> = Api::all(server.client()?);
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    let mut pages = 0;
    loop {
        let page = pods.list(&params).await?;
        pages += 1;
        assert_eq!(
            page.metadata.resource_version,
            Some(server.resource_version().to_string())
        );
        names.extend(page.items.iter().map(|p| p.name_any()));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names, ["p0", "p1", "p2", "p3", "p4"]);
    assert_eq!(pages, 3);
    Ok(())
}

#[tokio::test]
async fn watch_from_before_a_compaction_gets_an_in_stream_410_error_event() -> anyhow::Result<()> {
    // kube-rs's watcher relists only on a 410 that arrives as an ERROR event in
    // the stream (what a real server sends); an HTTP 410 on the watch request
    // would make it retry the same resourceVersion forever.
    let server = FakeApiServer::start().await?;
    server.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}));
    let old = server.resource_version().to_string();
    server.compact_history();
    let namespaces: Api<Namespace> = Api::all(server.client()?);
    let events: Vec<_> = namespaces
        .watch(&WatchParams::default(), &old)
        .await?
        .try_collect()
        .await?;
    match events.as_slice() {
        [WatchEvent::Error(status)] => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected one ERROR event, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn watch_sends_bookmarks_that_move_past_other_resources_writes() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let start = server.resource_version().to_string();
    let namespaces: Api<Namespace> = Api::all(server.client()?);
    // Bookmarks are on by default in WatchParams (allowWatchBookmarks=true).
    let mut stream = namespaces
        .watch(&WatchParams::default(), &start)
        .await?
        .boxed();
    // A write to another resource moves the global resourceVersion on.
    let pod = server
        .apply(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}));
    let pod_rv = pod["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    let bookmark = tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.try_next().await? {
            if let WatchEvent::Bookmark(b) = event
                && b.metadata.resource_version == pod_rv
            {
                return anyhow::Ok(b);
            }
        }
        anyhow::bail!("the watch ended without a bookmark")
    })
    .await??;
    assert_eq!(bookmark.types.kind, "Namespace");
    Ok(())
}

#[tokio::test]
async fn discovery_lists_installed_groups_and_the_crd_once_installed() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let client = server.client()?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.major, "1");
    let groups = |list: k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroupList| {
        list.groups.into_iter().map(|g| g.name).collect::<Vec<_>>()
    };
    let before = groups(client.list_api_groups().await?);
    assert!(before.iter().any(|g| g == "discovery.k8s.io"), "{before:?}");
    assert!(
        before.iter().any(|g| g == "networking.k8s.io"),
        "{before:?}"
    );
    assert!(!before.iter().any(|g| g == "ray.io"), "{before:?}");
    assert_eq!(client.list_core_api_versions().await?.versions, ["v1"]);

    server.install_crd("ray.io", "v1", "rayclusters");
    assert!(
        groups(client.list_api_groups().await?)
            .iter()
            .any(|g| g == "ray.io")
    );
    let resources = client.list_api_group_resources("ray.io/v1").await?;
    assert!(
        resources
            .resources
            .iter()
            .any(|r| r.name == "rayclusters" && r.namespaced && r.kind == "RayCluster")
    );
    let discovery = kube::Discovery::new(client).run().await?;
    assert!(discovery.has_group("ray.io"));
    Ok(())
}

#[tokio::test]
async fn kubeconfig_written_for_the_server_gives_a_working_client() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ray"}}));
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&server.kubeconfig_yaml())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    assert_eq!(
        config.cluster_url.to_string().trim_end_matches('/'),
        server.url()
    );
    let namespaces: Api<Namespace> = Api::all(kube::Client::try_from(config)?);
    assert_eq!(
        namespaces.list(&ListParams::default()).await?.items.len(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn watch_ends_when_its_timeout_seconds_run_out() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let namespaces: Api<Namespace> = Api::all(server.client()?);
    let params = WatchParams::default().disable_bookmarks().timeout(1);
    let started = std::time::Instant::now();
    let events: Vec<_> = tokio::time::timeout(
        WAIT,
        namespaces
            .watch(&params, "0")
            .await?
            .try_collect::<Vec<_>>(),
    )
    .await??;
    assert!(events.is_empty(), "{events:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(server.open_watches(), 0);
    Ok(())
}

#[tokio::test]
async fn dropping_the_server_stops_it() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    let namespaces: Api<Namespace> = Api::all(server.client()?);
    namespaces.list(&ListParams::default()).await?;
    let addr = server.addr();
    drop(server);
    eventually(WAIT, "the port to refuse connections", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await?;
    assert!(namespaces.list(&ListParams::default()).await.is_err());
    Ok(())
}
