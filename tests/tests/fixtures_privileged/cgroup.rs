//! Self-tests of the cgroup fixtures, no eBPF: probes started for a pod with a
//! cgroup really run in that cgroup (and in the pod's namespace), the cgroup id is
//! the directory's inode, and drop kills what is left and removes the directories.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::Result;
use rayfence_tests::cgroup::cgroup2_mount;
use rayfence_tests::{Layout, Outcome, PodCgroup, TestCgroup, Topology, probe_bin};

const T: Duration = Duration::from_secs(2);

/// The cgroup v2 line ("0::/path") of /proc/<pid>/cgroup.
fn cgroup_v2_of(pid: u32) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

fn relative_to_mount(cg: &TestCgroup) -> String {
    let rel = cg.path().strip_prefix(cgroup2_mount().unwrap()).unwrap();
    format!("/{}", rel.display())
}

#[test]
fn cgroup2_mount_is_found_in_mountinfo() -> Result<()> {
    let mount = cgroup2_mount()?;
    assert!(
        mount.join("cgroup.controllers").exists(),
        "{}",
        mount.display()
    );
    Ok(())
}

#[test]
fn cgroup_id_is_the_directory_inode_and_children_nest() -> Result<()> {
    let pod = PodCgroup::new()?;
    assert_eq!(pod.pod.id()?, std::fs::metadata(pod.pod.path())?.ino());
    assert_ne!(pod.pod.id()?, pod.container.id()?);
    assert_eq!(pod.container.path().parent(), Some(pod.pod.path()));
    Ok(())
}

#[test]
fn probes_of_a_pod_with_a_cgroup_run_in_that_cgroup_and_still_connect() -> Result<()> {
    let topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["client", "server"])?;
    let (client, server) = (topo.pod("client"), topo.pod("server"));
    let cg = PodCgroup::new()?;
    server.set_cgroup(Some(&cg.container));
    let srv = server.serve_tcp(7000)?;
    assert_eq!(cgroup_v2_of(srv.pid()), relative_to_mount(&cg.container));
    assert_eq!(cg.container.pids()?, vec![srv.pid()]);
    // Also in the pod's network namespace, with the host's mounts.
    let ns_link = std::fs::read_link(format!("/proc/{}/ns/net", srv.pid()))?;
    let pod_ns_ino = std::fs::metadata(server.netns.path())?.ino();
    assert_eq!(ns_link.to_string_lossy(), format!("net:[{pod_ns_ino}]"));

    client.set_cgroup(Some(&cg.container));
    let mut held = client.tcp_hold(server.ip4.into(), 7000, T)?;
    assert_eq!(cgroup_v2_of(held.pid()), relative_to_mount(&cg.container));
    assert!(held.roundtrip());
    drop(held);
    for dst in server.ips() {
        assert_eq!(client.tcp_connect(dst, 7000, T), Outcome::Ok);
    }
    Ok(())
}

#[test]
fn dropping_a_cgroup_kills_its_processes_and_removes_it() -> Result<()> {
    let topo = Topology::with_pods(Layout::Routed, probe_bin(), &["p"])?;
    let cg = PodCgroup::new()?;
    let path = cg.pod.path().to_owned();
    let srv = topo
        .pod("p")
        .prober_in(cg.container.path())
        .serve_udp(9000)?;
    let pid = srv.pid();
    // Drop the cgroup while the server still runs: cgroup.kill must end it.
    drop(cg);
    assert!(!path.exists(), "{} left behind", path.display());
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Killed: gone, or a zombie until the Server guard reaps it.
    assert!(state.is_empty() || state.contains(") Z "), "{state}");
    drop(srv);
    Ok(())
}
