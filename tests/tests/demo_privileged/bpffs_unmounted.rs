//! A machine with no bpf filesystem at `/sys/fs/bpf` (a fresh one often has none):
//! the demo's set-up (`rayfence_tests::bpffs::create_dir`, from `Agent::start`)
//! mounts one before it makes its pin directory there, callers side by side mount
//! exactly one, and `rf-demo` (what `cargo xtask demo` runs) passes. Root only.
//!
//! Each test makes that machine in a private mount namespace: `unshare(CLONE_NEWNS)`
//! (on a thread of its own, which it and the threads it starts alone see, or in a
//! child process), every mount made private first so that nothing propagates back,
//! then any bpffs at `/sys/fs/bpf` unmounted there. The machine's own mounts are
//! never touched; whatever the tests mount goes away with the namespace.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};

use rayfence_tests::agent_bin::rayfence_bin;
use rayfence_tests::bpffs;

const BPFFS: &str = "/sys/fs/bpf";

/// Moves the calling thread into a new mount namespace in which nothing it
/// mounts or unmounts propagates to the machine's, and unmounts any bpffs at
/// `/sys/fs/bpf` there. Only async-signal-safe calls (raw syscalls), so a child
/// may run it between fork and exec.
fn private_mount_namespace_without_bpffs() -> std::io::Result<()> {
    // SAFETY: plain syscalls on NUL-terminated literals; they change only the
    // calling thread's mount namespace (a new one, made private before anything
    // in it is unmounted).
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // Mounts may be stacked: unmount until none is left.
        for _ in 0..16 {
            let mut stat: libc::statfs = std::mem::zeroed();
            if libc::statfs(c"/sys/fs/bpf".as_ptr(), &mut stat) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if stat.f_type as i64 != 0xcafe_4a11 {
                return Ok(());
            }
            if libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Err(std::io::Error::other(
        "a bpffs is still mounted at /sys/fs/bpf",
    ))
}

/// Runs `f` on a thread of its own in [`private_mount_namespace_without_bpffs`].
fn without_bpffs<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        private_mount_namespace_without_bpffs().expect("a private mount namespace");
        f()
    })
    .join()
    .expect("the thread in the private mount namespace")
}

/// The file system types mounted at `/sys/fs/bpf`, bottom to top, in this
/// thread's mount namespace.
fn mounted_at_bpffs() -> Vec<String> {
    let mountinfo =
        std::fs::read_to_string("/proc/thread-self/mountinfo").expect("reading mountinfo");
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (mount.split(' ').nth(4)? == BPFFS).then(|| fs.split(' ').next().map(str::to_owned))?
        })
        .collect()
}

fn unique_dir(what: &str) -> PathBuf {
    Path::new(BPFFS).join(rayfence_tests::names::unique_name(what))
}

#[test]
fn the_demos_bpffs_setup_mounts_a_bpffs_then_creates_its_directory() {
    let dir = unique_dir("bpffs-demo");
    let (before, created, after, is_dir) = without_bpffs(move || {
        let before = mounted_at_bpffs();
        let created = bpffs::create_dir(&dir).map_err(|e| format!("{e:#}"));
        (before, created, mounted_at_bpffs(), dir.is_dir())
    });
    assert!(
        !before.contains(&"bpf".to_owned()),
        "precondition: no bpffs at {BPFFS}, found {before:?}"
    );
    assert_eq!(created, Ok(()));
    assert_eq!(after.last().map(String::as_str), Some("bpf"), "{after:?}");
    assert!(is_dir, "the directory exists on the new bpffs");
}

/// Unmounts every bpffs at `/sys/fs/bpf` in this thread's mount namespace (only
/// ever called in a private one).
fn unmount_bpffs_here() {
    while mounted_at_bpffs().last().map(String::as_str) == Some("bpf") {
        // SAFETY: a NUL-terminated literal; this thread's private namespace.
        let rc = unsafe { libc::umount2(c"/sys/fs/bpf".as_ptr(), libc::MNT_DETACH) };
        assert_eq!(rc, 0, "umount: {}", std::io::Error::last_os_error());
    }
}

/// Agents started side by side (as the tests do) on a machine without bpffs:
/// each finds none and mounts one unless they take turns, and a second mount
/// hides what was pinned under the first. Raced in many rounds, since one rarely
/// hits the window.
#[test]
fn callers_side_by_side_mount_exactly_one_bpffs() {
    const CALLERS: usize = 8;
    const ROUNDS: usize = 200;
    let rounds = without_bpffs(|| {
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            // Threads started here share this thread's mount namespace.
            let barrier = Arc::new(Barrier::new(CALLERS));
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let barrier = Arc::clone(&barrier);
                    let dir = unique_dir("bpffs-race");
                    std::thread::spawn(move || {
                        barrier.wait();
                        bpffs::ensure_mounted(&dir).map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            let results: Vec<_> = callers
                .into_iter()
                .map(|caller| caller.join().expect("caller thread"))
                .collect();
            rounds.push((results, mounted_at_bpffs()));
            unmount_bpffs_here();
        }
        rounds
    });
    let failed: Vec<_> = rounds
        .iter()
        .filter(|(results, after)| {
            results.iter().any(Result::is_err)
                || after.iter().filter(|fs| *fs == "bpf").count() != 1
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} rounds did not end with exactly one bpffs (a second one hides the \
         first's pins), e.g. {:?}",
        failed.len(),
        failed.first()
    );
}

/// `cargo xtask demo` on a fresh machine: rf-demo with the agent, in a mount
/// namespace where nothing is mounted at /sys/fs/bpf, must pass.
#[test]
fn rf_demo_passes_where_no_bpffs_is_mounted() {
    let rayfence = rayfence_bin().expect("the rayfence binary");
    let mut command = Command::new(env!("CARGO_BIN_EXE_rf-demo"));
    command
        .arg("--rayfence")
        .arg(rayfence)
        .arg("--probe")
        .arg(env!("CARGO_BIN_EXE_rf-probe"));
    // SAFETY: only raw syscalls between fork and exec (see the function).
    unsafe { command.pre_exec(private_mount_namespace_without_bpffs) };
    let out = command.output().expect("running rf-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rf-demo: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("PASS: all ") && stdout.contains(" verdicts match the expected matrix"),
        "{stdout}\n{stderr}"
    );
}
