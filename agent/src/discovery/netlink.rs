//! A small blocking rtnetlink client bound to one network namespace: the link,
//! address, route, neighbour, bridge-FDB and netns-id queries that discovery needs.
//!
//! A netlink socket belongs to the network namespace it was created in, for its
//! whole life. [`Rtnl::in_netns`] creates the socket on a short-lived thread that
//! has `setns(2)`'d into the target namespace, so neither the calling thread nor
//! any other thread of the agent ever changes namespace (a tokio worker thread
//! must never be moved into a pod's namespace).
//!
//! This module only reads kernel state: it must not send a request that changes
//! anything (no NEW*/DEL*/SET* messages).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// Large enough for one datagram of a dump (the kernel fills at most
/// max(32 KiB, page size) per datagram unless the receive buffer is larger).
const RECV_BUF: usize = 256 * 1024;

/// Why a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening network namespace {path}")]
    OpenNetns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("setns into network namespace {path}")]
    Setns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("creating a NETLINK_ROUTE socket")]
    Socket(#[source] io::Error),
    #[error("netlink {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink {what}: undecodable reply: {detail}")]
    Decode { what: &'static str, detail: String },
    #[error("netlink {what}: the kernel answered {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the thread that entered network namespace {path} panicked")]
    ThreadPanicked { path: String },
}

/// A NETLINK_ROUTE socket in one network namespace.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn in_current() -> Result<Self, NetlinkError> {
        Ok(Self::from_socket(socket_here(0)?))
    }

    /// A socket in the network namespace named by `path` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`), created on a dedicated thread that joins it.
    pub fn in_netns(path: &Path) -> Result<Self, NetlinkError> {
        let file = File::open(path).map_err(|source| NetlinkError::OpenNetns {
            path: path.display().to_string(),
            source,
        })?;
        Self::in_netns_file(&file, path)
    }

    /// Like [`Rtnl::in_netns`] with the namespace already open (`label` is for
    /// errors only).
    pub fn in_netns_file(file: &File, label: &Path) -> Result<Self, NetlinkError> {
        Ok(Self::from_socket(socket_in(file, label, 0)?))
    }

    fn from_socket(socket: Socket) -> Self {
        Rtnl {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        }
    }

    /// Sends `msg` and collects the replies: every part of a dump, or the single
    /// answer to a plain request.
    fn request(
        &mut self,
        what: &'static str,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = if dump {
            NLM_F_REQUEST | NLM_F_DUMP
        } else {
            NLM_F_REQUEST
        };
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|source| NetlinkError::Io { what, source })?;

        let mut replies = Vec::new();
        loop {
            self.buf.clear();
            let n = self
                .socket
                .recv(&mut self.buf, 0)
                .map_err(|source| NetlinkError::Io { what, source })?;
            let data = &self.buf[..n.min(self.buf.len())];
            let mut offset = 0;
            while offset < data.len() {
                let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| NetlinkError::Decode {
                        what,
                        detail: e.to_string(),
                    })?;
                let len = parsed.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode {
                        what,
                        detail: "zero-length message".into(),
                    });
                }
                offset += (len + 3) & !3;
                if parsed.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                match parsed.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return Err(NetlinkError::Kernel {
                            what,
                            source: e.to_io(),
                        });
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every link in the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>, NetlinkError> {
        let replies = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            true,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The link with this ifindex, `None` when there is none (ENODEV).
    pub fn link(&mut self, ifindex: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        match self.request("get link", RouteNetlinkMessage::GetLink(msg), false) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(NetlinkError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every address of every interface.
    pub fn addresses(&mut self) -> Result<Vec<AddressMessage>, NetlinkError> {
        let replies = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// `ip route get fibmatch ADDR`: the routing-table entry the kernel would
    /// use towards `addr` (RTM_F_FIB_MATCH, Linux >= 4.13: the reply carries the
    /// entry's own prefix length, not a /32 clone). `None` when unreachable.
    pub fn route_get(&mut self, addr: IpAddr) -> Result<Option<RouteMessage>, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.flags = RouteFlags::FibMatch;
        let (family, len, dst) = match addr {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(dst));
        match self.request("route get", RouteNetlinkMessage::GetRoute(msg), false) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })),
            Err(NetlinkError::Kernel { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::EINVAL)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The neighbour table (ARP or NDP, by `family`), or the bridge FDB with
    /// `AddressFamily::Bridge`.
    pub fn neighbours(
        &mut self,
        family: AddressFamily,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        let replies = self.request(
            "dump neighbours",
            RouteNetlinkMessage::GetNeighbour(msg),
            true,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }

    /// The id this namespace gives the namespace open as `other` (RTM_GETNSID
    /// with NETNSA_FD), `None` when it has assigned none.
    pub fn nsid_of(&mut self, other: &File) -> Result<Option<i32>, NetlinkError> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(other.as_raw_fd() as u32));
        let replies = self.request("get nsid", RouteNetlinkMessage::GetNsId(msg), false)?;
        let id = replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.into_iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(id),
                _ => None,
            }),
            _ => None,
        });
        Ok(id.filter(|id| *id >= 0))
    }
}

/// A bound, connected NETLINK_ROUTE socket in the calling thread's namespace,
/// member of the multicast `groups` (`RTMGRP_*` bits; 0 for none).
pub(crate) fn socket_here(groups: u32) -> Result<Socket, NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket
        .bind(&SocketAddr::new(0, groups))
        .map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;
    Ok(socket)
}

/// [`socket_here`] for the namespace open as `file`, from a dedicated thread
/// that joins it with setns(2) and ends right after (`label` names it in errors).
pub(crate) fn socket_in(file: &File, label: &Path, groups: u32) -> Result<Socket, NetlinkError> {
    let fd = file.as_raw_fd();
    let joined = std::thread::scope(|s| {
        s.spawn(move || -> Result<Socket, NetlinkError> {
            // SAFETY: `fd` is an open namespace file borrowed for the scope;
            // setns changes only this thread, which ends right after.
            let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetlinkError::Setns {
                    path: label.display().to_string(),
                    source: io::Error::last_os_error(),
                });
            }
            socket_here(groups)
        })
        .join()
    });
    joined.unwrap_or_else(|_| {
        Err(NetlinkError::ThreadPanicked {
            path: label.display().to_string(),
        })
    })
}

/// What discovery needs to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub ifindex: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`, e.g. `veth`, `bridge` (`None` for lo and real NICs).
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: present when the peer is in another namespace.
    pub link_netnsid: Option<i32>,
    /// `IFLA_MASTER`: the bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    pub mac: Option<Vec<u8>>,
}

impl LinkFacts {
    pub fn from_message(msg: &LinkMessage) -> Self {
        let mut facts = LinkFacts {
            ifindex: msg.header.index,
            name: String::new(),
            kind: None,
            link: None,
            link_netnsid: None,
            master: None,
            mac: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => facts.name = n.clone(),
                LinkAttribute::Link(l) => facts.link = Some(*l),
                LinkAttribute::LinkNetNsId(id) => facts.link_netnsid = Some(*id),
                LinkAttribute::Controller(m) => facts.master = Some(*m),
                LinkAttribute::Address(a) => facts.mac = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            facts.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        facts
    }

    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        other => other.to_string(),
    }
}

/// The ifindexes holding `addr` among `addresses`.
pub fn interfaces_with_address(addresses: &[AddressMessage], addr: IpAddr) -> Vec<u32> {
    let mut found: Vec<u32> = addresses
        .iter()
        .filter(|a| {
            a.attributes.iter().any(|attr| match attr {
                AddressAttribute::Address(x) | AddressAttribute::Local(x) => *x == addr,
                _ => false,
            })
        })
        .map(|a| a.header.index)
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    //! Read-only queries in the test process's own namespace (needs no
    //! privilege beyond reading rtnetlink, which any user may).
    use super::*;

    #[test]
    fn a_link_dump_includes_loopback_as_ifindex_1() {
        let mut rtnl = Rtnl::in_current().expect("socket");
        let links: Vec<LinkFacts> = rtnl
            .links()
            .expect("dump")
            .iter()
            .map(LinkFacts::from_message)
            .collect();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.ifindex, 1);
        assert_eq!(lo.kind, None);
        assert!(!lo.is_veth() && !lo.is_bridge());
    }

    #[test]
    fn asking_for_a_missing_ifindex_gives_none_not_an_error() {
        let mut rtnl = Rtnl::in_current().expect("socket");
        assert_eq!(rtnl.link(0x7fff_fff0).expect("request"), None);
        assert!(rtnl.link(1).expect("request").is_some());
    }

    #[test]
    fn loopback_holds_127_0_0_1_and_its_route_is_local_with_the_fib_prefix() {
        let mut rtnl = Rtnl::in_current().expect("socket");
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(
            interfaces_with_address(&rtnl.addresses().expect("dump"), lo),
            vec![1]
        );
        let route = rtnl.route_get(lo).expect("request").expect("a route");
        // FIB match: the local table's entry is 127.0.0.0/8... or the /32 host
        // entry; never a clone longer than the table entry.
        assert!(route.header.destination_prefix_length <= 32);
        assert_ne!(
            route.header.kind,
            netlink_packet_route::route::RouteType::Unicast
        );
    }

    #[test]
    fn a_socket_made_in_a_namespace_by_path_answers_for_that_namespace() {
        let mut rtnl = Rtnl::in_netns(Path::new("/proc/self/ns/net")).expect("socket");
        assert!(
            rtnl.links()
                .expect("dump")
                .iter()
                .any(|l| l.header.index == 1)
        );
        let err = Rtnl::in_netns(Path::new("/nonexistent/ns")).expect_err("no such file");
        assert!(matches!(err, NetlinkError::OpenNetns { .. }), "{err}");
    }

    #[test]
    fn a_namespace_gives_itself_a_current_nsid_or_none() {
        let mut rtnl = Rtnl::in_current().expect("socket");
        let own = File::open("/proc/thread-self/ns/net").expect("open");
        // Either unassigned (None) or a non-negative id: never an error.
        let id = rtnl.nsid_of(&own).expect("request");
        assert!(id.is_none_or(|i| i >= 0));
    }
}
