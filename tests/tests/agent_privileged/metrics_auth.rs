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
//! Needs root, like `runtime`.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::Node;
use rayfence_tests::agent::*;
use rayfence_tests::fake_api::{FakeApiServer, Grant, GrantSubject, GrantTarget, TokenInfo};
use rayfence_tests::http::{self, Reply};
use rayfence_tests::objects::json::*;
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

/// `GET path` on the agent's metrics port with extra header lines, from inside the
/// node namespace.
fn get(node: &Node, path: &str, headers: &[String]) -> Result<Reply> {
    let (path, headers) = (path.to_owned(), headers.to_vec());
    node.netns.run(move || {
        // Longer than the agent's own review timeout (5 s): a hang shows as 503.
        http::get(
            ([127, 0, 0, 1], METRICS_PORT).into(),
            &path,
            &headers,
            Duration::from_secs(10),
        )
    })?
}

fn bearer(token: &str) -> Vec<String> {
    vec![http::bearer(token)]
}

/// A one-pod node, its manifests, and (when `server`) the fake API server made
/// inside the node namespace so the agent reaches it at 127.0.0.1.
struct Setup {
    // Dropped in order: the agent before the server and the node.
    server: Option<FakeApiServer>,
    manifests: Manifests,
    /// Holds the kubeconfig (the manifests directory is for objects only).
    config_dir: Manifests,
    _rt: Option<tokio::runtime::Runtime>,
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
        let config_dir = Manifests::new()?;
        let (rt, server) = if server {
            let (rt, server) = fake_api_in(topo.node(0))?;
            config_dir.write_kubeconfig(&server)?;
            (Some(rt), Some(server))
        } else {
            (None, None)
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
        // The probe carries no token: this is also the check that /readyz is open.
        self.node
            .start_agent(NODE, &self.manifests.dir, &self.bpffs, extra_args)
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
    // The commands over HTTP: with a token they are answered, without they are
    // told why; on the node, the socket needs none.
    let token_file = setup.config_dir.dir.join("nosy.token");
    std::fs::write(&token_file, NOSY)?;
    let url = format!("http://127.0.0.1:{METRICS_PORT}");
    let token_arg = token_file.to_str().context("utf-8 path")?;
    let (ok, out, err) = agent.command(
        node,
        &[
            "status",
            "--json",
            "--agent",
            &url,
            "--token-file",
            token_arg,
        ],
    )?;
    ensure!(
        ok && out.contains("\"endpoints\""),
        "status with a token: {err}"
    );
    let (ok, _, err) = agent.command(node, &["status", "--agent", &url])?;
    ensure!(!ok && err.contains("401"), "status without a token: {err}");
    let (ok, _, err) = agent.command(node, &["status"])?;
    ensure!(ok, "status over the socket: {err}");

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
    let answered_before = server.reviews().len();
    let r = get(node, "/metrics", &bearer(PROM2))?;
    ensure!(
        r.code == 503,
        "API server down: {} (must be 503, never 200)",
        r.code
    );
    ensure!(!r.body.contains("rayfence_"), "metrics leaked in an outage");
    ensure!(
        server.reviews().len() == answered_before,
        "nothing was answered during the outage"
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

/// A test CA and two server certificates it signed (EC P-256, SAN 127.0.0.1 and
/// localhost, valid 2020-2120), made with `openssl ca` for this test only.
const TEST_CA: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBazCCARCgAwIBAgICEAAwCgYIKoZIzj0EAwIwGzEZMBcGA1UEAwwQcmF5ZmVu\n\
Y2UgdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAwMFowGzEZ\n\
MBcGA1UEAwwQcmF5ZmVuY2UgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEH\n\
A0IABDgscaIiwZgsfS24EH+sYALexSry4C3uo1j+/f1+WgOZ7ZUM+TdHiMLpLGKN\n\
LU2DoJmrtcL13E9JhM4xDcKJDcyjQjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P\n\
AQH/BAQDAgEGMB0GA1UdDgQWBBQ+dtW60ii4DB+d7Exgbk+J140xKTAKBggqhkjO\n\
PQQDAgNJADBGAiEAnEoA1uq/7CLEaed7sZgbbf3KK1ekwnCc+jKSyvTvFSwCIQCW\n\
e3s0mvJcVMBonrFGH7untJdNw44BJNWTSGHeW+kRMA==\n\
-----END CERTIFICATE-----\n\
";
const LEAF1_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBujCCAWGgAwIBAgICEAEwCgYIKoZIzj0EAwIwGzEZMBcGA1UEAwwQcmF5ZmVu\n\
Y2UgdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAwMFowGzEZ\n\
MBcGA1UEAwwQcmF5ZmVuY2UtYWdlbnQtMTBZMBMGByqGSM49AgEGCCqGSM49AwEH\n\
A0IABA1ayGFHUi1bx58ARUMLX7a5n+gE+EEO9YZH1RvWqhT9iS3KMyCutqMJjQ0k\n\
9kCChvEj7tvM0HfJ09evFwp0/fijgZIwgY8wGgYDVR0RBBMwEYcEfwAAAYIJbG9j\n\
YWxob3N0MAwGA1UdEwEB/wQCMAAwEwYDVR0lBAwwCgYIKwYBBQUHAwEwDgYDVR0P\n\
AQH/BAQDAgeAMB0GA1UdDgQWBBS1LZUp/I0oYjk0bUBTB28zRCOKojAfBgNVHSME\n\
GDAWgBQ+dtW60ii4DB+d7Exgbk+J140xKTAKBggqhkjOPQQDAgNHADBEAiB2SGQe\n\
rZNgdVZBq/fUKHmh5jdk6nNvws1HUhS1IFWSMQIgXxjzzugSJtfa3nL2x1yS2K2y\n\
9Kll3o/TkqdZ3jgXiqs=\n\
-----END CERTIFICATE-----\n\
";
const LEAF1_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGadgqrj2KX+MjmtN\n\
aQpWQe6JZvTyv9G6zOqv0+Lk2c+hRANCAAQNWshhR1ItW8efAEVDC1+2uZ/oBPhB\n\
DvWGR9Ub1qoU/YktyjMgrrajCY0NJPZAgobxI+7bzNB3ydPXrxcKdP34\n\
-----END PRIVATE KEY-----\n\
";
const LEAF2_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBvDCCAWGgAwIBAgICEAIwCgYIKoZIzj0EAwIwGzEZMBcGA1UEAwwQcmF5ZmVu\n\
Y2UgdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAwMFowGzEZ\n\
MBcGA1UEAwwQcmF5ZmVuY2UtYWdlbnQtMjBZMBMGByqGSM49AgEGCCqGSM49AwEH\n\
A0IABOpOAzhoGl6zmJMNr6BfST0t+QzRUIeQVBPao2DLWzSIoEpj27sflZRH4Th+\n\
81A5THeR1OKBXIUc/zBEYmBLMsKjgZIwgY8wGgYDVR0RBBMwEYcEfwAAAYIJbG9j\n\
YWxob3N0MAwGA1UdEwEB/wQCMAAwEwYDVR0lBAwwCgYIKwYBBQUHAwEwDgYDVR0P\n\
AQH/BAQDAgeAMB0GA1UdDgQWBBQZ03UlHKbS7Pgxhc30JZ3ddcyjNTAfBgNVHSME\n\
GDAWgBQ+dtW60ii4DB+d7Exgbk+J140xKTAKBggqhkjOPQQDAgNJADBGAiEAkgxY\n\
8JpQjZ9LgaIEKB95KV7FfVEpbdqzCRm767MVBqICIQDhLJqVP2/KOeaD05lVPjkw\n\
ParpV0OVLL6KXzBQ5DrXBg==\n\
-----END CERTIFICATE-----\n\
";
const LEAF2_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4sPXxW6jGWk9cMxe\n\
jDgBYTrm7x0Cgycq0tNdsLvh8WihRANCAATqTgM4aBpes5iTDa+gX0k9LfkM0VCH\n\
kFQT2qNgy1s0iKBKY9u7H5WUR+E4fvNQOUx3kdTigVyFHP8wRGJgSzLC\n\
-----END PRIVATE KEY-----\n\
";

/// `GET path` over TLS to the agent, trusting [`TEST_CA`] only and checking the
/// name 127.0.0.1: (status, body, the server certificate presented).
fn https_get(node: &Node, path: &str, token: Option<&str>) -> Result<(u16, String, Vec<u8>)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{}\r\n",
        token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    );
    node.netns.run(move || -> Result<(u16, String, Vec<u8>)> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(TEST_CA.as_bytes()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1")?;
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        match tls.read_to_end(&mut out) {
            Ok(_) => {}
            // A peer that closes without close_notify: the response is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .context("no server certificate")?;
        let out = String::from_utf8_lossy(&out).into_owned();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {out:?}"))?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((code, body.to_owned(), peer))
    })?
}

fn der_of(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

#[test]
fn metrics_tls_serves_https_only_and_picks_up_a_rotated_certificate() -> Result<()> {
    let setup = Setup::new(91, true)?;
    let server = setup.server();
    server.add_token(
        PROM,
        TokenInfo::service_account("monitoring", "prometheus", &[AUDIENCE]),
    );
    server.grant(Grant::non_resource(
        GrantSubject::User(PROM_USER.into()),
        "/metrics",
        "get",
    ));
    let dir = &setup.config_dir;
    dir.write_raw("tls.crt", LEAF1_CERT)?;
    dir.write_raw("tls.key", LEAF1_KEY)?;
    let arg = |flag: &str, file: &str| format!("{flag}={}", dir.dir.join(file).display());
    let (kubeconfig, cert, key) = (
        format!("--kubeconfig={}", setup.kubeconfig().display()),
        arg("--metrics-tls-cert", "tls.crt"),
        arg("--metrics-tls-key", "tls.key"),
    );
    let agent = Agent::start(&AgentOptions {
        node: setup.node(),
        node_name: NODE,
        manifests: &setup.manifests.dir,
        bpffs: &setup.bpffs.path,
        cgroup_root: setup.node.kubelet.root.path(),
        kubeconfig: None,
        extra_args: &[
            "--metrics-auth",
            &format!("--metrics-auth-audience={AUDIENCE}"),
            &kubeconfig,
            &cert,
            &key,
        ],
    })?;
    let node = setup.node();
    // Ready over HTTPS, without a token (the kubelet's probe, scheme HTTPS).
    let t0 = std::time::Instant::now();
    loop {
        if let Ok((200, _, _)) = https_get(node, "/readyz", None) {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "not ready over HTTPS; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, peer) = https_get(node, "/metrics", None)?;
    ensure!(code == 401, "no token over TLS: {code}");
    ensure!(
        peer == der_of(LEAF1_CERT)?,
        "the first certificate is served"
    );
    let (code, body, _) = https_get(node, "/metrics", Some(PROM))?;
    ensure!(
        code == 200 && body.contains("rayfence_endpoints"),
        "token over TLS: {code} {body}"
    );
    // Plain HTTP on the TLS port gets no HTTP answer (a token sent that way was
    // already on the wire, but nothing is served back).
    if let Ok(r) = get(node, "/healthz", &[]) {
        ensure!(r.code != 200, "plain HTTP answered {}", r.code);
    }

    // Rotation: both files replaced (as a Secret update lands); new connections
    // get the new certificate, without a restart.
    dir.write_raw("tls.crt", LEAF2_CERT)?;
    dir.write_raw("tls.key", LEAF2_KEY)?;
    let leaf2 = der_of(LEAF2_CERT)?;
    let t0 = std::time::Instant::now();
    loop {
        let (code, _, peer) = https_get(node, "/metrics", Some(PROM))?;
        if peer == leaf2 {
            ensure!(code == 200, "after rotation: {code}");
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "still the old certificate after 5 s; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        agent
            .log_text()
            .contains("reloaded the metrics TLS certificate")
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
    // TLS: both files or neither; each file named when it does not load.
    let err = run(&["--metrics-tls-cert=/nonexistent/tls.crt"])?;
    ensure!(err.contains("--metrics-tls-key"), "{err}");
    let err = run(&[
        "--metrics-tls-cert=/nonexistent/tls.crt",
        "--metrics-tls-key=/nonexistent/tls.key",
    ])?;
    ensure!(
        err.contains("--metrics-tls-cert /nonexistent/tls.crt"),
        "{err}"
    );
    dir.write_raw("tls.crt", LEAF1_CERT)?;
    let cert = format!("--metrics-tls-cert={}", dir.dir.join("tls.crt").display());
    // A certificate where the key should be.
    let key = format!("--metrics-tls-key={}", dir.dir.join("tls.crt").display());
    let err = run(&[&cert, &key])?;
    ensure!(err.contains("--metrics-tls-key"), "{err}");
    dir.write_raw("other.key", LEAF2_KEY)?;
    let key = format!("--metrics-tls-key={}", dir.dir.join("other.key").display());
    let err = run(&[&cert, &key])?;
    ensure!(
        err.contains("--metrics-tls-cert") && err.contains("--metrics-tls-key"),
        "a key that does not match the certificate: {err}"
    );
    // Auth on needs a client even with --manifests: a bad --kubeconfig is named.
    let err = run(&["--metrics-auth", "--kubeconfig=/nonexistent/kubeconfig"])?;
    ensure!(
        err.contains("--metrics-auth needs a Kubernetes client")
            && err.contains("--kubeconfig /nonexistent/kubeconfig"),
        "{err}"
    );
    Ok(())
}
