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

pub use cgroup::{Cgroup2Mount, CgroupDriver, CgroupFoundBy, PodCgroupInfo, QosClass};
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
    #[error("no cgroup2 mount in {path}; pass --cgroup-root")]
    NoCgroup2Mount { path: PathBuf },
    #[error("opening the host network namespace {path} (--host-netns)")]
    HostNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: no host interface and no cgroup found; {}", describe_attempts(.cgroup_tried, .misses))]
    NotFound {
        pod: String,
        cgroup_tried: Vec<PathBuf>,
        misses: Vec<(HowFound, Miss)>,
    },
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
    host: HostNetns,
}

impl Locator {
    /// Resolves the cgroup2 mount and opens the host namespace, failing fast
    /// with the flag to fix.
    pub fn new(config: LocatorConfig) -> Result<Self, DiscoveryError> {
        let mountinfo = PathBuf::from("/proc/self/mountinfo");
        let detected = cgroup::find_cgroup2_mount(&mountinfo).map_err(|source| {
            DiscoveryError::ReadMountinfo {
                path: mountinfo.clone(),
                source,
            }
        })?;
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
            (None, None) => return Err(DiscoveryError::NoCgroup2Mount { path: mountinfo }),
        };
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
            host,
        })
    }

    pub fn config(&self) -> &LocatorConfig {
        &self.config
    }

    pub fn cgroup2_mount(&self) -> &Cgroup2Mount {
        &self.mount
    }

    /// The kubelet's pod cgroup roots present on this node (see
    /// [`cgroup::pod_cgroup_roots`]), with their ids.
    pub fn pod_cgroup_roots(&self, located: &[PathBuf]) -> Vec<(PathBuf, u64)> {
        cgroup::pod_cgroup_roots(&self.mount, &self.config.kubelet_cgroup_roots, located)
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
