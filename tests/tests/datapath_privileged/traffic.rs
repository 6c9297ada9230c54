//! The datapath on real traffic: network namespaces for a node and its pods, in a
//! bridged (flannel cni0) and a routed (Calico) layout, the programs attached by
//! the agent's `Datapath` with pinned maps and links, and real TCP, UDP and ICMP
//! from `rf-probe`. Every test has its own namespaces, cgroups and bpffs directory,
//! all removed on drop (also on panic). Needs root.
//!
//! Exact counters: a probe whose timeout is shorter than its first retransmission
//! (TCP SYN after 1 s, UDP after 200 ms, ping after 250 ms) sends exactly one
//! packet, so a drop shows up as exactly one counted packet; an allowed connection
//! is exactly one new flow however many packets it carries.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use rayfence::datapath::{Capacities, Datapath, DatapathOptions, Interface, TcBackend};
use rayfence::tables::{EndpointPolicy, PolicyEntry, Tables, identity, protocol};
use rayfence_common::{Direction, Reason, Verdict};
use rayfence_tests::counters::{self, Counters};
use rayfence_tests::{Layout, Outcome, PodCgroup, Topology, names, probe_bin};

/// Allowed flows: long enough for neighbour resolution and a retransmission.
const OK: Duration = Duration::from_secs(3);
/// Denied TCP: shorter than the first SYN retransmission (1 s).
const DENIED_TCP: Duration = Duration::from_millis(700);
/// Denied UDP: shorter than rf-probe's first resend (200 ms).
const DENIED_UDP: Duration = Duration::from_millis(150);
/// Denied ping: shorter than rf-probe's first resend (250 ms).
const DENIED_PING: Duration = Duration::from_millis(200);

const EP: u32 = 1;
const POLICY: u32 = 10;
/// head: same RayCluster as worker (everything, both ways).
const CLUSTER_ID: u32 = 300;
/// other: may reach worker on TCP 8000 only; worker may reach other on UDP 5353.
const OTHER_ID: u32 = 301;

/// A private bpf filesystem mounted for one test (so the test never depends on,
/// or leaves anything in, the machine's /sys/fs/bpf), with the agent's directory
/// `.0` in it. On drop: `rayfence cleanup` of that directory, unmount, remove.
struct Bpffs(PathBuf, PathBuf);

impl Bpffs {
    /// Mounts left by test processes that were killed before their guards ran.
    fn sweep_dead() {
        let prefix = "rf-bpffs-";
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if Path::new("/proc").join(pid).exists() {
                continue;
            }
            drop(Bpffs(entry.path().join("rayfence"), entry.path()));
        }
    }

    fn new() -> Result<Self> {
        Self::sweep_dead();
        let mount = std::env::temp_dir().join(names::unique_name("bpffs"));
        std::fs::create_dir(&mount).with_context(|| format!("creating {}", mount.display()))?;
        let target = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())?;
        // SAFETY: NUL-terminated strings; a fresh bpffs instance on our own directory.
        let rc = unsafe {
            libc::mount(
                c"bpffs".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&mount);
            anyhow::bail!("mounting bpffs on {}: {error}", mount.display());
        }
        Ok(Self(mount.join("rayfence"), mount))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(error) = rayfence::datapath::cleanup(&self.0) {
            eprintln!("cleaning up {}: {error}", self.0.display());
        }
        if let Ok(target) = std::ffi::CString::new(self.1.as_os_str().as_encoded_bytes()) {
            // SAFETY: NUL-terminated path of the mount we made.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.1);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HookKind {
    /// TC through TCX links (what Linux 6.6+ gets).
    Tc,
    /// TC through a clsact qdisc and netlink filters (the pre-6.6 fallback, forced).
    Clsact,
    Cgroup,
}

/// A topology with pods head, worker and other; worker is the enforced endpoint.
struct Scenario {
    // Field order is drop order: the datapath, then the cgroups and namespaces,
    // then the pins.
    datapath: Option<Datapath>,
    cgroup: PodCgroup,
    topo: Topology,
    bpffs: Bpffs,
    hook: HookKind,
}

fn options(dir: &Path) -> DatapathOptions {
    options_for(dir, HookKind::Tc)
}

fn options_for(dir: &Path, hook: HookKind) -> DatapathOptions {
    DatapathOptions {
        tc_backend: if hook == HookKind::Clsact {
            TcBackend::Clsact
        } else {
            TcBackend::Auto
        },
        bpffs_dir: Some(dir.to_owned()),
        capacities: Capacities::small(),
        events_per_second: 100,
    }
}

fn tables(topo: &Topology) -> Tables {
    let node = topo.node(0);
    tables_for(
        topo.pod("head").ips(),
        topo.pod("other").ips(),
        [
            IpAddr::V4(node.ip4),
            IpAddr::V6(node.ip6),
            IpAddr::V4(node.gateway4),
            IpAddr::V6(node.gateway6),
        ],
    )
}

fn tables_for(head: [IpAddr; 2], other: [IpAddr; 2], node: [IpAddr; 4]) -> Tables {
    let mut tables = Tables::default();
    tables.endpoints.insert(
        EP,
        EndpointPolicy {
            policy_id: POLICY,
            isolate_ingress: true,
            isolate_egress: true,
            audit: false,
        },
    );
    for ip in head {
        tables.addresses.insert(ip, CLUSTER_ID);
    }
    for ip in other {
        tables.addresses.insert(ip, OTHER_ID);
    }
    for ip in node {
        tables.addresses.insert(ip, identity::HOST);
    }
    for direction in Direction::ALL {
        tables
            .policy
            .insert(PolicyEntry::any(POLICY, direction, CLUSTER_ID));
    }
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Ingress,
        OTHER_ID,
        protocol::TCP,
        8000,
        8000,
    ));
    tables.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Egress,
        OTHER_ID,
        protocol::UDP,
        5353,
        5353,
    ));
    tables
}

impl Scenario {
    /// Namespaces, cgroups and a bpffs mount, but no agent yet.
    fn without_agent(layout: Layout, hook: HookKind) -> Result<Self> {
        let topo = Topology::with_pods(layout, probe_bin(), &["head", "worker", "other"])?;
        let cgroup = PodCgroup::new()?;
        let bpffs = Bpffs::new()?;
        if hook == HookKind::Cgroup {
            topo.pod("worker").set_cgroup(Some(&cgroup.container));
        }
        Ok(Self {
            datapath: None,
            cgroup,
            topo,
            bpffs,
            hook,
        })
    }

    fn new(layout: Layout, hook: HookKind) -> Result<Self> {
        let topo = Topology::with_pods(layout, probe_bin(), &["head", "worker", "other"])?;
        let cgroup = PodCgroup::new()?;
        let bpffs = Bpffs::new()?;
        if hook == HookKind::Cgroup {
            topo.pod("worker").set_cgroup(Some(&cgroup.container));
        }
        let datapath = start_agent(&topo, &cgroup, &bpffs.0, hook)?;
        Ok(Self {
            datapath: Some(datapath),
            cgroup,
            topo,
            bpffs,
            hook,
        })
    }

    fn datapath(&self) -> &Datapath {
        self.datapath.as_ref().expect("agent running")
    }

    fn counters(&self) -> Counters {
        self.datapath().counters().expect("counters")
    }

    fn packets(&self, direction: Direction, verdict: Verdict, reason: Reason) -> u64 {
        counters::packets(&self.counters(), EP, direction, verdict, reason)
    }
}

/// What an agent does on start: load (adopting pinned maps), attach (adopting
/// pinned links), apply the tables.
fn start_agent(
    topo: &Topology,
    cgroup: &PodCgroup,
    bpffs: &Path,
    hook: HookKind,
) -> Result<Datapath> {
    let mut datapath = Datapath::load(&options_for(bpffs, hook))?;
    match hook {
        HookKind::Tc | HookKind::Clsact => {
            let ifname = topo.pod("worker").host_if.clone();
            // TCX attaches by name in the calling thread's network namespace: the
            // node's, never the machine's.
            datapath = topo.node(0).netns.run(move || -> Result<Datapath> {
                datapath.attach_tc(EP, Interface::Name(&ifname))?;
                Ok(datapath)
            })??;
        }
        HookKind::Cgroup => {
            datapath.attach_cgroup(EP, cgroup.pod.path())?;
        }
    }
    datapath.apply(&tables(topo))?;
    Ok(datapath)
}

/// The same checks for every layout and hook.
fn enforces_tcp_udp_and_icmp(layout: Layout, hook: HookKind) -> Result<()> {
    let scenario = Scenario::new(layout, hook)?;
    let topo = &scenario.topo;
    let (head, worker, other) = (topo.pod("head"), topo.pod("worker"), topo.pod("other"));
    let _worker_tcp = worker.serve_tcp(8000)?;
    let _worker_tcp_denied = worker.serve_tcp(7000)?;
    let _worker_udp = worker.serve_udp(8000)?;
    let _head_tcp = head.serve_tcp(6379)?;
    let _other_tcp = other.serve_tcp(9000)?;
    let _other_udp = other.serve_udp(5353)?;

    // Allowed: same cluster both ways, both families; each connection one new flow.
    for ip in head.ips() {
        assert_eq!(
            worker.tcp_connect(ip, 6379, OK),
            Outcome::Ok,
            "worker -> head {ip}"
        );
    }
    for ip in worker.ips() {
        assert_eq!(
            head.tcp_connect(ip, 8000, OK),
            Outcome::Ok,
            "head -> worker {ip}"
        );
    }
    assert_eq!(
        scenario.packets(Direction::Egress, Verdict::Allow, Reason::PolicyAllow),
        2,
        "{:?}",
        scenario.counters()
    );
    assert_eq!(
        scenario.packets(Direction::Ingress, Verdict::Allow, Reason::PolicyAllow),
        2
    );

    // other -> worker: TCP 8000 only.
    assert_eq!(other.tcp_connect(worker.ip4.into(), 8000, OK), Outcome::Ok);
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    assert_eq!(
        other.tcp_connect(worker.ip6.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    assert_eq!(
        other.udp_probe(worker.ip4.into(), 8000, DENIED_UDP),
        Outcome::Timeout
    );
    assert_eq!(
        scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        3
    );

    // worker -> other: UDP 5353 only.
    assert_eq!(worker.udp_probe(other.ip4.into(), 5353, OK), Outcome::Ok);
    assert_eq!(worker.udp_probe(other.ip6.into(), 5353, OK), Outcome::Ok);
    let before = scenario.packets(Direction::Egress, Verdict::Drop, Reason::NoPolicy);
    assert_eq!(before, 0);
    let denied = worker.tcp_connect(other.ip4.into(), 9000, DENIED_TCP);
    // A cgroup_skb egress drop is reported to the socket (EPERM); TC drops are silent.
    assert!(denied.is_blocked(), "{denied:?}");
    assert_eq!(
        scenario.packets(Direction::Egress, Verdict::Drop, Reason::NoPolicy),
        1
    );

    // ICMP echo: allowed where everything is (head), not to other. A denied ping
    // shorter than rf-probe's resend interval is exactly one echo request.
    assert_eq!(worker.ping(head.ip4.into(), OK), Outcome::Ok);
    assert_eq!(worker.ping(head.ip6.into(), OK), Outcome::Ok);
    assert!(worker.ping(other.ip4.into(), DENIED_PING).is_blocked());
    let pings = scenario.packets(Direction::Egress, Verdict::Drop, Reason::NoPolicy) - 1;
    assert_eq!(pings, 1, "echo requests dropped");
    if hook == HookKind::Tc {
        // The kernel answers pings itself, outside any socket: only TC sees them.
        assert_eq!(head.ping(worker.ip4.into(), OK), Outcome::Ok);
        assert!(other.ping(worker.ip4.into(), DENIED_PING).is_blocked());
        let pings = scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy) - 3;
        assert_eq!(pings, 1, "echo requests dropped");
    }

    let node = topo.node(0);
    if hook == HookKind::Tc {
        // The node's own processes (kubelet probes) always get through, uncounted.
        let drops_before = scenario.counters();
        assert_eq!(node.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
        assert_eq!(node.tcp_connect(worker.ip6.into(), 7000, OK), Outcome::Ok);
        assert_eq!(scenario.counters(), drops_before);
    } else {
        // Inside the pod's own namespace a node address cannot be told from what
        // the node forwards: only an address, so no rule here lets it in
        // (docs/semantics.md "What counts as the node", docs/semantics.md "What counts as the node").
        let before = scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy);
        let probe = node.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP);
        assert!(probe.is_blocked(), "{probe:?}");
        assert_eq!(
            scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
            before + 1
        );
    }
    Ok(())
}

#[test]
fn bridged_tc_enforces_tcp_udp_and_icmp() -> Result<()> {
    enforces_tcp_udp_and_icmp(Layout::Bridged, HookKind::Tc)
}

#[test]
fn routed_tc_enforces_tcp_udp_and_icmp() -> Result<()> {
    enforces_tcp_udp_and_icmp(Layout::Routed, HookKind::Tc)
}

#[test]
fn bridged_cgroup_enforces_tcp_udp_and_icmp() -> Result<()> {
    enforces_tcp_udp_and_icmp(Layout::Bridged, HookKind::Cgroup)
}

#[test]
fn routed_cgroup_enforces_tcp_udp_and_icmp() -> Result<()> {
    enforces_tcp_udp_and_icmp(Layout::Routed, HookKind::Cgroup)
}

fn restart_keeps_connections_and_denials(layout: Layout, hook: HookKind) -> Result<()> {
    let mut scenario = Scenario::new(layout, hook)?;
    let (head, worker, other) = (
        scenario.topo.pod("head"),
        scenario.topo.pod("worker"),
        scenario.topo.pod("other"),
    );
    let _head_tcp = head.serve_tcp(6379)?;
    let _worker_tcp = worker.serve_tcp(7000)?;
    let mut held = worker.tcp_hold(head.ip4.into(), 6379, OK)?;
    assert!(held.roundtrip());
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );

    // The agent goes away: its maps and links stay pinned and keep enforcing.
    drop(scenario.datapath.take());
    assert!(held.roundtrip(), "held connection while the agent is down");
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );

    // A new agent adopts maps, conntrack and links, and converges.
    scenario.datapath = Some(start_agent(
        &scenario.topo,
        &scenario.cgroup,
        &scenario.bpffs.0,
        scenario.hook,
    )?);
    let adopted = scenario.datapath();
    assert_eq!(adopted.tables(), &tables(&scenario.topo));
    assert!(held.roundtrip(), "held connection after the restart");
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    // Counters survived too: the three denied SYNs, one per phase.
    assert_eq!(
        scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        3
    );
    assert_eq!(
        scenario.packets(Direction::Egress, Verdict::Allow, Reason::PolicyAllow),
        1
    );
    Ok(())
}

#[test]
fn tc_restart_keeps_a_long_lived_connection_and_denials() -> Result<()> {
    restart_keeps_connections_and_denials(Layout::Bridged, HookKind::Tc)
}

#[test]
fn cgroup_restart_keeps_a_long_lived_connection_and_denials() -> Result<()> {
    restart_keeps_connections_and_denials(Layout::Routed, HookKind::Cgroup)
}

#[test]
fn revoking_a_rule_cuts_an_established_connection() -> Result<()> {
    let mut scenario = Scenario::new(Layout::Routed, HookKind::Tc)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let _worker_tcp = worker.serve_tcp(8000)?;
    let mut held = other.tcp_hold(worker.ip4.into(), 8000, OK)?;
    assert!(held.roundtrip());
    let mut revoked = tables(&scenario.topo);
    revoked
        .policy
        .retain(|row| !(row.identity == OTHER_ID && row.direction == Direction::Ingress));
    scenario
        .datapath
        .as_mut()
        .context("agent")?
        .apply(&revoked)?;
    assert!(!held.roundtrip(), "the connection outlived its rule");
    assert!(scenario.packets(Direction::Ingress, Verdict::Drop, Reason::Revoked) >= 1);
    Ok(())
}

/// Segments this TCP socket has sent so far (`tcpi_segs_out`, Linux 4.2+):
/// originals, retransmissions and bare ACKs alike.
fn segments_sent(socket: &std::net::TcpStream) -> Result<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "getsockopt(TCP_INFO): {}",
        std::io::Error::last_os_error()
    );
    Ok(info.tcpi_segs_out)
}

/// DenyAllIngress: the worker's ingress isolated, its egress not.
fn deny_all_ingress(mut tables: Tables) -> Tables {
    for endpoint in tables.endpoints.values_mut() {
        endpoint.isolate_egress = false;
    }
    tables
}

/// The gap this closes: with DenyAllIngress, a connection let in by an ingress rule
/// and then revoked must not resume when the pod (whose egress is open) writes to
/// it. Both ends are sockets of this process in the pods' namespaces, so the test
/// knows exactly how many segments each end sent after the revocation: every one of
/// them is a counted `revoked` drop, and no new flow is opened.
#[test]
fn a_revoked_connection_stays_cut_when_the_isolated_pod_writes_under_deny_all_ingress() -> Result<()>
{
    use std::io::{ErrorKind, Read as _, Write as _};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    let mut scenario = Scenario::new(Layout::Routed, HookKind::Tc)?;
    let tables = deny_all_ingress(tables(&scenario.topo));
    scenario
        .datapath
        .as_mut()
        .context("agent")?
        .apply(&tables)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let server_addr = SocketAddr::new(worker.ip4.into(), 8000);
    let listener = worker.netns.run(|| TcpListener::bind(server_addr))??;
    let mut client = other
        .netns
        .run(|| TcpStream::connect_timeout(&server_addr, OK))??;
    let (mut server, _) = listener.accept()?;
    for socket in [&client, &server] {
        socket.set_read_timeout(Some(OK))?;
        socket.set_nodelay(true)?;
    }
    let mut buf = [0u8; 16];
    client.write_all(b"ping")?;
    server.read_exact(&mut buf[..4])?;
    server.write_all(b"pong")?;
    client.read_exact(&mut buf[..4])?;
    assert_eq!(&buf[..4], b"pong");
    // Let delayed ACKs go out before counting segments.
    std::thread::sleep(Duration::from_millis(300));
    let allowed = BTreeMap::from([((Direction::Ingress, Verdict::Allow, Reason::PolicyAllow), 1)]);
    assert_eq!(rows(&scenario), allowed);

    let mut revoked = tables.clone();
    revoked
        .policy
        .retain(|row| !(row.identity == OTHER_ID && row.direction == Direction::Ingress));
    let (server_before, client_before) = (segments_sent(&server)?, segments_sent(&client)?);
    scenario
        .datapath
        .as_mut()
        .context("agent")?
        .apply(&revoked)?;

    // The isolated pod writes first: without the revoked flow's entry, its segment
    // would open an egress flow and the peer's ACKs would pass as its replies.
    server.write_all(b"secret")?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    match client.read(&mut buf) {
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the pod's write reached the peer: {other:?}"),
    }
    // The peer writes too: cut as well.
    client.write_all(b"more")?;
    server.set_read_timeout(Some(Duration::from_millis(700)))?;
    match server.read(&mut buf) {
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the peer's write reached the pod: {other:?}"),
    }

    // Both ends keep retransmitting: compare when no segment went out in between.
    let mut last = None;
    for _ in 0..50 {
        let sent = (segments_sent(&server)?, segments_sent(&client)?);
        let rows = rows(&scenario);
        if sent == (segments_sent(&server)?, segments_sent(&client)?) {
            last = Some((sent, rows));
            break;
        }
    }
    let ((server_sent, client_sent), rows) = last.context("segment counts kept moving")?;
    let (server_sent, client_sent) = (
        u64::from(server_sent - server_before),
        u64::from(client_sent - client_before),
    );
    eprintln!("segments sent after the revocation: pod {server_sent}, peer {client_sent}");
    assert!(
        server_sent >= 1 && client_sent >= 1,
        "{server_sent} {client_sent}"
    );
    let mut expected = allowed;
    expected.insert(
        (Direction::Egress, Verdict::Drop, Reason::Revoked),
        server_sent,
    );
    expected.insert(
        (Direction::Ingress, Verdict::Drop, Reason::Revoked),
        client_sent,
    );
    assert_eq!(
        rows, expected,
        "every segment since the revocation, and nothing else"
    );
    Ok(())
}

/// Every counter row of the worker: (direction, verdict, reason) -> packets.
fn rows(scenario: &Scenario) -> BTreeMap<(Direction, Verdict, Reason), u64> {
    counters::rows(&scenario.counters(), EP)
}

#[test]
fn cleanup_detaches_everything_and_removes_the_pins() -> Result<()> {
    let mut scenario = Scenario::new(Layout::Bridged, HookKind::Tc)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let _worker_tcp = worker.serve_tcp(7000)?;
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    drop(scenario.datapath.take());
    let report = rayfence::datapath::cleanup(&scenario.bpffs.0)?;
    assert_eq!(report.links, 2);
    assert!(!scenario.bpffs.0.exists());
    assert_eq!(other.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
    Ok(())
}

/// Environment of [`first_agent_process`]: `key=value` lines.
const FIRST_AGENT: &str = "RF_TEST_FIRST_AGENT";

/// Not a test of its own: the first agent of
/// `tc_agent_process_restart_keeps_a_connection_and_denials`, run as a separate
/// process (this test binary, `--ignored --exact`). It loads, attaches by name from
/// a thread inside the node namespace, pins, applies, says `ready`, and exits when
/// its stdin closes, leaving everything pinned.
#[test]
#[ignore = "helper process of the restart test, which runs it"]
fn first_agent_process() -> Result<()> {
    let Ok(spec) = std::env::var(FIRST_AGENT) else {
        return Ok(());
    };
    let field = |key: &str| -> Result<String> {
        spec.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("{FIRST_AGENT} has no {key}"))
    };
    let ips = |key: &str| -> Result<Vec<IpAddr>> {
        field(key)?
            .split(',')
            .map(|ip| ip.parse().with_context(|| format!("{key}: {ip}")))
            .collect()
    };
    let (head, other, node) = (ips("head")?, ips("other")?, ips("node")?);
    let tables = tables_for(
        [head[0], head[1]],
        [other[0], other[1]],
        [node[0], node[1], node[2], node[3]],
    );
    let bpffs = PathBuf::from(field("bpffs")?);
    let netns = std::fs::File::open(field("netns")?)?;
    let ifname = field("ifname")?;
    let mut datapath = Datapath::load(&options(&bpffs))?;
    datapath = std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<Datapath> {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns on a valid namespace fd; affects this thread only.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    anyhow::bail!("setns: {}", std::io::Error::last_os_error());
                }
                datapath.attach_tc(EP, Interface::Name(&ifname))?;
                Ok(datapath)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("attach thread panicked"))?
    })?;
    datapath.apply(&tables)?;
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

/// The first agent process, killed (and reaped) on drop. Its stdout is kept open
/// (and drained on stop) so the test harness in it can report without EPIPE.
struct AgentProcess(
    std::process::Child,
    Option<std::io::Lines<std::io::BufReader<std::process::ChildStdout>>>,
);

impl AgentProcess {
    fn start(scenario: &Scenario) -> Result<Self> {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let topo = &scenario.topo;
        let join = |ips: &[IpAddr]| {
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let node = topo.node(0);
        let spec = format!(
            "bpffs={}\nnetns={}\nifname={}\nhead={}\nother={}\nnode={}\n",
            scenario.bpffs.0.display(),
            node.netns.path().display(),
            topo.pod("worker").host_if,
            join(&topo.pod("head").ips()),
            join(&topo.pod("other").ips()),
            join(&[
                IpAddr::V4(node.ip4),
                IpAddr::V6(node.ip6),
                IpAddr::V4(node.gateway4),
                IpAddr::V6(node.gateway6),
            ]),
        );
        // The harness names a test by its path in the test binary, crate name left out.
        let helper = concat!(module_path!(), "::first_agent_process");
        let helper = helper.split_once("::").map_or(helper, |(_, path)| path);
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                helper,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FIRST_AGENT, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.trim_end().ends_with("ready"));
        let agent = Self(child, Some(lines));
        anyhow::ensure!(ready, "the first agent process did not get ready");
        Ok(agent)
    }

    /// Closes its stdin: it exits normally, leaving its pins behind.
    fn stop(mut self) -> Result<()> {
        drop(self.0.stdin.take());
        if let Some(lines) = self.1.take() {
            lines.map_while(Result::ok).for_each(drop);
        }
        let status = self.0.wait()?;
        anyhow::ensure!(status.success(), "first agent process: {status}");
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tc_agent_process_restart_keeps_a_connection_and_denials() -> Result<()> {
    let mut scenario = Scenario::without_agent(Layout::Routed, HookKind::Tc)?;
    let agent = AgentProcess::start(&scenario)?;
    let (head, worker, other) = (
        scenario.topo.pod("head"),
        scenario.topo.pod("worker"),
        scenario.topo.pod("other"),
    );
    let _head_tcp = head.serve_tcp(6379)?;
    let _worker_tcp = worker.serve_tcp(7000)?;
    let mut held = worker.tcp_hold(head.ip4.into(), 6379, OK)?;
    assert!(held.roundtrip());
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );

    // The agent process exits: enforcement stays.
    agent.stop()?;
    assert!(held.roundtrip(), "held connection while no agent runs");
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );

    // A new agent (this process) adopts maps, conntrack and links.
    scenario.datapath = Some(start_agent(
        &scenario.topo,
        &scenario.cgroup,
        &scenario.bpffs.0,
        scenario.hook,
    )?);
    assert_eq!(scenario.datapath().tables(), &tables(&scenario.topo));
    assert!(held.roundtrip(), "held connection after the restart");
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    assert_eq!(
        scenario.packets(Direction::Ingress, Verdict::Drop, Reason::NoPolicy),
        3
    );
    assert_eq!(
        scenario.packets(Direction::Egress, Verdict::Allow, Reason::PolicyAllow),
        1
    );
    Ok(())
}

#[test]
fn detach_stops_enforcement_and_unpins_the_links() -> Result<()> {
    let mut scenario = Scenario::new(Layout::Routed, HookKind::Tc)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let _worker_tcp = worker.serve_tcp(7000)?;
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    let links = scenario.bpffs.0.join("links");
    assert_eq!(std::fs::read_dir(&links)?.count(), 2);
    assert!(!scenario.counters().is_empty());
    scenario.datapath.as_mut().context("agent")?.detach(EP)?;
    assert_eq!(std::fs::read_dir(&links)?.count(), 0);
    assert!(scenario.counters().is_empty(), "{:?}", scenario.counters());
    assert_eq!(other.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
    assert!(scenario.datapath().attachments().is_empty());
    Ok(())
}

#[test]
fn cgroup_detach_stops_enforcement() -> Result<()> {
    let mut scenario = Scenario::new(Layout::Bridged, HookKind::Cgroup)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let _worker_tcp = worker.serve_tcp(7000)?;
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    scenario.datapath.as_mut().context("agent")?.detach(EP)?;
    assert_eq!(other.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
    Ok(())
}

#[test]
fn clsact_fallback_enforces_outlives_the_agent_and_is_cleaned_up() -> Result<()> {
    let mut scenario = Scenario::new(Layout::Routed, HookKind::Clsact)?;
    let (worker, other) = (scenario.topo.pod("worker"), scenario.topo.pod("other"));
    let node = scenario.topo.node(0);
    let _worker_tcp = worker.serve_tcp(7000)?;
    let _worker_allowed = worker.serve_tcp(8000)?;
    let filters = node
        .netns
        .exec(&["tc", "filter", "show", "dev", &worker.host_if, "egress"])?;
    assert!(filters.contains("tc_egress"), "{filters}");
    assert_eq!(other.tcp_connect(worker.ip4.into(), 8000, OK), Outcome::Ok);
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    drop(scenario.datapath.take());
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    // Filters are found through their markers, from inside their namespace only.
    assert!(rayfence::datapath::cleanup(&scenario.bpffs.0).is_err());
    let dir = scenario.bpffs.0.clone();
    let report = node
        .netns
        .run(move || rayfence::datapath::cleanup(&dir))??;
    assert_eq!(report.links, 2);
    let filters = node
        .netns
        .exec(&["tc", "filter", "show", "dev", &worker.host_if, "egress"])?;
    assert!(!filters.contains("tc_egress"), "{filters}");
    assert_eq!(other.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
    Ok(())
}

#[test]
fn clsact_resize_replaces_the_filters_programs_in_place() -> Result<()> {
    use rayfence_tests::background::Background;
    use std::sync::atomic::Ordering;

    let mut scenario = Scenario::new(Layout::Routed, HookKind::Clsact)?;
    let (head, worker, other) = (
        scenario.topo.pod("head"),
        scenario.topo.pod("worker"),
        scenario.topo.pod("other"),
    );
    let node = scenario.topo.node(0);
    let _head_tcp = head.serve_tcp(6379)?;
    let _worker_tcp = worker.serve_tcp(7000)?;
    let mut held = worker.tcp_hold(head.ip4.into(), 6379, OK)?;
    assert!(held.roundtrip());
    let (prober, target) = (other.prober(), IpAddr::from(worker.ip4));
    let knocking = Background::start(move |flag| {
        let (mut attempts, mut through) = (0u32, 0u32);
        while !flag.load(Ordering::Relaxed) {
            attempts += 1;
            if prober.tcp_connect(target, 7000, Duration::from_millis(20)) == Outcome::Ok {
                through += 1;
            }
        }
        (attempts, through)
    });
    let filters = |hook: &str| {
        node.netns
            .exec(&["tc", "filter", "show", "dev", &worker.host_if, hook])
    };
    // (filter "pref/handle", program id) per hook.
    let filter_ids = |shown: &str| -> Vec<String> {
        shown
            .lines()
            .filter(|l| l.contains(" handle "))
            .filter_map(|l| {
                let field = |name: &str| {
                    l.split_whitespace()
                        .skip_while(|w| *w != name)
                        .nth(1)
                        .map(str::to_owned)
                };
                Some(format!("{}/{}", field("pref")?, field("handle")?))
            })
            .collect()
    };
    let program_id = |shown: &str| -> Option<String> {
        shown
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .map(str::to_owned)
    };
    let mut programs_before = Vec::new();
    for hook in ["ingress", "egress"] {
        let shown = filters(hook)?;
        let ids = filter_ids(&shown);
        assert_eq!(ids.len(), 1, "{shown}");
        programs_before.push((ids[0].clone(), program_id(&shown)));
    }
    drop(scenario.datapath.take());

    // A larger agent, in the namespace the filters were attached in.
    let mut options = options_for(&scenario.bpffs.0, HookKind::Clsact);
    options.capacities.policy *= 4;
    options.capacities.conntrack *= 4;
    options.capacities.endpoints *= 4;
    let mut datapath = node.netns.run(move || Datapath::load(&options))??;
    for (hook, before) in ["ingress", "egress"].into_iter().zip(&programs_before) {
        let shown = filters(hook)?;
        assert_eq!(
            shown.matches(&format!("name tc_{hook}")).count(),
            1,
            "one filter per hook, kept: {shown}"
        );
        assert_eq!(
            filter_ids(&shown),
            vec![before.0.clone()],
            "the same filter (priority, handle): {shown}"
        );
        assert_ne!(
            program_id(&shown),
            before.1,
            "the filter's program was replaced: {shown}"
        );
    }
    assert!(held.roundtrip(), "held connection after the resize");
    let (attempts, through) = knocking.finish();
    assert_eq!(
        through, 0,
        "the denied peer got through ({attempts} attempts)"
    );
    assert!(attempts > 5, "too few attempts: {attempts}");

    // The filters run programs on the new maps: what this agent writes applies.
    let mut open = tables(&scenario.topo);
    open.policy.extend(PolicyEntry::for_port_range(
        POLICY,
        Direction::Ingress,
        OTHER_ID,
        protocol::TCP,
        7000,
        7000,
    ));
    datapath.apply(&open)?;
    assert_eq!(other.tcp_connect(worker.ip4.into(), 7000, OK), Outcome::Ok);
    datapath.apply(&tables(&scenario.topo))?;
    assert_eq!(
        other.tcp_connect(worker.ip4.into(), 7000, DENIED_TCP),
        Outcome::Timeout
    );
    assert!(held.roundtrip(), "held connection at the end");
    // Cleanup finds the filters through their markers, as before.
    drop(datapath);
    let dir = scenario.bpffs.0.clone();
    let report = node
        .netns
        .run(move || rayfence::datapath::cleanup(&dir))??;
    assert_eq!(report.links, 2);
    Ok(())
}
