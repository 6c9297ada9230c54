//! The node agent's runtime: sources -> one reconcile loop -> engine -> datapath.
//!
//! Tasks: each source sends [`SourceEvent`]s into one `mpsc` channel; a link-watcher
//! thread reports new host interfaces; the reconcile loop ([`Runtime::run`]) owns the
//! [`Engine`] and the [`Datapath`]. Per turn it applies everything that arrived
//! together to the engine (a `Resync` upserts what is listed and removes what the
//! engine holds and the listing lacks), then programs: the diff first, then the
//! endpoint lifecycle ([`endpoints`]: locate on a blocking thread, attach TC or
//! cgroup, detach what is gone).
//!
//! Restart: nothing is programmed before the first full sync of every kind the
//! source serves; the first programming applies the engine's whole tables against
//! what the adopted maps hold (a diff, never a flush), and endpoints whose links
//! survived are re-registered on their existing links (no detach/attach gap).
//!
//! Capacity ([`capacity`]): when a change would not fit the CIDR or policy map, the
//! RayClusters whose entries do not fit are held fail-closed (reported as a
//! Problem, in `rayfence status` and `rayfence_raycluster_capacity_held`) and the
//! others are programmed as usual.
//!
//! Observability: between turns the loop answers operator queries (`answers`,
//! asked through [`crate::operator::query`]) and hands the datapath's flow events to
//! [`crate::operator::flows`], which names, limits and publishes them. It says what
//! happened to [`crate::operator::metrics`] and [`Health`]; it never serves them.
//!
//! Must not: parse manifests or talk to the API server (sources do), translate
//! policy (the engine does), use aya (the datapath does), or open the gate on error:
//! an apply error leaves the affected endpoints fail-closed (the datapath's doing)
//! and is logged, counted and retried as a full apply on the next turn; a silent or
//! unreachable source keeps the last state enforced.
mod answers;
pub mod capacity;
mod counters;
mod endpoints;
pub mod guards;
mod node;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use rayfence_common::map_names;
use tokio::sync::mpsc;

use crate::datapath::{AsyncEventStream, Datapath, DatapathError, DatapathOptions};
use crate::discovery::{DiscoveryError, Locator, LocatorConfig};
use crate::operator::flows;
use crate::operator::health::Health;
use crate::operator::metrics::Stage;
use crate::operator::query::Query;
use crate::policy::{Engine, Kind, Problem, Settings};
use crate::source::{Object, ObjectKey, ObjectKind, ProblemReporter, SourceEvent, SourceStatus};
use crate::tables::IdentityId;

pub use endpoints::EndpointState;

/// Everything the runtime needs, built once by the CLI.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub settings: Settings,
    /// `--node-address`: added to what the interfaces and the Node object say.
    pub extra_node_addresses: Vec<IpAddr>,
    pub datapath: DatapathOptions,
    pub locator: LocatorConfig,
    /// Kinds whose first `Resync` readiness (and the first programming) waits for.
    pub expected_kinds: BTreeSet<ObjectKind>,
    /// How often pods not found in the kernel yet are looked for again.
    pub retry_interval: Duration,
    /// How often the datapath's counters, lost events and map fill are published.
    pub counters_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("loading the datapath")]
    Datapath(#[source] DatapathError),
    #[error("setting up pod discovery")]
    Discovery(#[source] DiscoveryError),
    #[error("reading flow events from the datapath")]
    Events(#[source] std::io::Error),
}

/// What the runtime keeps of a local pod besides the engine (for the locator).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodFacts {
    uid: String,
    qos: Option<String>,
    ips: Vec<IpAddr>,
    host_network: bool,
}

impl PodFacts {
    fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(status) = status {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.clone());
            for ip in status.pod_ip.iter().cloned().chain(listed) {
                if let Ok(ip) = ip.parse::<IpAddr>()
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
        }
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            qos: status.and_then(|s| s.qos_class.clone()),
            ips,
            host_network: pod.spec.as_ref().and_then(|s| s.host_network) == Some(true),
        }
    }
}

/// The reconcile loop's state.
pub struct Runtime {
    config: RuntimeConfig,
    engine: Engine,
    datapath: Datapath,
    locator: Arc<Locator>,
    health: Arc<Health>,
    reporter: Option<Arc<dyn ProblemReporter>>,
    pods: BTreeMap<(String, String), PodFacts>,
    synced: BTreeSet<ObjectKind>,
    programmed: bool,
    needs_full_apply: bool,
    endpoints: endpoints::Endpoints,
    reported: BTreeSet<Problem>,
    node_from_api: Vec<IpAddr>,
    interface_addresses: Vec<IpAddr>,
    counters: counters::CounterPublisher,
    /// Changes received and not programmed yet, since this instant.
    dirty_since: Option<Instant>,
    /// The source's last status (`connected`, `unreachable`, `kind-missing`).
    source_status: String,
    /// Operator queries, when the API is served.
    queries: Option<mpsc::Receiver<Query>>,
    /// Flow events: the datapath's stream and what names and publishes them.
    flow_events: Option<(AsyncEventStream, flows::FlowEvents)>,
    /// Local hostNetwork pods (`namespace/name`) programmed into `RF_NODECG`: their
    /// cgroup id and identity.
    host_network_pods: BTreeMap<String, (u64, IdentityId)>,
    /// Room in the CIDR and policy maps for tables (as the kernel created them).
    capacity: capacity::Capacity,
    /// RayClusters admitted by the last programming (`None` before the first).
    admitted: Option<BTreeSet<capacity::Tenant>>,
    /// RayClusters held fail-closed for lack of room, and why.
    held: BTreeMap<capacity::Tenant, capacity::Refusal>,
    /// The CNI plugin's guards and the namespaces it guards.
    guards: guards::Guards,
}

impl Runtime {
    /// Loads the locator, then the datapath (adopting pinned maps and links).
    pub fn new(
        config: RuntimeConfig,
        health: Arc<Health>,
        reporter: Option<Arc<dyn ProblemReporter>>,
    ) -> Result<Self, RuntimeError> {
        // The locator first: a host it cannot work on (no cgroup2) is refused
        // before anything is loaded or pinned.
        let locator = Locator::new(config.locator.clone()).map_err(RuntimeError::Discovery)?;
        tracing::info!(
            cgroup_mount = %locator.cgroup2_mount().mount_point.display(),
            "pod discovery ready"
        );
        let datapath = Datapath::load(&config.datapath).map_err(RuntimeError::Datapath)?;
        let adopted = datapath.attachments().len();
        tracing::info!(
            bpffs = config
                .datapath
                .bpffs_dir
                .as_deref()
                .map(|p| tracing::field::display(p.display())),
            adopted_endpoints = adopted,
            adopted_rows = datapath.tables().policy.len(),
            node_trust = %datapath.node_trust().describe(),
            "datapath loaded"
        );
        health
            .metrics
            .started(&kernel_release(), datapath.hook_modes());
        let mut engine = Engine::new(config.settings.clone());
        // Each endpoint gets back the policy id the pinned maps show for it: the first
        // apply after a restart is a diff that renumbers nothing.
        engine.adopt_policy_ids(
            datapath
                .tables()
                .endpoints
                .iter()
                .map(|(endpoint, policy)| (*endpoint, policy.policy_id)),
        );
        let capacity = map_room(&datapath, &config.datapath.capacities);
        Ok(Self {
            capacity,
            admitted: None,
            held: BTreeMap::new(),
            guards: guards::Guards::default(),
            engine,
            datapath,
            locator: Arc::new(locator),
            health,
            reporter,
            pods: BTreeMap::new(),
            synced: BTreeSet::new(),
            programmed: false,
            needs_full_apply: true,
            endpoints: endpoints::Endpoints::default(),
            host_network_pods: BTreeMap::new(),
            reported: BTreeSet::new(),
            node_from_api: Vec::new(),
            interface_addresses: node::interface_addresses(),
            counters: counters::CounterPublisher::default(),
            dirty_since: None,
            source_status: "starting".into(),
            queries: None,
            flow_events: None,
            config,
        })
    }

    /// Answers operator queries and publishes flow events (the binary always does;
    /// a test of the loop alone may not).
    pub fn with_observability(
        mut self,
        queries: mpsc::Receiver<Query>,
        flow_events: flows::FlowEvents,
    ) -> Result<Self, RuntimeError> {
        let stream = self
            .datapath
            .take_events()
            .map_err(RuntimeError::Datapath)?
            .into_async()
            .map_err(RuntimeError::Events)?;
        self.queries = Some(queries);
        self.flow_events = Some((stream, flow_events));
        Ok(self)
    }

    /// Runs until `shutdown` resolves. Links: one message per new or changed host
    /// interface (see [`spawn_link_watcher`]).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        mut links: mpsc::UnboundedReceiver<Instant>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut retry = tokio::time::interval(self.config.retry_interval);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut counters = tokio::time::interval(self.config.counters_interval);
        counters.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_open = true;
        let mut links_open = true;
        let mut queries = self.queries.take();
        let mut flow_events = self.flow_events.take();
        tokio::pin!(shutdown);
        loop {
            self.health.turned();
            tokio::select! {
                () = &mut shutdown => break,
                event = events.recv(), if source_open => match event {
                    Some(event) => {
                        let received = Instant::now();
                        let mut changed = self.handle(event);
                        // Batch what arrived together.
                        while let Ok(event) = events.try_recv() {
                            changed |= self.handle(event);
                        }
                        // A status alone (an outage, a watch restart) changes no
                        // object: nothing to program, nothing to time.
                        if changed {
                            self.dirty_since.get_or_insert(received);
                            self.program(None).await;
                        }
                    }
                    None => {
                        tracing::warn!("every source stopped; the last state stays enforced");
                        source_open = false;
                    }
                },
                link = links.recv(), if links_open => match link {
                    Some(at) => {
                        while links.try_recv().is_ok() {}
                        if self.programmed {
                            self.sync_endpoints(Some(at), None).await;
                        }
                    }
                    None => links_open = false,
                },
                _ = retry.tick() => {
                    if self.programmed {
                        let addresses = node::interface_addresses();
                        if addresses != self.interface_addresses {
                            self.interface_addresses = addresses;
                            self.dirty_since.get_or_insert_with(Instant::now);
                        }
                        if self.dirty_since.is_some() || self.needs_full_apply {
                            self.program(None).await;
                        } else if self.endpoints.needs_attention() {
                            self.sync_endpoints(None, None).await;
                        }
                    }
                },
                // Not before the first programming: until then endpoint ids have
                // no names (see counters.rs on restarts).
                _ = counters.tick(), if self.programmed => {
                    self.counters.publish(
                        &self.datapath,
                        self.engine.endpoints(),
                        &self.health.metrics,
                    );
                    // Guards the plugin wrote since the last pass.
                    self.sync_guards();
                }
                query = next_query(&mut queries), if queries.is_some() => match query {
                    Some(query) => self.answer(query),
                    None => queries = None,
                },
                event = next_flow_event(&mut flow_events), if flow_events.is_some() => match event {
                    Ok(event) => {
                        if let Some((_, publisher)) = flow_events.as_mut() {
                            let handled = publisher.handle(&self.engine, &event);
                            self.count_flow_event(handled);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "flow events stopped");
                        flow_events = None;
                    }
                },
            }
        }
        tracing::info!("agent stopping; pinned programs and maps keep enforcing");
    }

    /// Applies one event; whether it may have changed an object.
    fn handle(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::Apply(object) => self.upsert(&object),
            SourceEvent::Delete(kind, key) => self.remove(kind, &key),
            SourceEvent::Resync(kind, objects) => self.resync(kind, &objects),
            SourceEvent::Status(status) => {
                self.status(&status);
                return false;
            }
        }
        true
    }

    fn upsert(&mut self, object: &Object) {
        match object {
            Object::RayCluster(o) => self.engine.upsert_raycluster(o),
            Object::Pod(o) => {
                let key = object.key();
                self.pods.insert((key.namespace, key.name), PodFacts::of(o));
                self.engine.upsert_pod(o);
            }
            Object::Namespace(o) => self.engine.upsert_namespace(o),
            Object::Service(o) => self.engine.upsert_service(o),
            Object::EndpointSlice(o) => self.engine.upsert_endpoint_slice(o),
            Object::NetworkPolicy(o) => self.engine.upsert_network_policy(o),
            Object::Node(o) => {
                if o.metadata.name.as_deref() == Some(self.config.settings.node_name.as_str()) {
                    self.node_from_api = node::node_object_addresses(o);
                }
            }
        }
    }

    fn remove(&mut self, kind: ObjectKind, key: &ObjectKey) {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        match kind {
            ObjectKind::RayCluster => self.engine.remove_raycluster(ns, name),
            ObjectKind::Pod => {
                self.pods.remove(&(ns.to_owned(), name.to_owned()));
                self.engine.remove_pod(ns, name);
            }
            ObjectKind::Namespace => self.engine.remove_namespace(name),
            ObjectKind::Service => self.engine.remove_service(ns, name),
            ObjectKind::EndpointSlice => self.engine.remove_endpoint_slice(ns, name),
            ObjectKind::NetworkPolicy => self.engine.remove_network_policy(ns, name),
            ObjectKind::Node => {
                if name == self.config.settings.node_name {
                    self.node_from_api.clear();
                }
            }
        }
    }

    /// A complete listing: upsert what is listed, remove what is not.
    fn resync(&mut self, kind: ObjectKind, objects: &[Object]) {
        let listed: BTreeSet<(String, String)> = objects
            .iter()
            .map(|o| {
                let key = o.key();
                (key.namespace, key.name)
            })
            .collect();
        for object in objects {
            self.upsert(object);
        }
        match kind.engine_kind() {
            Some(engine_kind) => {
                for (ns, name) in self.engine.keys(engine_kind) {
                    if !listed.contains(&(ns.clone(), name.clone())) {
                        self.remove(
                            kind,
                            &ObjectKey {
                                namespace: ns,
                                name,
                            },
                        );
                    }
                }
                if engine_kind == Kind::Pod {
                    self.pods.retain(|key, _| listed.contains(key));
                }
            }
            None => {
                let ours = self.config.settings.node_name.clone();
                if !listed.iter().any(|(_, name)| *name == ours) {
                    self.node_from_api.clear();
                }
            }
        }
        self.health.metrics.resynced(kind);
        if self.synced.insert(kind) {
            tracing::info!(kind = %kind, objects = objects.len(), "first full sync of a kind");
        }
    }

    fn status(&mut self, status: &SourceStatus) {
        let label = match status {
            SourceStatus::WatchRestarted { kind } => {
                self.health.metrics.watch_restarted(*kind);
                return;
            }
            SourceStatus::Connected => "connected",
            SourceStatus::Unreachable { error } => {
                tracing::warn!(%error, "source unreachable; the last state stays enforced");
                "unreachable"
            }
            SourceStatus::KindMissing { kind, error } => {
                tracing::warn!(kind = %kind, %error, "a kind is not served yet; waiting for it");
                "kind-missing"
            }
        };
        self.source_status = label.to_owned();
        self.health.metrics.source_became(label);
    }

    fn count_flow_event(&self, handled: flows::Handled) {
        let metrics = &self.health.metrics;
        match handled {
            flows::Handled::Published(verdict) => metrics.flow_event_logged(verdict),
            flows::Handled::Suppressed => metrics.flow_event_suppressed(),
            flows::Handled::Ignored => {}
        }
    }

    fn all_synced(&self) -> bool {
        self.config
            .expected_kinds
            .iter()
            .all(|k| self.synced.contains(k))
    }

    /// Engine -> datapath, then the endpoints.
    #[tracing::instrument(skip_all, fields(full = self.needs_full_apply))]
    async fn program(&mut self, link_at: Option<Instant>) {
        if !self.all_synced() {
            return;
        }
        let started = self.dirty_since.take().unwrap_or_else(Instant::now);
        self.update_node_addresses();
        // First programming: find the pods before applying, so endpoints adopted from
        // a previous run are re-registered right after the apply, not a locate later.
        let prelocated = if self.programmed {
            None
        } else {
            let desired = self.desired_endpoints();
            Some(
                self.endpoints
                    .locate(&desired, &self.locator, &self.health, false)
                    .await,
            )
        };
        if !self.programmed {
            // Before the first apply: policies take back the ids the pinned maps have.
            let moved = self.engine.take_pinned_policy_ids();
            tracing::debug!(moved, "policies given their pinned ids");
        }
        let result = self.apply_tables();
        let applied = match result {
            Ok(()) => {
                self.needs_full_apply = false;
                true
            }
            Err(error) => {
                self.health.metrics.failed(Stage::Apply);
                tracing::error!(%error, source = std::error::Error::source(&error).map(tracing::field::display),
                    fail_closed = %crate::logging::list(self.datapath.fail_closed()),
                    "applying the policy failed; affected endpoints stay fail-closed, retrying");
                self.needs_full_apply = true;
                false
            }
        };
        self.report_problems();
        self.sync_endpoints(link_at, prelocated).await;
        self.sync_node_cgroups();
        let elapsed = started.elapsed();
        self.health.metrics.programmed(elapsed.as_secs_f64());
        if !self.programmed && applied {
            self.programmed = true;
            self.health.set_ready();
            tracing::info!(
                latency_ms = elapsed.as_secs_f64() * 1e3,
                endpoints = self.engine.endpoints().count(),
                rows = self.datapath.tables().policy.len(),
                "first full sync programmed; ready"
            );
            release_freed_memory();
        } else {
            tracing::debug!(latency_ms = elapsed.as_secs_f64() * 1e3, "programmed");
        }
    }

    /// The engine's tables to the maps: the diff when it fits and nothing is held,
    /// else what admission lets in (a full apply against what the maps hold, never a
    /// flush).
    fn apply_tables(&mut self) -> Result<(), DatapathError> {
        if !self.needs_full_apply && self.held.is_empty() {
            let diff = self.engine.take_diff();
            if capacity::diff_fits(self.datapath.tables(), &diff, self.capacity) {
                self.admitted = Some(self.endpoint_tenants().into_values().collect());
                return if diff.is_empty() {
                    Ok(())
                } else {
                    self.datapath.apply_diff(&diff)
                };
            }
        } else {
            let _ = self.engine.take_diff();
        }
        // Twice at most: a cluster refused only for the entries the maps still held
        // (the peak of replacing them) fits once the first apply removed them.
        let mut result = Ok(());
        for _ in 0..2 {
            let before = (
                self.datapath.tables().cidrs.len(),
                self.datapath.tables().policy.len(),
            );
            result = self.admit_and_apply();
            let after = (
                self.datapath.tables().cidrs.len(),
                self.datapath.tables().policy.len(),
            );
            if result.is_err()
                || self.held.is_empty()
                || (after.0 >= before.0 && after.1 >= before.1)
            {
                break;
            }
        }
        result
    }

    fn admit_and_apply(&mut self) -> Result<(), DatapathError> {
        let tenants = self.endpoint_tenants();
        let prefixes: std::collections::HashMap<_, _> = self.engine.policy_prefixes().collect();
        let admission = capacity::admit(&capacity::Request {
            desired: self.engine.tables(),
            programmed: self.datapath.tables(),
            tenants: &tenants,
            prefixes: &prefixes,
            incumbents: self.admitted.as_ref(),
            capacity: self.capacity,
        });
        // Newly held pods go fail-closed before their rows go; released ones stay
        // held until their rows are in.
        let holding = self.datapath.held() | &admission.held_endpoints;
        self.datapath.hold(holding)?;
        let applied = match &admission.tables {
            Some(tables) => self.datapath.apply(tables),
            None => self.datapath.apply(self.engine.tables()),
        };
        if applied.is_ok() {
            self.datapath.hold(admission.held_endpoints.clone())?;
        }
        for (tenant, refusal) in &admission.held {
            if self.held.get(tenant) != Some(refusal) {
                tracing::warn!(raycluster = %format!("{}/{}", tenant.0, tenant.1),
                    map = refusal.map, needed = refusal.needed, free = refusal.free,
                    pods = admission.held_endpoints.iter().filter(|e| tenants.get(e) == Some(tenant)).count(),
                    "RayCluster does not fit the datapath's maps; its pods are held fail-closed, the other RayClusters keep their policy");
            }
        }
        for tenant in self.held.keys() {
            if !admission.held.contains_key(tenant) {
                tracing::info!(raycluster = %format!("{}/{}", tenant.0, tenant.1),
                    admitted = admission.admitted.contains(tenant),
                    "RayCluster no longer held for lack of room");
            }
        }
        self.publish_held(&admission.held);
        self.held = admission.held;
        self.admitted = Some(admission.admitted);
        applied
    }

    /// `rayfence_raycluster_capacity_held`: entries needed, per held RayCluster.
    fn publish_held(&self, held: &BTreeMap<capacity::Tenant, capacity::Refusal>) {
        let metrics = &self.health.metrics;
        for (tenant, refusal) in &self.held {
            if held.get(tenant).map(|r| r.map) != Some(refusal.map) {
                metrics.raycluster_released(&tenant.0, &tenant.1, map_label(refusal.map));
            }
        }
        for (tenant, refusal) in held {
            metrics.raycluster_held(&tenant.0, &tenant.1, map_label(refusal.map), refusal.needed);
        }
    }

    /// The RayCluster each local endpoint's policy comes from: pods with a role in
    /// a RayCluster the engine knows. Others (plain pods, NetworkPolicy-only) are
    /// no RayCluster's and always admitted.
    fn endpoint_tenants(&self) -> BTreeMap<crate::tables::EndpointId, capacity::Tenant> {
        let clusters: BTreeSet<(String, String)> =
            self.engine.keys(Kind::RayCluster).into_iter().collect();
        self.engine
            .endpoints()
            .filter_map(|meta| {
                meta.role.as_ref()?;
                let tenant = (meta.namespace, meta.cluster?);
                clusters.contains(&tenant).then_some((meta.id, tenant))
            })
            .collect()
    }

    /// Problems for the RayClusters held for lack of room (Events, log, metric).
    fn capacity_problems(&self) -> Vec<Problem> {
        self.held
            .iter()
            .map(|((namespace, name), refusal)| Problem {
                object: crate::policy::ObjectRef::new("RayCluster", namespace, name),
                field: format!("datapath map {}", refusal.map),
                value: refusal.describe(),
                message: "the RayCluster's policy does not fit the node's datapath maps: \
                          its pods are held fail-closed (only node traffic passes) until it \
                          fits; the other RayClusters keep their policy"
                    .to_owned(),
                severity: crate::policy::Severity::Warning,
            })
            .collect()
    }

    fn update_node_addresses(&mut self) {
        let mut addresses: Vec<IpAddr> = self
            .config
            .extra_node_addresses
            .iter()
            .chain(&self.interface_addresses)
            .chain(&self.node_from_api)
            .copied()
            .collect();
        addresses.sort();
        addresses.dedup();
        if addresses != self.engine.settings().node_addresses {
            tracing::info!(addresses = %crate::logging::list(&addresses), "node addresses");
            self.engine.set_node_addresses(addresses);
        }
    }

    /// Logs and hands on each problem not reported before.
    fn report_problems(&mut self) {
        let mut current: BTreeSet<Problem> = self.engine.problems().into_iter().collect();
        current.extend(self.capacity_problems());
        for problem in current.difference(&self.reported) {
            tracing::warn!(
                object = %problem.object,
                field = %problem.field,
                value = %problem.value,
                severity = ?problem.severity,
                message = %problem.message,
                "invalid input"
            );
            if let Some(reporter) = &self.reporter {
                reporter.report(problem);
            }
        }
        self.health.metrics.problems_found(current.len());
        self.reported = current;
    }

    fn desired_endpoints(&self) -> Vec<endpoints::Desired> {
        self.engine
            .endpoints()
            .filter_map(|meta| {
                let facts = self.pods.get(&(meta.namespace.clone(), meta.pod.clone()))?;
                Some(endpoints::Desired {
                    id: meta.id,
                    pod: crate::discovery::PodRef {
                        namespace: meta.namespace.clone(),
                        name: meta.pod.clone(),
                        uid: facts.uid.clone(),
                        qos_class: facts
                            .qos
                            .as_deref()
                            .and_then(crate::discovery::QosClass::from_api),
                        ips: facts.ips.clone(),
                        host_network: facts.host_network,
                    },
                })
            })
            .collect()
    }

    /// `RF_NODECG`: the kubelet's pod cgroup roots (a socket below one is some pod's,
    /// never the node's) and each local hostNetwork pod's cgroup with its identity
    /// (docs/semantics.md "What counts as the node"). A hostNetwork pod whose cgroup is not found yet stays under
    /// its root meanwhile: only its address, never the node.
    fn sync_node_cgroups(&mut self) {
        let mut located = Vec::new();
        let mut pods = BTreeMap::new();
        for ((namespace, name), identity) in self.engine.host_network_pods() {
            let Some(facts) = self.pods.get(&(namespace.clone(), name.clone())) else {
                continue;
            };
            let pod = crate::discovery::PodRef {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: facts.uid.clone(),
                qos_class: facts
                    .qos
                    .as_deref()
                    .and_then(crate::discovery::QosClass::from_api),
                ips: facts.ips.clone(),
                host_network: true,
            };
            match self.locator.locate_cgroup(&pod) {
                Ok(cgroup) => {
                    located.push(cgroup.path.clone());
                    pods.insert(format!("{namespace}/{name}"), (cgroup.id, identity));
                }
                Err(tried) => tracing::debug!(
                    pod = %format!("{namespace}/{name}"), tried = tried.len(),
                    "hostNetwork pod: cgroup not found yet"
                ),
            }
        }
        let mut desired: BTreeMap<u64, u32> = self
            .locator
            .pod_cgroup_roots(&located)
            .into_iter()
            .map(|(_, id)| (id, rayfence_common::identity::OTHER_POD))
            .collect();
        desired.extend(pods.values().map(|(cgroup, identity)| (*cgroup, *identity)));
        if &desired == self.datapath.node_cgroups() {
            self.host_network_pods = pods;
            return;
        }
        match self.datapath.set_node_cgroups(&desired) {
            Ok(()) => {
                for (pod, (cgroup, identity)) in &pods {
                    if self.host_network_pods.get(pod) != Some(&(*cgroup, *identity)) {
                        tracing::info!(pod = %pod, cgroup_id = *cgroup, identity = *identity,
                            "hostNetwork pod: its traffic is its own, not the node's");
                    }
                }
                self.host_network_pods = pods;
            }
            Err(error) => {
                self.health.metrics.failed(Stage::NodeCgroups);
                tracing::error!(%error, "programming the pod cgroups of the node failed; retrying");
            }
        }
    }

    async fn sync_endpoints(
        &mut self,
        link_at: Option<Instant>,
        prelocated: Option<endpoints::Located>,
    ) {
        let desired = self.desired_endpoints();
        let sandboxes_changed = self
            .endpoints
            .sync(
                desired,
                &mut self.engine,
                &mut self.datapath,
                &self.locator,
                &self.health,
                link_at,
                prelocated,
            )
            .await;
        self.sync_guards();
        // A sandbox went (or came back): its address's trust follows now.
        if sandboxes_changed {
            Box::pin(self.program(None)).await;
        }
    }
}

impl Runtime {
    fn sync_guards(&mut self) {
        let synced = self.all_synced();
        // The pods by reference: this runs every second, and copying 150,000 pod
        // keys each time was most of an idle agent's CPU at that size.
        self.guards.sync(
            &self.engine,
            &self.pods,
            &mut self.datapath,
            &self.health,
            synced,
        );
    }
}

/// Room for tables in the CIDR and policy maps: their capacity in the kernel (an
/// adopted pin keeps the size it was created with), the flags' when unreadable.
fn map_room(datapath: &Datapath, configured: &crate::datapath::Capacities) -> capacity::Capacity {
    let size = |map, fallback: u32| {
        let size = datapath.map_capacity(map).unwrap_or(fallback);
        usize::try_from(size).unwrap_or(usize::MAX)
    };
    capacity::Capacity {
        // The IPv4 barrier prefix the datapath inserts at load takes one entry.
        cidrs: size(map_names::CIDRS, configured.cidrs).saturating_sub(1),
        policy: size(map_names::POLICY, configured.policy),
    }
}

/// The short label of a map in the metrics (`rayfence_map_entries`).
fn map_label(map: &str) -> &'static str {
    crate::datapath::observe::FILL_MAPS
        .iter()
        .find(|(_, name)| *name == map)
        .map(|(label, _)| *label)
        .unwrap_or("other")
}

async fn next_query(queries: &mut Option<mpsc::Receiver<Query>>) -> Option<Query> {
    match queries {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_flow_event(
    flow_events: &mut Option<(AsyncEventStream, flows::FlowEvents)>,
) -> std::io::Result<rayfence_common::FlowEvent> {
    match flow_events {
        Some((stream, _)) => stream.next_event().await,
        None => std::future::pending().await,
    }
}

/// Reports new or changed links of the agent's network namespace on a thread of
/// its own (netlink multicast; re-subscribes after an overflow).
pub fn spawn_link_watcher() -> mpsc::UnboundedReceiver<Instant> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("rf-links".into())
        .spawn(move || {
            loop {
                let mut watcher = match crate::discovery::LinkWatcher::new(None) {
                    Ok(w) => w,
                    Err(error) => {
                        tracing::warn!(%error, "subscribing to link events; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                loop {
                    match watcher.next_event(Duration::from_secs(1)) {
                        Ok(None) => {}
                        // Removals too: a pod's veth going is its sandbox going.
                        Ok(Some(_)) => {
                            if tx.send(Instant::now()).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%error, "link events overflowed; re-subscribing");
                            break;
                        }
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no link watcher; new pods are found by the retry timer only");
    }
    rx
}

/// Hands the heap freed after the first full sync (parsed listings, the first
/// compile's scratch) back to the kernel: glibc keeps it otherwise, and the agent's
/// resident size would stay at its start-up peak for its whole life.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The running kernel's release (`uname -r`), "unknown" if it cannot be read.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
