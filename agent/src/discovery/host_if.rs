//! Finding a pod's host-side interface, three ways:
//!
//! 1. [`HowFound::PodNetns`]: through the pod's own network namespace (reached
//!    as `<host proc>/<pid>/ns/net` of a process in the pod cgroup, the first
//!    that is not in the host's namespace: CRI-O's conmon runs in the pod cgroup
//!    in the node's namespace): the
//!    interface holding the pod IP, its veth peer (`IFLA_LINK` +
//!    `IFLA_LINK_NETNSID`), and that peer in the host namespace. Works before any
//!    packet has flowed and in every layout that uses a veth.
//! 2. [`HowFound::RouteToVeth`]: `route get <pod IP>` in the host namespace
//!    leaves through a veth (routed layouts like Calico's: a /32 or /128 per pod).
//! 3. [`HowFound::BridgeFdb`]: the route leaves through a bridge (flannel's
//!    cni0): the neighbour entry for the pod IP gives its MAC, the bridge's FDB
//!    entry for that MAC gives the port. Needs the MAC to be learned, i.e. some
//!    traffic since the pod started.
//!
//! Every answer is checked: the host interface must be a veth whose peer is the
//! pod's interface (method 1 also compares namespace ids, since ifindexes repeat
//! across namespaces).
//!
//! This module only reads kernel state; it must not configure links, routes or
//! neighbours, nor move any thread but the short-lived ones that [`Rtnl`]
//! creates.

use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{RouteAttribute, RouteType};

use super::netlink::{LinkFacts, NetlinkError, Rtnl, interfaces_with_address};

/// Which method found a host interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HowFound {
    /// Via the pod's network namespace and its veth peer.
    PodNetns,
    /// The host's route to the pod IP leaves through the veth.
    RouteToVeth,
    /// Route to a bridge, then neighbour entry (MAC), then bridge FDB (port).
    BridgeFdb,
}

/// `pod-netns`, `route-to-veth`, `bridge-fdb`, as logs name it.
impl std::fmt::Display for HowFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HowFound::PodNetns => "pod-netns",
            HowFound::RouteToVeth => "route-to-veth",
            HowFound::BridgeFdb => "bridge-fdb",
        })
    }
}

impl HowFound {
    pub const ALL: [HowFound; 3] = [
        HowFound::PodNetns,
        HowFound::RouteToVeth,
        HowFound::BridgeFdb,
    ];
}

/// The pod's host-side interface, where TC programs attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub ifindex: u32,
    pub name: String,
    pub via: HowFound,
}

/// Why one method found no host interface (none of these is an error of the
/// agent: the caller falls back to the next method, then to the cgroup hook).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Miss {
    #[error("no process in the pod cgroup {cgroup} (not started yet, or finished)")]
    NoProcess { cgroup: PathBuf },
    #[error("no pod cgroup known, so no process to reach the pod's network namespace through")]
    NoCgroup,
    #[error("no pod IP given")]
    NoPodIp,
    #[error("no interface in the pod's network namespace ({netns}) holds {ips:?}")]
    NoPodInterface { netns: PathBuf, ips: Vec<IpAddr> },
    #[error("pod interface {name} is a {kind}, not a veth: it has no host-side peer")]
    PodInterfaceNotVeth { name: String, kind: String },
    #[error("pod veth {name} (ifindex {ifindex}) has its peer in its own namespace")]
    NoPeer { name: String, ifindex: u32 },
    #[error(
        "pod interface {name}'s peer is in another namespace than the host's (peer netnsid {peer_nsid}, host's {host_nsid:?})"
    )]
    PeerNotInHost {
        name: String,
        peer_nsid: i32,
        host_nsid: Option<i32>,
    },
    #[error("host ifindex {ifindex} is not a veth whose peer is pod ifindex {pod_ifindex}")]
    PeerMismatch { ifindex: u32, pod_ifindex: u32 },
    #[error("the pod shares the host's network namespace (host networking)")]
    HostNetworkNamespace,
    #[error("no route to {ip} in the host namespace")]
    NoRoute { ip: IpAddr },
    #[error("the route to {ip} goes via a gateway: not a local pod")]
    RouteViaGateway { ip: IpAddr },
    #[error(
        "the route to {ip} leaves through {name} ({kind}), neither a veth to another namespace nor a bridge"
    )]
    RouteNotToVethOrBridge {
        ip: IpAddr,
        name: String,
        kind: String,
    },
    #[error(
        "the route to {ip} through veth {name} is a /{prefix_len}, not a host route to one pod"
    )]
    NotAHostRoute {
        ip: IpAddr,
        name: String,
        prefix_len: u8,
    },
    #[error("the route to {ip} leaves through bridge {bridge}: that is for the FDB method")]
    RouteToBridge { ip: IpAddr, bridge: String },
    #[error("the route to {ip} leaves through veth {name}: no bridge to look up")]
    RouteNotToBridge { ip: IpAddr, name: String },
    #[error("no neighbour entry for {ip} on bridge {bridge} (no traffic yet?)")]
    NoNeighbour { ip: IpAddr, bridge: String },
    #[error("no FDB entry on bridge {bridge} for MAC {mac}")]
    NoFdbEntry { bridge: String, mac: String },
    #[error("FDB port {name} of bridge {bridge} is not a veth")]
    PortNotVeth { name: String, bridge: String },
    #[error("netlink failed: {0}")]
    Netlink(String),
}

impl From<NetlinkError> for Miss {
    fn from(e: NetlinkError) -> Self {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        Miss::Netlink(text)
    }
}

/// The host network namespace: where TC attaches.
#[derive(Debug)]
pub struct HostNetns {
    /// Open namespace file (kept open: its fd is passed in RTM_GETNSID, and
    /// the namespace cannot go away while the locator holds it).
    file: File,
    path: PathBuf,
    /// Namespace inode, to recognise host-network pods and to skip the setns
    /// thread when the calling thread is already there.
    ino: u64,
}

impl HostNetns {
    /// The namespace at `path`, or the calling thread's own (as of this call)
    /// when `None`.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let path = path.map_or_else(|| PathBuf::from(THREAD_NETNS), Path::to_path_buf);
        let file = File::open(&path)?;
        let ino = file.metadata()?.ino();
        Ok(HostNetns { file, path, ino })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A netlink socket in this namespace: made directly when the calling
    /// thread is in it (the usual case for a `hostNetwork` agent), else on a
    /// setns thread.
    pub fn rtnl(&self) -> Result<Rtnl, NetlinkError> {
        let here = std::fs::metadata(THREAD_NETNS).map(|m| m.ino()).ok();
        if here == Some(self.ino) {
            Rtnl::in_current()
        } else {
            Rtnl::in_netns_file(&self.file, &self.path)
        }
    }
}

/// The calling thread's network namespace.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why no pod network namespace was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodNetnsMiss {
    /// No process's namespace could be opened.
    NoneOpened,
    /// Every process is in the host's namespace.
    AllInHost,
}

/// The first of `opened` (a namespace and its inode) that is not the host's
/// namespace `host_ino`. Stops at the first such one: opening the rest is wasted.
fn first_pod_netns<T>(
    opened: impl IntoIterator<Item = (T, u64)>,
    host_ino: u64,
) -> Result<T, PodNetnsMiss> {
    let mut miss = PodNetnsMiss::NoneOpened;
    for (ns, ino) in opened {
        if ino != host_ino {
            return Ok(ns);
        }
        miss = PodNetnsMiss::AllInHost;
    }
    Err(miss)
}

/// Method 1, given the pids found in the pod cgroup `cgroup`.
pub fn via_pod_netns(
    host: &HostNetns,
    host_proc: &Path,
    cgroup: &Path,
    pids: &[u32],
    ips: &[IpAddr],
) -> Result<HostInterface, Miss> {
    // Every container of a pod shares the pause container's network namespace,
    // but not every process of the pod cgroup is a container's: CRI-O's conmon
    // runs there in the node's namespace. So the first namespace that is not the
    // host's; the host's only when every process is there (host networking).
    let opened = pids.iter().filter_map(|pid| {
        let path = host_proc.join(pid.to_string()).join("ns/net");
        let file = File::open(&path).ok()?;
        let ino = file.metadata().ok()?.ino();
        Some(((file, path), ino))
    });
    let (pod_ns, pod_ns_path) = match first_pod_netns(opened, host.ino) {
        Ok(found) => found,
        Err(PodNetnsMiss::AllInHost) => return Err(Miss::HostNetworkNamespace),
        Err(PodNetnsMiss::NoneOpened) => {
            return Err(Miss::NoProcess {
                cgroup: cgroup.to_path_buf(),
            });
        }
    };
    let mut pod = Rtnl::in_netns_file(&pod_ns, &pod_ns_path)?;

    // The pod's interface: the one with a pod IP, or, before the IP is known,
    // the only veth whose peer lives in another namespace.
    let pod_if = if ips.is_empty() {
        let veths: Vec<LinkFacts> = pod
            .links()?
            .iter()
            .map(LinkFacts::from_message)
            .filter(|l| l.is_veth() && l.link_netnsid.is_some())
            .collect();
        match <[LinkFacts; 1]>::try_from(veths) {
            Ok([only]) => only,
            Err(_) => {
                return Err(Miss::NoPodInterface {
                    netns: pod_ns_path,
                    ips: Vec::new(),
                });
            }
        }
    } else {
        let addresses = pod.addresses()?;
        let ifindex = ips
            .iter()
            .find_map(|ip| interfaces_with_address(&addresses, *ip).first().copied());
        let Some(ifindex) = ifindex else {
            return Err(Miss::NoPodInterface {
                netns: pod_ns_path,
                ips: ips.to_vec(),
            });
        };
        match pod.link(ifindex)? {
            Some(l) => LinkFacts::from_message(&l),
            None => {
                return Err(Miss::NoPodInterface {
                    netns: pod_ns_path,
                    ips: ips.to_vec(),
                });
            }
        }
    };
    if !pod_if.is_veth() {
        // macvlan, ipvlan, a physical function...: no host-side peer to hook.
        return Err(Miss::PodInterfaceNotVeth {
            name: pod_if.name,
            kind: pod_if.kind.unwrap_or_else(|| "none".into()),
        });
    }
    let (Some(peer_ifindex), Some(peer_nsid)) = (pod_if.link, pod_if.link_netnsid) else {
        return Err(Miss::NoPeer {
            name: pod_if.name,
            ifindex: pod_if.ifindex,
        });
    };
    // The peer is in the host namespace only if the id the pod namespace gives
    // the host namespace is the peer's (ifindexes alone repeat across namespaces).
    let host_nsid = pod.nsid_of(&host.file)?;
    if host_nsid != Some(peer_nsid) {
        return Err(Miss::PeerNotInHost {
            name: pod_if.name,
            peer_nsid,
            host_nsid,
        });
    }
    let mut rtnl = host.rtnl()?;
    let Some(host_link) = rtnl.link(peer_ifindex)? else {
        return Err(Miss::PeerMismatch {
            ifindex: peer_ifindex,
            pod_ifindex: pod_if.ifindex,
        });
    };
    let host_if = LinkFacts::from_message(&host_link);
    if !host_if.is_veth() || host_if.link != Some(pod_if.ifindex) {
        return Err(Miss::PeerMismatch {
            ifindex: peer_ifindex,
            pod_ifindex: pod_if.ifindex,
        });
    }
    Ok(HostInterface {
        ifindex: host_if.ifindex,
        name: host_if.name,
        via: HowFound::PodNetns,
    })
}

/// The output interface of the host's routing-table entry for `ip` and that
/// entry's prefix length, refusing routes via a gateway (those lead elsewhere).
fn route_oif(rtnl: &mut Rtnl, ip: IpAddr) -> Result<(LinkFacts, u8), Miss> {
    let Some(route) = rtnl.route_get(ip)? else {
        return Err(Miss::NoRoute { ip });
    };
    if route.header.kind != RouteType::Unicast {
        return Err(Miss::NoRoute { ip });
    }
    if route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Gateway(_)))
    {
        return Err(Miss::RouteViaGateway { ip });
    }
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let Some(oif) = oif else {
        return Err(Miss::NoRoute { ip });
    };
    match rtnl.link(oif)? {
        Some(l) => Ok((
            LinkFacts::from_message(&l),
            route.header.destination_prefix_length,
        )),
        None => Err(Miss::NoRoute { ip }),
    }
}

fn host_prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Method 2: a host route (/32, /128) to `ip` through a veth whose peer is in
/// another namespace.
pub fn via_route(host: &HostNetns, ip: IpAddr) -> Result<HostInterface, Miss> {
    let mut rtnl = host.rtnl()?;
    let (oif, prefix_len) = route_oif(&mut rtnl, ip)?;
    if oif.is_bridge() {
        return Err(Miss::RouteToBridge {
            ip,
            bridge: oif.name,
        });
    }
    if !oif.is_veth() || oif.link_netnsid.is_none() {
        return Err(Miss::RouteNotToVethOrBridge {
            ip,
            name: oif.name,
            kind: oif.kind.unwrap_or_else(|| "none".into()),
        });
    }
    if prefix_len != host_prefix_len(ip) {
        return Err(Miss::NotAHostRoute {
            ip,
            name: oif.name,
            prefix_len,
        });
    }
    Ok(HostInterface {
        ifindex: oif.ifindex,
        name: oif.name,
        via: HowFound::RouteToVeth,
    })
}

/// Method 3: route to a bridge, neighbour entry on it, FDB entry for the MAC.
pub fn via_bridge_fdb(host: &HostNetns, ip: IpAddr) -> Result<HostInterface, Miss> {
    let mut rtnl = host.rtnl()?;
    let (bridge, _) = route_oif(&mut rtnl, ip)?;
    if !bridge.is_bridge() {
        return Err(Miss::RouteNotToBridge {
            ip,
            name: bridge.name,
        });
    }
    let family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let mac = rtnl.neighbours(family)?.into_iter().find_map(|n| {
        if n.header.ifindex != bridge.ifindex
            || matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed
            )
        {
            return None;
        }
        let holds_ip = n.attributes.iter().any(|a| match (a, ip) {
            (NeighbourAttribute::Destination(NeighbourAddress::Inet(x)), IpAddr::V4(y)) => *x == y,
            (NeighbourAttribute::Destination(NeighbourAddress::Inet6(x)), IpAddr::V6(y)) => *x == y,
            _ => false,
        });
        if !holds_ip {
            return None;
        }
        n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) if !mac.is_empty() => Some(mac.clone()),
            _ => None,
        })
    });
    let Some(mac) = mac else {
        return Err(Miss::NoNeighbour {
            ip,
            bridge: bridge.name,
        });
    };
    // Learned entries only: the bridge's and its ports' own addresses are
    // permanent entries.
    let port =
        rtnl.neighbours(AddressFamily::Bridge)?
            .into_iter()
            .find_map(|n| {
                if n.header.state == NeighbourState::Permanent {
                    return None;
                }
                let same_mac = n
                    .attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if *m == mac));
                let on_bridge = n.attributes.iter().any(
                    |a| matches!(a, NeighbourAttribute::Controller(m) if *m == bridge.ifindex),
                );
                (same_mac && on_bridge).then_some(n.header.ifindex)
            });
    let Some(port) = port else {
        return Err(Miss::NoFdbEntry {
            bridge: bridge.name,
            mac: mac_string(&mac),
        });
    };
    let Some(link) = rtnl.link(port)? else {
        return Err(Miss::NoFdbEntry {
            bridge: bridge.name,
            mac: mac_string(&mac),
        });
    };
    let link = LinkFacts::from_message(&link);
    if !link.is_veth() || link.master != Some(bridge.ifindex) {
        return Err(Miss::PortNotVeth {
            name: link.name,
            bridge: bridge.name,
        });
    }
    Ok(HostInterface {
        ifindex: link.ifindex,
        name: link.name,
        via: HowFound::BridgeFdb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 4026531840;

    #[test]
    fn a_host_namespace_process_in_the_pod_cgroup_does_not_hide_the_pods_namespace() {
        // conmon (host namespace) listed before and after the container's process.
        assert_eq!(
            first_pod_netns([("conmon", HOST), ("pause", 77), ("app", 77)], HOST),
            Ok("pause")
        );
        assert_eq!(
            first_pod_netns([("pause", 77), ("conmon", HOST)], HOST),
            Ok("pause")
        );
    }

    #[test]
    fn only_host_namespace_processes_mean_host_networking_and_none_means_no_process() {
        assert_eq!(
            first_pod_netns([("conmon", HOST), ("app", HOST)], HOST),
            Err(PodNetnsMiss::AllInHost)
        );
        assert_eq!(
            first_pod_netns(Vec::<(&str, u64)>::new(), HOST),
            Err(PodNetnsMiss::NoneOpened)
        );
    }
}
