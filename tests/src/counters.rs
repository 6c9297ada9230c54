//! The datapath's counter rows as the tests read them: one row per (endpoint,
//! direction, verdict, reason) with its packets and bytes summed over CPUs, as
//! `Datapath::counters` returns them or as the agent's pinned map holds them
//! ([`pinned`], read-only). Shared by the datapath tests and the agent's end-to-end
//! tests. Must not: write a map, or decide what a count should be.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow};
use rayfence::datapath::paths;
use rayfence_common::{CounterKey, CounterValue, Direction, Reason, Verdict, map_names};

use crate::pinned::{self as pinned_map, from_bytes};

/// Every counter row, its values summed over CPUs.
pub type Counters = BTreeMap<CounterKey, CounterValue>;

/// The key of one row.
pub fn key(endpoint: u32, direction: Direction, verdict: Verdict, reason: Reason) -> CounterKey {
    CounterKey {
        endpoint_id: endpoint,
        direction: direction as u8,
        verdict: verdict as u8,
        reason: reason as u8,
        _pad: 0,
    }
}

/// One row's values; zero when nothing was counted there.
pub fn value(
    counters: &Counters,
    endpoint: u32,
    direction: Direction,
    verdict: Verdict,
    reason: Reason,
) -> CounterValue {
    counters
        .get(&key(endpoint, direction, verdict, reason))
        .copied()
        .unwrap_or_default()
}

/// The packets of one row; zero when nothing was counted there.
pub fn packets(
    counters: &Counters,
    endpoint: u32,
    direction: Direction,
    verdict: Verdict,
    reason: Reason,
) -> u64 {
    value(counters, endpoint, direction, verdict, reason).packets
}

/// Every row as (direction, verdict, reason) -> packets, where `endpoint` must be
/// the only endpoint counted.
pub fn rows(counters: &Counters, endpoint: u32) -> BTreeMap<(Direction, Verdict, Reason), u64> {
    counters
        .iter()
        .map(|(key, value)| {
            assert_eq!(key.endpoint_id, endpoint, "{key:?}");
            let row = (
                Direction::from_u8(key.direction).expect("direction"),
                Verdict::from_u8(key.verdict).expect("verdict"),
                Reason::from_u8(key.reason).expect("reason"),
            );
            (row, value.packets)
        })
        .collect()
}

/// Every row of the counters map pinned under `bpffs` (an agent's pin directory),
/// read-only, summed over CPUs.
pub fn pinned(bpffs: &Path) -> Result<Counters> {
    let path = paths::map(bpffs, map_names::COUNTERS);
    let map = pinned_map::Map::open(&path).map_err(|e| anyhow!("open {}: {e}", path.display()))?;
    let cpus = pinned_map::possible_cpus()?;
    let slot = size_of::<CounterValue>().next_multiple_of(8);
    let mut out = BTreeMap::new();
    for key in map.keys(size_of::<CounterKey>())? {
        let Some(values) = map.lookup(&key, slot * cpus)? else {
            continue; // gone in between
        };
        let mut total = CounterValue::default();
        for chunk in values.chunks(slot) {
            let value: CounterValue = from_bytes(chunk);
            total.packets += value.packets;
            total.bytes += value.bytes;
        }
        out.insert(from_bytes::<CounterKey>(&key), total);
    }
    Ok(out)
}
