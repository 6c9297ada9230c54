//! The engine's copy of the desired [`Tables`] plus what changed since the last
//! [`Output::take_diff`], so a diff costs what was touched, not a table scan.
//!
//! Must not: decide anything; it only records writes.
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::tables::{
    EndpointId, EndpointPolicy, IdentityId, NodePort, PolicyEntry, Tables, TablesDiff,
};

#[derive(Debug, Default)]
pub(crate) struct Output {
    pub tables: Tables,
    /// Value at the last take, for every key written since.
    endpoints: HashMap<EndpointId, Option<EndpointPolicy>>,
    addresses: HashMap<IpAddr, Option<IdentityId>>,
    cidrs: HashMap<IpNet, Option<IdentityId>>,
    node_ports: HashMap<NodePort, Option<IdentityId>>,
    rows: HashMap<PolicyEntry, bool>,
}

fn set<K: Ord + Hash + Copy, V: Copy>(
    map: &mut std::collections::BTreeMap<K, V>,
    touched: &mut HashMap<K, Option<V>>,
    key: K,
    value: Option<V>,
) {
    let old = match value {
        Some(v) => map.insert(key, v),
        None => map.remove(&key),
    };
    touched.entry(key).or_insert(old);
}

fn drain<K: Ord + Hash + Copy, V: Copy + PartialEq>(
    map: &std::collections::BTreeMap<K, V>,
    touched: &mut HashMap<K, Option<V>>,
    upsert: &mut std::collections::BTreeMap<K, V>,
    remove: &mut std::collections::BTreeSet<K>,
) {
    for (key, old) in touched.drain() {
        let new = map.get(&key).copied();
        if new != old {
            match new {
                Some(v) => {
                    upsert.insert(key, v);
                }
                None => {
                    remove.insert(key);
                }
            }
        }
    }
}

impl Output {
    pub fn set_endpoint(&mut self, id: EndpointId, value: Option<EndpointPolicy>) {
        set(&mut self.tables.endpoints, &mut self.endpoints, id, value);
    }

    pub fn set_address(&mut self, addr: IpAddr, value: Option<IdentityId>) {
        set(&mut self.tables.addresses, &mut self.addresses, addr, value);
    }

    pub fn set_cidr(&mut self, net: IpNet, value: Option<IdentityId>) {
        set(&mut self.tables.cidrs, &mut self.cidrs, net, value);
    }

    pub fn set_node_port(&mut self, port: NodePort, value: Option<IdentityId>) {
        set(
            &mut self.tables.node_ports,
            &mut self.node_ports,
            port,
            value,
        );
    }

    pub fn add_row(&mut self, row: PolicyEntry) {
        if self.tables.policy.insert(row) {
            self.rows.entry(row).or_insert(false);
        }
    }

    pub fn remove_row(&mut self, row: PolicyEntry) {
        if self.tables.policy.remove(&row) {
            self.rows.entry(row).or_insert(true);
        }
    }

    pub fn take_diff(&mut self) -> TablesDiff {
        let mut diff = TablesDiff::default();
        drain(
            &self.tables.endpoints,
            &mut self.endpoints,
            &mut diff.endpoints_upsert,
            &mut diff.endpoints_remove,
        );
        drain(
            &self.tables.addresses,
            &mut self.addresses,
            &mut diff.addresses_upsert,
            &mut diff.addresses_remove,
        );
        drain(
            &self.tables.cidrs,
            &mut self.cidrs,
            &mut diff.cidrs_upsert,
            &mut diff.cidrs_remove,
        );
        drain(
            &self.tables.node_ports,
            &mut self.node_ports,
            &mut diff.node_ports_upsert,
            &mut diff.node_ports_remove,
        );
        for (row, was) in self.rows.drain() {
            let now = self.tables.policy.contains(&row);
            match (was, now) {
                (false, true) => {
                    diff.policy_add.insert(row);
                }
                (true, false) => {
                    diff.policy_remove.insert(row);
                }
                _ => {}
            }
        }
        diff
    }
}
