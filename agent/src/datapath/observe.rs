//! Reading what the datapath did: per-CPU counters summed over CPUs, the count of
//! flow events lost to the rate limit or a full ring, the flow-event stream, and how
//! full each map is.
//!
//! Must not: write anything but the counter rows of a gone endpoint; count a map
//! in the kernel without a bound (a count walks at most `capacity` keys, one
//! `bpf_map_get_next_key` each).
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;

use aya::Pod;
use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuHashMap, RingBuf};
use rayfence_common::{
    Addr, CounterKey, CounterValue, CtKey, CtValue, EndpointInfo, FlowEvent, FragKey, FragValue,
    PolicyKey, PolicyValue, map_names,
};

use super::{Datapath, DatapathError, maps};

/// Counter rows, summed over CPUs.
pub type Counters = BTreeMap<CounterKey, CounterValue>;

impl Datapath {
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let map = maps::counters(&self.ebpf)?;
        let mut counters = Counters::new();
        for item in map.iter() {
            let (key, values) = item.map_err(map.error())?;
            let total = counters.entry(key).or_default();
            for value in values.iter() {
                total.packets += value.packets;
                total.bytes += value.bytes;
            }
        }
        Ok(counters)
    }

    /// Removes the counter rows of an endpoint that is gone, so churn does not
    /// fill the map.
    pub(crate) fn forget_counters(&mut self, endpoint: u32) -> Result<(), DatapathError> {
        let mut map = maps::counters(&mut self.ebpf)?;
        let keys: Vec<CounterKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.endpoint_id == endpoint)
            .collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Flow events not delivered (over the per-CPU budget or ring full), ever.
    pub fn lost_events(&self) -> Result<u64, DatapathError> {
        let map = maps::event_budget(&self.ebpf)?;
        let values = map.get(&0, 0).map_err(map.error())?;
        Ok(values.iter().map(|budget| budget.lost).sum())
    }

    /// The capacity (max entries) the kernel holds for `map`: the size it was created
    /// with, which for a map adopted from a pin may differ from this run's flags.
    pub fn map_capacity(&self, map: &'static str) -> Result<u32, DatapathError> {
        let data = map_data(self.map(map)?).ok_or(DatapathError::MissingMap { map })?;
        let info = data.info().map_err(|e| DatapathError::map(map, e))?;
        Ok(info.max_entries())
    }

    /// Entries of a map the userspace mirror knows exactly (what was written and
    /// not removed): `None` for maps only the datapath writes (conntrack,
    /// fragments, counters), which [`Self::count_entries`] counts in the kernel.
    pub fn mirror_entries(&self, map: &'static str) -> Option<u64> {
        let tables = self.tables();
        let n = match map {
            map_names::ENDPOINTS_TC => self.attachments.values().map(|a| a.ifindexes.len()).sum(),
            map_names::ENDPOINTS_CGROUP => self.attachments.values().map(|a| a.cgroups.len()).sum(),
            map_names::IDENTITIES => tables.addresses.len(),
            // The IPv4 barrier prefix (inserted at load) is an entry too.
            map_names::CIDRS => tables.cidrs.len() + 1,
            map_names::POLICY => tables.policy.len(),
            _ => return None,
        };
        Some(n as u64)
    }

    /// Counts `map`'s entries in the kernel, walking its keys (one syscall per
    /// entry, at most `capacity` of them: under concurrent deletions a walk can
    /// restart, so the count is then approximate but bounded).
    pub fn count_entries(&self, map: &'static str) -> Result<u64, DatapathError> {
        let capacity = self.map_capacity(map)?;
        count_keys(self.map(map)?, map, capacity)
    }

    /// Takes the flow-event ring buffer out of the datapath (once).
    pub fn take_events(&mut self) -> Result<EventStream, DatapathError> {
        const MAP: &str = map_names::EVENTS;
        let map = self
            .ebpf_mut()
            .take_map(MAP)
            .ok_or(DatapathError::MissingMap { map: MAP })?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::map(MAP, e))?;
        Ok(EventStream { ring })
    }
}

/// Every map with an entry capacity, as (short stable metric label, map name). The
/// ring buffer (a byte size), the event budget and the config (one slot each) are
/// left out.
pub const FILL_MAPS: [(&str, &str); 8] = [
    ("endpoints-tc", map_names::ENDPOINTS_TC),
    ("endpoints-cgroup", map_names::ENDPOINTS_CGROUP),
    ("identities", map_names::IDENTITIES),
    ("cidrs", map_names::CIDRS),
    ("policy", map_names::POLICY),
    ("conntrack", map_names::CONNTRACK),
    ("fragments", map_names::FRAGMENTS),
    ("counters", map_names::COUNTERS),
];

/// Counts the entries of the map pinned as `map` under the agent's bpffs directory
/// `bpffs_dir` (for diagnostics and tests: an independent look at the kernel).
pub fn count_pinned(bpffs_dir: &Path, map: &'static str) -> Result<u64, DatapathError> {
    let path = super::paths::map(bpffs_dir, map);
    let data = MapData::from_pin(&path).map_err(|e| DatapathError::map(map, e))?;
    let capacity = data
        .info()
        .map_err(|e| DatapathError::map(map, e))?
        .max_entries();
    let map_obj = Map::from_map_data(data).map_err(|e| DatapathError::map(map, e))?;
    count_keys(&map_obj, map, capacity)
}

fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::LpmTrie(m)
        | Map::Array(m)
        | Map::PerCpuArray(m)
        | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

/// Walks the keys of one of rayfence's maps with its key type (aya checks the
/// sizes), at most `limit` of them.
fn count_keys(map: &Map, name: &'static str, limit: u32) -> Result<u64, DatapathError> {
    let err = |e| DatapathError::map(name, e);
    match name {
        map_names::ENDPOINTS_TC => count_hash::<u32, EndpointInfo>(map, limit).map_err(err),
        map_names::ENDPOINTS_CGROUP => count_hash::<u64, EndpointInfo>(map, limit).map_err(err),
        map_names::IDENTITIES => count_hash::<Addr, u32>(map, limit).map_err(err),
        map_names::CONNTRACK => count_hash::<CtKey, CtValue>(map, limit).map_err(err),
        map_names::FRAGMENTS => count_hash::<FragKey, FragValue>(map, limit).map_err(err),
        map_names::CIDRS => {
            let trie: LpmTrie<&MapData, Addr, u32> = LpmTrie::try_from(map).map_err(err)?;
            count_walk(trie.keys(), limit).map_err(err)
        }
        map_names::POLICY => {
            let trie: LpmTrie<&MapData, PolicyKey, PolicyValue> =
                LpmTrie::try_from(map).map_err(err)?;
            count_walk(trie.keys(), limit).map_err(err)
        }
        map_names::COUNTERS => {
            let counters: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
                PerCpuHashMap::try_from(map).map_err(err)?;
            count_walk(counters.keys(), limit).map_err(err)
        }
        _ => Err(DatapathError::MissingMap { map: name }),
    }
}

fn count_hash<K: Pod, V: Pod>(map: &Map, limit: u32) -> Result<u64, aya::maps::MapError> {
    let hash: HashMap<&MapData, K, V> = HashMap::try_from(map)?;
    count_walk(hash.keys(), limit)
}

fn count_walk<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    limit: u32,
) -> Result<u64, aya::maps::MapError> {
    let mut n = 0u64;
    for key in keys.take(limit as usize) {
        key?;
        n += 1;
    }
    Ok(n)
}

/// Sampled drop and audit events. Poll the fd (epoll, tokio `AsyncFd`) for
/// readiness, then drain with [`EventStream::next_event`].
pub struct EventStream {
    ring: RingBuf<MapData>,
}

impl EventStream {
    /// The next available event, without blocking.
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        let item = self.ring.next()?;
        if item.len() < size_of::<FlowEvent>() {
            return None;
        }
        // SAFETY: the datapath writes whole FlowEvents; read_unaligned copes with any
        // alignment of the ring's storage.
        Some(unsafe { item.as_ptr().cast::<FlowEvent>().read_unaligned() })
    }

    /// Everything available now.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl EventStream {
    /// The same events for async code (tokio): waits on the ring buffer's fd.
    pub fn into_async(self) -> std::io::Result<AsyncEventStream> {
        // SAFETY: the ring buffer owns its fd and keeps it open, unchanged, for as
        // long as the AsyncFd owns the stream.
        let inner = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|error| error.into_parts().1)?;
        Ok(AsyncEventStream { inner })
    }
}

/// [`EventStream`] driven by the tokio reactor.
pub struct AsyncEventStream {
    inner: tokio::io::unix::AsyncFd<EventStream>,
}

impl AsyncEventStream {
    /// The next event, waiting until the datapath sends one.
    pub async fn next_event(&mut self) -> std::io::Result<FlowEvent> {
        loop {
            let mut guard = self.inner.readable_mut().await?;
            if let Some(event) = guard.get_inner_mut().next_event() {
                return Ok(event);
            }
            guard.clear_ready();
        }
    }
}

impl AsFd for EventStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for EventStream {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
