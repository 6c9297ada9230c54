//! The agent's Prometheus metrics: one registry, typed handles for the runtime.
//!
//! Must not: take an unbounded label value (never an IP, a port, a pod name or a
//! UID); label values are kinds, hooks, states, reasons, namespaces and RayCluster
//! names.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub direction: String,
    pub reason: String,
    pub namespace: String,
    pub raycluster: String,
    pub role: String,
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
    pub attach_latency: Histogram,
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
            "Packets dropped (new flows), by direction, reason, namespace, RayCluster and role",
            drops.clone(),
        );
        let drop_bytes = Family::<DropLabels, Counter>::default();
        registry.register(
            "rayfence_drop_bytes",
            "Bytes dropped, as rayfence_drops",
            drop_bytes.clone(),
        );
        Self {
            registry,
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
