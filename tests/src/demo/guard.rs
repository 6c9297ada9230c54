//! Cleaning up when the demo is interrupted (Ctrl-C, SIGTERM, SIGHUP).
//!
//! Drop guards (the topology, the agent, the temporary directory) clean up on
//! normal exits and panics, and they stay the way an interrupted run cleans up
//! too. [`install`] blocks the signals in every thread and a dedicated thread
//! waits for them with sigwait(2). On one it sets [`stopping`], kills the running
//! probe processes (which ends the main thread's waits), and gives the main thread
//! a few seconds to unwind: [`check`] turns the flag into an error at each step, so
//! the guards run in order, and [`exit_if_interrupted`] then exits 130. Only if
//! the main thread does not finish in time does the signal thread clean up
//! itself: kill every child, remove the cgroups (`rf-cg-<pid>-...`) and network
//! namespaces (`rf-ns-<pid>-...`; the iptables rules live in the node namespace
//! and go with it) this process named, run `rayfence cleanup` on the bpffs
//! directory, remove the temporary directory, and exit 130.
//!
//! Call [`install`] before any other thread exists, since threads inherit the
//! signal mask of their creator. Child processes inherit it too (across fork and
//! exec): the agent is spawned with the signals unblocked (see `agent`), so a
//! terminal's Ctrl-C reaches it as well; probe processes are SIGKILLed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cgroup::{TestCgroup, cgroup2_mount};
use crate::names;

#[derive(Debug, Default)]
struct Leftovers {
    rayfence: Option<PathBuf>,
    bpffs: Vec<PathBuf>,
    tempdir: Option<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    rayfence: None,
    bpffs: Vec::new(),
    tempdir: None,
});

/// Records what the signal handler must remove besides namespaces (one bpffs
/// directory per agent: each call adds one).
pub fn remember(rayfence: Option<PathBuf>, bpffs: Option<PathBuf>, tempdir: Option<PathBuf>) {
    let mut l = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    l.rayfence = rayfence.or(l.rayfence.take());
    l.bpffs.extend(bpffs);
    l.tempdir = tempdir.or(l.tempdir.take());
}

static STOPPING: AtomicBool = AtomicBool::new(false);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Permission to start one probe process, held while it runs; `None` once a
/// signal arrived. The handler waits for every slot to be given back before it
/// removes cgroups and namespaces, so no probe starts behind its back.
pub fn probe_slot() -> Option<ProbeSlot> {
    // Count first, then check: the handler sets STOPPING, then reads the count
    // (both SeqCst), so either it sees this slot or this sees STOPPING.
    IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
    let slot = ProbeSlot(());
    if STOPPING.load(Ordering::SeqCst) {
        return None;
    }
    Some(slot)
}

/// See [`probe_slot`].
#[derive(Debug)]
pub struct ProbeSlot(());

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks SIGINT/SIGTERM/SIGHUP and starts the thread that cleans up on them.
pub fn install() -> Result<()> {
    // SAFETY: plain signal-mask manipulation with a locally built set. SIG_DFL
    // first: a parent may have set SIG_IGN, and an ignored signal is discarded
    // before sigwait could see it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::signal(s, libc::SIG_DFL);
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("pthread_sigmask failed");
        }
        set
    };
    std::thread::Builder::new()
        .name("rf-demo-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid, initialised sigset.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            STOPPING.store(true, Ordering::SeqCst);
            eprintln!("\nrf-demo: signal {sig}: stopping and cleaning up");
            // Killing the running probes ends their waits; their threads then see
            // STOPPING and give their slots back.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                kill_children(Some("rf-probe"));
                if IN_FLIGHT.load(Ordering::SeqCst) == 0 || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // The main thread unwinds through its guards and calls
            // exit_if_interrupted; this is the fallback.
            std::thread::sleep(Duration::from_secs(15));
            eprintln!("rf-demo: the main thread did not finish: cleaning up from here");
            emergency_cleanup();
            std::process::exit(130);
        })?;
    Ok(())
}

/// `Err` once a signal arrived, so the caller unwinds through its guards.
pub fn check() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// True once a signal arrived.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Exits 130 when the run was interrupted (after the guards have cleaned up).
pub fn exit_if_interrupted() {
    if stopping() {
        eprintln!("rf-demo: interrupted; cleaned up");
        std::process::exit(130);
    }
}

fn emergency_cleanup() {
    kill_children(None);
    // The kubelet-like cgroup tree: cgroup.kill takes whatever still runs in it
    // (a probe spawned during the scan), then the directories go.
    if let Ok(root) = cgroup2_mount()
        && let Ok(dir) = std::fs::read_dir(&root)
    {
        let prefix = names::pid_prefix("cg");
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                drop(TestCgroup::adopt(entry.path()));
                eprintln!("rf-demo: removed cgroup {}", entry.path().display());
            }
        }
    }
    let prefix = names::pid_prefix("ns");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(&prefix) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
                eprintln!("rf-demo: deleted network namespace {name}");
            }
        }
    }
    let l = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = &l.rayfence {
        for bpffs in l.bpffs.iter().filter(|dir| dir.exists()) {
            match super::agent::cleanup_bpffs(bin, bpffs) {
                Ok(said) => eprintln!("rf-demo: {said}"),
                Err(e) => eprintln!("rf-demo: {e:#}"),
            }
        }
    }
    if let Some(dir) = &l.tempdir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// SIGKILLs every process whose parent is us (named `only`, if given), and
/// reaps them.
fn kill_children(only: Option<&str>) {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if ppid == Some(me) && only.is_none_or(|name| comm.trim() == name) {
            // SAFETY: kill/waitpid on a child of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
