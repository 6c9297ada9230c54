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
//!   backend or not), so the pods of a worker group share one and rows do not grow
//!   with replicas. Every pod IP (v4 and v6) maps to it in `Tables::addresses`,
//!   except a hostNetwork pod's (below).
//! - CIDR identity: one per distinct prefix that appears as an ipBlock `cidr` or
//!   `except` in any local policy. A policy gets rows for a prefix when one of its
//!   blocks covers the prefix (inside `cidr`, not inside an `except`); since every
//!   `except` is itself a prefix, the longest match names exactly the blocks an
//!   address is in. A prefix keeps its identity while it exists, so a new ipBlock
//!   adds rows and never renumbers existing entries (no revocation churn).
//! - Service identity: one per Service and address family of its ClusterIPs (a
//!   dual-stack Service has two), on those ClusterIPs, both as an exact address and
//!   as a host prefix (so no ipBlock can match a ClusterIP: docs/semantics.md "Where
//!   the decision is made" decides ClusterIPs after DNAT). A policy gets a row
//!   (Egress, service identity, protocol, service port) iff every backend of that
//!   family in the Service's EndpointSlices (endpoints not marked unready, targetPort
//!   as the slice resolves it) is allowed on the target port by the same policy's
//!   rows: kube-proxy DNATs a ClusterIP only to endpoints of its own family.
//!   Backends that disagree deny (fail closed); a port without backends of the
//!   family allows nothing.
//! - Node-port identity: one per Service of type NodePort or LoadBalancer with a
//!   `nodePort`, apart from its Service identities (a rule for one never allows the
//!   other). `Tables::node_ports` maps each (protocol, `nodePort`) to it, whatever the
//!   family of the node address; so a policy gets a row (Egress, node-port identity,
//!   protocol, `nodePort`) iff every backend of that service port, of both families,
//!   is allowed on its target port.
//! - Host-port identity: one per pod of this node (not hostNetwork) with `hostPort`s,
//!   which the CNI portmap plugin DNATs to it; `Tables::node_ports` maps each
//!   (protocol, `hostPort`) to it, and a policy gets a row iff egress to the pod
//!   (each of its addresses) on the `containerPort` is allowed. Other nodes' pods'
//!   host ports are those nodes' business.
//! - A port two objects claim (two Services, or a `nodePort` and a `hostPort`) maps
//!   to a conflict identity of its own that never gets rows, and each claim is a
//!   Warning naming the other and the field.
//! - Node: `Settings::node_addresses` map to `identity::HOST`: egress to them on a
//!   port not in `Tables::node_ports` is the node (docs/semantics.md "What counts as the node").
//! - hostNetwork pods are not the node: each gets a pod identity like any pod
//!   (selectable, with rows), but is never an endpoint and its addresses (its
//!   node's) never enter `Tables::addresses`. The datapath finds the ones on this
//!   node by their cgroups ([`Engine::host_network_pods`] for `RF_NODECG`); one on
//!   another node is matched only by an ipBlock on that node's address, since
//!   nothing tells it apart from the rest of its node.
//! - Policy ids are hash-consed: local pods whose rule lists, isolation and (only if
//!   an ingress rule names a port) named ports are equal share one id. Endpoint ids
//!   are allocated per pod UID and kept until the pod goes; every id is derived
//!   from content with a stable hash (endpoint: pod UID; pod identity: its key;
//!   CIDR: the prefix; Service and node-port identity: namespace/name; host-port
//!   identity: the pod's namespace/name; conflict identity: the port; policy: its
//!   spec; see `engine/ids.rs`), so the same cluster state gives the same tables in
//!   any event order, and a restarted or upgraded agent renumbers nothing it adopts.
//!
//! # Readings where docs/semantics.md is silent
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
//! - A `hostPort` claims its port on every node address whatever its `hostIP` (at
//!   worst stricter), and init containers' `hostPort`s count (sidecars serve).
//! - A Service backend on this node's address is the node, unless a hostNetwork pod
//!   of this node declares that port (a `containerPort`: what a hostNetwork pod binds
//!   on every node address); then each such pod must be allowed, by its identity or
//!   an ipBlock covering the address. One that binds a port it does not declare is
//!   found by the datapath for direct flows (by socket) but not here.
//! - A hostNetwork pod is never a Service-backend peer (the DNS base flow): its
//!   address is its node's, shared with everything else there.
//!
//! # Incrementality
//! Every `upsert_*`/`remove_*` marks what it touches (endpoints, identities,
//! services, prefixes) and flushes: endpoints re-derive their policy spec; changed
//! identities recompute only in the policies an index says can match them (pod label
//! pairs, namespace label pairs, namespace names, service backends, ipBlocks, and
//! the current row owners); namespace relabels only where a namespace selector flips;
//! Services only in policies that own rows for them or their backends; host-port pods
//! likewise (rows for their host-port, pod or CIDR identities); a node port's
//! claimants when its claimants change; Services with a backend on this node's
//! address in every egress-isolating policy, and again when a hostNetwork pod of
//! this node changes. Rows are kept per (policy, identity), so a change is a set
//! difference, and `take_diff` returns only keys written since the last take.
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
