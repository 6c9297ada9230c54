//! The HTTP side of the fake API server: routing Kubernetes REST paths to the
//! store, list and watch responses (watches as chunked newline-delimited JSON
//! `WatchEvent`s, as a real server streams them), discovery, the request log, and
//! the connection-level controls (outage, closing watches, shutdown).
//!
//! It holds no API semantics of its own beyond the wire format: those are in
//! `store.rs`, called under the lock and never across an await.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};

use super::RecordedRequest;
use super::resources::ResourceKey;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, ListQuery, Store, WatchFilter, WatchStart};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the server and its controls share.
pub struct Shared {
    pub store: Mutex<Store>,
    /// TokenReview and SubjectAccessReview: what tests configured, what was asked.
    pub reviews: Mutex<super::auth::Reviews>,
    pub requests: Mutex<Vec<RecordedRequest>>,
    /// False during a simulated outage: new connections are closed at once and
    /// open ones are cut.
    pub available: watch::Sender<bool>,
    /// Bumped by `close_watches`: every open watch stream ends cleanly.
    pub watch_generation: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    /// Connections closed unserved because of an outage.
    pub refused: AtomicUsize,
    /// Watch streams open right now.
    pub open_watches: AtomicUsize,
    /// Answer a watch from a too-old resourceVersion with HTTP 410 instead of a
    /// 200 whose stream carries an ERROR event (what real servers send).
    pub gone_as_http_status: AtomicBool,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    pub address: std::net::SocketAddr,
    /// What each pod runs for an exec (`exec`), registered by the test.
    pub exec_handlers: Mutex<super::exec::ExecHandlers>,
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock is a test failure already; the store
        // itself is still consistent (every write is one commit).
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.status())
}

/// Accepts connections until shutdown; during an outage each new connection is
/// closed before a byte is read, as a client sees an API server going away.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // E.g. out of file descriptors: wait a little rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            // `.map(drop)`: the watch guard must not live on across the await above.
            _ = async { shutdown.wait_for(|s| *s).await.map(drop) } => return,
        };
        if !*shared.available.borrow() {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(stream);
            continue;
        }
        let conn_shared = shared.clone();
        tokio::spawn(async move {
            let mut available = conn_shared.available.subscribe();
            let mut shutdown = conn_shared.shutdown.subscribe();
            let svc_shared = conn_shared.clone();
            let service = hyper::service::service_fn(move |req| handle(svc_shared.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                // pods/exec switches the connection to a WebSocket.
                .with_upgrades();
            // Dropping the connection future closes the socket, open watches included.
            tokio::select! {
                _ = conn => {}
                _ = available.wait_for(|a| !*a) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

/// Where a path leads.
enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    ResourceList {
        group: String,
        version: String,
    },
    Resource {
        key: ResourceKey,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
    NotFound,
}

fn route(path: &str, store: &Store) -> Route {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", group] => return Route::Group((*group).to_owned()),
        ["api", version] => {
            return Route::ResourceList {
                group: String::new(),
                version: (*version).to_owned(),
            };
        }
        ["apis", group, version] => {
            return Route::ResourceList {
                group: (*group).to_owned(),
                version: (*version).to_owned(),
            };
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::NotFound,
    };
    let namespaced_plural = |p: &str| {
        store
            .info(&ResourceKey::new(group, version, p))
            .is_ok_and(|r| r.namespaced)
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, ..] if namespaced_plural(plural) => {
            (Some((*ns).to_owned()), &rest[2..])
        }
        _ => (None, rest),
    };
    let owned = |s: &&str| (*s).to_owned();
    match rest {
        [plural] => Route::Resource {
            key: ResourceKey::new(group, version, plural),
            namespace,
            name: None,
            subresource: None,
        },
        [plural, name] => Route::Resource {
            key: ResourceKey::new(group, version, plural),
            namespace,
            name: Some(owned(name)),
            subresource: None,
        },
        [plural, name, sub] => Route::Resource {
            key: ResourceKey::new(group, version, plural),
            namespace,
            name: Some(owned(name)),
            subresource: Some(owned(sub)),
        },
        _ => Route::NotFound,
    }
}

fn discovery(route: &Route, store: &Store, shared: &Shared) -> Option<Value> {
    let installed: Vec<_> = store.installed().collect();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in &installed {
        if r.key.group.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == r.key.group) {
            Some((_, versions)) if !versions.contains(&r.key.version) => {
                versions.push(r.key.version.clone())
            }
            Some(_) => {}
            None => groups.push((r.key.group.clone(), vec![r.key.version.clone()])),
        }
    }
    let group_json = |(name, versions): &(String, Vec<String>)| {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
    };
    match route {
        Route::Version => Some(json!({
            "major": "1", "minor": "37", "gitVersion": "v1.37.0-rayfence-fake",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
            "platform": "linux/amd64",
        })),
        Route::CoreVersions => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.address.to_string()}],
        })),
        Route::Groups => Some(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups.iter().map(group_json).collect::<Vec<_>>(),
        })),
        Route::Group(name) => groups.iter().find(|(g, _)| g == name).map(|g| {
            let mut v = group_json(g);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        }),
        Route::ResourceList { group, version } => {
            let resources: Vec<Value> = installed
                .iter()
                .filter(|r| r.key.group == *group && r.key.version == *version)
                .map(|r| {
                    json!({
                        "name": r.key.plural,
                        "singularName": r.kind.to_lowercase(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    })
                })
                .collect();
            if resources.is_empty() {
                return None;
            }
            let gv = if group.is_empty() {
                version.clone()
            } else {
                format!("{group}/{version}")
            };
            Some(
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            )
        }
        _ => None,
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().map(str::to_owned);
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: raw_query.clone(),
        });
    let query: HashMap<String, String> =
        form_urlencoded::parse(raw_query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if let Some((namespace, pod)) = super::exec::exec_target(&path) {
        return super::exec::handle(&shared, req, namespace, pod);
    }
    // kube-rs's metadata_watcher and get_metadata ask for PartialObjectMetadata.
    let metadata_only = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the body: {e}"
            ))));
        }
    };
    Ok(
        match dispatch(&shared, &method, &path, &query, &content_type, &body) {
            Ok(Reply::Json(status, value)) if metadata_only => {
                json_response(status, &partial_metadata(value))
            }
            Ok(Reply::Json(status, value)) => json_response(status, &value),
            Ok(Reply::Watch(watch)) => watch_response(&shared, watch, metadata_only),
            Err(err) => error_response(&err),
        },
    )
}

enum Reply {
    Json(u16, Value),
    // Boxed: a watch reply is much larger than a JSON one (clippy::large_enum_variant).
    Watch(Box<WatchReply>),
}

/// A started watch, to be streamed by `watch_response`.
struct WatchReply {
    /// What to send first and the changes to follow.
    start: WatchStart,
    filter: WatchFilter,
    /// The kind BOOKMARK objects carry.
    kind: String,
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
    /// `timeoutSeconds`.
    timeout: Option<Duration>,
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn dispatch(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Result<Reply, ApiError> {
    if let Some(kind) = super::auth::Reviews::kind_of(path) {
        if method != Method::POST {
            return Err(ApiError {
                code: 405,
                reason: "MethodNotAllowed",
                message: format!("{kind}s are only created (POST)"),
            });
        }
        let mut reviews = shared.reviews.lock().unwrap_or_else(|e| e.into_inner());
        return Ok(Reply::Json(201, reviews.review(kind, parse_body(body)?)?));
    }
    let mut store = shared.store();
    let route = route(path, &store);
    let Route::Resource {
        key,
        namespace,
        name,
        subresource,
    } = route
    else {
        return match (method, discovery(&route, &store, shared)) {
            (&Method::GET, Some(v)) => Ok(Reply::Json(200, v)),
            _ => Err(ApiError::not_found(
                "the server could not find the requested resource",
            )),
        };
    };
    let info = store.info(&key)?.clone();
    if let Some(sub) = &subresource
        && sub != "status"
    {
        return Err(ApiError::not_found(format!(
            "subresource {sub} of {key} is not served by the fake"
        )));
    }
    let ns = namespace.as_deref();
    let param = |k: &str| query.get(k).map(String::as_str);
    match (method, name) {
        (&Method::GET, None) => {
            let labels = LabelSelector::parse(param("labelSelector").unwrap_or(""))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let fields = FieldSelector::parse(param("fieldSelector").unwrap_or(""))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if matches!(param("watch"), Some("1" | "true")) {
                let filter = WatchFilter {
                    key: key.clone(),
                    namespace: namespace.clone(),
                    labels,
                    fields,
                };
                let start = store.watch(
                    &filter,
                    param("resourceVersion").unwrap_or(""),
                    param("sendInitialEvents") == Some("true"),
                )?;
                if let WatchStart::Gone(event) = &start
                    && shared.gone_as_http_status.load(Ordering::SeqCst)
                {
                    let message = event["object"]["message"].as_str().unwrap_or("").to_owned();
                    return Err(ApiError::gone(message));
                }
                let timeout = param("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .map(Duration::from_secs);
                let bookmarks = param("allowWatchBookmarks") == Some("true");
                return Ok(Reply::Watch(Box::new(WatchReply {
                    start,
                    filter,
                    kind: info.kind.clone(),
                    bookmarks,
                    timeout,
                })));
            }
            let exact_rv = match (param("resourceVersionMatch"), param("resourceVersion")) {
                (Some("Exact"), Some(rv)) => Some(rv.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
                _ => None,
            };
            let q = ListQuery {
                labels,
                fields,
                limit: param("limit").and_then(|l| l.parse().ok()),
                continue_token: param("continue")
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
                exact_rv,
            };
            Ok(Reply::Json(200, store.list(&key, ns, &q)?))
        }
        (&Method::POST, None) => Ok(Reply::Json(201, store.create(&key, ns, parse_body(body)?)?)),
        (&Method::GET, Some(name)) => Ok(Reply::Json(200, store.get(&key, ns, &name)?)),
        (&Method::PUT, Some(name)) => Ok(Reply::Json(
            200,
            store.replace(&key, ns, &name, parse_body(body)?)?,
        )),
        (&Method::PATCH, Some(name)) => {
            let create_if_missing = content_type.starts_with("application/apply-patch");
            if content_type.starts_with("application/json-patch") {
                return Err(ApiError {
                    code: 415,
                    reason: "UnsupportedMediaType",
                    message: "the fake API server takes merge, strategic merge and apply patches, not JSON patches".into(),
                });
            }
            Ok(Reply::Json(
                200,
                store.patch(&key, ns, &name, &parse_body(body)?, create_if_missing)?,
            ))
        }
        (&Method::DELETE, Some(name)) => Ok(Reply::Json(200, store.delete(&key, ns, &name)?)),
        _ => Err(ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: format!("{method} is not served on {path} by the fake"),
        }),
    }
}

/// Counts a watch stream as open for as long as it lives.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An object or list as a server answers `Accept: ...;as=PartialObjectMetadata`
/// (or `PartialObjectMetadataList`): apiVersion meta.k8s.io/v1 and only metadata.
fn partial_metadata(value: Value) -> Value {
    let partial = |o: &Value| {
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": o.get("metadata").cloned().unwrap_or_else(|| json!({})),
        })
    };
    if let Some(items) = value.get("items").and_then(Value::as_array) {
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": value.get("metadata").cloned().unwrap_or_else(|| json!({})),
            "items": items.iter().map(partial).collect::<Vec<_>>(),
        })
    } else if value.get("kind").and_then(Value::as_str) == Some("Status") {
        value
    } else {
        partial(&value)
    }
}

/// A watch event as sent: ERROR events keep their Status; the others carry only
/// metadata when the client asked for PartialObjectMetadata.
fn shape(event: Value, metadata_only: bool) -> Value {
    if !metadata_only || event["type"] == "ERROR" {
        return event;
    }
    let mut event = event;
    let object = event["object"].take();
    event["object"] = partial_metadata(object);
    event
}

fn line(value: &Value) -> Bytes {
    let mut s = value.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// Streams a watch: the initial events, then each matching change as it happens,
/// BOOKMARKs carrying the last revision this stream has passed (never one whose
/// changes it has not sent), until the client goes, `timeoutSeconds` runs out,
/// `close_watches` is called, or the stream falls too far behind (410 Gone).
fn watch_response(
    shared: &Arc<Shared>,
    watch: Box<WatchReply>,
    metadata_only: bool,
) -> Response<Body> {
    let WatchReply {
        start,
        filter,
        kind,
        bookmarks,
        timeout,
    } = *watch;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // Subscribed before the response goes out, so a close_watches() from now on
    // ends this stream.
    let mut generation = shared.watch_generation.subscribe();
    let interval = shared.bookmark_interval;
    let counter = OpenWatch::new(shared.clone());
    tokio::spawn(async move {
        let _open = counter;
        let (initial, from_rv, mut changes) = match start {
            WatchStart::Gone(error_event) => {
                let _ = tx.send(line(&error_event)).await;
                return;
            }
            WatchStart::Stream {
                initial,
                from_rv,
                changes,
            } => (initial, from_rv, changes),
        };
        for event in initial {
            if tx.send(line(&shape(event, metadata_only))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(86_400)));
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last_rv = from_rv;
        loop {
            let out = tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        last_rv = last_rv.max(change.rv);
                        match filter.event_for(&change) {
                            Some(event) => event,
                            None => continue,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::gone("the watch fell too far behind");
                        let _ = tx.send(line(&json!({"type": "ERROR", "object": gone.status()}))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticks.tick(), if bookmarks => json!({
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": filter.key.api_version(),
                        "kind": kind,
                        "metadata": {"resourceVersion": last_rv.to_string()},
                    },
                }),
                _ = generation.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            if tx.send(line(&shape(out, metadata_only))).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> (String, Option<String>, Option<String>, Option<String>) {
        match route(path, &Store::new()) {
            Route::Resource {
                key,
                namespace,
                name,
                subresource,
            } => (key.to_string(), namespace, name, subresource),
            _ => panic!("{path} is not a resource path"),
        }
    }

    #[test]
    fn paths_route_to_resource_namespace_name_and_subresource() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            resource("/api/v1/pods"),
            ("pods.v1".into(), None, None, None)
        );
        assert_eq!(
            resource("/api/v1/namespaces/ray/pods/head"),
            ("pods.v1".into(), s("ray"), s("head"), None)
        );
        assert_eq!(
            resource("/apis/networking.k8s.io/v1/namespaces/ray/networkpolicies/np/status"),
            (
                "networkpolicies.networking.k8s.io/v1".into(),
                s("ray"),
                s("np"),
                s("status")
            )
        );
        // A Namespace object and its status are cluster-scoped paths.
        assert_eq!(
            resource("/api/v1/namespaces/ray"),
            ("namespaces.v1".into(), None, s("ray"), None)
        );
        assert_eq!(
            resource("/api/v1/namespaces/ray/status"),
            ("namespaces.v1".into(), None, s("ray"), s("status"))
        );
        assert!(matches!(
            route("/apis/ray.io/v1", &Store::new()),
            Route::ResourceList { .. }
        ));
        assert!(matches!(route("/healthz", &Store::new()), Route::NotFound));
    }
}
