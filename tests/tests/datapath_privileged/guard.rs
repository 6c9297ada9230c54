//! The CNI guard in the kernel: an entry written through the agent's pins (as the
//! plugin does) holds the veth fail-closed, survives an agent restart with the same
//! map sizes, and the agent's own write switches it to the pod's policy. Each test
//! runs in a network namespace of its own (the guard links the pinned programs to
//! its loopback, ifindex 1, which is also what BPF_PROG_TEST_RUN uses) and pins
//! under a unique bpffs directory it removes. Needs root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rayfence::datapath::guard::{self, Guarded};
use rayfence::datapath::{Capacities, Datapath, DatapathOptions, Hook, Interface, cleanup, paths};
use rayfence::tables::{EndpointPolicy, PolicyEntry, Tables};
use rayfence_common::{Direction, GUARD_ENDPOINT_ID, endpoint_flags, identity};
use rayfence_tests::packet::*;

const EP: u32 = 7;
const POLICY: u32 = 1;
const POD: &str = "10.0.0.7";
const NODE: &str = "10.0.0.1";
const PEER: &str = "10.0.0.8";
const PEER_ID: u32 = 300;
const STRANGER: &str = "10.9.9.9";

fn tables() -> Tables {
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
    tables.addresses.insert(ip(PEER), PEER_ID);
    tables.addresses.insert(ip(NODE), identity::HOST);
    for direction in Direction::ALL {
        tables
            .policy
            .insert(PolicyEntry::any(POLICY, direction, PEER_ID));
    }
    tables
}

/// A unique pin directory, cleaned up and removed on drop (even on panic).
struct Pins(PathBuf);

impl Pins {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Pins(PathBuf::from(format!(
            "/sys/fs/bpf/rf-guard-test-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = cleanup(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &Path) -> DatapathOptions {
    DatapathOptions {
        bpffs_dir: Some(dir.to_owned()),
        capacities: Capacities::small(),
        events_per_second: 0,
        ..DatapathOptions::default()
    }
}

/// Runs `f` on a thread in a new network namespace.
fn in_own_netns(f: impl FnOnce() + Send + 'static) {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn passes(dp: &Datapath, hook: Hook, frame: &[u8]) -> bool {
    dp.test_run(hook, frame, 1).expect("test run").passed
}

/// What the pod receives (TC egress of its host veth).
fn receive(dp: &Datapath, frame: &[u8]) -> bool {
    passes(dp, Hook::TcEgress, frame)
}

/// What the pod sends (TC ingress of its host veth).
fn send(dp: &Datapath, frame: &[u8]) -> bool {
    passes(dp, Hook::TcIngress, frame)
}

#[test]
fn a_guarded_veth_passes_only_the_node_until_the_agent_takes_it_over() {
    in_own_netns(|| {
        let pins = Pins::new();
        let mut dp = Datapath::load(&options(&pins.0)).expect("load (root needed)");
        dp.apply(&tables()).expect("apply");
        assert_eq!(
            guard::guard(&pins.0, 1, "ray", "head-0").expect("guard"),
            Guarded::Held
        );
        let info = dp.tc_endpoint(1).expect("read").expect("entry");
        assert_eq!(info.endpoint_id, GUARD_ENDPOINT_ID);
        assert_ne!(info.flags & endpoint_flags::GUARD, 0);
        assert!(paths::links_dir(&pins.0).join("tc_1_ingress").exists());
        assert!(paths::links_dir(&pins.0).join("tc_1_egress").exists());
        // Closed: only the node and link control.
        assert!(!receive(&dp, &tcp(PEER, 40000, POD, 80)));
        assert!(!receive(&dp, &tcp(STRANGER, 40000, POD, 80)));
        assert!(!send(&dp, &tcp(POD, 40000, PEER, 80)));
        assert!(receive(&dp, &tcp(NODE, 40000, POD, 10250)));
        assert!(receive(&dp, &arp()));
        let listed = guard::guards(&pins.0).expect("guards");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].holding);
        assert_eq!(
            (listed[0].namespace.as_str(), listed[0].pod.as_str()),
            ("ray", "head-0")
        );

        // A restart with the same sizes adopts the maps but not the guard (it is
        // not the agent's endpoint), and the guard keeps holding.
        drop(dp);
        let mut dp = Datapath::load(&options(&pins.0)).expect("reload");
        assert!(dp.attachments().is_empty(), "{:?}", dp.attachments());
        assert!(!receive(&dp, &tcp(STRANGER, 40000, POD, 80)));

        // The agent programs the pod: one write, its policy at once.
        dp.apply(&tables()).expect("apply");
        dp.attach_tc(EP, Interface::Index(1)).expect("attach");
        let info = dp.tc_endpoint(1).expect("read").expect("entry");
        assert_eq!(info.endpoint_id, EP);
        assert_eq!(info.flags & endpoint_flags::GUARD, 0);
        assert!(receive(&dp, &tcp(PEER, 40001, POD, 80)));
        assert!(!receive(&dp, &tcp(STRANGER, 40001, POD, 80)));
        assert_eq!(dp.take_guard_waits().len(), 1);
        assert!(guard::guards(&pins.0).expect("guards").is_empty());

        // A late or repeated ADD never replaces the agent's entry; a DEL leaves it.
        assert_eq!(
            guard::guard(&pins.0, 1, "ray", "head-0").expect("guard"),
            Guarded::AgentOwns
        );
        guard::unguard(&pins.0, 1).expect("unguard");
        assert_eq!(
            dp.tc_endpoint(1).expect("read").map(|i| i.endpoint_id),
            Some(EP)
        );
        assert!(paths::links_dir(&pins.0).join("tc_1_ingress").exists());
    });
}

#[test]
fn unguard_removes_a_guard_and_is_idempotent() {
    in_own_netns(|| {
        let pins = Pins::new();
        let dp = Datapath::load(&options(&pins.0)).expect("load (root needed)");
        guard::guard(&pins.0, 1, "ray", "worker-0").expect("guard");
        guard::guard(&pins.0, 1, "ray", "worker-0").expect("a retried ADD");
        guard::unguard(&pins.0, 1).expect("unguard");
        guard::unguard(&pins.0, 1).expect("unguard again");
        assert_eq!(dp.tc_endpoint(1).expect("read"), None);
        assert!(!paths::links_dir(&pins.0).join("tc_1_ingress").exists());
        assert!(guard::guards(&pins.0).expect("guards").is_empty());
    });
}

#[test]
fn guarded_namespaces_follow_what_the_agent_sets() {
    in_own_netns(|| {
        let pins = Pins::new();
        let mut dp = Datapath::load(&options(&pins.0)).expect("load (root needed)");
        assert_eq!(
            guard::pinned_state(&pins.0).expect("state"),
            guard::PinnedState::Present
        );
        let wanted = [("ray".to_owned(), 1), ("labelled".to_owned(), 2)].into();
        dp.set_guarded_namespaces(&wanted).expect("set");
        assert!(guard::namespace_guarded(&pins.0, "ray").expect("read"));
        assert!(guard::namespace_guarded(&pins.0, "labelled").expect("read"));
        assert!(!guard::namespace_guarded(&pins.0, "other").expect("read"));
        dp.set_guarded_namespaces(&[("labelled".to_owned(), 2)].into())
            .expect("set");
        assert!(!guard::namespace_guarded(&pins.0, "ray").expect("read"));
        assert!(guard::namespace_guarded(&pins.0, "labelled").expect("read"));
        drop(dp);
        cleanup(&pins.0).expect("cleanup");
        assert_eq!(
            guard::pinned_state(&pins.0).expect("state"),
            guard::PinnedState::Absent
        );
    });
}

#[test]
fn a_guarded_pod_may_query_the_dns_it_is_given_and_get_the_answers() {
    const DNS: &str = "10.96.0.10";
    in_own_netns(|| {
        let pins = Pins::new();
        let mut dp = Datapath::load(&options(&pins.0)).expect("load (root needed)");
        dp.apply(&tables()).expect("apply");
        dp.set_guard_dns(&[ip(DNS)].into(), false).expect("dns");
        guard::guard(&pins.0, 1, "ray", "worker-1").expect("guard");
        // A query and its answer, UDP and TCP.
        assert!(send(&dp, &udp(POD, 40000, DNS, 53)));
        assert!(receive(&dp, &udp(DNS, 53, POD, 40000)));
        assert!(send(&dp, &tcp(POD, 40001, DNS, 53)));
        // Nothing else: another port, another address, an unasked answer.
        assert!(!send(&dp, &udp(POD, 40000, DNS, 54)));
        assert!(!send(&dp, &udp(POD, 40000, STRANGER, 53)));
        assert!(!receive(&dp, &udp(DNS, 53, POD, 40002)));
        assert!(!receive(&dp, &udp(DNS, 5353, POD, 40000)));
        // Taken off the list: no new query passes.
        dp.set_guard_dns(&Default::default(), false).expect("dns");
        assert!(!send(&dp, &udp(POD, 40003, DNS, 53)));
        // Port 53 anywhere.
        dp.set_guard_dns(&Default::default(), true).expect("dns");
        assert!(send(&dp, &udp(POD, 40004, STRANGER, 53)));
        assert!(!send(&dp, &udp(POD, 40004, STRANGER, 80)));
    });
}
