//! Policy engine: RayClusters, pods, namespaces, services (and optionally plain
//! NetworkPolicies) in, [`crate::tables::Tables`] and their diffs out.
//!
//! Pure: no I/O, no clock, no aya, no Kubernetes client.
//!
//! Modules, one concern each:
//! - [`selector`]: label selectors.
//! - [`rule`]: the normalised allow rule and its parser from the NetworkPolicy types.
//! - [`raycluster`]: RayCluster isolation blocks to per-role rules with base flows.
//! - [`netpol`]: plain NetworkPolicies to the same rules.
//! - [`settings`]: node, operator, DNS and source settings.
//! - [`problem`]: bad-input reports.
//! - [`engine`]: the incremental engine that owns identities, policies and tables.
//!
//! # Identities and policy ids
//! - Pod identity: one per distinct (namespace, labels, named container ports, DNS
//!   backend or not), so
//!   the pods of a worker group share one and rows do not grow with replicas. Every
//!   pod IP (v4 and v6) maps to it in `Tables::addresses`.
//! - CIDR identity: one per distinct prefix that appears as an ipBlock `cidr` or
//!   `except` in any local policy. A policy gets rows for a prefix when one of its
//!   blocks covers the prefix (inside `cidr`, not inside an `except`); since every
//!   `except` is itself a prefix, the longest match names exactly the blocks an
//!   address is in. A prefix keeps its identity while it exists, so a new ipBlock
//!   adds rows and never renumbers existing entries (no revocation churn).
//! - Service identity: one per Service, on its ClusterIPs, both as an exact address
//!   and as a host prefix (so no ipBlock can match a ClusterIP: SEMANTICS 5 decides
//!   ClusterIPs after DNAT). A policy gets a row (Egress, service, protocol, service
//!   port) iff every backend in the Service's EndpointSlices (endpoints not marked
//!   unready, targetPort as the slice resolves it) is allowed on the target port by
//!   the same policy's rows. Backends that disagree deny (fail closed); a port
//!   without backends allows nothing.
//! - Node: `Settings::node_addresses` map to `identity::HOST`. Host-network pods
//!   are not endpoints and not selectable peers (they are the node).
//! - Policy ids are hash-consed: local pods whose rule lists, isolation and (only if
//!   an ingress rule names a port) named ports are equal share one id. Endpoint ids
//!   are allocated per pod UID and kept until the pod goes; every id is derived
//!   from content with a stable hash (endpoint: pod UID; pod identity: its key;
//!   CIDR: the prefix; Service: namespace/name; policy: its spec; see
//!   `engine/ids.rs`), so the same cluster state gives the same tables in any event
//!   order, and a restarted or upgraded agent renumbers nothing it adopts.
//!
//! # Readings where SEMANTICS is silent
//! - Every local pod is an endpoint; pods of no isolating policy get
//!   `isolate_* = false` (so the datapath can count them).
//! - A worker without `ray.io/group` uses `worker` rules (still isolated).
//! - A named egress port resolves on destination pods; for an explicit ipBlock peer
//!   it matches nothing (a notice is reported). A rule with no peers and a named
//!   egress port resolves on every pod. Named ingress ports resolve on the local pod
//!   whatever the peer.
//! - DNS `service` mode allows UDP/TCP 53 on exactly the pods the DNS Service's
//!   EndpointSlices list (a pod identity carries a DNS-backend bit, so a spare
//!   replica with the same labels is not a peer until it is listed) and, by the
//!   Service rule above, on its ClusterIPs. Port 53 is assumed to be the target port
//!   too, as in every kube-dns/CoreDNS deployment.
//! - A namespace without a Namespace object has only `kubernetes.io/metadata.name`.
//! - Operator namespaces default to `ray-system` and `kuberay-system`.
//! - An invalid block (not an object, unparsable annotation) is an invalid mode: the
//!   last good policy, or DenyAll with the base flows.
//! - `rayfence.io/audit: "true"` (any ASCII case) on a RayCluster sets `audit` on
//!   every endpoint its policy applies to (head and workers, whatever else isolates
//!   them); any value other than true/false is a warning and enforced, never the
//!   last good value. `Settings::audit` sets it on every endpoint. The flag is on
//!   the endpoint, not in the policy spec, so a switch changes no policy id or row.
//! - An invalid `spec.podSelector` on a NetworkPolicy selects no pod (the API server
//!   rejects such objects; only hand-fed ones can have it).
//!
//! # Incrementality
//! Every `upsert_*`/`remove_*` marks what it touches (endpoints, identities,
//! services, prefixes) and flushes: endpoints re-derive their policy spec; changed
//! identities recompute only in the policies an index says can match them (pod label
//! pairs, namespace label pairs, namespace names, service backends, ipBlocks, and
//! the current row owners); namespace relabels only where a namespace selector flips;
//! Services only in policies that own rows for them or their backends. Rows are kept
//! per (policy, identity), so a change is a set difference, and `take_diff` returns
//! only keys written since the last take.
pub mod engine;
pub mod netpol;
mod output;
pub mod problem;
pub mod raycluster;
pub mod rule;
pub mod selector;
pub mod settings;

pub use engine::{
    AddressOwner, EndpointMeta, Engine, Explanation, Kind, NamedPort, NodePortOwner, ObjectKey,
    PodFacts, Stats,
};
pub use problem::{ObjectRef, Problem, Severity};
pub use rule::{Role, RuleOrigin};
pub use settings::{DnsMode, Settings};
