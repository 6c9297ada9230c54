//! End to end: what an operator sees of a running agent. Real packets between pods
//! of a simulated node, then `rayfence flows`, `rayfence status` and `rayfence
//! explain` (the real commands, over the agent's socket and over HTTP) must say
//! exactly what the datapath did (`explain` in its exit status too), and the
//! agent's JSON flow lines must name the pods, ports, reason and RayCluster, in
//! the one schema of every log line.
//!
//! Needs root, like `runtime`.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence::operator::wire::{
    EndpointStatus, ExplainReport, FlowRecord, FlowVerdict, StatusReport,
};
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;
use rayfence_tests::{Outcome, Topology};
use serde_json::Value;

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);
/// Shorter than rf-probe's echo resend interval: exactly one echo request per ping.
const ONE_ECHO: Duration = Duration::from_millis(200);

struct Scene {
    node: SimNode,
    manifests: Manifests,
    bpffs: Bpffs,
}

/// head + worker of RayCluster `rc` (DenyAll) and an outsider, on one node.
fn scene(first_uid: u32) -> Result<Scene> {
    let node = SimNode::new(&["head", "worker", "outsider"], first_uid)?;
    let manifests = Manifests::new()?;
    manifests.write("base.yaml", &objects(&node.ns, &node.topo, &node.uids))?;
    manifests.write(
        "rc.yaml",
        &[raycluster(
            &node.ns,
            "rc",
            serde_json::json!({"mode": "DenyAll"}),
        )],
    )?;
    Ok(Scene {
        node,
        manifests,
        bpffs: Bpffs::new(),
    })
}

fn objects(ns: &str, topo: &Topology, uids: &[String]) -> Vec<Value> {
    vec![
        namespace(ns),
        node_object(NODE, topo.node(0)),
        pod_object(ns, topo.pod("head"), &uids[0], NODE, &head_labels("rc")),
        pod_object(ns, topo.pod("worker"), &uids[1], NODE, &worker_labels("rc")),
        pod_object(
            ns,
            topo.pod("outsider"),
            &uids[2],
            NODE,
            &[("app", "outsider")],
        ),
    ]
}

/// The agent, logging JSON lines (the flow events are read back from them).
fn start(scene: &Scene, extra_args: &[&str]) -> Result<Agent> {
    let args = [extra_args, &["--log-format", "json"]].concat();
    let agent = scene
        .node
        .start_agent(NODE, &scene.manifests.dir, &scene.bpffs, &args)?;
    // Ready means programmed; attached follows within the same turn.
    agent.wait_log(&["endpoint attached", "/head"], Duration::from_secs(10))?;
    Ok(agent)
}

fn command_json<T: serde::de::DeserializeOwned>(
    agent: &Agent,
    scene: &Scene,
    args: &[&str],
) -> Result<T> {
    let (ok, out, err) = agent.command(scene.node.topo.node(0), args)?;
    ensure!(ok, "rayfence {args:?} failed: {err}");
    serde_json::from_str(&out).with_context(|| format!("rayfence {args:?} printed: {out}"))
}

/// `rayfence explain ARGS` (with `-o json` or `--json` among them): the report,
/// after checking that the exit status is its verdict's.
fn explained(agent: &Agent, scene: &Scene, args: &[&str]) -> Result<ExplainReport> {
    let (code, out, err) = agent.command_status(scene.node.topo.node(0), args)?;
    let report: ExplainReport = serde_json::from_str(&out)
        .with_context(|| format!("rayfence {args:?} printed: {out}; stderr: {err}"))?;
    let expected = match report.verdict.as_str() {
        "allowed" => 0,
        "denied" | "audit" => 1,
        _ => 3,
    };
    ensure!(
        code == Some(expected),
        "rayfence {args:?}: exit status {code:?} for verdict {}",
        report.verdict
    );
    Ok(report)
}

/// A flow record without its time: the log line's timestamp (when it was logged)
/// and the API's `time` (when the datapath saw it) differ by a little.
fn untimed(records: &[FlowRecord]) -> Vec<FlowRecord> {
    records
        .iter()
        .map(|r| FlowRecord {
            time: String::new(),
            ..r.clone()
        })
        .collect()
}

/// Every line of a JSON log: an object with the same envelope (RFC 3339 UTC
/// `timestamp`, `level`, `target`, `message`), flat plain fields, no Rust Debug
/// strings; flow lines the same, with their own fields beside.
fn check_log_schema(log: &str) -> Result<()> {
    let mut flows = 0;
    let mut others = 0;
    for line in log.lines() {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
            anyhow::bail!("not a JSON object: {line}");
        };
        for key in ["timestamp", "level", "target", "message"] {
            ensure!(
                fields.get(key).is_some_and(Value::is_string),
                "{key}: {line}"
            );
        }
        let stamp = fields["timestamp"].as_str().unwrap_or_default();
        ensure!(
            stamp.parse::<jiff::Timestamp>().is_ok() && stamp.ends_with('Z'),
            "timestamp {stamp}: {line}"
        );
        ensure!(
            fields.values().all(|v| !v.is_object() && !v.is_array()),
            "nested: {line}"
        );
        ensure!(
            !line.contains("Some(") && !line.contains("None"),
            "Debug: {line}"
        );
        if fields["target"] == rayfence::logging::FLOW_TARGET {
            ensure!(
                !fields.contains_key("time") && fields.contains_key("src_ip"),
                "{line}"
            );
            flows += 1;
        } else {
            others += 1;
        }
    }
    ensure!(
        flows > 0 && others > 0,
        "{flows} flow and {others} other lines"
    );
    Ok(())
}

/// The named pod's row of a status report.
fn endpoint<'a>(status: &'a StatusReport, pod: &str) -> Result<&'a EndpointStatus> {
    status
        .endpoints
        .iter()
        .find(|e| e.pod == pod)
        .with_context(|| format!("no {pod} in the status: {status:?}"))
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        ensure!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dropped_flow_is_logged_listed_counted_and_explained_with_its_pods_and_rule() -> Result<()> {
    let scene = scene(301)?;
    let (topo, ns) = (&scene.node.topo, &scene.node.ns);
    let (head, worker, outsider) = (topo.pod("head"), topo.pod("worker"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;
    let agent = start(&scene, &[])?;

    let status: StatusReport = command_json(&agent, &scene, &["status", "--json"])?;
    let head_before = endpoint(&status, "head")?.clone();

    // One dropped TCP SYN and exactly one dropped echo request, both to the head.
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout
    );
    assert!(outsider.ping(v4(head), ONE_ECHO).is_blocked());
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);

    // The agent's JSON line for the SYN names both pods, the port, reason and cluster.
    let syn = wait_for("the logged flow event", Duration::from_secs(5), || {
        agent
            .logged_flows()
            .into_iter()
            .find(|f| f.protocol == "tcp" && f.destination.port == 8000)
    })?;
    assert_eq!(syn.verdict, FlowVerdict::Dropped);
    assert_eq!(
        (syn.direction.as_str(), syn.reason.as_str()),
        ("ingress", "no-policy")
    );
    assert_eq!(
        (syn.namespace.as_str(), syn.pod.as_str()),
        (ns.as_str(), "head")
    );
    assert_eq!(syn.raycluster.as_deref(), Some("rc"));
    assert_eq!(syn.role.as_deref(), Some("head"));
    assert_eq!(syn.source.kind, "pod");
    assert_eq!(syn.source.name.as_deref(), Some("outsider"));
    assert_eq!(syn.source.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(syn.source.ip, v4(outsider));
    assert_eq!(syn.destination.ip, v4(head));
    assert_eq!(syn.destination.name.as_deref(), Some("head"));
    assert_eq!(syn.destination.raycluster.as_deref(), Some("rc"));
    assert_eq!(syn.suppressed, 0);
    ensure!(
        syn.time.ends_with('Z') && syn.time.contains('T'),
        "{}",
        syn.time
    );
    let ping = wait_for("the logged ping", Duration::from_secs(5), || {
        agent
            .logged_flows()
            .into_iter()
            .find(|f| f.protocol == "icmp")
    })?;
    assert_eq!(ping.source.port, 0);
    assert_eq!(ping.pod, "head");
    // The allowed flow from the worker is not an event.
    assert!(
        !agent
            .logged_flows()
            .iter()
            .any(|f| f.source.name.as_deref() == Some("worker")),
        "allowed flows are not flow events"
    );

    // `rayfence flows` lists the same events, filtered.
    let (ok, out, err) = agent.command(
        topo.node(0),
        &["flows", "--json", "--verdict", "dropped", "--namespace", ns],
    )?;
    ensure!(ok, "flows: {err}");
    let listed: Vec<FlowRecord> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let listed = untimed(&listed);
    ensure!(
        listed.contains(&untimed(&[syn])[0]) && listed.contains(&untimed(&[ping])[0]),
        "{out}"
    );
    for (filter, value) in [
        ("--raycluster", "other"),
        ("--namespace", "elsewhere"),
        ("--verdict", "audit"),
    ] {
        let (ok, out, err) = agent.command(topo.node(0), &["flows", "--json", filter, value])?;
        ensure!(ok && out.trim().is_empty(), "{filter} {value}: {out} {err}");
    }
    let (ok, out, _) = agent.command(topo.node(0), &["flows"])?;
    ensure!(
        ok && out.contains("DROPPED") && out.contains(&format!("{ns}/outsider")),
        "{out}"
    );

    // Status: the head's drop counter moved by exactly the two packets.
    let status: StatusReport = command_json(&agent, &scene, &["status", "-o", "json"])?;
    assert!(status.ready);
    assert_eq!(status.node, NODE);
    let head_now = endpoint(&status, "head")?;
    assert_eq!(head_now.drops - head_before.drops, 2, "{head_now:?}");
    assert_eq!(
        (
            head_now.hook.as_str(),
            head_now.state.as_str(),
            head_now.mode.as_str()
        ),
        ("tc", "attached", "enforce")
    );
    assert!(head_now.isolate_ingress && head_now.isolate_egress);
    assert_eq!(head_now.raycluster.as_deref(), Some("rc"));
    assert_eq!(head_now.role.as_deref(), Some("head"));
    let worker_now = endpoint(&status, "worker")?;
    assert_eq!(worker_now.role.as_deref(), Some("worker/small"));
    assert_eq!(worker_now.drops, 0);
    let (ok, out, _) = agent.command(topo.node(0), &["status"])?;
    ensure!(
        ok && out.contains(&format!("{ns}/head")) && out.contains("ingress+egress"),
        "{out}"
    );

    // Explain: the same verdicts, and the rule.
    let from_outsider = format!("{ns}/outsider");
    let to_head = format!("{ns}/head:8000");
    let denied: ExplainReport = explained(
        &agent,
        &scene,
        &[
            "explain",
            "--json",
            "--from",
            &from_outsider,
            "--to",
            &to_head,
        ],
    )?;
    assert_eq!(denied.verdict, "denied");
    assert_eq!(denied.sides.len(), 2);
    assert_eq!(denied.sides[0].verdict, "not-enforced");
    assert_eq!(denied.sides[1].verdict, "denied");
    assert_eq!(
        denied.sides[1].pod.as_deref(),
        Some(format!("{ns}/head").as_str())
    );
    let allowed: ExplainReport = explained(
        &agent,
        &scene,
        &[
            "explain",
            "--json",
            "--from",
            &format!("{ns}/worker"),
            "--to",
            &to_head,
        ],
    )?;
    assert_eq!(allowed.verdict, "allowed");
    ensure!(
        allowed.sides.iter().all(|s| s.verdict == "allowed")
            && allowed.sides[1]
                .rules
                .iter()
                .any(|r| r.contains("same RayCluster") && r.contains(&format!("{ns}/rc"))),
        "{allowed:?}"
    );
    // By IP, ICMP, and in words.
    let by_ip: ExplainReport = explained(
        &agent,
        &scene,
        &[
            "explain",
            "--json",
            "--from",
            &v4(outsider).to_string(),
            "--to",
            &v4(head).to_string(),
        ],
    )?;
    assert_eq!(
        (by_ip.verdict.as_str(), by_ip.protocol.as_str()),
        ("denied", "icmp")
    );
    let (code, out, _) = agent.command_status(
        topo.node(0),
        &["explain", "--from", &from_outsider, "--to", &to_head],
    )?;
    ensure!(
        code == Some(1) && out.contains("DENIED") && out.contains("no rule allows"),
        "{code:?} {out}"
    );
    // The same answer as YAML, and wide (the pod each side is decided at).
    let (code, out, _) = agent.command_status(
        topo.node(0),
        &[
            "explain",
            "-o",
            "yaml",
            "--from",
            &from_outsider,
            "--to",
            &to_head,
        ],
    )?;
    let as_yaml: ExplainReport = serde_norway::from_str(&out).context(out.clone())?;
    ensure!(code == Some(1) && as_yaml == denied, "{code:?} {out}");
    let (code, out, _) = agent.command_status(
        topo.node(0),
        &[
            "explain",
            "-o",
            "wide",
            "--from",
            &from_outsider,
            "--to",
            &to_head,
        ],
    )?;
    ensure!(
        code == Some(1) && out.contains(&format!("[at {ns}/head]")),
        "{code:?} {out}"
    );

    // Offline, from the same manifests: the same verdicts.
    let dir = scene.manifests.dir.to_str().context("utf-8")?;
    for (from, to, verdict) in [
        (from_outsider.as_str(), to_head.as_str(), "denied"),
        (&format!("{ns}/worker"), to_head.as_str(), "allowed"),
    ] {
        let offline: ExplainReport = explained(
            &agent,
            &scene,
            &[
                "explain",
                "--json",
                "--dns-mode",
                "off",
                "--manifests",
                dir,
                "--from",
                from,
                "--to",
                to,
            ],
        )?;
        assert_eq!(offline.verdict, verdict, "{from} -> {to}: {offline:?}");
    }

    // Bad input names the flag; an unknown pod is said to be unknown: exit 2.
    let (code, _, err) = agent.command_status(
        topo.node(0),
        &["explain", "--from", "nope", "--to", &to_head],
    )?;
    ensure!(
        code == Some(2) && err.contains("--from") && err.contains("nope"),
        "{code:?} {err}"
    );
    let (code, _, err) = agent.command_status(
        topo.node(0),
        &["explain", "--from", "ghost/pod", "--to", &to_head],
    )?;
    ensure!(
        code == Some(2) && err.contains("not known"),
        "{code:?} {err}"
    );
    let (code, _, err) = agent.command_status(
        topo.node(0),
        &[
            "explain",
            "--from",
            &from_outsider,
            "--to",
            &format!("{ns}/head:99999"),
        ],
    )?;
    ensure!(
        code == Some(2) && err.contains("--to") && err.contains("port"),
        "{code:?} {err}"
    );

    // Over HTTP (the metrics address) the API answers too.
    let (ok, out, err) = agent.command(
        topo.node(0),
        &[
            "status",
            "--json",
            "--agent",
            &format!("http://127.0.0.1:{METRICS_PORT}"),
        ],
    )?;
    ensure!(ok && out.contains("\"endpoints\""), "{err}");

    // Status as YAML (the same report) and wide (a column per field).
    let (ok, out, err) = agent.command(topo.node(0), &["status", "-o", "yaml"])?;
    let as_yaml: StatusReport = serde_norway::from_str(&out).context(out.clone())?;
    ensure!(ok && as_yaml.node == NODE, "{err}");
    endpoint(&as_yaml, "head")?;
    let (ok, out, err) = agent.command(topo.node(0), &["status", "-o", "wide"])?;
    ensure!(
        ok && out.contains("NAMESPACE") && out.contains("DETAIL"),
        "{out} {err}"
    );

    // A reader that went away (`| head`) ends status and flows quietly, exit 0.
    let bin = rayfence_bin()?;
    for args in [
        &["status"][..],
        &["status", "-o", "yaml"],
        &["flows"],
        &["flows", "-o", "json"],
    ] {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let out = topo
            .node(0)
            .netns
            .cmd(bin.to_str().context("utf-8")?)
            .args(args)
            .env("RAYFENCE_API_SOCKET", &agent.socket)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(0) && err.is_empty(),
            "{args:?}: {:?} {err}",
            out.status
        );
    }

    // Every line the agent logged, flow events included, has the one schema.
    check_log_schema(&agent.log_text())?;
    Ok(())
}

#[test]
fn flows_follow_streams_new_events_and_a_noisy_pod_is_rate_limited_with_a_count() -> Result<()> {
    let scene = scene(311)?;
    let (topo, ns) = (&scene.node.topo, &scene.node.ns);
    let (head, outsider) = (topo.pod("head"), topo.pod("outsider"));
    let agent = start(&scene, &["--flow-log-rate", "2"])?;

    // A follower started before the traffic sees it as it happens.
    let bin = rayfence_bin()?;
    let mut follower = topo
        .node(0)
        .netns
        .cmd(bin.to_str().context("utf-8")?)
        .args(["flows", "--follow", "--json", "--raycluster", "rc"])
        .env("RAYFENCE_API_SOCKET", &agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follower.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // Ten dropped pings in quick succession: the first two pass the per-pod limit
    // (2 a second), the rest are suppressed and counted.
    const SENT: u64 = 10;
    let t0 = Instant::now();
    for _ in 0..SENT {
        assert!(
            outsider
                .ping(v4(head), Duration::from_millis(20))
                .is_blocked()
        );
    }
    let burst = t0.elapsed();
    // After the bucket refilled, one more: it carries the count of what was left out.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(outsider.ping(v4(head), ONE_ECHO).is_blocked());

    let mut streamed: Vec<FlowRecord> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            streamed.push(serde_json::from_str(&line).with_context(|| line.clone())?);
            if streamed.iter().map(|f| 1 + f.suppressed).sum::<u64>() > SENT {
                break;
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();

    ensure!(
        streamed
            .iter()
            .all(|f| f.protocol == "icmp" && f.pod == "head" && f.namespace == *ns),
        "{streamed:?}"
    );
    // Nothing lost, nothing invented: every packet is either an event or counted in
    // the next event's `suppressed`.
    let accounted: u64 = streamed.iter().map(|f| 1 + f.suppressed).sum();
    assert_eq!(accounted, SENT + 1, "{streamed:?}");
    // The burst (well under a second) let through at most the bucket plus what
    // refilled while it ran.
    let allowed_in_burst = 2 + (burst.as_secs_f64() * 2.0).ceil() as usize;
    ensure!(
        streamed.len() <= allowed_in_burst + 1 && streamed.len() >= 2,
        "{} events for {SENT}+1 drops in {burst:?}",
        streamed.len()
    );
    let last = streamed.last().context("no events")?;
    ensure!(
        last.suppressed > 0,
        "the last event carries no count: {last:?}"
    );
    // And the metrics count the same: events logged, events left out.
    let (code, metrics) = agent.http_get(topo.node(0), "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    assert_eq!(
        metric_sum(
            &metrics,
            "rayfence_flow_events_total",
            &[("verdict", "dropped")]
        ),
        streamed.len() as f64
    );
    assert_eq!(
        metric_sum(&metrics, "rayfence_flow_events_suppressed_total", &[]),
        (accounted - streamed.len() as u64) as f64
    );
    assert_eq!(
        metric_sum(&metrics, "rayfence_flow_events_lost_total", &[]),
        0.0
    );
    // The log has the same events as the stream.
    let logged: Vec<FlowRecord> = agent
        .logged_flows()
        .into_iter()
        .filter(|f| f.protocol == "icmp")
        .collect();
    assert_eq!(untimed(&logged), untimed(&streamed));
    Ok(())
}

#[test]
fn an_audited_raycluster_shows_would_be_drops_in_flows_status_and_explain() -> Result<()> {
    let scene = scene(321)?;
    let (topo, ns) = (&scene.node.topo, &scene.node.ns);
    let (head, outsider) = (topo.pod("head"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;
    let mut rc = raycluster(ns, "rc", serde_json::json!({"mode": "DenyAll"}));
    rc["metadata"]["annotations"] = serde_json::json!({"rayfence.io/audit": "true"});
    scene.manifests.write("rc.yaml", &[rc])?;
    let agent = start(&scene, &[])?;

    // Audit: the flow passes, and is reported as what would have been dropped.
    assert_eq!(outsider.tcp_connect(v4(head), 8000, SHORT), Outcome::Ok);
    let audited = wait_for("the audit event", Duration::from_secs(5), || {
        agent
            .logged_flows()
            .into_iter()
            .find(|f| f.destination.port == 8000)
    })?;
    assert_eq!(audited.verdict, FlowVerdict::Audit);
    assert_eq!(
        (audited.reason.as_str(), audited.pod.as_str()),
        ("no-policy", "head")
    );
    let (ok, out, err) = agent.command(topo.node(0), &["flows", "--json", "--verdict", "audit"])?;
    ensure!(ok, "{err}");
    let listed: Vec<FlowRecord> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(untimed(&listed), untimed(&[audited]));
    let (ok, out, _) = agent.command(topo.node(0), &["flows", "--json", "--verdict", "dropped"])?;
    ensure!(
        ok && out.trim().is_empty(),
        "nothing dropped in audit: {out}"
    );

    let status: StatusReport = command_json(&agent, &scene, &["status", "--json"])?;
    let head_status = endpoint(&status, "head")?;
    assert_eq!(head_status.mode, "audit");
    // Audit counts a flow once (its later packets ride the conntrack entry).
    assert_eq!((head_status.drops, head_status.would_drops), (0, 1));

    let explained: ExplainReport = explained(
        &agent,
        &scene,
        &[
            "explain",
            "--json",
            "--from",
            &format!("{ns}/outsider"),
            "--to",
            &format!("{ns}/head:8000"),
        ],
    )?;
    assert_eq!(explained.verdict, "audit");
    ensure!(
        explained.sides[1].audit && explained.sides[1].verdict == "denied",
        "{explained:?}"
    );
    Ok(())
}

#[test]
fn explain_and_status_say_fail_closed_when_the_policy_does_not_fit_and_the_datapath_agrees()
-> Result<()> {
    let scene = scene(331)?;
    let (topo, ns) = (&scene.node.topo, &scene.node.ns);
    let (head, worker) = (topo.pod("head"), topo.pod("worker"));
    let _head_tcp = head.serve_tcp(8000)?;
    // Room for two policy rows: the cluster's rows do not fit.
    let agent = Agent::start(&AgentOptions {
        node: topo.node(0),
        node_name: NODE,
        manifests: &scene.manifests.dir,
        bpffs: &scene.bpffs.path,
        cgroup_root: scene.node.kubelet.root.path(),
        kubeconfig: None,
        extra_args: &["--max-policy", "2"],
    })?;
    agent.wait_log(&["endpoint attached", "/head"], Duration::from_secs(20))?;
    // Admission holds the cluster before anything is written (runtime/capacity.rs).
    agent.wait_log(
        &["RayCluster does not fit", "/rc", "RF_POLICY_V1"],
        Duration::from_secs(10),
    )?;

    // The engine alone would allow worker -> head (same RayCluster); the datapath
    // drops it, and explain says so, and why.
    assert_eq!(worker.tcp_connect(v4(head), 8000, SHORT), Outcome::Timeout);
    // This agent logs text (the default) into a file: the flow event is a line of
    // its own, and there is no colour.
    agent.wait_log(
        &[
            "rayfence::flows",
            "flow dropped",
            "reason=fail-closed",
            "dst_name=head",
        ],
        Duration::from_secs(5),
    )?;
    ensure!(
        !agent.log_text().contains('\x1b'),
        "colour in a file:\n{}",
        agent.log_text()
    );
    let report: ExplainReport = explained(
        &agent,
        &scene,
        &[
            "explain",
            "--json",
            "--from",
            &format!("{ns}/worker"),
            "--to",
            &format!("{ns}/head:8000"),
        ],
    )?;
    assert_eq!(report.verdict, "denied", "{report:?}");
    ensure!(
        report
            .sides
            .iter()
            .any(|s| s.verdict == "denied" && s.because.contains("fail-closed")),
        "{report:?}"
    );
    let status: StatusReport = command_json(&agent, &scene, &["status", "--json"])?;
    let head_status = endpoint(&status, "head")?;
    assert_eq!(head_status.mode, "fail-closed");
    Ok(())
}
