//! End to end: a pod attacks the real `rayfence agent`'s HTTP listener with real
//! sockets, a slowloris (connections from 48 source addresses sending a request
//! head one byte at a time, reopened as they are closed) and a connection flood,
//! while a new isolated pod is created. The listener binds the node's address
//! (`--metrics-bind-address`, as the DaemonSet does) and the probes a loopback
//! listener of their own (`--health-addr`), both with the default limits.
//!
//! Checked: the new pod is enforced within 1 s (an outsider's probes), the agent
//! keeps answering `/healthz` within 1 s, its RSS stays under a bound derived from
//! the connection cap, no slowloris connection outlives the header timeout by more
//! than the detection slack, both caps refuse connections and count them, and the
//! listener serves again once the attack stops.
//!
//! Needs root. Own topology, bpffs, manifests and kubelet cgroup tree; guards kill
//! the agent and clean up on panic too.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rayfence_tests::Outcome;
use rayfence_tests::agent::*;
use rayfence_tests::objects::json::*;
use rayfence_tests::probe::wait_outcome;
use serde_json::json;

const NODE: &str = "node-a";
const PORT: u16 = 9402;
/// The agent's defaults (`rayfence agent --help`).
const MAX_CONNECTIONS: usize = 256;
const MAX_PER_SOURCE: usize = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Source addresses the attacker adds to its interface: 48 x 16 = 768 slots
/// wanted, three times the global cap.
const SOURCES: u8 = 48;
/// Connections the slowloris keeps trying to hold per source (more than the cap).
const PER_SOURCE_ATTEMPTS: usize = 20;
/// How long the attack runs.
const ATTACK: Duration = Duration::from_secs(14);
/// A connection the server closes is noticed on the next byte or the one after
/// (a write after the FIN draws a reset; the write after that fails).
const DRIP: Duration = Duration::from_millis(200);
/// What the slowloris sends, one byte at a time, never finishing the head.
const HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: rayfence\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/set of this process's limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// `GET path` on the agent's root-only socket (served without caps).
fn socket_get(socket: &std::path::Path, path: &str) -> Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: rayfence\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// One slowloris connection.
struct Slow {
    stream: TcpStream,
    source: usize,
    /// The first byte written: the connection is established by then (the
    /// server's header timer runs from its accept, just before).
    first_byte: Option<Instant>,
    sent: usize,
}

impl Slow {
    fn age(&self) -> Duration {
        self.first_byte.map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// A connection started, not waited for (a SYN the full accept queue dropped
/// must not stall the drip of the others).
fn start_from(source: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
    socket
        .bind(&SocketAddr::new(source.into(), 0).into())
        .ok()?;
    socket.set_nonblocking(true).ok()?;
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(_) => return None,
    }
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).ok()?;
    Some(stream)
}

/// Opens a connection from `source` to `to` (in the attacker's namespace: the
/// socket stays there).
fn open_from(source: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).ok()?;
    socket
        .bind(&SocketAddr::new(source.into(), 0).into())
        .ok()?;
    socket
        .connect_timeout(&to.into(), Duration::from_secs(1))
        .ok()?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).ok()?;
    Some(stream)
}

#[derive(Default)]
struct SlowReport {
    opened: u64,
    /// Lifetimes of connections the server closed.
    lifetimes: Vec<Duration>,
    /// Connections alive at the end, and their ages.
    alive_at_end: Vec<Duration>,
}

#[test]
fn a_pod_flooding_the_listener_starves_neither_enforcement_nor_the_probes() -> Result<()> {
    raise_nofile();
    let sim = SimNode::new(&["attacker", "outsider", "fresh"], 700)?;
    let node = sim.topo.node(0);
    let attacker = sim.topo.pod("attacker");
    let outsider = sim.topo.pod("outsider");
    let fresh = sim.topo.pod("fresh");
    let _fresh_server = fresh.serve_tcp(8000)?;
    let ns = &sim.ns;

    let manifests = Manifests::new()?;
    manifests.write(
        "00-base.yaml",
        &[
            namespace(ns),
            node_object(NODE, node),
            pod_object(ns, attacker, &sim.uids[0], NODE, &[("app", "attacker")]),
            pod_object(ns, outsider, &sim.uids[1], NODE, &[("app", "outsider")]),
        ],
    )?;
    let bpffs = Bpffs::new();
    let node_ip = node.ip4.to_string();
    let agent = sim.start_agent(
        NODE,
        &manifests.dir,
        &bpffs,
        &[
            "--metrics-bind-address",
            &node_ip,
            "--health-addr",
            &format!("127.0.0.1:{PORT}"),
        ],
    )?;
    let target = SocketAddr::new(IpAddr::V4(node.ip4), PORT);
    // Not yet isolated: the outsider reaches the fresh pod.
    assert_eq!(
        outsider.tcp_connect(v4(fresh), 8000, Duration::from_millis(500)),
        Outcome::Ok
    );
    // Only the node's address is bound: the pod reaches it there, and nothing
    // listens on the bridge address.
    assert_eq!(
        attacker.tcp_connect(node.gateway4.into(), PORT, Duration::from_millis(500)),
        Outcome::Refused
    );
    let baseline = rss_kib(agent.pid())?;

    // The attacker's extra source addresses.
    let sources: Vec<Ipv4Addr> = (0..SOURCES)
        .map(|i| Ipv4Addr::new(10, 244, 0, 200 + i))
        .collect();
    for ip in &sources {
        attacker
            .netns
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    }

    let stop = AtomicBool::new(false);
    let flooded = AtomicU64::new(0);
    let attacker_ns = &attacker.netns;
    let pod_ip = attacker.ip4;
    let (report, during, peak, health_worst, enforced_after) =
        std::thread::scope(|scope| -> Result<_> {
            // The flood: connect and drop, as fast as it goes, from the pod's own address.
            let flood = scope.spawn(|| {
                attacker_ns
                    .run(|| {
                        while !stop.load(Ordering::Relaxed) {
                            if open_from(pod_ip, target).is_some() {
                                flooded.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                    .expect("flood");
            });
            // The slowloris, reopening whatever the server closes.
            let slowloris = scope.spawn(|| -> SlowReport {
                let mut report = SlowReport::default();
                let mut open: Vec<Slow> = Vec::new();
                let mut per_source = vec![0usize; sources.len()];
                while !stop.load(Ordering::Relaxed) {
                    // Top every source up to its attempts.
                    let wanted: Vec<usize> = (0..sources.len())
                        .flat_map(|s| std::iter::repeat_n(s, PER_SOURCE_ATTEMPTS - per_source[s]))
                        .collect();
                    let fresh: Vec<Slow> = attacker_ns
                        .run(|| {
                            wanted
                                .iter()
                                .filter_map(|&s| {
                                    start_from(sources[s], target).map(|stream| Slow {
                                        stream,
                                        source: s,
                                        first_byte: None,
                                        sent: 0,
                                    })
                                })
                                .collect::<Vec<_>>()
                        })
                        .expect("slowloris");
                    for slow in &fresh {
                        per_source[slow.source] += 1;
                    }
                    report.opened += fresh.len() as u64;
                    open.extend(fresh);
                    // One byte each; a failed write means the server closed it (or
                    // refused it: a reset at once).
                    open.retain_mut(|slow| {
                        let byte = &HEAD[slow.sent % HEAD.len()..][..1];
                        let alive = match slow.stream.write(byte) {
                            Ok(_) => {
                                slow.first_byte.get_or_insert_with(Instant::now);
                                slow.sent += 1;
                                true
                            }
                            // Still connecting.
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
                            Err(_) => false,
                        };
                        if !alive {
                            per_source[slow.source] -= 1;
                            // Refused ones die on their first bytes; only the ones
                            // that were served count.
                            if slow.sent > 3 {
                                report.lifetimes.push(slow.age());
                            }
                        }
                        alive
                    });
                    std::thread::sleep(DRIP);
                }
                report.alive_at_end = open.iter().map(Slow::age).collect();
                report
            });

            // While it runs: RSS sampled, the probes answered, and a new isolated pod.
            let outcome = (|| -> Result<_> {
                let t0 = Instant::now();
                let mut peak = baseline;
                let mut health_worst = Duration::ZERO;
                let mut enforced_after = None;
                while t0.elapsed() < ATTACK {
                    peak = peak.max(rss_kib(agent.pid())?);
                    let asked = Instant::now();
                    let (code, _) = agent.http_get(node, "/healthz")?;
                    ensure!(code == 200, "/healthz answered {code} under attack");
                    health_worst = health_worst.max(asked.elapsed());
                    if enforced_after.is_none() && t0.elapsed() > Duration::from_secs(4) {
                        // The attack has filled the listener by now: create the pod.
                        manifests.write(
                            "10-fresh.yaml",
                            &[
                                pod_object(ns, fresh, &sim.uids[2], NODE, &head_labels("fresh-rc")),
                                raycluster(ns, "fresh-rc", json!({"mode": "DenyAll"})),
                            ],
                        )?;
                        let took = wait_outcome(
                            "the outsider to the new isolated pod",
                            Duration::from_secs(1),
                            || outsider.tcp_connect(v4(fresh), 8000, Duration::from_millis(100)),
                            false,
                        )?;
                        enforced_after = Some(took);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let during = socket_get(&agent.socket, "/metrics")?;
                Ok((during, peak, health_worst, enforced_after))
            })();
            stop.store(true, Ordering::Relaxed);
            let report = slowloris.join().expect("slowloris thread");
            flood.join().expect("flood thread");
            let (during, peak, health_worst, enforced_after) = outcome?;
            Ok((report, during, peak, health_worst, enforced_after))
        })?;

    let refused = |reason: &str| {
        metric_sum(
            &during,
            "rayfence_http_connections_refused_total",
            &[("listener", "metrics"), ("reason", reason)],
        )
    };
    let open_during = metric_sum(
        &during,
        "rayfence_http_connections",
        &[("listener", "metrics")],
    );
    let longest = report.lifetimes.iter().max().copied().unwrap_or_default();
    let oldest_left = report
        .alive_at_end
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    println!(
        "RSS {baseline} KiB before, peak {peak} KiB under attack; /healthz worst {health_worst:?}; \
         new pod enforced after {enforced_after:?}; slowloris opened {}, {} served and closed by the \
         server (longest {longest:?}), {} left (oldest {oldest_left:?}); flood connections {}; \
         refused: global {}, per-source {}; open on the listener {open_during}",
        report.opened,
        report.lifetimes.len(),
        report.alive_at_end.len(),
        flooded.load(Ordering::Relaxed),
        refused("global-limit"),
        refused("per-source-limit"),
    );

    ensure!(enforced_after.is_some(), "the new pod was never created");
    ensure!(
        health_worst < Duration::from_secs(1),
        "/healthz took {health_worst:?}"
    );
    // The bound: what the agent had, plus every connection the cap allows at a
    // generous 64 KiB each (hyper's 16 KiB head buffer, its write buffer, the
    // task, the socket's user-space state: ~40 KiB measured at most), plus 8 MiB
    // for allocator slack. Without the caps, 3,000 such connections took 73 MiB.
    let bound = baseline + (MAX_CONNECTIONS as u64 * 64) + 8 * 1024;
    ensure!(peak < bound, "RSS peaked at {peak} KiB, above {bound} KiB");
    // The caps held and counted.
    ensure!(
        open_during <= MAX_CONNECTIONS as f64,
        "{open_during} connections open"
    );
    ensure!(
        refused("global-limit") > 0.0,
        "the global cap never refused"
    );
    ensure!(
        refused("per-source-limit") > 0.0,
        "the per-source cap never refused"
    );
    // The header timeout closed every slowloris connection that was served.
    ensure!(
        report.lifetimes.len() >= MAX_PER_SOURCE,
        "only {} slowloris connections were served and closed",
        report.lifetimes.len()
    );
    let slack = DRIP * 3 + Duration::from_millis(500);
    ensure!(
        longest < HEADER_TIMEOUT + slack,
        "a slowloris connection lived {longest:?}"
    );
    ensure!(
        oldest_left < HEADER_TIMEOUT + slack,
        "a slowloris connection is still open after {oldest_left:?}"
    );
    ensure!(
        longest > HEADER_TIMEOUT - Duration::from_millis(500),
        "served connections closed after {longest:?}, before the header timeout"
    );

    // Once the attack is over, the listener serves again on the node's address,
    // and every slot is free.
    let t1 = Instant::now();
    let code = loop {
        let code = node
            .netns
            .run(|| {
                rayfence_tests::http::get(target, "/readyz", &[], Duration::from_secs(2))
                    .map(|r| r.code)
            })?
            .unwrap_or(0);
        if code == 200 || t1.elapsed() > HEADER_TIMEOUT + Duration::from_secs(3) {
            break code;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(code == 200, "the listener answers {code} after the attack");
    let after = socket_get(&agent.socket, "/metrics")?;
    let open_after = metric_sum(
        &after,
        "rayfence_http_connections",
        &[("listener", "metrics")],
    );
    ensure!(open_after <= 1.0, "{open_after} connections still held");
    // The new pod stays enforced, and is a pod of its cluster to the node.
    assert!(
        outsider
            .tcp_connect(v4(fresh), 8000, Duration::from_millis(300))
            .is_blocked()
    );
    Ok(())
}

/// Sends `request` on a fresh connection to the agent (inside the node namespace)
/// and reads until the server closes or `wait` passes: (status line, whether the
/// server closed the connection, how long that took).
fn exchange(
    node: &rayfence_tests::Node,
    request: Vec<u8>,
    wait: Duration,
) -> Result<(String, bool, Duration)> {
    node.netns.run(move || -> Result<_> {
        let mut stream = TcpStream::connect(("127.0.0.1", PORT))?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let t0 = Instant::now();
        stream.write_all(&request)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) if t0.elapsed() < wait => {}
                Err(_) => break false,
            }
        };
        let text = String::from_utf8_lossy(&got).into_owned();
        let status = text.lines().next().unwrap_or_default().to_owned();
        Ok((status, closed, t0.elapsed()))
    })?
}

#[test]
fn oversized_heads_bodies_and_idle_connections_are_cut_before_any_route() -> Result<()> {
    let sim = SimNode::new(&["p"], 760)?;
    let node = sim.topo.node(0);
    let manifests = Manifests::new()?;
    manifests.write(
        "00-base.yaml",
        &[namespace(&sim.ns), node_object(NODE, node)],
    )?;
    let bpffs = Bpffs::new();
    let agent = sim.start_agent(NODE, &manifests.dir, &bpffs, &[])?;

    // A head over 16 KiB: 431, closed.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: rayfence\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let (status, closed, _) = exchange(node, big.into_bytes(), Duration::from_secs(2))?;
    ensure!(status.contains(" 431 "), "oversized head: {status:?}");
    ensure!(closed, "the connection stayed open after a 431");

    // A body, which no route reads: 413, closed, before anything else.
    let post =
        b"POST /metrics HTTP/1.1\r\nHost: rayfence\r\nContent-Length: 5\r\n\r\nhello".to_vec();
    let (status, closed, _) = exchange(node, post, Duration::from_secs(2))?;
    ensure!(status.contains(" 413 "), "a request body: {status:?}");
    ensure!(closed, "the connection stayed open after a 413");

    // A kept-alive connection left idle is closed after the header timeout.
    let get = b"GET /healthz HTTP/1.1\r\nHost: rayfence\r\n\r\n".to_vec();
    let (status, closed, took) = exchange(node, get, HEADER_TIMEOUT + Duration::from_secs(3))?;
    ensure!(status.contains(" 200 "), "/healthz: {status:?}");
    ensure!(closed, "an idle connection was kept past {took:?}");
    ensure!(
        took >= HEADER_TIMEOUT - Duration::from_millis(200)
            && took < HEADER_TIMEOUT + Duration::from_secs(1),
        "the idle connection closed after {took:?}"
    );
    // A response being streamed is not a head being read: a follow stream
    // outlives the header timeout.
    let follow = b"GET /v1/flows?follow=true HTTP/1.1\r\nHost: rayfence\r\n\r\n".to_vec();
    let (status, closed, took) = exchange(node, follow, HEADER_TIMEOUT + Duration::from_secs(2))?;
    ensure!(status.contains(" 200 "), "/v1/flows: {status:?}");
    ensure!(!closed, "the follow stream was cut after {took:?}");
    // The agent still serves.
    let (code, _) = agent.http_get(node, "/readyz")?;
    ensure!(code == 200, "/readyz answered {code}");
    Ok(())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) and its closing paren.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn set_nofile(pid: u32, soft: u64) -> Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit into `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: sets the agent's limit from `new`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    ensure!(rc == 0, "prlimit: {}", std::io::Error::last_os_error());
    Ok(old.rlim_cur)
}

#[test]
fn out_of_descriptors_the_listener_pauses_instead_of_spinning_and_recovers() -> Result<()> {
    let sim = SimNode::new(&["p"], 780)?;
    let node = sim.topo.node(0);
    let manifests = Manifests::new()?;
    manifests.write(
        "00-base.yaml",
        &[namespace(&sim.ns), node_object(NODE, node)],
    )?;
    let bpffs = Bpffs::new();
    let agent = sim.start_agent(NODE, &manifests.dir, &bpffs, &[])?;
    let pid = agent.pid();

    // No descriptor left: every accept fails with EMFILE while the connections
    // wait, complete, in the kernel's queue.
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let saved = set_nofile(pid, open_fds)?;
    let waiting: Vec<TcpStream> = node.netns.run(|| {
        (0..4)
            .filter_map(|_| TcpStream::connect(("127.0.0.1", PORT)).ok())
            .collect()
    })?;
    ensure!(
        waiting.len() == 4,
        "the kernel completed {} handshakes",
        waiting.len()
    );
    let ticks0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid)? - ticks0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let busy = ticks as f64 / hz / t0.elapsed().as_secs_f64();
    let warnings = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("accepting an HTTP connection failed"))
        .count();
    set_nofile(pid, saved)?;
    println!("out of descriptors for 3 s: CPU {busy:.3} of one core, {warnings} warnings");
    // A spinning accept loop would take a whole core.
    ensure!(
        busy < 0.2,
        "the agent used {busy:.3} of a core while out of descriptors"
    );
    ensure!(
        warnings == 1,
        "{warnings} warnings in 3 s (one per 10 s is the limit)"
    );

    // Descriptors back: the waiting connections are served, the listener lives.
    let mut served = 0;
    for mut stream in waiting {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: rayfence\r\nConnection: close\r\n\r\n")?;
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        if reply.starts_with("HTTP/1.1 200") {
            served += 1;
        }
    }
    ensure!(served == 4, "{served} of the 4 waiting connections served");
    let metrics = socket_get(&agent.socket, "/metrics")?;
    let errors = metric_sum(
        &metrics,
        "rayfence_http_accept_errors_total",
        &[("listener", "metrics")],
    );
    ensure!(errors >= 2.0, "{errors} accept errors counted");
    ensure!(
        errors <= 3.0 * 10.0 + 2.0,
        "{errors} accept errors: more than one per pause"
    );
    Ok(())
}
