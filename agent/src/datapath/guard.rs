//! Guards: the hold the CNI plugin puts on a new pod's host veth, through the agent's
//! pins, until the agent programs the pod.
//!
//! A guard is an `RF_EP_TC` entry flagged [`endpoint_flags::GUARD`] (and
//! `FAIL_CLOSED`, so the datapath passes only the node's own host processes and link
//! control: the same bounded path as any fail-closed endpoint), the pinned TC
//! programs linked to the veth under the agent's own link names, and an `RF_GUARD`
//! record saying which pod it is and since when. The agent takes a guard over by
//! writing its own entry for the ifindex (one map write: no gap) and adopting the
//! links; it releases a guard only for a pod it knows must not be held, or whose veth
//! is gone.
//!
//! Which pods are guarded: those in a namespace listed in `RF_GUARDNS` (the agent
//! writes it from its sources). Nothing else: a namespace the agent never saw is not
//! guarded, so a node where the agent never ran is left alone.
//!
//! Must not: load programs (the plugin runs the agent's pinned ones), touch entries
//! the agent owns (no `GUARD` bit), or decide policy.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use rayfence_common::{
    EndpointInfo, GUARD_ENDPOINT_ID, GuardNsKey, GuardRecord, endpoint_flags, map_names,
};

use super::{Datapath, maps, paths};

/// `BPF_NOEXIST`: insert only if the key is absent.
const NOEXIST: u64 = 1;

/// The TC programs a guard links, with the hook name in link pin names.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    ("tc_ingress", TcAttachType::Ingress, "ingress"),
    ("tc_egress", TcAttachType::Egress, "egress"),
];

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("pinned map {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("pinned program {path}")]
    Program {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("linking {program} to ifindex {ifindex}")]
    Link {
        program: &'static str,
        ifindex: u32,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinned link {path}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("namespace {namespace:?} or pod {pod:?} is not a valid Kubernetes name")]
    BadName { namespace: String, pod: String },
}

fn map_error(path: &Path) -> impl FnOnce(MapError) -> GuardError + '_ {
    move |source| GuardError::Map {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

fn missing(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    root: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>, GuardError> {
    let path = paths::map(root, name);
    let data = MapData::from_pin(&path).map_err(map_error(&path))?;
    let map = Map::from_map_data(data).map_err(map_error(&path))?;
    HashMap::try_from(map).map_err(map_error(&path))
}

/// What the agent left pinned, as far as guarding needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedState {
    /// No agent state under the directory (never ran here, or cleaned up).
    Absent,
    /// Maps and programs are there.
    Present,
}

/// Whether the agent's state a guard needs is pinned under `root`. Only a complete
/// absence counts as absent: a half-present state is an error for the caller.
pub fn pinned_state(root: &Path) -> Result<PinnedState, GuardError> {
    let needed: Vec<PathBuf> = [
        map_names::ENDPOINTS_TC,
        map_names::GUARDED_NAMESPACES,
        map_names::GUARDS,
    ]
    .iter()
    .map(|m| paths::map(root, m))
    .chain(HOOKS.iter().map(|(p, _, _)| paths::prog(root, p)))
    .collect();
    if !paths::map(root, map_names::ENDPOINTS_TC).exists() {
        return Ok(PinnedState::Absent);
    }
    if !paths::map(root, map_names::GUARDED_NAMESPACES).exists() {
        // An agent from before guards: nothing says which namespaces to guard.
        return Ok(PinnedState::Absent);
    }
    for path in needed {
        if !path.exists() {
            return Err(GuardError::Io {
                action: "finding",
                path,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
    }
    Ok(PinnedState::Present)
}

/// Whether the maps a guard lives in are pinned (all [`unguard`] needs).
pub fn guard_maps_pinned(root: &Path) -> bool {
    [map_names::ENDPOINTS_TC, map_names::GUARDS]
        .iter()
        .all(|m| paths::map(root, m).exists())
}

/// Whether new pods in `namespace` are to be guarded (`RF_GUARDNS` lists it).
pub fn namespace_guarded(root: &Path, namespace: &str) -> Result<bool, GuardError> {
    let Some(key) = GuardNsKey::new(namespace) else {
        return Ok(false);
    };
    let map: HashMap<MapData, GuardNsKey, u32> = open_hash(root, map_names::GUARDED_NAMESPACES)?;
    match map.get(&key, 0) {
        Ok(reasons) => Ok(reasons != 0),
        Err(e) if missing(&e) => Ok(false),
        Err(e) => Err(map_error(&paths::map(root, map_names::GUARDED_NAMESPACES))(
            e,
        )),
    }
}

/// The entry a guard writes.
pub fn guard_info() -> EndpointInfo {
    EndpointInfo {
        endpoint_id: GUARD_ENDPOINT_ID,
        policy_id: 0,
        generation: 0,
        flags: endpoint_flags::ISOLATE_INGRESS
            | endpoint_flags::ISOLATE_EGRESS
            | endpoint_flags::FAIL_CLOSED
            | endpoint_flags::GUARD,
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What [`guard`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarded {
    /// The veth is held: only the node reaches the pod until the agent programs it.
    Held,
    /// The agent had programmed the veth already: nothing to hold.
    AgentOwns,
}

/// Holds the host veth `ifindex` (in the calling thread's network namespace) for the
/// pod `namespace/pod`: record, entry, then links, so it is closed from the first
/// packet the programs see. Idempotent; never replaces the agent's own entry.
pub fn guard(root: &Path, ifindex: u32, namespace: &str, pod: &str) -> Result<Guarded, GuardError> {
    let record =
        GuardRecord::new(namespace, pod, now_unix_ms()).ok_or_else(|| GuardError::BadName {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        })?;
    let records_path = paths::map(root, map_names::GUARDS);
    let mut records: HashMap<MapData, u32, GuardRecord> = open_hash(root, map_names::GUARDS)?;
    let entries_path = paths::map(root, map_names::ENDPOINTS_TC);
    let mut entries: HashMap<MapData, u32, EndpointInfo> =
        open_hash(root, map_names::ENDPOINTS_TC)?;
    // A retried ADD keeps the first time (how long the pod has waited).
    let record = match records.get(&ifindex, 0) {
        Ok(old) if old.namespace == record.namespace && old.name == record.name => old,
        _ => record,
    };
    records
        .insert(&ifindex, &record, 0)
        .map_err(map_error(&records_path))?;
    match entries.insert(&ifindex, &guard_info(), NOEXIST) {
        Ok(()) => {}
        Err(e) => {
            let current = entries.get(&ifindex, 0).map_err(map_error(&entries_path))?;
            if current.flags & endpoint_flags::GUARD == 0 {
                // The agent got there first; the record is not needed.
                let _ = records.remove(&ifindex);
                tracing::debug!(ifindex, error = %e, "the agent owns the veth already");
                return Ok(Guarded::AgentOwns);
            }
        }
    }
    link(root, ifindex)?;
    Ok(Guarded::Held)
}

/// Links the pinned TC programs to `ifindex` under the agent's link names (TCX), or
/// adds clsact filters with the agent's markers before Linux 6.6. A link already
/// pinned (the agent's, or an earlier ADD's) is left as it is.
fn link(root: &Path, ifindex: u32) -> Result<(), GuardError> {
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    let links = paths::links_dir(root);
    if !tcx && let Err(error) = tc::qdisc_add_clsact(ifindex) {
        tracing::debug!(ifindex, %error, "adding clsact (may already exist)");
    }
    for (program, attach_type, hook) in HOOKS {
        let name = if tcx {
            paths::tc_link_name(ifindex, hook)
        } else {
            paths::clsact_marker_name(netns_inode()?, ifindex, hook)
        };
        let pin = links.join(&name);
        if pin.exists() {
            continue;
        }
        let prog_path = paths::prog(root, program);
        let mut prog = SchedClassifier::from_pin(&prog_path).map_err(|e| GuardError::Program {
            path: prog_path.clone(),
            source: Box::new(e),
        })?;
        let attach = super::attach::tc_attach(tcx, attach_type);
        let link_error = |e| GuardError::Link {
            program,
            ifindex,
            source: Box::new(e),
        };
        let id = prog.attach(ifindex, attach).map_err(link_error)?;
        let link = prog.take_link(id).map_err(link_error)?;
        if tcx {
            let fd_link = FdLink::try_from(link).map_err(|e| GuardError::PinnedLink {
                path: pin.clone(),
                source: Box::new(e),
            })?;
            match fd_link.pin(&pin) {
                Ok(_) => {}
                // Pinned meanwhile (the agent attaching the same veth): dropping
                // ours detaches it, theirs stays.
                Err(_) if pin.exists() => {}
                Err(e) => {
                    return Err(GuardError::PinnedLink {
                        path: pin,
                        source: Box::new(e),
                    });
                }
            }
        } else {
            std::fs::create_dir(&pin).map_err(|source| GuardError::Io {
                action: "creating",
                path: pin.clone(),
                source,
            })?;
            // The filter's priority and handle, as the agent records them: what a
            // map migration needs to swap this filter's program in place.
            let (priority, handle) = link
                .priority()
                .and_then(|priority| Ok((priority, u32::from(link.handle()?))))
                .map_err(link_error)?;
            let id = pin.join(super::attach::filter_id_name(priority, handle));
            std::fs::create_dir(&id).map_err(|source| GuardError::Io {
                action: "creating",
                path: id,
                source,
            })?;
            // The filter must outlive this process.
            std::mem::forget(link);
        }
    }
    Ok(())
}

/// Removes the guard on `ifindex`, if it is still one: its entry, its links and its
/// record. Leaves an entry the agent owns (and its links) alone. Missing things are
/// fine: idempotent.
pub fn unguard(root: &Path, ifindex: u32) -> Result<(), GuardError> {
    let entries_path = paths::map(root, map_names::ENDPOINTS_TC);
    let mut entries: HashMap<MapData, u32, EndpointInfo> =
        open_hash(root, map_names::ENDPOINTS_TC)?;
    let mut records: HashMap<MapData, u32, GuardRecord> = open_hash(root, map_names::GUARDS)?;
    let owned_by_agent = match entries.get(&ifindex, 0) {
        Ok(info) => info.flags & endpoint_flags::GUARD == 0,
        Err(e) if missing(&e) => false,
        Err(e) => return Err(map_error(&entries_path)(e)),
    };
    if !owned_by_agent {
        // Links first: once the entry is gone the programs would pass everything.
        unlink(root, ifindex)?;
        match entries.remove(&ifindex) {
            Ok(()) => {}
            Err(e) if missing(&e) => {}
            Err(e) => return Err(map_error(&entries_path)(e)),
        }
    }
    match records.remove(&ifindex) {
        Ok(()) => Ok(()),
        Err(e) if missing(&e) => Ok(()),
        Err(e) => Err(map_error(&paths::map(root, map_names::GUARDS))(e)),
    }
}

fn unlink(root: &Path, ifindex: u32) -> Result<(), GuardError> {
    let links = paths::links_dir(root);
    for (_, _, hook) in HOOKS {
        let pin = links.join(paths::tc_link_name(ifindex, hook));
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| GuardError::PinnedLink {
                path: pin.clone(),
                source: Box::new(e),
            })?;
            pinned.unpin().map_err(|source| GuardError::Io {
                action: "unpinning",
                path: pin.clone(),
                source,
            })?;
        }
        let marker = links.join(paths::clsact_marker_name(netns_inode()?, ifindex, hook));
        if marker.exists() {
            super::attach::detach_clsact(&marker).map_err(|e| GuardError::PinnedLink {
                path: marker.clone(),
                source: Box::new(e),
            })?;
        }
    }
    Ok(())
}

fn netns_inode() -> Result<u64, GuardError> {
    super::attach::current_netns().map_err(|e| GuardError::PinnedLink {
        path: PathBuf::from("/proc/thread-self/ns/net"),
        source: Box::new(e),
    })
}

/// Who holds the veth `ifindex`: `None` (nobody), `Some(true)` (a guard),
/// `Some(false)` (the agent's own entry).
pub fn entry_state(root: &Path, ifindex: u32) -> Result<Option<bool>, GuardError> {
    let path = paths::map(root, map_names::ENDPOINTS_TC);
    let entries: HashMap<MapData, u32, EndpointInfo> = open_hash(root, map_names::ENDPOINTS_TC)?;
    match entries.get(&ifindex, 0) {
        Ok(info) => Ok(Some(info.flags & endpoint_flags::GUARD != 0)),
        Err(e) if missing(&e) => Ok(None),
        Err(e) => Err(map_error(&path)(e)),
    }
}

/// A guard as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guard {
    pub ifindex: u32,
    pub namespace: String,
    pub pod: String,
    pub since_unix_ms: u64,
    /// The entry is still the plugin's (the pod is not programmed).
    pub holding: bool,
}

/// Every guard record under `root`, with whether its entry still holds.
pub fn guards(root: &Path) -> Result<Vec<Guard>, GuardError> {
    let records: HashMap<MapData, u32, GuardRecord> = open_hash(root, map_names::GUARDS)?;
    let entries: HashMap<MapData, u32, EndpointInfo> = open_hash(root, map_names::ENDPOINTS_TC)?;
    let records_path = paths::map(root, map_names::GUARDS);
    let mut out = Vec::new();
    for item in records.iter() {
        let (ifindex, record) = item.map_err(map_error(&records_path))?;
        let holding = entries
            .get(&ifindex, 0)
            .is_ok_and(|info| info.flags & endpoint_flags::GUARD != 0);
        out.push(Guard {
            ifindex,
            namespace: record.namespace().unwrap_or_default().to_owned(),
            pod: record.name().unwrap_or_default().to_owned(),
            since_unix_ms: record.since_unix_ms,
            holding,
        });
    }
    Ok(out)
}

/// Milliseconds since `since_unix_ms` (0 if the clock went back).
pub fn waited_ms(since_unix_ms: u64) -> u64 {
    now_unix_ms().saturating_sub(since_unix_ms)
}

impl Datapath {
    /// Makes `RF_GUARDNS` hold exactly `wanted` (namespace -> `guard_reasons` bits):
    /// additions first, then removals. Nothing without a pin directory (no plugin
    /// can read private maps).
    pub fn set_guarded_namespaces(
        &mut self,
        wanted: &BTreeMap<String, u32>,
    ) -> Result<(), GuardError> {
        let Some(root) = self.pin_dir.clone() else {
            return Ok(());
        };
        let path = paths::map(&root, map_names::GUARDED_NAMESPACES);
        let mut map: HashMap<MapData, GuardNsKey, u32> =
            open_hash(&root, map_names::GUARDED_NAMESPACES)?;
        let mut present: BTreeMap<String, (GuardNsKey, u32)> = BTreeMap::new();
        for item in map.iter() {
            let (key, reasons) = item.map_err(map_error(&path))?;
            present.insert(key.as_str().unwrap_or_default().to_owned(), (key, reasons));
        }
        for (namespace, reasons) in wanted {
            let Some(key) = GuardNsKey::new(namespace) else {
                continue;
            };
            if present.get(namespace).map(|(_, r)| r) != Some(reasons) {
                map.insert(&key, reasons, 0).map_err(map_error(&path))?;
            }
        }
        for (namespace, (key, _)) in present {
            if !wanted.contains_key(&namespace) {
                match map.remove(&key) {
                    Ok(()) => {}
                    Err(e) if missing(&e) => {}
                    Err(e) => return Err(map_error(&path)(e)),
                }
            }
        }
        Ok(())
    }

    /// Makes `RF_GUARDDNS` hold exactly the DNS addresses guarded pods may query
    /// (`any`: the all-zero key, port 53 anywhere): additions first.
    pub fn set_guard_dns(
        &mut self,
        addresses: &std::collections::BTreeSet<std::net::IpAddr>,
        any: bool,
    ) -> Result<(), super::DatapathError> {
        let mut wanted: std::collections::BTreeSet<rayfence_common::Addr> =
            addresses.iter().map(|ip| super::codec::addr(*ip)).collect();
        if any {
            wanted.insert(rayfence_common::GUARD_DNS_ANY);
        }
        let mut map = maps::guard_dns(&mut self.ebpf)?;
        let present: Vec<rayfence_common::Addr> = map.keys().filter_map(Result::ok).collect();
        for addr in &wanted {
            if !present.contains(addr) {
                map.insert(addr, &1, 0).map_err(map.error())?;
            }
        }
        for addr in present {
            if !wanted.contains(&addr) {
                let _ = map.remove(&addr);
            }
        }
        Ok(())
    }

    /// The guards under the pin directory (none without one).
    pub fn guards(&self) -> Result<Vec<Guard>, GuardError> {
        match &self.pin_dir {
            Some(root) if paths::map(root, map_names::GUARDS).exists() => guards(root),
            _ => Ok(Vec::new()),
        }
    }

    /// Releases the guard on `ifindex` (a pod the agent will not hold, or whose veth
    /// is gone). Leaves an entry the agent owns alone.
    pub fn release_guard(&mut self, ifindex: u32) -> Result<(), GuardError> {
        match &self.pin_dir {
            Some(root) => unguard(root, ifindex),
            None => Ok(()),
        }
    }

    /// After the agent's own entry for `ifindex` is written: forgets the guard record
    /// and returns how long the pod was guarded.
    pub(crate) fn took_over_guard(&mut self, ifindex: u32) -> Option<u64> {
        let root = self.pin_dir.clone()?;
        let mut records: HashMap<MapData, u32, GuardRecord> =
            open_hash(&root, map_names::GUARDS).ok()?;
        let record = records.get(&ifindex, 0).ok()?;
        let _ = records.remove(&ifindex);
        let waited = waited_ms(record.since_unix_ms);
        self.guard_waits.push(waited);
        Some(waited)
    }

    /// How long (milliseconds) each guard the agent took over since the last call waited.
    pub fn take_guard_waits(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.guard_waits)
    }
}
