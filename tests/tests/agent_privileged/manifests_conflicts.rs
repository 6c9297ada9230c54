//! End to end: conflicting and unreadable copies of one RayCluster in the manifests
//! source never open its pods, in either file order, with real packets: an outsider
//! probes the isolated head while an open copy of its RayCluster appears in another
//! file (`zz-*` after the closed `00-*`, and `00-*` before a closed `zz-*`), while
//! the closed copy turns unreadable (`kind: 5`), and when both copies are there from
//! the start. The open copy alone does open the head (so each check can fail).
//!
//! Needs root. Own topology, bpffs, manifests and kubelet cgroup tree per test.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;
use rayfence_tests::probe::wait_outcome;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const PROBE: Duration = Duration::from_millis(150);
/// Long enough for several rescans of the directory (inotify wakes it in tens of
/// milliseconds; the periodic rescan is every 2 s).
const HOLD: Duration = Duration::from_millis(2500);

fn closed(ns: &str) -> Value {
    raycluster(ns, "rc", json!({"mode": "DenyAll"}))
}

/// Every ingress allowed to the head: the reading that must never win a conflict.
fn open(ns: &str) -> Value {
    raycluster(
        ns,
        "rc",
        json!({"mode": "DenyAllIngress", "head": {"ingressRules": [{}]}}),
    )
}

struct Lab {
    // Field order is drop order: the agent is killed first, so it does not unpin
    // the links of pods whose manifests go while `rayfence cleanup` removes them.
    agent: Agent,
    sim: SimNode,
    manifests: Manifests,
    _bpffs: Bpffs,
    _server: rayfence_tests::Server,
}

impl Lab {
    /// A head (serving 8000) and an outsider; the files `initial` gives for the
    /// pods' namespace written before the agent starts.
    fn start(first_uid: u32, initial: &dyn Fn(&str) -> Vec<(&'static str, Value)>) -> Result<Self> {
        let sim = SimNode::new(&["head", "outsider"], first_uid)?;
        let ns = sim.ns.clone();
        let server = sim.topo.pod("head").serve_tcp(8000)?;
        let manifests = Manifests::new()?;
        manifests.write(
            "base.yaml",
            &[
                namespace(&ns),
                node_object(NODE, sim.topo.node(0)),
                pod_object(
                    &ns,
                    sim.topo.pod("head"),
                    &sim.uids[0],
                    NODE,
                    &head_labels("rc"),
                ),
                pod_object(
                    &ns,
                    sim.topo.pod("outsider"),
                    &sim.uids[1],
                    NODE,
                    &[("app", "x")],
                ),
            ],
        )?;
        for (name, doc) in initial(&ns) {
            manifests.write(name, &[doc])?;
        }
        let bpffs = Bpffs::new();
        let agent = sim.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
        Ok(Lab {
            sim,
            manifests,
            _bpffs: bpffs,
            agent,
            _server: server,
        })
    }

    fn ns(&self) -> String {
        self.sim.ns.clone()
    }

    fn knock(&self) -> rayfence_tests::Outcome {
        let head = self.sim.topo.pod("head");
        self.sim
            .topo
            .pod("outsider")
            .tcp_connect(v4(head), 8000, PROBE)
    }

    fn wait_closed(&self, what: &str) -> Result<()> {
        wait_outcome(what, Duration::from_secs(5), || self.knock(), false)?;
        Ok(())
    }

    /// Probes for `HOLD`: never through.
    fn stays_closed(&self, what: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut probes = 0;
        while t0.elapsed() < HOLD {
            let outcome = self.knock();
            ensure!(
                outcome.is_blocked(),
                "{what}: the outsider got through ({outcome:?}) after {:?}",
                t0.elapsed()
            );
            probes += 1;
        }
        ensure!(probes >= 5, "{what}: only {probes} probes");
        Ok(())
    }
}

fn conflict_never_opens(first_uid: u32, closed_file: &str, open_file: &str) -> Result<()> {
    let lab = Lab::start(first_uid, &|_| Vec::new())?;
    let ns = lab.ns();
    lab.manifests.write(closed_file, &[closed(&ns)])?;
    lab.wait_closed("the closed copy alone")?;

    // An open copy in another file: reported naming both, never applied.
    lab.manifests.write(open_file, &[open(&ns)])?;
    lab.agent.wait_log(
        &["conflicting copies", closed_file, open_file, "kept"],
        Duration::from_secs(5),
    )?;
    lab.stays_closed(&format!("open copy in {open_file}"))?;

    // The closed copy turns unreadable (kind not a string) and open: its last good
    // version stays.
    let mut broken = open(&ns);
    broken["kind"] = json!(5);
    lab.manifests.write(closed_file, &[broken])?;
    lab.agent.wait_log(
        &["manifest not read", closed_file, "kind"],
        Duration::from_secs(5),
    )?;
    lab.stays_closed(&format!("unreadable copy in {closed_file}"))?;

    // Only the open copy left: it is read as written, and opens the head.
    std::fs::remove_file(lab.manifests.dir.join(closed_file))?;
    wait_outcome(
        "the open copy alone",
        Duration::from_secs(5),
        || lab.knock(),
        true,
    )?;
    Ok(())
}

#[test]
fn an_open_copy_in_a_later_file_never_opens_the_pods() -> Result<()> {
    conflict_never_opens(800, "00-rc.yaml", "zz-copy.yaml")
}

#[test]
fn an_open_copy_in_an_earlier_file_never_opens_the_pods() -> Result<()> {
    conflict_never_opens(810, "zz-rc.yaml", "00-copy.yaml")
}

#[test]
fn copies_that_conflict_from_the_start_isolate_the_pods() -> Result<()> {
    // Two open copies, each allowing the outsider in, one wider than the other.
    let narrower = |ns: &str| {
        let mut v = open(ns);
        v["spec"]["networkPolicy"]["head"]["ingressRules"] = json!([{"ports": [{"port": 8000}]}]);
        v
    };
    let lab = Lab::start(820, &|ns| {
        vec![("00-a.yaml", open(ns)), ("zz-b.yaml", narrower(ns))]
    })?;
    lab.agent.wait_log(
        &["conflicting copies", "00-a.yaml", "zz-b.yaml", "strictest"],
        Duration::from_secs(5),
    )?;
    lab.wait_closed("no copy in force before: DenyAll")?;
    lab.stays_closed("both copies present")?;
    // Either copy alone opens the head.
    std::fs::remove_file(lab.manifests.dir.join("00-a.yaml"))?;
    wait_outcome(
        "the narrower copy alone",
        Duration::from_secs(5),
        || lab.knock(),
        true,
    )?;
    Ok(())
}
