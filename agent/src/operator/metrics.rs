//! The agent's Prometheus metrics: one registry, and one method per thing that
//! happened (`metrics.pod_attached(..)`, `metrics.failed(Stage::Apply)`,
//! `metrics.request_shed(..)`): callers say what happened, this module picks the
//! series and builds the labels. The server only encodes ([`Metrics::encode`]).
//!
//! Must not: take an unbounded label value (never an IP, a port, a pod name or a
//! UID); label values are kinds, hooks, states, reasons, map names, namespaces,
//! RayCluster names and worker group names, and the fixed ones are `&'static str`.
//! Series of pods that are gone are removed by their publisher
//! (`runtime::counters`, through [`Metrics::datapath_series_gone`]), so no family
//! grows without bound.
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::exposition::Format;
use super::wire::FlowVerdict;
use crate::source::ObjectKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    /// A [`Stage`].
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    /// `tc`, `cgroup`, `none`.
    hook: String,
    /// `attached`, `pending`, `not-enforced`.
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    /// `connected`, `unreachable`, `kind-missing`.
    status: String,
}

/// Labels of the datapath's counters (drops, would-drops, allowed new flows).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct DropLabels {
    /// `ingress`, `egress` (towards / away from the local pod).
    pub direction: String,
    /// A datapath reason (`no-policy`, `policy-allow`, ...).
    pub reason: String,
    /// The local pod's namespace (not `namespace`: a scrape through a PodMonitor
    /// adds that label, naming the agent's own namespace).
    pub pod_namespace: String,
    /// The pod's `ray.io/cluster`, "" for a pod of no RayCluster.
    pub raycluster: String,
    /// `head`, `worker`, or "".
    pub role: String,
    /// The worker group (`ray.io/group`) for workers, "" otherwise.
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    /// `dropped`, `audit`.
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    /// A short stable name per datapath map (`policy`, `conntrack`, ...).
    map: String,
}

/// A RayCluster held fail-closed for lack of room in a datapath map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CapacityLabels {
    /// Not `namespace`, which a PodMonitor's scrape sets to the agent's own.
    raycluster_namespace: String,
    raycluster: String,
    /// The map its entries do not fit (a [`MapLabel`] name).
    map: String,
}

/// What is running: `rayfence_build_info` is 1 with these labels (the usual
/// `*_build_info` idiom, for joins and for spotting a mixed rollout).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
    /// The node's kernel release.
    kernel: String,
    /// How programs attach on this node: `tcx`/`clsact` for veths, `cgroup_skb`.
    hook_modes: String,
}

/// Which HTTP listener: `metrics` (`--metrics-addr`), `health` (`--health-addr`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    /// `global-limit`, `per-source-limit`.
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    /// `request-body`, `reviews-busy`, `queries-busy`.
    reason: String,
}

/// Handles into the registry; a clone is cheap and feeds the same series (for a
/// thread that reports from off the loop).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Seconds from a change arriving at the runtime to the datapath holding it.
    programming_latency: Histogram,
    syncs: Family<KindLabel, Counter>,
    sync_errors: Family<StageLabel, Counter>,
    programmings: Counter,
    endpoints: Family<EndpointLabels, Gauge>,
    source_status: Family<StatusLabel, Gauge>,
    problems: Gauge,
    drops: Family<DropLabels, Counter>,
    drop_bytes: Family<DropLabels, Counter>,
    /// Packets an audit-mode endpoint would have dropped (passed, counted).
    would_drops: Family<DropLabels, Counter>,
    would_drop_bytes: Family<DropLabels, Counter>,
    /// New flows allowed (one per flow, not per packet).
    allowed_flows: Family<DropLabels, Counter>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    /// Entries each held RayCluster needs and does not get; no series when none is held.
    capacity_held: Family<CapacityLabels, Gauge>,
    /// Flow events the datapath did not deliver (over its rate limit, ring full).
    flow_events_lost: Counter,
    /// Flow events logged, by verdict (driven by the flow-event logger).
    flow_events: Family<VerdictLabel, Counter>,
    /// Flow events received but not logged (driven by the flow-event logger).
    flow_events_suppressed: Counter,
    /// The Kubernetes source restarting a kind's watch.
    watch_restarts: Family<KindLabel, Counter>,
    attach_latency: Histogram,
    /// Pods the CNI plugin holds closed that the agent has not programmed yet.
    endpoints_guarded: Gauge,
    /// How long each pod the agent took over from the CNI guard had waited.
    guard_wait: Histogram,
    /// Connections open on each HTTP listener.
    http_connections: Family<ListenerLabels, Gauge>,
    /// Connections closed as soon as accepted: a connection cap was reached.
    http_connections_refused: Family<RefusedLabels, Counter>,
    /// `accept(2)` failures (EMFILE, ENFILE, ENOMEM, ...), each followed by a pause.
    http_accept_errors: Family<ListenerLabels, Counter>,
    /// Requests answered without being served (a body, too many checks in flight).
    http_requests_shed: Family<ShedLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    /// 1 once the first full sync is programmed (what `/readyz` answers).
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let programming_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "rayfence_programming_latency_seconds",
            "From a change reaching the agent to the datapath holding it",
            programming_latency.clone(),
        );
        let attach_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "rayfence_attach_latency_seconds",
            "From a link event or pod change to the pod's hook being attached",
            attach_latency.clone(),
        );
        let syncs = Family::<KindLabel, Counter>::default();
        registry.register(
            "rayfence_syncs",
            "Complete listings (resyncs) applied, by kind",
            syncs.clone(),
        );
        let sync_errors = Family::<StageLabel, Counter>::default();
        registry.register(
            "rayfence_sync_errors",
            "Errors while programming, by stage",
            sync_errors.clone(),
        );
        let programmings = Counter::default();
        registry.register(
            "rayfence_programmings",
            "Batches of changes programmed into the datapath",
            programmings.clone(),
        );
        let endpoints = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "rayfence_endpoints",
            "Local pods by hook and state",
            endpoints.clone(),
        );
        let source_status = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "rayfence_source_status",
            "1 for the source's current status",
            source_status.clone(),
        );
        let problems = Gauge::default();
        registry.register(
            "rayfence_input_problems",
            "Problems currently found in the input objects",
            problems.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_drops",
            "Packets dropped, by direction, reason, pod namespace, RayCluster, role and worker group",
            drops.clone(),
        );
        let drop_bytes = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_drop_bytes",
            "Bytes dropped, as rayfence_drops",
            drop_bytes.clone(),
        );
        let would_drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_would_drops",
            "Packets an audit-mode endpoint would have dropped (passed), as rayfence_drops",
            would_drops.clone(),
        );
        let would_drop_bytes = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_would_drop_bytes",
            "Bytes an audit-mode endpoint would have dropped, as rayfence_drops",
            would_drop_bytes.clone(),
        );
        let allowed_flows = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_allowed_flows",
            "New flows allowed (the first packet of each), by direction, reason, pod namespace, RayCluster, role and group",
            allowed_flows.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "rayfence_map_entries",
            "Entries in each datapath map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "rayfence_map_capacity",
            "Capacity (max entries) of each datapath map",
            map_capacity.clone(),
        );
        let capacity_held = Family::<CapacityLabels, Gauge>::default();
        registry.register(
            "rayfence_raycluster_capacity_held",
            "Entries a RayCluster's policy needs in a full datapath map; its pods are held fail-closed meanwhile",
            capacity_held.clone(),
        );
        let flow_events_lost = Counter::default();
        registry.register(
            "rayfence_flow_events_lost",
            "Flow events the datapath did not deliver (over its rate limit or ring buffer full)",
            flow_events_lost.clone(),
        );
        let flow_events = Family::<VerdictLabel, Counter>::default();
        registry.register(
            "rayfence_flow_events",
            "Flow events logged, by verdict",
            flow_events.clone(),
        );
        let flow_events_suppressed = Counter::default();
        registry.register(
            "rayfence_flow_events_suppressed",
            "Flow events received but not logged (log rate limit)",
            flow_events_suppressed.clone(),
        );
        let watch_restarts = Family::<KindLabel, Counter>::default();
        registry.register(
            "rayfence_watch_restarts",
            "Kubernetes watches restarted after an error (relist after 410 Gone, reconnect), by kind",
            watch_restarts.clone(),
        );
        let endpoints_guarded = Gauge::default();
        registry.register(
            "rayfence_endpoints_guarded",
            "Pods the CNI plugin holds closed (only their node reaches them) that the agent has not programmed yet",
            endpoints_guarded.clone(),
        );
        let guard_wait = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register(
            "rayfence_guard_wait_seconds",
            "From the CNI plugin guarding a pod to the agent programming its policy",
            guard_wait.clone(),
        );
        let http_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "rayfence_http_connections",
            "Connections open on each HTTP listener",
            http_connections.clone(),
        );
        let http_connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "rayfence_http_connections_refused",
            "Connections closed as soon as accepted because a connection cap was reached, by listener and cap",
            http_connections_refused.clone(),
        );
        let http_accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "rayfence_http_accept_errors",
            "Failed accepts on each HTTP listener (out of file descriptors or memory), each followed by a pause",
            http_accept_errors.clone(),
        );
        let http_requests_shed = Family::<ShedLabels, Counter>::default();
        registry.register(
            "rayfence_http_requests_shed",
            "Requests answered without being served: a request body (none is read), or too many credential checks or loop queries in flight",
            http_requests_shed.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "rayfence_build_info",
            "1, labelled with the agent's version and commit, the node's kernel release and the hook modes in use",
            build_info.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "rayfence_ready",
            "1 once the first full sync of every kind is programmed (what /readyz answers), 0 before",
            ready.clone(),
        );
        registry.register_collector(Box::new(super::process::ProcessCollector));
        Self {
            build_info,
            ready,
            registry: Arc::new(registry),
            endpoints_guarded,
            guard_wait,
            http_connections,
            http_connections_refused,
            http_accept_errors,
            http_requests_shed,
            would_drops,
            would_drop_bytes,
            allowed_flows,
            map_entries,
            map_capacity,
            capacity_held,
            flow_events_lost,
            flow_events,
            flow_events_suppressed,
            watch_restarts,
            programming_latency,
            syncs,
            sync_errors,
            programmings,
            endpoints,
            source_status,
            problems,
            drops,
            drop_bytes,
            attach_latency,
        }
    }

    // The reconcile loop and the sources.

    /// A complete listing (resync) of `kind` was applied.
    pub fn resynced(&self, kind: ObjectKind) {
        self.syncs.get_or_create(&KindLabel::of(kind)).inc();
    }

    /// The Kubernetes source restarted its watch of `kind`.
    pub fn watch_restarted(&self, kind: ObjectKind) {
        self.watch_restarts
            .get_or_create(&KindLabel::of(kind))
            .inc();
    }

    /// The source is now `status` (one of [`SOURCE_STATUSES`]): 1 for it, 0 for
    /// the others.
    pub fn source_became(&self, status: &'static str) {
        for s in SOURCE_STATUSES {
            self.source_status
                .get_or_create(&StatusLabel {
                    status: s.to_owned(),
                })
                .set(i64::from(s == status));
        }
    }

    /// Something failed while programming, at `stage`.
    pub fn failed(&self, stage: Stage) {
        self.sync_errors
            .get_or_create(&StageLabel {
                stage: stage.as_str().to_owned(),
            })
            .inc();
    }

    /// A batch of changes was programmed, `seconds` after the first of them arrived.
    pub fn programmed(&self, seconds: f64) {
        self.programming_latency.observe(seconds);
        self.programmings.inc();
    }

    /// The input objects now have `count` problems.
    pub fn problems_found(&self, count: usize) {
        self.problems.set(count as i64);
    }

    /// RayCluster `namespace/raycluster` is held fail-closed: it needs `needed`
    /// entries in `map` (a [`crate::datapath::observe::FILL_MAPS`] label).
    pub fn raycluster_held(
        &self,
        namespace: &str,
        raycluster: &str,
        map: &'static str,
        needed: usize,
    ) {
        self.capacity_held
            .get_or_create(&CapacityLabels::of(namespace, raycluster, map))
            .set(i64::try_from(needed).unwrap_or(i64::MAX));
    }

    /// RayCluster `namespace/raycluster` is no longer held for lack of room in `map`.
    pub fn raycluster_released(&self, namespace: &str, raycluster: &str, map: &'static str) {
        self.capacity_held
            .remove(&CapacityLabels::of(namespace, raycluster, map));
    }

    // Endpoints and the CNI guard.

    /// `count` local pods are now at `hook` (`tc`, `cgroup`, `none`) in `state`
    /// (`attached`, `pending`, `not-enforced`).
    pub fn endpoints_in_state(&self, hook: &'static str, state: &'static str, count: usize) {
        self.endpoints
            .get_or_create(&EndpointLabels {
                hook: hook.to_owned(),
                state: state.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A pod's hook was attached, `seconds` after its link event or pod change.
    pub fn pod_attached(&self, seconds: f64) {
        self.attach_latency.observe(seconds);
    }

    /// The agent took over a pod the CNI guard had held for `waited_ms`.
    pub fn guard_taken_over(&self, waited_ms: u64) {
        self.guard_wait.observe(waited_ms as f64 / 1e3);
    }

    /// The CNI guard now holds `count` pods the agent has not programmed.
    pub fn pods_guarded(&self, count: usize) {
        self.endpoints_guarded
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    // The datapath's counters, maps and flow events.

    /// A datapath counter row grew by `packets` (and `bytes`) since it was last
    /// published.
    pub fn datapath_counted(
        &self,
        series: CounterSeries,
        labels: &DropLabels,
        packets: u64,
        bytes: u64,
    ) {
        match series {
            CounterSeries::Drop => {
                self.drops.get_or_create(labels).inc_by(packets);
                self.drop_bytes.get_or_create(labels).inc_by(bytes);
            }
            CounterSeries::WouldDrop => {
                self.would_drops.get_or_create(labels).inc_by(packets);
                self.would_drop_bytes.get_or_create(labels).inc_by(bytes);
            }
            CounterSeries::AllowedFlow => {
                self.allowed_flows.get_or_create(labels).inc_by(packets);
            }
        }
    }

    /// No local endpoint carries `labels` any more: its series go.
    pub fn datapath_series_gone(&self, series: CounterSeries, labels: &DropLabels) {
        match series {
            CounterSeries::Drop => {
                self.drops.remove(labels);
                self.drop_bytes.remove(labels);
            }
            CounterSeries::WouldDrop => {
                self.would_drops.remove(labels);
                self.would_drop_bytes.remove(labels);
            }
            CounterSeries::AllowedFlow => {
                self.allowed_flows.remove(labels);
            }
        }
    }

    /// The datapath's map labelled `map` holds `entries`.
    pub fn map_counted(&self, map: &'static str, entries: u64) {
        self.map_entries
            .get_or_create(&MapLabel::of(map))
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// The datapath's map labelled `map` holds at most `capacity` entries.
    pub fn map_capacity_read(&self, map: &'static str, capacity: u32) {
        self.map_capacity
            .get_or_create(&MapLabel::of(map))
            .set(i64::from(capacity));
    }

    /// The datapath did not deliver `count` more flow events.
    pub fn flow_events_lost(&self, count: u64) {
        self.flow_events_lost.inc_by(count);
    }

    /// A flow event was logged.
    pub fn flow_event_logged(&self, verdict: FlowVerdict) {
        self.flow_events
            .get_or_create(&VerdictLabel {
                verdict: verdict.as_str().to_owned(),
            })
            .inc();
    }

    /// A flow event was received and not logged (its pod's rate limit).
    pub fn flow_event_suppressed(&self) {
        self.flow_events_suppressed.inc();
    }

    // The HTTP listeners.

    /// The handles of one HTTP listener (`metrics`, `health`); its open-connections
    /// series exists from now on.
    pub fn listener(&self, listener: &'static str) -> ListenerMetrics {
        let open = self
            .http_connections
            .get_or_create(&ListenerLabels::of(listener))
            .clone();
        ListenerMetrics {
            listener,
            open,
            refused: self.http_connections_refused.clone(),
        }
    }

    /// `accept(2)` failed on `listener` for lack of a resource.
    pub fn accept_failed(&self, listener: &'static str) {
        self.http_accept_errors
            .get_or_create(&ListenerLabels::of(listener))
            .inc();
    }

    /// A request was answered without being served, for `reason`
    /// (`request-body`, `reviews-busy`, `queries-busy`).
    pub fn request_shed(&self, reason: &'static str) {
        self.http_requests_shed
            .get_or_create(&ShedLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The agent started on kernel `kernel`, attaching with `hook_modes`.
    pub fn started(&self, kernel: &str, hook_modes: &str) {
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                commit: env!("RAYFENCE_COMMIT").to_owned(),
                kernel: kernel.to_owned(),
                hook_modes: hook_modes.to_owned(),
            })
            .set(1);
    }

    /// The first full sync is programmed: the agent is ready.
    pub fn became_ready(&self) {
        self.ready.set(1);
    }

    /// Every series, in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        match format {
            Format::OpenMetrics => out,
            Format::PrometheusText => super::exposition::to_prometheus_text(&out),
        }
    }
}

/// One HTTP listener's connection series, held by its admission control.
#[derive(Clone)]
pub struct ListenerMetrics {
    listener: &'static str,
    open: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

impl ListenerMetrics {
    /// The listener now has `count` connections open.
    pub fn connections_open(&self, count: usize) {
        self.open.set(count as i64);
    }

    /// A connection was closed as soon as accepted: `reason` (`global-limit`,
    /// `per-source-limit`) was reached.
    pub fn connection_refused(&self, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels {
                listener: self.listener.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// The source's statuses (`rayfence_source_status`): one is 1, the others 0.
pub const SOURCE_STATUSES: [&str; 3] = ["connected", "unreachable", "kind-missing"];

/// Where programming failed (`rayfence_sync_errors_total{stage}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Applying the tables to the datapath.
    Apply,
    /// Finding a pod in the kernel.
    Locate,
    Attach,
    Detach,
    /// Reading the datapath's counters and map fill.
    Counters,
    /// Keeping the CNI guard's maps.
    Guard,
    /// Programming the node's hostNetwork pod cgroups.
    NodeCgroups,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apply => "apply",
            Self::Locate => "locate",
            Self::Attach => "attach",
            Self::Detach => "detach",
            Self::Counters => "counters",
            Self::Guard => "guard",
            Self::NodeCgroups => "node-cgroups",
        }
    }
}

/// Which families a datapath counter row feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CounterSeries {
    /// `rayfence_drops_total` and `rayfence_drop_bytes_total`.
    Drop,
    /// `rayfence_would_drops_total` and `rayfence_would_drop_bytes_total`.
    WouldDrop,
    /// `rayfence_allowed_flows_total` (packets only: one per new flow).
    AllowedFlow,
}

impl KindLabel {
    fn of(kind: ObjectKind) -> Self {
        Self {
            kind: format!("{kind:?}"),
        }
    }
}

impl MapLabel {
    fn of(map: &'static str) -> Self {
        Self {
            map: map.to_owned(),
        }
    }
}

impl ListenerLabels {
    fn of(listener: &'static str) -> Self {
        Self {
            listener: listener.to_owned(),
        }
    }
}

impl CapacityLabels {
    fn of(namespace: &str, raycluster: &str, map: &'static str) -> Self {
        Self {
            raycluster_namespace: namespace.to_owned(),
            raycluster: raycluster.to_owned(),
            map: map.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What callers say becomes the series and labels dashboards and tests read.
    #[test]
    fn each_event_lands_on_its_series_with_its_labels() {
        let metrics = Metrics::new();
        metrics.resynced(ObjectKind::Pod);
        metrics.failed(Stage::NodeCgroups);
        metrics.source_became("unreachable");
        metrics.endpoints_in_state("tc", "attached", 3);
        metrics.raycluster_held("ray", "rc", "policy", 7);
        metrics.flow_event_logged(FlowVerdict::Audit);
        metrics.request_shed("queries-busy");
        let labels = DropLabels {
            direction: "ingress".into(),
            reason: "no-policy".into(),
            pod_namespace: "ray".into(),
            raycluster: "rc".into(),
            role: "worker".into(),
            group: "small".into(),
        };
        metrics.datapath_counted(CounterSeries::Drop, &labels, 2, 168);
        let text = metrics.encode(Format::OpenMetrics);
        for line in [
            "rayfence_syncs_total{kind=\"Pod\"} 1",
            "rayfence_sync_errors_total{stage=\"node-cgroups\"} 1",
            "rayfence_source_status{status=\"unreachable\"} 1",
            "rayfence_source_status{status=\"connected\"} 0",
            "rayfence_endpoints{hook=\"tc\",state=\"attached\"} 3",
            "rayfence_raycluster_capacity_held{raycluster_namespace=\"ray\",raycluster=\"rc\",map=\"policy\"} 7",
            "rayfence_flow_events_total{verdict=\"audit\"} 1",
            "rayfence_http_requests_shed_total{reason=\"queries-busy\"} 1",
            "rayfence_drops_total{direction=\"ingress\",reason=\"no-policy\",pod_namespace=\"ray\",raycluster=\"rc\",role=\"worker\",group=\"small\"} 2",
            "rayfence_drop_bytes_total{direction=\"ingress\",reason=\"no-policy\",pod_namespace=\"ray\",raycluster=\"rc\",role=\"worker\",group=\"small\"} 168",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        metrics.raycluster_released("ray", "rc", "policy");
        metrics.datapath_series_gone(CounterSeries::Drop, &labels);
        let text = metrics.encode(Format::OpenMetrics);
        assert!(
            !text.contains("rayfence_raycluster_capacity_held{"),
            "{text}"
        );
        assert!(!text.contains("rayfence_drops_total{"), "{text}");
    }
}
