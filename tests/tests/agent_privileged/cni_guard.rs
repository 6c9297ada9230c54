//! The CNI guard end to end: the real `rayfence-cni` binary run the way a runtime runs
//! a chained plugin (in the node's namespace, CNI_* in the environment, the network
//! configuration with a `prevResult` on stdin) right after the pod's veth is made,
//! with an outsider knocking on the new pod continuously, while the agent is
//! SIGKILLed, SIGSTOPped, replaced by one with other map sizes, or does not know the
//! Pod object yet. In each: no outsider
//! packet reaches the pod once the plugin has returned, the node (as the kubelet)
//! reaches it, and within a second of the agent being back (or the Pod object
//! arriving) it has its real policy. A pod of a namespace that is not guarded is
//! never held.
//!
//! Kubelet order, as on a real node: pod cgroup, sandbox network (veth, addresses),
//! CNI ADD (the plugin chained last), then the containers (here: the servers, in
//! the pod cgroup). What runs before the plugin returns is the sandbox alone, with
//! nothing listening; probes are judged from the plugin's return on.
//!
//! Needs root, like `runtime`.

use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence::datapath::guard;
use rayfence_tests::agent::*;
use rayfence_tests::agent_bin::rayfence_cni_bin;
use rayfence_tests::background::Background;
use rayfence_tests::objects::json::*;
use rayfence_tests::{Node, Outcome, Pod, Prober};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);
const PORT: u16 = 8080;

/// The plugin's ADD (or DEL) for `pod` of namespace `ns`; its exit status and stdout.
pub(crate) fn cni(
    command: &str,
    node: &Node,
    pod: &Pod,
    ns: &str,
    bpffs: &Path,
) -> Result<(bool, Value)> {
    let netns = pod.netns.path();
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "rayfence-cni",
        "bpffs": bpffs,
        "prevResult": prev_result(pod),
    });
    let bin = rayfence_cni_bin()?;
    let mut child = node
        .netns
        .cmd(bin.to_str().context("utf-8 path")?)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{}", pod.name))
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", &pod.pod_if)
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=ctr",
                pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running rayfence-cni")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(config.to_string().as_bytes())?;
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let printed: Value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).with_context(|| format!("plugin stdout {stdout:?}"))?
    };
    Ok((output.status.success(), printed))
}

/// What the bridge plugin would have returned for `pod`: the bridge and the host
/// veth without a sandbox, the pod's interface with one.
fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "02:00:00:00:00:01"},
            {"name": pod.host_if, "mac": "02:00:00:00:00:02"},
            {"name": pod.pod_if, "mac": "02:00:00:00:00:03", "sandbox": pod.netns.path()},
        ],
        "ips": [{"address": format!("{}/24", pod.ip4), "interface": 2, "gateway": "10.244.0.1"}],
    })
}

/// Outsider probes of `addr:port`, each with when it started (test clock).
type Probes = Vec<(Instant, Outcome)>;

fn knock(prober: Prober, addr: IpAddr) -> Background<Probes> {
    Background::start(move |flag| {
        let mut seen = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let at = Instant::now();
            let outcome = prober.tcp_connect(addr, PORT, Duration::from_millis(100));
            seen.push((at, outcome));
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    })
}

/// Probes started at or after `from` that reached the pod (an answer of any kind,
/// a refusal included: only a silent drop keeps a packet out).
fn reached_after(probes: &Probes, from: Instant) -> (usize, Vec<Outcome>) {
    let judged: Vec<&(Instant, Outcome)> = probes.iter().filter(|(at, _)| *at >= from).collect();
    let reached = judged
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Ok | Outcome::Refused | Outcome::Reset))
        .map(|(_, o)| o.clone())
        .collect();
    (judged.len(), reached)
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        ensure!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(t0.elapsed())
}

/// The new worker's Pod object (the third pod of node 0: `10.244.0.12`).
fn worker_doc(ns: &str, pod: &Pod, uid: &str) -> Value {
    pod_object(ns, pod, uid, NODE, &worker_labels("rc"))
}

/// A node with the head (programmed) and an outsider, the manifests for them and
/// the RayCluster, and a running agent.
struct Lab {
    // Field order is drop order: the agent is killed first, so it does not unpin
    // the links of pods whose manifests go while `rayfence cleanup` removes them.
    agent: Agent,
    node: SimNode,
    manifests: Manifests,
    bpffs: Bpffs,
    docs: Vec<Value>,
    _head_tcp: rayfence_tests::Server,
}

impl Lab {
    fn new(first_uid: u32) -> Result<Self> {
        let node = SimNode::new(&["head", "outsider"], first_uid)?;
        let (topo, ns, uids) = (&node.topo, &node.ns, &node.uids);
        let head_tcp = topo.pod("head").serve_tcp(PORT)?;
        let docs = vec![
            namespace(ns),
            node_object(NODE, topo.node(0)),
            pod_object(ns, topo.pod("head"), &uids[0], NODE, &head_labels("rc")),
            raycluster(ns, "rc", json!({"mode": "DenyAll"})),
        ];
        let manifests = Manifests::new()?;
        manifests.write("all.yaml", &docs)?;
        let bpffs = Bpffs::new();
        let agent = node.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
        agent.wait_log(
            &["namespaces whose new pods the CNI plugin guards", ns],
            Duration::from_secs(5),
        )?;
        Ok(Lab {
            node,
            manifests,
            bpffs,
            docs,
            agent,
            _head_tcp: head_tcp,
        })
    }

    fn start_agent(&mut self) -> Result<()> {
        self.start_agent_with(&[])
    }

    fn start_agent_with(&mut self, args: &[&str]) -> Result<()> {
        self.agent = self
            .node
            .start_agent(NODE, &self.manifests.dir, &self.bpffs, args)?;
        Ok(())
    }

    fn write_worker(&mut self, uid: &str) -> Result<()> {
        let doc = worker_doc(&self.node.ns, self.node.topo.pod("worker"), uid);
        self.docs.push(doc);
        self.manifests.write("all.yaml", &self.docs)
    }

    /// Creates the worker the kubelet's way and runs the plugin's ADD; returns its
    /// sandbox processes and when the plugin returned.
    fn create_worker(&mut self, uid: &str) -> Result<(Vec<rayfence_tests::Server>, Instant)> {
        let ctr = self.node.kubelet.pod_cgroup(uid)?;
        self.node.topo.add_pod(0, "worker")?;
        let (ok, printed) = cni(
            "ADD",
            self.node.topo.node(0),
            self.node.topo.pod("worker"),
            &self.node.ns,
            &self.bpffs.path,
        )?;
        let returned = Instant::now();
        ensure!(ok, "ADD failed: {printed}");
        let worker = self.node.topo.pod("worker");
        ensure!(
            printed == prev_result(worker),
            "ADD changed the result: {printed}"
        );
        let pause = worker.prober_in(&ctr).serve_tcp(9)?;
        let server = worker.prober_in(&ctr).serve_tcp(PORT)?;
        Ok((vec![pause, server], returned))
    }

    /// The worker under its guard: only the node reaches it.
    fn assert_guarded(&self) -> Result<()> {
        let topo = &self.node.topo;
        let worker = topo.pod("worker");
        let state = guard::entry_state(&self.bpffs.path, worker.host_ifindex)?;
        ensure!(state == Some(true), "worker's veth entry: {state:?}");
        assert_eq!(
            topo.node(0).tcp_connect(v4(worker), PORT, SHORT),
            Outcome::Ok,
            "the node (kubelet) reaches a guarded pod"
        );
        assert_eq!(
            topo.pod("head").tcp_connect(v4(worker), PORT, SHORT),
            Outcome::Timeout,
            "even a peer of its own cluster waits for the policy"
        );
        Ok(())
    }

    /// Within a second of `since`, the worker has its real policy: the head (same
    /// RayCluster) reaches it, the outsider does not. Returns how long it took.
    fn real_policy_within_a_second(&self, since: Instant) -> Result<Duration> {
        let topo = &self.node.topo;
        let worker = topo.pod("worker");
        eventually(
            "the head reaches the worker",
            Duration::from_secs(5),
            || {
                topo.pod("head")
                    .tcp_connect(v4(worker), PORT, Duration::from_millis(50))
                    == Outcome::Ok
            },
        )
        .with_context(|| self.agent.log_text())?;
        let took = since.elapsed();
        ensure!(
            took < Duration::from_secs(1),
            "real policy {took:?} after; log:\n{}",
            self.agent.log_text()
        );
        assert_eq!(
            topo.pod("outsider").tcp_connect(v4(worker), PORT, SHORT),
            Outcome::Timeout
        );
        let state = guard::entry_state(&self.bpffs.path, worker.host_ifindex)?;
        ensure!(state == Some(false), "worker's veth entry: {state:?}");
        Ok(took)
    }
}

fn ensure_no_outsider_reached(probes: &Probes, from: Instant) -> Result<()> {
    let (judged, reached) = reached_after(probes, from);
    println!("outsider probes after the plugin returned: {judged}, reached: {reached:?}");
    ensure!(judged >= 10, "too few probes ({judged})");
    ensure!(
        reached.is_empty(),
        "the outsider reached the new pod: {reached:?}"
    );
    Ok(())
}

#[test]
fn a_pod_created_while_the_agent_is_killed_is_closed_until_it_is_back() -> Result<()> {
    let mut lab = Lab::new(61)?;
    let worker_uid = uid(63);
    let outsider = lab.node.topo.pod("outsider").prober();
    let probes = knock(outsider, "10.244.0.12".parse()?);

    lab.agent.kill();
    let (_worker_procs, returned) = lab.create_worker(&worker_uid)?;
    lab.write_worker(&worker_uid)?;
    lab.assert_guarded()?;

    // Meanwhile a plain pod of a namespace that is not guarded: never held.
    let other_ns = format!("other-{}", lab.node.topo.tag());
    let plain = lab.node.topo.add_pod(0, "plain")?.name.clone();
    let (ok, printed) = cni(
        "ADD",
        lab.node.topo.node(0),
        lab.node.topo.pod(&plain),
        &other_ns,
        &lab.bpffs.path,
    )?;
    ensure!(ok, "ADD of the plain pod failed: {printed}");
    let plain = lab.node.topo.pod(&plain);
    ensure!(guard::entry_state(&lab.bpffs.path, plain.host_ifindex)?.is_none());
    let _plain_tcp = plain.serve_tcp(PORT)?;
    assert_eq!(
        lab.node
            .topo
            .pod("outsider")
            .tcp_connect(v4(plain), PORT, SHORT),
        Outcome::Ok,
        "a pod of an unguarded namespace is open to the outsider"
    );

    std::thread::sleep(Duration::from_millis(1500));
    lab.start_agent()?;
    let ready = Instant::now();
    let took = lab.real_policy_within_a_second(ready)?;
    println!("killed agent: real policy {took:?} after the new agent was ready");
    std::thread::sleep(Duration::from_millis(300));
    ensure_no_outsider_reached(&probes.finish(), returned)?;
    // DEL leaves the agent's entry alone.
    let (ok, _) = cni(
        "DEL",
        lab.node.topo.node(0),
        lab.node.topo.pod("worker"),
        &lab.node.ns,
        &lab.bpffs.path,
    )?;
    ensure!(ok);
    let worker = lab.node.topo.pod("worker");
    ensure!(guard::entry_state(&lab.bpffs.path, worker.host_ifindex)? == Some(false));
    Ok(())
}

#[test]
fn a_pod_created_while_the_agent_is_stopped_is_closed_until_it_resumes() -> Result<()> {
    let mut lab = Lab::new(71)?;
    let worker_uid = uid(73);
    let outsider = lab.node.topo.pod("outsider").prober();
    let probes = knock(outsider, "10.244.0.12".parse()?);
    let pid = lab.agent.pid() as libc::pid_t;

    // SAFETY: signals to the agent child this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = (|| -> Result<_> {
        let (procs, returned) = lab.create_worker(&worker_uid)?;
        lab.write_worker(&worker_uid)?;
        lab.assert_guarded()?;
        std::thread::sleep(Duration::from_millis(1500));
        Ok((procs, returned))
    })();
    // SAFETY: as above; resumed whatever happened.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (_worker_procs, returned) = stopped?;
    let resumed = Instant::now();
    let took = lab.real_policy_within_a_second(resumed)?;
    println!("stopped agent: real policy {took:?} after SIGCONT");
    std::thread::sleep(Duration::from_millis(300));
    ensure_no_outsider_reached(&probes.finish(), returned)?;
    Ok(())
}

#[test]
fn a_sandbox_up_before_its_pod_object_is_closed_until_the_object_arrives() -> Result<()> {
    let node = SimNode::new(&["head", "outsider"], 81)?;
    let worker_uid = uid(83);
    let (_rt, server) = fake_api_in(node.topo.node(0))?;
    server.install_crd("ray.io", "v1", "rayclusters");
    server.apply(&namespace(&node.ns));
    server.apply(&node_object(NODE, node.topo.node(0)));
    server.apply(&pod_object(
        &node.ns,
        node.topo.pod("head"),
        &node.uids[0],
        NODE,
        &head_labels("rc"),
    ));
    server.apply(&raycluster(&node.ns, "rc", json!({"mode": "DenyAll"})));
    let manifests = Manifests::new()?;
    let kubeconfig = manifests.write_kubeconfig(&server)?;
    let bpffs = Bpffs::new();
    let agent = node.start_agent_on_api(NODE, &kubeconfig, &bpffs, &[])?;
    agent.wait_log(
        &["namespaces whose new pods the CNI plugin guards", &node.ns],
        Duration::from_secs(5),
    )?;
    let _head_tcp = node.topo.pod("head").serve_tcp(PORT)?;
    let mut lab = Lab {
        docs: Vec::new(),
        agent,
        bpffs,
        manifests,
        node,
        _head_tcp,
    };
    let outsider = lab.node.topo.pod("outsider").prober();
    let probes = knock(outsider, "10.244.0.12".parse()?);

    let (_worker_procs, returned) = lab.create_worker(&worker_uid)?;
    lab.assert_guarded()?;
    // The agent sees the guard and says so: status and metrics.
    eventually("the guard is reported", Duration::from_secs(3), || {
        lab.agent
            .http_get(lab.node.topo.node(0), "/metrics")
            .is_ok_and(|(_, m)| metric_sum(&m, "rayfence_endpoints_guarded", &[]) == 1.0)
    })?;
    let (ok, status, _) = lab.agent.command(lab.node.topo.node(0), &["status"])?;
    ensure!(ok, "status failed");
    let pending = format!("pending: {}/worker held by the CNI guard", lab.node.ns);
    ensure!(status.contains(&pending), "{status}");
    ensure!(status.contains("CNI guard: new pods in"), "{status}");
    let (_, out, err) = lab.agent.command(
        lab.node.topo.node(0),
        &[
            "explain",
            "--from",
            &format!("{}/head", lab.node.ns),
            "--to",
            &format!("{}/worker:{PORT}/tcp", lab.node.ns),
        ],
    )?;
    let explained = format!("{out}{err}");
    ensure!(
        explained.contains("held by the CNI guard"),
        "explain: {explained}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    lab.assert_guarded()?;

    // The Pod object arrives: its policy within a second.
    let arrived = Instant::now();
    server.apply(&worker_doc(
        &lab.node.ns,
        lab.node.topo.pod("worker"),
        &worker_uid,
    ));
    let took = lab.real_policy_within_a_second(arrived)?;
    println!("sandbox before its Pod object: real policy {took:?} after the object arrived");
    std::thread::sleep(Duration::from_millis(300));
    ensure_no_outsider_reached(&probes.finish(), returned)?;
    let (_, metrics) = lab.agent.http_get(lab.node.topo.node(0), "/metrics")?;
    ensure!(
        metric_sum(&metrics, "rayfence_endpoints_guarded", &[]) == 0.0,
        "{metrics}"
    );
    let (p50, n) = histogram_quantile(&metrics, "rayfence_guard_wait_seconds", 0.5);
    println!("guard wait: {n} pods, p50 <= {p50:?} s");
    ensure!(n >= 1.0, "no guard wait observed: {metrics}");

    // A non-Ray pod of the guarded namespace is held only until the agent knows it:
    // then it is open, as without rayfence (the agent's entry, which isolates
    // nothing, replaced the guard).
    let plain_uid = uid(84);
    let plain_ctr = lab.node.kubelet.pod_cgroup(&plain_uid)?;
    lab.node.topo.add_pod(0, "plain")?;
    let (ok, printed) = cni(
        "ADD",
        lab.node.topo.node(0),
        lab.node.topo.pod("plain"),
        &lab.node.ns,
        &lab.bpffs.path,
    )?;
    ensure!(ok, "ADD of the plain pod failed: {printed}");
    let plain = lab.node.topo.pod("plain");
    let _plain_tcp = plain.prober_in(&plain_ctr).serve_tcp(PORT)?;
    ensure!(guard::entry_state(&lab.bpffs.path, plain.host_ifindex)? == Some(true));
    server.apply(&pod_object(
        &lab.node.ns,
        plain,
        &plain_uid,
        NODE,
        &[("app", "web")],
    ));
    let outsider = lab.node.topo.pod("outsider");
    let t = eventually("the plain pod is released", Duration::from_secs(3), || {
        outsider.tcp_connect(v4(plain), PORT, Duration::from_millis(50)) == Outcome::Ok
    })
    .with_context(|| lab.agent.log_text())?;
    println!("non-Ray pod of a guarded namespace: released {t:?} after its Pod object arrived");
    let state = guard::entry_state(&lab.bpffs.path, plain.host_ifindex)?;
    ensure!(state != Some(true), "still a guard: {state:?}");

    // A pod that should be guarded and cannot be (no veth to be found) fails the
    // ADD with a CNI error naming it, never passes open.
    let ghost = lab.node.topo.add_pod(0, "ghost")?.name.clone();
    let ghost = lab.node.topo.pod(&ghost);
    let bin = rayfence_cni_bin()?;
    let output = lab
        .node
        .topo
        .node(0)
        .netns
        .cmd(bin.to_str().context("utf-8 path")?)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "ctr-ghost")
        .env("CNI_NETNS", "/nonexistent/netns")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=ghost", lab.node.ns),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            let config = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "rayfence-cni",
                "bpffs": lab.bpffs.path, "prevResult": {"cniVersion": "1.0.0",
                "interfaces": [{"name": "no-such-veth"}], "ips": []}});
            child
                .stdin
                .take()
                .map(|mut s| s.write_all(config.to_string().as_bytes()))
                .transpose()?;
            child.wait_with_output()
        })?;
    ensure!(!output.status.success(), "an unguardable ADD succeeded");
    let error: Value = serde_json::from_slice(&output.stdout)?;
    ensure!(error["code"] == 11, "{error}");
    ensure!(
        error["msg"].as_str().is_some_and(|m| m.contains("ghost")),
        "{error}"
    );
    ensure!(guard::entry_state(&lab.bpffs.path, ghost.host_ifindex)?.is_none());
    Ok(())
}

#[test]
fn a_restart_with_the_same_map_sizes_keeps_the_guard() -> Result<()> {
    let mut lab = Lab::new(91)?;
    let worker_uid = uid(93);
    let outsider = lab.node.topo.pod("outsider").prober();
    let probes = knock(outsider, "10.244.0.12".parse()?);
    // Guarded while the agent runs without the Pod object, then restarted (same
    // sizes) still without it: the new agent neither adopts nor drops the guard.
    let (_worker_procs, returned) = lab.create_worker(&worker_uid)?;
    lab.assert_guarded()?;
    lab.agent.kill();
    lab.start_agent()?;
    std::thread::sleep(Duration::from_millis(1000));
    lab.assert_guarded()?;
    let arrived = Instant::now();
    lab.write_worker(&worker_uid)?;
    let took = lab.real_policy_within_a_second(arrived)?;
    println!("restarted agent: real policy {took:?} after the Pod object arrived");
    std::thread::sleep(Duration::from_millis(300));
    ensure_no_outsider_reached(&probes.finish(), returned)?;
    Ok(())
}

#[test]
fn an_upgrade_that_resizes_the_maps_keeps_the_guard() -> Result<()> {
    let mut lab = Lab::new(101)?;
    let worker_uid = uid(103);
    let outsider = lab.node.topo.pod("outsider").prober();
    let probes = knock(outsider, "10.244.0.12".parse()?);
    // Guarded while the agent is down; the next agent has other map sizes (an
    // upgrade that changes a default, or a resize), so it migrates the pinned maps
    // the guard lives in, still without the Pod object.
    lab.agent.kill();
    let (_worker_procs, returned) = lab.create_worker(&worker_uid)?;
    lab.assert_guarded()?;
    lab.start_agent_with(&["--max-endpoints", "8192", "--max-policy", "131072"])?;
    lab.agent
        .wait_log(&["RF_EP_TC_V1", "max_entries=8192"], Duration::from_secs(5))
        .context("the new agent migrated the endpoint map")?;
    std::thread::sleep(Duration::from_millis(500));
    lab.assert_guarded()?;
    let arrived = Instant::now();
    lab.write_worker(&worker_uid)?;
    let took = lab.real_policy_within_a_second(arrived)?;
    println!("resized agent: real policy {took:?} after the Pod object arrived");
    std::thread::sleep(Duration::from_millis(300));
    ensure_no_outsider_reached(&probes.finish(), returned)?;
    Ok(())
}
