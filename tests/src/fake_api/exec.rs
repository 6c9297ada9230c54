//! The fake API server's pod `exec` subresource, as `kubectl exec` and kube-rs's
//! `Api::<Pod>::exec` use it: `GET /api/v1/namespaces/{ns}/pods/{name}/exec?command=..
//! &stdout=true&stderr=true[&container=..]`, upgraded to a WebSocket with the
//! `v5.channel.k8s.io` or `v4.channel.k8s.io` subprotocol; every binary message
//! starts with its channel (1 stdout, 2 stderr, 3 the exit as a `metav1.Status`).
//!
//! What runs is what the test registered for the pod ([`ExecHandler`]): the kit has
//! no containers, so a test says which local process stands for the command (e.g.
//! the real `rayfence` pointed at one lab node's agent socket, in that node's
//! network namespace).
//!
//! As a real API server (1.35 and later, where a WebSocket exec needs `create`):
//! - the caller is authenticated by its bearer token (the tokens of
//!   [`super::FakeApiServer::add_token`]): none or an unknown one is 401;
//! - and authorized as `create` on `pods/exec` in the pod's namespace (the grants of
//!   [`super::FakeApiServer::grant`]): otherwise 403 with the API server's words;
//! - a missing pod is 404, a request without `command` 400, both as a `Status`
//!   before any upgrade;
//! - the exit: `Success`, or `Failure` with reason `NonZeroExitCode` and the code in
//!   `details.causes[reason=ExitCode]`; a command that cannot start is a `Failure`
//!   with reason `InternalError` (the runtime's "executable file not found");
//! - the client closing the connection kills the process.
//!
//! Not modelled: stdin, tty and resize, SPDY, `v1`-`v3` subprotocols, containers
//! (the `container` parameter is passed to the handler as given).
//!
//! Must not: decide what a command does (the registered handler does).
use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Stdio;
use std::sync::Arc;

use futures::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::http::{Body, Shared, error_response, full};
use super::store::ApiError;

/// One exec as the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    /// `container=`, if given.
    pub container: Option<String>,
    /// Every `command=`, in order: the program, then its arguments.
    pub command: Vec<String>,
    /// The user the token stands for.
    pub user: String,
}

/// What a pod runs for an exec: the local process standing for the command, or
/// why it cannot start (the runtime's words).
pub type ExecHandler =
    Arc<dyn Fn(&ExecRequest) -> Result<std::process::Command, String> + Send + Sync>;

/// The handlers, by (namespace, pod).
pub type ExecHandlers = HashMap<(String, String), ExecHandler>;

/// The subprotocols served, in the order of preference.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;

/// `(namespace, pod)` when `path` is a pod's exec subresource.
pub fn exec_target(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, "exec"] => {
            Some(((*ns).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

/// Serves one exec request: checks, then upgrades and runs the handler's process.
pub fn handle(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    namespace: String,
    pod: String,
) -> Result<Response<Body>, Infallible> {
    let request = match authorize(shared, &req, &namespace, &pod) {
        Ok(r) => r,
        Err(e) => return Ok(error_response(&e)),
    };
    let handler = shared
        .exec_handlers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(namespace.clone(), pod.clone()))
        .cloned();
    let Some(handler) = handler else {
        return Ok(error_response(&ApiError {
            code: 500,
            reason: "InternalError",
            message: format!(
                "the fake API server has no exec handler for pod {namespace}/{pod} (the test registers one with on_exec)"
            ),
        }));
    };
    let headers = req.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let (true, Some(key)) = (upgrade, key) else {
        return Ok(error_response(&ApiError::bad_request(
            "exec is served over WebSocket only by the fake (no SPDY): Upgrade: websocket and Sec-WebSocket-Key are required",
        )));
    };
    // The client's order decides among what both sides speak.
    let Some(protocol) = offered
        .iter()
        .find(|p| PROTOCOLS.contains(&p.as_str()))
        .cloned()
    else {
        return Ok(error_response(&ApiError::bad_request(format!(
            "no subprotocol in common: offered {offered:?}, served {PROTOCOLS:?}"
        ))));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket = WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        run(socket, &request, handler.as_ref()).await;
    });
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    let accept = derive_accept_key(key.as_bytes());
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&protocol) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    Ok(resp)
}

/// Authentication, authorization and the request's own checks, in the API
/// server's order.
fn authorize(
    shared: &Shared,
    req: &Request<Incoming>,
    namespace: &str,
    pod: &str,
) -> Result<ExecRequest, ApiError> {
    let unauthorized = ApiError {
        code: 401,
        reason: "Unauthorized",
        message: "Unauthorized".into(),
    };
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| unauthorized.clone())?;
    let reviews = shared.reviews.lock().unwrap_or_else(|e| e.into_inner());
    let info = reviews
        .tokens
        .iter()
        .find(|(t, _)| t == token)
        .map(|(_, info)| info.clone())
        .ok_or(unauthorized)?;
    if !reviews.allows(&info, "create", namespace, "pods", "exec", pod) {
        return Err(ApiError {
            code: 403,
            reason: "Forbidden",
            message: format!(
                "pods \"{pod}\" is forbidden: User \"{}\" cannot create resource \"pods/exec\" in API group \"\" in the namespace \"{namespace}\"",
                info.user
            ),
        });
    }
    drop(reviews);
    let query = req.uri().query().unwrap_or("");
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let container = params
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone());
    let pods = super::resources::ResourceKey::new("", "v1", "pods");
    shared.store().get(&pods, Some(namespace), pod)?;
    if command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    Ok(ExecRequest {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        container,
        command,
        user: info.user,
    })
}

/// Streams the process's stdout and stderr, then its exit on the status channel;
/// kills it when the client goes away first.
async fn run<S>(
    mut socket: WebSocketStream<S>,
    request: &ExecRequest,
    handler: &(dyn Fn(&ExecRequest) -> Result<std::process::Command, String> + Send + Sync),
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = |channel: u8, bytes: &[u8]| {
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.push(channel);
        v.extend_from_slice(bytes);
        Message::binary(v)
    };
    let failure = |reason: &str, message: String, code: Option<i32>| {
        let mut status = json!({
            "metadata": {},
            "status": "Failure",
            "reason": reason,
            "message": message,
        });
        if let Some(code) = code {
            status["details"] =
                json!({"causes": [{"reason": "ExitCode", "message": code.to_string()}]});
        }
        status
    };
    let mut command = match handler(request) {
        Ok(c) => tokio::process::Command::from(c),
        Err(why) => {
            let status = failure("InternalError", why, None);
            let _ = socket
                .send(frame(STATUS, status.to_string().as_bytes()))
                .await;
            let _ = socket.close(None).await;
            return;
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let status = failure(
                "InternalError",
                format!("failed to start {:?}: {e}", request.command),
                None,
            );
            let _ = socket
                .send(frame(STATUS, status.to_string().as_bytes()))
                .await;
            let _ = socket.close(None).await;
            return;
        }
    };
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return;
    };
    let (mut out_open, mut err_open) = (true, true);
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    while out_open || err_open {
        tokio::select! {
            n = stdout.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => if socket.send(frame(STDOUT, &out_buf[..n])).await.is_err() {
                    return; // the client went away: the child is killed on drop
                },
            },
            n = stderr.read(&mut err_buf), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => if socket.send(frame(STDERR, &err_buf[..n])).await.is_err() {
                    return;
                },
            },
            incoming = socket.next() => match incoming {
                // Pings are answered by the stream itself; stdin is not served.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let status: Value = match child.wait().await {
        Ok(exit) if exit.success() => json!({"metadata": {}, "status": "Success"}),
        Ok(exit) => {
            // Killed by a signal: the shell's 128 + signal, as runtimes report it.
            let code = exit
                .code()
                .or_else(|| std::os::unix::process::ExitStatusExt::signal(&exit).map(|s| 128 + s))
                .unwrap_or(128);
            failure(
                "NonZeroExitCode",
                format!(
                    "command terminated with non-zero exit code: error executing command {:?}, exit code {code}",
                    request.command
                ),
                Some(code),
            )
        }
        Err(e) => failure(
            "InternalError",
            format!("waiting for the command: {e}"),
            None,
        ),
    };
    let _ = socket
        .send(frame(STATUS, status.to_string().as_bytes()))
        .await;
    let _ = socket.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pods_exec_path_is_an_exec_target() {
        assert_eq!(
            exec_target("/api/v1/namespaces/rayfence-system/pods/agent-x/exec"),
            Some(("rayfence-system".into(), "agent-x".into()))
        );
        assert_eq!(exec_target("/api/v1/namespaces/ns/pods/p"), None);
        assert_eq!(exec_target("/api/v1/namespaces/ns/pods/p/attach"), None);
        assert_eq!(exec_target("/api/v1/namespaces/ns/services/p/exec"), None);
    }

    /// kube-rs's exec against the fake, as a user's kubeconfig makes it: the
    /// command's output on its channels and its exit code; refused without the
    /// grant (403) or a known token (401), before anything runs.
    #[tokio::test]
    async fn exec_runs_the_handlers_process_for_an_authorized_user_only() -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, AttachParams};
        use tokio::io::AsyncReadExt as _;

        use super::super::{FakeApiServer, Grant, GrantSubject, TokenInfo};

        let server = FakeApiServer::start().await?;
        server.apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "agent-a", "namespace": "rf"},
            "spec": {"nodeName": "n1", "containers": [{"name": "agent", "image": "x"}]},
        }));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        server.on_exec("rf", "agent-a", move |request| {
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request.clone());
            match request.command.first().map(String::as_str) {
                Some("report") => {
                    let mut c = std::process::Command::new("sh");
                    c.args(["-c", "echo out:$0; echo err >&2; exit 3"])
                        .arg(&request.command[1]);
                    Ok(c)
                }
                other => Err(format!(
                    "exec: {other:?}: executable file not found in $PATH"
                )),
            }
        });
        let user = |name: &str| TokenInfo {
            user: name.into(),
            uid: name.into(),
            groups: vec!["system:authenticated".into()],
            extra: Vec::new(),
            audiences: Vec::new(),
        };
        server.add_token("ops-token", user("ops"));
        server.add_token("dev-token", user("dev"));
        server.grant(Grant::resource(
            GrantSubject::User("ops".into()),
            "rf",
            "pods",
            "exec",
            "create",
        ));
        // Only `get` on pods/exec: what clusters before 1.35 asked of a WebSocket exec.
        server.grant(Grant::resource(
            GrantSubject::User("dev".into()),
            "rf",
            "pods",
            "exec",
            "get",
        ));
        let client = |token: Option<&str>| -> anyhow::Result<kube::Client> {
            let mut config = server.config()?;
            config.auth_info.token = token.map(|t| t.to_owned().into());
            Ok(kube::Client::try_from(config)?)
        };
        let params = AttachParams::default().container("agent");

        let pods: Api<Pod> = Api::namespaced(client(Some("ops-token"))?, "rf");
        let mut process = pods.exec("agent-a", ["report", "hello"], &params).await?;
        let status = process.take_status().expect("status");
        let (mut out, mut err) = (String::new(), String::new());
        let (mut stdout, mut stderr) = (
            process.stdout().expect("out"),
            process.stderr().expect("err"),
        );
        let (a, b) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        a?;
        b?;
        let status = status.await.expect("an exit status");
        assert_eq!((out.as_str(), err.as_str()), ("out:hello\n", "err\n"));
        assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
        let causes = status.details.and_then(|d| d.causes).unwrap_or_default();
        assert_eq!(causes[0].message.as_deref(), Some("3"));
        {
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].command, ["report", "hello"]);
            assert_eq!(seen[0].container.as_deref(), Some("agent"));
            assert_eq!(seen[0].user, "ops");
        }

        // A command the pod cannot start: a Failure status, not a hang.
        let mut process = pods.exec("agent-a", ["nope"], &params).await?;
        let status = process
            .take_status()
            .expect("status")
            .await
            .expect("a status");
        assert!(
            status
                .message
                .unwrap_or_default()
                .contains("executable file not found"),
        );

        for (token, code) in [
            (Some("dev-token"), 403),
            (Some("unknown"), 401),
            (None, 401),
        ] {
            let pods: Api<Pod> = Api::namespaced(client(token)?, "rf");
            match pods.exec("agent-a", ["report", "x"], &params).await {
                Err(kube::Error::Api(status)) => {
                    assert_eq!(status.code, code, "{token:?}: {status:?}");
                    if code == 403 {
                        assert!(
                            status
                                .message
                                .contains("User \"dev\" cannot create resource \"pods/exec\""),
                            "{}",
                            status.message
                        );
                    }
                }
                Err(other) => panic!("{token:?}: {other}"),
                Ok(_) => panic!("{token:?}: exec allowed"),
            }
        }
        assert_eq!(
            seen.lock().unwrap_or_else(|e| e.into_inner()).len(),
            2,
            "refused execs ran nothing"
        );
        Ok(())
    }
}
