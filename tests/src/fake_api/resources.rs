//! Which resources the fake API server serves: (group, version, plural) with the kind
//! and scope, and whether the resource is installed (a CRD that is not installed
//! answers 404 on every path, as a real server without the CRD does).
//!
//! No I/O and no objects here; the store holds those.

/// A resource as it appears in URLs: `/api/{version}/{plural}` for the core group
/// (empty `group`), `/apis/{group}/{version}/{plural}` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub group: String,
    pub version: String,
    pub plural: String,
}

impl ResourceKey {
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
        }
    }

    /// `v1` for the core group, `group/version` otherwise, as in `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.plural, self.api_version())
    }
}

#[derive(Debug, Clone)]
pub struct ResourceInfo {
    pub key: ResourceKey,
    pub kind: String,
    pub namespaced: bool,
    /// False for a CRD that has not been installed yet: its paths answer 404.
    pub installed: bool,
}

/// What the fake serves from the start; `ray.io/v1 rayclusters` is known but not
/// installed until `FakeApiServer::install_crd`.
pub fn builtin() -> Vec<ResourceInfo> {
    let r = |group: &str, version: &str, plural: &str, kind: &str, namespaced: bool| ResourceInfo {
        key: ResourceKey::new(group, version, plural),
        kind: kind.to_owned(),
        namespaced,
        installed: true,
    };
    vec![
        r("", "v1", "pods", "Pod", true),
        r("", "v1", "namespaces", "Namespace", false),
        r("", "v1", "services", "Service", true),
        r("", "v1", "endpoints", "Endpoints", true),
        r("", "v1", "nodes", "Node", false),
        r("", "v1", "events", "Event", true),
        r("", "v1", "configmaps", "ConfigMap", true),
        r(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        r(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
        ),
        r("events.k8s.io", "v1", "events", "Event", true),
        r("coordination.k8s.io", "v1", "leases", "Lease", true),
        r(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        ),
        ResourceInfo {
            installed: false,
            ..r("ray.io", "v1", "rayclusters", "RayCluster", true)
        },
    ]
}

/// The kind a CRD gets when `install_crd` is given a plural the fake does not know:
/// `widgets` -> `Widget`, `policies` -> `Policy`.
pub fn kind_from_plural(plural: &str) -> String {
    let singular = if let Some(stem) = plural.strip_suffix("ies") {
        format!("{stem}y")
    } else if let Some(stem) = plural.strip_suffix('s') {
        stem.to_owned()
    } else {
        plural.to_owned()
    };
    let mut chars = singular.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
