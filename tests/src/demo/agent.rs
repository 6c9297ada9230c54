//! Running `rayfence agent` inside the node namespace, waiting for `/readyz`,
//! reading `/metrics`, and stopping it with `rayfence cleanup` afterwards.
//!
//! The agent is started as `nsenter --net=/run/netns/<node> rayfence agent ...`
//! (nsenter execs it, so it is our direct child and keeps the host's mounts:
//! bpffs and the cgroup tree stay visible). Its log goes to a file whose tail is
//! printed when something goes wrong.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cgroup::CgroupMount;
use crate::netns::Netns;

/// Where the agent's metrics server listens, inside the node namespace (private
/// to it, so any port is free).
pub const METRICS_ADDR: &str = "127.0.0.1:9464";

/// Whether `bin` has the `agent` subcommand (it lands on branch `runtime`).
pub fn has_agent_command(bin: &Path) -> bool {
    Command::new(bin)
        .args(["agent", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running agent; stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    bin: PathBuf,
    bpffs: PathBuf,
    log: PathBuf,
    /// The operator API socket (next to the log).
    socket: PathBuf,
}

/// What one node's agent is started with.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub bin: &'a Path,
    pub node_name: &'a str,
    pub manifests: &'a Path,
    pub bpffs: &'a Path,
    /// The kubelet's cgroup tree, given as `--cgroup-root` on the machine's own
    /// mounts.
    pub cgroup_root: &'a Path,
    /// What the agent sees at `/sys/fs/cgroup`.
    pub cgroup_mount: CgroupMount,
    /// Flags the shape adds (e.g. `--dns-node-local`).
    pub extra_args: &'a [String],
    pub log: &'a Path,
}

impl Agent {
    /// Starts the agent in `node`'s namespace.
    pub fn start(node: &Netns, launch: &Launch<'_>) -> Result<Agent> {
        let Launch {
            bin,
            node_name,
            manifests,
            bpffs,
            cgroup_root,
            cgroup_mount: mount,
            extra_args,
            log,
        } = *launch;
        crate::bpffs::create_dir(bpffs)?;
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let socket = log.with_extension("sock");
        let mut cmd = node.cmd(&bin.to_string_lossy());
        cmd.args(["agent", "--node-name", node_name, "--manifests"])
            .arg(manifests)
            .arg("--bpffs")
            .arg(bpffs)
            .args(["--metrics-addr", METRICS_ADDR])
            .args(["--dns-service", "kube-system/kube-dns"])
            .args(["--operator-namespace", "ray-system"])
            .arg("--api-socket")
            .arg(&socket)
            .args(extra_args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // On the machine's own (hybrid) mounts the kubelet tree is given as the
        // cgroup root; on another mount the agent finds cgroup2 itself, as on a
        // node of that kind.
        match mount {
            CgroupMount::Hybrid => {
                cmd.arg("--cgroup-root").arg(cgroup_root);
            }
            other => crate::cgroup::set_cgroup_mount(&mut cmd, other),
        }
        // The demo blocks SIGINT/SIGTERM/SIGHUP for its signal thread (see
        // `guard`), and the mask is inherited across fork and exec: unblock them
        // in the child, or the agent would never see our SIGTERM.
        // SAFETY: only async-signal-safe calls (sigemptyset, pthread_sigmask)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Agent {
            child: Some(child),
            bin: bin.to_owned(),
            bpffs: bpffs.to_owned(),
            log: log.to_owned(),
            socket,
        })
    }

    /// Where `rayfence status|explain|flows --socket` reach this agent.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until `/readyz` answers 200 (the first full sync is programmed).
    pub fn wait_ready(&mut self, node: &Netns, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            super::guard::check()?;
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the agent exited with {status} before it was ready; its log:\n{}",
                    self.log_tail(40)
                );
            }
            if let Ok((200, _)) = http_get(node, "/readyz") {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the agent was not ready after {timeout:?}; its log:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .map(|l| format!("  | {l}\n"))
            .collect()
    }

    /// Stops the agent and removes what it attached and pinned. Returns what
    /// `rayfence cleanup` said.
    pub fn stop(&mut self) -> Result<String> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            // An error (already reaped) counts as exited.
            while let Ok(None) = child.try_wait() {
                if Instant::now() > deadline {
                    println!(
                        "the agent did not exit within 5 s of SIGTERM: killing it; its log:\n{}",
                        self.log_tail(5)
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cleanup_bpffs(&self.bin, &self.bpffs)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// `rayfence cleanup --bpffs DIR`, then removes the (empty) directory.
pub fn cleanup_bpffs(bin: &Path, bpffs: &Path) -> Result<String> {
    if !bpffs.exists() {
        return Ok(String::new());
    }
    let out = Command::new(bin)
        .args(["cleanup", "--bpffs"])
        .arg(bpffs)
        .output()
        .with_context(|| format!("running {} cleanup", bin.display()))?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // Whatever cleanup left (nothing, normally) goes with the directory.
    let _ = std::fs::remove_dir_all(bpffs);
    if !out.status.success() {
        bail!(
            "rayfence cleanup failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(said)
}

/// `GET path` on the agent's metrics server, from inside the node namespace.
/// Returns the status code and the body.
pub fn http_get(node: &Netns, path: &str) -> Result<(u16, String)> {
    http_get_at(node, METRICS_ADDR.parse()?, path)
}

/// `GET path` on `addr` inside `node`'s namespace: status and body (de-chunked).
pub fn http_get_at(node: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    node.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok((code, body))
    })?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        s = after.trim_start_matches("\r\n");
    }
    out
}

/// `rayfence ARGS --socket SOCKET`: what the command prints, or its error.
pub fn command(bin: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    command_with_status(bin, socket, args, &[0]).map(|(_, out)| out)
}

/// `rayfence ARGS` against the agent's socket; an exit status in `ok` (`explain`
/// exits 1 for a denied flow) gives it and stdout, any other stderr as the error.
pub fn command_with_status(
    bin: &Path,
    socket: &Path,
    args: &[&str],
    ok: &[i32],
) -> Result<(i32, String)> {
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    match out.status.code() {
        Some(code) if ok.contains(&code) => {
            Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
        }
        _ => anyhow::bail!(
            "rayfence {} ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunk_joins_chunks() {
        assert_eq!(super::dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
