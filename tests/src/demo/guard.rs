//! Cleaning up when the demo is interrupted (Ctrl-C, SIGTERM, SIGHUP).
//!
//! Drop guards (the topology, the agent, the temporary directory) clean up on
//! normal exits and panics. A signal would skip them, so [`install`] blocks the
//! signals in every thread and a dedicated thread waits for them with sigwait(2);
//! on one it kills our child processes (the agent, probe servers), deletes every
//! network namespace this process named (`rf-ns-<pid>-...`: iptables rules live in
//! the node namespace and go with it), runs `rayfence cleanup` on the bpffs
//! directory, removes the temporary directory, and exits 130.
//!
//! Call [`install`] before any other thread exists, since threads inherit the
//! signal mask of their creator. Child processes inherit it too (across fork and
//! exec): the agent is spawned with the signals unblocked (see `agent`), probe
//! processes are SIGKILLed by the handler.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};

use crate::names;

#[derive(Debug, Default)]
struct Leftovers {
    rayfence: Option<PathBuf>,
    bpffs: Option<PathBuf>,
    tempdir: Option<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    rayfence: None,
    bpffs: None,
    tempdir: None,
});

/// Records what the signal handler must remove besides namespaces.
pub fn remember(rayfence: Option<PathBuf>, bpffs: Option<PathBuf>, tempdir: Option<PathBuf>) {
    let mut l = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    l.rayfence = rayfence.or(l.rayfence.take());
    l.bpffs = bpffs.or(l.bpffs.take());
    l.tempdir = tempdir.or(l.tempdir.take());
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// True once a signal arrived: loops that start processes stop starting them.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
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
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                STOPPING.store(true, Ordering::Relaxed);
                eprintln!("\nrf-demo: signal {sig}: cleaning up");
                emergency_cleanup();
                std::process::exit(130);
            }
        })?;
    Ok(())
}

fn emergency_cleanup() {
    kill_children();
    // A probe thread may have spawned one more process while we were scanning.
    std::thread::sleep(std::time::Duration::from_millis(50));
    kill_children();
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
    if let (Some(bin), Some(bpffs)) = (&l.rayfence, &l.bpffs)
        && bpffs.exists()
    {
        match super::agent::cleanup_bpffs(bin, bpffs) {
            Ok(said) => eprintln!("rf-demo: {said}"),
            Err(e) => eprintln!("rf-demo: {e:#}"),
        }
    }
    if let Some(dir) = &l.tempdir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// SIGKILLs every process whose parent is us, and reaps them.
fn kill_children() {
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
        if ppid == Some(me) {
            // SAFETY: kill/waitpid on a child of ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
