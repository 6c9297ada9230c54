//! The ClusterRole grants what the agent's API source needs and nothing more.
//!
//! Checked against the code's own list of watched kinds
//! (`rayfence::source::ObjectKind::ALL`, whose exhaustive match below makes a new
//! kind fail to compile until its rule is decided): the source runs one watcher
//! (list + watch) per kind, cluster-wide, NetworkPolicies only with
//! --enforce-networkpolicies; its Event reporter gets the object a problem is
//! about and creates an events.k8s.io/v1 Event; with --metrics-auth it creates
//! TokenReviews and SubjectAccessReviews.
//!
//! The scrapers' ClusterRoles (rayfence-metrics-reader, rayfence-api-reader) grant
//! `get` on the agent's paths and nothing else, and deploy/ binds them to no one.
//!
//! And live: the real `rayfence agent`, configured as the manifests configure it,
//! against tests/src/fake_api and scraped with tokens bound to the readers'
//! roles: every request in `server.requests()` must be allowed by the ClusterRole,
//! and every rule used.

use std::collections::BTreeSet;

use anyhow::Result;
use k8s_openapi::Resource;
use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use rayfence::crd::RayCluster;
use rayfence::source::ObjectKind;
use rayfence_tests::deploy::*;
use rayfence_tests::fake_api::{FakeApiServer, Grant, GrantSubject, RecordedRequest, TokenInfo};
use serde_json::json;

type Triple = (String, String, String);

fn triples<K: Resource>(verbs: &[&str]) -> Vec<Triple> {
    verbs
        .iter()
        .map(|v| {
            (
                K::GROUP.to_owned(),
                K::URL_PATH_SEGMENT.to_owned(),
                (*v).to_owned(),
            )
        })
        .collect()
}

/// What the agent does against the API server, from the kinds it knows.
fn needed(enforce_networkpolicies: bool, metrics_auth: bool) -> BTreeSet<Triple> {
    // A watcher lists then watches; the Event reporter gets the object first.
    const READ: &[&str] = &["get", "list", "watch"];
    let mut out = BTreeSet::new();
    for kind in ObjectKind::ALL {
        let rules = match kind {
            ObjectKind::RayCluster => triples::<RayCluster>(READ),
            ObjectKind::Pod => triples::<Pod>(READ),
            ObjectKind::Namespace => triples::<Namespace>(READ),
            ObjectKind::Service => triples::<Service>(READ),
            ObjectKind::EndpointSlice => triples::<EndpointSlice>(READ),
            ObjectKind::NetworkPolicy if enforce_networkpolicies => triples::<NetworkPolicy>(READ),
            ObjectKind::NetworkPolicy => Vec::new(),
            // Only this node (fieldSelector metadata.name), but RBAC cannot narrow
            // a list/watch to a name not known when the role is written.
            ObjectKind::Node => triples::<Node>(READ),
        };
        out.extend(rules);
    }
    out.extend(triples::<Event>(&["create"]));
    if metrics_auth {
        out.extend(triples::<TokenReview>(&["create"]));
        out.extend(triples::<SubjectAccessReview>(&["create"]));
    }
    out
}

/// The scrapers' ClusterRoles and the paths each grants `get` on.
const READERS: [(&str, &[&str]); 2] = [
    ("rayfence-metrics-reader", &["/metrics"]),
    (
        "rayfence-api-reader",
        &["/v1/status", "/v1/explain", "/v1/flows"],
    ),
];

/// (path, verb) pairs of a ClusterRole made of nonResourceURLs rules only.
fn non_resource_rules(role: &serde_json::Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule.get("resources").is_none() && rule.get("apiGroups").is_none(),
            "{}: only nonResourceURLs rules: {rule}",
            role["metadata"]["name"]
        );
        for url in rule["nonResourceURLs"].as_array().expect("nonResourceURLs") {
            for verb in rule["verbs"].as_array().expect("verbs") {
                let s = |x: &serde_json::Value| x.as_str().expect("string").to_owned();
                out.insert((s(url), s(verb)));
            }
        }
    }
    out
}

fn metrics_auth_on(env: &std::collections::BTreeMap<String, String>) -> bool {
    env.get("RAYFENCE_METRICS_AUTH").map(String::as_str) == Some("true")
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_does() -> Result<()> {
    for (dir, enforce) in [
        ("deploy/base", false),
        ("deploy/overlays/audit", false),
        ("deploy/overlays/k3s-flannel", false),
        ("deploy/overlays/networkpolicies", true),
    ] {
        let docs = kustomize(dir)?;
        let env = agent_environment(&docs, find(&docs, "DaemonSet", "rayfence-agent"));
        assert_eq!(
            env["RAYFENCE_ENFORCE_NETWORKPOLICIES"],
            enforce.to_string(),
            "{dir}"
        );
        assert!(
            metrics_auth_on(&env),
            "{dir}: --metrics-auth is on by default"
        );
        let granted = rule_triples(find(&docs, "ClusterRole", "rayfence-agent"));
        let needed = needed(enforce, metrics_auth_on(&env));
        let missing: Vec<_> = needed.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(missing.is_empty(), "{dir}: the agent needs {missing:?}");
        assert!(extra.is_empty(), "{dir}: granted but never used {extra:?}");
    }
    Ok(())
}

#[test]
fn the_role_is_bound_to_the_agents_service_account_only() -> Result<()> {
    let docs = kustomize("deploy/base")?;
    let binding = find(&docs, "ClusterRoleBinding", "rayfence-agent");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "rayfence-agent");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{
            "kind": "ServiceAccount",
            "name": "rayfence-agent",
            "namespace": "rayfence-system"
        }])
    );
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "rayfence-agent"
    );
    // Nothing else in deploy/ may carry API permissions: the readers' roles (and
    // `kubectl rayfence`'s Role, whose rules the deploy suite checks) are bound by
    // users, never here.
    for dir in KUSTOMIZATIONS {
        for doc in kustomize(dir)? {
            let kind = doc["kind"].as_str().unwrap_or_default();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let reader = READERS.iter().any(|(r, _)| *r == name);
            assert!(
                kind != "RoleBinding"
                    && (kind != "Role" || name == "rayfence-viewer")
                    && (!kind.starts_with("Cluster")
                        || name == "rayfence-agent"
                        || (kind == "ClusterRole" && reader)),
                "{dir}: unexpected {kind} {name}"
            );
        }
    }
    Ok(())
}

#[test]
fn reader_roles_grant_get_on_the_agents_paths_only_and_are_unbound() -> Result<()> {
    for dir in AGENT_KUSTOMIZATIONS {
        let docs = kustomize(dir)?;
        for (name, paths) in READERS {
            let granted = non_resource_rules(find(&docs, "ClusterRole", name));
            let expected: BTreeSet<(String, String)> = paths
                .iter()
                .map(|p| ((*p).to_owned(), "get".to_owned()))
                .collect();
            assert_eq!(granted, expected, "{dir}: {name}");
            assert!(
                !docs
                    .iter()
                    .any(|d| d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == name),
                "{dir}: {name} is bound in deploy/ (users bind it)"
            );
        }
    }
    Ok(())
}

/// (verb, group, resource) of one recorded request, `None` for the public
/// discovery endpoints (/version, /api, /apis), which every authenticated client
/// may read through the built-in system:discovery role.
fn request_triple(r: &RecordedRequest) -> Option<Triple> {
    let segments: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    // namespaces/<ns>/<resource>[/<name>], or <resource>[/<name>]; a bare
    // namespaces/<name> is the Namespace itself.
    let (resource, named) = match rest {
        ["namespaces", _ns, resource, tail @ ..] => (*resource, !tail.is_empty()),
        [resource, tail @ ..] => (*resource, !tail.is_empty()),
        [] => return None,
    };
    let verb = match (r.method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) if r.is_watch() => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => panic!("unexpected method {other} on {}", r.path),
    };
    Some((group.to_owned(), resource.to_owned(), verb.to_owned()))
}

/// Kills the agent and removes its pins, even when the test fails.
struct RunningAgent {
    child: std::process::Child,
    bpffs: std::path::PathBuf,
    log: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(bin) = rayfence_bin() {
            let _ = std::process::Command::new(bin)
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&self.bpffs)
                .output();
        }
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The real `rayfence agent`, configured exactly as a rendered kustomization
/// (its ConfigMap and args; only paths and the metrics port replaced for this
/// machine), against the fake API server, and scraped with tokens for the
/// configured audience bound (as grants in the fake) to exactly what each
/// readers' ClusterRole says: every request it makes must be allowed
/// by that kustomization's ClusterRole, and every rule must be exercised, except
/// `get` on a watched kind the agent had no problem to report about in this
/// scenario (the Event reporter may look up any of them; one is checked live).
/// Needs root (it loads the datapath, on an empty node: nothing is attached).
#[test]
fn cluster_role_covers_every_request_the_running_agent_makes() -> Result<()> {
    for (dir, enforce) in [
        ("deploy/base", false),
        ("deploy/overlays/networkpolicies", true),
    ] {
        check_live(dir, enforce).map_err(|e| e.context(dir))?;
    }
    Ok(())
}

fn check_live(dir: &str, enforce: bool) -> Result<()> {
    use std::time::{Duration, Instant};

    let docs = kustomize(dir)?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    let granted = rule_triples(find(&docs, "ClusterRole", "rayfence-agent"));
    let auth = metrics_auth_on(&agent_environment(&docs, ds));
    anyhow::ensure!(auth, "--metrics-auth is on in the manifests");

    let rt = tokio::runtime::Runtime::new()?;
    let server = rt.block_on(FakeApiServer::start())?;
    // One service account per readers' role, its token issued for the
    // configured audiences, bound to that role's rules.
    let audiences: Vec<String> = agent_environment(&docs, ds)
        .get("RAYFENCE_METRICS_AUTH_AUDIENCE")
        .map(|a| a.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let audiences: Vec<&str> = audiences.iter().map(String::as_str).collect();
    let mut readers = Vec::new();
    for (role, _) in READERS {
        let token = format!("tok-{role}");
        let info = TokenInfo::service_account("monitoring", role, &audiences);
        for (path, verb) in non_resource_rules(find(&docs, "ClusterRole", role)) {
            server.grant(Grant::non_resource(
                GrantSubject::User(info.user.clone()),
                &path,
                &verb,
            ));
            readers.push((role, token.clone(), path));
        }
        server.add_token(&token, info);
    }
    server.install_crd("ray.io", "v1", "rayclusters");
    let ns = "ray-rbac";
    server.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    server.apply(&json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "rbac-node"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}));
    // Bad input, so that the Event reporter looks the object up and posts.
    server.apply(&json!({"apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": "bad", "namespace": ns, "uid": "rc-bad"},
        "spec": {"networkPolicy": {"mode": "Sideways"}}}));

    let tag = format!("rf-deploy-rbac-{}-{}", std::process::id(), enforce);
    let kubeconfig = std::env::temp_dir().join(format!("{tag}.kubeconfig"));
    std::fs::write(&kubeconfig, server.kubeconfig_yaml())?;
    let bpffs = std::path::Path::new("/sys/fs/bpf").join(&tag);
    rayfence_tests::bpffs::ensure_mounted(&bpffs)?;
    let log = std::env::temp_dir().join(format!("{tag}.log"));

    let mut env = agent_environment(&docs, ds);
    env.insert("NODE_NAME".into(), "rbac-node".into());
    env.insert("RAYFENCE_METRICS_ADDR".into(), "127.0.0.1:0".into());
    // status.hostIP's stand-in, and no fixed port on this machine's loopback.
    env.insert("RAYFENCE_METRICS_BIND_ADDRESS".into(), "127.0.0.1".into());
    env.insert("RAYFENCE_HEALTH_ADDR".into(), "127.0.0.1:0".into());
    env.insert("RUST_LOG".into(), "info".into());
    assert_eq!(env["RAYFENCE_ENFORCE_NETWORKPOLICIES"], enforce.to_string());
    let mut args = Vec::new();
    for arg in agent_args(ds) {
        match flag_of(&arg) {
            Some("--bpffs") => args.push(format!("--bpffs={}", bpffs.display())),
            // Found in this machine's mountinfo instead.
            Some("--cgroup-root") => {}
            // The node's CNI directories: not this machine's, and not about the API.
            Some(flag) if flag.starts_with("--cni-") => {}
            _ => args.push(arg),
        }
    }
    args.push(format!("--kubeconfig={}", kubeconfig.display()));
    // The log is on stdout; stderr would have a fatal error.
    let log_file = std::fs::File::create(&log)?;
    let child = std::process::Command::new(rayfence_bin()?)
        .args(&args)
        .env_clear()
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()?;
    let agent = RunningAgent {
        child,
        bpffs,
        log: log.clone(),
        kubeconfig,
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Synced every kind it watches and posted the Event, then a little longer for
    // anything that follows.
    let watched: BTreeSet<Triple> = needed(enforce, auth)
        .into_iter()
        .filter(|(_, _, v)| v == "watch")
        .collect();
    let t0 = Instant::now();
    loop {
        let seen: BTreeSet<Triple> = server
            .requests()
            .iter()
            .filter_map(request_triple)
            .collect();
        let posted = seen.contains(&("events.k8s.io".into(), "events".into(), "create".into()));
        if posted && watched.is_subset(&seen) {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(40),
            "the agent did not sync and post within 40 s; requests: {:?}\nlog:\n{}",
            server.requests(),
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Scrapes: each reader's paths pass the check (200 for /metrics; the routes
    // under /v1/ answer whatever they answer, but not 401/403/503); one role does
    // not open the other's paths; no token, no metrics.
    let addr = bound_addr(&log_text())
        .ok_or_else(|| anyhow::anyhow!("no bound metrics address in the log:\n{}", log_text()))?;
    for (role, token, path) in &readers {
        let (code, body) = http_get(addr, path, Some(token))?;
        if path == "/metrics" {
            anyhow::ensure!(
                code == 200 && body.contains("rayfence_"),
                "{role} on {path}: {code} {body}"
            );
        } else {
            anyhow::ensure!(
                ![401, 403, 503].contains(&code),
                "{role} on {path}: {code} {body}"
            );
        }
    }
    let (code, _) = http_get(addr, "/v1/flows", Some("tok-rayfence-metrics-reader"))?;
    anyhow::ensure!(code == 403, "metrics reader on /v1/flows: {code}");
    let (code, _) = http_get(addr, "/metrics", None)?;
    anyhow::ensure!(code == 401, "no token on /metrics: {code}");

    std::thread::sleep(Duration::from_millis(1500));
    drop(agent);

    let used: BTreeSet<Triple> = server
        .requests()
        .iter()
        .filter_map(request_triple)
        .collect();
    let denied: Vec<_> = used.difference(&granted).collect();
    assert!(
        denied.is_empty(),
        "the agent made requests its ClusterRole does not allow: {denied:?}"
    );
    let unused: Vec<_> = granted
        .difference(&used)
        .filter(|(_, _, verb)| verb != "get")
        .collect();
    assert!(unused.is_empty(), "granted, never used: {unused:?}");
    assert!(
        used.contains(&("ray.io".into(), "rayclusters".into(), "get".into())),
        "the Event reporter's lookup (get) was exercised"
    );
    Ok(())
}

/// The address the agent says it serves on (`--metrics-addr` with port 0), from
/// its JSON or text log.
fn bound_addr(log: &str) -> Option<std::net::SocketAddr> {
    log.lines().find_map(|line| {
        if !line.contains("serving /metrics") {
            return None;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            // Fields are flat beside timestamp, level, message and target.
            Ok(v) => v["addr"].as_str()?.parse().ok(),
            Err(_) => line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))?
                .parse()
                .ok(),
        }
    })
}

/// `GET path` with an optional bearer token: (status, body).
fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let headers: Vec<String> = token
        .map(rayfence_tests::http::bearer)
        .into_iter()
        .collect();
    let reply =
        rayfence_tests::http::get(addr, path, &headers, std::time::Duration::from_secs(10))?;
    Ok((reply.code, reply.body))
}
