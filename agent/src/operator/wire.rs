//! The operator API's wire types: what `/v1/status`, `/v1/explain` and `/v1/flows`
//! answer, and what the `rayfence status|explain|flows` commands read. JSON, stable
//! field names; a field is only ever added.
//!
//! The first step of a query's story: these are asked and answered over
//! [`super::query`], filled in by the reconcile loop (`runtime::answers`) and by
//! [`super::explain`], encoded by the server (`serve`) and printed by the commands
//! (`cli::render`).
//!
//! Must not: do I/O or know how an answer is computed (the runtime and the policy
//! engine do that); everything here is plain data.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What happened to a denied flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    /// Dropped.
    Dropped,
    /// Would have been dropped; passed because the pod is in audit mode.
    Audit,
}

impl FlowVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "dropped",
            Self::Audit => "audit",
        }
    }
}

/// One end of a flow, with whatever the agent knows of the address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: IpAddr,
    /// 0 for ICMP.
    pub port: u16,
    /// `pod`, `node`, `service`, `cidr` (an ipBlock the policy names) or `world`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod or Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raycluster: Option<String>,
    /// The ipBlock prefix the address falls in, for `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
}

/// A denied (or audited) flow, as logged and as streamed by `/v1/flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub verdict: FlowVerdict,
    /// `ingress` (to the local pod) or `egress` (from it).
    pub direction: String,
    /// The datapath's reason (`no-policy`, `revoked`, `fail-closed`, ...).
    pub reason: String,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub protocol: String,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    /// The local pod the decision was made for.
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raycluster: Option<String>,
    /// `head`, `worker` or `worker/<group>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Length of the packet that was seen.
    pub bytes: u32,
    /// Events of this pod left out by the per-pod rate limit since its previous
    /// event (they are still counted in the metrics).
    pub suppressed: u64,
}

/// Which flows `/v1/flows` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raycluster: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, record: &FlowRecord) -> bool {
        self.verdict.is_none_or(|v| v == record.verdict)
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == record.namespace)
            && self
                .raycluster
                .as_deref()
                .is_none_or(|rc| Some(rc) == record.raycluster.as_deref())
    }
}

/// `/v1/status`: the node and its local endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    /// The agent's version and commit (`0.1.0 (abc123def456)`), so a rollout half
    /// done shows; empty from agents that predate it.
    #[serde(default)]
    pub version: String,
    /// The first full sync is programmed.
    pub ready: bool,
    /// `connected`, `unreachable`, `kind-missing` or `files`.
    pub source: String,
    /// Global `--audit`.
    pub audit: bool,
    pub problems: usize,
    /// How this node tells the node's own traffic from what it forwards or NATs
    /// (docs/semantics.md "What counts as the node"): `conntrack: ...` or `address-only: ... (why)`.
    #[serde(default)]
    pub node_trust: String,
    /// Local hostNetwork pods (by `namespace/name`) whose cgroup the datapath knows:
    /// their traffic is theirs, not the node's.
    #[serde(default)]
    pub host_network_pods: Vec<String>,
    /// RayClusters whose policy does not fit the datapath's maps: their pods are
    /// held fail-closed while the other RayClusters keep their policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldRayCluster>,
    /// Namespaces whose new pods the CNI plugin guards until the agent programs
    /// them (they hold a RayCluster, or carry `rayfence.io/guard: "true"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guarded_namespaces: Vec<String>,
    /// Pods the CNI plugin holds closed that the agent has not programmed yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guarded: Vec<GuardedPod>,
    pub endpoints: Vec<EndpointStatus>,
}

/// A pod held by the CNI guard: only its node reaches it, it reaches only its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardedPod {
    pub namespace: String,
    pub pod: String,
    /// Host veth ifindex.
    pub ifindex: u32,
    /// How long it has been held, in milliseconds.
    pub waited_ms: u64,
}

/// A RayCluster held fail-closed for lack of room in a datapath map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRayCluster {
    pub namespace: String,
    pub name: String,
    /// The map its entries do not fit (`RF_CIDR_V1`, `RF_POLICY_V1`).
    pub map: String,
    /// New entries it needs there.
    pub needed: usize,
    /// Entries free for it.
    pub free: usize,
}

/// One local pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub namespace: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raycluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `tc`, `cgroup` or `none`.
    pub hook: String,
    /// `attached`, `pending` or `not-enforced`, with why for the last two.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `enforce`, `audit` or `fail-closed`.
    pub mode: String,
    pub isolate_ingress: bool,
    pub isolate_egress: bool,
    /// Bumped on every policy change of this pod (established flows are re-checked).
    pub generation: u32,
    /// Packets dropped (all reasons), since the counters were created.
    pub drops: u64,
    /// Packets that would have been dropped (audit mode).
    pub would_drops: u64,
}

/// A flow to explain, as the user names its ends: `ns/pod` or an IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    pub from: String,
    /// `ns/pod` or IP, then `:port` and `/tcp|udp|sctp`; no port means ICMP echo.
    pub to: String,
}

/// The verdict one side of a flow gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainSide {
    /// `egress` (at the source pod) or `ingress` (at the destination pod).
    pub direction: String,
    /// The pod this side is decided for, `ns/name`; absent when the end is not a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `allowed`, `denied`, `not-enforced` (not a pod rayfence isolates here, or
    /// the direction is not isolated) or `elsewhere` (decided by another node's agent).
    pub verdict: String,
    /// Why, in words.
    pub because: String,
    /// Every rule that allows it: `RayCluster ns/name head.ingressRules[0]`, base flows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// Audit mode: a denial here is counted, not enforced.
    #[serde(default)]
    pub audit: bool,
}

/// `/v1/explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainReport {
    pub from: FlowEnd,
    pub to: FlowEnd,
    pub protocol: String,
    /// `allowed`, `denied`, `audit` (denied but passed: audit mode) or `unknown`
    /// (a side is decided by another node's agent).
    pub verdict: String,
    pub sides: Vec<ExplainSide>,
}
