//! Loading: the embedded eBPF object, map capacities set at load, maps pinned under
//! the bpffs directory (or adopted from it after a restart), and the userspace
//! mirror rebuilt from what the maps hold, so the first apply after a restart is a
//! diff, not a flush and refill.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aya::maps::lpm_trie::Key;
use aya::programs::{CgroupSkb, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use rayfence_common::{EndpointInfo, map_names};

use super::{Attachments, Datapath, DatapathError, NodeTrust, bpffs, codec, maps, migrate, paths};
use crate::tables::Tables;

/// The compiled programs (built by agent/build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rayfence-datapath"));

pub(crate) const TC_PROGRAMS: [&str; 3] = ["tc_ingress", "tc_egress", "tc_floor"];
pub(crate) const CGROUP_PROGRAMS: [&str; 2] = ["cgroup_skb_ingress", "cgroup_skb_egress"];

/// Loads every program (the verifier checks each one: most of the agent's start-up)
/// on a thread of its own, so they are checked side by side on as many cores.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let all = || TC_PROGRAMS.iter().chain(&CGROUP_PROGRAMS).copied();
    let wanted: Vec<(&'static str, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| all().find(|known| *known == name).map(|n| (n, program)))
        .collect();
    if let Some(missing) = all().find(|name| !wanted.iter().any(|(found, _)| found == name)) {
        return Err(DatapathError::MissingProgram { program: missing });
    }
    std::thread::scope(|scope| {
        let loads: Vec<_> = wanted
            .into_iter()
            .map(|(name, program)| scope.spawn(move || load_program(name, program)))
            .collect();
        // A panic in a load is a bug: let it surface as one.
        loads.into_iter().try_for_each(|load| {
            load.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

fn load_program(
    name: &'static str,
    program: &mut aya::programs::Program,
) -> Result<(), DatapathError> {
    let loaded = if TC_PROGRAMS.contains(&name) {
        let program: &mut SchedClassifier = program
            .try_into()
            .map_err(|_| DatapathError::MissingProgram { program: name })?;
        program.load()
    } else {
        let program: &mut CgroupSkb = program
            .try_into()
            .map_err(|_| DatapathError::MissingProgram { program: name })?;
        program.load()
    };
    loaded.map_err(|source| DatapathError::program(name, source))
}

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

    /// Each sized map's `max_entries`, as the loader sets them.
    pub fn max_entries(&self) -> [(&'static str, u32); 14] {
        [
            (map_names::ENDPOINTS_TC, self.endpoints),
            (map_names::ENDPOINTS_CGROUP, self.endpoints),
            (map_names::IDENTITIES, self.identities),
            (map_names::CIDRS, self.cidrs),
            (map_names::POLICY, self.policy),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::FRAGMENTS, self.fragments),
            (map_names::COUNTERS, self.counters),
            (map_names::EVENTS, self.events_bytes),
            (map_names::NODE_PORTS, self.node_ports()),
            (map_names::NODE_CGROUPS, self.endpoints),
            (map_names::NODE_FLOWS, self.node_flows()),
            (map_names::GUARDED_NAMESPACES, self.endpoints),
            (map_names::GUARDS, self.endpoints),
        ]
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
    /// Loads the programs (the verifier checks all of them here) and the maps,
    /// replacing pinned maps that no longer match (see [`super::migrate`]).
    pub fn load(options: &DatapathOptions) -> Result<Self, DatapathError> {
        Self::load_with(options, migrate::CONVERSIONS)
    }

    /// [`Self::load`] with the conversions between map layouts given (the
    /// release's are [`migrate::CONVERSIONS`]).
    pub fn load_with(
        options: &DatapathOptions,
        conversions: &'static [migrate::Conversion],
    ) -> Result<Self, DatapathError> {
        let caps = options.capacities;
        let max_entries = caps.max_entries();
        let mut loader = EbpfLoader::new();
        for (name, max) in max_entries {
            loader.map_max_entries(name, max);
        }
        // Who is behind a node address needs the kernel's conntrack (docs/semantics.md "What counts as the node").
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
        let mut migration = None;
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
            let prepared = migrate::prepare(dir, object.bytes(), &max_entries, conversions)
                .map_err(|e| DatapathError::Migrate(Box::new(e)))?;
            for name in map_names::ALL {
                loader.map_pin_path(name, prepared.pin_path(name));
            }
            migration = Some(prepared);
        }
        let mut ebpf = loader
            .load(object.bytes())
            .map_err(|source| DatapathError::Load {
                pin_dir: options.bpffs_dir.clone(),
                source: Box::new(source),
            })?;
        load_programs(&mut ebpf)?;
        if let Some(dir) = &options.bpffs_dir {
            pin_tc_programs(&mut ebpf, dir)?;
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
        // Before any swap: new programs must never see a configuration or a CIDR
        // map without them.
        datapath.write_config(options.events_per_second)?;
        datapath.insert_v4_barrier()?;
        if let Some(prepared) = migration.as_ref().filter(|p| p.migrates()) {
            // The order is migrate.rs's: copy, swap every link, then commit.
            let t0 = std::time::Instant::now();
            let copied = prepared
                .copy()
                .map_err(|e| DatapathError::Migrate(Box::new(e)))?;
            let t1 = std::time::Instant::now();
            let links = datapath.swap_pinned_links(true)?;
            let t2 = std::time::Instant::now();
            let caught_up = prepared
                .commit()
                .map_err(|e| DatapathError::Migrate(Box::new(e)))?;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            for (map, stats) in &copied {
                let late = caught_up.get(map).map_or(0, |c| c.entries);
                tracing::info!(map = %map, entries = stats.entries, late_entries = late,
                    "carried a pinned map's entries into its replacement");
            }
            tracing::info!(
                links,
                copy_ms = ms(t1 - t0),
                swap_ms = ms(t2 - t1),
                commit_ms = ms(t2.elapsed()),
                "swapped the programs on the pinned links to the new maps"
            );
        } else if migration.as_ref().is_some_and(|p| p.all_kept()) {
            // Every pinned link runs this agent's programs on the pinned maps from
            // here on (a link may still run those of an attempt that stopped after
            // swapping, on maps that were never committed). Not when a map was just
            // created empty: there, each link is swapped when its endpoint is
            // attached, after its entry is written (attach.rs), never before.
            datapath.swap_pinned_links(false)?;
        }
        datapath.adopt_maps()?;
        Ok(datapath)
    }

    fn write_config(&mut self, events_per_second: u32) -> Result<(), DatapathError> {
        let mut config = maps::config(&mut self.ebpf)?;
        let value = rayfence_common::DatapathConfig {
            events_per_second,
            flags: 0,
        };
        config.set(0, &value, 0).map_err(config.error())
    }

    fn insert_v4_barrier(&mut self) -> Result<(), DatapathError> {
        let mut cidrs = maps::cidrs(&mut self.ebpf)?;
        let (len, addr) = codec::v4_barrier();
        cidrs
            .insert(&Key::new(len, addr), &rayfence_common::identity::NONE, 0)
            .map_err(cidrs.error())
    }

    /// Rebuilds the mirror and the attachments from the maps (empty when fresh).
    fn adopt_maps(&mut self) -> Result<(), DatapathError> {
        let mut tables = Tables::default();
        let mut attachments: BTreeMap<_, Attachments> = BTreeMap::new();
        let mut generations = BTreeMap::new();
        {
            let map = maps::identities(&self.ebpf)?;
            for item in map.iter() {
                let (addr, identity) = item.map_err(map.error())?;
                tables.addresses.insert(codec::ip(addr), identity);
            }
        }
        {
            let map = maps::cidrs(&self.ebpf)?;
            let barrier = codec::v4_barrier();
            for item in map.iter() {
                let (key, identity) = item.map_err(map.error())?;
                if (key.prefix_len(), key.data()) == barrier {
                    continue;
                }
                if let Some(net) = codec::net(key.prefix_len(), key.data()) {
                    tables.cidrs.insert(net, identity);
                }
            }
        }
        {
            let map = maps::policy(&self.ebpf)?;
            for item in map.iter() {
                let (key, _) = item.map_err(map.error())?;
                if let Some(row) = codec::policy_row(key.prefix_len(), &key.data()) {
                    tables.policy.insert(row);
                }
            }
        }
        {
            let map = maps::node_ports(&self.ebpf)?;
            for item in map.iter() {
                let (key, identity) = item.map_err(map.error())?;
                tables.node_ports.insert(codec::node_port(&key), identity);
            }
        }
        let mut node_cgroups = BTreeMap::new();
        {
            let map = maps::node_cgroups(&self.ebpf)?;
            for item in map.iter() {
                let (cgroup, class) = item.map_err(map.error())?;
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
            let map = maps::endpoints_tc(&self.ebpf)?;
            for item in map.iter() {
                let (ifindex, info) = item.map_err(map.error())?;
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
            let map = maps::endpoints_cgroup(&self.ebpf)?;
            for item in map.iter() {
                let (cgroup, info) = item.map_err(map.error())?;
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
