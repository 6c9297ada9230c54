//! The capabilities deploy/base grants are enough, and the bpf ones are each
//! needed: `rayfence agent` (manifests source, one Namespace, no pods: nothing is
//! attached) is started as uid 0 with its bounding set cut down by `setpriv` to
//! the DaemonSet's `capabilities.add`, and must load, pin and become ready; with
//! CAP_PERFMON or CAP_NET_ADMIN also taken away (and CAP_SYS_ADMIN, which the
//! kernel accepts in their place) it must fail to load its programs.
//!
//! And `rayfence cleanup` with the cleanup DaemonSet's capabilities removes the
//! pins an agent left. The CNI plugin's installation needs no capability more
//! (uid 0 owns the CNI directories; nothing overrides file permissions): the
//! agent installs it, and the cleanup removes it, with exactly those sets.
//!
//! Needs root and util-linux `setpriv`; mounts bpffs at /sys/fs/bpf when the
//! machine has none (the DaemonSet gets the host's).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rayfence_tests::deploy::*;

/// The DaemonSet's added capabilities, as setpriv names them (`+bpf`).
fn daemonset_caps() -> Result<Vec<String>> {
    let docs = kustomize("deploy/base")?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    Ok(
        agent_container(ds)["securityContext"]["capabilities"]["add"]
            .as_array()
            .context("add")?
            .iter()
            .map(|c| format!("+{}", c.as_str().unwrap_or_default().to_lowercase()))
            .collect(),
    )
}

struct Started {
    child: Child,
    bpffs: PathBuf,
    manifests: PathBuf,
    log: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(bin) = rayfence_bin() {
            let _ = Command::new(bin)
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&self.bpffs)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.manifests);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(caps: &[String], tag: &str, extra: &[String]) -> Result<(Started, u16)> {
    let tag = format!("rf-deploy-caps-{}-{tag}", std::process::id());
    let manifests = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    )?;
    let bpffs = PathBuf::from("/sys/fs/bpf").join(&tag);
    rayfence_tests::bpffs::ensure_mounted(&bpffs)?;
    let log = std::env::temp_dir().join(format!("{tag}.log"));
    let port = free_port()?;
    let bounding = format!("-all,{}", caps.join(","));
    let log_file = std::fs::File::create(&log)?;
    let child = Command::new("setpriv")
        .args([
            "--reuid=0",
            "--inh-caps=-all",
            "--bounding-set",
            &bounding,
            "--",
        ])
        .arg(rayfence_bin()?)
        .arg("agent")
        .args(["--node-name", "caps-node", "--dns-mode", "off"])
        .arg("--manifests")
        .arg(&manifests)
        .arg("--bpffs")
        .arg(&bpffs)
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .args(extra)
        .env_clear()
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        // The agent logs on stdout; stderr has a fatal error.
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("running setpriv (util-linux)")?;
    Ok((
        Started {
            child,
            bpffs,
            manifests,
            log,
        },
        port,
    ))
}

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[test]
fn the_agent_becomes_ready_with_exactly_the_daemonsets_capabilities() -> Result<()> {
    let caps = daemonset_caps()?;
    let (mut agent, port) = start(&caps, "exact", &[])?;
    let t0 = Instant::now();
    while !ready(port) {
        let exited = agent.child.try_wait()?;
        anyhow::ensure!(
            exited.is_none() && t0.elapsed() < Duration::from_secs(20),
            "not ready with {caps:?} (exit {exited:?}):\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Without CAP_PERFMON or CAP_NET_ADMIN (and CAP_SYS_ADMIN, which the kernel
/// accepts in their place) the agent refuses to start, naming what is missing and
/// why, before it loads anything.
#[test]
fn without_perfmon_or_net_admin_the_agent_refuses_to_start_naming_it() -> Result<()> {
    let caps = daemonset_caps()?;
    for (drop, expect) in [
        ("+perfmon", "CAP_PERFMON (PERFMON:"),
        ("+net_admin", "CAP_NET_ADMIN (NET_ADMIN:"),
    ] {
        // CAP_SYS_ADMIN stands in for CAP_PERFMON in the kernel: take it too.
        let fewer: Vec<String> = caps
            .iter()
            .filter(|c| *c != drop && *c != "+sys_admin")
            .cloned()
            .collect();
        let (mut agent, port) = start(&fewer, drop.trim_start_matches('+'), &[])?;
        let status = loop {
            if let Some(status) = agent.child.try_wait()? {
                break status;
            }
            anyhow::ensure!(!ready(port), "ready without {drop}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        assert!(!status.success(), "without {drop}: {log}");
        assert!(
            log.contains(expect),
            "without {drop}: expected {expect:?} in:\n{log}"
        );
    }
    Ok(())
}

/// Uninstall step 2 works with what deploy/cleanup grants: after an agent that
/// pinned its maps is gone, `rayfence cleanup` with only the cleanup init
/// container's capabilities removes every pin.
#[test]
fn cleanup_with_the_cleanup_daemonsets_capabilities_removes_every_pin() -> Result<()> {
    let (mut agent, port) = start(&daemonset_caps()?, "cleanup", &[])?;
    let t0 = Instant::now();
    while !ready(port) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "agent not ready:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.child.kill()?;
    agent.child.wait()?;
    assert!(agent.bpffs.is_dir(), "pins outlive the agent");

    let caps = cleanup_caps()?;
    let out = Command::new("setpriv")
        .args([
            "--reuid=0",
            "--inh-caps=-all",
            "--bounding-set",
            &format!("-all,{}", caps.join(",")),
            "--",
        ])
        .arg(rayfence_bin()?)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .output()?;
    assert!(
        out.status.success(),
        "cleanup with {caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("maps under"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !agent.bpffs.exists(),
        "everything under the bpffs dir removed"
    );
    Ok(())
}

/// The cleanup init container's added capabilities, as setpriv names them.
fn cleanup_caps() -> Result<Vec<String>> {
    let docs = kustomize("deploy/cleanup")?;
    let ds = find(&docs, "DaemonSet", "rayfence-cleanup");
    Ok(
        cleanup_container(ds)["securityContext"]["capabilities"]["add"]
            .as_array()
            .context("add")?
            .iter()
            .map(|c| format!("+{}", c.as_str().unwrap_or_default().to_lowercase()))
            .collect(),
    )
}

/// The agent with the DaemonSet's capabilities installs the CNI plugin into a
/// node's root-owned CNI directories (temp ones here), and `rayfence cleanup`
/// with the cleanup's capabilities removes it.
#[test]
fn the_cni_plugin_installs_and_cleans_up_with_exactly_the_granted_capabilities() -> Result<()> {
    let root = std::env::temp_dir().join(format!("rf-deploy-caps-cni-{}", std::process::id()));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(root.clone());
    let (conf, bin) = (root.join("net.d"), root.join("bin"));
    std::fs::create_dir_all(&conf)?;
    std::fs::create_dir_all(&bin)?;
    let conflist = conf.join("10-flannel.conflist");
    std::fs::write(
        &conflist,
        r#"{"name": "cbr0", "cniVersion": "1.0.0", "plugins": [{"type": "flannel"}]}"#,
    )?;
    let plugin = root.join("plugin");
    std::fs::write(&plugin, "plugin")?;
    let dirs = vec![
        format!("--cni-conf-dir={}", conf.display()),
        format!("--cni-bin-dir={}", bin.display()),
    ];
    let mut extra = dirs.clone();
    extra.push(format!("--cni-plugin-binary={}", plugin.display()));
    let (mut agent, _) = start(&daemonset_caps()?, "cni", &extra)?;
    let installed = || std::fs::read_to_string(&conflist).unwrap_or_default();
    let t0 = Instant::now();
    while !installed().contains("rayfence-cni") {
        anyhow::ensure!(
            agent.child.try_wait()?.is_none() && t0.elapsed() < Duration::from_secs(20),
            "not installed:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(installed().contains(&agent.bpffs.display().to_string()));
    assert!(bin.join("rayfence-cni").is_file());
    agent.child.kill()?;
    agent.child.wait()?;

    let caps = cleanup_caps()?;
    let out = Command::new("setpriv")
        .args([
            "--reuid=0",
            "--inh-caps=-all",
            "--bounding-set",
            &format!("-all,{}", caps.join(",")),
            "--",
        ])
        .arg(rayfence_bin()?)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&agent.bpffs)
        .args(&dirs)
        .output()?;
    assert!(
        out.status.success(),
        "cleanup with {caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!installed().contains("rayfence-cni"), "{}", installed());
    assert!(installed().contains("flannel"));
    assert!(!bin.join("rayfence-cni").exists());
    assert!(!agent.bpffs.exists());
    Ok(())
}
