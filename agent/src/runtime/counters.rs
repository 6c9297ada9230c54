//! Datapath counters to metrics: every `counters_interval`, the per-CPU counter
//! map (summed over CPUs) becomes deltas on `rayfence_drops_total`,
//! `rayfence_would_drops_total` (audit) and `rayfence_allowed_flows_total`, with
//! bytes beside the first two; the datapath's lost flow events become
//! `rayfence_flow_events_lost_total`; and each map's entries and capacity become
//! `rayfence_map_entries` / `rayfence_map_capacity`.
//!
//! Restart: the counters live in pinned maps and outlive the agent. A new agent
//! starts with no bookkeeping, so its first publication carries each row's full
//! pinned value: `/metrics` after a restart equals the pinned totals, never a reset
//! and never twice. That is why nothing is published before the first programming
//! (the runtime's gate): only then are endpoint ids names.
//!
//! Boundedness: labels are the pod's namespace, RayCluster, role and worker group
//! (names from the RayCluster spec), direction and reason, never an address, port
//! or pod. A label set no local endpoint carries any more (pod or RayCluster gone,
//! group renamed) is removed from every family, and the bookkeeping keeps only the
//! rows the counter map holds now (the datapath forgets a gone endpoint's rows).
//!
//! Cost: one walk of the counter map per publication (its entry count comes with
//! it); the other maps' fill comes from the datapath's mirror, except conntrack and
//! fragments, which only the datapath writes: they are counted in the kernel (one
//! `bpf_map_get_next_key` per entry, at most `capacity` of them) on a blocking
//! thread of their own, through the pinned maps, so a long walk never holds up the
//! reconcile loop; the next count waits [`KERNEL_COUNT_SPACING`] times as long as
//! the last one took, so counting stays under 1% of one core whatever the fill.
//! Measured here: a full default conntrack map (262,144 entries) takes 0.31-0.47 s
//! to walk, so it is then counted every 31-47 s; a small one at every publication.
//!
//! Must not: write to the datapath, publish before the first programming, or keep
//! a series or a bookkeeping row of something that is gone.
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rayfence_common::{CounterKey, CounterValue, Direction, Reason, Verdict, map_names};

use crate::datapath::Datapath;
use crate::datapath::observe::{FILL_MAPS, count_pinned};
use crate::operator::metrics::{CounterSeries, DropLabels, Metrics, Stage};
use crate::policy::Role;
use crate::policy::engine::EndpointMeta;

/// The pause after a count of conntrack and fragments in the kernel, as a multiple
/// of the time the count took (100: at most 1% of one core).
pub const KERNEL_COUNT_SPACING: u32 = 100;

/// Which families a counter row of `verdict` feeds.
fn series_of(verdict: u8) -> Option<CounterSeries> {
    Some(match Verdict::from_u8(verdict)? {
        Verdict::Drop => CounterSeries::Drop,
        Verdict::Audit => CounterSeries::WouldDrop,
        Verdict::Allow => CounterSeries::AllowedFlow,
    })
}

/// The pod part of a counter row's labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Owner {
    pub namespace: String,
    pub raycluster: String,
    pub role: String,
    pub group: String,
}

impl Owner {
    pub fn of(meta: &EndpointMeta) -> Self {
        let (role, group) = match &meta.role {
            Some(Role::Head) => ("head", String::new()),
            Some(Role::Worker) => ("worker", String::new()),
            Some(Role::Group(group)) => ("worker", group.clone()),
            None => ("", String::new()),
        };
        Owner {
            namespace: meta.namespace.clone(),
            raycluster: meta.cluster.clone().unwrap_or_default(),
            role: role.to_owned(),
            group,
        }
    }

    fn of_labels(labels: &DropLabels) -> Self {
        Owner {
            namespace: labels.pod_namespace.clone(),
            raycluster: labels.raycluster.clone(),
            role: labels.role.clone(),
            group: labels.group.clone(),
        }
    }

    fn labels(&self, key: &CounterKey) -> DropLabels {
        DropLabels {
            direction: match Direction::from_u8(key.direction) {
                Some(Direction::Ingress) => "ingress",
                Some(Direction::Egress) => "egress",
                None => "unknown",
            }
            .to_owned(),
            reason: Reason::from_u8(key.reason)
                .map(Reason::as_str)
                .unwrap_or("unknown")
                .to_owned(),
            pod_namespace: self.namespace.clone(),
            raycluster: self.raycluster.clone(),
            role: self.role.clone(),
            group: self.group.clone(),
        }
    }
}

/// What one publication adds to one series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Increment {
    pub series: CounterSeries,
    pub labels: DropLabels,
    pub packets: u64,
    pub bytes: u64,
}

/// The increments from `seen` to `current`, and `seen` replaced by `current`.
///
/// A row that went down (the datapath forgot it and it was counted again since)
/// contributes its whole value. Rows of endpoints `owner` does not know are
/// recorded but not published: they have no labels, and publishing them once
/// their pod is known again would count them twice.
pub(super) fn deltas(
    seen: &mut BTreeMap<CounterKey, CounterValue>,
    current: &BTreeMap<CounterKey, CounterValue>,
    owner: impl Fn(u32) -> Option<Owner>,
) -> Vec<Increment> {
    let mut out = Vec::new();
    for (key, value) in current {
        let before = seen.get(key).copied().unwrap_or_default();
        let (packets, bytes) = if value.packets >= before.packets && value.bytes >= before.bytes {
            (value.packets - before.packets, value.bytes - before.bytes)
        } else {
            (value.packets, value.bytes)
        };
        if packets == 0 && bytes == 0 {
            continue;
        }
        let (Some(series), Some(owner)) = (series_of(key.verdict), owner(key.endpoint_id)) else {
            continue;
        };
        out.push(Increment {
            series,
            labels: owner.labels(key),
            packets,
            bytes,
        });
    }
    seen.clone_from(current);
    out
}

/// The published series no live endpoint owns.
pub(super) fn stale(
    published: &BTreeSet<(CounterSeries, DropLabels)>,
    live: &BTreeSet<Owner>,
) -> Vec<(CounterSeries, DropLabels)> {
    published
        .iter()
        .filter(|(_, labels)| !live.contains(&Owner::of_labels(labels)))
        .cloned()
        .collect()
}

/// The publisher's bookkeeping (owned by the runtime).
pub(super) struct CounterPublisher {
    /// Counter rows as last published.
    seen: BTreeMap<CounterKey, CounterValue>,
    /// Every label set created, so gone ones can be removed.
    published: BTreeSet<(CounterSeries, DropLabels)>,
    lost_seen: u64,
    capacities: BTreeMap<&'static str, u32>,
    /// When conntrack and fragments may be counted again; `None` while a count
    /// runs (shared with the thread that counts).
    kernel_next: Arc<Mutex<Option<Instant>>>,
}

impl Default for CounterPublisher {
    fn default() -> Self {
        Self {
            seen: BTreeMap::new(),
            published: BTreeSet::new(),
            lost_seen: 0,
            capacities: BTreeMap::new(),
            // Due at once.
            kernel_next: Arc::new(Mutex::new(Some(Instant::now()))),
        }
    }
}

impl CounterPublisher {
    /// One publication. `endpoints`: the engine's local endpoints (their names).
    pub fn publish(
        &mut self,
        datapath: &Datapath,
        endpoints: impl Iterator<Item = EndpointMeta>,
        metrics: &Metrics,
    ) {
        let owners: BTreeMap<u32, Owner> = endpoints.map(|m| (m.id, Owner::of(&m))).collect();
        match datapath.counters() {
            Ok(counters) => {
                for inc in deltas(&mut self.seen, &counters, |id| owners.get(&id).cloned()) {
                    metrics.datapath_counted(inc.series, &inc.labels, inc.packets, inc.bytes);
                    self.published.insert((inc.series, inc.labels));
                }
                metrics.map_counted("counters", counters.len() as u64);
            }
            Err(error) => {
                metrics.failed(Stage::Counters);
                tracing::warn!(%error, "reading the datapath counters");
            }
        }
        let live: BTreeSet<Owner> = owners.into_values().collect();
        for (series, labels) in stale(&self.published, &live) {
            metrics.datapath_series_gone(series, &labels);
            tracing::debug!(?series, ?labels, "series of a gone endpoint removed");
            self.published.remove(&(series, labels));
        }
        self.publish_lost(datapath, metrics);
        self.publish_fill(datapath, metrics);
    }

    fn publish_lost(&mut self, datapath: &Datapath, metrics: &Metrics) {
        match datapath.lost_events() {
            Ok(lost) => {
                let delta = if lost >= self.lost_seen {
                    lost - self.lost_seen
                } else {
                    lost
                };
                metrics.flow_events_lost(delta);
                self.lost_seen = lost;
            }
            Err(error) => {
                metrics.failed(Stage::Counters);
                tracing::warn!(%error, "reading the lost flow events");
            }
        }
    }

    fn publish_fill(&mut self, datapath: &Datapath, metrics: &Metrics) {
        let started = Instant::now();
        let count_kernel = self.kernel_count_due(started);
        // Pinned maps are counted off the loop, through their pins.
        let mut off_loop: Vec<(&'static str, &'static str)> = Vec::new();
        for (label, map) in FILL_MAPS {
            if !self.capacities.contains_key(map) {
                match datapath.map_capacity(map) {
                    Ok(capacity) => {
                        self.capacities.insert(map, capacity);
                        metrics.map_capacity_read(label, capacity);
                    }
                    Err(error) => {
                        metrics.failed(Stage::Counters);
                        tracing::warn!(%error, map, "reading a map's capacity");
                    }
                }
            }
            if map == map_names::COUNTERS {
                continue; // set from the counters read above
            }
            let entries = match datapath.mirror_entries(map) {
                Some(n) => n,
                None if count_kernel && datapath.pin_dir().is_some() => {
                    off_loop.push((label, map));
                    continue;
                }
                None if count_kernel => match datapath.count_entries(map) {
                    Ok(n) => n,
                    Err(error) => {
                        metrics.failed(Stage::Counters);
                        tracing::warn!(%error, map, "counting a map's entries");
                        continue;
                    }
                },
                None => continue,
            };
            metrics.map_counted(label, entries);
        }
        match datapath.pin_dir() {
            Some(dir) if count_kernel => {
                self.count_off_loop(dir.to_owned(), off_loop, metrics);
            }
            _ if count_kernel => kernel_counted(&self.kernel_next, started),
            _ => {}
        }
    }

    /// Whether conntrack and fragments may be counted now (none is running, and
    /// the pause after the last one is over); marks a count as running.
    fn kernel_count_due(&self, now: Instant) -> bool {
        let Ok(mut next) = self.kernel_next.lock() else {
            return false;
        };
        match *next {
            Some(at) if now >= at => {
                *next = None;
                true
            }
            _ => false,
        }
    }

    /// Counts `maps` through their pins on a blocking thread and sets their gauges.
    fn count_off_loop(
        &self,
        dir: PathBuf,
        maps: Vec<(&'static str, &'static str)>,
        metrics: &Metrics,
    ) {
        let metrics = metrics.clone();
        let next = self.kernel_next.clone();
        let count = move || {
            let started = Instant::now();
            for (label, map) in maps {
                match count_pinned(&dir, map) {
                    Ok(n) => metrics.map_counted(label, n),
                    Err(error) => {
                        metrics.failed(Stage::Counters);
                        tracing::warn!(%error, map, "counting a map's entries");
                    }
                }
            }
            kernel_counted(&next, started);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(count)),
            Err(_) => count(),
        }
    }
}

/// A count of conntrack and fragments finished: the next one waits
/// [`KERNEL_COUNT_SPACING`] times as long as this one took.
fn kernel_counted(next: &Mutex<Option<Instant>>, started: Instant) {
    let took = started.elapsed();
    if let Ok(mut next) = next.lock() {
        *next = Some(Instant::now() + took * KERNEL_COUNT_SPACING);
    }
    tracing::debug!(took_ms = took.as_secs_f64() * 1e3, "map fill counted");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(endpoint: u32, verdict: Verdict, reason: Reason) -> CounterKey {
        CounterKey {
            endpoint_id: endpoint,
            direction: Direction::Ingress as u8,
            verdict: verdict as u8,
            reason: reason as u8,
            _pad: 0,
        }
    }

    fn value(packets: u64, bytes: u64) -> CounterValue {
        CounterValue { packets, bytes }
    }

    fn owner(ns: &str, rc: &str, role: &str, group: &str) -> Owner {
        Owner {
            namespace: ns.to_owned(),
            raycluster: rc.to_owned(),
            role: role.to_owned(),
            group: group.to_owned(),
        }
    }

    fn head(id: u32) -> Option<Owner> {
        (id == 7).then(|| owner("ray", "rc", "head", ""))
    }

    #[test]
    fn first_publication_carries_the_full_pinned_values() {
        let mut seen = BTreeMap::new();
        let current = BTreeMap::from([(key(7, Verdict::Drop, Reason::NoPolicy), value(5, 420))]);
        let out = deltas(&mut seen, &current, head);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].packets, out[0].bytes), (5, 420));
        assert_eq!(out[0].series, CounterSeries::Drop);
        assert_eq!(out[0].labels.reason, "no-policy");
        assert_eq!(out[0].labels.role, "head");
        assert_eq!(out[0].labels.direction, "ingress");
    }

    #[test]
    fn later_publications_add_only_what_is_new_and_nothing_when_unchanged() {
        let k = key(7, Verdict::Drop, Reason::NoPolicy);
        let mut seen = BTreeMap::from([(k, value(5, 420))]);
        let out = deltas(&mut seen, &BTreeMap::from([(k, value(8, 672))]), head);
        assert_eq!((out[0].packets, out[0].bytes), (3, 252));
        let out = deltas(&mut seen, &BTreeMap::from([(k, value(8, 672))]), head);
        assert!(out.is_empty());
    }

    #[test]
    fn a_row_counted_again_after_being_forgotten_adds_its_whole_value() {
        let k = key(7, Verdict::Drop, Reason::NoPolicy);
        let mut seen = BTreeMap::from([(k, value(9, 900))]);
        let out = deltas(&mut seen, &BTreeMap::from([(k, value(2, 200))]), head);
        assert_eq!((out[0].packets, out[0].bytes), (2, 200));
    }

    #[test]
    fn verdicts_feed_their_own_series() {
        let mut seen = BTreeMap::new();
        let current = BTreeMap::from([
            (key(7, Verdict::Audit, Reason::NoPolicy), value(1, 84)),
            (key(7, Verdict::Allow, Reason::PolicyAllow), value(2, 120)),
        ]);
        let series: Vec<CounterSeries> = deltas(&mut seen, &current, head)
            .into_iter()
            .map(|i| i.series)
            .collect();
        // Rows in key order: Allow (0) before Audit (2).
        assert_eq!(
            series,
            [CounterSeries::AllowedFlow, CounterSeries::WouldDrop]
        );
    }

    #[test]
    fn rows_of_unknown_endpoints_are_not_published_and_never_later_twice() {
        let k = key(9, Verdict::Drop, Reason::NoPolicy);
        let mut seen = BTreeMap::new();
        assert!(deltas(&mut seen, &BTreeMap::from([(k, value(4, 400))]), head).is_empty());
        // The endpoint becomes known: only what is new since is published.
        let known = |id| (id == 9).then(|| owner("ray", "rc", "worker", "small"));
        let out = deltas(&mut seen, &BTreeMap::from([(k, value(5, 500))]), known);
        assert_eq!((out[0].packets, out[0].bytes), (1, 100));
        assert_eq!(out[0].labels.group, "small");
    }

    #[test]
    fn bookkeeping_keeps_only_the_rows_the_map_holds() {
        let gone = key(7, Verdict::Drop, Reason::NoPolicy);
        let kept = key(8, Verdict::Drop, Reason::NoPolicy);
        let mut seen = BTreeMap::from([(gone, value(1, 1)), (kept, value(1, 1))]);
        deltas(&mut seen, &BTreeMap::from([(kept, value(1, 1))]), head);
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), [kept]);
    }

    #[test]
    fn series_no_live_endpoint_owns_are_stale() {
        let labels = |rc: &str, group: &str| DropLabels {
            direction: "ingress".into(),
            reason: "no-policy".into(),
            pod_namespace: "ray".into(),
            raycluster: rc.into(),
            role: "worker".into(),
            group: group.into(),
        };
        let published = BTreeSet::from([
            (CounterSeries::Drop, labels("rc", "small")),
            (CounterSeries::AllowedFlow, labels("rc", "old-name")),
            (CounterSeries::Drop, labels("gone", "small")),
        ]);
        let live = BTreeSet::from([owner("ray", "rc", "worker", "small")]);
        let stale = stale(&published, &live);
        assert_eq!(
            stale,
            [
                (CounterSeries::Drop, labels("gone", "small")),
                (CounterSeries::AllowedFlow, labels("rc", "old-name")),
            ]
        );
    }
}
