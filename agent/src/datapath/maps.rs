//! One typed accessor per map of the loaded object (Cilium's `pkg/maps/*` is the model):
//! the map's name, key and value types are written once, here, and every error it
//! gives names the map. Must not hold policy: what goes into a map is decided in
//! [`super::apply`], [`super::attach`] and the other writers.
//!
//! Free functions over [`Ebpf`] (not methods of the datapath) so a writer can hold
//! a map and still update the datapath's own bookkeeping beside it.
use std::ops::{Deref, DerefMut};

use aya::Ebpf;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use rayfence_common::{
    Addr, CounterKey, CounterValue, DatapathConfig, EndpointInfo, EventBudget, NodePortKey,
    PolicyKey, PolicyValue, map_names,
};

use super::DatapathError;

/// An aya map with its types, and its name for the errors it gives.
pub(crate) struct TypedMap<T> {
    name: &'static str,
    map: T,
}

impl<T> TypedMap<T> {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// An error of this map as the datapath's, naming the map.
    pub(crate) fn fail(&self, error: MapError) -> DatapathError {
        DatapathError::map(self.name, error)
    }

    /// [`Self::fail`] as a closure that does not borrow the map, for `map_err`.
    pub(crate) fn error(&self) -> impl Fn(MapError) -> DatapathError + Copy + 'static {
        let name = self.name;
        move |error| DatapathError::map(name, error)
    }
}

impl<T> Deref for TypedMap<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.map
    }
}

impl<T> DerefMut for TypedMap<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.map
    }
}

/// Where a map is taken from: `&Ebpf` gives a reader, `&mut Ebpf` a writer.
pub(crate) trait MapSource<'a> {
    /// aya's handle on the map (`&Map` or `&mut Map`).
    type Handle;
    /// What the typed map holds (`&MapData` or `&mut MapData`).
    type Data;
    fn handle(self, name: &'static str) -> Option<Self::Handle>;
}

impl<'a> MapSource<'a> for &'a Ebpf {
    type Handle = &'a Map;
    type Data = &'a MapData;

    fn handle(self, name: &'static str) -> Option<&'a Map> {
        self.map(name)
    }
}

impl<'a> MapSource<'a> for &'a mut Ebpf {
    type Handle = &'a mut Map;
    type Data = &'a mut MapData;

    fn handle(self, name: &'static str) -> Option<&'a mut Map> {
        self.map_mut(name)
    }
}

fn typed<'a, S, T>(source: S, name: &'static str) -> Result<TypedMap<T>, DatapathError>
where
    S: MapSource<'a>,
    T: TryFrom<S::Handle, Error = MapError>,
{
    let handle = source
        .handle(name)
        .ok_or(DatapathError::MissingMap { map: name })?;
    let map = T::try_from(handle).map_err(|error| DatapathError::map(name, error))?;
    Ok(TypedMap { name, map })
}

/// `accessor: Kind<Key, Value> = map name;` gives `accessor(&ebpf)` (a reader) and
/// `accessor(&mut ebpf)` (a writer).
macro_rules! typed_maps {
    ($(
        $(#[$doc:meta])*
        $accessor:ident: $kind:ident<$($types:ty),+> = $name:path;
    )*) => {$(
        $(#[$doc])*
        pub(crate) fn $accessor<'a, S>(
            source: S,
        ) -> Result<TypedMap<$kind<S::Data, $($types),+>>, DatapathError>
        where
            S: MapSource<'a>,
            $kind<S::Data, $($types),+>: TryFrom<S::Handle, Error = MapError>,
        {
            typed(source, $name)
        }
    )*};
}

typed_maps! {
    /// Pod address -> identity.
    identities: HashMap<Addr, u32> = map_names::IDENTITIES;
    /// ipBlock and Service prefixes -> identity.
    cidrs: LpmTrie<Addr, u32> = map_names::CIDRS;
    /// (policy, direction, peer, port) rows.
    policy: LpmTrie<PolicyKey, PolicyValue> = map_names::POLICY;
    /// NodePorts and hostPorts -> the identity behind them (docs/semantics.md "What counts as the node").
    node_ports: HashMap<NodePortKey, u32> = map_names::NODE_PORTS;
    /// Pod cgroups a node socket may sit in -> hostNetwork pod identity.
    node_cgroups: HashMap<u64, u32> = map_names::NODE_CGROUPS;
    /// Host veth ifindex -> endpoint (the CNI plugin's guards included).
    endpoints_tc: HashMap<u32, EndpointInfo> = map_names::ENDPOINTS_TC;
    /// Pod cgroup id -> endpoint.
    endpoints_cgroup: HashMap<u64, EndpointInfo> = map_names::ENDPOINTS_CGROUP;
    /// Per-CPU drop and flow counters.
    counters: PerCpuHashMap<CounterKey, CounterValue> = map_names::COUNTERS;
    /// Per-CPU flow-event budget and what it lost.
    event_budget: PerCpuArray<EventBudget> = map_names::EVENT_BUDGET;
    /// The datapath's settings (one entry).
    config: Array<DatapathConfig> = map_names::CONFIG;
    /// DNS servers a CNI guard lets its pod reach.
    guard_dns: HashMap<Addr, u8> = map_names::GUARD_DNS;
}
