//! A kubelet's pod cgroups under a test-owned cgroup (what the agent is given as
//! `--cgroup-root`), laid out as the kubelet lays them out, and hostNetwork pods:
//! processes in such a pod cgroup that run in a node's own network namespace.
//!
//! | driver   | Guaranteed                                  | Burstable / BestEffort |
//! |----------|---------------------------------------------|------------------------|
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice`   | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/pod<uid>`                         | `kubepods/burstable/pod<uid>` |
//!
//! (`<uid_>`: the UID with `-` escaped to `_`.) Each pod cgroup gets the container
//! cgroups of its runtime ([`ContainerRuntime`]), where its processes run:
//!
//! | runtime    | systemd                                                     | cgroupfs |
//! |------------|-------------------------------------------------------------|----------|
//! | containerd | `cri-containerd-<id>.scope`                                 | `ctr` |
//! | CRI-O      | `crio-<id>.scope`, and `crio-conmon-<id>.scope` for conmon | `crio-<id>`, `crio-conmon-<id>` |
//!
//! CRI-O's conmon is a process of the pod cgroup in the node's network namespace
//! ([`KubeletTree::conmon_cgroup`]). `kubepods.slice` / `kubepods` is the kubelet's root of all pods: a
//! process anywhere below it belongs to some pod; a process outside it (the test
//! itself, the node probes of [`crate::topology::Node`]) is a host process, as the
//! kubelet and system daemons are.
//!
//! A hostNetwork pod ([`HostNetworkPod`]) is such a pod whose processes share the
//! node's network namespace: on the wire its packets carry the node's addresses;
//! only the socket's cgroup tells it from the node's own processes.
//!
//! [`KubeletTree::cgroupfs_on_hybrid`] is the cgroupfs driver on a hybrid host as it
//! really is: the pod cgroups in a cgroup v1 hierarchy only, the pods' processes in
//! cgroup v2 left in the runtime's service cgroup (`containerd.service`,
//! `crio.service`), outside any `kubepods` tree.
//!
//! This module never touches cgroups it did not create: everything lives below the
//! tree's root, which is removed (processes killed) on drop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::cgroup::{TestCgroup, V1Cgroup};
use crate::probe::{Outcome, Prober, Server};
use crate::topology::Node;

/// The kubelet's `--cgroup-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// The container runtime, which names the container cgroups below a pod cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerRuntime {
    Containerd,
    Crio,
}

impl ContainerRuntime {
    pub const ALL: [ContainerRuntime; 2] = [ContainerRuntime::Containerd, ContainerRuntime::Crio];

    /// `containerd`, `crio`.
    pub fn name(self) -> &'static str {
        match self {
            ContainerRuntime::Containerd => "containerd",
            ContainerRuntime::Crio => "crio",
        }
    }

    /// The container cgroup a pod's processes run in, below its pod cgroup.
    pub fn container_dir(self, driver: CgroupDriver, id: &str) -> String {
        match (self, driver) {
            (ContainerRuntime::Containerd, CgroupDriver::Systemd) => {
                format!("cri-containerd-{id}.scope")
            }
            (ContainerRuntime::Containerd, CgroupDriver::Cgroupfs) => "ctr".to_owned(),
            (ContainerRuntime::Crio, CgroupDriver::Systemd) => format!("crio-{id}.scope"),
            (ContainerRuntime::Crio, CgroupDriver::Cgroupfs) => format!("crio-{id}"),
        }
    }

    /// The cgroup of the runtime's per-container monitor, a sibling of the
    /// container's: CRI-O's conmon (with `conmon_cgroup = "pod"`); containerd has
    /// none there (its shim runs outside the pod).
    pub fn conmon_dir(self, driver: CgroupDriver, id: &str) -> Option<String> {
        match (self, driver) {
            (ContainerRuntime::Containerd, _) => None,
            (ContainerRuntime::Crio, CgroupDriver::Systemd) => {
                Some(format!("crio-conmon-{id}.scope"))
            }
            (ContainerRuntime::Crio, CgroupDriver::Cgroupfs) => Some(format!("crio-conmon-{id}")),
        }
    }

    /// The runtime's own service cgroup, where a pod's processes stay in cgroup v2
    /// when the kubelet makes pod cgroups in v1 only.
    pub fn service(self) -> &'static str {
        match self {
            ContainerRuntime::Containerd => "containerd.service",
            ContainerRuntime::Crio => "crio.service",
        }
    }
}

impl CgroupDriver {
    pub const ALL: [CgroupDriver; 2] = [CgroupDriver::Systemd, CgroupDriver::Cgroupfs];

    /// `systemd`, `cgroupfs`.
    pub fn name(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "systemd",
            CgroupDriver::Cgroupfs => "cgroupfs",
        }
    }
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// As the API server reports it.
    pub fn api(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    fn component(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// The kubelet's root of all pod cgroups, relative to its `--cgroup-root` `/`.
pub fn kubepods(driver: CgroupDriver) -> &'static str {
    match driver {
        CgroupDriver::Systemd => "kubepods.slice",
        CgroupDriver::Cgroupfs => "kubepods",
    }
}

/// A pod's cgroup, relative to the cgroup root (kubelet `--cgroup-root` `/`).
pub fn pod_cgroup_path(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Cgroupfs => {
            let mut p = PathBuf::from("kubepods");
            p.extend(qos.component());
            p.join(format!("pod{uid}"))
        }
        CgroupDriver::Systemd => {
            let escaped = uid.replace('-', "_");
            let mut p = PathBuf::from("kubepods.slice");
            match qos.component() {
                Some(q) => {
                    p.push(format!("kubepods-{q}.slice"));
                    p.push(format!("kubepods-{q}-pod{escaped}.slice"));
                }
                None => p.push(format!("kubepods-pod{escaped}.slice")),
            }
            p
        }
    }
}

/// The container id the kit gives a pod's one container: its UID without dashes.
fn container_id(uid: &str) -> String {
    uid.replace('-', "")
}

/// A kubelet cgroup tree under a fresh test cgroup; removed (everything in it
/// killed) on drop.
#[derive(Debug)]
pub struct KubeletTree {
    // Field order is drop order: the v2 tree (processes killed) first.
    root: TestCgroup,
    /// The cgroupfs driver on a hybrid host: the pod cgroups, in cgroup v1.
    v1: Option<V1Cgroup>,
    driver: CgroupDriver,
    runtime: ContainerRuntime,
}

impl KubeletTree {
    /// A tree of `driver` with containerd's container cgroups.
    pub fn new(driver: CgroupDriver) -> Result<Self> {
        Self::with_runtime(driver, ContainerRuntime::Containerd)
    }

    /// A tree of `driver` with `runtime`'s container cgroups, in cgroup v2.
    pub fn with_runtime(driver: CgroupDriver, runtime: ContainerRuntime) -> Result<Self> {
        Ok(KubeletTree {
            root: TestCgroup::new()?,
            v1: None,
            driver,
            runtime,
        })
    }

    /// The cgroupfs driver on a hybrid host: pod cgroups (and `runtime`'s
    /// container cgroups) in the `pids` v1 hierarchy only, under a test directory
    /// that stands for the kubelet's `--cgroup-root` ([`Self::kubelet_cgroup_root`]);
    /// in cgroup v2 the pods' processes run in `<root>/<runtime service>`, in no
    /// `kubepods` tree.
    pub fn cgroupfs_on_hybrid(runtime: ContainerRuntime) -> Result<Self> {
        Ok(KubeletTree {
            root: TestCgroup::new()?,
            v1: Some(V1Cgroup::new(crate::cgroup::V1_CONTROLLER)?),
            driver: CgroupDriver::Cgroupfs,
            runtime,
        })
    }

    pub fn runtime(&self) -> ContainerRuntime {
        self.runtime
    }

    /// The kubelet's `--cgroup-root` to give the agent (`--kubelet-cgroup-root`):
    /// the v1 test directory for [`Self::cgroupfs_on_hybrid`]; `None` (the kubelet's
    /// default `/`) otherwise.
    pub fn kubelet_cgroup_root(&self) -> Option<String> {
        self.v1.as_ref().map(V1Cgroup::as_kubelet_root)
    }

    /// Where the pod cgroups are, when they are in cgroup v1 only.
    pub fn v1_root(&self) -> Option<&Path> {
        self.v1.as_ref().map(V1Cgroup::path)
    }

    /// What to give the agent as `--cgroup-root`.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn driver(&self) -> CgroupDriver {
        self.driver
    }

    /// The kubelet's root of all pods (`<root>/kubepods.slice` or `<root>/kubepods`;
    /// in cgroup v2, so absent for [`Self::cgroupfs_on_hybrid`]).
    pub fn kubepods(&self) -> PathBuf {
        self.root.path().join(kubepods(self.driver))
    }

    /// Creates the pod cgroup of `uid` and its runtime's container cgroups
    /// (CRI-O's conmon sibling too); returns the cgroup v2 directory where the
    /// pod's processes go: its container's, or for [`Self::cgroupfs_on_hybrid`] the
    /// runtime's service cgroup.
    pub fn pod_cgroup(&self, uid: &str, qos: QosClass) -> Result<PathBuf> {
        let id = container_id(uid);
        let pod_base = match &self.v1 {
            Some(v1) => v1.path(),
            None => self.root.path(),
        };
        let pod = pod_base.join(pod_cgroup_path(self.driver, qos, uid));
        let mut dirs = vec![pod.join(self.runtime.container_dir(self.driver, &id))];
        dirs.extend(
            self.runtime
                .conmon_dir(self.driver, &id)
                .map(|conmon| pod.join(conmon)),
        );
        for dir in &dirs {
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        if self.v1.is_some() {
            return self.service_cgroup();
        }
        Ok(dirs.swap_remove(0))
    }

    /// The cgroup v2 directory where the pod's conmon runs (created by
    /// [`Self::pod_cgroup`]): `None` for containerd.
    pub fn conmon_cgroup(&self, uid: &str, qos: QosClass) -> Result<Option<PathBuf>> {
        let Some(conmon) = self.runtime.conmon_dir(self.driver, &container_id(uid)) else {
            return Ok(None);
        };
        if self.v1.is_some() {
            return self.service_cgroup().map(Some);
        }
        Ok(Some(
            self.root
                .path()
                .join(pod_cgroup_path(self.driver, qos, uid))
                .join(conmon),
        ))
    }

    /// `<root>/<runtime service>` in cgroup v2, made on first use.
    fn service_cgroup(&self) -> Result<PathBuf> {
        let dir = self.root.path().join(self.runtime.service());
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }
}

/// A pod with `spec.hostNetwork: true`: its processes run in its own pod cgroup
/// but in the node's network namespace.
#[derive(Debug)]
pub struct HostNetworkPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub qos: QosClass,
    /// Index of the node it runs on.
    pub node: usize,
    /// Its container cgroup.
    pub container: PathBuf,
    node_ips: [IpAddr; 2],
    prober: Prober,
}

impl HostNetworkPod {
    /// Makes the pod's cgroup in `tree`; its processes will run on `node`.
    pub fn new(
        tree: &KubeletTree,
        node: &Node,
        namespace: &str,
        name: &str,
        uid: &str,
        qos: QosClass,
    ) -> Result<Self> {
        let container = tree.pod_cgroup(uid, qos)?;
        Ok(HostNetworkPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            qos,
            node: node.index,
            prober: node.prober().in_cgroup(&container),
            container,
            node_ips: node.ips(),
        })
    }

    /// Probes from this pod: in the node's namespace, inside the pod's cgroup.
    pub fn prober(&self) -> Prober {
        self.prober.clone()
    }

    /// Its addresses: the node's.
    pub fn ips(&self) -> [IpAddr; 2] {
        self.node_ips
    }

    pub fn serve_tcp(&self, port: u16) -> Result<Server> {
        self.prober.serve_tcp(port)
    }

    pub fn tcp_connect(&self, addr: IpAddr, port: u16, timeout: Duration) -> Outcome {
        self.prober.tcp_connect(addr, port, timeout)
    }

    /// The Pod object: `spec.hostNetwork: true`, the node's addresses as its IPs
    /// (as the kubelet reports them), each TCP `ports` entry with hostPort equal
    /// to containerPort (what the API server defaults for host networking).
    pub fn manifest(&self, node_name: &str, labels: &[(&str, &str)], ports: &[u16]) -> Value {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let ips: Vec<Value> = self
            .node_ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": format!("p{p}"), "containerPort": p, "hostPort": p, "protocol": "TCP"}))
            .collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                         "labels": labels},
            "spec": {"nodeName": node_name, "hostNetwork": true,
                     "containers": [{"name": "c", "image": "x", "ports": ports}]},
            "status": {"phase": "Running", "qosClass": self.qos.api(),
                       "podIP": self.node_ips[0].to_string(), "podIPs": ips,
                       "hostIP": self.node_ips[0].to_string(), "hostIPs": ips},
        })
    }
}

/// NodeLocal DNSCache on a node: its hostNetwork pod (`k8s-app: node-local-dns`)
/// answering UDP and TCP port 53 (echo servers: a query comes back as its answer).
/// The servers listen on every address of the node where `node-cache` binds only its
/// `-localip` addresses, so a query to another node address is answered too unless
/// something drops it. The addresses and their device are the topology's
/// ([`crate::topology::Node::add_node_local_dns_interface`]).
#[derive(Debug)]
pub struct NodeLocalDns {
    pub pod: HostNetworkPod,
    /// Where pods send their queries (what the agent is told with `--dns-node-local`).
    pub addresses: Vec<IpAddr>,
    _servers: [Server; 2],
}

impl NodeLocalDns {
    /// The cache's labels, as its DaemonSet sets them.
    pub const LABELS: [(&str, &str); 1] = [("k8s-app", "node-local-dns")];

    /// The pod `namespace/name` (uid `uid`, Burstable as the DaemonSet's requests
    /// make it) on `node`, serving port 53; `addresses` are what it stands for.
    pub fn start(
        tree: &KubeletTree,
        node: &Node,
        namespace: &str,
        name: &str,
        uid: &str,
        addresses: &[IpAddr],
    ) -> Result<Self> {
        let pod = HostNetworkPod::new(tree, node, namespace, name, uid, QosClass::Burstable)?;
        let servers = [pod.prober.serve_udp(53)?, pod.prober.serve_tcp(53)?];
        Ok(NodeLocalDns {
            pod,
            addresses: addresses.to_vec(),
            _servers: servers,
        })
    }

    /// The Pod object, with the ports the DaemonSet declares: `dns` UDP 53, `dns-tcp`
    /// TCP 53, `metrics` TCP 9253 (host networking: each also a hostPort).
    pub fn manifest(&self, node_name: &str) -> Value {
        let mut pod = self.pod.manifest(node_name, &Self::LABELS, &[]);
        pod["spec"]["containers"][0]["ports"] = json!([
            {"name": "dns", "containerPort": 53, "hostPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "hostPort": 53, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9253, "hostPort": 9253, "protocol": "TCP"},
        ]);
        pod
    }

    /// The `--dns-node-local` value for these addresses.
    pub fn flag_value(&self) -> String {
        let all: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
        all.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_runtime_names_its_container_cgroups_per_driver() {
        let names = |runtime: ContainerRuntime, driver| {
            (
                runtime.container_dir(driver, "ab12"),
                runtime.conmon_dir(driver, "ab12"),
            )
        };
        assert_eq!(
            names(ContainerRuntime::Containerd, CgroupDriver::Systemd),
            ("cri-containerd-ab12.scope".into(), None)
        );
        assert_eq!(
            names(ContainerRuntime::Containerd, CgroupDriver::Cgroupfs),
            ("ctr".into(), None)
        );
        assert_eq!(
            names(ContainerRuntime::Crio, CgroupDriver::Systemd),
            (
                "crio-ab12.scope".into(),
                Some("crio-conmon-ab12.scope".into())
            )
        );
        assert_eq!(
            names(ContainerRuntime::Crio, CgroupDriver::Cgroupfs),
            ("crio-ab12".into(), Some("crio-conmon-ab12".into()))
        );
    }

    #[test]
    fn pod_cgroups_follow_the_kubelet_whatever_the_runtime() {
        assert_eq!(
            pod_cgroup_path(CgroupDriver::Systemd, QosClass::Burstable, "u-1"),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu_1.slice"
            )
        );
        assert_eq!(
            pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Guaranteed, "u-1"),
            PathBuf::from("kubepods/podu-1")
        );
    }
}
