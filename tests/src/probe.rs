//! Library side of the `rf-probe` binary: where to find it ([`ProbeBin`]), how to
//! run it in a namespace and optionally a cgroup ([`Prober`]), and what it reported
//! ([`Outcome`]). Servers ([`Server`]) and held connections ([`HeldConnection`])
//! are child processes killed on drop.
//!
//! Finding the binary: integration tests of this crate pass
//! `env!("CARGO_BIN_EXE_rf-probe")` to [`ProbeBin::at`] (cargo builds it for
//! them). [`ProbeBin::locate`] is the fallback for other callers: `$RF_PROBE`,
//! else `rf-probe` next to the running test executable or one directory up
//! (`target/<profile>/deps/x` -> `target/<profile>/rf-probe`).

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

/// What a probe reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The echo came back.
    Ok,
    /// Nothing came back in time (what a silent drop looks like).
    Timeout,
    /// TCP RST to a SYN, or ICMP port unreachable for UDP.
    Refused,
    /// ICMP host/net unreachable, or no route.
    Unreachable,
    /// An established connection was reset or closed.
    Reset,
    /// Anything else, including EPERM from a local egress filter.
    Error(String),
}

impl Outcome {
    pub fn as_line(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Refused => "refused".into(),
            Outcome::Unreachable => "unreachable".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Error(e) => format!("error: {e}"),
        }
    }

    pub fn parse(line: &str) -> Outcome {
        match line.trim() {
            "ok" => Outcome::Ok,
            "timeout" => Outcome::Timeout,
            "refused" => Outcome::Refused,
            "unreachable" => Outcome::Unreachable,
            "reset" => Outcome::Reset,
            other => Outcome::Error(other.strip_prefix("error: ").unwrap_or(other).to_owned()),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Ok => 0,
            Outcome::Error(_) => 1,
            Outcome::Timeout => 2,
            Outcome::Refused => 3,
            Outcome::Unreachable => 4,
            Outcome::Reset => 5,
        }
    }

    pub fn is_ok(&self) -> bool {
        *self == Outcome::Ok
    }

    /// The traffic did not get through: timeout, refused, unreachable, reset, or a
    /// local EPERM. (A harness failure, other `Error`s, is not "blocked".)
    pub fn is_blocked(&self) -> bool {
        match self {
            Outcome::Ok => false,
            Outcome::Error(e) => e.starts_with("eperm"),
            _ => true,
        }
    }
}

/// Path of the `rf-probe` executable.
#[derive(Debug, Clone)]
pub struct ProbeBin(PathBuf);

impl ProbeBin {
    /// Use this path (rf-demo's `--probe`; tests and benchmarks take [`probe_bin`]).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        ProbeBin(path.into())
    }

    /// `$RF_PROBE`, else `rf-probe` next to the current executable or its parent
    /// directory (the layout of `target/<profile>/deps/<test>`).
    pub fn locate() -> Result<Self> {
        if let Some(p) = std::env::var_os("RF_PROBE") {
            return Ok(ProbeBin(p.into()));
        }
        let exe = std::env::current_exe()?;
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("rf-probe");
            if candidate.is_file() {
                return Ok(ProbeBin(candidate));
            }
        }
        bail!(
            "rf-probe not found next to {} (build it with `cargo build -p rayfence-tests --bin rf-probe` or set RF_PROBE)",
            exe.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// The `rf-probe` cargo builds beside this crate's tests and benchmarks
/// (`target/<profile>/rf-probe`): the probe binary every test and benchmark of the
/// kit runs, found by [`ProbeBin::locate`] (so `$RF_PROBE` overrides it).
pub fn probe_bin() -> ProbeBin {
    ProbeBin::locate()
        .expect("rf-probe beside the test binary (cargo builds it for this crate's tests)")
}

/// Runs `rf-probe` inside one network namespace and, optionally, one cgroup.
#[derive(Debug, Clone)]
pub struct Prober {
    bin: ProbeBin,
    netns: PathBuf,
    cgroup: Option<PathBuf>,
}

/// How long a server may take to print `listening`.
const SERVER_START: Duration = Duration::from_secs(5);

impl Prober {
    pub fn new(bin: ProbeBin, netns: &Netns) -> Self {
        Prober {
            bin,
            netns: netns.path(),
            cgroup: None,
        }
    }

    /// The same prober, with its processes placed in cgroup `dir` (joined before
    /// entering the namespace).
    pub fn in_cgroup(&self, dir: &Path) -> Self {
        Prober {
            cgroup: Some(dir.to_owned()),
            ..self.clone()
        }
    }

    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    fn command(&self, args: &[String]) -> Command {
        let mut c = Command::new(self.bin.path());
        if let Some(cg) = &self.cgroup {
            c.arg("--cgroup").arg(cg);
        }
        c.arg("--netns").arg(&self.netns).args(args);
        c
    }

    fn one_shot(&self, args: Vec<String>) -> Outcome {
        let out = match self.command(&args).stdin(Stdio::null()).output() {
            Ok(o) => o,
            Err(e) => {
                return Outcome::Error(format!("spawning {}: {e}", self.bin.path().display()));
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().last() {
            Some(line) => Outcome::parse(line),
            None => Outcome::Error(format!(
                "no output ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.one_shot(with_timeout(
            &["tcp-connect".into(), addr.to_string(), port.to_string()],
            timeout,
        ))
    }

    pub fn udp_probe(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.one_shot(with_timeout(
            &["udp-probe".into(), addr.to_string(), port.to_string()],
            timeout,
        ))
    }

    pub fn ping(&self, addr: IpAddr, timeout: Duration) -> Outcome {
        self.one_shot(with_timeout(&["ping".into(), addr.to_string()], timeout))
    }

    /// A TCP echo server on `[::]:port` (v4 and v6), returned once it listens.
    pub fn serve_tcp(&self, port: u16) -> Result<Server> {
        self.serve("tcp-serve", port)
    }

    /// A UDP echo server on `[::]:port` (v4 and v6), returned once it is bound.
    pub fn serve_udp(&self, port: u16) -> Result<Server> {
        self.serve("udp-serve", port)
    }

    /// A TCP echo server like [`Prober::serve_tcp`] that also reports the source
    /// address of every connection it accepts ([`Server::take_peers`]): what a NAT
    /// on the way made of the client.
    pub fn serve_tcp_recording(&self, port: u16) -> Result<Server> {
        self.serve_with("tcp-serve", port, &["--report-peers"])
    }

    fn serve(&self, kind: &str, port: u16) -> Result<Server> {
        self.serve_with(kind, port, &[])
    }

    fn serve_with(&self, kind: &str, port: u16, flags: &[&str]) -> Result<Server> {
        let mut args = vec![kind.to_owned(), port.to_string()];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut child = self
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.path().display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let lines = line_reader(stdout);
        let started = lines.recv_timeout(SERVER_START);
        let recording = !flags.is_empty();
        let server = Server {
            child,
            port,
            peers: recording.then(|| Mutex::new(lines)),
        };
        match started {
            Ok(line) if line.trim() == "listening" => Ok(server),
            Ok(line) => bail!("{kind} {port}: {line}"),
            Err(_) => bail!("{kind} {port}: not listening after {SERVER_START:?}"),
        }
    }

    /// A long-lived TCP connection to `addr:port` (an echo server); each
    /// [`HeldConnection::roundtrip`] sends a line over the same connection.
    pub fn tcp_hold(&self, addr: IpAddr, port: u16, timeout: Duration) -> Result<HeldConnection> {
        let mut child = self
            .command(&with_timeout(
                &["tcp-hold".into(), addr.to_string(), port.to_string()],
                timeout,
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.path().display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let lines = line_reader(child.stdout.take().context("child stdout")?);
        let held = HeldConnection {
            child,
            stdin: Some(stdin),
            lines,
            timeout,
            seq: 0,
        };
        match held.lines.recv_timeout(timeout + Duration::from_secs(2)) {
            Ok(line) if line.trim() == "connected" => Ok(held),
            Ok(line) => bail!("tcp-hold {addr} {port}: {line}"),
            Err(_) => bail!("tcp-hold {addr} {port}: no answer"),
        }
    }
}

/// `[command args..., "--timeout-ms", N]`.
fn with_timeout(args: &[String], d: Duration) -> Vec<String> {
    let mut v = args.to_vec();
    v.push("--timeout-ms".into());
    v.push(d.as_millis().to_string());
    v
}

/// Lines of a child's stdout, read on a helper thread so callers can time out.
fn line_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running echo server; killed (and reaped) on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    port: u16,
    /// The `peer ADDR` lines of a recording server ([`Prober::serve_tcp_recording`]).
    peers: Option<Mutex<mpsc::Receiver<String>>>,
}

impl Server {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The source addresses of the connections accepted since the last call, in
    /// order; waits up to `wait` for the first one (a connection that just
    /// succeeded has been reported already, the line may still be in flight).
    /// Empty for a server that does not record, or when nothing came.
    pub fn take_peers(&self, wait: Duration) -> Vec<IpAddr> {
        let Some(lines) = &self.peers else {
            return Vec::new();
        };
        let lines = lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = Vec::new();
        let peer = |line: String| line.strip_prefix("peer ")?.trim().parse::<IpAddr>().ok();
        if let Ok(line) = lines.recv_timeout(wait) {
            seen.extend(peer(line));
        }
        while let Ok(line) = lines.try_recv() {
            seen.extend(peer(line));
        }
        seen
    }

    /// The peers of exactly the next `n` connections, waiting up to `within` in all
    /// for their reports (which can trail the connections on a loaded machine: one
    /// left unread would pass for a later connection); an error names what came.
    pub fn take_peers_exactly(&self, n: usize, within: Duration) -> anyhow::Result<Vec<IpAddr>> {
        let t0 = std::time::Instant::now();
        let mut seen = Vec::new();
        while seen.len() < n && t0.elapsed() < within {
            seen.extend(self.take_peers(within.saturating_sub(t0.elapsed())));
        }
        anyhow::ensure!(
            seen.len() == n,
            "the server saw {seen:?}, expected {n} connection(s)"
        );
        Ok(seen)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP connection kept open by a `tcp-hold` child; killed on drop.
#[derive(Debug)]
pub struct HeldConnection {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    timeout: Duration,
    seq: u64,
}

impl HeldConnection {
    /// Sends one line over the held connection and waits for its echo: true when
    /// the same connection still carries traffic both ways.
    pub fn roundtrip(&mut self) -> bool {
        self.roundtrip_outcome().is_ok()
    }

    /// Like [`HeldConnection::roundtrip`], with the reason when it fails.
    pub fn roundtrip_outcome(&mut self) -> Outcome {
        self.seq += 1;
        let Some(stdin) = self.stdin.as_mut() else {
            return Outcome::Error("closed".into());
        };
        if let Err(e) = writeln!(stdin, "hold-{}", self.seq).and_then(|()| stdin.flush()) {
            return Outcome::Error(format!("tcp-hold exited: {e}"));
        }
        match self
            .lines
            .recv_timeout(self.timeout + Duration::from_secs(2))
        {
            Ok(line) => Outcome::parse(&line),
            Err(_) => Outcome::Error("tcp-hold did not answer".into()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` until its outcome is (not) Ok, as `want_ok` says; the time that took.
/// Fails after `timeout`, naming `what` and the last outcome.
pub fn wait_outcome(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Outcome,
    want_ok: bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let o = probe();
        if o.is_ok() == want_ok {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < timeout,
            "{what}: still {o:?} after {timeout:?}"
        );
    }
}
