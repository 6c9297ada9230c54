//! A fake Kubernetes API server that speaks real HTTP list and watch, so the agent's
//! kube-rs client path (watcher -> default_backoff -> reflector) runs as it does
//! against a real cluster, without one.
//!
//! - [`FakeApiServer`]: the running server on 127.0.0.1 and an ephemeral port, with
//!   a [`kube::Client`] for it, and the controls tests drive it with (apply/delete
//!   objects, compact the history, an outage, closing watches, installing a CRD,
//!   the request log, the Events the client posted). Stopped on drop.
//! - `store`: the API semantics (resourceVersion, defaults, 410 Gone, merge patch,
//!   pagination, selector transitions in watches); `selector`: label and field
//!   selectors; `resources`: what is served; `http`: routing and the wire format.
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::Pod;
//! use kube::runtime::{WatchStreamExt, reflector, watcher};
//! use rayfence_tests::fake_api::FakeApiServer;
//! use serde_json::json;
//!
//! # async fn example() -> anyhow::Result<()> {
//! let server = FakeApiServer::start().await?;
//! server.apply(&json!({
//!     "apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "head", "namespace": "ray"},
//!     "spec": {"nodeName": "node-a", "containers": []},
//! }));
//! let pods: kube::Api<Pod> = kube::Api::all(server.client()?);
//! let cfg = watcher::Config::default().fields("spec.nodeName=node-a");
//! let (reader, writer) = reflector::store();
//! let stream = reflector(writer, watcher(pods, cfg).default_backoff());
//! // ... poll `stream`, reader.wait_until_ready().await, then:
//! server.compact_history(); // the next watch resume gets 410 Gone
//! server.close_watches(); // ... and it resumes now: the watcher relists
//! assert!(server.requests().iter().any(|r| r.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a")));
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! As a real API server (what kube-rs relies on):
//! - one global resourceVersion, bumped on every write of any resource and stamped
//!   in `metadata.resourceVersion`; lists carry the revision they were read at;
//! - server-owned metadata: `uid` and `creationTimestamp` kept across updates,
//!   `generation` bumped when `spec` changes, `namespace` from the path;
//! - LIST with `labelSelector` (full set-based grammar), `fieldSelector` (`=`,
//!   `==`, `!=`), `limit`/`continue`; a Namespace-scoped path for a cluster-scoped
//!   resource, an unknown resource or an uninstalled CRD answer 404 with a Status;
//! - WATCH (`watch=1|true`) streams newline-delimited WatchEvents (ADDED,
//!   MODIFIED, DELETED, BOOKMARK, ERROR) after `resourceVersion`; `""`/`"0"` start
//!   with a synthetic ADDED per object; `sendInitialEvents=true` ends the initial
//!   events with a BOOKMARK annotated `k8s.io/initial-events-end`; an object that
//!   stops (starts) matching the selectors is DELETED (ADDED) for that watch;
//!   bookmarks only carry revisions whose changes the stream has passed;
//!   `timeoutSeconds` ends the stream;
//! - `Accept: ...;as=PartialObjectMetadata[List]` (kube-rs's `Api<PartialObjectMeta<K>>`)
//!   answers with metadata only, in lists, single objects and watch events;
//! - a resume from before the retained history: HTTP 200 and one ERROR event with
//!   a 410 `Expired` Status, as the watch cache and etcd send it (and kube-rs
//!   relists on); an expired `continue` token or an `Exact` list at an old
//!   revision: HTTP 410;
//! - POST (409 AlreadyExists, `generateName`), GET, PUT (409 Conflict on a stale
//!   resourceVersion), PATCH, DELETE (returns the object), the `status`
//!   subresource, `/version`, `/api`, `/apis`, `/apis/{group}`, and the resource
//!   lists `/api/v1` and `/apis/{group}/{version}`;
//! - TokenReview and SubjectAccessReview (POST, answered and not stored) from the
//!   tokens and grants a test configures ([`FakeApiServer::add_token`],
//!   [`FakeApiServer::grant`]; semantics in `auth`), each kept in
//!   [`FakeApiServer::reviews`];
//! - the pods' `exec` subresource over WebSocket (`v5.channel.k8s.io`,
//!   `v4.channel.k8s.io`), authenticated by the caller's bearer token and
//!   authorized as `create` on `pods/exec` from those same tokens and grants; what
//!   a pod runs is what the test registered ([`FakeApiServer::on_exec`]; `exec`).
//!
//! [`ApiRelay`] (`relay`) makes the server reachable from another network
//! namespace (a lab node's 127.0.0.1), as a kubeconfig names an API server.
//!
//! Simplified:
//! - strategic merge and server-side apply patches are applied as JSON merge
//!   patches (lists replaced whole; apply creates a missing object); JSON patch
//!   answers 415; the status subresource patches the whole object;
//! - history is kept until `compact_history` (or 100,000 changes), not for a time;
//!   compaction also moves the revision on by one, so every revision handed out
//!   before it is too old;
//! - later list pages read current objects (not the first page's snapshot);
//! - any dotted field path is accepted in field selectors (a real server accepts a
//!   few per kind); bookmarks come every 500 ms rather than about once a minute;
//! - no authentication or authorization of its own clients but for `exec` (reviews
//!   answer what the test configured; every other request is served), no admission, schema validation, namespace
//!   existence checks, finalizers, graceful deletion, garbage collection,
//!   `deletecollection`, HTTP/2, aggregated discovery or protobuf.
//!
//! It binds only 127.0.0.1.

pub mod auth;
pub mod exec;
mod http;
pub mod relay;
pub mod resources;
pub mod selector;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use auth::{Grant, GrantSubject, GrantTarget, Review, TokenInfo};
pub use exec::{ExecHandler, ExecRequest};
pub use relay::ApiRelay;
pub use resources::ResourceKey;
pub use store::ApiError;

/// How often a watch that allows bookmarks gets a BOOKMARK. Real servers send one
/// about a minute apart; tests want to see them within seconds.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_millis(500);

/// One request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string, percent-encoded as sent.
    pub query: Option<String>,
}

impl RecordedRequest {
    /// A query parameter, decoded: `param("fieldSelector")`.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_deref().unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// A watch request (`watch=1` or `watch=true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("1" | "true"))
    }

    /// A list request: GET on a collection without `watch`. `path` is the
    /// collection's path, e.g. `/api/v1/pods`.
    pub fn is_list_of(&self, path: &str) -> bool {
        self.method == "GET" && self.path == path && !self.is_watch()
    }
}

/// A running fake API server; see the module docs. Dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<http::Shared>,
    accept: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port, on the current tokio
    /// runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake API server to 127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let shared = Arc::new(http::Shared {
            store: Mutex::new(store::Store::new()),
            reviews: Mutex::new(auth::Reviews::default()),
            requests: Mutex::new(Vec::new()),
            available: watch::Sender::new(true),
            watch_generation: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            refused: AtomicUsize::new(0),
            open_watches: AtomicUsize::new(0),
            gone_as_http_status: AtomicBool::new(false),
            bookmark_interval: BOOKMARK_INTERVAL,
            address,
            exec_handlers: Mutex::new(Default::default()),
        });
        let accept = tokio::spawn(http::serve(listener, shared.clone()));
        Ok(Self { shared, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.address
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.address)
    }

    /// A kube config for this server: plain HTTP, no credentials, namespace
    /// `default`.
    pub fn config(&self) -> anyhow::Result<kube::Config> {
        let uri = self.url().parse().context("the fake API server's URL")?;
        Ok(kube::Config::new(uri))
    }

    /// A kubeconfig naming this server (plain HTTP, no credentials), for a process
    /// such as the agent binary started with `KUBECONFIG` or `--kubeconfig`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            url = self.url()
        )
    }

    pub fn client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.config()?)
            .context("building a kube client for the fake API server")
    }

    fn store(&self) -> std::sync::MutexGuard<'_, store::Store> {
        self.shared.store()
    }

    /// Creates or updates an object (typed k8s-openapi objects and `json!` both
    /// work; apiVersion and kind say which resource). A namespaced object without a
    /// namespace goes to `default`. Returns the stored object, with its new
    /// resourceVersion; open watches see ADDED or MODIFIED.
    #[track_caller]
    pub fn apply<T: Serialize>(&self, object: &T) -> Value {
        match self.try_apply(object) {
            Ok(v) => v,
            Err(e) => panic!("FakeApiServer::apply: {e}"),
        }
    }

    /// `apply` that reports a resource the server does not serve (e.g. a CRD not
    /// installed yet) instead of panicking.
    pub fn try_apply<T: Serialize>(&self, object: &T) -> Result<Value, ApiError> {
        let object =
            serde_json::to_value(object).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let mut store = self.store();
        let (key, ns) = identify(&store, &object)?;
        store.upsert(&key, ns.as_deref(), object)
    }

    /// Deletes the object with this object's apiVersion, kind, namespace and name.
    /// Returns whether it existed; open watches see DELETED.
    #[track_caller]
    pub fn delete<T: Serialize>(&self, object: &T) -> bool {
        let object = match serde_json::to_value(object) {
            Ok(v) => v,
            Err(e) => panic!("FakeApiServer::delete: {e}"),
        };
        let mut store = self.store();
        let (key, ns) = match identify(&store, &object) {
            Ok(id) => id,
            Err(e) => panic!("FakeApiServer::delete: {e}"),
        };
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        store.delete(&key, ns.as_deref(), name).is_ok()
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = self.store();
        let key = store.info_for_kind(api_version, kind).ok()?.key.clone();
        store.get(&key, namespace, name).ok()
    }

    /// Every stored object of a kind, all namespaces, in (namespace, name) order.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let store = self.store();
        match store.info_for_kind(api_version, kind) {
            Ok(info) => store.all(&info.key.clone()),
            Err(_) => Vec::new(),
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Forgets the watch history, as an etcd compaction does: the next watch that
    /// resumes from any resourceVersion handed out so far gets a 410 Gone ERROR
    /// event and must relist. Open watches are not ended (see `close_watches`).
    pub fn compact_history(&self) {
        self.store().compact_history();
    }

    /// `true`: a watch from a resourceVersion older than the history is refused
    /// with HTTP 410 on the request itself. `false` (the default): it gets HTTP 200
    /// and a stream with one ERROR event carrying a 410 Status, as real API servers
    /// send it (the watch cache and etcd both report it in the stream). kube-rs's
    /// watcher relists only on the latter; the former lets a test show what
    /// happens when something in between answers differently.
    pub fn set_watch_gone_as_http_status(&self, http_status: bool) {
        self.shared
            .gone_as_http_status
            .store(http_status, Ordering::SeqCst);
    }

    /// Ends every open watch stream cleanly, as a server-side watch timeout does;
    /// clients resume from their last resourceVersion.
    pub fn close_watches(&self) {
        self.shared.watch_generation.send_modify(|g| *g += 1);
    }

    /// `false`: an outage. Open connections (watches included) are cut and new ones
    /// are closed before a byte is read. `true`: serving again.
    pub fn set_available(&self, available: bool) {
        self.shared.available.send_replace(available);
    }

    /// Connections closed unserved during outages so far.
    pub fn refused_connections(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A bearer token TokenReview authenticates as `info` (for its audiences).
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.reviews_guard().tokens.push((token.to_owned(), info));
    }

    /// What SubjectAccessReview allows from now on.
    pub fn grant(&self, grant: Grant) {
        self.reviews_guard().grants.push(grant);
    }

    /// `true`: TokenReviews answer with the token's own audiences whatever was
    /// asked (an authenticator that ignores `spec.audiences`), so only a client
    /// that checks `status.audiences` itself refuses a token for another audience.
    pub fn set_token_review_ignores_audiences(&self, ignore: bool) {
        self.reviews_guard().ignore_requested_audiences = ignore;
    }

    /// What pod `namespace/pod` runs for an exec (`pods/exec`): `handler` gets the
    /// request (command, container, user) and returns the local process that
    /// stands for it, or the runtime's error. Replaces an earlier handler.
    pub fn on_exec(
        &self,
        namespace: &str,
        pod: &str,
        handler: impl Fn(&ExecRequest) -> Result<std::process::Command, String> + Send + Sync + 'static,
    ) {
        self.shared
            .exec_handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (namespace.to_owned(), pod.to_owned()),
                std::sync::Arc::new(handler),
            );
    }

    /// A kubeconfig for this server that authenticates with a bearer `token`
    /// (see [`Self::add_token`]), as a user's kubeconfig does.
    pub fn kubeconfig_yaml_with_token(&self, token: &str) -> String {
        self.kubeconfig_yaml()
            .replace("user: {}", &format!("user:\n    token: {token}"))
    }

    /// Every TokenReview and SubjectAccessReview answered so far, in order.
    pub fn reviews(&self) -> Vec<Review> {
        self.reviews_guard().log.clone()
    }

    /// How many reviews of `kind` (`TokenReview`, `SubjectAccessReview`) were answered.
    pub fn review_count(&self, kind: &str) -> usize {
        self.reviews_guard()
            .log
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    fn reviews_guard(&self) -> std::sync::MutexGuard<'_, auth::Reviews> {
        self.shared
            .reviews
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Installs a CRD: its paths stop answering 404 and its
    /// CustomResourceDefinition object (`{plural}.{group}`) appears. `ray.io/v1
    /// rayclusters` is known (kind RayCluster, namespaced) but starts uninstalled;
    /// another plural is installed as a namespaced kind named after it.
    pub fn install_crd(&self, group: &str, version: &str, plural: &str) {
        self.store().install_crd(group, version, plural);
    }

    /// The Events stored (core/v1 and events.k8s.io/v1), in the order created: what
    /// the client posted, with later patches (event series) applied.
    pub fn events(&self) -> Vec<Value> {
        let store = self.store();
        let mut events = store.all(&ResourceKey::new("", "v1", "events"));
        events.extend(store.all(&ResourceKey::new("events.k8s.io", "v1", "events")));
        // Server-assigned uids count up, so they sort in creation order.
        events.sort_by(|a, b| {
            let uid = |o: &Value| {
                o.pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            uid(a).cmp(&uid(b))
        });
        events
    }
}

/// The resource and namespace an object belongs to, from its apiVersion, kind and
/// metadata.namespace (`default` for a namespaced object without one).
fn identify(
    store: &store::Store,
    object: &Value,
) -> Result<(ResourceKey, Option<String>), ApiError> {
    let field = |f: &str| object.get(f).and_then(Value::as_str).unwrap_or("");
    let info = store.info_for_kind(field("apiVersion"), field("kind"))?;
    let ns = info.namespaced.then(|| {
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_owned()
    });
    Ok((info.key.clone(), ns))
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.accept.abort();
    }
}

/// Waits until `condition` holds, checking every 10 ms, and fails naming `what`
/// once `timeout` has passed: the bounded wait tests use instead of sleeping.
pub async fn eventually(
    timeout: Duration,
    what: impl std::fmt::Display,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
