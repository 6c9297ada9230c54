//! Removing what a killed test run left behind. Guards clean up on drop and on
//! panic, but not after SIGKILL (a timed-out CI job): its namespaces
//! (`rf-ns-<pid>-...`) and cgroups (`rf-cg-<pid>-...`, in cgroup2 and in the v1
//! hierarchy the kit uses) stay. This removes those
//! whose pid no longer runs, and nothing else: names of live processes (test
//! binaries running side by side) and anything not named by [`crate::names`] are
//! left alone. Nothing calls it implicitly.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::cgroup::{TestCgroup, V1_CONTROLLER, V1Cgroup, cgroup_v1_mount, cgroup2_mount};

/// The pid in `rf-<role>-<pid>-...`, if `name` has that shape.
fn owner_pid(name: &str, role: &str) -> Option<u32> {
    let rest = name.strip_prefix(&format!("rf-{role}-"))?;
    rest.split('-').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces and cgroups named by this crate for processes that are
/// gone. Returns what it removed.
pub fn remove_leftovers_of_dead_processes() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if owner_pid(name, "ns").is_some_and(|p| !alive(p)) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            removed.push(name.to_owned());
        }
    }
    for entry in std::fs::read_dir(cgroup2_mount()?)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owner_pid(&name, "cg").is_some_and(|p| !alive(p)) {
            // Adopting the directory in a guard kills and removes it on drop.
            drop(TestCgroup::adopt(entry.path()));
            removed.push(name);
        }
    }
    // The cgroup v1 trees some tests make (a kubelet with the cgroupfs driver on
    // a hybrid host), where the machine has that hierarchy.
    if let Ok(v1) = cgroup_v1_mount(V1_CONTROLLER) {
        for entry in std::fs::read_dir(v1)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, "cg").is_some_and(|p| !alive(p)) {
                drop(V1Cgroup::adopt(entry.path()));
                removed.push(format!("{V1_CONTROLLER}/{name}"));
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("rf-ns-1234-5-pod-a", "ns"), Some(1234));
        assert_eq!(owner_pid("rf-cg-77-0", "cg"), Some(77));
        assert_eq!(owner_pid("rf-ns-x-5", "ns"), None);
        assert_eq!(owner_pid("cni-1234", "ns"), None);
        assert_eq!(owner_pid("rf-cg-1234-0", "ns"), None);
    }
}
