//! The agent's Prometheus metrics: one registry, typed handles for the runtime.
//!
//! Must not: take an unbounded label value (never an IP, a port, a pod name or a
//! UID); label values are kinds, hooks, states, reasons, map names, namespaces,
//! RayCluster names and worker group names. Series of pods that are gone are removed
//! by their publisher (`runtime::counters`), so no family grows without bound.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// `apply`, `locate`, `attach`, `detach`, `counters`, `manifest`.
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `tc`, `cgroup`, `none`.
    pub hook: String,
    /// `attached`, `pending`, `not-enforced`.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// `connected`, `unreachable`, `kind-missing`.
    pub status: String,
}

/// Labels of the datapath's counters (drops, would-drops, allowed new flows).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct DropLabels {
    /// `ingress`, `egress` (towards / away from the local pod).
    pub direction: String,
    /// A datapath reason (`no-policy`, `policy-allow`, ...).
    pub reason: String,
    /// The local pod's namespace.
    pub namespace: String,
    /// The pod's `ray.io/cluster`, "" for a pod of no RayCluster.
    pub raycluster: String,
    /// `head`, `worker`, or "".
    pub role: String,
    /// The worker group (`ray.io/group`) for workers, "" otherwise.
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// `dropped`, `audit`.
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    /// A short stable name per datapath map (`policy`, `conntrack`, ...).
    pub map: String,
}

/// A RayCluster held fail-closed for lack of room in a datapath map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapacityLabels {
    pub namespace: String,
    pub raycluster: String,
    /// The map its entries do not fit (a [`MapLabel`] name).
    pub map: String,
}

/// Which HTTP listener: `metrics` (`--metrics-addr`), `health` (`--health-addr`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    /// `global-limit`, `per-source-limit`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `request-body`, `reviews-busy`, `queries-busy`.
    pub reason: String,
}

/// Handles into the registry (each is a cheap `Arc` clone).
pub struct Metrics {
    pub registry: Registry,
    /// Seconds from a change arriving at the runtime to the datapath holding it.
    pub programming_latency: Histogram,
    pub syncs: Family<KindLabel, Counter>,
    pub sync_errors: Family<StageLabel, Counter>,
    pub programmings: Counter,
    pub endpoints: Family<EndpointLabels, Gauge>,
    pub source_status: Family<StatusLabel, Gauge>,
    pub problems: Gauge,
    pub drops: Family<DropLabels, Counter>,
    pub drop_bytes: Family<DropLabels, Counter>,
    /// Packets an audit-mode endpoint would have dropped (passed, counted).
    pub would_drops: Family<DropLabels, Counter>,
    pub would_drop_bytes: Family<DropLabels, Counter>,
    /// New flows allowed (one per flow, not per packet).
    pub allowed_flows: Family<DropLabels, Counter>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    /// Entries each held RayCluster needs and does not get; no series when none is held.
    pub capacity_held: Family<CapacityLabels, Gauge>,
    /// Flow events the datapath did not deliver (over its rate limit, ring full).
    pub flow_events_lost: Counter,
    /// Flow events logged, by verdict (driven by the flow-event logger).
    pub flow_events: Family<VerdictLabel, Counter>,
    /// Flow events received but not logged (driven by the flow-event logger).
    pub flow_events_suppressed: Counter,
    /// The Kubernetes source restarting a kind's watch.
    pub watch_restarts: Family<KindLabel, Counter>,
    pub attach_latency: Histogram,
    /// Pods the CNI plugin holds closed that the agent has not programmed yet.
    pub endpoints_guarded: Gauge,
    /// How long each pod the agent took over from the CNI guard had waited.
    pub guard_wait: Histogram,
    /// Connections open on each HTTP listener.
    pub http_connections: Family<ListenerLabels, Gauge>,
    /// Connections closed as soon as accepted: a connection cap was reached.
    pub http_connections_refused: Family<RefusedLabels, Counter>,
    /// `accept(2)` failures (EMFILE, ENFILE, ENOMEM, ...), each followed by a pause.
    pub http_accept_errors: Family<ListenerLabels, Counter>,
    /// Requests answered without being served (a body, too many checks in flight).
    pub http_requests_shed: Family<ShedLabels, Counter>,
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
            "Packets dropped, by direction, reason, namespace, RayCluster, role and worker group",
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
            "New flows allowed (the first packet of each), by direction, reason, namespace, RayCluster, role and group",
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
        Self {
            registry,
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

    pub fn shed(&self, reason: &str) {
        self.http_requests_shed
            .get_or_create(&ShedLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn error(&self, stage: &str) {
        self.sync_errors
            .get_or_create(&StageLabel {
                stage: stage.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
