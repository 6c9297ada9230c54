//! The Kubernetes API source: one kube-rs watcher per kind, cluster-wide, turned into
//! [`SourceEvent`]s for the runtime.
//!
//! Pipeline per kind: `watcher` -> `modify()` (drop the fields the engine never
//! reads, so holding every pod of a large cluster stays cheap) -> the event mapping
//! below, with the backoff applied in the loop. It follows kube-rs's
//! `default_backoff()` (0.8 s doubling, jittered, reset by any success) with two
//! changes, because for an enforcement agent every second a watcher sleeps is a
//! revocation not enforced (the multi-node test measured up to 33 s after a short
//! outage with `default_backoff()`): the delay is capped at [`MAX_BACKOFF`] rather
//! than 30 s, and sleeping watchers are woken as soon as the reachability probe
//! gets an answer; a 410 relists at once, as client-go does. There is no `reflector` store here on purpose: the
//! runtime's policy engine already holds every object, a second copy would double the
//! agent's memory, and a complete listing is delivered as one [`SourceEvent::Resync`],
//! which is the "store is ready" signal readiness waits for.
//!
//! Event mapping (kube-rs `watcher::Event` -> [`SourceEvent`]):
//! - `Init`, `InitApply`*, `InitDone` -> one `Resync(kind, every listed object)`, on
//!   the first list and on every relist (a 410 Gone, a restarted watcher). Whatever
//!   the listing lacks is gone: this is how deletions during an outage are derived;
//! - `Apply` -> `Apply`, `Delete` -> `Delete`;
//! - errors -> `Status`: a kind the server does not serve (404, e.g. the RayCluster CRD
//!   not installed yet) -> `KindMissing`, waited for with backoff while the other kinds
//!   keep working; anything else but a 410 -> `Unreachable` once, then `Connected`
//!   when the API server answers again.
//!   Every error is also a `WatchRestarted(kind)` (the watcher starts over after
//!   it): what `rayfence_watch_restarts_total` counts.
//!
//! Must not: decide policy, touch the datapath, or imply a deletion by anything but a
//! complete listing (no synthetic deletes on errors, no empty Resync for a missing
//! kind); talk to the API server for anything but these watches and the reachability
//! probe (Events are `operator::events`).
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use super::trim::{
    trim_endpointslice, trim_namespace, trim_networkpolicy, trim_node, trim_pod, trim_raycluster,
    trim_service,
};
use super::{Object, ObjectKey, ObjectKind, SourceEvent, SourceStatus};
use crate::crd::RayCluster;

/// How often the reachability probe asks `/version` while the API server is
/// unreachable, to report `Connected` as soon as it answers (a watcher that resumes
/// from its resourceVersion says nothing when it succeeds).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a watcher waits between attempts while the API server fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// What the Kubernetes source watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSourceConfig {
    /// This node's name (`--node-name`): only this Node object is watched.
    pub node_name: String,
    /// Watch NetworkPolicies too (they are only read when the agent enforces them).
    pub enforce_networkpolicies: bool,
    /// Objects per list page (the watcher's initial list and relists).
    pub page_size: u32,
}

impl KubeSourceConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            enforce_networkpolicies: false,
            page_size: 500,
        }
    }

    /// The kinds this configuration watches, in the order they are started.
    pub fn kinds(&self) -> Vec<ObjectKind> {
        ObjectKind::ALL
            .into_iter()
            .filter(|k| *k != ObjectKind::NetworkPolicy || self.enforce_networkpolicies)
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("the node name is empty (--node-name, or NODE_NAME from the downward API)")]
    EmptyNodeName,
    /// The runtime dropped its receiver: nobody listens, so the source stops.
    #[error("the runtime stopped receiving source events (while delivering {kind:?})")]
    ChannelClosed { kind: ObjectKind },
    #[error("the {what} task of the Kubernetes source failed")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Watches every configured kind until the receiver is dropped (the only way it
/// returns, as [`KubeSourceError::ChannelClosed`]) or a watcher task panics.
///
/// `tx` should be bounded: a slow runtime slows the watchers down (backpressure)
/// rather than growing a queue.
pub async fn run(
    client: Client,
    config: KubeSourceConfig,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<(), KubeSourceError> {
    if config.node_name.trim().is_empty() {
        return Err(KubeSourceError::EmptyNodeName);
    }
    let health = Arc::new(Health::new(tx.clone()));
    let mut tasks: JoinSet<Result<(), KubeSourceError>> = JoinSet::new();
    for kind in config.kinds() {
        let client = client.clone();
        let health = health.clone();
        let tx = tx.clone();
        let page_size = config.page_size;
        let node = config.node_name.clone();
        tracing::info!(%kind, node = %node, "watching");
        tasks.spawn(async move {
            let wc = watcher::Config::default().page_size(page_size);
            match kind {
                ObjectKind::RayCluster => {
                    let w = Watch::new(kind, health, tx, trim_raycluster, |o| {
                        Object::RayCluster(Box::new(o))
                    });
                    w.run(Api::<RayCluster>::all(client), wc).await
                }
                ObjectKind::Pod => {
                    let w = Watch::new(kind, health, tx, trim_pod, |o| Object::Pod(Box::new(o)));
                    w.run(Api::<Pod>::all(client), wc).await
                }
                ObjectKind::Namespace => {
                    let w = Watch::new(kind, health, tx, trim_namespace, |o| {
                        Object::Namespace(Box::new(o))
                    });
                    w.run(Api::<Namespace>::all(client), wc).await
                }
                ObjectKind::Service => {
                    let w = Watch::new(kind, health, tx, trim_service, |o| {
                        Object::Service(Box::new(o))
                    });
                    w.run(Api::<Service>::all(client), wc).await
                }
                ObjectKind::EndpointSlice => {
                    let w = Watch::new(kind, health, tx, trim_endpointslice, |o| {
                        Object::EndpointSlice(Box::new(o))
                    });
                    w.run(Api::<EndpointSlice>::all(client), wc).await
                }
                ObjectKind::NetworkPolicy => {
                    let w = Watch::new(kind, health, tx, trim_networkpolicy, |o| {
                        Object::NetworkPolicy(Box::new(o))
                    });
                    w.run(Api::<NetworkPolicy>::all(client), wc).await
                }
                ObjectKind::Node => {
                    let w = Watch::new(kind, health, tx, trim_node, |o| Object::Node(Box::new(o)));
                    let wc = wc.fields(&format!("metadata.name={node}"));
                    w.run(Api::<Node>::all(client), wc).await
                }
            }
        });
    }
    {
        let health = health.clone();
        let client = client.clone();
        tasks.spawn(async move { health.probe(client).await });
    }
    let result = match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(source)) => Err(KubeSourceError::Task {
            what: "watcher".to_owned(),
            source,
        }),
        None => Ok(()),
    };
    tasks.abort_all();
    result
}

/// One kind's watcher and its mapping to source events.
struct Watch<K> {
    kind: ObjectKind,
    health: Arc<Health>,
    tx: mpsc::Sender<SourceEvent>,
    trim: fn(&mut K),
    wrap: fn(K) -> Object,
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn new(
        kind: ObjectKind,
        health: Arc<Health>,
        tx: mpsc::Sender<SourceEvent>,
        trim: fn(&mut K),
        wrap: fn(K) -> Object,
    ) -> Self {
        Self {
            kind,
            health,
            tx,
            trim,
            wrap,
        }
    }

    async fn run(self, api: Api<K>, wc: watcher::Config) -> Result<(), KubeSourceError> {
        // The backoff is applied here rather than with `.backoff()`, so a sleeping
        // watcher can be woken when the API server is back, and a 410 relists at once.
        let mut backoff = WatchBackoff::new();
        let stream = watcher::watcher(api, wc).modify(self.trim);
        let mut stream = std::pin::pin!(stream);
        // The objects of a listing in progress; `None` outside one.
        let mut listing: Option<Vec<Object>> = None;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => {
                    backoff.reset();
                    event
                }
                Err(error) => {
                    // A failed page abandons the listing; the watcher starts over with
                    // `Init`.
                    listing = None;
                    self.health.error(self.kind, &error).await?;
                    // The watcher starts over after every error it yields (a relist
                    // after a 410, a new list or watch request otherwise).
                    self.send(SourceEvent::Status(SourceStatus::WatchRestarted {
                        kind: self.kind,
                    }))
                    .await?;
                    // 410: the watcher relists next, nothing to wait for.
                    if status_code(&error) != Some(410) {
                        let delay = backoff.next().unwrap_or(MAX_BACKOFF);
                        self.health.pause(delay).await;
                    }
                    continue;
                }
            };
            // `Init` comes before the list request is even sent: only what the
            // server answered proves the kind is served and reachable.
            if !matches!(event, Event::Init) {
                self.health.ok(self.kind).await?;
            }
            match event {
                Event::Init => listing = Some(Vec::new()),
                Event::InitApply(o) => listing.get_or_insert_with(Vec::new).push((self.wrap)(o)),
                Event::InitDone => {
                    let objects = listing.take().unwrap_or_default();
                    tracing::info!(kind = %self.kind, objects = objects.len(), "listed");
                    self.send(SourceEvent::Resync(self.kind, objects)).await?;
                }
                Event::Apply(o) => self.send(SourceEvent::Apply((self.wrap)(o))).await?,
                Event::Delete(o) => {
                    let key = ObjectKey {
                        namespace: o.namespace().unwrap_or_default(),
                        name: o.name_any(),
                    };
                    self.send(SourceEvent::Delete(self.kind, key)).await?;
                }
            }
        }
        // A watcher stream never ends on its own; treat it like a closed channel of
        // this kind so the caller notices.
        Err(KubeSourceError::ChannelClosed { kind: self.kind })
    }

    async fn send(&self, event: SourceEvent) -> Result<(), KubeSourceError> {
        self.tx
            .send(event)
            .await
            .map_err(|_| KubeSourceError::ChannelClosed { kind: self.kind })
    }
}

/// What the source last said about its health, shared by the kinds' watchers.
struct Health {
    tx: mpsc::Sender<SourceEvent>,
    state: Mutex<HealthState>,
    /// Wakes the reachability probe when a kind starts failing.
    failing: Notify,
    /// Wakes the watchers sleeping in their backoff when the API server answers
    /// again.
    reachable: Notify,
}

#[derive(Default)]
struct HealthState {
    /// Kinds whose last attempt failed for a reason other than 404 or 410.
    failing: BTreeSet<ObjectKind>,
    /// Kinds the server answered 404 for.
    missing: BTreeSet<ObjectKind>,
    /// Whether `Unreachable` is the last global status sent (`None`: nothing yet).
    unreachable: Option<bool>,
}

impl Health {
    fn new(tx: mpsc::Sender<SourceEvent>) -> Self {
        Self {
            tx,
            state: Mutex::new(HealthState::default()),
            failing: Notify::new(),
            reachable: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // The state is a few sets; a panic while holding it leaves nothing half-done
        // that matters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kind delivered an event: it is served and reachable.
    async fn ok(&self, kind: ObjectKind) -> Result<(), KubeSourceError> {
        let status = {
            let mut s = self.lock();
            let was_missing = s.missing.remove(&kind);
            s.failing.remove(&kind);
            if s.failing.is_empty() && (was_missing || s.unreachable != Some(false)) {
                s.unreachable = Some(false);
                Some(SourceStatus::Connected)
            } else {
                None
            }
        };
        if let Some(status) = status {
            tracing::info!(%kind, "connected to the API server");
            self.send(kind, status).await?;
        }
        Ok(())
    }

    /// A kind's watcher failed (it retries by itself, with backoff).
    async fn error(&self, kind: ObjectKind, error: &watcher::Error) -> Result<(), KubeSourceError> {
        let status = match status_code(error) {
            // 410 Gone: the history moved on; the watcher relists, and the listing
            // is delivered as a Resync. Routine, not an outage.
            Some(410) => {
                tracing::debug!(%kind, %error, "watch expired, relisting");
                None
            }
            Some(404) => {
                let mut s = self.lock();
                if s.missing.insert(kind) {
                    tracing::warn!(%kind, %error, "kind not served by the API server; waiting for it");
                    Some(SourceStatus::KindMissing {
                        kind,
                        error: error.to_string(),
                    })
                } else {
                    None
                }
            }
            _ => {
                let mut s = self.lock();
                s.failing.insert(kind);
                self.failing.notify_one();
                if s.unreachable != Some(true) {
                    s.unreachable = Some(true);
                    tracing::warn!(%kind, %error, "API server unreachable; enforcing the last known state");
                    Some(SourceStatus::Unreachable {
                        error: error.to_string(),
                    })
                } else {
                    tracing::debug!(%kind, %error, "still unreachable");
                    None
                }
            }
        };
        if let Some(status) = status {
            self.send(kind, status).await?;
        }
        Ok(())
    }

    /// While some kind fails, asks `/version` every [`PROBE_INTERVAL`] and reports
    /// `Connected` once it answers. Runs until the channel closes.
    async fn probe(&self, client: Client) -> Result<(), KubeSourceError> {
        loop {
            self.failing.notified().await;
            while !self.lock().failing.is_empty() {
                tokio::time::sleep(PROBE_INTERVAL).await;
                if client.apiserver_version().await.is_err() {
                    continue;
                }
                // Each agent's probe runs on its own phase, so a DaemonSet's watchers
                // do not all come back in the same instant.
                self.reachable.notify_waiters();
                let status = {
                    let mut s = self.lock();
                    s.failing.clear();
                    (s.unreachable == Some(true)).then(|| {
                        s.unreachable = Some(false);
                        SourceStatus::Connected
                    })
                };
                if let Some(status) = status {
                    tracing::info!("API server reachable again");
                    self.send(ObjectKind::Node, status).await?;
                }
            }
        }
    }

    /// A watcher's backoff: `delay`, or less if the API server answers again.
    async fn pause(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.reachable.notified() => {}
        }
    }

    async fn send(&self, kind: ObjectKind, status: SourceStatus) -> Result<(), KubeSourceError> {
        self.tx
            .send(SourceEvent::Status(status))
            .await
            .map_err(|_| KubeSourceError::ChannelClosed { kind })
    }
}

/// Exponential from 0.8 s, doubling, capped at [`MAX_BACKOFF`], with "equal jitter"
/// (half the delay fixed, half random) so a DaemonSet's agents do not retry in step.
struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(800);

    fn new() -> Self {
        // Different per process and per watcher; quality does not matter here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = &nanos as *const u64 as u64;
        Self {
            next: Self::FIRST,
            seed: nanos ^ local.rotate_left(32) | 1,
        }
    }

    /// xorshift64: a fraction in [0, 1).
    fn fraction(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next.min(MAX_BACKOFF);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(base / 2 + base.mul_f64(self.fraction() / 2.0))
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The HTTP or Status code behind a watcher error, when there is one.
fn status_code(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::trim::LAST_APPLIED;
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_keep_what_the_engine_and_discovery_read() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ray", "uid": "u1",
                "labels": {"ray.io/cluster": "c"},
                "annotations": {"big": "x"},
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                "containers": [{"name": "ray", "image": "img", "env": [{"name": "A", "value": "b"}],
                    "ports": [{"name": "dash", "containerPort": 8265}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                "qosClass": "Burstable", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        trim_pod(&mut pod);
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["metadata"]["uid"], "u1");
        assert_eq!(v["metadata"]["labels"]["ray.io/cluster"], "c");
        assert!(v["metadata"].get("annotations").is_none());
        assert!(v["metadata"].get("managedFields").is_none());
        assert_eq!(v["spec"]["nodeName"], "n1");
        assert_eq!(
            v["spec"]["containers"][0]["ports"][0]["containerPort"],
            8265
        );
        assert!(v["spec"]["containers"][0].get("env").is_none());
        assert!(v["spec"].get("volumes").is_none());
        assert_eq!(v["status"]["podIP"], "10.0.0.1");
        assert_eq!(v["status"]["qosClass"], "Burstable");
        assert!(v["status"].get("conditions").is_none());
    }

    #[test]
    fn rayclusters_keep_the_policy_annotation_and_start_params_only() {
        let mut rc: RayCluster = serde_json::from_value(json!({
            "metadata": {"name": "c", "annotations": {
                "rayfence.io/network-policy": "mode: DenyAll",
                LAST_APPLIED: "{...}"}},
            "spec": {"headGroupSpec": {"rayStartParams": {"dashboard-port": "9000"},
                "template": {"spec": {"containers": []}}}},
        }))
        .unwrap();
        trim_raycluster(&mut rc);
        let annotations = rc.metadata.annotations.unwrap();
        assert!(annotations.contains_key("rayfence.io/network-policy"));
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(
            rc.spec.head_group_spec,
            Some(json!({"rayStartParams": {"dashboard-port": "9000"}}))
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = WatchBackoff::new();
        let delays: Vec<Duration> = (&mut b).take(12).collect();
        assert!(delays[0] >= Duration::from_millis(400) && delays[0] <= Duration::from_millis(800));
        assert!(delays[1] >= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= MAX_BACKOFF));
        assert!(delays[11] >= MAX_BACKOFF / 2);
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(800));
    }

    #[test]
    fn network_policies_are_watched_only_when_enforced() {
        let mut config = KubeSourceConfig::new("n1");
        assert!(!config.kinds().contains(&ObjectKind::NetworkPolicy));
        config.enforce_networkpolicies = true;
        assert_eq!(config.kinds(), ObjectKind::ALL.to_vec());
    }
}
