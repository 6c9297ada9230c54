//! `TestCgroup`: a cgroup v2 directory `<cgroup2 mount>/rf-cg-<pid>-<n>` removed
//! on drop, after killing whatever still runs in it (`cgroup.kill`, kernel >= 5.14).
//!
//! The cgroup2 mount is found in /proc/self/mountinfo (hybrid hosts mount it at
//! /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup). The cgroup id is the
//! directory's inode number, which is what `bpf_skb_cgroup_id` and
//! `bpf_get_current_cgroup_id` return for cgroup v2 on 64-bit kernels.
//!
//! [`PodCgroup`] mirrors the kubelet's layout: a pod cgroup with one container
//! child; processes go in the container (leaf) cgroup.
//!
//! This module never touches cgroups it did not create.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::names;

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <src> <opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo")
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// A cgroup v2 directory that is emptied (processes killed) and removed, with any
/// sub-cgroups, on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/rf-cg-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        let path = cgroup2_mount()?.join(names::unique_name("cg"));
        Self::create_at(path)
    }

    /// Creates a sub-cgroup `name` of this one; it has its own guard (dropping the
    /// parent also removes it).
    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        Self::create_at(self.path.join(name))
    }

    /// Takes charge of an existing cgroup directory (for sweeping leftovers).
    pub(crate) fn adopt(path: PathBuf) -> Self {
        TestCgroup { path }
    }

    fn create_at(path: PathBuf) -> Result<Self> {
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the inode number of the directory.
    pub fn id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .ino())
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.path.display()))
    }

    /// Pids currently in this cgroup (not in its children).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let s = fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

/// Kills everything in `dir` (and below) and removes it depth first. A missing
/// directory (already removed by a parent's guard) is fine.
fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill covers the whole subtree.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    remove_tree_inner(dir, deadline)
}

fn remove_tree_inner(dir: &Path, deadline: Instant) -> Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree_inner(&entry.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY until killed processes have exited.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// A kubelet-like pair: a pod cgroup and its container child. Processes belong in
/// [`PodCgroup::container`]; the pod cgroup is the one a policy might key on by
/// ancestry.
#[derive(Debug)]
pub struct PodCgroup {
    // Field order is drop order: the container first, then the pod.
    pub container: TestCgroup,
    pub pod: TestCgroup,
}

impl PodCgroup {
    pub fn new() -> Result<Self> {
        let pod = TestCgroup::new()?;
        let container = pod.child("ctr")?;
        Ok(PodCgroup { container, pod })
    }
}
