//! End to end: `rayfence bundle` against a real agent on a simulated node writes a
//! `.tar.gz` that `tar` reads, with every part present and non-empty (status,
//! flows with the drop just made, metrics, map fill, versions, kernel facts, the
//! agent's own flags, its pins found through those flags, the CNI configuration),
//! to a file, to the default name and to stdout; and with no agent, the bundle is
//! still written and `errors.txt` names the socket.
//!
//! Needs root for the agent, like `observe`.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence::operator::wire::StatusReport;
use rayfence_tests::Outcome;
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;

const NODE: &str = "node-a";
const SHORT: Duration = Duration::from_millis(300);

/// Every file a bundle of a reachable agent holds, under its top directory.
const FILES: [&str; 17] = [
    "README.txt",
    "status.json",
    "flows.ndjson",
    "metrics.txt",
    "map-fill.txt",
    "version.txt",
    "agent/cmdline.txt",
    "agent/environment.txt",
    "kernel/version",
    "kernel/osrelease",
    "kernel/cmdline",
    "kernel/btf.txt",
    "kernel/mounts.txt",
    "bpffs.txt",
    "cni/listing.txt",
    "cni/10-flannel.conflist",
    "errors.txt",
];

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(role: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("rf-bundle-{role}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tar -tzf`: the archive's entries.
fn tar_list(archive: &Path) -> Result<Vec<String>> {
    let out = Command::new("tar").arg("-tzf").arg(archive).output()?;
    ensure!(
        out.status.success(),
        "tar -tzf {}: {}",
        archive.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `tar -xzf` into `into`; returns the one top directory the archive holds.
fn untar(archive: &Path, into: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(into)?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()?;
    ensure!(status.success(), "tar -xzf {}", archive.display());
    let mut tops: Vec<PathBuf> = std::fs::read_dir(into)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    ensure!(tops.len() == 1, "one top directory: {tops:?}");
    Ok(tops.remove(0))
}

fn read(dir: &Path, name: &str) -> Result<String> {
    std::fs::read_to_string(dir.join(name)).with_context(|| format!("{name} in the bundle"))
}

#[test]
fn a_bundle_of_a_running_agent_holds_every_part() -> Result<()> {
    let node = SimNode::new(&["head", "outsider"], 701)?;
    let manifests = Manifests::new()?;
    let (topo, ns) = (&node.topo, &node.ns);
    manifests.write(
        "base.yaml",
        &[
            namespace(ns),
            node_object(NODE, topo.node(0)),
            pod_object(
                ns,
                topo.pod("head"),
                &node.uids[0],
                NODE,
                &head_labels("rc"),
            ),
            pod_object(
                ns,
                topo.pod("outsider"),
                &node.uids[1],
                NODE,
                &[("app", "outsider")],
            ),
            raycluster(ns, "rc", serde_json::json!({"mode": "DenyAll"})),
        ],
    )?;
    let bpffs = Bpffs::new();
    let agent = node.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
    agent.wait_log(&["endpoint attached", "/head"], Duration::from_secs(10))?;

    // One dropped flow, so the flows part has a record.
    let (head, outsider) = (topo.pod("head"), topo.pod("outsider"));
    let _head_tcp = head.serve_tcp(8000)?;
    assert_eq!(
        outsider.tcp_connect(v4(head), 8000, SHORT),
        Outcome::Timeout
    );
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = agent.command(topo.node(0), &["flows", "-o", "json"])?;
        ensure!(ok, "rayfence flows: {err}");
        if out.contains("outsider") {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "no dropped flow listed: {out}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The node's CNI configuration, as flannel writes it with the plugin chained.
    let scratch = Scratch::new("agent")?;
    let cni = scratch.0.join("net.d");
    std::fs::create_dir_all(&cni)?;
    let conflist = r#"{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel"},{"type":"rayfence-cni","bpffs":"/sys/fs/bpf/rayfence"}]}"#;
    std::fs::write(cni.join("10-flannel.conflist"), conflist)?;
    let cni_arg = cni.to_str().context("utf-8")?;

    // To a file. No --bpffs: the pins are found through the running agent's flags.
    let archive = scratch.0.join("bundle.tar.gz");
    let (code, out, err) = agent.command_status(
        topo.node(0),
        &[
            "bundle",
            "--output",
            archive.to_str().context("utf-8")?,
            "--cni-conf-dir",
            cni_arg,
        ],
    )?;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("wrote the support bundle to") && !err.contains("warning"),
        "{err}"
    );
    assert!(
        err.contains("kubectl -n rayfence-system logs") && err.contains("share it with care"),
        "{err}"
    );

    let listed = tar_list(&archive)?;
    let top = untar(&archive, &scratch.0.join("x"))?;
    let top_name = top.file_name().and_then(|n| n.to_str()).context("name")?;
    assert!(
        top_name.starts_with(&format!("rayfence-bundle-{NODE}-")),
        "{top_name}"
    );
    for file in FILES {
        assert!(
            listed.contains(&format!("{top_name}/{file}")),
            "{file} not in {listed:?}"
        );
        let len = std::fs::metadata(top.join(file))?.len();
        assert!(len > 0, "{file} is empty");
    }
    assert_eq!(listed.len(), FILES.len(), "{listed:?}");

    assert_eq!(read(&top, "errors.txt")?, "Every part was collected.\n");
    let status: StatusReport = serde_json::from_str(&read(&top, "status.json")?)?;
    assert_eq!(status.node, NODE);
    assert!(status.ready);
    assert!(status.endpoints.iter().any(|e| e.pod == "head"));
    let flows = read(&top, "flows.ndjson")?;
    for line in flows.lines() {
        serde_json::from_str::<rayfence::operator::wire::FlowRecord>(line)
            .with_context(|| format!("a flow record: {line}"))?;
    }
    assert!(flows.contains("outsider"), "{flows}");
    let metrics = read(&top, "metrics.txt")?;
    assert!(metrics.contains("rayfence_map_capacity{"), "{metrics}");
    let fill = read(&top, "map-fill.txt")?;
    assert!(
        fill.lines()
            .any(|l| l.starts_with("policy ") && l.ends_with('%')),
        "{fill}"
    );
    let version = read(&top, "version.txt")?;
    assert!(version.contains("rayfence_build_info{"), "{version}");
    let cmdline = read(&top, "agent/cmdline.txt")?;
    assert!(
        cmdline
            .lines()
            .any(|l| l == bpffs.path.to_str().unwrap_or_default()),
        "{cmdline}"
    );
    let pins = read(&top, "bpffs.txt")?;
    assert!(
        pins.starts_with(&format!("{}:\n", bpffs.path.display())) && pins.contains("RF_POLICY_V1"),
        "{pins}"
    );
    assert_eq!(read(&top, "cni/10-flannel.conflist")?, conflist);
    let listing = read(&top, "cni/listing.txt")?;
    assert!(
        listing.contains("10-flannel.conflist chains rayfence-cni"),
        "{listing}"
    );
    let mounts = read(&top, "kernel/mounts.txt")?;
    assert!(
        mounts.contains(" - bpf ") && mounts.contains(" - cgroup2 "),
        "{mounts}"
    );
    assert!(read(&top, "README.txt")?.contains("share it with care"));

    // The default name, in the current directory.
    let here = scratch.0.join("here");
    std::fs::create_dir_all(&here)?;
    let bin = rayfence_bin()?;
    let output = topo
        .node(0)
        .netns
        .cmd(bin.to_str().context("utf-8")?)
        .args(["bundle", "--cni-conf-dir", cni_arg])
        .env("RAYFENCE_API_SOCKET", &agent.socket)
        .current_dir(&here)
        .stdin(Stdio::null())
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written: Vec<String> = std::fs::read_dir(&here)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(
        written.len() == 1
            && written[0].starts_with(&format!("rayfence-bundle-{NODE}-"))
            && written[0].ends_with("Z.tar.gz"),
        "{written:?}"
    );
    ensure!(tar_list(&here.join(&written[0]))?.len() == FILES.len());

    // To stdout: the archive and nothing else.
    let output = topo
        .node(0)
        .netns
        .cmd(bin.to_str().context("utf-8")?)
        .args(["bundle", "--output", "-", "--cni-conf-dir", cni_arg])
        .env("RAYFENCE_API_SOCKET", &agent.socket)
        .stdin(Stdio::null())
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let piped = scratch.0.join("piped.tgz");
    std::fs::write(&piped, &output.stdout)?;
    let listed = tar_list(&piped)?;
    assert_eq!(listed.len(), FILES.len(), "{listed:?}");
    Ok(())
}

#[test]
fn without_an_agent_the_bundle_is_still_written_and_names_the_socket() -> Result<()> {
    let scratch = Scratch::new("no-agent")?;
    let socket = scratch.0.join("agent.sock");
    let socket = socket.to_str().context("utf-8")?;
    let archive = scratch.0.join("bundle.tgz");
    let output = Command::new(rayfence_bin()?)
        .args([
            "bundle",
            "--socket",
            socket,
            "--node-name",
            "n1",
            "--output",
        ])
        .arg(&archive)
        .env_remove("RAYFENCE_API_SOCKET")
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: not collected")
            && err.contains("status.json")
            && err.contains("metrics.txt"),
        "{err}"
    );

    let top = untar(&archive, &scratch.0.join("x"))?;
    let top_name = top.file_name().and_then(|n| n.to_str()).context("name")?;
    assert!(top_name.starts_with("rayfence-bundle-n1-"), "{top_name}");
    let errors = read(&top, "errors.txt")?;
    for part in [
        "status.json",
        "flows.ndjson",
        "metrics.txt",
        "agent/cmdline.txt",
    ] {
        assert!(
            errors
                .lines()
                .any(|l| l.starts_with(&format!("{part}: ")) && l.contains(socket)),
            "{part} naming {socket}: {errors}"
        );
        assert!(!top.join(part).exists(), "{part} written without an agent");
    }
    for file in [
        "README.txt",
        "version.txt",
        "kernel/version",
        "kernel/mounts.txt",
    ] {
        assert!(std::fs::metadata(top.join(file))?.len() > 0, "{file}");
    }
    let version = read(&top, "version.txt")?;
    assert!(
        version.contains("unknown: its metrics were not collected"),
        "{version}"
    );
    Ok(())
}
