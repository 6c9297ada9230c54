//! The datapath implements the lookup semantics of the tables contract: for random
//! tables (exact addresses, overlapping CIDRs with excepts, port-range rows, both
//! families, node addresses) and random new flows, the verdict of the eBPF programs
//! through BPF_PROG_TEST_RUN equals `Tables::allows`, on the TC and cgroup hooks.
//! Every probe uses a fresh source port, so each is a new flow. Needs root.

use std::net::IpAddr;

use rayfence::datapath::{Datapath, DatapathOptions, Hook};
use rayfence::tables::{EndpointPolicy, PolicyEntry, Tables, identity, protocol};
use rayfence_common::Direction;
use rayfence_tests::packet::*;

const EP: u32 = 3;
const POLICY: u32 = 9;
const POD4: &str = "10.0.0.1";
const POD6: &str = "fd00::1";

/// xorshift64*: deterministic, so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Peers live in 10.0.1.0/24 and fd00:1::/120 so that prefixes overlap a lot.
fn peer(rng: &mut Rng) -> IpAddr {
    let host = rng.below(256) as u8;
    if rng.below(2) == 0 {
        IpAddr::from([10, 0, 1, host])
    } else {
        let mut octets = [0u8; 16];
        octets[0] = 0xfd;
        octets[3] = 1;
        octets[15] = host;
        IpAddr::from(octets)
    }
}

fn prefix(rng: &mut Rng) -> ipnet::IpNet {
    let addr = peer(rng);
    let len = match addr {
        IpAddr::V4(_) => 24 + rng.below(9) as u8,
        IpAddr::V6(_) => 120 + rng.below(9) as u8,
    };
    ipnet::IpNet::new(addr, len).expect("valid prefix").trunc()
}

fn random_tables(rng: &mut Rng) -> Tables {
    let mut tables = Tables::default();
    tables.endpoints.insert(
        EP,
        EndpointPolicy {
            policy_id: POLICY,
            isolate_ingress: rng.below(4) != 0,
            isolate_egress: rng.below(4) != 0,
            audit: false,
        },
    );
    let identities: Vec<u32> = (300..304).collect();
    for _ in 0..12 {
        tables.addresses.insert(peer(rng), rng.pick(&identities));
    }
    for _ in 0..2 {
        tables.addresses.insert(peer(rng), identity::HOST);
    }
    for _ in 0..8 {
        tables
            .cidrs
            .insert(prefix(rng), rng.pick(&identities) + 100);
    }
    if rng.below(3) == 0 {
        tables.cidrs.insert("0.0.0.0/0".parse().unwrap(), 406);
        tables.cidrs.insert("::/0".parse().unwrap(), 406);
    }
    let peers: Vec<u32> = identities
        .iter()
        .flat_map(|id| [*id, id + 100])
        .chain([406])
        .collect();
    // Ports the node DNATs (some to identities with rows, one to a conflict-like
    // identity that has none): egress to a node address on them is decided there.
    for _ in 0..6 {
        let port = rayfence::tables::NodePort {
            protocol: rng.pick(&[protocol::TCP, protocol::UDP]),
            port: rng.below(72) as u16,
        };
        let id = rng.pick(&[300, 301, 400, 406, 500]);
        tables.node_ports.insert(port, id);
    }
    for _ in 0..30 {
        let direction = rng.pick(&Direction::ALL);
        let id = rng.pick(&peers);
        match rng.below(4) {
            0 => {
                tables
                    .policy
                    .insert(PolicyEntry::any(POLICY, direction, id));
            }
            _ => {
                let proto = rng.pick(&[protocol::TCP, protocol::UDP]);
                let start = rng.below(48) as u16;
                let end = start + rng.below(24) as u16;
                tables.policy.extend(PolicyEntry::for_port_range(
                    POLICY, direction, id, proto, start, end,
                ));
            }
        }
    }
    tables
}

fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .expect("cgroup v2 line");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|root| mounts.contains(&format!(" {root} cgroup2 ")))
        .expect("cgroup2 mount");
    std::fs::metadata(format!("{root}{path}"))
        .expect("cgroup dir")
        .ino()
}

fn check_seed(seed: u64) {
    let mut rng = Rng(seed);
    let tables = random_tables(&mut rng);
    let mut datapath = Datapath::load(&DatapathOptions::private()).expect("load (root needed)");
    datapath.register_tc(EP, 1).expect("register tc");
    datapath
        .register_cgroup(EP, own_cgroup_id())
        .expect("register cgroup");
    datapath.apply(&tables).expect("apply");
    let mut outcomes = [0u32; 2];
    for probe in 0..150u16 {
        let direction = rng.pick(&Direction::ALL);
        let remote = peer(&mut rng);
        let local = if remote.is_ipv4() { POD4 } else { POD6 };
        let (proto, port) = match rng.below(5) {
            0 => (protocol::UDP, rng.below(72) as u16),
            1 => (if remote.is_ipv4() { ICMP } else { ICMPV6 }, 0),
            _ => (protocol::TCP, rng.below(72) as u16),
        };
        // A fresh source port (or echo id) per probe: always a new flow.
        let fresh = 20_000 + probe;
        let (src, src_port, dst, dst_port) = match direction {
            Direction::Egress => (ip(local), fresh, remote, port),
            Direction::Ingress => (remote, fresh, ip(local), port),
        };
        let frame = match proto {
            protocol::TCP => tcp(&src.to_string(), src_port, &dst.to_string(), dst_port),
            protocol::UDP => udp(&src.to_string(), src_port, &dst.to_string(), dst_port),
            _ => echo(&src.to_string(), &dst.to_string(), fresh, false),
        };
        let expected_port = if proto == protocol::TCP || proto == protocol::UDP {
            dst_port
        } else {
            fresh
        };
        let expected = tables.allows(EP, direction, remote, proto, expected_port);
        outcomes[usize::from(expected)] += 1;
        let hooks = match direction {
            Direction::Egress => [Hook::TcIngress, Hook::CgroupEgress],
            Direction::Ingress => [Hook::TcEgress, Hook::CgroupIngress],
        };
        // The cgroup run comes second, on the conntrack entry the TC run may have
        // opened, so it gets a fresh flow of its own.
        let passed_tc = datapath.test_run(hooks[0], &frame, 1).expect("run").passed;
        assert_eq!(
            passed_tc, expected,
            "seed {seed} probe {probe}: {direction:?} {src}:{src_port} -> {dst}:{dst_port} proto {proto} on TC\n{tables:#?}"
        );
        let cg_frame = match proto {
            protocol::TCP => tcp(
                &src.to_string(),
                src_port + 10_000,
                &dst.to_string(),
                dst_port,
            ),
            protocol::UDP => udp(
                &src.to_string(),
                src_port + 10_000,
                &dst.to_string(),
                dst_port,
            ),
            _ => echo(&src.to_string(), &dst.to_string(), fresh + 10_000, false),
        };
        let cg_port = if proto == protocol::TCP || proto == protocol::UDP {
            dst_port
        } else {
            fresh + 10_000
        };
        // The cgroup hook, inside the pod's namespace, cannot tell who is behind a
        // node address: there it is an address known by nothing but its CIDR (a node
        // port is still decided on its backends).
        let expected_cg = if tables.addresses.get(&remote) == Some(&identity::HOST) {
            tables.allows_identified(EP, direction, remote, identity::NONE, proto, cg_port)
        } else {
            tables.allows(EP, direction, remote, proto, cg_port)
        };
        let passed_cg = datapath
            .test_run(hooks[1], &cg_frame, 1)
            .expect("run")
            .passed;
        assert_eq!(
            passed_cg, expected_cg,
            "seed {seed} probe {probe}: {direction:?} {src} -> {dst}:{dst_port} proto {proto} on cgroup\n{tables:#?}"
        );
    }
    // The random tables must exercise both verdicts to prove anything.
    assert!(
        outcomes.iter().all(|n| *n >= 10),
        "seed {seed}: {outcomes:?} (denied, allowed)"
    );
}

#[test]
fn datapath_verdicts_match_the_tables_contract_seeds_1_to_8() {
    for seed in 1..=8u64 {
        check_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

#[test]
fn datapath_verdicts_match_the_tables_contract_seeds_9_to_16() {
    for seed in 9..=16u64 {
        check_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}
