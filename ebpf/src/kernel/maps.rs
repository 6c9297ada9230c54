//! The datapath's maps. Names come from `rayfence_common::map_names` (repeated as
//! literals because the `map` attribute needs one); sizes here are defaults that the
//! agent overrides at load time. Nothing here is pinned by the program: the agent
//! decides where (or whether) maps are pinned.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use rayfence_common::{
    Addr, CounterKey, CounterValue, CtKey, CtValue, DatapathConfig, EndpointInfo, EventBudget,
    FragKey, FragValue, GuardNsKey, GuardRecord, NodePortKey, PolicyKey, PolicyValue,
};

/// Host veth ifindex -> endpoint.
#[map(name = "RF_EP_TC_V1")]
pub static EP_TC: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(1024, 0);

/// Pod cgroup (v2) id -> endpoint.
#[map(name = "RF_EP_CG_V1")]
pub static EP_CG: HashMap<u64, EndpointInfo> = HashMap::with_max_entries(1024, 0);

/// Exact peer address -> identity.
#[map(name = "RF_IDENT_V1")]
pub static IDENTITIES: HashMap<Addr, u32> = HashMap::with_max_entries(1024, 0);

/// Peer prefix -> identity of the set of ipBlocks containing it (IPv4 as 96 + len).
#[map(name = "RF_CIDR_V1")]
pub static CIDRS: LpmTrie<Addr, u32> = LpmTrie::with_max_entries(1024, 0);

/// Allowed (policy, identity, direction, protocol, port prefix).
#[map(name = "RF_POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::with_max_entries(1024, 0);

#[map(name = "RF_CT_V1")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(4096, 0);

#[map(name = "RF_FRAG_V1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(1024, 0);

#[map(name = "RF_COUNT_V1")]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::with_max_entries(4096, 0);

#[map(name = "RF_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map(name = "RF_EVBUDGET_V1")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "RF_CONFIG_V1")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// Ports the node DNATs elsewhere (nodePorts, local hostPorts) -> the identity egress
/// to a node address on them is decided on.
#[map(name = "RF_NODEPORT_V1")]
pub static NODE_PORTS: HashMap<NodePortKey, u32> = HashMap::with_max_entries(1024, 0);

/// Cgroup (v2) id -> what a node socket in it is: a local hostNetwork pod's identity,
/// or `identity::OTHER_POD` (the kubelet's pod cgroup roots).
#[map(name = "RF_NODECG_V1")]
pub static NODE_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

/// Flows from a local hostNetwork pod to a local pod, found by the sending socket's
/// cgroup -> that pod's identity: the pod's side of the flow carries no socket of
/// the node, so its re-checks read the answer here.
#[map(name = "RF_NODEFLOW_V1")]
pub static NODE_FLOWS: LruHashMap<CtKey, u32> = LruHashMap::with_max_entries(1024, 0);

/// Namespaces whose new pods the CNI plugin guards. No program reads it: it is
/// declared here so that it is created, sized and pinned with the others, and so
/// outlives the agent with them.
#[map(name = "RF_GUARDNS_V1")]
pub static GUARDED_NAMESPACES: HashMap<GuardNsKey, u32> = HashMap::with_max_entries(1024, 0);

/// Host veth ifindex -> the pod the CNI plugin guarded there (for the agent only;
/// the datapath decides on the `RF_EP_TC` entry).
#[map(name = "RF_GUARD_V1")]
pub static GUARDS: HashMap<u32, GuardRecord> = HashMap::with_max_entries(1024, 0);

/// DNS addresses a guarded pod may query on port 53 (all zeros: any address).
#[map(name = "RF_GUARDDNS_V1")]
pub static GUARD_DNS: HashMap<Addr, u8> = HashMap::with_max_entries(256, 0);
