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
//! [`V1Cgroup`]: a directory in a cgroup v1 hierarchy (`/sys/fs/cgroup/pids`), where
//! a cgroupfs-driver kubelet on a hybrid host keeps its pods; never holds a process.
//!
//! [`CgroupMount`] / [`set_cgroup_mount`]: which cgroup filesystems a process the
//! kit starts (the agent) sees at `/sys/fs/cgroup`: the machine's own mounts
//! (hybrid here), cgroup2 alone (a pure cgroup v2 host), or cgroup v1 alone. The
//! last two run the process in its own mount namespace; the same hierarchies are
//! mounted there, so cgroup ids, the test's cgroups and the bpffs pins are the
//! ones the test sees.
//!
//! This module never touches cgroups it did not create, and changes mounts only in
//! the mount namespace of a child it is starting.

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

/// The mount point of the cgroup v1 hierarchy holding `controller` (`pids`,
/// `name=systemd`), from /proc/self/mountinfo.
pub fn cgroup_v1_mount(controller: &str) -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut fields = right.split_whitespace();
        if fields.next() == Some("cgroup")
            && fields
                .nth(1)
                .is_some_and(|options| options.split(',').any(|o| o == controller))
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(unescape_mountinfo(mp)));
        }
    }
    bail!("no cgroup v1 hierarchy with {controller} in /proc/self/mountinfo")
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

/// The cgroup v1 hierarchy the kit makes v1 cgroups in (every hybrid host has it).
pub const V1_CONTROLLER: &str = "pids";

/// A directory `<v1 hierarchy>/rf-cg-<pid>-<n>` in a cgroup v1 hierarchy, removed
/// with everything below it on drop. Never holds a process (v1 has no
/// `cgroup.kill`): it stands for where a kubelet would keep pod cgroups.
#[derive(Debug)]
pub struct V1Cgroup {
    path: PathBuf,
}

impl V1Cgroup {
    /// Creates `rf-cg-<pid>-<n>` in the hierarchy of `controller`.
    pub fn new(controller: &str) -> Result<Self> {
        let path = cgroup_v1_mount(controller)?.join(names::unique_name("cg"));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(V1Cgroup { path })
    }

    /// Takes charge of an existing directory (a killed run's, see
    /// [`crate::sweep`]): removed on drop.
    pub fn adopt(path: PathBuf) -> Self {
        V1Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its name, `/rf-cg-...`, as a kubelet `--cgroup-root` would give it.
    pub fn as_kubelet_root(&self) -> String {
        format!(
            "/{}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

/// Which cgroup filesystems a started process sees at `/sys/fs/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupMount {
    /// The machine's own mounts, unchanged (this lab machine is hybrid: cgroup v1
    /// hierarchies, cgroup2 at `/sys/fs/cgroup/unified`).
    Hybrid,
    /// cgroup2 at `/sys/fs/cgroup` and no other cgroup filesystem: a pure cgroup
    /// v2 host.
    PureV2,
    /// A tmpfs at `/sys/fs/cgroup` with the `pids` v1 hierarchy at
    /// `/sys/fs/cgroup/pids`, no cgroup2 anywhere: a cgroup v1-only host.
    V1Only,
}

impl CgroupMount {
    pub const ALL: [CgroupMount; 3] = [
        CgroupMount::Hybrid,
        CgroupMount::PureV2,
        CgroupMount::V1Only,
    ];

    /// `hybrid`, `cgroup2`, `cgroup1`.
    pub fn name(self) -> &'static str {
        match self {
            CgroupMount::Hybrid => "hybrid",
            CgroupMount::PureV2 => "cgroup2",
            CgroupMount::V1Only => "cgroup1",
        }
    }
}

/// Makes `command`'s process see `mount` at `/sys/fs/cgroup` (nothing for
/// [`CgroupMount::Hybrid`]): before it runs, it gets its own mount namespace
/// (mounts made private, so nothing propagates back to the machine), the
/// machine's `/sys/fs/cgroup` and everything under it detached there, and the
/// chosen filesystems mounted in their place. Works with any program, `nsenter`
/// included (the mount namespace is set up before it runs).
pub fn set_cgroup_mount(command: &mut std::process::Command, mount: CgroupMount) {
    use std::os::unix::process::CommandExt as _;
    if mount == CgroupMount::Hybrid {
        return;
    }
    // Everything the child needs is allocated here: between fork and exec only
    // async-signal-safe calls (the syscalls) may run.
    let root = c"/";
    let cgroup = c"/sys/fs/cgroup";
    let pids = c"/sys/fs/cgroup/pids";
    let setup = move || -> std::io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain syscalls on NUL-terminated strings that outlive them; the
        // child is single-threaded here.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // Detaches the mount and every mount below it (the v1 hierarchies, the
            // unified one).
            check(libc::umount2(cgroup.as_ptr(), libc::MNT_DETACH))?;
            match mount {
                CgroupMount::Hybrid => {}
                CgroupMount::PureV2 => check(libc::mount(
                    c"cgroup2".as_ptr(),
                    cgroup.as_ptr(),
                    c"cgroup2".as_ptr(),
                    0,
                    std::ptr::null(),
                ))?,
                CgroupMount::V1Only => {
                    check(libc::mount(
                        c"tmpfs".as_ptr(),
                        cgroup.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        c"mode=755".as_ptr().cast(),
                    ))?;
                    check(libc::mkdir(pids.as_ptr(), 0o755))?;
                    check(libc::mount(
                        c"cgroup".as_ptr(),
                        pids.as_ptr(),
                        c"cgroup".as_ptr(),
                        0,
                        c"pids".as_ptr().cast(),
                    ))?;
                }
            }
        }
        Ok(())
    };
    // SAFETY: `setup` only makes syscalls (no allocation, no lock).
    unsafe {
        command.pre_exec(setup);
    }
}
