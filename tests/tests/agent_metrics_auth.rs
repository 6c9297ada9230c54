//! `--metrics-auth` end to end: the real `rayfence agent` in a simulated node
//! (objects from a manifests directory), asking the fake API server's TokenReview
//! and SubjectAccessReview about each scrape, over real HTTP.
//!
//! With auth on: no token, a malformed header, an unknown token and a token for
//! another audience get 401 (with `WWW-Authenticate: Bearer`); an authenticated
//! but unauthorised caller 403; an authorised one 200 with the `rayfence_`
//! metrics; the probes answer without a token; an unreachable API server means
//! 503, never 200; decisions are cached (counted in the server's review log); no
//! token reaches the log. With auth off (the default), everything is as before.
//!
//! Needs root, like `agent_runtime`.
mod agent_common;

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use agent_common::*;
use anyhow::{Context as _, Result, ensure};
use rayfence_tests::Node;
use rayfence_tests::fake_api::{FakeApiServer, Grant, GrantSubject, GrantTarget, TokenInfo};
use serde_json::json;

const NODE: &str = "node-a";
const AUDIENCE: &str = "rayfence";

/// Distinctive, so the agent's log can be searched for them.
const PROM: &str = "tok-prometheus-5f1c9a";
const PROM2: &str = "tok-prometheus-second-77b0e1";
const NOSY: &str = "tok-nosy-2b8d44";
const API_ONLY: &str = "tok-api-audience-c03e11";
const API_ONLY2: &str = "tok-api-audience-second-90d2aa";
const OPS: &str = "tok-ops-4e6f08";
const TOKENS: [&str; 6] = [PROM, PROM2, NOSY, API_ONLY, API_ONLY2, OPS];

const PROM_USER: &str = "system:serviceaccount:monitoring:prometheus";

struct Reply {
    code: u16,
    head: String,
    body: String,
}

/// `GET path` on the agent's metrics port with extra header lines, from inside the
/// node namespace.
fn get(node: &Node, path: &str, headers: &[String]) -> Result<Reply> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{}\r\n",
        headers
            .iter()
            .map(|h| format!("{h}\r\n"))
            .collect::<String>()
    );
    node.netns.run(move || -> Result<Reply> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        // Longer than the agent's own review timeout (5 s): a hang shows as 503.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").context("no header end")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status")?;
        Ok(Reply {
            code,
            head: head.to_owned(),
            body: body.to_owned(),
        })
    })?
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("Authorization: Bearer {token}")]
}

/// A one-pod node, its manifests, and (when `server`) the fake API server made
/// inside the node namespace so the agent reaches it at 127.0.0.1.
struct Setup {
    // Dropped in order: the agent before the server and the node.
    server: Option<FakeApiServer>,
    manifests: Manifests,
    /// Holds the kubeconfig (the manifests directory is for objects only).
    config_dir: Manifests,
    _rt: tokio::runtime::Runtime,
    bpffs: Bpffs,
    node: SimNode,
}

impl Setup {
    fn new(first_uid: u32, server: bool) -> Result<Self> {
        let node = SimNode::new(&["head"], first_uid)?;
        let manifests = Manifests::new()?;
        let topo = &node.topo;
        manifests.write(
            "base.yaml",
            &[
                namespace(&node.ns),
                node_object(NODE, topo.node(0)),
                pod_object(
                    &node.ns,
                    topo.pod("head"),
                    &node.uids[0],
                    NODE,
                    &head_labels("rc"),
                ),
                raycluster(&node.ns, "rc", json!({"mode": "DenyAll"})),
            ],
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let config_dir = Manifests::new()?;
        let server = if server {
            let server = topo
                .node(0)
                .netns
                .run(|| rt.block_on(FakeApiServer::start()))??;
            config_dir.write_raw("kubeconfig", &server.kubeconfig_yaml())?;
            Some(server)
        } else {
            None
        };
        Ok(Setup {
            server,
            manifests,
            config_dir,
            _rt: rt,
            bpffs: Bpffs::new(),
            node,
        })
    }

    fn kubeconfig(&self) -> PathBuf {
        self.config_dir.dir.join("kubeconfig")
    }

    fn node(&self) -> &Node {
        self.node.topo.node(0)
    }

    fn server(&self) -> &FakeApiServer {
        self.server.as_ref().expect("a fake API server")
    }

    fn start(&self, extra_args: &[&str]) -> Result<Agent> {
        let agent = Agent::start(&AgentOptions {
            node: self.node(),
            node_name: NODE,
            manifests: &self.manifests.dir,
            bpffs: &self.bpffs.path,
            cgroup_root: self.node.kubelet.root.path(),
            kubeconfig: None,
            extra_args,
        })?;
        // The probe carries no token: this is also the check that /readyz is open.
        agent.wait_ready(self.node(), Duration::from_secs(20))?;
        Ok(agent)
    }
}

#[test]
fn metrics_auth_refuses_unauthenticated_and_unauthorised_scrapes_and_fails_closed() -> Result<()> {
    let setup = Setup::new(61, true)?;
    let server = setup.server();
    server.add_token(
        PROM,
        TokenInfo::service_account("monitoring", "prometheus", &[AUDIENCE]),
    );
    server.add_token(
        PROM2,
        TokenInfo::service_account("monitoring", "prometheus", &[AUDIENCE]),
    );
    server.add_token(
        NOSY,
        TokenInfo::service_account("default", "nosy", &[AUDIENCE]),
    );
    // Valid for the API server only (e.g. a pod's default token).
    server.add_token(API_ONLY, TokenInfo::service_account("default", "app", &[]));
    server.add_token(API_ONLY2, TokenInfo::service_account("default", "app", &[]));
    // As deploy/'s rayfence-metrics-reader ClusterRole bound to a group.
    server.grant(Grant::non_resource(
        GrantSubject::Group("system:serviceaccounts:monitoring".into()),
        "/metrics",
        "get",
    ));
    // nosy may read /v1/status but not /metrics.
    server.grant(Grant::non_resource(
        GrantSubject::User("system:serviceaccount:default:nosy".into()),
        "/v1/status",
        "get",
    ));

    let kubeconfig = setup.kubeconfig();
    let kubeconfig = format!("--kubeconfig={}", kubeconfig.display());
    let agent = setup.start(&[
        "--metrics-auth",
        &format!("--metrics-auth-audience={AUDIENCE}"),
        &kubeconfig,
    ])?;
    let node = setup.node();

    // The probes: no token, no review.
    for path in ["/healthz", "/readyz"] {
        let r = get(node, path, &[])?;
        ensure!(r.code == 200, "{path} without a token: {}", r.code);
    }
    ensure!(server.reviews().is_empty(), "the probes asked for reviews");

    // 401: nothing, malformed, unknown, another audience. Every path is covered,
    // including ones that do not exist (checked before routing).
    let unauthenticated: [(&str, Vec<String>); 7] = [
        ("no header", vec![]),
        ("basic", vec!["Authorization: Basic dXNlcjpwYXNz".into()]),
        ("no token", vec!["Authorization: Bearer".into()]),
        (
            "two tokens",
            vec![format!("Authorization: Bearer {PROM} x")],
        ),
        ("unknown token", bearer("tok-unknown-000")),
        ("token for the API server only", bearer(API_ONLY)),
        (
            "two headers",
            vec![
                format!("Authorization: Bearer {PROM}"),
                format!("Authorization: Bearer {NOSY}"),
            ],
        ),
    ];
    for (what, headers) in &unauthenticated {
        for path in ["/metrics", "/v1/flows", "/nope"] {
            let r = get(node, path, headers)?;
            ensure!(r.code == 401, "{what} on {path}: {} {}", r.code, r.body);
            ensure!(
                r.head
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case("www-authenticate: Bearer")),
                "{what}: no WWW-Authenticate: Bearer in\n{}",
                r.head
            );
            ensure!(!r.body.contains("rayfence_"), "{what}: metrics leaked");
        }
    }
    // The TokenReview asked for the configured audience.
    let first = server.reviews();
    let tr = first
        .iter()
        .find(|r| r.kind == "TokenReview")
        .context("a TokenReview")?;
    ensure!(
        tr.request["spec"]["audiences"] == json!([AUDIENCE]),
        "{}",
        tr.request
    );
    ensure!(
        first.iter().all(|r| r.kind == "TokenReview"),
        "no SubjectAccessReview for an unauthenticated caller: {first:?}"
    );

    // 403: authenticated, not allowed on /metrics (allowed on /v1/status).
    let r = get(node, "/metrics", &bearer(NOSY))?;
    ensure!(r.code == 403, "nosy on /metrics: {} {}", r.code, r.body);
    ensure!(!r.body.contains("rayfence_"), "nosy: metrics leaked");
    let r = get(node, "/v1/status", &bearer(NOSY))?;
    ensure!(
        r.code != 401 && r.code != 403,
        "nosy on /v1/status passes the check (the route answers): {}",
        r.code
    );

    // 200: authorised, with the metrics; the SubjectAccessReview asked for the
    // path with verb get, as the user the TokenReview named, with its groups,
    // uid and extra.
    let (tr0, sar0) = (
        server.review_count("TokenReview"),
        server.review_count("SubjectAccessReview"),
    );
    for _ in 0..5 {
        let r = get(node, "/metrics", &bearer(PROM))?;
        ensure!(
            r.code == 200,
            "prometheus on /metrics: {} {}",
            r.code,
            r.body
        );
        ensure!(
            r.body.contains("rayfence_endpoints"),
            "no rayfence_ metrics:\n{}",
            r.body
        );
    }
    // Cached: five scrapes, one review of each kind.
    ensure!(
        server.review_count("TokenReview") - tr0 == 1
            && server.review_count("SubjectAccessReview") - sar0 == 1,
        "five scrapes cost {} TokenReviews and {} SubjectAccessReviews",
        server.review_count("TokenReview") - tr0,
        server.review_count("SubjectAccessReview") - sar0
    );
    let sar = server
        .reviews()
        .into_iter()
        .rev()
        .find(|r| r.kind == "SubjectAccessReview")
        .context("a SubjectAccessReview")?;
    let spec = &sar.request["spec"];
    ensure!(
        spec["nonResourceAttributes"] == json!({"path": "/metrics", "verb": "get"}),
        "{spec}"
    );
    ensure!(spec["user"] == PROM_USER, "{spec}");
    ensure!(spec["uid"] == "uid-monitoring-prometheus", "{spec}");
    ensure!(
        spec["groups"]
            .as_array()
            .is_some_and(|g| g.contains(&json!("system:serviceaccounts:monitoring"))),
        "{spec}"
    );
    ensure!(
        spec["extra"]["authentication.kubernetes.io/pod-name"] == json!(["prometheus-pod"]),
        "{spec}"
    );
    // Refusals are cached too: the same 403 again costs nothing.
    let (tr0, sar0) = (
        server.review_count("TokenReview"),
        server.review_count("SubjectAccessReview"),
    );
    ensure!(get(node, "/metrics", &bearer(NOSY))?.code == 403);
    ensure!(
        server.review_count("TokenReview") == tr0
            && server.review_count("SubjectAccessReview") == sar0,
        "a repeated refusal asked again"
    );

    // An authenticator that ignores spec.audiences: the agent checks the
    // audiences in the answer itself.
    server.set_token_review_ignores_audiences(true);
    let r = get(node, "/metrics", &bearer(API_ONLY2))?;
    ensure!(
        r.code == 401,
        "API-audience token, audiences not enforced by the server: {}",
        r.code
    );
    let answered = server.reviews();
    let last = answered.last().context("a review")?;
    ensure!(
        last.kind == "TokenReview" && last.response["status"]["authenticated"] == true,
        "the server did authenticate it: {last:?}"
    );
    server.set_token_review_ignores_audiences(false);

    // API server down: a token not cached yet is refused with 503, not allowed.
    server.set_available(false);
    let refused_before = server.refused_connections();
    let r = get(node, "/metrics", &bearer(PROM2))?;
    ensure!(
        r.code == 503,
        "API server down: {} (must be 503, never 200)",
        r.code
    );
    ensure!(!r.body.contains("rayfence_"), "metrics leaked in an outage");
    ensure!(
        server.refused_connections() > refused_before,
        "the agent did try the API server"
    );
    // ... and the failure is not cached: back up, the same token passes.
    server.set_available(true);
    let r = get(node, "/metrics", &bearer(PROM2))?;
    ensure!(r.code == 200, "after the outage: {} {}", r.code, r.body);

    // The log names refusals with user and reason, never a token.
    let log = agent.log_text();
    ensure!(
        log.contains("refused: forbidden") && log.contains("system:serviceaccount:default:nosy"),
        "no forbidden refusal logged:\n{log}"
    );
    ensure!(
        log.contains("refused: not authenticated"),
        "no 401 logged:\n{log}"
    );
    ensure!(
        log.contains("refused: the credentials could not be checked"),
        "no 503 logged:\n{log}"
    );
    for token in TOKENS {
        ensure!(
            !log.contains(token),
            "the log holds the token {token}:\n{log}"
        );
    }
    drop(agent);
    Ok(())
}

#[test]
fn metrics_auth_with_resource_attributes_asks_about_that_resource() -> Result<()> {
    let setup = Setup::new(71, true)?;
    let server = setup.server();
    server.add_token(OPS, TokenInfo::service_account("ops", "oncall", &[]));
    server.add_token(
        PROM,
        TokenInfo::service_account("monitoring", "prometheus", &[]),
    );
    // ops may get services/proxy of rayfence-agent; prometheus only /metrics as a
    // path, which does not count when a resource is asked about.
    server.grant(Grant {
        subject: GrantSubject::User("system:serviceaccount:ops:oncall".into()),
        target: GrantTarget::Resource {
            namespace: "rayfence-system".into(),
            group: String::new(),
            resource: "services".into(),
            subresource: "proxy".into(),
            name: "rayfence-agent".into(),
        },
        verb: "get".into(),
    });
    server.grant(Grant::non_resource(
        GrantSubject::User(PROM_USER.into()),
        "/metrics",
        "get",
    ));
    let kubeconfig = format!("--kubeconfig={}", setup.kubeconfig().display());
    // No audience: the API server's own.
    let agent = setup.start(&[
        "--metrics-auth",
        "--metrics-auth-resource-attributes=namespace=rayfence-system,resource=services,subresource=proxy,name=rayfence-agent",
        &kubeconfig,
    ])?;
    let node = setup.node();
    let r = get(node, "/metrics", &bearer(OPS))?;
    ensure!(
        r.code == 200 && r.body.contains("rayfence_"),
        "ops: {} {}",
        r.code,
        r.body
    );
    let r = get(node, "/metrics", &bearer(PROM))?;
    ensure!(r.code == 403, "prometheus: {}", r.code);
    let reviews = server.reviews();
    let tr = reviews
        .iter()
        .find(|r| r.kind == "TokenReview")
        .context("a TokenReview")?;
    ensure!(
        tr.request["spec"]
            .get("audiences")
            .is_none_or(|a| a.is_null()),
        "no audience configured, none asked: {}",
        tr.request
    );
    let sar = reviews
        .iter()
        .find(|r| r.kind == "SubjectAccessReview")
        .context("a SubjectAccessReview")?;
    let spec = &sar.request["spec"];
    ensure!(spec.get("nonResourceAttributes").is_none(), "{spec}");
    let ra = &spec["resourceAttributes"];
    ensure!(
        ra["namespace"] == "rayfence-system"
            && ra["resource"] == "services"
            && ra["subresource"] == "proxy"
            && ra["name"] == "rayfence-agent"
            && ra["verb"] == "get",
        "{ra}"
    );
    drop(agent);
    Ok(())
}

#[test]
fn metrics_auth_off_serves_metrics_without_a_token_as_before() -> Result<()> {
    let setup = Setup::new(81, false)?;
    let agent = setup.start(&[])?;
    let node = setup.node();
    let r = get(node, "/metrics", &[])?;
    ensure!(
        r.code == 200 && r.body.contains("rayfence_endpoints"),
        "{} {}",
        r.code,
        r.body
    );
    // A token is ignored, not checked.
    ensure!(get(node, "/metrics", &bearer("anything"))?.code == 200);
    ensure!(get(node, "/nope", &[])?.code == 404);
    ensure!(
        !agent.log_text().contains("--metrics-auth:"),
        "auth is off by default"
    );
    drop(agent);
    Ok(())
}

/// The agent binary alone (no node needed): a bad --metrics-auth setting fails
/// before anything starts, naming the flag.
#[test]
fn bad_metrics_auth_flags_fail_fast_naming_the_flag() -> Result<()> {
    let dir = Manifests::new()?;
    let run = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(rayfence_bin()?)
            .arg("agent")
            .arg("--node-name=n")
            .arg(format!("--manifests={}", dir.dir.display()))
            .args(args)
            .env_clear()
            .output()?;
        ensure!(!out.status.success(), "{args:?} was accepted");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = run(&[
        "--metrics-auth",
        "--metrics-auth-resource-attributes=kind=Pod",
    ])?;
    ensure!(
        err.contains("--metrics-auth-resource-attributes") && err.contains("kind"),
        "{err}"
    );
    let err = run(&[
        "--metrics-auth",
        "--metrics-auth-resource-attributes=namespace=x",
    ])?;
    ensure!(
        err.contains("--metrics-auth-resource-attributes") && err.contains("resource"),
        "{err}"
    );
    let err = run(&["--metrics-auth", "--metrics-auth-audience="])?;
    ensure!(err.contains("--metrics-auth-audience"), "{err}");
    // Auth on needs a client even with --manifests: a bad --kubeconfig is named.
    let err = run(&["--metrics-auth", "--kubeconfig=/nonexistent/kubeconfig"])?;
    ensure!(
        err.contains("--metrics-auth needs a Kubernetes client")
            && err.contains("--kubeconfig /nonexistent/kubeconfig"),
        "{err}"
    );
    Ok(())
}
