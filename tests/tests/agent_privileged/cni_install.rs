//! The chained CNI plugin's installation on a simulated node's CNI directories (temp
//! directories laid out as k3s lays out its own): the real `rayfence cni install` /
//! `uninstall` and `rayfence cleanup` binaries, and the real `rayfence agent`, which
//! installs once its datapath is pinned, puts the entry back within milliseconds
//! when the primary CNI rewrites its file (as flannel and k3s do at start), and
//! leaves it in place when it stops. The node's own /etc/cni and /opt/cni are
//! never touched. Needs root for the agent case.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::agent::{Agent, Bpffs, Manifests, SimNode, rayfence_bin};
use rayfence_tests::objects::json::{namespace, node_object};
use serde_json::{Value, json};

const NODE: &str = "node-a";

/// What k3s writes to agent/etc/cni/net.d/10-flannel.conflist (keys as k3s orders
/// them: name before cniVersion).
const K3S_FLANNEL: &str = r#"{
  "name":"cbr0",
  "cniVersion":"1.0.0",
  "plugins":[
    {
      "type":"flannel",
      "delegate":{
        "hairpinMode":true,
        "forceAddress":true,
        "isDefaultGateway":true
      }
    },
    {
      "type":"portmap",
      "capabilities":{
        "portMappings":true
      }
    },
    {
      "type":"bandwidth",
      "capabilities":{
        "bandwidth":true
      }
    }
  ]
}
"#;

/// A k3s node's CNI directories under a temp root, removed on drop (also on panic).
struct K3sNode {
    root: PathBuf,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    conflist: PathBuf,
    /// A stand-in for the rayfence-cni build (only its bytes are checked here).
    plugin: PathBuf,
}

impl K3sNode {
    fn new(under: &Path) -> Result<Self> {
        let root = under.join(rayfence_tests::names::unique_name("cni-node"));
        let conf_dir = root.join("var/lib/rancher/k3s/agent/etc/cni/net.d");
        let bin_dir = root.join("var/lib/rancher/k3s/data/current/bin");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(&bin_dir)?;
        for tool in ["flannel", "portmap", "bandwidth", "host-local", "loopback"] {
            std::fs::write(bin_dir.join(tool), tool)?;
        }
        let conflist = conf_dir.join("10-flannel.conflist");
        std::fs::write(&conflist, K3S_FLANNEL)?;
        let plugin = root.join("rayfence-cni-build");
        std::fs::write(&plugin, format!("\x7fELF rayfence-cni {}", root.display()))?;
        Ok(K3sNode {
            root,
            conf_dir,
            bin_dir,
            conflist,
            plugin,
        })
    }

    fn dirs(&self) -> Vec<String> {
        vec![
            "--cni-conf-dir".into(),
            self.conf_dir.display().to_string(),
            "--cni-bin-dir".into(),
            self.bin_dir.display().to_string(),
        ]
    }

    fn conflist_json(&self) -> Result<Value> {
        let text = std::fs::read_to_string(&self.conflist)?;
        serde_json::from_str(&text).with_context(|| format!("{}:\n{text}", self.conflist.display()))
    }

    fn plugin_types(&self) -> Result<Vec<String>> {
        Ok(self.conflist_json()?["plugins"]
            .as_array()
            .context("plugins")?
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// The entry's bpffs, `None` while there is no entry.
    fn entry(&self) -> Option<String> {
        let doc = self.conflist_json().ok()?;
        doc["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["type"] == "rayfence-cni")
            .map(|p| p["bpffs"].as_str().unwrap_or_default().to_owned())
    }

    fn installed_binary(&self) -> Option<Vec<u8>> {
        std::fs::read(self.bin_dir.join("rayfence-cni")).ok()
    }
}

impl Drop for K3sNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `rayfence ARGS`: (exit code, stdout, stderr).
fn rayfence(bin: &Path, args: &[String]) -> Result<(i32, String, String)> {
    let out = Command::new(bin).args(args).env_clear().output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn args(words: &[&str], more: &[String]) -> Vec<String> {
    words
        .iter()
        .map(|w| (*w).to_owned())
        .chain(more.iter().cloned())
        .collect()
}

#[test]
fn install_and_uninstall_change_only_the_plugin_and_are_idempotent() -> Result<()> {
    let bin = rayfence_bin()?;
    let node = K3sNode::new(&std::env::temp_dir())?;
    let original = node.conflist_json()?;
    let install = args(
        &[
            "cni",
            "install",
            "--bpffs",
            "/sys/fs/bpf/rayfence",
            "--plugin-binary",
        ],
        &[vec![node.plugin.display().to_string()], node.dirs()].concat(),
    );

    let (code, out, err) = rayfence(&bin, &install)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rayfence-cni added to") && out.contains("binary copied"),
        "{out}"
    );
    assert_eq!(
        node.plugin_types()?,
        ["flannel", "portmap", "bandwidth", "rayfence-cni"]
    );
    assert_eq!(node.entry().as_deref(), Some("/sys/fs/bpf/rayfence"));
    // Everything else as it was, k3s's key order included.
    let mut expected = original.clone();
    expected["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(json!({"type": "rayfence-cni", "bpffs": "/sys/fs/bpf/rayfence"}));
    assert_eq!(node.conflist_json()?, expected);
    let text = std::fs::read_to_string(&node.conflist)?;
    assert!(
        text.find("\"name\"") < text.find("\"cniVersion\""),
        "{text}"
    );
    assert_eq!(node.installed_binary(), Some(std::fs::read(&node.plugin)?));

    // Again: nothing written (the same inodes: no rename happened).
    let inodes = |n: &K3sNode| -> Result<(u64, u64)> {
        Ok((
            std::fs::metadata(&n.conflist)?.ino(),
            std::fs::metadata(n.bin_dir.join("rayfence-cni"))?.ino(),
        ))
    };
    let before = inodes(&node)?;
    let (code, out, err) = rayfence(&bin, &install)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("already in") && out.contains("binary unchanged"),
        "{out}"
    );
    assert_eq!(inodes(&node)?, before);

    // Uninstall: back to k3s's own file, the other plugins' binaries kept.
    let uninstall = args(&["cni", "uninstall"], &node.dirs());
    let (code, out, err) = rayfence(&bin, &uninstall)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rayfence-cni removed from") && out.contains("binary removed"),
        "{out}"
    );
    assert_eq!(node.conflist_json()?, original);
    assert_eq!(node.installed_binary(), None);
    for tool in ["flannel", "portmap", "bandwidth", "host-local", "loopback"] {
        assert!(node.bin_dir.join(tool).exists(), "{tool}");
    }
    let (code, out, err) = rayfence(&bin, &uninstall)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("no rayfence-cni entry") && out.contains("binary not there"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_malformed_configuration_is_named_and_never_rewritten() -> Result<()> {
    let bin = rayfence_bin()?;
    let node = K3sNode::new(&std::env::temp_dir())?;
    // Half a file, as a CNI writing in place leaves it for a moment.
    let half = &K3S_FLANNEL[..K3S_FLANNEL.len() / 2];
    std::fs::write(&node.conflist, half)?;
    let install = args(
        &["cni", "install", "--plugin-binary"],
        &[vec![node.plugin.display().to_string()], node.dirs()].concat(),
    );
    let (code, _, err) = rayfence(&bin, &install)?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&node.conflist.display().to_string()), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    assert_eq!(std::fs::read_to_string(&node.conflist)?, half);
    assert_eq!(node.installed_binary(), None, "nothing half-installed");
    Ok(())
}

#[test]
fn the_default_plugin_binary_is_rayfence_cni_next_to_rayfence() -> Result<()> {
    let bin = rayfence_bin()?;
    // A hard link keeps the executable's own path (what the default is found
    // from) without copying it; the link must be on the same filesystem.
    let dir = bin
        .parent()
        .context("bin dir")?
        .join(rayfence_tests::names::unique_name("cni-image"));
    std::fs::create_dir_all(&dir)?;
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(dir.clone());
    let linked = dir.join("rayfence");
    std::fs::hard_link(&bin, &linked).or_else(|_| std::fs::copy(&bin, &linked).map(|_| ()))?;
    let node = K3sNode::new(&std::env::temp_dir())?;
    let install = args(&["cni", "install"], &node.dirs());

    let (code, _, err) = rayfence(&linked, &install)?;
    assert_eq!(code, 2, "no rayfence-cni beside it: {err}");
    assert!(
        err.contains(&dir.join("rayfence-cni").display().to_string()),
        "{err}"
    );
    assert_eq!(node.plugin_types()?, ["flannel", "portmap", "bandwidth"]);

    std::fs::write(dir.join("rayfence-cni"), b"the image's plugin")?;
    let (code, _, err) = rayfence(&linked, &install)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        node.installed_binary().as_deref(),
        Some(&b"the image's plugin"[..])
    );
    assert_eq!(node.entry().as_deref(), Some("/sys/fs/bpf/rayfence"));
    Ok(())
}

/// Waits until `f` holds; the time it took.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !f() {
        ensure!(t0.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t0.elapsed())
}

/// SIGTERM, then waits for the process to be gone (or a zombie).
fn terminate(agent: &mut Agent) -> Result<()> {
    let pid = agent.pid();
    // SAFETY: signalling our own child by pid.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGTERM) } == 0);
    wait_for("exit on SIGTERM", Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))
    })?;
    agent.kill(); // reaps
    Ok(())
}

#[test]
fn the_agent_installs_once_pinned_reinstalls_after_a_cni_rewrite_and_leaves_it_when_it_stops()
-> Result<()> {
    let bin = rayfence_bin()?;
    let sim = SimNode::new(&["pod"], 0x5c01)?;
    let manifests = Manifests::new()?;
    manifests.write(
        "base.yaml",
        &[namespace(&sim.ns), node_object(NODE, sim.topo.node(0))],
    )?;
    let bpffs = Bpffs::new();
    let node = K3sNode::new(&std::env::temp_dir())?;
    let plugin = node.plugin.display().to_string();
    let mut extra: Vec<String> = node.dirs();
    extra.extend(["--cni-plugin-binary".to_owned(), plugin]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut agent = sim.start_agent(NODE, &manifests.dir, &bpffs, &extra)?;

    // Installed, pointing at the agent's pins (--cni-bpffs defaults to --bpffs),
    // which exist by then.
    let bpffs_text = bpffs.path.display().to_string();
    wait_for("the entry", Duration::from_secs(5), || {
        node.entry().as_deref() == Some(bpffs_text.as_str())
    })?;
    let pinned = std::fs::read_dir(bpffs.path.join("maps"))?.count();
    assert!(pinned > 0, "the entry points at pinned maps");
    assert_eq!(
        node.plugin_types()?,
        ["flannel", "portmap", "bandwidth", "rayfence-cni"]
    );
    assert_eq!(node.installed_binary(), Some(std::fs::read(&node.plugin)?));

    // The primary CNI rewrites its file without the entry: k3s and flannel write
    // in place (truncate + write), other tools rename a new file over it.
    let mut gaps = Vec::new();
    for round in 0..10 {
        let t0 = Instant::now();
        if round % 2 == 0 {
            std::fs::write(&node.conflist, K3S_FLANNEL)?;
        } else {
            let tmp = node.conf_dir.join(".10-flannel.conflist.new");
            std::fs::write(&tmp, K3S_FLANNEL)?;
            std::fs::rename(&tmp, &node.conflist)?;
        }
        // Well under the 10 s recheck: the inotify watch put it back.
        wait_for("the entry back", Duration::from_secs(3), || {
            node.entry().as_deref() == Some(bpffs_text.as_str())
        })?;
        gaps.push(t0.elapsed());
    }
    gaps.sort();
    eprintln!(
        "entry back after a rewrite: median {:?}, max {:?} (10 rewrites)",
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    assert_eq!(
        node.plugin_types()?,
        ["flannel", "portmap", "bandwidth", "rayfence-cni"],
        "one entry, last"
    );

    // A clean stop leaves the plugin: the guard must hold while the agent is away.
    terminate(&mut agent)?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(node.entry().as_deref(), Some(bpffs_text.as_str()));
    assert!(node.installed_binary().is_some());

    // `rayfence cleanup` with the CNI directories removes both, before the pins.
    let cleanup = args(&["cleanup", "--bpffs", &bpffs_text], &node.dirs());
    let (code, out, err) = rayfence(&bin, &cleanup)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rayfence-cni removed from"), "{out}");
    assert_eq!(node.entry(), None);
    assert_eq!(node.installed_binary(), None);
    assert_eq!(node.plugin_types()?, ["flannel", "portmap", "bandwidth"]);
    Ok(())
}
