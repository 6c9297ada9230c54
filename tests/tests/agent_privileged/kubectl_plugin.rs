//! `kubectl rayfence` end to end: two lab nodes, each running its own real agent
//! against one fake API server, a RayCluster with pods on both, and the real
//! `kubectl-rayfence` binary run from the test's namespace (a laptop) with a
//! kubeconfig naming the fake API server and a user's token. The plugin execs into
//! the agent pods through the API server; the fake server runs each exec as the
//! agent pod would, the real `rayfence` in that node's namespace against that
//! node's agent socket.
//!
//! - the user who may ask is bound to deploy/'s `rayfence-viewer` Role as written
//!   (`deploy/base/viewer.yaml`), so the test shows the shipped Role is enough.
//! - `status`: one row per node, both ready (also through `kubectl rayfence`, found
//!   on PATH by kubectl when it is installed); an agent that stops answering is
//!   named, and the exit status says so; a namespace without agents is said.
//! - `explain` across nodes: an intra-cluster flow is allowed (by pod names and by
//!   IPs) and a flow from an outsider denied, each side decided by the agent of its
//!   own node (which one alone can only say `unknown`), and a real probe agrees.
//! - `flows`: drops seen on both nodes after real probes, merged and tagged with
//!   their node, with `--follow` too.
//! - a user without `create` on `pods/exec` is refused by the API server (403),
//!   and the plugin says so (status, explain, flows).
//!
//! Needs root (network namespaces, bpffs, cgroups). Guards kill the agents and the
//! plugin and run `rayfence cleanup` even when the test panics.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::agent::{Agent, Kubelet, Manifests, Sandbox, sandbox, uid, v4};
use rayfence_tests::agent_bin::{kubectl_rayfence_bin, rayfence_bin};
use rayfence_tests::fake_api::{ExecRequest, FakeApiServer, Grant, GrantSubject, TokenInfo};
use rayfence_tests::objects::json::{
    head_labels, namespace, node_object, pod_object, raycluster, worker_labels,
};
use rayfence_tests::{Layout, Outcome, Topology, probe_bin};
use serde_json::{Value, json};

use super::multinode::{node_name, start_agents};

const PORT: u16 = 8000;
const SHORT: Duration = Duration::from_millis(300);
const PLATFORM_TOKEN: &str = "platform-team-token";
const DEV_TOKEN: &str = "developer-token";

/// A running `kubectl rayfence flows --follow`, killed (by its own handle) on drop.
struct Following(Child);

impl Drop for Following {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real plugin with `kubeconfig`, asking the agents in `agents_ns`.
fn plugin(kubeconfig: &Path, agents_ns: &str, args: &[&str]) -> Result<Command> {
    let mut command = Command::new(kubectl_rayfence_bin()?);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["-n", agents_ns, "--request-timeout", "20"])
        .args(args)
        .stdin(Stdio::null());
    Ok(command)
}

fn run(kubeconfig: &Path, agents_ns: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let Output {
        status,
        stdout,
        stderr,
    } = plugin(kubeconfig, agents_ns, args)?
        .output()
        .with_context(|| format!("running kubectl-rayfence {args:?}"))?;
    Ok((
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    ))
}

/// The agent pod of the DaemonSet on `node`, as the API server lists it, and how
/// it execs: `rayfence ...` in the node's namespace against that node's agent.
fn register_agent_pod(
    server: &FakeApiServer,
    agents_ns: &str,
    index: usize,
    topo: &Topology,
    agent: &Agent,
) -> Result<()> {
    let node = topo.node(index);
    let pod = format!("rayfence-agent-{index}");
    server.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": agents_ns, "labels": {
            "app.kubernetes.io/name": "rayfence",
            "app.kubernetes.io/component": "agent",
            "app.kubernetes.io/instance": "rayfence",
        }},
        "spec": {"nodeName": node_name(index), "hostNetwork": true,
                 "containers": [{"name": "agent", "image": "ghcr.io/rayfence/rayfence:lab"}]},
        "status": {"phase": "Running", "podIP": node.ip4.to_string(),
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }));
    let netns = node.netns.path();
    let socket = agent.socket.clone();
    let bin = rayfence_bin()?;
    server.on_exec(agents_ns, &pod, move |request: &ExecRequest| {
        let Some((program, args)) = request.command.split_first() else {
            return Err("no command".into());
        };
        if request.container.as_deref() != Some("agent") {
            return Err(format!(
                "container {:?} is not in the pod",
                request.container
            ));
        }
        if program != "rayfence" {
            return Err(format!(
                "exec: {program:?}: executable file not found in $PATH"
            ));
        }
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .arg(&bin)
            .args(args)
            .env("RAYFENCE_API_SOCKET", &socket);
        Ok(command)
    });
    Ok(())
}

/// deploy/'s rayfence-viewer Role bound to `user` in `namespace`: what a platform
/// team is given, so the test shows the shipped Role is enough.
fn viewer_role_grants(user: &str, namespace: &str) -> Result<Vec<Grant>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/viewer.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let role: Value = serde_norway::from_str(&text)?;
    ensure!(role["kind"] == "Role", "{}: not a Role", path.display());
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut grants = Vec::new();
    for rule in role["rules"].as_array().context("rules")? {
        ensure!(
            strings(&rule["apiGroups"]) == [""],
            "core group only: {rule}"
        );
        for resource in strings(&rule["resources"]) {
            let (resource, subresource) = resource.split_once('/').unwrap_or((&resource, ""));
            for verb in strings(&rule["verbs"]) {
                grants.push(Grant::resource(
                    GrantSubject::User(user.into()),
                    namespace,
                    resource,
                    subresource,
                    &verb,
                ));
            }
        }
    }
    Ok(grants)
}

fn user(name: &str) -> TokenInfo {
    TokenInfo {
        user: name.into(),
        uid: format!("uid-{name}"),
        groups: vec!["system:authenticated".into()],
        extra: Vec::new(),
        audiences: Vec::new(),
    }
}

/// One side of an explanation: (direction, verdict, the node that decided it).
type DecidedSide = (String, String, String);
/// One flow line: (node, source pod, destination pod, direction).
type FlowLine = (String, String, String, String);

/// `-o json` of `explain`: the verdict and each side with the node that decided it.
fn explained(out: &str) -> Result<(String, Vec<DecidedSide>)> {
    let v: Value = serde_json::from_str(out).with_context(|| format!("explain JSON: {out}"))?;
    let sides: Vec<DecidedSide> = v["sides"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(v["decidedBy"].as_array().into_iter().flatten())
        .map(|(side, by)| {
            (
                side["direction"].as_str().unwrap_or("").to_owned(),
                side["verdict"].as_str().unwrap_or("").to_owned(),
                by["node"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    Ok((v["verdict"].as_str().unwrap_or("").to_owned(), sides))
}

/// `flows -o json` lines.
fn flow_lines(out: &str) -> Vec<FlowLine> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let text = |p: &str| {
                v.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            (
                text("/node"),
                text("/source/name"),
                text("/destination/name"),
                text("/direction"),
            )
        })
        .collect()
}

#[test]
fn kubectl_rayfence_asks_every_nodes_agent_through_the_api_server_as_the_user() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = rt.block_on(FakeApiServer::start())?;
    server.install_crd("ray.io", "v1", "rayclusters");

    // node-0: the head and an outsider; node-1: a worker of the same RayCluster.
    let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["head", "outsider"])?;
    let n1 = topo.add_node()?;
    topo.add_pod(n1, "worker")?;
    let ns = format!("ray-{}", topo.tag());
    let agents_ns = format!("rf-system-{}", topo.tag());
    server.apply(&namespace(&ns));
    server.apply(&namespace(&agents_ns));
    for (i, node) in topo.nodes().iter().enumerate() {
        server.apply(&node_object(&node_name(i), node));
    }
    let placement = [
        ("head", 0, head_labels("rc")),
        ("outsider", 0, vec![("app", "outsider")]),
        ("worker", n1, worker_labels("rc")),
    ];
    let mut kubelets = vec![Some(Kubelet::new()?), Some(Kubelet::new()?)];
    let mut sandboxes: Vec<Vec<Sandbox>> = vec![Vec::new(), Vec::new()];
    for (n, (pod, node, labels)) in placement.iter().enumerate() {
        let uid = uid(200 + n as u32);
        let kubelet = kubelets[*node].as_ref().context("kubelet")?;
        sandboxes[*node].push(sandbox(kubelet, topo.pod(pod), &uid)?);
        server.apply(&pod_object(
            &ns,
            topo.pod(pod),
            &uid,
            &node_name(*node),
            labels,
        ));
    }
    server.apply(&raycluster(&ns, "rc", json!({"mode": "DenyAll"})));
    let (head, outsider, worker) = (topo.pod("head"), topo.pod("outsider"), topo.pod("worker"));
    let _servers = [
        head.serve_tcp(PORT)?,
        worker.serve_tcp(PORT)?,
        outsider.serve_tcp(PORT)?,
    ];

    let mut rigs = start_agents(&topo, &server, &mut kubelets, &mut sandboxes)?;
    for (i, rig) in rigs.iter().enumerate() {
        rig.agent
            .wait_ready(topo.node(i), Duration::from_secs(30))?;
        register_agent_pod(&server, &agents_ns, i, &topo, &rig.agent)?;
    }

    // The users: a platform team allowed to exec into the agents (what the
    // rayfence-viewer Role grants), and a developer who is not.
    server.add_token(PLATFORM_TOKEN, user("platform"));
    server.add_token(DEV_TOKEN, user("developer"));
    for grant in viewer_role_grants("platform", &agents_ns)? {
        server.grant(grant);
    }
    let configs = Manifests::new()?;
    configs.write_raw(
        "platform",
        &server.kubeconfig_yaml_with_token(PLATFORM_TOKEN),
    )?;
    configs.write_raw("developer", &server.kubeconfig_yaml_with_token(DEV_TOKEN))?;
    let platform: PathBuf = configs.dir.join("platform");
    let developer: PathBuf = configs.dir.join("developer");

    // status: both nodes, ready.
    let (code, out, err) = run(&platform, &agents_ns, &["status"])?;
    ensure!(code == 0, "status exited {code}: {out}{err}");
    let rows: Vec<&str> = out.lines().collect();
    ensure!(rows[0].starts_with("NODE "), "{out}");
    for (i, row) in rows[1..3].iter().enumerate() {
        ensure!(
            row.starts_with(&format!("node-{i} "))
                && row.contains(&format!("rayfence-agent-{i}"))
                && row.contains(" yes ")
                && row.contains("ghcr.io/rayfence/rayfence:lab"),
            "{out}"
        );
    }
    // The same through kubectl, which finds the plugin on PATH.
    let plugin_dir = kubectl_rayfence_bin()?
        .parent()
        .context("the plugin's directory")?
        .to_owned();
    let path = std::env::join_paths(std::iter::once(plugin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    match Command::new("kubectl")
        .args(["rayfence", "-n", &agents_ns, "status"])
        .env("PATH", &path)
        .env("KUBECONFIG", &platform)
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout);
            ensure!(
                output.status.success() && text.lines().count() == 3,
                "kubectl rayfence status: {} {text}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // The suite does not need kubectl otherwise.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no kubectl on PATH: kubectl's plugin lookup not checked")
        }
        Err(e) => return Err(e.into()),
    }
    let (code, out, _) = run(&platform, &agents_ns, &["status", "-o", "json"])?;
    ensure!(code == 0, "{out}");
    let status: Value = serde_json::from_str(&out)?;
    let nodes: Vec<(&str, bool)> = status["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or(""),
                n["status"]["ready"] == true,
            )
        })
        .collect();
    ensure!(nodes == [("node-0", true), ("node-1", true)], "{out}");
    // Each agent says its version (a rollout half done shows in the VERSION column).
    let version = format!("{} (", env!("CARGO_PKG_VERSION"));
    for n in status["nodes"].as_array().context("nodes")? {
        ensure!(
            n["status"]["version"]
                .as_str()
                .is_some_and(|v| v.starts_with(&version)),
            "{out}"
        );
    }

    // explain, across nodes: allowed (same RayCluster), each side on its node.
    let from_worker = format!("{ns}/worker");
    let to_head = format!("{ns}/head:{PORT}");
    let (code, out, err) = run(
        &platform,
        &agents_ns,
        &[
            "explain",
            "--from",
            &from_worker,
            "--to",
            &to_head,
            "-o",
            "json",
        ],
    )?;
    ensure!(code == 0, "allowed flow exited {code}: {out}{err}");
    let (verdict, sides) = explained(&out)?;
    ensure!(verdict == "allowed", "{out}");
    ensure!(
        sides
            == [
                ("egress".into(), "allowed".into(), "node-1".into()),
                ("ingress".into(), "allowed".into(), "node-0".into()),
            ],
        "{sides:?}: {out}"
    );
    // The same flow named by addresses: the plugin finds the pods by their IP.
    let (code, out, err) = run(
        &platform,
        &agents_ns,
        &[
            "explain",
            "--from",
            &v4(worker).to_string(),
            "--to",
            &format!("{}:{PORT}", v4(head)),
            "-o",
            "json",
        ],
    )?;
    ensure!(code == 0, "allowed flow by IP exited {code}: {out}{err}");
    ensure!(explained(&out)?.1 == sides, "by IP: {out}");
    ensure!(
        worker.tcp_connect(v4(head), PORT, SHORT) == Outcome::Ok,
        "the datapath disagrees: worker -> head is not allowed"
    );

    // Denied: the outsider (node-0, not isolated) to the worker (node-1).
    let from_outsider = format!("{ns}/outsider");
    let to_worker = format!("{ns}/worker:{PORT}");
    let (code, out, err) = run(
        &platform,
        &agents_ns,
        &["explain", "--from", &from_outsider, "--to", &to_worker],
    )?;
    ensure!(code == 1, "denied flow exited {code}: {out}{err}");
    ensure!(out.contains(": DENIED"), "{out}");
    ensure!(
        out.lines()
            .any(|l| l.contains("ingress") && l.contains("decided on node node-1")),
        "{out}"
    );
    let (_, out, _) = run(
        &platform,
        &agents_ns,
        &[
            "explain",
            "--from",
            &from_outsider,
            "--to",
            &to_worker,
            "-o",
            "json",
        ],
    )?;
    let (verdict, sides) = explained(&out)?;
    ensure!(verdict == "denied", "{out}");
    ensure!(
        sides
            .iter()
            .any(|s| *s == ("ingress".into(), "denied".into(), "node-1".into())),
        "{sides:?}"
    );
    ensure!(
        !sides.iter().any(|s| s.1 == "elsewhere"),
        "a side left undecided: {sides:?}"
    );
    // The source's agent alone cannot tell: the ingress side is another node's.
    let (alone, out, _) = rigs[0].agent.command_status(
        topo.node(0),
        &["explain", "--from", &from_outsider, "--to", &to_worker],
    )?;
    ensure!(alone == Some(3), "node-0's agent alone: {alone:?} {out}");
    ensure!(
        outsider.tcp_connect(v4(worker), PORT, SHORT) != Outcome::Ok,
        "the datapath disagrees: outsider -> worker passed"
    );

    // flows: a drop on each node (node-1: the outsider's connection above, at the
    // worker's ingress; node-0: the head's egress to the outsider), merged.
    ensure!(
        head.tcp_connect(v4(outsider), PORT, SHORT) != Outcome::Ok,
        "head -> outsider passed (DenyAll isolates egress)"
    );
    let want_both = |lines: &[FlowLine]| {
        let on_1 = lines
            .iter()
            .any(|(node, src, dst, _)| node == "node-1" && src == "outsider" && dst == "worker");
        let on_0 = lines
            .iter()
            .any(|(node, src, dst, _)| node == "node-0" && src == "head" && dst == "outsider");
        on_1 && on_0
    };
    let t0 = Instant::now();
    let lines = loop {
        let (code, out, err) = run(
            &platform,
            &agents_ns,
            &[
                "flows",
                "-o",
                "json",
                "--verdict",
                "dropped",
                "--pod-namespace",
                &ns,
            ],
        )?;
        ensure!(code == 0, "flows exited {code}: {out}{err}");
        let lines = flow_lines(&out);
        if want_both(&lines) {
            break lines;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(15),
            "no drops from both nodes: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        lines
            .iter()
            .all(|(node, ..)| node == "node-0" || node == "node-1"),
        "{lines:?}"
    );
    let (code, out, _) = run(&platform, &agents_ns, &["flows", "--pod-namespace", &ns])?;
    ensure!(code == 0, "{out}");
    ensure!(
        out.lines().any(|l| l.starts_with("node-0  "))
            && out.lines().any(|l| l.starts_with("node-1  ")),
        "table lines tagged with their node: {out}"
    );

    // --follow: new drops from both nodes arrive on one stream.
    let mut child = plugin(
        &platform,
        &agents_ns,
        &[
            "flows",
            "--follow",
            "-o",
            "json",
            "--limit",
            "0",
            "--pod-namespace",
            &ns,
        ],
    )?
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let _following = Following(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while !want_both(&flow_lines(&seen.join("\n"))) {
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "--follow did not bring drops from both nodes: {seen:?}"
        );
        // New drops all along: the stream may start after the first ones.
        let _ = outsider.tcp_connect(v4(worker), PORT, Duration::from_millis(100));
        let _ = head.tcp_connect(v4(outsider), PORT, Duration::from_millis(100));
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(line);
        }
    }

    // A user without `create` on pods/exec: the API server refuses, and the plugin
    // says who was refused what.
    for args in [
        &["status"][..],
        &["explain", "--from", &from_worker, "--to", &to_head],
        &["flows"],
        &["flows", "--follow"],
    ] {
        let (code, out, err) = run(&developer, &agents_ns, args)?;
        ensure!(
            code == 2,
            "{args:?} as the developer exited {code}: {out}{err}"
        );
        ensure!(
            err.contains("forbidden")
                && err.contains("User \"developer\" cannot create resource \"pods/exec\"")
                && err.contains("rayfence-viewer"),
            "{args:?}: {err}"
        );
    }

    // No agents where it looks: said, with the flags to change where.
    let (code, _, err) = run(&platform, &format!("{agents_ns}-elsewhere"), &["status"])?;
    ensure!(
        code == 2 && err.contains("no agent pods in namespace") && err.contains("(-n)"),
        "{code}: {err}"
    );

    // An agent that stops answering is named, and status fails.
    rigs[1].agent.kill();
    let (code, out, _) = run(&platform, &agents_ns, &["status"])?;
    ensure!(
        code == 1,
        "status with node-1's agent gone exited {code}: {out}"
    );
    ensure!(
        out.lines()
            .any(|l| l.starts_with("node-1 ") && l.contains("unreachable"))
            && out.lines().any(|l| l.starts_with("node-1: ")),
        "{out}"
    );
    Ok(())
}
