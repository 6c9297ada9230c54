//! Sources of cluster objects: the Kubernetes API (`kube`) or a directory of
//! manifests (`files`), both delivering the same [`SourceEvent`] stream to the
//! runtime. A source is a task that owns a `tokio::sync::mpsc::Sender<SourceEvent>`.
//!
//! Must not: decide policy, touch the datapath, or drop state on its own: an
//! unreachable API server means "no news", never "everything is gone". Only a
//! [`SourceEvent::Resync`] (a complete listing) may imply deletions.
pub mod files;
pub mod kube;
pub mod trim;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::crd::RayCluster;
use crate::policy::engine::Kind as EngineKind;

/// The kinds a source delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    RayCluster,
    Pod,
    Namespace,
    Service,
    EndpointSlice,
    NetworkPolicy,
    /// Only this node's addresses are read (node-local traffic is always allowed).
    Node,
}

/// The manifest kind (`RayCluster`, `Pod`, ...), as logs name it.
impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::RayCluster,
        ObjectKind::Pod,
        ObjectKind::Namespace,
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::NetworkPolicy,
        ObjectKind::Node,
    ];

    /// The policy engine's kind, for all but [`ObjectKind::Node`].
    pub fn engine_kind(self) -> Option<EngineKind> {
        Some(match self {
            ObjectKind::RayCluster => EngineKind::RayCluster,
            ObjectKind::Pod => EngineKind::Pod,
            ObjectKind::Namespace => EngineKind::Namespace,
            ObjectKind::Service => EngineKind::Service,
            ObjectKind::EndpointSlice => EngineKind::EndpointSlice,
            ObjectKind::NetworkPolicy => EngineKind::NetworkPolicy,
            ObjectKind::Node => return None,
        })
    }

    /// The apiVersion the agent reads the kind in.
    pub fn api_version(self) -> &'static str {
        match self {
            ObjectKind::RayCluster => "ray.io/v1",
            ObjectKind::Pod | ObjectKind::Namespace | ObjectKind::Service | ObjectKind::Node => {
                "v1"
            }
            ObjectKind::EndpointSlice => "discovery.k8s.io/v1",
            ObjectKind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }

    /// The `kind` field of a manifest.
    pub fn from_manifest_kind(api_version: &str, kind: &str) -> Option<Self> {
        Some(match (api_version, kind) {
            ("ray.io/v1", "RayCluster") => ObjectKind::RayCluster,
            ("v1", "Pod") => ObjectKind::Pod,
            ("v1", "Namespace") => ObjectKind::Namespace,
            ("v1", "Service") => ObjectKind::Service,
            ("v1", "Node") => ObjectKind::Node,
            ("discovery.k8s.io/v1", "EndpointSlice") => ObjectKind::EndpointSlice,
            ("networking.k8s.io/v1", "NetworkPolicy") => ObjectKind::NetworkPolicy,
            _ => return None,
        })
    }
}

/// One object of a kind the agent reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    RayCluster(Box<RayCluster>),
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    NetworkPolicy(Box<NetworkPolicy>),
    Node(Box<Node>),
}

/// Namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::RayCluster(_) => ObjectKind::RayCluster,
            Object::Pod(_) => ObjectKind::Pod,
            Object::Namespace(_) => ObjectKind::Namespace,
            Object::Service(_) => ObjectKind::Service,
            Object::EndpointSlice(_) => ObjectKind::EndpointSlice,
            Object::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            Object::Node(_) => ObjectKind::Node,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = match self {
            Object::RayCluster(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        };
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What a source tells the runtime.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// An object was added or changed.
    Apply(Object),
    /// An object was deleted.
    Delete(ObjectKind, ObjectKey),
    /// A complete listing of a kind (initial list, relist after `410 Gone`, a rescan
    /// of the manifests directory): objects of that kind not in it are gone. The first
    /// `Resync` of every kind the source serves is what readiness waits for.
    Resync(ObjectKind, Vec<Object>),
    /// The source's health, for logs, metrics and readiness.
    Status(SourceStatus),
}

/// Health of a source, per kind where it matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    /// Watching normally.
    Connected,
    /// The API server (or directory) cannot be read; the last known state stays
    /// enforced while the source retries with backoff.
    Unreachable { error: String },
    /// A kind's API is not served (e.g. the RayCluster CRD is not installed yet);
    /// waited for, not fatal.
    KindMissing { kind: ObjectKind, error: String },
    /// A kind's watch ended in an error and starts over (a relist after `410 Gone`,
    /// a reconnect after a stream or connection error, a retry of a kind not
    /// served): counted, not a change of health. A watch the server closes
    /// routinely and the watcher resumes is not reported.
    WatchRestarted { kind: ObjectKind },
}

/// Where bad-input reports go besides the log: a Kubernetes Event on the object when
/// the API source is used (docs/semantics.md "Bad input").
pub trait ProblemReporter: Send + Sync {
    /// Must not block: implementations queue and send in the background, and must
    /// not report the same problem of the same object over and over.
    fn report(&self, problem: &crate::policy::Problem);
}
