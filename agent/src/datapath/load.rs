//! Loading: the embedded eBPF object, map capacities set at load, maps pinned under
//! the bpffs directory (or adopted from it after a restart), and the userspace
//! mirror rebuilt from what the maps hold, so the first apply after a restart is a
//! diff, not a flush and refill.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aya::maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key};
use aya::programs::{CgroupSkb, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use rayfence_common::{Addr, EndpointInfo, NodePortKey, PolicyKey, PolicyValue, map_names};

use super::{Attachments, Datapath, DatapathError, NodeTrust, bpffs, codec, paths};
use crate::tables::Tables;

/// The compiled programs (built by agent/build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rayfence-datapath"));

pub(crate) const TC_PROGRAMS: [&str; 3] = ["tc_ingress", "tc_egress", "tc_floor"];
pub(crate) const CGROUP_PROGRAMS: [&str; 2] = ["cgroup_skb_ingress", "cgroup_skb_egress"];

/// Map sizes, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Host veths and cgroups (each map).
    pub endpoints: u32,
    pub identities: u32,
    pub cidrs: u32,
    pub policy: u32,
    pub conntrack: u32,
    pub fragments: u32,
    pub counters: u32,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub events_bytes: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: 4096,
            identities: 65536,
            cidrs: 16384,
            policy: 65536,
            conntrack: 262_144,
            fragments: 8192,
            counters: 16384,
            events_bytes: 256 * 1024,
        }
    }
}

impl Capacities {
    /// Ports the node DNATs or hostNetwork pods serve: every nodePort of the default
    /// range (2768) for three protocols, and room for hostPorts.
    pub fn node_ports(&self) -> u32 {
        16384
    }

    /// Flows from local hostNetwork pods to local pods (a sixteenth of conntrack).
    pub fn node_flows(&self) -> u32 {
        (self.conntrack / 16).max(1024)
    }

    /// Small maps for tests and benchmarks that load many private instances.
    pub fn small() -> Self {
        Self {
            endpoints: 64,
            identities: 1024,
            cidrs: 1024,
            policy: 1024,
            conntrack: 4096,
            fragments: 256,
            counters: 1024,
            events_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Pin maps and links here and adopt what is already there. `None`: private,
    /// unpinned maps that die with the process (tests, benchmarks).
    pub bpffs_dir: Option<PathBuf>,
    pub capacities: Capacities,
    /// Flow events each CPU may emit per second (0: none).
    pub events_per_second: u32,
    pub tc_backend: TcBackend,
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcBackend {
    /// TCX links on Linux 6.6 and later, clsact filters before.
    #[default]
    Auto,
    Tcx,
    /// clsact qdisc and netlink filters (what `Auto` does on older kernels).
    Clsact,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            bpffs_dir: Some(PathBuf::from(paths::DEFAULT_BPFFS_DIR)),
            capacities: Capacities::default(),
            events_per_second: 100,
            tc_backend: TcBackend::Auto,
        }
    }
}

impl DatapathOptions {
    /// Private maps, small capacities, events on.
    pub fn private() -> Self {
        Self {
            bpffs_dir: None,
            capacities: Capacities::small(),
            events_per_second: 1000,
            tc_backend: TcBackend::Auto,
        }
    }
}

impl Datapath {
    /// Loads the programs (the verifier checks all of them here) and the maps.
    pub fn load(options: &DatapathOptions) -> Result<Self, DatapathError> {
        let caps = options.capacities;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::ENDPOINTS_TC, caps.endpoints)
            .map_max_entries(map_names::ENDPOINTS_CGROUP, caps.endpoints)
            .map_max_entries(map_names::IDENTITIES, caps.identities)
            .map_max_entries(map_names::CIDRS, caps.cidrs)
            .map_max_entries(map_names::POLICY, caps.policy)
            .map_max_entries(map_names::CONNTRACK, caps.conntrack)
            .map_max_entries(map_names::FRAGMENTS, caps.fragments)
            .map_max_entries(map_names::COUNTERS, caps.counters)
            .map_max_entries(map_names::EVENTS, caps.events_bytes)
            .map_max_entries(map_names::NODE_PORTS, caps.node_ports())
            .map_max_entries(map_names::NODE_CGROUPS, caps.endpoints)
            .map_max_entries(map_names::NODE_FLOWS, caps.node_flows())
            .map_max_entries(map_names::GUARDED_NAMESPACES, caps.endpoints)
            .map_max_entries(map_names::GUARDS, caps.endpoints);
        // Who is behind a node address needs the kernel's conntrack (SEMANTICS 5a).
        let conntrack = super::kfuncs::find();
        let object = match &conntrack {
            Ok(ct) => {
                let (patched, calls) = super::kfuncs::patch(OBJECT, ct);
                if calls == 0 {
                    return Err(DatapathError::KfuncPlaceholders);
                }
                loader.override_global("RF_NF_CONN_ORIGINAL_SRC", &ct.original_source_offset, true);
                Aligned::copy_of(&patched)
            }
            Err(reason) => {
                tracing::warn!(%reason, "no conntrack lookup for the datapath: traffic the node \
                    forwards (NodePort, hostPort, masquerade) is judged by the node address it \
                    carries, so only an ipBlock covering that address allows it");
                Aligned::copy_of(OBJECT)
            }
        };
        if let Some(dir) = &options.bpffs_dir {
            bpffs::ensure_mounted(dir)?;
            for sub in [
                paths::maps_dir(dir),
                paths::links_dir(dir),
                paths::progs_dir(dir),
            ] {
                std::fs::create_dir_all(&sub)
                    .map_err(|source| DatapathError::io("creating", &sub, source))?;
            }
            for name in map_names::ALL {
                loader.map_pin_path(name, paths::map(dir, name));
            }
        }
        let mut ebpf = loader
            .load(object.bytes())
            .map_err(|source| DatapathError::Load {
                pin_dir: options.bpffs_dir.clone(),
                source: Box::new(source),
            })?;
        for name in TC_PROGRAMS {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .and_then(|program| program.try_into().ok())
                .ok_or(DatapathError::MissingProgram { program: name })?;
            program
                .load()
                .map_err(|source| DatapathError::program(name, source))?;
        }
        if let Some(dir) = &options.bpffs_dir {
            pin_tc_programs(&mut ebpf, dir)?;
        }
        for name in CGROUP_PROGRAMS {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .and_then(|program| program.try_into().ok())
                .ok_or(DatapathError::MissingProgram { program: name })?;
            program
                .load()
                .map_err(|source| DatapathError::program(name, source))?;
        }
        let mut datapath = Self {
            ebpf,
            node_trust: match conntrack {
                Ok(_) => NodeTrust::Conntrack,
                Err(reason) => NodeTrust::AddressOnly { reason },
            },
            node_cgroups: BTreeMap::new(),
            pin_dir: options.bpffs_dir.clone(),
            tc_backend: options.tc_backend,
            mirror: Tables::default(),
            attachments: BTreeMap::new(),
            generations: BTreeMap::new(),
            forced_fail_closed: BTreeSet::new(),
            held: BTreeSet::new(),
            owned_links: BTreeMap::new(),
            guard_waits: Vec::new(),
        };
        datapath.write_config(options.events_per_second)?;
        datapath.insert_v4_barrier()?;
        datapath.adopt_maps()?;
        Ok(datapath)
    }

    fn write_config(&mut self, events_per_second: u32) -> Result<(), DatapathError> {
        const MAP: &str = map_names::CONFIG;
        let mut config: Array<&mut MapData, rayfence_common::DatapathConfig> =
            Array::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        let value = rayfence_common::DatapathConfig {
            events_per_second,
            flags: 0,
        };
        config
            .set(0, &value, 0)
            .map_err(|e| DatapathError::map(MAP, e))
    }

    fn insert_v4_barrier(&mut self) -> Result<(), DatapathError> {
        const MAP: &str = map_names::CIDRS;
        let mut cidrs: LpmTrie<&mut MapData, Addr, u32> =
            LpmTrie::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        let (len, addr) = codec::v4_barrier();
        cidrs
            .insert(&Key::new(len, addr), &rayfence_common::identity::NONE, 0)
            .map_err(|e| DatapathError::map(MAP, e))
    }

    /// Rebuilds the mirror and the attachments from the maps (empty when fresh).
    fn adopt_maps(&mut self) -> Result<(), DatapathError> {
        let mut tables = Tables::default();
        let mut attachments: BTreeMap<_, Attachments> = BTreeMap::new();
        let mut generations = BTreeMap::new();
        {
            const MAP: &str = map_names::IDENTITIES;
            let map: HashMap<&MapData, Addr, u32> =
                HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (addr, identity) = item.map_err(|e| DatapathError::map(MAP, e))?;
                tables.addresses.insert(codec::ip(addr), identity);
            }
        }
        {
            const MAP: &str = map_names::CIDRS;
            let map: LpmTrie<&MapData, Addr, u32> =
                LpmTrie::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            let barrier = codec::v4_barrier();
            for item in map.iter() {
                let (key, identity) = item.map_err(|e| DatapathError::map(MAP, e))?;
                if (key.prefix_len(), key.data()) == barrier {
                    continue;
                }
                if let Some(net) = codec::net(key.prefix_len(), key.data()) {
                    tables.cidrs.insert(net, identity);
                }
            }
        }
        {
            const MAP: &str = map_names::POLICY;
            let map: LpmTrie<&MapData, PolicyKey, PolicyValue> =
                LpmTrie::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (key, _) = item.map_err(|e| DatapathError::map(MAP, e))?;
                if let Some(row) = codec::policy_row(key.prefix_len(), &key.data()) {
                    tables.policy.insert(row);
                }
            }
        }
        {
            const MAP: &str = map_names::NODE_PORTS;
            let map: HashMap<&MapData, NodePortKey, u32> =
                HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (key, identity) = item.map_err(|e| DatapathError::map(MAP, e))?;
                tables.node_ports.insert(codec::node_port(&key), identity);
            }
        }
        let mut node_cgroups = BTreeMap::new();
        {
            const MAP: &str = map_names::NODE_CGROUPS;
            let map: HashMap<&MapData, u64, u32> =
                HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (cgroup, class) = item.map_err(|e| DatapathError::map(MAP, e))?;
                node_cgroups.insert(cgroup, class);
            }
        }
        let mut record = |info: &EndpointInfo| {
            generations.insert(info.endpoint_id, info.generation);
            if let Some(policy) = codec::endpoint_policy(info) {
                tables.endpoints.insert(info.endpoint_id, policy);
            }
        };
        {
            const MAP: &str = map_names::ENDPOINTS_TC;
            let map: HashMap<&MapData, u32, EndpointInfo> =
                HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (ifindex, info) = item.map_err(|e| DatapathError::map(MAP, e))?;
                // The CNI plugin's guard on a pod not programmed yet: not ours to
                // adopt (nor to detach as a leftover).
                if info.flags & rayfence_common::endpoint_flags::GUARD != 0 {
                    continue;
                }
                record(&info);
                attachments
                    .entry(info.endpoint_id)
                    .or_default()
                    .ifindexes
                    .insert(ifindex);
            }
        }
        {
            const MAP: &str = map_names::ENDPOINTS_CGROUP;
            let map: HashMap<&MapData, u64, EndpointInfo> =
                HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for item in map.iter() {
                let (cgroup, info) = item.map_err(|e| DatapathError::map(MAP, e))?;
                record(&info);
                attachments
                    .entry(info.endpoint_id)
                    .or_default()
                    .cgroups
                    .insert(cgroup);
            }
        }
        self.mirror = tables;
        self.node_cgroups = node_cgroups;
        self.attachments = attachments;
        self.generations = generations;
        Ok(())
    }

    pub(crate) fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { map: name })
    }

    pub(crate) fn map_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { map: name })
    }

    pub(crate) fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub(crate) fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}
/// Pins this agent's TC programs for the CNI plugin, replacing an earlier agent's in
/// one step (pinned under a temporary name, then renamed over the old pin), so a
/// plugin running meanwhile always finds one.
fn pin_tc_programs(ebpf: &mut Ebpf, dir: &std::path::Path) -> Result<(), DatapathError> {
    for name in ["tc_ingress", "tc_egress"] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(DatapathError::MissingProgram { program: name })?;
        let target = paths::prog(dir, name);
        // bpffs refuses names with a dot.
        let staging = paths::progs_dir(dir).join(format!("new_{name}"));
        if staging.exists() {
            std::fs::remove_file(&staging)
                .map_err(|e| DatapathError::io("removing", &staging, e))?;
        }
        program.pin(&staging).map_err(|e| DatapathError::Pin {
            path: staging.clone(),
            source: Box::new(e),
        })?;
        std::fs::rename(&staging, &target)
            .map_err(|e| DatapathError::io("renaming into place", &target, e))?;
    }
    Ok(())
}

/// An object copied to 8-byte aligned memory, as the ELF parser wants it.
struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    fn copy_of(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(le);
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec<u64> holds at least `len` initialised bytes; u8 has no
        // alignment or validity requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}
