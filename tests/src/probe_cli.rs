//! The `rf-probe` command line: join an optional cgroup, then an optional network
//! namespace, then send or serve one kind of traffic and report one line.
//!
//! ```text
//! rf-probe [--cgroup DIR] [--netns NAME|PATH] COMMAND
//!   tcp-serve PORT [--report-peers]    echo server on [::]:PORT (v4 and v6); with
//!                                      --report-peers, one `peer ADDR` line per
//!                                      accepted connection (the source it sees)
//!   udp-serve PORT                     echo server on [::]:PORT (v4 and v6)
//!   tcp-connect ADDR PORT [--timeout-ms N]
//!   udp-probe ADDR PORT [--timeout-ms N]
//!   ping ADDR [--timeout-ms N]         ICMP / ICMPv6 echo on a raw socket
//!   tcp-hold ADDR PORT [--timeout-ms N]
//! ```
//!
//! Servers print `listening` once bound, then nothing (or the peers they accept,
//! when asked; IPv4-mapped IPv6 sources are printed as IPv4). Clients print exactly one of
//! `ok`, `timeout`, `refused`, `unreachable`, `reset`, `error: ...` and exit with
//! [`Outcome::exit_code`]. `tcp-hold` prints `connected` (or a failure), then for
//! every line read on stdin sends it, waits for the echo and prints one outcome
//! line; it exits on stdin EOF.
//!
//! Order matters: the cgroup is joined first (writing our pid to cgroup.procs needs
//! the host's mounts, which `setns(CLONE_NEWNET)` keeps anyway), then the network
//! namespace, all before any socket or thread exists.

use std::io::{BufRead, Read, Write};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::probe::Outcome;

const PAYLOAD: &[u8] = b"rf-probe\n";

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(outcome) => {
            println!("{}", outcome.as_line());
            outcome.exit_code()
        }
        Err(e) => {
            let o = Outcome::Error(format!("{e:#}").replace('\n', " "));
            println!("{}", o.as_line());
            o.exit_code()
        }
    }
}

fn run(args: &[String]) -> Result<Outcome> {
    let mut args = args.iter().map(String::as_str).peekable();
    let mut cgroup = None;
    let mut netns = None;
    let mut timeout = Duration::from_millis(1000);
    let mut report_peers = false;
    let mut rest = Vec::new();
    while let Some(a) = args.next() {
        match a {
            "--cgroup" => cgroup = Some(args.next().context("--cgroup needs a directory")?),
            "--netns" => netns = Some(args.next().context("--netns needs a name or path")?),
            "--report-peers" => report_peers = true,
            "--timeout-ms" => {
                let v = args.next().context("--timeout-ms needs a value")?;
                timeout = Duration::from_millis(v.parse().context("--timeout-ms")?);
            }
            other => rest.push(other),
        }
    }
    if let Some(dir) = cgroup {
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining cgroup {dir}"))?;
    }
    if let Some(ns) = netns {
        enter_netns(ns)?;
    }
    match rest.as_slice() {
        ["tcp-serve", port] => tcp_serve(port.parse().context("port")?, report_peers),
        ["udp-serve", port] => udp_serve(port.parse().context("port")?),
        ["tcp-connect", addr, port] => Ok(tcp_connect(sockaddr(addr, port)?, timeout)),
        ["udp-probe", addr, port] => Ok(udp_probe(sockaddr(addr, port)?, timeout)),
        ["ping", addr] => Ok(ping(addr.parse().context("address")?, timeout)),
        ["tcp-hold", addr, port] => tcp_hold(sockaddr(addr, port)?, timeout),
        other => {
            bail!("usage: rf-probe [--cgroup DIR] [--netns NAME] COMMAND ARGS (got {other:?})")
        }
    }
}

fn enter_netns(ns: &str) -> Result<()> {
    let path = if ns.contains('/') {
        ns.to_owned()
    } else {
        format!("/run/netns/{ns}")
    };
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: valid fd; the process is still single-threaded here.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: &str, port: &str) -> Result<SocketAddr> {
    let ip: IpAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    Ok(SocketAddr::new(
        ip,
        port.parse().with_context(|| format!("port {port}"))?,
    ))
}

fn listening() {
    println!("listening");
    let _ = std::io::stdout().flush();
}

fn dual_stack(ty: Type, protocol: Protocol, port: u16) -> Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, Some(protocol))?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())
        .with_context(|| format!("binding [::]:{port}"))?;
    Ok(s)
}

fn tcp_serve(port: u16, report_peers: bool) -> Result<Outcome> {
    let s = dual_stack(Type::STREAM, Protocol::TCP, port)?;
    s.listen(128)?;
    let listener: TcpListener = s.into();
    listening();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        if report_peers && let Ok(peer) = conn.peer_addr() {
            // Before the first echo, so a client that saw its echo can read the line.
            // A reader that went away must not end the server: errors are ignored.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "peer {}", peer.ip().to_canonical());
            let _ = out.flush();
        }
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    Ok(Outcome::Ok)
}

/// UDP echo that answers from the address each request was sent to (IP_PKTINFO /
/// IPV6_PKTINFO), as a DNS server does: on a multi-homed node the routing choice
/// of source (for example the bridge address) would otherwise differ from the
/// address the client connected to, and its connected socket would drop the reply.
fn udp_serve(port: u16) -> Result<Outcome> {
    let v4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    v4.set_reuse_address(true)?;
    v4.bind(&SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port).into())
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    setsockopt_one(&v4, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
    let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    v6.set_only_v6(true)?;
    v6.set_reuse_address(true)?;
    v6.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())
        .with_context(|| format!("binding [::]:{port}"))?;
    setsockopt_one(&v6, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
    listening();
    std::thread::spawn(move || udp_echo_loop(&v4, false));
    udp_echo_loop(&v6, true);
    Ok(Outcome::Ok)
}

fn setsockopt_one(s: &Socket, level: libc::c_int, name: libc::c_int) -> Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer and length of a c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn udp_echo_loop(s: &Socket, v6: bool) {
    let fd = s.as_raw_fd();
    let mut buf = [0u8; 65536];
    // u64 alignment satisfies cmsghdr's.
    let mut control = [0u64; 32];
    loop {
        // SAFETY: all-zero is a valid sockaddr_storage / msghdr.
        let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut peer).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
        if n < 0 {
            continue;
        }
        // Find the pktinfo and keep only it, with the destination as our source.
        let (want_level, want_type) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
        } else {
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
        };
        let mut found: Option<Vec<u8>> = None;
        // SAFETY: iterating cmsgs the kernel wrote within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == want_level && (*c).cmsg_type == want_type {
                    let data = libc::CMSG_DATA(c);
                    if v6 {
                        let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                        let bytes = std::slice::from_raw_parts(
                            (&raw const info).cast::<u8>(),
                            std::mem::size_of_val(&info),
                        );
                        found = Some(bytes.to_vec());
                    } else {
                        let mut info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                        info.ipi_spec_dst = info.ipi_addr;
                        info.ipi_ifindex = 0;
                        let bytes = std::slice::from_raw_parts(
                            (&raw const info).cast::<u8>(),
                            std::mem::size_of_val(&info),
                        );
                        found = Some(bytes.to_vec());
                    }
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        let mut out_control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: n as usize,
        };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_flags = 0;
        match &found {
            Some(info) => {
                // SAFETY: out_control is large enough for one pktinfo cmsg.
                unsafe {
                    let space = libc::CMSG_SPACE(info.len() as u32) as usize;
                    msg.msg_control = out_control.as_mut_ptr().cast();
                    msg.msg_controllen = space;
                    let c = libc::CMSG_FIRSTHDR(&raw const msg);
                    (*c).cmsg_level = want_level;
                    (*c).cmsg_type = want_type;
                    (*c).cmsg_len = libc::CMSG_LEN(info.len() as u32) as usize;
                    std::ptr::copy_nonoverlapping(info.as_ptr(), libc::CMSG_DATA(c), info.len());
                }
            }
            None => {
                msg.msg_control = std::ptr::null_mut();
                msg.msg_controllen = 0;
            }
        }
        // SAFETY: msg describes live buffers.
        unsafe { libc::sendmsg(fd, &raw const msg, 0) };
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match (e.kind(), e.raw_os_error()) {
        (TimedOut | WouldBlock, _) => Outcome::Timeout,
        (ConnectionRefused, _) => Outcome::Refused,
        (ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof, _) => Outcome::Reset,
        (_, Some(libc::EHOSTUNREACH | libc::ENETUNREACH)) => Outcome::Unreachable,
        // EPERM: a local filter (for example a cgroup_skb egress program) refused
        // to send; the packet did not leave, which for a probe is "blocked".
        (_, Some(libc::EPERM)) => Outcome::Error(format!("eperm: {e}")),
        _ => Outcome::Error(e.to_string()),
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn tcp_connect(to: SocketAddr, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    match roundtrip(&mut stream, PAYLOAD, deadline) {
        Ok(()) => Outcome::Ok,
        Err(o) => o,
    }
}

/// Writes `line` and reads until the same bytes came back or the deadline passed.
fn roundtrip(stream: &mut TcpStream, line: &[u8], deadline: Instant) -> Result<(), Outcome> {
    stream.write_all(line).map_err(|e| classify(&e))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(line) {
        let Some(left) = remaining(deadline) else {
            return Err(Outcome::Timeout);
        };
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| classify(&e))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(Outcome::Reset),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(classify(&e)),
        }
    }
    Ok(())
}

fn udp_probe(to: SocketAddr, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let local: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let sock = match UdpSocket::bind(local).and_then(|s| s.connect(to).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    // Resend every 200 ms: the first datagram may wait on neighbour resolution.
    let mut buf = [0u8; 2048];
    loop {
        if let Err(e) = sock.send(PAYLOAD) {
            return classify(&e);
        }
        let Some(left) = remaining(deadline) else {
            return Outcome::Timeout;
        };
        let _ = sock.set_read_timeout(Some(left.min(Duration::from_millis(200))));
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == PAYLOAD => return Outcome::Ok,
            Ok(_) => {}
            Err(e) => match classify(&e) {
                Outcome::Timeout => {}
                other => return other,
            },
        }
        if remaining(deadline).is_none() {
            return Outcome::Timeout;
        }
    }
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping(to: IpAddr, timeout: Duration) -> Outcome {
    match ping_inner(to, timeout) {
        Ok(o) => o,
        Err(e) => match e.downcast_ref::<std::io::Error>() {
            Some(io) => classify(io),
            None => Outcome::Error(format!("{e:#}")),
        },
    }
}

fn ping_inner(to: IpAddr, timeout: Duration) -> Result<Outcome> {
    let deadline = Instant::now() + timeout;
    let (domain, proto, req_type, reply_type) = match to {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))?;
    let ident = (std::process::id() & 0xffff) as u16;
    let dest: socket2::SockAddr = SocketAddr::new(to, 0).into();
    let mut seq = 0u16;
    loop {
        seq = seq.wrapping_add(1);
        let mut pkt = vec![req_type, 0, 0, 0];
        pkt.extend_from_slice(&ident.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"rf-probe-ping-16");
        if to.is_ipv4() {
            // The kernel computes the ICMPv6 checksum itself; ICMPv4 is ours.
            let c = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
        }
        sock.send_to(&pkt, &dest)?;
        let resend_at = Instant::now() + Duration::from_millis(250);
        loop {
            let Some(left) = remaining(deadline) else {
                return Ok(Outcome::Timeout);
            };
            let wait = left.min(resend_at.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(wait))?;
            let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(r) => r,
                // Back to the top: the deadline decides before a resend does, so a
                // probe shorter than the resend interval sends exactly one echo.
                Err(e) if matches!(classify(&e), Outcome::Timeout) => continue,
                Err(e) => return Err(e.into()),
            };
            // SAFETY: recv_from initialised the first n bytes.
            let data: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let icmp = match to {
                // Raw IPv4 sockets deliver the IP header too.
                IpAddr::V4(_) => match data.first() {
                    Some(b) => data.get(usize::from(b & 0x0f) * 4..).unwrap_or(&[]),
                    None => &[],
                },
                IpAddr::V6(_) => &data[..],
            };
            if icmp.len() < 8 {
                continue;
            }
            let from_ip = from.as_socket().map(|s| s.ip());
            if icmp[0] == reply_type && icmp[4..6] == ident.to_be_bytes() && from_ip == Some(to) {
                return Ok(Outcome::Ok);
            }
            // Destination unreachable about our request (it quotes our id).
            let unreach = if to.is_ipv4() { 3 } else { 1 };
            if icmp[0] == unreach && quotes_our_echo(icmp, ident, to.is_ipv4()) {
                return Ok(Outcome::Unreachable);
            }
        }
    }
}

fn quotes_our_echo(icmp: &[u8], ident: u16, v4: bool) -> bool {
    // ICMP error: 8-byte header, then the offending packet's IP header + 8 bytes.
    let inner = &icmp[8..];
    let ip_len = if v4 {
        inner
            .first()
            .map(|b| usize::from(b & 0x0f) * 4)
            .unwrap_or(0)
    } else {
        40
    };
    inner.get(ip_len + 4..ip_len + 6) == Some(&ident.to_be_bytes()[..])
}

fn tcp_hold(to: SocketAddr, timeout: Duration) -> Result<Outcome> {
    let mut stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return Ok(classify(&e)),
    };
    println!("connected");
    let _ = std::io::stdout().flush();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let outcome = match roundtrip(
            &mut stream,
            format!("{line}\n").as_bytes(),
            Instant::now() + timeout,
        ) {
            Ok(()) => Outcome::Ok,
            Err(o) => o,
        };
        println!("{}", outcome.as_line());
        let _ = std::io::stdout().flush();
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::inet_checksum;

    #[test]
    fn checksum_of_zeroed_echo_request_matches_reference() {
        // type 8, id 0, seq 0, no data: checksum 0xf7ff.
        assert_eq!(inet_checksum(&[8, 0, 0, 0, 0, 0, 0, 0]), 0xf7ff);
    }
}
