//! HTTP on `--metrics-addr`: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive and the reconcile loop turns), `/readyz` (the first full sync of every kind
//! is programmed), and the operator API: `/v1/status`, `/v1/explain?from=&to=`,
//! `/v1/flows?follow=&verdict=&namespace=&raycluster=&limit=` (NDJSON, streamed
//! with `follow`). The same routes are served on the local socket (`--api-socket`,
//! root only, mode 0600), which is what the `rayfence` commands use on the node.
//!
//! With `--metrics-auth`, every path of the TCP listener but the two probes first
//! passes [`auth::Authorizer::check`] (the socket is root-only and needs no token);
//! with `--metrics-tls-cert`, TCP connections are TLS only ([`tls`]).
//! `--health-addr` adds a plain listener for the two probes only (loopback in the
//! DaemonSet, where no pod reaches).
//!
//! Every TCP listener is bounded ([`limits`]): connection caps in all and per
//! source (checked at accept, before anything is read), a header timeout that also
//! closes idle connections, a head size limit, no request bodies, a write stall
//! limit ([`stall`]); a refused request closes its connection; only a few
//! credential checks and loop queries wait at once. The socket is root-only and
//! has no caps.
//!
//! HTTP only: listeners, auth, TLS, limits, routing and encoding. What it serves
//! comes from [`crate::operator`]: it reads [`Health`] and encodes its metrics,
//! sends operator queries down the [`QueryClient`] and encodes the
//! [`crate::operator::wire`] answers as JSON, and streams the [`FlowHub`]'s
//! records as NDJSON.
//!
//! Must not: change anything, compute an answer, or know the runtime: the runtime
//! writes into `operator`, this reads from it.
pub mod auth;
pub mod limits;
mod stall;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast::error::RecvError;

use crate::operator::exposition::Format;
use crate::operator::flows::FlowHub;
use crate::operator::health::Health;
use crate::operator::query::{LoopGone, QueryClient};
use crate::operator::wire::{ExplainQuery, FlowFilter, FlowVerdict};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {flag} {addr}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding --api-socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--api-socket {path}: another agent answers there")]
    SocketInUse { path: PathBuf },
}

/// What the server reads: health and metrics always; the operator API when the
/// runtime answers it.
#[derive(Clone)]
pub struct Served {
    pub health: Arc<Health>,
    pub api: Option<OperatorApi>,
}

/// The operator API's handles into the runtime.
#[derive(Clone)]
pub struct OperatorApi {
    pub queries: QueryClient,
    pub flows: Arc<FlowHub>,
}

type Body = BoxBody<Bytes, Infallible>;

/// The kubelet's probes carry no token: the only paths served without
/// `--metrics-auth`'s check.
const UNAUTHENTICATED_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// A client that connects and does not finish the TLS handshake in this long is
/// dropped.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Operator queries (`/v1/status`, `/v1/explain`) one TCP listener may have
/// waiting on the reconcile loop at once, so no client can queue work in front of
/// the loop's own; a query waits up to [`LOOP_QUERY_WAIT`] for a slot (its
/// connection is all it holds meanwhile, and connections are capped), then gets
/// 503. The root-only socket has no such bound.
const LOOP_QUERIES: usize = 4;
const LOOP_QUERY_WAIT: Duration = Duration::from_secs(5);

/// After a failed `accept(2)` for lack of a resource (descriptors, memory), the
/// listener waits this long before the next: it never spins.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Routes {
    /// Everything: metrics, probes, the operator API.
    All,
    /// `/healthz` and `/readyz` only (`--health-addr`).
    Probes,
}

/// What every connection of one listener shares.
#[derive(Clone)]
struct Context {
    served: Served,
    auth: Option<Arc<auth::Authorizer>>,
    routes: Routes,
    /// Slots for operator queries waiting on the reconcile loop (TCP only).
    queries: Option<Arc<tokio::sync::Semaphore>>,
}

impl Context {
    fn new(served: Served, auth: Option<Arc<auth::Authorizer>>, routes: Routes) -> Self {
        Self {
            served,
            auth,
            routes,
            queries: Some(Arc::new(tokio::sync::Semaphore::new(LOOP_QUERIES))),
        }
    }

    /// The root-only socket's: every route, no token, no bound on queries.
    fn local(served: Served) -> Self {
        Self {
            served,
            auth: None,
            routes: Routes::All,
            queries: None,
        }
    }
}

/// Binds `addr` now (so a bad flag fails fast) and serves in a background task.
/// Returns the bound address (port 0 picks one). With `auth`, every request but
/// the probes must pass it before it is routed; with `tls`, every connection
/// starts with a TLS handshake. `limits` bound what clients may hold.
pub async fn spawn(
    addr: SocketAddr,
    served: Served,
    auth: Option<Arc<auth::Authorizer>>,
    tls: Option<Arc<tls::TlsFiles>>,
    limits: limits::Limits,
) -> Result<SocketAddr, ServeError> {
    let listener = bind(addr, "--metrics-addr").await?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind {
        flag: "--metrics-addr",
        addr,
        source,
    })?;
    let admission = limits::Admission::new(limits, "metrics", &served.health.metrics);
    let context = Context::new(served, auth, Routes::All);
    tokio::spawn(accept_loop(listener, "metrics", admission, context, tls));
    Ok(bound)
}

/// `--health-addr`: `/healthz` and `/readyz` only, plain HTTP, no token, with caps
/// of its own, so a flood of the metrics listener never fails the kubelet's
/// probes (loopback: pods cannot reach it).
pub async fn spawn_health(
    addr: SocketAddr,
    served: Served,
    limits: limits::Limits,
) -> Result<SocketAddr, ServeError> {
    let listener = bind(addr, "--health-addr").await?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind {
        flag: "--health-addr",
        addr,
        source,
    })?;
    let admission = limits::Admission::new(limits, "health", &served.health.metrics);
    let context = Context::new(served, None, Routes::Probes);
    tokio::spawn(accept_loop(listener, "health", admission, context, None));
    Ok(bound)
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { flag, addr, source })
}

/// Accepts until the process ends: a failed accept is counted and paused on (or,
/// for an error of that one connection, skipped), never the end of the listener.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    name: &'static str,
    admission: Arc<limits::Admission>,
    context: Context,
    tls: Option<Arc<tls::TlsFiles>>,
) {
    let metrics = &context.served.health.metrics;
    let mut last_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                use std::io::ErrorKind;
                // The peer gave up before we accepted: nothing to wait for.
                if matches!(
                    error.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                ) {
                    continue;
                }
                metrics.accept_failed(name);
                // Once in a while: under EMFILE this would be ten lines a second.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(%error, listener = name, "accepting an HTTP connection failed; pausing this listener briefly");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let permit = match admission.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(reason) => {
                // A reset, not a FIN: no TIME_WAIT or unread data kept for it.
                let _ = stream.set_zero_linger();
                drop(stream);
                tracing::trace!(
                    listener = name,
                    reason = reason.label(),
                    "connection refused at accept"
                );
                continue;
            }
        };
        let limits = admission.limits().clone();
        let context = context.clone();
        let Some(tls) = tls.as_ref().map(|t| t.acceptor()) else {
            serve_connection(stream, context, limits, permit);
            continue;
        };
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, context, limits, permit),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake on the metrics listener");
                }
                Err(_) => tracing::debug!("TLS handshake on the metrics listener timed out"),
            }
        });
    }
}

/// The local socket: created mode 0600 (root only, like the agent), its directory
/// 0700. A stale socket (nobody answers) is replaced; a live one is another agent's
/// and is left alone. Removed when the returned guard drops.
pub async fn spawn_socket(path: &Path, served: Served) -> Result<SocketGuard, ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::SocketInUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let context = Context::local(served);
    let inode = std::fs::metadata(path).map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.ino()
    });
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                // Root only (mode 0600): no token asked, no caps.
                Ok((stream, _)) => serve_local(stream, context.clone()),
                Err(error) => {
                    tracing::warn!(%error, "accepting on the API socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(SocketGuard {
        path: path.to_owned(),
        inode: inode.ok(),
    })
}

/// Removes the socket file on drop, if it is still ours.
pub struct SocketGuard {
    path: PathBuf,
    inode: Option<u64>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let ours = std::fs::metadata(&self.path)
            .ok()
            .is_some_and(|m| Some(m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A TCP connection, under its listener's limits; `permit` holds its slot until
/// the connection ends.
fn serve_connection<S>(stream: S, context: Context, limits: limits::Limits, permit: limits::Permit)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let stream = stall::WriteStall::new(stream, limits.write_stall);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes.max(MIN_BUF))
            .max_headers(limits.max_headers);
        serve_http(builder, stream, context).await;
    });
}

/// hyper's smallest read buffer.
const MIN_BUF: usize = 8192;

/// A connection on the root-only socket.
fn serve_local<S>(stream: S, context: Context)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        // No timer: no header timeout either (root only, as before).
        let builder = hyper::server::conn::http1::Builder::new();
        serve_http(builder, stream, context).await;
    });
}

async fn serve_http<S>(builder: hyper::server::conn::http1::Builder, stream: S, context: Context)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let context = context.clone();
        async move {
            use hyper::body::Body as _;
            let metrics = &context.served.health.metrics;
            // No route reads a body: one announced is refused before anything
            // else, and the connection closed (its bytes are never read).
            if !req.body().is_end_stream() {
                metrics.request_shed("request-body");
                return Ok::<_, Infallible>(closing(text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "no request body is accepted\n",
                )));
            }
            if context.routes == Routes::Probes
                && !UNAUTHENTICATED_PATHS.contains(&req.uri().path())
            {
                return Ok(closing(text(StatusCode::NOT_FOUND, "not found\n")));
            }
            // Before routing, so every route is covered. Who asked goes in the
            // request's extensions (`auth::Subject`).
            if let Some(auth) = &context.auth
                && !UNAUTHENTICATED_PATHS.contains(&req.uri().path())
            {
                match auth
                    .check(req.method(), req.uri().path(), req.headers())
                    .await
                {
                    Ok(subject) => {
                        req.extensions_mut().insert(subject);
                    }
                    Err(refusal) => {
                        if matches!(refusal, auth::Refusal::Busy) {
                            metrics.request_shed("reviews-busy");
                        }
                        // A refused client does not keep its connection.
                        return Ok(closing(refusal.response().map(BodyExt::boxed)));
                    }
                }
            }
            Ok(handle(&req, &context).await)
        }
    });
    if let Err(error) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%error, "HTTP connection");
    }
}

/// `Connection: close`: hyper closes the connection after this response.
fn closing(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

async fn handle<B>(req: &Request<B>, context: &Context) -> Response<Body> {
    let served = &context.served;
    let health = &served.health;
    let path = req.uri().path();
    if path.starts_with("/v1/") {
        // Status and explain wait on the reconcile loop: only a few at once.
        let queries = context
            .queries
            .as_ref()
            .filter(|_| matches!(path, "/v1/status" | "/v1/explain"));
        let _slot = if let Some(queries) = queries {
            match tokio::time::timeout(LOOP_QUERY_WAIT, queries.acquire()).await {
                Ok(Ok(slot)) => Some(slot),
                _ => {
                    health.metrics.request_shed("queries-busy");
                    return text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many operator queries in flight; try again\n",
                    );
                }
            }
        } else {
            None
        };
        return match &served.api {
            Some(api) => operator_api(req, api).await,
            None => text(StatusCode::NOT_FOUND, "the operator API is not served\n"),
        };
    }
    match path {
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|value| value.to_str().ok());
            let format = Format::from_accept(accept);
            respond(
                StatusCode::OK,
                format.content_type(),
                full(health.metrics.encode(format)),
            )
        }
        "/healthz" if health.is_live() => text(StatusCode::OK, "ok\n"),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "reconcile loop stalled\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "first full sync not programmed yet\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn operator_api<B>(req: &Request<B>, api: &OperatorApi) -> Response<Body> {
    let params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let gone = |error: LoopGone| text(StatusCode::SERVICE_UNAVAILABLE, &format!("{error}\n"));
    match req.uri().path() {
        "/v1/status" => match api.queries.status().await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(error) => gone(error),
        },
        "/v1/explain" => {
            let (Some(from), Some(to)) = (param("from"), param("to")) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "explain needs from=<ns/pod|IP> and to=<ns/pod|IP>[:port[/proto]]\n",
                );
            };
            match api.queries.explain(ExplainQuery { from, to }).await {
                Ok(Ok(report)) => json(StatusCode::OK, &report),
                Ok(Err(error)) => text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
                Err(error) => gone(error),
            }
        }
        "/v1/flows" => {
            let verdict = match param("verdict").as_deref() {
                None | Some("") | Some("all") => None,
                Some("dropped") => Some(FlowVerdict::Dropped),
                Some("audit") => Some(FlowVerdict::Audit),
                Some(other) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("verdict {other:?}: expected dropped or audit\n"),
                    );
                }
            };
            let limit = match param("limit").map(|l| l.parse::<usize>()) {
                None => 100,
                Some(Ok(limit)) => limit,
                Some(Err(_)) => {
                    return text(StatusCode::BAD_REQUEST, "limit: expected a number\n");
                }
            };
            let filter = FlowFilter {
                verdict,
                namespace: param("namespace").filter(|v| !v.is_empty()),
                raycluster: param("raycluster").filter(|v| !v.is_empty()),
            };
            let follow = matches!(param("follow").as_deref(), Some("true" | "1"));
            flows(&api.flows, filter, limit, follow)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// NDJSON: the recent matching events, then (with `follow`) every new one. A reader
/// that falls behind gets `{"skipped":N}` in place of what it missed.
fn flows(hub: &FlowHub, filter: FlowFilter, limit: usize, follow: bool) -> Response<Body> {
    // Subscribe first: nothing published after the snapshot is missed.
    let feed = follow.then(|| hub.subscribe());
    let mut recent = String::new();
    for record in hub.recent(&filter, limit) {
        if let Ok(line) = serde_json::to_string(&*record) {
            recent.push_str(&line);
            recent.push('\n');
        }
    }
    let Some(feed) = feed else {
        return respond(StatusCode::OK, "application/x-ndjson", full(recent));
    };
    let first = futures::stream::once(async move { Ok(Frame::data(Bytes::from(recent))) });
    let live = futures::stream::unfold((feed, filter), |(mut feed, filter)| async move {
        loop {
            let line = match feed.recv().await {
                Ok(record) if filter.matches(&record) => serde_json::to_string(&*record).ok(),
                Ok(_) => None,
                Err(RecvError::Lagged(n)) => Some(format!("{{\"skipped\":{n}}}")),
                Err(RecvError::Closed) => return None,
            };
            if let Some(mut line) = line {
                line.push('\n');
                return Some((Ok(Frame::data(Bytes::from(line))), (feed, filter)));
            }
        }
    });
    use futures::StreamExt as _;
    let body = BodyExt::boxed(StreamBody::new(first.chain(live)));
    respond(StatusCode::OK, "application/x-ndjson", body)
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    respond(status, "text/plain", full(body.to_owned()))
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            respond(status, "application/json", full(body))
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {error}\n"),
        ),
    }
}

fn respond(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
