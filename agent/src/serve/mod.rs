//! HTTP on `--metrics-addr`: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive and the reconcile loop turns), `/readyz` (the first full sync of every kind
//! is programmed). With `--metrics-auth`, every path but the two probes first
//! passes [`auth::Authorizer::check`]; with `--metrics-tls-cert`, connections are
//! TLS only ([`tls`]).
//!
//! Must not: change anything. It reads [`Health`] and [`metrics::Metrics`], which the
//! runtime writes.
pub mod auth;
pub mod metrics;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// How long the loop may go without turning before `/healthz` fails.
const STALL: Duration = Duration::from_secs(30);

/// What the runtime reports for the probes.
pub struct Health {
    start: Instant,
    ready: AtomicBool,
    /// Milliseconds since `start` at the loop's last turn.
    last_turn_ms: AtomicU64,
    pub metrics: metrics::Metrics,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            ready: AtomicBool::new(false),
            last_turn_ms: AtomicU64::new(0),
            metrics: metrics::Metrics::new(),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The reconcile loop calls this on every turn.
    pub fn turned(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_turn_ms.load(Ordering::Acquire)) < STALL.as_millis() as u64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding --metrics-addr {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The kubelet's probes carry no token: the only paths served without
/// `--metrics-auth`'s check.
const UNAUTHENTICATED_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// A client that connects and does not finish the TLS handshake in this long is
/// dropped.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Binds `addr` now (so a bad flag fails fast) and serves in a background task.
/// Returns the bound address (port 0 picks one). With `auth`, every request but
/// the probes must pass it before it is routed; with `tls`, every connection
/// starts with a TLS handshake.
pub async fn spawn(
    addr: SocketAddr,
    health: Arc<Health>,
    auth: Option<Arc<auth::Authorizer>>,
    tls: Option<Arc<tls::TlsFiles>>,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(%error, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            let auth = auth.clone();
            let tls = tls.as_ref().map(|t| t.acceptor());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let health = health.clone();
                    let auth = auth.clone();
                    async move {
                        // Before routing, so every route is covered. Who asked goes
                        // in the request's extensions (`auth::Subject`).
                        let mut req = req;
                        if let Some(auth) = auth
                            && !UNAUTHENTICATED_PATHS.contains(&req.uri().path())
                        {
                            let checked = auth
                                .check(req.method(), req.uri().path(), req.headers())
                                .await;
                            match checked {
                                Ok(subject) => {
                                    req.extensions_mut().insert(subject);
                                }
                                Err(refusal) => return Ok::<_, Infallible>(refusal.response()),
                            }
                        }
                        Ok::<_, Infallible>(handle(&req, &health))
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let served = match tls {
                    None => http.serve_connection(TokioIo::new(stream), service).await,
                    Some(tls) => {
                        match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%error, "TLS handshake on the metrics listener");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!("TLS handshake on the metrics listener timed out");
                                return;
                            }
                        }
                    }
                };
                if let Err(error) = served {
                    tracing::debug!(%error, "HTTP connection");
                }
            });
        }
    });
    Ok(bound)
}

fn handle<B>(req: &Request<B>, health: &Health) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            health.metrics.encode(),
        ),
        "/healthz" if health.is_live() => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "reconcile loop stalled\n".to_owned(),
        ),
        "/readyz" if health.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "first full sync not programmed yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
