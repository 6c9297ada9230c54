//! Bad input as Kubernetes Events: [`KubeEventReporter`] posts an `events.k8s.io/v1`
//! Event on the object a [`Problem`] names (a RayCluster, a NetworkPolicy, ...), so
//! `kubectl describe` shows the field and the value next to the object
//! (docs/semantics.md "Bad input"). An output: the runtime reports through the
//! [`ProblemReporter`] port the sources define; the sources only read the cluster.
//!
//! - Non-blocking: [`ProblemReporter::report`] only queues; a background task looks the
//!   object up (its uid, so the Event is attached to it, and its generation) and posts.
//! - Deduplicated: a problem is posted once per object generation. Reports of a problem
//!   already queued or posted within [`REPEAT_AFTER`] cost nothing; after that the task
//!   reads the object again and posts only if its generation (or uid) changed
//!   (an edit that leaves the problem in place is reported again, once).
//! - Bounded: a full queue drops the report and counts it ([`KubeEventReporter::stats`]);
//!   a dropped or failed report is tried again the next time it is reported.
//!
//! kube-rs's `events::Recorder` is not used: it folds every event with the same
//! reason on the same object into one series, so a second distinct problem on a
//! RayCluster would only bump a counter instead of naming its own field and value.
//!
//! Must not: block the caller, decide anything, or post the same problem of the same
//! generation twice.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use tokio::sync::mpsc;

use crate::policy::Problem;
use crate::policy::problem::{ObjectRef, Severity};
use crate::source::ProblemReporter;

/// `reportingController` of every Event the agent posts.
pub const REPORTING_CONTROLLER: &str = "rayfence.io/agent";

/// How long a reported problem is not looked at again.
pub const REPEAT_AFTER: Duration = Duration::from_secs(60);

/// Problems remembered for deduplication; beyond this the memory is reset (a
/// problem may then be posted again, once).
const REMEMBERED: usize = 10_000;

/// The API server's limit on an Event's note.
const NOTE_MAX_BYTES: usize = 1024;

/// How the reporter is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventReporterConfig {
    /// `reportingInstance`: this node's name.
    pub node_name: String,
    /// Problems waiting to be posted at most.
    pub queue_capacity: usize,
    /// How long a reported problem is not looked at again ([`REPEAT_AFTER`]).
    pub repeat_after: Duration,
}

impl EventReporterConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            queue_capacity: 256,
            repeat_after: REPEAT_AFTER,
        }
    }
}

/// Counters, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReporterStats {
    /// Events created.
    pub posted: u64,
    /// Reports dropped because the queue was full.
    pub dropped: u64,
    /// Lookups or posts the API server refused or did not answer.
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("looking up {object}")]
    Lookup {
        object: ObjectRef,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("creating the Event for {object}")]
    Create {
        object: ObjectRef,
        #[source]
        source: Box<kube::Error>,
    },
}

/// Posts Problems as Kubernetes Events; see the module docs.
#[derive(Clone)]
pub struct KubeEventReporter {
    queue: mpsc::Sender<Problem>,
    shared: Arc<Shared>,
    repeat_after: Duration,
}

struct Shared {
    /// Problems queued or handled, and when: what `report` skips.
    recent: Mutex<HashMap<Problem, Instant>>,
    posted: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn recent(&self) -> std::sync::MutexGuard<'_, HashMap<Problem, Instant>> {
        // A map of timestamps: a panic while holding it leaves nothing half-done.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, problem: &Problem) {
        self.recent().remove(problem);
    }
}

impl KubeEventReporter {
    /// Starts the background task on the current tokio runtime; it ends when every
    /// clone of the reporter is dropped.
    pub fn spawn(client: Client, config: EventReporterConfig) -> Self {
        let (queue, rx) = mpsc::channel(config.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            recent: Mutex::new(HashMap::new()),
            posted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let poster = Poster {
            client,
            node_name: config.node_name,
            shared: shared.clone(),
            posted: HashSet::new(),
        };
        tokio::spawn(poster.run(rx));
        Self {
            queue,
            shared,
            repeat_after: config.repeat_after,
        }
    }

    pub fn stats(&self) -> ReporterStats {
        ReporterStats {
            posted: self.shared.posted.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
        }
    }
}

impl ProblemReporter for KubeEventReporter {
    fn report(&self, problem: &Problem) {
        {
            let mut recent = self.shared.recent();
            let now = Instant::now();
            if recent
                .get(problem)
                .is_some_and(|at| now.duration_since(*at) < self.repeat_after)
            {
                return;
            }
            if recent.len() >= REMEMBERED {
                recent.clear();
            }
            recent.insert(problem.clone(), now);
        }
        if let Err(e) = self.queue.try_send(problem.clone()) {
            // Full (or the task is gone): count it, and let the next report retry.
            self.shared.forget(problem);
            let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(object = %problem.object, field = %problem.field, dropped, reason = %e,
                "event queue full; problem not posted as an Event");
        }
    }
}

/// The background task.
struct Poster {
    client: Client,
    node_name: String,
    shared: Arc<Shared>,
    /// (problem, uid, generation) already posted.
    posted: HashSet<(Problem, Option<String>, Option<i64>)>,
}

/// What the Event needs to know about the object it is attached to.
struct Target {
    reference: ObjectReference,
    generation: Option<i64>,
}

impl Poster {
    async fn run(mut self, mut rx: mpsc::Receiver<Problem>) {
        while let Some(problem) = rx.recv().await {
            if let Err(error) = self.handle(&problem).await {
                self.shared.forget(&problem);
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %error, source = std::error::Error::source(&error).map(tracing::field::display),
                    "could not post a Kubernetes Event; retried when reported again");
            }
        }
    }

    async fn handle(&mut self, problem: &Problem) -> Result<(), PostError> {
        let Some(target) = self.lookup(&problem.object).await? else {
            // The object is gone: nobody to tell.
            self.shared.forget(problem);
            return Ok(());
        };
        let key = (
            problem.clone(),
            target.reference.uid.clone(),
            target.generation,
        );
        if self.posted.contains(&key) {
            return Ok(());
        }
        let namespace = target
            .reference
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let event = self.event(problem, target.reference);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event)
            .await
            .map_err(|source| PostError::Create {
                object: problem.object.clone(),
                source: Box::new(source),
            })?;
        tracing::info!(object = %problem.object, field = %problem.field, value = %problem.value,
            "posted a Kubernetes Event");
        if self.posted.len() >= REMEMBERED {
            self.posted.clear();
        }
        self.posted.insert(key);
        self.shared.posted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The object's reference with uid and resourceVersion, and its generation;
    /// `None` when it no longer exists. A kind the agent does not know is referenced
    /// by name only.
    async fn lookup(&self, object: &ObjectRef) -> Result<Option<Target>, PostError> {
        let mut reference = ObjectReference {
            kind: Some(object.kind.clone()),
            namespace: Some(object.namespace.clone()).filter(|n| !n.is_empty()),
            name: Some(object.name.clone()),
            ..ObjectReference::default()
        };
        let Some((group, version, plural, namespaced)) = resource_of(&object.kind) else {
            return Ok(Some(Target {
                reference,
                generation: None,
            }));
        };
        let gvk = GroupVersionKind::gvk(group, version, &object.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        reference.api_version = Some(resource.api_version.clone());
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(self.client.clone(), &object.namespace, &resource)
        } else {
            Api::all_with(self.client.clone(), &resource)
        };
        let found = api
            .get_opt(&object.name)
            .await
            .map_err(|source| PostError::Lookup {
                object: object.clone(),
                source: Box::new(source),
            })?;
        Ok(found.map(|o| {
            reference.uid = o.metadata.uid;
            reference.resource_version = o.metadata.resource_version;
            Target {
                reference,
                generation: o.metadata.generation,
            }
        }))
    }

    fn event(&self, problem: &Problem, regarding: ObjectReference) -> Event {
        let now = Timestamp::now();
        let (type_, reason) = match problem.severity {
            Severity::Warning => ("Warning", format!("Invalid{}", problem.object.kind)),
            Severity::Notice => ("Normal", "PolicyNotice".to_owned()),
        };
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", problem.object.name, now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Enforce".to_owned()),
            reason: Some(reason),
            note: Some(note(problem)),
            type_: Some(type_.to_owned()),
            regarding: Some(regarding),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.node_name.clone()),
            ..Event::default()
        }
    }
}

/// `field = value: message`, cut to the API server's limit on a char boundary.
fn note(problem: &Problem) -> String {
    let mut note = format!("{} = {}: {}", problem.field, problem.value, problem.message);
    if note.len() > NOTE_MAX_BYTES {
        let mut end = NOTE_MAX_BYTES - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}

/// Group, version, plural and scope of the kinds problems are found on.
fn resource_of(kind: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    Some(match kind {
        "RayCluster" => ("ray.io", "v1", "rayclusters", true),
        "NetworkPolicy" => ("networking.k8s.io", "v1", "networkpolicies", true),
        "Pod" => ("", "v1", "pods", true),
        "Service" => ("", "v1", "services", true),
        "EndpointSlice" => ("discovery.k8s.io", "v1", "endpointslices", true),
        "Namespace" => ("", "v1", "namespaces", false),
        "Node" => ("", "v1", "nodes", false),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let problem = Problem {
            object: ObjectRef::new("RayCluster", "ray", "c"),
            field: "spec.networkPolicy.mode".to_owned(),
            value: "é".repeat(2000),
            message: "invalid".to_owned(),
            severity: Severity::Warning,
        };
        let n = note(&problem);
        assert!(n.len() <= NOTE_MAX_BYTES);
        assert!(n.starts_with("spec.networkPolicy.mode = é"));
        assert!(n.ends_with("..."));
    }
}
