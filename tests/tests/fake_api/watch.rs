//! A real kube-rs pipeline (watcher -> default_backoff -> reflector, as the agent
//! runs it) against the fake API server over HTTP: the initial list and live
//! changes, server-side selectors, the 410 Gone relist, and an outage.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use rayfence_tests::fake_api::{FakeApiServer, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn pod(name: &str, node: &str, node_type: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ray", "labels": {"ray.io/node-type": node_type}},
        "spec": {"nodeName": node, "containers": [{"name": "ray", "image": "rayproject/ray"}]},
    })
}

/// A running reflector and what its watcher reported as errors (HTTP/Status codes
/// where there is one, 0 for transport errors).
struct Reflected {
    reader: Store<Pod>,
    errors: Arc<Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reflected {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reflected {
    fn names(&self) -> BTreeSet<String> {
        self.reader
            .state()
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect()
    }

    fn has(&self, names: &[&str]) -> bool {
        self.names() == names.iter().map(|n| n.to_string()).collect()
    }

    fn saw_error(&self, code: u16) -> bool {
        self.errors.lock().unwrap().contains(&code)
    }

    fn error_count(&self) -> usize {
        self.errors.lock().unwrap().len()
    }
}

fn error_code(err: &watcher::Error) -> u16 {
    match err {
        watcher::Error::WatchError(status) => status.code,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        _ => 0,
    }
}

/// The agent's pipeline: watcher -> default_backoff -> reflector, polled in a task.
fn reflect(api: Api<Pod>, config: watcher::Config) -> Reflected {
    let (reader, writer) = reflector::store();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Err(err) = item {
                seen.lock().unwrap().push(error_code(&err));
            }
        }
    });
    Reflected {
        reader,
        errors,
        task,
    }
}

async fn ready(r: &Reflected) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, r.reader.wait_until_ready()).await??;
    Ok(())
}

#[tokio::test]
async fn reflector_lists_then_follows_adds_modifies_and_deletes() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&pod("head", "node-a", "head"));
    server.apply(&pod("worker-1", "node-a", "worker"));
    let r = reflect(Api::all(server.client()?), watcher::Config::default());
    ready(&r).await?;
    assert!(
        r.has(&["head", "worker-1"]),
        "after the initial list: {:?}",
        r.names()
    );

    server.apply(&pod("worker-2", "node-b", "worker"));
    eventually(WAIT, "worker-2 added", || {
        r.has(&["head", "worker-1", "worker-2"])
    })
    .await?;

    let mut relabelled = pod("worker-1", "node-a", "worker");
    relabelled["metadata"]["labels"]["team"] = json!("ml");
    let stored = server.apply(&relabelled);
    eventually(WAIT, "worker-1 modified", || {
        r.reader.state().iter().any(|p| {
            p.metadata.name.as_deref() == Some("worker-1")
                && p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("team"))
                    .map(String::as_str)
                    == Some("ml")
                && p.metadata.resource_version.as_deref()
                    == stored["metadata"]["resourceVersion"].as_str()
        })
    })
    .await?;

    assert!(server.delete(&pod("head", "", "")));
    eventually(WAIT, "head deleted", || r.has(&["worker-1", "worker-2"])).await?;

    // One list, then watches from the list's resourceVersion with bookmarks.
    let requests = server.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|q| q.is_list_of("/api/v1/pods"))
            .count(),
        1,
        "{requests:#?}"
    );
    let watch = requests
        .iter()
        .find(|q| q.is_watch())
        .expect("a watch request");
    assert_eq!(watch.path, "/api/v1/pods");
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert!(r.errors.lock().unwrap().is_empty());
    Ok(())
}

#[tokio::test]
async fn field_and_label_selectors_filter_on_the_server() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&pod("head", "node-a", "head"));
    server.apply(&pod("worker-a", "node-a", "worker"));
    server.apply(&pod("worker-b", "node-b", "worker"));
    let config = watcher::Config::default()
        .fields("spec.nodeName=node-a")
        .labels("ray.io/node-type in (head,worker)");
    let r = reflect(Api::namespaced(server.client()?, "ray"), config);
    ready(&r).await?;
    assert!(r.has(&["head", "worker-a"]), "{:?}", r.names());

    // A pod on another node never arrives; one on this node does.
    server.apply(&pod("worker-b2", "node-b", "worker"));
    server.apply(&pod("worker-a2", "node-a", "worker"));
    eventually(WAIT, "worker-a2 added", || {
        r.has(&["head", "worker-a", "worker-a2"])
    })
    .await?;

    // A pod that stops matching the label selector is DELETED for this watch.
    server.apply(&pod("worker-a2", "node-a", "other"));
    eventually(WAIT, "worker-a2 gone once relabelled", || {
        r.has(&["head", "worker-a"])
    })
    .await?;

    // The selectors were sent to the server, on the list and the watch.
    let requests = server.requests();
    let with_selectors: Vec<_> = requests
        .iter()
        .filter(|q| q.path == "/api/v1/namespaces/ray/pods")
        .filter(|q| q.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a"))
        .filter(|q| {
            q.param("labelSelector").as_deref() == Some("ray.io/node-type in (head,worker)")
        })
        .collect();
    assert!(
        with_selectors.iter().any(|q| !q.is_watch()),
        "{requests:#?}"
    );
    assert!(with_selectors.iter().any(|q| q.is_watch()), "{requests:#?}");
    Ok(())
}

#[tokio::test]
async fn after_compaction_a_resumed_watch_gets_410_and_the_watcher_relists() -> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&pod("head", "node-a", "head"));
    let r = reflect(Api::all(server.client()?), watcher::Config::default());
    ready(&r).await?;
    eventually(WAIT, "the watch to open", || server.open_watches() == 1).await?;

    server.compact_history();
    server.close_watches();
    eventually(WAIT, "a 410 Gone from the resumed watch", || {
        r.saw_error(410)
    })
    .await?;
    eventually(WAIT, "a second list", || {
        server
            .requests()
            .iter()
            .filter(|q| q.is_list_of("/api/v1/pods"))
            .count()
            == 2
    })
    .await?;
    eventually(WAIT, "the watch to reopen", || server.open_watches() == 1).await?;
    assert!(r.has(&["head"]));

    // And it keeps following changes after the relist.
    server.apply(&pod("worker", "node-a", "worker"));
    eventually(WAIT, "worker added after the relist", || {
        r.has(&["head", "worker"])
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn object_deleted_while_the_watcher_was_away_disappears_after_the_relist()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    for name in ["head", "worker-1", "worker-2"] {
        server.apply(&pod(name, "node-a", "worker"));
    }
    let r = reflect(Api::all(server.client()?), watcher::Config::default());
    ready(&r).await?;
    eventually(WAIT, "the watch to open", || server.open_watches() == 1).await?;

    server.set_available(false);
    eventually(WAIT, "the watch to be cut", || server.open_watches() == 0).await?;
    // While away: one pod deleted, one added, and the history that would have
    // told the watcher about the delete is compacted away.
    server.delete(&pod("worker-1", "", ""));
    server.apply(&pod("worker-3", "node-a", "worker"));
    server.compact_history();
    // The last known state is kept meanwhile.
    assert!(r.has(&["head", "worker-1", "worker-2"]));
    server.set_available(true);

    eventually(WAIT, "the relist to drop worker-1 and add worker-3", || {
        r.has(&["head", "worker-2", "worker-3"])
    })
    .await?;
    assert!(
        r.saw_error(410),
        "the resume must have been refused with 410: {:?}",
        r.errors.lock().unwrap()
    );
    Ok(())
}

#[tokio::test]
async fn outage_makes_the_watcher_back_off_and_recover_without_losing_objects() -> anyhow::Result<()>
{
    let server = FakeApiServer::start().await?;
    for name in ["head", "worker-1", "worker-2"] {
        server.apply(&pod(name, "node-a", "worker"));
    }
    let r = reflect(Api::all(server.client()?), watcher::Config::default());
    ready(&r).await?;
    eventually(WAIT, "the watch to open", || server.open_watches() == 1).await?;

    server.set_available(false);
    eventually(WAIT, "a first refused reconnect", || {
        server.refused_connections() >= 1
    })
    .await?;
    let first = Instant::now();
    eventually(WAIT, "a second refused reconnect", || {
        server.refused_connections() >= 2
    })
    .await?;
    // default_backoff starts at 800 ms (plus jitter): the retries are spaced, not a
    // hot loop. 500 ms leaves room for the 10 ms polling of `eventually`.
    assert!(
        first.elapsed() >= Duration::from_millis(500),
        "retried after {:?}",
        first.elapsed()
    );
    assert!(r.error_count() >= 1, "the watcher reports the outage");
    assert!(
        r.has(&["head", "worker-1", "worker-2"]),
        "objects kept during the outage"
    );

    // A change made during the outage arrives once the server is back (history
    // intact: the watch resumes, no relist needed).
    server.apply(&pod("worker-3", "node-a", "worker"));
    server.set_available(true);
    eventually(WAIT, "recovery with worker-3", || {
        r.has(&["head", "worker-1", "worker-2", "worker-3"])
    })
    .await?;
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|q| q.is_list_of("/api/v1/pods"))
            .count(),
        1,
        "a resume within the history does not relist"
    );
    Ok(())
}

#[tokio::test]
async fn streaming_list_is_served_by_a_watch_that_ends_its_initial_events_with_a_bookmark()
-> anyhow::Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(&pod("head", "node-a", "head"));
    let r = reflect(
        Api::all(server.client()?),
        watcher::Config::default().streaming_lists(),
    );
    ready(&r).await?;
    assert!(r.has(&["head"]));
    server.apply(&pod("worker", "node-a", "worker"));
    eventually(WAIT, "worker added", || r.has(&["head", "worker"])).await?;
    let requests = server.requests();
    assert!(
        !requests.iter().any(|q| q.is_list_of("/api/v1/pods")),
        "no list: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|q| q.param("sendInitialEvents").as_deref() == Some("true"))
    );
    Ok(())
}

#[tokio::test]
async fn http_410_on_the_watch_request_makes_kube_rs_retry_the_same_resource_version_without_relisting()
-> anyhow::Result<()> {
    // Pins down what kube-rs 5's watcher does with each form of 410, so that a
    // change in it shows up here: the in-stream ERROR (what real servers send)
    // relists (see after_compaction_...); an HTTP 410 on the watch request is
    // retried with backoff at the same resourceVersion, and never relists.
    let server = FakeApiServer::start().await?;
    server.apply(&pod("head", "node-a", "head"));
    let r = reflect(Api::all(server.client()?), watcher::Config::default());
    ready(&r).await?;
    eventually(WAIT, "the watch to open", || server.open_watches() == 1).await?;
    let listed_rv = server
        .requests()
        .iter()
        .find(|q| q.is_watch())
        .and_then(|q| q.param("resourceVersion"));

    server.set_watch_gone_as_http_status(true);
    server.compact_history();
    server.close_watches();
    eventually(WAIT, "two refused watch starts", || {
        r.errors
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == 410)
            .count()
            >= 2
    })
    .await?;
    let requests = server.requests();
    let watches: Vec<_> = requests.iter().filter(|q| q.is_watch()).collect();
    assert!(
        watches
            .iter()
            .all(|q| q.param("resourceVersion") == listed_rv),
        "{watches:#?}"
    );
    assert_eq!(
        requests
            .iter()
            .filter(|q| q.is_list_of("/api/v1/pods"))
            .count(),
        1
    );
    assert!(r.has(&["head"]));
    Ok(())
}

#[tokio::test]
async fn metadata_only_watcher_gets_partial_object_metadata() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::core::PartialObjectMeta;

    let server = FakeApiServer::start().await?;
    server.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ray", "labels": {"team": "ml"}}}));
    // kube 5: an Api over PartialObjectMeta<K> sends metadata-only requests.
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(server.client()?);
    let list = api.list(&Default::default()).await?;
    assert_eq!(list.types.kind, "PartialObjectMetadataList");
    assert_eq!(
        list.items[0].types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready()).await??;
    server.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}));
    eventually(WAIT, "both namespaces", || reader.len() == 2).await?;
    let ray = reader
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some("ray"))
        .expect("ray");
    assert_eq!(
        ray.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("ml")
    );
    task.abort();
    Ok(())
}
