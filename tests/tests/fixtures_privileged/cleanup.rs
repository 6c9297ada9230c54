//! Self-tests of cleanup: after the fixtures drop, also when the test body
//! panicked, `ip netns list` and the cgroup2 mount no longer hold their names.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use rayfence_tests::cgroup::cgroup2_mount;
use rayfence_tests::names::pid_prefix;
use rayfence_tests::{Layout, PodCgroup, Topology, probe_bin};

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cgroup_entries() -> Vec<String> {
    std::fs::read_dir(cgroup2_mount().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn fixtures_are_removed_after_a_panicking_test() {
    let mut names = Vec::new();
    let mut cg_name = String::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["a", "b"]).unwrap();
        topo.add_node().unwrap();
        topo.add_pod(1, "remote").unwrap();
        let cg = PodCgroup::new().unwrap();
        cg_name = cg
            .pod
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let b = topo.pod("b");
        b.set_cgroup(Some(&cg.container));
        let _srv = b.serve_tcp(8080).unwrap();
        let _held = topo
            .pod("a")
            .tcp_hold(b.ip4.into(), 8080, Duration::from_secs(2))
            .unwrap();
        names = topo.netns_names();
        let listed = netns_list();
        assert!(names.iter().all(|n| listed.contains(n.as_str())));
        assert!(cgroup_entries().contains(&cg_name));
        panic!("deliberate panic with a topology, a cgroup, a server and a held connection alive");
    }));
    assert!(result.is_err(), "the closure must have panicked");
    assert!(names.len() >= 5, "{names:?}");
    let listed = netns_list();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} still in ip netns list");
    }
    assert!(
        !cgroup_entries().contains(&cg_name),
        "{cg_name} still under the cgroup2 mount"
    );
}

#[test]
fn names_carry_the_pid_so_parallel_binaries_do_not_collide() {
    let topo = Topology::new(Layout::Routed, probe_bin()).unwrap();
    let cg = PodCgroup::new().unwrap();
    for n in topo.netns_names() {
        assert!(n.starts_with(&pid_prefix("ns")), "{n}");
    }
    let cg_name = cg
        .pod
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(cg_name.starts_with(&pid_prefix("cg")), "{cg_name}");
}

#[test]
fn sweep_removes_leftovers_of_dead_processes_only() {
    // A pid that has exited (and was reaped), standing in for a SIGKILLed run.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let ns = format!("rf-ns-{dead}-0-leftover");
    let ours = format!("{}99-alive", pid_prefix("ns"));
    for n in [&ns, &ours] {
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success()
        );
    }
    let cg = cgroup2_mount().unwrap().join(format!("rf-cg-{dead}-0"));
    std::fs::create_dir_all(cg.join("ctr")).unwrap();
    // And in the cgroup v1 hierarchy the kit uses (a kubelet tree with the
    // cgroupfs driver on a hybrid host), where the machine has it.
    let v1 = rayfence_tests::cgroup::cgroup_v1_mount(rayfence_tests::cgroup::V1_CONTROLLER)
        .ok()
        .map(|mount| mount.join(format!("rf-cg-{dead}-0")));
    if let Some(v1) = &v1 {
        std::fs::create_dir_all(v1.join("kubepods")).unwrap();
    }

    let removed = rayfence_tests::sweep::remove_leftovers_of_dead_processes().unwrap();
    let listed = netns_list();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ours])
        .status();
    assert!(removed.contains(&ns), "{removed:?}");
    assert!(!listed.contains(&ns));
    assert!(
        listed.contains(&ours),
        "a live process's namespace must stay"
    );
    assert!(!cg.exists());
    if let Some(v1) = &v1 {
        assert!(!v1.exists(), "{} still there: {removed:?}", v1.display());
    }
}
