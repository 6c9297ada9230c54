//! Link events from the host namespace (RTM_NEWLINK / RTM_DELLINK on the
//! `RTMGRP_LINK` multicast group), so the agent can program a pod's new host veth
//! within milliseconds of the CNI creating it instead of waiting for the API
//! server to report the pod: this is what narrows the pod-start window.
//!
//! [`LinkWatcher::next_event`] blocks up to a timeout (poll(2)); the agent runs it
//! on a dedicated thread. A link already present when the watcher started is
//! reported as [`LinkEvent::Changed`], never as [`LinkEvent::Added`].
//! When the kernel drops events because the reader fell behind (ENOBUFS), the
//! call fails with [`NetlinkError::Io`] and the caller must re-list (a new
//! watcher does that).
//!
//! This module only listens: it must not change links, nor decide anything
//! about pods (the locator does that).

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::Socket;

use super::netlink::{LinkFacts, NetlinkError, Rtnl, socket_here, socket_in};

/// `RTMGRP_LINK` from linux/rtnetlink.h.
const RTMGRP_LINK: u32 = 1;

/// A change to the host namespace's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link that did not exist when the watcher started or was last seen.
    Added(LinkFacts),
    /// A known link changed (state, master, address...).
    Changed(LinkFacts),
    /// A link went away.
    Removed(LinkFacts),
}

impl LinkEvent {
    pub fn link(&self) -> &LinkFacts {
        match self {
            LinkEvent::Added(l) | LinkEvent::Changed(l) | LinkEvent::Removed(l) => l,
        }
    }
}

/// A subscription to link events in one network namespace.
#[derive(Debug)]
pub struct LinkWatcher {
    socket: Socket,
    known: HashSet<u32>,
    pending: VecDeque<LinkEvent>,
    buf: Vec<u8>,
}

impl LinkWatcher {
    /// Subscribes in the namespace at `netns` (the caller's own when `None`),
    /// then lists the links present, so that later ones count as added.
    pub fn new(netns: Option<&Path>) -> Result<Self, NetlinkError> {
        // Subscribe before listing: a link created in between is then seen
        // twice (listed, then Changed), never missed.
        let (socket, mut rtnl) = match netns {
            None => (socket_here(RTMGRP_LINK)?, Rtnl::in_current()?),
            Some(path) => {
                let file = File::open(path).map_err(|source| NetlinkError::OpenNetns {
                    path: path.display().to_string(),
                    source,
                })?;
                (
                    socket_in(&file, path, RTMGRP_LINK)?,
                    Rtnl::in_netns_file(&file, path)?,
                )
            }
        };
        // A burst of pod starts must not overflow the queue (ENOBUFS): 4 MiB
        // holds thousands of link messages. Best effort: capped by rmem_max.
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024_i32);
        let known = rtnl.links()?.iter().map(|l| l.header.index).collect();
        Ok(LinkWatcher {
            socket,
            known,
            pending: VecDeque::new(),
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// The next event, waiting at most `timeout`; `None` when nothing came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<LinkEvent>, NetlinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.wait_readable(left)? {
                return Ok(None);
            }
            self.read_once()?;
        }
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, NetlinkError> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(NetlinkError::Io {
                what: "poll link events",
                source: err,
            });
        }
        Ok(rc > 0)
    }

    fn read_once(&mut self) -> Result<(), NetlinkError> {
        const WHAT: &str = "link events";
        self.buf.clear();
        let n = self
            .socket
            .recv(&mut self.buf, 0)
            .map_err(|source| NetlinkError::Io { what: WHAT, source })?;
        let data = &self.buf[..n.min(self.buf.len())];
        let mut offset = 0;
        while offset < data.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]).map_err(
                |e| NetlinkError::Decode {
                    what: WHAT,
                    detail: e.to_string(),
                },
            )?;
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    let facts = LinkFacts::from_message(&l);
                    if self.known.insert(facts.ifindex) {
                        LinkEvent::Added(facts)
                    } else {
                        LinkEvent::Changed(facts)
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                    let facts = LinkFacts::from_message(&l);
                    self.known.remove(&facts.ifindex);
                    LinkEvent::Removed(facts)
                }
                _ => continue,
            };
            self.pending.push_back(event);
        }
        Ok(())
    }
}
