//! `Netns`: a named network namespace (`ip netns add`) that is deleted on drop,
//! plus the three ways to act inside it:
//!
//! - [`Netns::cmd`] / [`Netns::exec`]: a command run through
//!   `nsenter --net=/run/netns/NAME` (not `ip netns exec`, which remounts /sys and
//!   hides bpffs and the cgroup mounts);
//! - [`Netns::ip`]: `ip -n NAME ...`;
//! - [`Netns::run`]: a closure on a fresh thread that has `setns(CLONE_NEWNET)`'d
//!   into the namespace (only that thread moves; the mount namespace is unchanged,
//!   so bpffs and cgroups stay visible), for attaching programs by interface name
//!   or quick socket probes.
//!
//! This module never touches the root namespace's interfaces, routes or sysctls:
//! sysctls are written from a thread inside the namespace.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

use crate::names;

/// A network namespace `rf-ns-<pid>-<n>[-role]` deleted (`ip netns del`) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a unique name; `role` (for example `node0`,
    /// `pod-a`) only makes `ip netns list` readable. Loopback is brought up.
    pub fn new(role: &str) -> Result<Self> {
        let name = format!("{}-{role}", names::unique_name("ns"));
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `nsenter --net=/run/netns/NAME -- program`: a command to add arguments to
    /// and spawn; it runs in this namespace with the host's mounts.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `argv` inside the namespace and fails (with its stderr) unless it
    /// exits 0. Returns stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().context("empty argv")?;
        let out = run_checked(self.cmd(program).args(args))
            .with_context(|| format!("in netns {}: {}", self.name, argv.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n NAME args...`, failing with ip's stderr. Returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
            .with_context(|| format!("ip -n {} {}", self.name, args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a dedicated thread that has joined this network namespace with
    /// setns(2), and returns its result. A panic in `f` is propagated.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<T> {
                // SAFETY: setns on a valid fd; affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The ifindex of interface `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let c = CString::new(ifname)?;
        // SAFETY: valid NUL-terminated string.
        let idx = self.run(move || unsafe { libc::if_nametoindex(c.as_ptr()) })?;
        if idx == 0 {
            bail!("no interface {ifname} in netns {}", self.name);
        }
        Ok(idx)
    }

    /// Sets a sysctl of this namespace, `key` in dotted form
    /// (`net.ipv4.ip_forward`), written to /proc/sys from a thread inside it
    /// (net sysctls are resolved against the writer's network namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        if !key.starts_with("net.") {
            bail!("only per-namespace net.* sysctls may be set, not {key}");
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key} in netns {}", self.name))
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let s = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("reading sysctl {key} in netns {}", self.name))?;
        Ok(s.trim().to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Interfaces inside go with the namespace; a veth's peer in another of our
        // namespaces goes with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command and fails unless it exits 0, with its stderr in the error.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
