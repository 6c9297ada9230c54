//! Upgrades and resizes of the pinned maps.
//!
//! A restarted agent adopts what is pinned under its bpffs directory. When a pinned
//! map no longer matches what this agent's object and flags ask for (another
//! `max_entries`, another key or value size, or a new versioned name such as a
//! `_V2` layout), the agent builds the new map beside the old one, carries the state
//! across, swaps the programs on their existing links, and only then puts the new
//! map under the name, as Cilium migrates its maps (new map pinned aside, programs
//! replaced, then the pin renamed over the old one).
//!
//! The order, and what a crash after each step leaves:
//! 1. [`prepare`]: plan and check (a shrink that does not fit is refused here);
//!    stale `<name>-new` pins of an interrupted attempt are removed. Nothing that
//!    enforces has changed.
//! 2. the loader creates the new maps pinned at `<name>-new`, the programs are
//!    loaded against them, [`Prepared::copy`] fills them from the old maps. The old
//!    programs still run on the old maps; the next start removes the `-new` pins.
//! 3. the programs are swapped on every pinned link (`BPF_LINK_UPDATE`: the hook is
//!    never empty). A link runs either the old programs on the old maps or the new
//!    ones on complete copies; both enforce the same policy. The old pins are still
//!    the names, so the next start migrates again from them.
//! 4. [`Prepared::commit`]: entries the old programs wrote between 2 and 3 (a new
//!    connection) are copied across, each `<name>-new` is renamed over `<name>` (one
//!    atomic rename per map), and the old names of a layout change are unpinned.
//!    A crash between two renames leaves some maps committed (adopted as they are by
//!    the next start) and the rest migrated again from their old pins.
//!
//! Must not: drop state silently (a map whose entries do not fit is refused, naming
//! the map and the numbers, before anything changes; only an LRU cache such as
//! conntrack may shrink, evicting as it does when full, and says so), or know what
//! the entries mean: a layout change converts through the map's [`Conversion`].
use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapInfo};
use rayfence_common::map_names;

use super::paths;

/// Map types, from linux/bpf.h (`enum bpf_map_type`).
mod map_type {
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
    pub const PERCPU_CGROUP_STORAGE: u32 = 15;
    pub const RINGBUF: u32 = 27;
}

/// Suffix of a new map pinned beside the one it replaces until it is committed
/// (bpffs refuses names with a dot).
pub const NEW_SUFFIX: &str = "-new";

/// A map as the kernel creates it: what must match for a pinned map to be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapSpec {
    fn percpu(&self) -> bool {
        matches!(
            self.map_type,
            map_type::PERCPU_HASH
                | map_type::PERCPU_ARRAY
                | map_type::LRU_PERCPU_HASH
                | map_type::PERCPU_CGROUP_STORAGE
        )
    }

    /// An LRU map evicts when full by design: it may shrink.
    fn lru(&self) -> bool {
        matches!(
            self.map_type,
            map_type::LRU_HASH | map_type::LRU_PERCPU_HASH
        )
    }

    /// Whether entries can be copied byte for byte (only the size, the type or the
    /// flags differ).
    fn same_layout(&self, other: &MapSpec) -> bool {
        self.key_size == other.key_size
            && self.value_size == other.value_size
            && self.percpu() == other.percpu()
            && self.map_type != map_type::RINGBUF
            && other.map_type != map_type::RINGBUF
    }
}

/// An entry as the map syscalls move it: key bytes, value bytes.
pub type Entry = (Vec<u8>, Vec<u8>);

/// How entries of a pinned map in an older layout become entries of this agent's
/// map: one per map and old layout, written when a layout changes (the map gets a
/// new versioned name, `RF_X_V1` to `RF_X_V2`).
#[derive(Clone, Copy)]
pub struct Conversion {
    /// The pinned map's name ...
    pub from: &'static str,
    /// ... and its layout.
    pub from_key_size: u32,
    pub from_value_size: u32,
    /// The map of this agent's object it becomes (may be `from`, for a layout
    /// change that kept its name).
    pub to: &'static str,
    /// One entry in the old layout to one in the new (per-CPU values: every CPU's
    /// value, each padded to 8 bytes). `None`: it cannot be carried, and the
    /// migration is refused with nothing changed.
    pub convert: fn(key: &[u8], value: &[u8]) -> Option<Entry>,
}

impl std::fmt::Debug for Conversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversion")
            .field("from", &self.from)
            .field("from_key_size", &self.from_key_size)
            .field("from_value_size", &self.from_value_size)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

/// The conversions of this release. Every map still has its first layout (`_V1`),
/// so there are none yet.
pub const CONVERSIONS: &[Conversion] = &[];

/// What the entries of a map are worth carrying to a new one.
fn carries_entries(name: &str) -> bool {
    // The configuration is written at every load, the event budget refills within
    // a second, and a ring buffer has no entries (the agent drains it).
    !matches!(
        name,
        map_names::CONFIG | map_names::EVENT_BUDGET | map_names::EVENTS
    )
}

/// What happens to one map of this agent's object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Pinned and matching: the loader reuses it.
    Keep,
    /// Nothing pinned: the loader creates and pins it.
    Create,
    /// A new map replaces the pinned `source`.
    Migrate(Migration),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// The pinned map the state comes from (this map's name, or an older one).
    pub source: String,
    pub pinned: MapSpec,
    pub wanted: MapSpec,
    /// Index into the conversions the plan was made with; `None`: copied as is.
    pub conversion: Option<usize>,
    /// Whether its entries are copied (false: the new map starts empty).
    pub carry: bool,
}

/// Every map's step, and the pins of older names to remove once the new ones are
/// committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub maps: Vec<(String, Step)>,
    pub stale: Vec<String>,
}

impl Plan {
    pub fn migrations(&self) -> impl Iterator<Item = (&str, &Migration)> {
        self.maps.iter().filter_map(|(name, step)| match step {
            Step::Migrate(migration) => Some((name.as_str(), migration)),
            _ => None,
        })
    }

    pub fn migrates(&self) -> bool {
        self.migrations().next().is_some() || !self.stale.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("reading the map definitions of the eBPF object")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("map {map} is missing from the eBPF object")]
    MissingMap { map: String },
    #[error("pinned map {path}")]
    Pinned {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "pinned map {map} has a layout this agent cannot read (key size {}, value size {}, type {}; \
         this agent's: {}, {}, {}) and no conversion between them: nothing was changed",
        pinned.key_size, pinned.value_size, pinned.map_type,
        wanted.key_size, wanted.value_size, wanted.map_type
    )]
    LayoutChanged {
        map: String,
        pinned: MapSpec,
        wanted: MapSpec,
    },
    #[error(
        "pinned map {map} holds {entries} entries, more than the {capacity} this agent is \
         configured for (it has room for {pinned}): not shrinking it, nothing was changed; \
         give it room for at least {entries}"
    )]
    DoesNotFit {
        map: String,
        entries: u64,
        capacity: u32,
        pinned: u32,
    },
    #[error(
        "{failed} of the entries of pinned map {map} cannot be converted to the layout of \
         {to}: nothing was changed"
    )]
    Unconvertible {
        map: String,
        to: String,
        failed: u64,
    },
    #[error(
        "{count} clsact filters (kernels without TCX) under {dir} cannot have their programs \
         replaced from here (made by an older agent, which did not record the filter, or in \
         another network namespace), so the pinned maps cannot be replaced; nothing was \
         changed (keep the map sizes, or run `rayfence cleanup` and start again)"
    )]
    Clsact { dir: PathBuf, count: usize },
    #[error(
        "pinned link {path} is of no kind this agent knows, so its program could not be \
         swapped: nothing was changed"
    )]
    UnknownLink { path: PathBuf },
    #[error("{op} on pinned map {map}")]
    Syscall {
        op: &'static str,
        map: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> MigrateError {
    MigrateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What this agent's object creates for each pinned map, with the loader's
/// `max_entries` overrides applied.
pub fn wanted(
    object: &[u8],
    max_entries: &[(&'static str, u32)],
) -> Result<Vec<(String, MapSpec)>, MigrateError> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| MigrateError::Object(Box::new(e)))?;
    let mut specs = Vec::new();
    for name in map_names::ALL {
        let map = parsed
            .maps
            .get(name)
            .ok_or_else(|| MigrateError::MissingMap {
                map: name.to_owned(),
            })?;
        let max = max_entries
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(map.max_entries(), |(_, max)| *max);
        specs.push((
            name.to_owned(),
            MapSpec {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: max,
                flags: map.map_flags(),
            },
        ));
    }
    Ok(specs)
}

/// Which of the maps named `names` are pinned under `maps_dir`, and as what.
/// Nothing else there is read: it is not this agent's to judge.
pub fn pinned<'n>(
    maps_dir: &Path,
    names: impl IntoIterator<Item = &'n str>,
) -> Result<BTreeMap<String, MapSpec>, MigrateError> {
    let mut found = BTreeMap::new();
    for name in names {
        let path = maps_dir.join(name);
        if path.exists() {
            found.insert(name.to_owned(), spec_of(&path)?);
        }
    }
    Ok(found)
}

fn spec_of(path: &Path) -> Result<MapSpec, MigrateError> {
    let info = MapInfo::from_pin(path).map_err(|e| MigrateError::Pinned {
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    let map_type = info.map_type().map_err(|e| MigrateError::Pinned {
        path: path.to_owned(),
        source: Box::new(e),
    })? as u32;
    Ok(MapSpec {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        // Access modes describe a descriptor, not the map (aya ignores them too).
        flags: info.map_flags() & !(BPF_F_RDONLY | BPF_F_WRONLY),
    })
}

const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_F_WRONLY: u32 = 1 << 4;

/// Decides each map's step from what the object wants and what is pinned. Pure.
pub fn plan(
    wanted: &[(String, MapSpec)],
    pinned: &BTreeMap<String, MapSpec>,
    conversions: &[Conversion],
) -> Result<Plan, MigrateError> {
    let mut plan = Plan::default();
    let matches = |c: &Conversion, spec: &MapSpec| {
        c.from_key_size == spec.key_size && c.from_value_size == spec.value_size
    };
    for (name, spec) in wanted {
        let step = match pinned.get(name) {
            Some(old) if old == spec => Step::Keep,
            Some(old) => {
                let conversion = conversions
                    .iter()
                    .position(|c| c.from == name && c.to == name && matches(c, old));
                let carry = carries_entries(name);
                if conversion.is_none() && carry && !old.same_layout(spec) {
                    return Err(MigrateError::LayoutChanged {
                        map: name.clone(),
                        pinned: *old,
                        wanted: *spec,
                    });
                }
                Step::Migrate(Migration {
                    source: name.clone(),
                    pinned: *old,
                    wanted: *spec,
                    conversion,
                    carry,
                })
            }
            None => {
                let older = conversions.iter().enumerate().find_map(|(i, c)| {
                    let old = pinned.get(c.from)?;
                    (c.to == name && c.from != name && matches(c, old)).then_some((i, c, old))
                });
                match older {
                    Some((i, c, old)) => {
                        plan.stale.push(c.from.to_owned());
                        Step::Migrate(Migration {
                            source: c.from.to_owned(),
                            pinned: *old,
                            wanted: *spec,
                            conversion: Some(i),
                            carry: true,
                        })
                    }
                    None => Step::Create,
                }
            }
        };
        plan.maps.push((name.clone(), step));
    }
    // An older name still pinned beside its committed successor: an upgrade that
    // stopped between the rename and the unpin.
    for c in conversions {
        let committed = plan
            .maps
            .iter()
            .any(|(name, step)| name == c.to && *step == Step::Keep);
        if c.from != c.to
            && committed
            && pinned.contains_key(c.from)
            && !plan.stale.iter().any(|s| s == c.from)
        {
            plan.stale.push(c.from.to_owned());
        }
    }
    Ok(plan)
}

/// An LRU map that will lose entries to eviction when copied into a smaller one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Eviction {
    pub map: String,
    pub entries: u64,
    pub capacity: u32,
}

/// Checks that every migrated map's entries fit the new map. `entries`: how many
/// each source holds. Pure.
pub fn check_fit(
    plan: &Plan,
    entries: &BTreeMap<String, u64>,
) -> Result<Vec<Eviction>, MigrateError> {
    let mut evictions = Vec::new();
    for (name, migration) in plan.migrations() {
        if !migration.carry {
            continue;
        }
        let held = entries.get(&migration.source).copied().unwrap_or(0);
        let capacity = migration.wanted.max_entries;
        if held <= u64::from(capacity) {
            continue;
        }
        if migration.wanted.lru() && migration.pinned.lru() {
            evictions.push(Eviction {
                map: name.to_owned(),
                entries: held,
                capacity,
            });
        } else {
            return Err(MigrateError::DoesNotFit {
                map: migration.source.clone(),
                entries: held,
                capacity,
                pinned: migration.pinned.max_entries,
            });
        }
    }
    Ok(evictions)
}

/// A checked plan for one bpffs directory, ready to be carried out.
#[derive(Debug)]
pub struct Prepared {
    dir: PathBuf,
    pub plan: Plan,
    conversions: &'static [Conversion],
    pub evictions: Vec<Eviction>,
}

/// Step 1: plans the migration of the maps under `dir` to what `object` creates,
/// checks that it fits and that every link can be swapped, and removes the `-new`
/// pins of an interrupted attempt. Changes nothing that enforces.
pub fn prepare(
    dir: &Path,
    object: &[u8],
    max_entries: &[(&'static str, u32)],
    conversions: &'static [Conversion],
) -> Result<Prepared, MigrateError> {
    let maps_dir = paths::maps_dir(dir);
    remove_new_pins(&maps_dir)?;
    let wanted = wanted(object, max_entries)?;
    let names = wanted
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(conversions.iter().map(|c| c.from));
    let pinned = pinned(&maps_dir, names)?;
    let plan = plan(&wanted, &pinned, conversions)?;
    let mut evictions = Vec::new();
    if plan.migrates() {
        check_links(&paths::links_dir(dir))?;
        let mut entries = BTreeMap::new();
        for (_, migration) in plan.migrations() {
            if migration.carry {
                let path = paths::map(dir, &migration.source);
                let source = open(&path)?;
                let raw = RawMap::new(&source, &migration.source, &migration.pinned)?;
                entries.insert(migration.source.clone(), raw.keys()?.len() as u64);
            }
        }
        evictions = check_fit(&plan, &entries)?;
        for (name, migration) in plan.migrations() {
            tracing::info!(
                map = name,
                from = %migration.source,
                max_entries = migration.wanted.max_entries,
                pinned_max_entries = migration.pinned.max_entries,
                entries = entries.get(&migration.source).copied().unwrap_or(0),
                converted = migration.conversion.is_some(),
                "migrating pinned map"
            );
        }
        for eviction in &evictions {
            tracing::warn!(
                map = %eviction.map,
                entries = eviction.entries,
                capacity = eviction.capacity,
                "the new map is smaller than what the pinned one holds: as when it is full, \
                 the least recently used entries are evicted"
            );
        }
    }
    Ok(Prepared {
        dir: dir.to_owned(),
        plan,
        conversions,
        evictions,
    })
}

/// Every pinned link must be one whose program can be swapped.
fn check_links(links_dir: &Path) -> Result<(), MigrateError> {
    if !links_dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(links_dir).map_err(|e| io_error("listing", links_dir, e))?;
    let mut clsact = 0;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", links_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("nl_") {
            if !super::attach::clsact_swappable(&entry.path()) {
                clsact += 1;
            }
        } else if super::attach::link_program(&name).is_none() {
            return Err(MigrateError::UnknownLink { path: entry.path() });
        }
    }
    if clsact > 0 {
        return Err(MigrateError::Clsact {
            dir: links_dir.to_owned(),
            count: clsact,
        });
    }
    Ok(())
}

fn remove_new_pins(maps_dir: &Path) -> Result<(), MigrateError> {
    if !maps_dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(maps_dir).map_err(|e| io_error("listing", maps_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", maps_dir, e))?;
        if entry.file_name().to_string_lossy().ends_with(NEW_SUFFIX) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing a map of an interrupted migration");
            std::fs::remove_file(&path).map_err(|e| io_error("removing", &path, e))?;
        }
    }
    Ok(())
}

fn open(path: &Path) -> Result<MapData, MigrateError> {
    MapData::from_pin(path).map_err(|e| MigrateError::Pinned {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// What one copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub entries: u64,
    /// Entries the new map had already (only when filling in what is missing).
    pub present: u64,
}

impl Prepared {
    /// Where the loader pins map `name`: its own pin, or beside it while migrating.
    pub fn pin_path(&self, name: &str) -> PathBuf {
        let migrating = self.plan.migrations().any(|(n, _)| n == name);
        if migrating {
            paths::map(&self.dir, &format!("{name}{NEW_SUFFIX}"))
        } else {
            paths::map(&self.dir, name)
        }
    }

    pub fn migrates(&self) -> bool {
        self.plan.migrates()
    }

    /// Every map was pinned and is reused as it is.
    pub fn all_kept(&self) -> bool {
        self.plan.maps.iter().all(|(_, step)| *step == Step::Keep)
    }

    /// Step 2: fills the new maps from the old ones.
    pub fn copy(&self) -> Result<BTreeMap<String, Copied>, MigrateError> {
        self.copy_all(false)
    }

    /// Step 4 (after the programs are swapped): what the old programs wrote since
    /// [`Self::copy`], then the renames and the unpinning of old names.
    pub fn commit(&self) -> Result<BTreeMap<String, Copied>, MigrateError> {
        let caught_up = self.copy_all(true)?;
        for (name, _) in self.plan.migrations() {
            let new = paths::map(&self.dir, &format!("{name}{NEW_SUFFIX}"));
            let target = paths::map(&self.dir, name);
            // rename(2) replaces the old pin in one step (bpffs: simple_rename).
            std::fs::rename(&new, &target).map_err(|e| io_error("renaming", &new, e))?;
        }
        for stale in &self.plan.stale {
            let path = paths::map(&self.dir, stale);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| io_error("unpinning", &path, e))?;
                tracing::info!(map = %stale, "unpinned the map of an older layout");
            }
        }
        Ok(caught_up)
    }

    fn copy_all(&self, only_missing: bool) -> Result<BTreeMap<String, Copied>, MigrateError> {
        let mut copied = BTreeMap::new();
        for (name, migration) in self.plan.migrations() {
            if !migration.carry {
                continue;
            }
            let source = open(&paths::map(&self.dir, &migration.source))?;
            let target_path = paths::map(&self.dir, &format!("{name}{NEW_SUFFIX}"));
            let target = open(&target_path)?;
            let conversion = migration.conversion.and_then(|i| self.conversions.get(i));
            let stats = copy_map(
                &RawMap::new(&source, &migration.source, &migration.pinned)?,
                &RawMap::new(&target, name, &migration.wanted)?,
                conversion,
                only_missing,
                migration.wanted.lru(),
            )?;
            copied.insert(name.to_owned(), stats);
        }
        Ok(copied)
    }
}

/// Copies (or converts) every entry of `from` into `to`. `only_missing`: entries
/// `to` has keep their value. `evicting`: `to` is an LRU map that may be smaller.
fn copy_map(
    from: &RawMap<'_>,
    to: &RawMap<'_>,
    conversion: Option<&Conversion>,
    only_missing: bool,
    evicting: bool,
) -> Result<Copied, MigrateError> {
    const BPF_ANY: u64 = 0;
    const BPF_NOEXIST: u64 = 1;
    let mut stats = Copied::default();
    let mut failed = 0u64;
    let mut value = vec![0u8; from.value_len];
    for key in from.keys()? {
        if !from.lookup(&key, &mut value)? {
            continue; // deleted meanwhile (an LRU eviction)
        }
        let owned;
        let (key, value): (&[u8], &[u8]) = match conversion {
            Some(c) => match (c.convert)(&key, &value) {
                Some((k, v)) if k.len() == to.key_size && v.len() == to.value_len => {
                    owned = (k, v);
                    (&owned.0, &owned.1)
                }
                _ => {
                    failed += 1;
                    continue;
                }
            },
            None => (&key, &value),
        };
        let flags = if only_missing { BPF_NOEXIST } else { BPF_ANY };
        match to.update(key, value, flags) {
            Ok(()) => stats.entries += 1,
            Err(e) if only_missing && e.raw_os_error() == Some(libc::EEXIST) => stats.present += 1,
            // Checked before anything changed: only an LRU map may be smaller, and it
            // evicts rather than failing.
            Err(e) if evicting && e.raw_os_error() == Some(libc::E2BIG) => {}
            Err(source) => {
                return Err(MigrateError::Syscall {
                    op: "copying an entry",
                    map: to.name.to_owned(),
                    source,
                });
            }
        }
    }
    if failed > 0 {
        return Err(MigrateError::Unconvertible {
            map: from.name.to_owned(),
            to: to.name.to_owned(),
            failed,
        });
    }
    Ok(stats)
}

/// A map read and written as bytes (the syscalls aya keeps to itself).
struct RawMap<'a> {
    fd: BorrowedFd<'a>,
    name: &'a str,
    key_size: usize,
    /// A value as the syscalls move it: per-CPU maps carry every possible CPU's.
    value_len: usize,
    max_entries: u32,
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

impl<'a> RawMap<'a> {
    fn new(map: &'a MapData, name: &'a str, spec: &MapSpec) -> Result<Self, MigrateError> {
        let value_len = if spec.percpu() {
            let cpus = aya::util::nr_cpus().map_err(|(_, source)| MigrateError::Syscall {
                op: "counting possible CPUs",
                map: name.to_owned(),
                source,
            })?;
            (spec.value_size as usize).next_multiple_of(8) * cpus.get() as usize
        } else {
            spec.value_size as usize
        };
        Ok(Self {
            fd: map.fd().as_fd(),
            name,
            key_size: spec.key_size as usize,
            value_len,
            max_entries: spec.max_entries,
        })
    }

    fn call(&self, cmd: libc::c_long, key: u64, value: u64, flags: u64) -> std::io::Result<()> {
        let attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key,
            value,
            flags,
        };
        // SAFETY: a valid, initialised prefix of `union bpf_attr` for the map element
        // commands; the buffers it points to are sized for the map's key and value
        // and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &attr as *const ElemAttr,
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every key, each once. A hash map restarts from its first key when the key
    /// asked about was deleted meanwhile (a live LRU), so keys are collected into a
    /// set and the walk is bounded.
    fn keys(&self) -> Result<Vec<Vec<u8>>, MigrateError> {
        const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
        let mut seen = HashSet::new();
        let mut keys = Vec::new();
        let mut current: Option<Vec<u8>> = None;
        let bound = u64::from(self.max_entries).saturating_mul(4) + 16;
        for _ in 0..bound {
            let mut next = vec![0u8; self.key_size];
            let key_ptr = current.as_ref().map_or(0, |k| k.as_ptr() as u64);
            match self.call(BPF_MAP_GET_NEXT_KEY, key_ptr, next.as_mut_ptr() as u64, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(source) => {
                    return Err(MigrateError::Syscall {
                        op: "listing keys",
                        map: self.name.to_owned(),
                        source,
                    });
                }
            }
            if seen.insert(next.clone()) {
                keys.push(next.clone());
            }
            current = Some(next);
        }
        Ok(keys)
    }

    /// Reads `key`'s value into `value`; false when it is not there.
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<bool, MigrateError> {
        const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
        match self.call(
            BPF_MAP_LOOKUP_ELEM,
            key.as_ptr() as u64,
            value.as_mut_ptr() as u64,
            0,
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(source) => Err(MigrateError::Syscall {
                op: "reading an entry",
                map: self.name.to_owned(),
                source,
            }),
        }
    }

    fn update(&self, key: &[u8], value: &[u8], flags: u64) -> std::io::Result<()> {
        const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
        self.call(
            BPF_MAP_UPDATE_ELEM,
            key.as_ptr() as u64,
            value.as_ptr() as u64,
            flags,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: u32 = 1;
    const LPM: u32 = 11;

    fn spec(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> MapSpec {
        MapSpec {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    fn wanted(maps: &[(&str, MapSpec)]) -> Vec<(String, MapSpec)> {
        maps.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    }

    fn pinned(maps: &[(&str, MapSpec)]) -> BTreeMap<String, MapSpec> {
        maps.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    }

    fn identity(key: &[u8], value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut wide = value.to_vec();
        wide.extend_from_slice(&[0, 0, 0, 0]);
        Some((key.to_vec(), wide))
    }

    const V0_TO_V1: [Conversion; 1] = [Conversion {
        from: "RF_EP_TC_V0",
        from_key_size: 4,
        from_value_size: 12,
        to: map_names::ENDPOINTS_TC,
        convert: identity,
    }];

    #[test]
    fn matching_pins_are_kept_and_missing_ones_created() {
        let policy = spec(LPM, 16, 8, 1024);
        let plan = plan(
            &wanted(&[(map_names::POLICY, policy), (map_names::CIDRS, policy)]),
            &pinned(&[(map_names::POLICY, policy)]),
            &[],
        )
        .unwrap();
        assert_eq!(
            plan.maps,
            vec![
                (map_names::POLICY.to_owned(), Step::Keep),
                (map_names::CIDRS.to_owned(), Step::Create),
            ]
        );
        assert!(!plan.migrates());
    }

    #[test]
    fn another_max_entries_is_a_copy_into_a_new_map() {
        let (old, new) = (spec(LPM, 16, 8, 65536), spec(LPM, 16, 8, 1024));
        let plan = plan(
            &wanted(&[(map_names::POLICY, new)]),
            &pinned(&[(map_names::POLICY, old)]),
            &[],
        )
        .unwrap();
        let expected = Migration {
            source: map_names::POLICY.to_owned(),
            pinned: old,
            wanted: new,
            conversion: None,
            carry: true,
        };
        assert_eq!(
            plan.maps,
            vec![(map_names::POLICY.to_owned(), Step::Migrate(expected))]
        );
        assert!(plan.stale.is_empty());
    }

    #[test]
    fn another_value_size_without_a_conversion_is_refused() {
        let err = plan(
            &wanted(&[(map_names::ENDPOINTS_TC, spec(HASH, 4, 16, 64))]),
            &pinned(&[(map_names::ENDPOINTS_TC, spec(HASH, 4, 12, 64))]),
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(map_names::ENDPOINTS_TC), "{text}");
        assert!(text.contains("value size 12"), "{text}");
    }

    #[test]
    fn a_map_without_state_is_replaced_whatever_its_layout() {
        let plan = plan(
            &wanted(&[(map_names::EVENTS, spec(map_type::RINGBUF, 0, 0, 1 << 20))]),
            &pinned(&[(map_names::EVENTS, spec(map_type::RINGBUF, 0, 0, 1 << 18))]),
            &[],
        )
        .unwrap();
        let (_, migration) = plan.migrations().next().unwrap();
        assert!(!migration.carry);
    }

    #[test]
    fn an_older_name_converts_into_the_new_one_and_is_unpinned_after() {
        let new = spec(HASH, 4, 16, 64);
        let old = spec(HASH, 4, 12, 64);
        let plan = plan(
            &wanted(&[(map_names::ENDPOINTS_TC, new)]),
            &pinned(&[("RF_EP_TC_V0", old)]),
            &V0_TO_V1,
        )
        .unwrap();
        let (name, migration) = plan.migrations().next().unwrap();
        assert_eq!(name, map_names::ENDPOINTS_TC);
        assert_eq!(migration.source, "RF_EP_TC_V0");
        assert_eq!(migration.conversion, Some(0));
        assert_eq!(plan.stale, vec!["RF_EP_TC_V0".to_owned()]);
    }

    #[test]
    fn an_older_name_in_another_layout_than_the_conversion_is_not_taken() {
        let plan = plan(
            &wanted(&[(map_names::ENDPOINTS_TC, spec(HASH, 4, 16, 64))]),
            &pinned(&[("RF_EP_TC_V0", spec(HASH, 4, 8, 64))]),
            &V0_TO_V1,
        )
        .unwrap();
        assert_eq!(plan.maps[0].1, Step::Create);
        assert!(plan.stale.is_empty());
    }

    #[test]
    fn an_older_name_left_beside_its_committed_successor_is_stale() {
        let new = spec(HASH, 4, 16, 64);
        let plan = plan(
            &wanted(&[(map_names::ENDPOINTS_TC, new)]),
            &pinned(&[
                (map_names::ENDPOINTS_TC, new),
                ("RF_EP_TC_V0", spec(HASH, 4, 12, 64)),
            ]),
            &V0_TO_V1,
        )
        .unwrap();
        assert_eq!(plan.maps[0].1, Step::Keep);
        assert_eq!(plan.stale, vec!["RF_EP_TC_V0".to_owned()]);
        assert!(plan.migrates());
    }

    #[test]
    fn a_shrink_that_does_not_fit_names_the_map_and_the_numbers() {
        let plan = plan(
            &wanted(&[(map_names::POLICY, spec(LPM, 16, 8, 100))]),
            &pinned(&[(map_names::POLICY, spec(LPM, 16, 8, 1024))]),
            &[],
        )
        .unwrap();
        let entries = BTreeMap::from([(map_names::POLICY.to_owned(), 101)]);
        let text = check_fit(&plan, &entries).unwrap_err().to_string();
        for needle in [map_names::POLICY, "101 entries", "100", "1024"] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        let entries = BTreeMap::from([(map_names::POLICY.to_owned(), 100)]);
        assert_eq!(check_fit(&plan, &entries).unwrap(), vec![]);
    }

    #[test]
    fn an_lru_cache_may_shrink_and_says_how_much_it_evicts() {
        let lru = |max| spec(map_type::LRU_HASH, 48, 16, max);
        let plan = plan(
            &wanted(&[(map_names::CONNTRACK, lru(1000))]),
            &pinned(&[(map_names::CONNTRACK, lru(4096))]),
            &[],
        )
        .unwrap();
        let entries = BTreeMap::from([(map_names::CONNTRACK.to_owned(), 3000)]);
        assert_eq!(
            check_fit(&plan, &entries).unwrap(),
            vec![Eviction {
                map: map_names::CONNTRACK.to_owned(),
                entries: 3000,
                capacity: 1000,
            }]
        );
    }

    #[test]
    fn per_cpu_and_plain_values_are_different_layouts() {
        let plain = spec(HASH, 8, 16, 64);
        let percpu = spec(map_type::PERCPU_HASH, 8, 16, 64);
        assert!(!plain.same_layout(&percpu));
        assert!(plain.same_layout(&spec(map_type::LRU_HASH, 8, 16, 128)));
    }
}
