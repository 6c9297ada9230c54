//! Pod discovery with CRI-O's cgroups: conmon runs in the pod cgroup
//! (`crio-conmon-<id>[.scope]`, beside the container's `crio-<id>[.scope]`) but in
//! the node's network namespace. The locator must still reach the pod's own
//! namespace through the pod cgroup, whichever process the cgroup lists first, and
//! never take the pod for a host-networked one.

use anyhow::{Result, ensure};
use rayfence::discovery::cgroup::pids_below;
use rayfence::discovery::{Hook, HowFound, QosClass};
use rayfence_tests::discovery::{locator, pod_ref, unique_uid};
use rayfence_tests::kubelet::{self, CgroupDriver, ContainerRuntime};
use rayfence_tests::{Layout, Topology, probe_bin};

/// Which process comes first in the pod cgroup depends on how the kernel orders
/// the container and conmon directories (by a hash of their names): new pods are
/// made until both orders were seen, for both drivers.
#[test]
fn a_crio_pod_whose_conmon_is_in_the_node_namespace_is_found_through_its_own() -> Result<()> {
    let topo = Topology::with_pods(Layout::Bridged, probe_bin(), &["a"])?;
    let (node, pod) = (topo.node(0), topo.pod("a"));
    for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
        let (mut conmon_first, mut conmon_last) = (false, false);
        for _ in 0..24 {
            if conmon_first && conmon_last {
                break;
            }
            let tree = kubelet::KubeletTree::with_runtime(driver, ContainerRuntime::Crio)?;
            let uid = unique_uid();
            let qos = kubelet::QosClass::Burstable;
            let container = tree.pod_cgroup(&uid, qos)?;
            let conmon = tree.conmon_cgroup(&uid, qos)?.expect("CRI-O has conmon");
            let _conmon = node.prober().in_cgroup(&conmon).serve_tcp(7100)?;
            let _app = pod.prober_in(&container).serve_tcp(7000)?;
            let pod_dir = container.parent().expect("the pod cgroup");
            let conmon_pids = std::fs::read_to_string(conmon.join("cgroup.procs"))?;
            let first = pids_below(pod_dir).first().copied().expect("processes");
            if conmon_pids.lines().any(|l| l.trim() == first.to_string()) {
                conmon_first = true;
            } else {
                conmon_last = true;
            }
            let loc = locator(node, Some(tree.root().to_owned()), &[HowFound::PodNetns])?;
            let found = loc.locate(&pod_ref(pod, &uid, QosClass::Burstable))?;
            ensure!(
                found.hook == Hook::Tc,
                "{driver:?}: {:?} ({:?})",
                found.hook,
                found.misses
            );
            let host_if = found.host_interface.expect("host interface");
            ensure!(host_if.ifindex == pod.host_ifindex && host_if.via == HowFound::PodNetns);
            ensure!(found.cgroup.expect("cgroup").path == pod_dir);
        }
        ensure!(
            conmon_first && conmon_last,
            "{driver:?}: conmon listed first {conmon_first}, last {conmon_last}: both orders not seen"
        );
    }
    Ok(())
}
