//! Attaching endpoints: TCX on a pod's host-side veth (clsact before Linux 6.6), or
//! cgroup_skb on its cgroup. The endpoint's map entry is written before the program
//! is attached, so it enforces from the first packet; links are pinned so
//! enforcement continues while the agent is down, and an agent that restarts finds
//! them and keeps them (no detach/attach gap).
use std::ffi::CString;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, SchedClassifier, TcAttach,
    TcAttachType, tc,
};
use aya::util::KernelVersion;
use rayfence_common::{EndpointInfo, endpoint_flags};

use super::{Attachments, Datapath, DatapathError, OwnedLink, TcBackend, codec, maps, paths};
use crate::tables::EndpointId;

/// A network interface in the calling thread's network namespace.
#[derive(Clone, Copy, Debug)]
pub enum Interface<'a> {
    Index(u32),
    Name(&'a str),
}

impl Interface<'_> {
    fn ifindex(self) -> Result<u32, DatapathError> {
        match self {
            Self::Index(index) => Ok(index),
            Self::Name(name) => {
                let unknown = || DatapathError::UnknownInterface {
                    name: name.to_owned(),
                };
                let c_name = CString::new(name).map_err(|_| unknown())?;
                // SAFETY: a valid NUL-terminated string; no other preconditions.
                match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
                    0 => Err(unknown()),
                    index => Ok(index),
                }
            }
        }
    }
}

/// (program, TC hook, hook name in pin paths)
const TC_HOOKS: [(&str, TcAttachType, &str); 2] = [
    ("tc_ingress", TcAttachType::Ingress, "ingress"),
    ("tc_egress", TcAttachType::Egress, "egress"),
];
const CGROUP_HOOKS: [(&str, CgroupSkbAttachType, &str); 2] = [
    (
        "cgroup_skb_ingress",
        CgroupSkbAttachType::Ingress,
        "ingress",
    ),
    ("cgroup_skb_egress", CgroupSkbAttachType::Egress, "egress"),
];

/// The inode of the calling thread's network namespace.
pub(crate) fn current_netns() -> Result<u64, DatapathError> {
    let path = Path::new("/proc/thread-self/ns/net");
    std::fs::metadata(path)
        .map(|meta| meta.ino())
        .map_err(|e| DatapathError::io("reading", path, e))
}

/// A clsact filter's marker: (network namespace, ifindex, program, hook).
type Marker = (u64, u32, &'static str, TcAttachType);

fn parse_marker(name: &str) -> Option<Marker> {
    let fields: Vec<&str> = name.split('_').collect();
    match fields.as_slice() {
        ["nl", netns, ifindex, hook] => {
            let (program, attach_type, _) = TC_HOOKS.iter().find(|(_, _, h)| h == hook)?;
            Some((
                netns.parse().ok()?,
                ifindex.parse().ok()?,
                program,
                *attach_type,
            ))
        }
        _ => None,
    }
}

/// Inside a marker: the filter's priority and handle, which replacing its program
/// in place needs (netlink filters are named by them, not by an fd).
pub(crate) fn filter_id_name(priority: u16, handle: u32) -> String {
    format!("prio_{priority}_handle_{handle}")
}

/// How a TC program goes on a hook: a TCX link, or a clsact filter before Linux 6.6.
pub(crate) fn tc_attach(tcx: bool, attach_type: TcAttachType) -> TcAttach {
    if tcx {
        TcAttach::Tcx {
            attach_type,
            order: LinkOrder::default(),
        }
    } else {
        TcAttach::Netlink {
            parent: attach_type.into(),
            options: tc::NlOptions::default(),
        }
    }
}

/// The filter's priority and handle recorded in a marker (markers of older agents
/// have none).
pub(crate) fn marker_filter_id(marker: &Path) -> Option<(u16, u32)> {
    std::fs::read_dir(marker).ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().to_string_lossy().into_owned();
        match name.split('_').collect::<Vec<_>>().as_slice() {
            ["prio", priority, "handle", handle] => {
                Some((priority.parse().ok()?, handle.parse().ok()?))
            }
            _ => None,
        }
    })
}

/// Whether a clsact marker's filter can have its program replaced from here: it
/// records its filter and belongs to this network namespace.
pub(crate) fn clsact_swappable(marker: &Path) -> bool {
    let name = marker
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_marker(&name).is_some_and(|(netns, ..)| current_netns().is_ok_and(|n| n == netns))
        && marker_filter_id(marker).is_some()
}

/// Removes the clsact filter a marker stands for, then the marker. Only from
/// inside the marker's network namespace: an ifindex means nothing elsewhere.
pub(crate) fn detach_clsact(marker: &Path) -> Result<(), DatapathError> {
    let name = marker
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some((netns, ifindex, program, attach_type)) = parse_marker(&name) else {
        return Err(DatapathError::io(
            "parsing",
            marker,
            std::io::Error::from(std::io::ErrorKind::InvalidData),
        ));
    };
    if netns != current_netns()? {
        return Err(DatapathError::WrongNamespace {
            path: marker.to_owned(),
            netns,
        });
    }
    match tc::qdisc_detach_program(ifindex, attach_type.into(), program) {
        Ok(()) => {}
        // The interface or the filter is gone already.
        Err(error) => tracing::debug!(%error, marker = %marker.display(), "clsact filter"),
    }
    std::fs::remove_dir_all(marker).map_err(|e| DatapathError::io("removing", marker, e))
}

/// `BPF_OBJ_GET`: an fd for a pinned object (aya's link types do not lend theirs).
fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid prefix of `union bpf_attr` for BPF_OBJ_GET; the path outlives
    // the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `BPF_LINK_UPDATE` (Linux 5.7): point an existing link at another program.
fn update_link(link_fd: RawFd, prog_fd: RawFd) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link_fd as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the attr is a valid, initialised prefix of `union bpf_attr` for this
    // command and the kernel reads at most `size` bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            size_of::<LinkUpdateAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The program a pinned link (by its name under the links directory) runs: the
/// TCX link of a host veth or the cgroup_skb link of a pod cgroup, by hook.
/// `None`: not a link this agent pins (a clsact marker, or unknown).
pub(crate) fn link_program(name: &str) -> Option<&'static str> {
    let (kind, rest) = name.split_once('_')?;
    let (id, hook) = rest.rsplit_once('_')?;
    id.parse::<u64>().ok()?;
    match kind {
        "tc" => TC_HOOKS
            .iter()
            .find(|(_, _, h)| *h == hook)
            .map(|(p, _, _)| *p),
        "cg" => CGROUP_HOOKS
            .iter()
            .find(|(_, _, h)| *h == hook)
            .map(|(p, _, _)| *p),
        _ => None,
    }
}

impl Datapath {
    /// How programs attach on this node, for the operator: `tcx` or `clsact` on host
    /// veths, and `cgroup_skb` where a pod has none.
    pub fn hook_modes(&self) -> &'static str {
        if self.uses_tcx() {
            "tcx,cgroup_skb"
        } else {
            "clsact,cgroup_skb"
        }
    }

    fn uses_tcx(&self) -> bool {
        match self.tc_backend {
            TcBackend::Auto => tcx_supported(),
            TcBackend::Tcx => true,
            TcBackend::Clsact => false,
        }
    }
}

fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}

impl Datapath {
    /// The map entry for an endpoint as it must be now.
    pub(crate) fn endpoint_info(&self, endpoint: EndpointId) -> EndpointInfo {
        let generation = self.generation(endpoint);
        match self.mirror.endpoints.get(&endpoint) {
            Some(policy) => {
                let mut flags = codec::flags(policy);
                if self.forced_fail_closed.contains(&endpoint) || self.held.contains(&endpoint) {
                    flags |= endpoint_flags::FAIL_CLOSED;
                }
                EndpointInfo {
                    endpoint_id: endpoint,
                    policy_id: policy.policy_id,
                    generation,
                    flags,
                }
            }
            // Attached before the engine has a policy for it: drop all but node and
            // link-control traffic until it has one.
            None => EndpointInfo {
                endpoint_id: endpoint,
                policy_id: 0,
                generation,
                flags: endpoint_flags::ISOLATE_INGRESS
                    | endpoint_flags::ISOLATE_EGRESS
                    | endpoint_flags::FAIL_CLOSED,
            },
        }
    }

    /// Writes the endpoint's entry wherever it is attached.
    pub(crate) fn write_endpoint(&mut self, endpoint: EndpointId) -> Result<(), DatapathError> {
        let Some(attachments) = self.attachments.get(&endpoint).cloned() else {
            return Ok(());
        };
        let info = self.endpoint_info(endpoint);
        if !attachments.ifindexes.is_empty() {
            let mut map = maps::endpoints_tc(&mut self.ebpf)?;
            for ifindex in &attachments.ifindexes {
                map.insert(ifindex, &info, 0).map_err(map.error())?;
            }
        }
        if !attachments.cgroups.is_empty() {
            let mut map = maps::endpoints_cgroup(&mut self.ebpf)?;
            for cgroup in &attachments.cgroups {
                map.insert(cgroup, &info, 0).map_err(map.error())?;
            }
        }
        Ok(())
    }

    /// Makes the TC programs judge packets on `ifindex` as `endpoint`'s, without
    /// attaching anything (BPF_PROG_TEST_RUN, or a caller that attaches by itself).
    pub fn register_tc(&mut self, endpoint: EndpointId, ifindex: u32) -> Result<(), DatapathError> {
        self.forget_ifindex(ifindex);
        self.attachments
            .entry(endpoint)
            .or_default()
            .ifindexes
            .insert(ifindex);
        self.write_endpoint(endpoint)
    }

    /// As [`Self::register_tc`], for a cgroup (v2) id.
    pub fn register_cgroup(
        &mut self,
        endpoint: EndpointId,
        cgroup_id: u64,
    ) -> Result<(), DatapathError> {
        for attachments in self.attachments.values_mut() {
            attachments.cgroups.remove(&cgroup_id);
        }
        self.attachments
            .entry(endpoint)
            .or_default()
            .cgroups
            .insert(cgroup_id);
        self.write_endpoint(endpoint)
    }

    /// An ifindex can be reused after its pod is gone: it belongs to one endpoint.
    fn forget_ifindex(&mut self, ifindex: u32) {
        for attachments in self.attachments.values_mut() {
            attachments.ifindexes.remove(&ifindex);
        }
    }

    /// Enforces `endpoint`'s policy on the host side of its veth: TC ingress sees what
    /// the pod sends, TC egress what it receives. Idempotent; a link pinned by an
    /// earlier agent is adopted as it is. The interface is looked up in the calling
    /// thread's network namespace.
    pub fn attach_tc(
        &mut self,
        endpoint: EndpointId,
        interface: Interface<'_>,
    ) -> Result<u32, DatapathError> {
        let ifindex = interface.ifindex()?;
        // Over a CNI guard, this one write is the switch to the pod's own policy.
        self.register_tc(endpoint, ifindex)?;
        if let Some(waited_ms) = self.took_over_guard(ifindex) {
            tracing::info!(
                endpoint,
                ifindex,
                waited_ms,
                "took over the CNI guard of the veth"
            );
        }
        let tcx = self.uses_tcx();
        if !tcx {
            // Before Linux 6.6: a clsact qdisc and netlink filters. They cannot be
            // pinned but stay attached when the agent exits; a marker directory
            // (which names the network namespace) lets `detach` and `cleanup` find
            // them again.
            if let Err(error) = tc::qdisc_add_clsact(ifindex) {
                tracing::debug!(ifindex, %error, "adding clsact (may already exist)");
            }
        }
        for (program, attach_type, hook) in TC_HOOKS {
            let name = if tcx {
                paths::tc_link_name(ifindex, hook)
            } else {
                paths::clsact_marker_name(current_netns()?, ifindex, hook)
            };
            if self.link_exists(&name) {
                if tcx {
                    self.adopt_link(&name, program)?;
                }
                continue;
            }
            let prog: &mut SchedClassifier = self
                .ebpf_mut()
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { program })?;
            let attach = tc_attach(tcx, attach_type);
            let id = prog
                .attach(ifindex, attach)
                .map_err(|e| DatapathError::program(program, e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| DatapathError::program(program, e))?;
            if tcx {
                let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
                    path: PathBuf::from(&name),
                    source: Box::new(e),
                })?;
                self.keep_link(name, fd_link)?;
            } else if let Some(dir) = &self.pin_dir {
                let marker = paths::links_dir(dir).join(&name);
                std::fs::create_dir(&marker)
                    .map_err(|e| DatapathError::io("creating", &marker, e))?;
                let priority = link
                    .priority()
                    .map_err(|e| DatapathError::program(program, e))?;
                let handle = u32::from(
                    link.handle()
                        .map_err(|e| DatapathError::program(program, e))?,
                );
                let id = marker.join(filter_id_name(priority, handle));
                std::fs::create_dir(&id).map_err(|e| DatapathError::io("creating", &id, e))?;
                // The filter must outlive this process: do not let the link's Drop
                // detach it.
                std::mem::forget(link);
            } else {
                self.owned_links.insert(name, OwnedLink::Tc(link));
            }
        }
        Ok(ifindex)
    }

    /// Enforces `endpoint`'s policy on the sockets in the cgroup (v2) directory
    /// `cgroup` and below. Returns the cgroup id.
    pub fn attach_cgroup(
        &mut self,
        endpoint: EndpointId,
        cgroup: &Path,
    ) -> Result<u64, DatapathError> {
        let dir =
            std::fs::File::open(cgroup).map_err(|e| DatapathError::io("opening", cgroup, e))?;
        let cgroup_id = dir
            .metadata()
            .map_err(|e| DatapathError::io("reading", cgroup, e))?
            .ino();
        self.register_cgroup(endpoint, cgroup_id)?;
        for (program, attach_type, hook) in CGROUP_HOOKS {
            let name = paths::cgroup_link_name(cgroup_id, hook);
            if self.link_exists(&name) {
                self.adopt_link(&name, program)?;
                continue;
            }
            let prog: &mut CgroupSkb = self
                .ebpf_mut()
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram { program })?;
            let id = prog
                .attach(&dir, attach_type, CgroupAttachMode::Single)
                .map_err(|e| DatapathError::program(program, e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| DatapathError::program(program, e))?;
            let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
                path: PathBuf::from(&name),
                source: Box::new(e),
            })?;
            self.keep_link(name, fd_link)?;
        }
        Ok(cgroup_id)
    }

    fn link_exists(&self, name: &str) -> bool {
        match &self.pin_dir {
            Some(dir) => paths::links_dir(dir).join(name).exists(),
            None => self.owned_links.contains_key(name),
        }
    }

    /// A link pinned by an earlier agent keeps its attachment; its program is
    /// replaced by this agent's in one step (BPF_LINK_UPDATE), so an upgraded agent
    /// runs its own code without a detach/attach gap. Both programs use the same
    /// pinned maps.
    fn adopt_link(&self, name: &str, program: &'static str) -> Result<(), DatapathError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let path = paths::links_dir(dir).join(name);
        let link = open_pinned(&path).map_err(|e| DatapathError::io("opening", &path, e))?;
        let prog_fd = self
            .ebpf()
            .program(program)
            .ok_or(DatapathError::MissingProgram { program })?
            .fd()
            .map_err(|e| DatapathError::program(program, e))?
            .as_fd()
            .as_raw_fd();
        update_link(link.as_raw_fd(), prog_fd)
            .map_err(|e| DatapathError::io("replacing the program of", &path, e))
    }

    /// Points every pinned link at this agent's program for its hook
    /// (BPF_LINK_UPDATE: the hook is never empty), so that from here on every
    /// pinned link runs code that uses this agent's maps. Returns how many.
    ///
    /// `strict` (the maps were just replaced): any link that cannot be swapped is an
    /// error. Otherwise a link that cannot be is left as it is and logged: it runs
    /// an earlier agent's programs on the same pinned maps, and is swapped again
    /// when its endpoint is attached.
    pub(crate) fn swap_pinned_links(&mut self, strict: bool) -> Result<usize, DatapathError> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(0);
        };
        let links = paths::links_dir(&dir);
        if !links.exists() {
            return Ok(0);
        }
        let entries =
            std::fs::read_dir(&links).map_err(|e| DatapathError::io("listing", &links, e))?;
        let mut swapped = 0;
        for entry in entries {
            let entry = entry.map_err(|e| DatapathError::io("listing", &links, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let result = match link_program(&name) {
                Some(program) => self.adopt_link(&name, program),
                None if name.starts_with("nl_") => {
                    if !strict && !clsact_swappable(&entry.path()) {
                        // Another namespace's filter, or one an older agent made.
                        continue;
                    }
                    self.replace_filter(&entry.path())
                }
                None => continue,
            };
            match result {
                Ok(()) => swapped += 1,
                Err(error) if !strict => {
                    tracing::warn!(link = %name, %error, "could not swap the program of a pinned link");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(swapped)
    }

    /// Replaces the program of a clsact filter in place: a netlink request for the
    /// same priority and handle without NLM_F_EXCL makes cls_bpf swap the program
    /// of the existing filter (the filter is never absent).
    fn replace_filter(&mut self, marker: &Path) -> Result<(), DatapathError> {
        let name = marker
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let invalid = || {
            DatapathError::io(
                "reading",
                marker,
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            )
        };
        let (netns, ifindex, program, attach_type) = parse_marker(&name).ok_or_else(invalid)?;
        if netns != current_netns()? {
            return Err(DatapathError::WrongNamespace {
                path: marker.to_owned(),
                netns,
            });
        }
        let (priority, handle) = marker_filter_id(marker).ok_or_else(invalid)?;
        let existing = tc::SchedClassifierLink::attached(
            aya::programs::NetworkInterface::Index(ifindex),
            attach_type.into(),
            priority,
            handle.into(),
            None,
        )
        .map_err(|e| DatapathError::io("finding the filter of", marker, e))?;
        let prog: &mut SchedClassifier = self
            .ebpf_mut()
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram { program })?;
        let id = prog
            .attach_to_link(existing)
            .map_err(|e| DatapathError::program(program, e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| DatapathError::program(program, e))?;
        // The filter must outlive this process.
        std::mem::forget(link);
        Ok(())
    }

    fn keep_link(&mut self, name: String, link: FdLink) -> Result<(), DatapathError> {
        match &self.pin_dir {
            Some(dir) => {
                let path = paths::links_dir(dir).join(&name);
                link.pin(&path).map_err(|e| DatapathError::Pin {
                    path,
                    source: Box::new(e),
                })?;
            }
            None => {
                self.owned_links.insert(name, OwnedLink::Fd(link));
            }
        }
        Ok(())
    }

    fn drop_link(&mut self, name: &str) -> Result<(), DatapathError> {
        self.owned_links.remove(name);
        if let Some(dir) = &self.pin_dir {
            let path = paths::links_dir(dir).join(name);
            if name.starts_with("nl_") {
                if path.exists() {
                    detach_clsact(&path)?;
                }
            } else if path.exists() {
                let pinned = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Link {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
                // Unpinning drops the last reference: the link detaches.
                pinned
                    .unpin()
                    .map_err(|e| DatapathError::io("unpinning", &path, e))?;
            }
        }
        Ok(())
    }

    /// Stops enforcing for `endpoint`: links first, then its map entries and its
    /// counter rows (read [`Self::counters`] before, if the last counts matter).
    /// Its conntrack entries age out of the LRU; they cannot answer for another
    /// endpoint. Call from the network namespace it was attached in.
    pub fn detach(&mut self, endpoint: EndpointId) -> Result<(), DatapathError> {
        let attachments: Attachments = self
            .attachments
            .remove(&endpoint)
            .ok_or(DatapathError::NotAttached { endpoint })?;
        let netns = current_netns()?;
        for ifindex in &attachments.ifindexes {
            for (_, _, hook) in TC_HOOKS {
                self.drop_link(&paths::tc_link_name(*ifindex, hook))?;
                self.drop_link(&paths::clsact_marker_name(netns, *ifindex, hook))?;
            }
        }
        for cgroup in &attachments.cgroups {
            for (_, _, hook) in CGROUP_HOOKS {
                self.drop_link(&paths::cgroup_link_name(*cgroup, hook))?;
            }
        }
        if !attachments.ifindexes.is_empty() {
            let mut map = maps::endpoints_tc(&mut self.ebpf)?;
            for ifindex in &attachments.ifindexes {
                let _ = map.remove(ifindex);
            }
        }
        if !attachments.cgroups.is_empty() {
            let mut map = maps::endpoints_cgroup(&mut self.ebpf)?;
            for cgroup in &attachments.cgroups {
                let _ = map.remove(cgroup);
            }
        }
        self.forget_counters(endpoint)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pinned_link_name_maps_to_the_program_of_its_hook() {
        let tc = paths::tc_link_name(7, "ingress");
        assert_eq!(link_program(&tc), Some("tc_ingress"));
        assert_eq!(
            link_program(&paths::tc_link_name(7, "egress")),
            Some("tc_egress")
        );
        let cg = paths::cgroup_link_name(123_456_789, "egress");
        assert_eq!(link_program(&cg), Some("cgroup_skb_egress"));
        // clsact markers and anything else are not links.
        assert_eq!(
            link_program(&paths::clsact_marker_name(1, 7, "ingress")),
            None
        );
        assert_eq!(link_program("tc_x_ingress"), None);
        assert_eq!(link_program("tc_7_sideways"), None);
        assert_eq!(link_program("guard_7_ingress"), None);
    }

    #[test]
    fn a_clsact_marker_names_its_namespace_interface_and_hook() {
        let name = paths::clsact_marker_name(4_026_531_840, 12, "egress");
        assert_eq!(
            parse_marker(&name),
            Some((4_026_531_840, 12, "tc_egress", TcAttachType::Egress))
        );
        assert_eq!(parse_marker("nl_1_2"), None);
        assert_eq!(parse_marker("nl_x_2_ingress"), None);
        assert_eq!(filter_id_name(49152, 1), "prio_49152_handle_1");
    }
}
