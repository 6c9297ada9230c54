//! Pod discovery: where in the kernel a local pod lives, from kernel state alone.
//!
//! Given a pod as the API server describes it ([`PodRef`]: UID, IPs, QoS class,
//! host networking), [`Locator::locate`] finds its cgroup v2 directory and id
//! ([`cgroup`]), its host-side veth ([`host_if`]), and picks the hook: TC on the
//! host veth where there is one, `cgroup_skb` on the pod cgroup otherwise
//! ([`Hook`]). [`events`] reports links appearing in the host namespace, so that a
//! new pod's veth can be programmed before the API server reports the pod.
//!
//! Synchronous by design: every call is a handful of blocking netlink requests
//! and filesystem reads (well under a millisecond each); the agent calls
//! [`Locator::locate`] from `tokio::task::spawn_blocking` or a dedicated thread.
//! No thread of the caller ever changes namespace: sockets in other namespaces
//! are made on short-lived threads ([`netlink`]).
//!
//! ```no_run
//! use rayfence::discovery::{Hook, Locator, LocatorConfig, PodRef, QosClass};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let locator = Locator::new(LocatorConfig {
//!     host_proc: "/host/proc".into(),
//!     ..LocatorConfig::default()
//! })?;
//! let pod = PodRef {
//!     namespace: "ray".into(),
//!     name: "head-0".into(),
//!     uid: "0f1e2d3c-aaaa-bbbb-cccc-123456789abc".into(),
//!     qos_class: QosClass::from_api("Burstable"),
//!     ips: vec!["10.244.0.12".parse()?],
//!     host_network: false,
//! };
//! let found = locator.locate(&pod)?;
//! match found.hook {
//!     Hook::Tc => { /* attach TC to found.host_interface's ifindex */ }
//!     Hook::Cgroup => { /* attach cgroup_skb to found.cgroup's path */ }
//!     Hook::None(reason) => println!("not enforced: {reason:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! This module must not talk to the API server or a container runtime, must not
//! change any kernel state (links, routes, cgroups) and must not attach
//! programs: that is `datapath`'s job.

pub mod cgroup;
pub mod events;
pub mod host_if;
pub mod netlink;

use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use cgroup::{
    Cgroup2Mount, CgroupDriver, CgroupFoundBy, CgroupV1Mount, LayoutProblem, PodCgroupInfo,
    QosClass,
};
pub use events::{LinkEvent, LinkWatcher};
pub use host_if::{HostInterface, HostNetns, HowFound, Miss};

/// A local pod as the API server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.qosClass`; `None` (unknown) tries all three classes.
    pub qos_class: Option<QosClass>,
    /// `status.podIPs`; may be empty while the pod is Pending.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

impl PodRef {
    fn label(&self) -> String {
        format!("{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// Where to look. Each field maps to an agent flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatorConfig {
    /// `--cgroup-root`: the cgroup2 mount as the agent sees it; `None` finds it
    /// in `/proc/self/mountinfo` (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
    /// on hybrid hosts).
    pub cgroup_root: Option<PathBuf>,
    /// The kubelet's own `--cgroup-root` values to try (`/` when empty).
    pub kubelet_cgroup_roots: Vec<String>,
    /// `--host-proc`: the host's /proc (`/host/proc` in a DaemonSet that mounts
    /// it). The agent must share the host's pid namespace (`hostPID: true`), since
    /// `cgroup.procs` lists pids as the agent's pid namespace numbers them.
    pub host_proc: PathBuf,
    /// `--host-netns`: the namespace holding the pods' host-side interfaces
    /// (`/run/netns/NAME`, `/proc/1/ns/net`); `None` is the agent's own, right
    /// for a `hostNetwork: true` DaemonSet.
    pub host_netns: Option<PathBuf>,
    /// Interface methods, in the order tried.
    pub methods: Vec<HowFound>,
}

impl Default for LocatorConfig {
    fn default() -> Self {
        LocatorConfig {
            cgroup_root: None,
            kubelet_cgroup_roots: vec!["/".into()],
            host_proc: PathBuf::from("/proc"),
            host_netns: None,
            methods: HowFound::ALL.to_vec(),
        }
    }
}

/// Which program type enforces a pod's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// TC (TCX) on the host-side veth.
    Tc,
    /// `cgroup_skb` ingress/egress on the pod cgroup.
    Cgroup,
    /// Not enforced, for this reason.
    None(NoHookReason),
}

/// Why a pod gets no hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoHookReason {
    /// `spec.hostNetwork: true`: the pod is the node, as far as the network goes.
    HostNetwork,
    /// The API did not say host networking, but the pod's processes are in the
    /// host's network namespace.
    SharesHostNetns,
}

/// Where a pod lives, and how it will be enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub cgroup: Option<PodCgroupInfo>,
    pub host_interface: Option<HostInterface>,
    pub hook: Hook,
    /// The pod's own cgroup (found by its UID) has processes: a sandbox of this very
    /// pod is up. An interface found by the pod's IP alone does not prove that: the
    /// IP may already be another pod's.
    pub running: bool,
    /// The methods that found nothing before the answer (for logs).
    pub misses: Vec<(HowFound, Miss)>,
}

/// Why locating failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("reading {path} to find the cgroup2 mount")]
    ReadMountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no cgroup2 mount in {path}{}: rayfence needs cgroup v2 (pods are found by their \
         cgroup v2 directories, pods without a host veth are enforced on them, hostNetwork \
         pods are told from the node by them); run the node with cgroup v2 \
         (systemd.unified_cgroup_hierarchy=1), or pass --cgroup-root where cgroup2 is mounted",
        v1_only_note(.v1)
    )]
    NoCgroup2Mount { path: PathBuf, v1: Vec<PathBuf> },
    #[error(
        "--cgroup-root {path} is not on a cgroup2 filesystem ({found}): give the cgroup2 \
         mount as the agent sees it"
    )]
    NotCgroup2 { path: PathBuf, found: String },
    #[error("opening the host network namespace {path} (--host-netns)")]
    HostNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: no host interface and no cgroup found; {}{}", describe_attempts(.cgroup_tried, .misses), v1_pod_note(.cgroup_v1))]
    NotFound {
        pod: String,
        cgroup_tried: Vec<PathBuf>,
        misses: Vec<(HowFound, Miss)>,
        /// The pod's cgroup in a cgroup v1 hierarchy, when it has one there and none
        /// in cgroup v2.
        cgroup_v1: Option<PathBuf>,
    },
}

fn v1_only_note(v1: &[PathBuf]) -> String {
    if v1.is_empty() {
        String::new()
    } else {
        format!(
            " (cgroup v1 only: hierarchies at {})",
            cgroup::display_paths(v1)
        )
    }
}

fn v1_pod_note(cgroup_v1: &Option<PathBuf>) -> String {
    match cgroup_v1 {
        Some(path) => format!(
            "; its cgroup is in cgroup v1 only ({}): the kubelet's cgroupfs cgroup driver on a \
             hybrid host makes no cgroup v2 pod cgroups, and a pod without a host veth is \
             enforced on its cgroup v2 directory, so it cannot be enforced here (run the \
             kubelet with the systemd cgroup driver, or the node with cgroup v2 only)",
            path.display()
        ),
        None => String::new(),
    }
}

fn describe_attempts(cgroup_tried: &[PathBuf], misses: &[(HowFound, Miss)]) -> String {
    let mut s = String::from("cgroup paths tried: ");
    let paths: Vec<String> = cgroup_tried
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    s.push_str(&paths.join(", "));
    for (how, miss) in misses {
        let _ = write!(s, "; {how:?}: {miss}");
    }
    s
}

/// Finds local pods in the kernel. Cheap to share (`&self` methods, `Send + Sync`).
#[derive(Debug)]
pub struct Locator {
    config: LocatorConfig,
    mount: Cgroup2Mount,
    /// The cgroup v1 hierarchies, read only to say why a pod cgroup is missing.
    v1: Vec<CgroupV1Mount>,
    layout_problem: Option<LayoutProblem>,
    host: HostNetns,
}

impl Locator {
    /// Resolves the cgroup2 mount and opens the host namespace, failing fast
    /// with the flag to fix. A node whose kubelet keeps its pod cgroups in cgroup
    /// v1 only is logged as an error here, at start ([`Self::layout_problem`]).
    pub fn new(config: LocatorConfig) -> Result<Self, DiscoveryError> {
        let mountinfo = PathBuf::from("/proc/self/mountinfo");
        let text = std::fs::read_to_string(&mountinfo).map_err(|source| {
            DiscoveryError::ReadMountinfo {
                path: mountinfo.clone(),
                source,
            }
        })?;
        let detected = cgroup::parse_cgroup2_mount(&text);
        let v1 = cgroup::parse_cgroup_v1_mounts(&text);
        if let Some(root) = &config.cgroup_root {
            check_cgroup2(root)?;
        }
        let mount = match (&config.cgroup_root, detected) {
            // The given root is the mount point: take the mount's root field from
            // mountinfo; a sub-directory of the mount counts from its depth.
            (Some(root), Some(m)) if root.starts_with(&m.mount_point) => {
                let below = root.strip_prefix(&m.mount_point).unwrap_or(Path::new(""));
                Cgroup2Mount {
                    mount_point: root.clone(),
                    root: m.root.join(below),
                }
            }
            (Some(root), _) => Cgroup2Mount {
                mount_point: root.clone(),
                root: PathBuf::from("/"),
            },
            (None, Some(m)) => m,
            (None, None) => {
                return Err(DiscoveryError::NoCgroup2Mount {
                    path: mountinfo,
                    v1: v1.iter().map(|h| h.mount_point.clone()).collect(),
                });
            }
        };
        let layout_problem = cgroup::layout_problem(&mount, &v1, &config.kubelet_cgroup_roots);
        if let Some(problem) = &layout_problem {
            tracing::error!(%problem, "pod cgroups: this node's layout cannot be fully enforced");
        }
        let host = HostNetns::open(config.host_netns.as_deref()).map_err(|source| {
            DiscoveryError::HostNetns {
                path: config
                    .host_netns
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net")),
                source,
            }
        })?;
        Ok(Locator {
            config,
            mount,
            v1,
            layout_problem,
            host,
        })
    }

    /// What the node's cgroup layout keeps the agent from doing, found at start.
    pub fn layout_problem(&self) -> Option<&LayoutProblem> {
        self.layout_problem.as_ref()
    }

    pub fn config(&self) -> &LocatorConfig {
        &self.config
    }

    pub fn cgroup2_mount(&self) -> &Cgroup2Mount {
        &self.mount
    }

    /// The kubelet's pod cgroup roots present on this node (see
    /// [`cgroup::pod_cgroup_roots`]), with their ids: a socket below one is some
    /// pod's, never the node's. Where the layout keeps pod cgroups out of cgroup v2
    /// ([`LayoutProblem::PodsInV1Only`]) a pod's process cannot be told from the
    /// node's, so every top-level cgroup is one (fail closed: no process is the
    /// node; read again on every call, so new ones follow).
    pub fn pod_cgroup_roots(&self, located: &[PathBuf]) -> Vec<(PathBuf, u64)> {
        let mut roots =
            cgroup::pod_cgroup_roots(&self.mount, &self.config.kubelet_cgroup_roots, located);
        if let Some(LayoutProblem::PodsInV1Only { .. }) = &self.layout_problem {
            roots.extend(cgroup::every_top_level_cgroup(&self.mount));
            roots.sort();
            roots.dedup();
        }
        roots
    }

    /// The pod's cgroup, or every path tried.
    pub fn locate_cgroup(&self, pod: &PodRef) -> Result<PodCgroupInfo, Vec<PathBuf>> {
        cgroup::locate_pod_cgroup(
            &self.mount,
            &self.config.kubelet_cgroup_roots,
            pod.qos_class,
            &pod.uid,
        )
    }

    /// The pod's host interface by one method (`cgroup` is needed by
    /// [`HowFound::PodNetns`] only).
    pub fn find_host_interface(
        &self,
        how: HowFound,
        pod: &PodRef,
        cgroup: Option<&PodCgroupInfo>,
    ) -> Result<HostInterface, Miss> {
        match how {
            HowFound::PodNetns => {
                let cg = cgroup.ok_or(Miss::NoCgroup)?;
                let pids = cgroup::pids_below(&cg.path);
                if pids.is_empty() {
                    return Err(Miss::NoProcess {
                        cgroup: cg.path.clone(),
                    });
                }
                host_if::via_pod_netns(
                    &self.host,
                    &self.config.host_proc,
                    &cg.path,
                    &pids,
                    &pod.ips,
                )
            }
            HowFound::RouteToVeth | HowFound::BridgeFdb => {
                let mut last = Miss::NoPodIp;
                for ip in &pod.ips {
                    let found = match how {
                        HowFound::RouteToVeth => host_if::via_route(&self.host, *ip),
                        _ => host_if::via_bridge_fdb(&self.host, *ip),
                    };
                    match found {
                        Ok(i) => return Ok(i),
                        Err(miss) => last = miss,
                    }
                }
                Err(last)
            }
        }
    }

    /// Finds the pod's cgroup and host interface and picks the hook: TC where a
    /// host veth exists, cgroup otherwise, none for host-network pods. Fails only
    /// when neither an interface nor a cgroup is found.
    pub fn locate(&self, pod: &PodRef) -> Result<Location, DiscoveryError> {
        let (cgroup, cgroup_tried) = match self.locate_cgroup(pod) {
            Ok(info) => (Some(info), Vec::new()),
            Err(tried) => (None, tried),
        };
        if pod.host_network {
            return Ok(Location {
                running: running(cgroup.as_ref()),
                cgroup,
                host_interface: None,
                hook: Hook::None(NoHookReason::HostNetwork),
                misses: Vec::new(),
            });
        }
        let mut misses = Vec::new();
        let mut host_interface = None;
        for &how in &self.config.methods {
            match self.find_host_interface(how, pod, cgroup.as_ref()) {
                Ok(found) => {
                    host_interface = Some(found);
                    break;
                }
                Err(Miss::HostNetworkNamespace) => {
                    return Ok(Location {
                        running: running(cgroup.as_ref()),
                        cgroup,
                        host_interface: None,
                        hook: Hook::None(NoHookReason::SharesHostNetns),
                        misses,
                    });
                }
                Err(miss) => misses.push((how, miss)),
            }
        }
        let hook = match (&host_interface, &cgroup) {
            (Some(_), _) => Hook::Tc,
            (None, Some(_)) => Hook::Cgroup,
            (None, None) => {
                return Err(DiscoveryError::NotFound {
                    pod: pod.label(),
                    cgroup_tried,
                    misses,
                    cgroup_v1: cgroup::v1_pod_cgroup(
                        &self.v1,
                        &self.config.kubelet_cgroup_roots,
                        pod.qos_class,
                        &pod.uid,
                    ),
                });
            }
        };
        tracing::debug!(
            pod = %pod.label(),
            ?hook,
            host_interface = host_interface.as_ref().map(|h| h.name.as_str()),
            via = host_interface.as_ref().map(|h| tracing::field::display(h.via)),
            cgroup_id = cgroup.as_ref().map(|c| c.id),
            misses = misses.len(),
            "located pod"
        );
        Ok(Location {
            running: running(cgroup.as_ref()),
            cgroup,
            host_interface,
            hook,
            misses,
        })
    }

    /// For each mark, whether what it names is gone from the kernel: the sandbox it
    /// belonged to was torn down. A mark that cannot be checked (the link dump
    /// failed) counts as present: only evidence removes trust, never a failed look.
    pub fn sandboxes_gone(&self, marks: &[SandboxMark]) -> Vec<bool> {
        let wants_links = marks
            .iter()
            .any(|m| matches!(m, SandboxMark::Interface { .. }));
        let links: Option<std::collections::HashMap<u32, String>> = if wants_links {
            match self.host.rtnl().and_then(|mut rtnl| rtnl.links()) {
                Ok(links) => Some(
                    links
                        .iter()
                        .map(|l| {
                            let facts = netlink::LinkFacts::from_message(l);
                            (facts.ifindex, facts.name)
                        })
                        .collect(),
                ),
                Err(error) => {
                    tracing::debug!(%error, "listing host links to check sandboxes");
                    None
                }
            }
        } else {
            None
        };
        marks
            .iter()
            .map(|mark| match mark {
                // By index and name: a new link could in principle reuse the index.
                SandboxMark::Interface { ifindex, name } => links
                    .as_ref()
                    .is_some_and(|links| links.get(ifindex) != Some(name)),
                // The kubelet removes the pod cgroup with the pod; rmdir is final.
                SandboxMark::Cgroup(path) => {
                    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
                }
            })
            .collect()
    }
}

/// What an attached pod's sandbox is known by in the kernel: its host veth, or (for
/// a pod hooked on its cgroup) its pod cgroup. When it disappears, the kubelet has
/// torn the sandbox down, whatever the API server still says about the Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxMark {
    Interface { ifindex: u32, name: String },
    Cgroup(PathBuf),
}

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `CGROUP_SUPER_MAGIC` (a cgroup v1 hierarchy).
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// `--cgroup-root` must be on cgroup2: a v1 hierarchy or a plain directory there
/// would give ids no socket or hook ever carries, and nothing would be enforced.
fn check_cgroup2(root: &Path) -> Result<(), DiscoveryError> {
    let not_cgroup2 = |found: String| DiscoveryError::NotCgroup2 {
        path: root.to_owned(),
        found,
    };
    let c_path = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| not_cgroup2("a path with a NUL byte".into()))?;
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(not_cgroup2(io::Error::last_os_error().to_string()));
    }
    match stat.f_type as i64 {
        CGROUP2_SUPER_MAGIC => Ok(()),
        CGROUP_SUPER_MAGIC => Err(not_cgroup2("a cgroup v1 hierarchy".into())),
        other => Err(not_cgroup2(format!("filesystem type {other:#x}"))),
    }
}

/// Whether the pod's own cgroup has processes.
fn running(cgroup: Option<&PodCgroupInfo>) -> bool {
    cgroup.is_some_and(|c| !cgroup::pids_below(&c.path).is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_not_found_error_names_the_pod_and_every_attempt() {
        let e = DiscoveryError::NotFound {
            pod: "ray/head (uid u1)".into(),
            cgroup_tried: vec![PathBuf::from("/cg/kubepods/podu1")],
            misses: vec![
                (HowFound::PodNetns, Miss::NoCgroup),
                (
                    HowFound::RouteToVeth,
                    Miss::NoRoute {
                        ip: "10.0.0.1".parse().expect("ip"),
                    },
                ),
            ],
            cgroup_v1: None,
        };
        let text = e.to_string();
        assert!(text.contains("ray/head (uid u1)"), "{text}");
        assert!(text.contains("/cg/kubepods/podu1"), "{text}");
        assert!(
            text.contains("PodNetns") && text.contains("RouteToVeth: no route to 10.0.0.1"),
            "{text}"
        );
    }

    #[test]
    fn a_pod_whose_cgroup_is_in_cgroup_v1_only_is_told_why_it_cannot_be_enforced() {
        let e = DiscoveryError::NotFound {
            pod: "ray/mworker (uid u1)".into(),
            cgroup_tried: vec![PathBuf::from("/sys/fs/cgroup/unified/kubepods/podu1")],
            misses: vec![(HowFound::PodNetns, Miss::NoCgroup)],
            cgroup_v1: Some(PathBuf::from("/sys/fs/cgroup/pids/kubepods/podu1")),
        };
        let text = e.to_string();
        assert!(
            text.contains("its cgroup is in cgroup v1 only (/sys/fs/cgroup/pids/kubepods/podu1)"),
            "{text}"
        );
        assert!(
            text.contains("cgroupfs cgroup driver on a hybrid host"),
            "{text}"
        );
    }

    #[test]
    fn a_node_without_cgroup2_is_refused_naming_its_v1_hierarchies() {
        let e = DiscoveryError::NoCgroup2Mount {
            path: PathBuf::from("/proc/self/mountinfo"),
            v1: vec![PathBuf::from("/sys/fs/cgroup/pids")],
        };
        let text = e.to_string();
        assert!(
            text.contains("(cgroup v1 only: hierarchies at /sys/fs/cgroup/pids)"),
            "{text}"
        );
        assert!(text.contains("rayfence needs cgroup v2"), "{text}");
        let none = DiscoveryError::NoCgroup2Mount {
            path: PathBuf::from("/proc/self/mountinfo"),
            v1: Vec::new(),
        };
        assert!(!none.to_string().contains("v1 only"), "{none}");
    }

    #[test]
    fn a_cgroup_root_that_is_not_cgroup2_is_refused() {
        let e = check_cgroup2(Path::new("/proc")).expect_err("procfs is not cgroup2");
        assert!(
            e.to_string()
                .starts_with("--cgroup-root /proc is not on a cgroup2 filesystem"),
            "{e}"
        );
        assert!(check_cgroup2(Path::new("/nonexistent-rf")).is_err());
    }

    #[test]
    fn a_locator_can_be_shared_with_blocking_tasks() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Locator>();
        shareable::<Location>();
        shareable::<DiscoveryError>();
    }

    #[test]
    fn the_default_config_tries_the_netns_method_first_in_the_agents_own_namespace() {
        let c = LocatorConfig::default();
        assert_eq!(c.methods.first(), Some(&HowFound::PodNetns));
        assert_eq!(c.host_netns, None);
        assert_eq!(c.host_proc, PathBuf::from("/proc"));
    }
}
