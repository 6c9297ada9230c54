//! Tables to maps. The order never opens a gap and never cuts an allowed flow:
//! identities and CIDRs, then policy rows, then endpoints (so an endpoint switches to
//! a new policy id only once its rows exist), then removals, and last the generation
//! bump of the endpoints whose allowed flows a removal may have revoked (their
//! conntrack entries are re-checked by the datapath on their next packet).
//!
//! A write that fails because a map is full never opens the gate: the endpoints it
//! concerns (every isolated endpoint for an identity or CIDR) become fail-closed and
//! the error names the map and the count. What did not fit is retried once after
//! the removals (which may have made room) and fail-closed lifted if it fits then.
//! The runtime admits RayClusters before it applies (`runtime::capacity`), so this
//! is the last line, for what belongs to no RayCluster; a RayCluster that does not
//! fit is held fail-closed by [`Datapath::hold`] and its entries never reach here.
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use aya::maps::{MapError, lpm_trie::Key};
use rayfence_common::{EndpointInfo, PolicyValue, map_names};

use super::{Datapath, DatapathError, codec, maps};
use crate::tables::{EndpointId, IdentityId, NodePort, PolicyEntry, Tables, TablesDiff};

/// What did not fit, by map.
#[derive(Default)]
struct Failures {
    addresses: Vec<(IpAddr, IdentityId)>,
    cidrs: Vec<(IpNet, IdentityId)>,
    rows: Vec<PolicyEntry>,
    node_ports: Vec<(NodePort, IdentityId)>,
}

impl Failures {
    fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.cidrs.is_empty()
            && self.rows.is_empty()
            && self.node_ports.is_empty()
    }

    fn first_overflow(&self) -> Option<(&'static str, usize)> {
        [
            (map_names::IDENTITIES, self.addresses.len()),
            (map_names::CIDRS, self.cidrs.len()),
            (map_names::POLICY, self.rows.len()),
            (map_names::NODE_PORTS, self.node_ports.len()),
        ]
        .into_iter()
        .find(|(_, failed)| *failed > 0)
    }
}

impl Datapath {
    /// Converges the maps to `desired` (diffed against what the maps hold).
    pub fn apply(&mut self, desired: &Tables) -> Result<(), DatapathError> {
        let diff = self.mirror.diff(desired);
        let previously_failed = std::mem::take(&mut self.forced_fail_closed);
        let result = self.apply_diff(&diff);
        for endpoint in previously_failed.difference(&self.forced_fail_closed.clone()) {
            self.write_endpoint(*endpoint)?;
        }
        result
    }

    /// Applies one change. Rows that did not fit are not recorded as applied, so the
    /// next [`Self::apply`] retries them.
    pub fn apply_diff(&mut self, diff: &TablesDiff) -> Result<(), DatapathError> {
        let forced_before = self.forced_fail_closed.clone();
        // Decided before the mirror changes: a new address takes nothing away, an
        // address that changes identity (or goes) can.
        let peers_changed = !diff.addresses_remove.is_empty()
            || !diff.cidrs_remove.is_empty()
            // A new prefix can be an `except` that narrows a wider one.
            || !diff.cidrs_upsert.is_empty()
            // A port the node now DNATs is no longer the node's to everyone.
            || !diff.node_ports_upsert.is_empty()
            || diff.addresses_upsert.iter().any(|(ip, identity)| {
                self.mirror
                    .addresses
                    .get(ip)
                    .is_some_and(|old| old != identity)
            });

        // 1-2. Peers (new and changed addresses and prefixes), then policy rows,
        // then the node ports that rows decide.
        let mut failures = self.upsert(Failures {
            addresses: diff
                .addresses_upsert
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            cidrs: diff.cidrs_upsert.iter().map(|(k, v)| (*k, *v)).collect(),
            rows: diff.policy_add.iter().copied().collect(),
            node_ports: diff
                .node_ports_upsert
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
        })?;

        // 3. Endpoints: now their rows exist. Whatever did not fit makes the
        // endpoints it concerns fail-closed before anything else happens.
        for (endpoint, policy) in &diff.endpoints_upsert {
            self.mirror.endpoints.insert(*endpoint, *policy);
        }
        self.forced_fail_closed = &forced_before | &self.failing_endpoints(&failures);
        let mut to_write: BTreeSet<EndpointId> = diff.endpoints_upsert.keys().copied().collect();
        to_write.extend(self.forced_fail_closed.difference(&forced_before));
        for endpoint in &to_write {
            self.write_endpoint(*endpoint)?;
        }

        // 4. Removals.
        self.remove(diff)?;

        // A full map may have room now: retry what did not fit, and lift fail-closed
        // from the endpoints whose entries all made it.
        if !failures.is_empty() {
            failures = self.upsert(std::mem::take(&mut failures))?;
            let forced = &forced_before | &self.failing_endpoints(&failures);
            let changed: Vec<EndpointId> = self
                .forced_fail_closed
                .symmetric_difference(&forced)
                .copied()
                .collect();
            self.forced_fail_closed = forced;
            for endpoint in changed {
                self.write_endpoint(endpoint)?;
            }
        }

        // 5. Re-check established flows of the endpoints a removal may affect.
        for endpoint in self.revocable(diff, peers_changed) {
            let next = self.generation(endpoint).wrapping_add(1).max(1);
            self.generations.insert(endpoint, next);
            self.write_endpoint(endpoint)?;
        }

        match failures.first_overflow() {
            None => Ok(()),
            Some((map, failed)) => Err(DatapathError::MapFull {
                map,
                failed,
                fail_closed: self.forced_fail_closed.iter().copied().collect(),
            }),
        }
    }

    /// Writes peers and rows; returns what did not fit (the rest is mirrored).
    fn upsert(&mut self, wanted: Failures) -> Result<Failures, DatapathError> {
        let Failures {
            addresses,
            cidrs,
            rows,
            node_ports,
        } = wanted;
        let mut failures = Failures::default();
        {
            let mut map = maps::identities(&mut self.ebpf)?;
            let mut done = Vec::new();
            for (ip, identity) in addresses {
                match map.insert(&codec::addr(ip), &identity, 0) {
                    Ok(()) => done.push((ip, identity)),
                    Err(error) if is_full(&error) => failures.addresses.push((ip, identity)),
                    Err(error) => return Err(map.fail(error)),
                }
            }
            self.mirror.addresses.extend(done);
        }
        {
            let mut map = maps::cidrs(&mut self.ebpf)?;
            let mut done = Vec::new();
            for (net, identity) in cidrs {
                let (len, addr) = codec::prefix(net);
                match map.insert(&Key::new(len, addr), &identity, 0) {
                    Ok(()) => done.push((net, identity)),
                    Err(error) if is_full(&error) => failures.cidrs.push((net, identity)),
                    Err(error) => return Err(map.fail(error)),
                }
            }
            self.mirror.cidrs.extend(done);
        }
        {
            let mut map = maps::policy(&mut self.ebpf)?;
            let mut done = Vec::new();
            for row in rows {
                let (len, key) = codec::policy_key(&row);
                match map.insert(&Key::new(len, key), &PolicyValue { cookie: 0 }, 0) {
                    Ok(()) => done.push(row),
                    Err(error) if is_full(&error) => failures.rows.push(row),
                    Err(error) => return Err(map.fail(error)),
                }
            }
            self.mirror.policy.extend(done);
        }
        {
            let mut map = maps::node_ports(&mut self.ebpf)?;
            let mut done = Vec::new();
            for (port, identity) in node_ports {
                match map.insert(&codec::node_port_key(&port), &identity, 0) {
                    Ok(()) => done.push((port, identity)),
                    Err(error) if is_full(&error) => failures.node_ports.push((port, identity)),
                    Err(error) => return Err(map.fail(error)),
                }
            }
            self.mirror.node_ports.extend(done);
        }
        Ok(failures)
    }

    /// Endpoints that must be fail-closed because of `failures`: every isolated one
    /// when a peer or a node port did not fit (any of them may talk to it; a node
    /// port missing from the map would be the node's), else those whose policy lost
    /// a row.
    fn failing_endpoints(&self, failures: &Failures) -> BTreeSet<EndpointId> {
        let fail_all = !failures.addresses.is_empty()
            || !failures.cidrs.is_empty()
            || !failures.node_ports.is_empty();
        let policies: BTreeSet<_> = failures.rows.iter().map(|row| row.policy_id).collect();
        self.mirror
            .endpoints
            .iter()
            .filter(|(_, policy)| {
                (fail_all && (policy.isolate_ingress || policy.isolate_egress))
                    || policies.contains(&policy.policy_id)
            })
            .map(|(endpoint, _)| *endpoint)
            .collect()
    }

    fn remove(&mut self, diff: &TablesDiff) -> Result<(), DatapathError> {
        {
            let mut map = maps::node_ports(&mut self.ebpf)?;
            for port in &diff.node_ports_remove {
                remove_ok(map.remove(&codec::node_port_key(port)), map.name())?;
            }
            for port in &diff.node_ports_remove {
                self.mirror.node_ports.remove(port);
            }
        }
        {
            let mut map = maps::policy(&mut self.ebpf)?;
            for row in &diff.policy_remove {
                let (len, key) = codec::policy_key(row);
                remove_ok(map.remove(&Key::new(len, key)), map.name())?;
            }
            for row in &diff.policy_remove {
                self.mirror.policy.remove(row);
            }
        }
        {
            let mut map = maps::identities(&mut self.ebpf)?;
            for ip in &diff.addresses_remove {
                remove_ok(map.remove(&codec::addr(*ip)), map.name())?;
            }
            for ip in &diff.addresses_remove {
                self.mirror.addresses.remove(ip);
            }
        }
        {
            let mut map = maps::cidrs(&mut self.ebpf)?;
            for net in &diff.cidrs_remove {
                let (len, addr) = codec::prefix(*net);
                remove_ok(map.remove(&Key::new(len, addr)), map.name())?;
            }
            for net in &diff.cidrs_remove {
                self.mirror.cidrs.remove(net);
            }
        }
        for endpoint in &diff.endpoints_remove {
            // Still attached: fail-closed until the engine has a policy for it again.
            self.mirror.endpoints.remove(endpoint);
            self.write_endpoint(*endpoint)?;
        }
        Ok(())
    }

    /// Attached endpoints whose allowed flows `diff` may take away. Every endpoint
    /// upsert counts: a new policy id or isolation, and an audit flag turned off,
    /// which must cut the flows that passed only by audit (their conntrack entries
    /// are re-checked against the rows on their next packet).
    fn revocable(&self, diff: &TablesDiff, peers_changed: bool) -> BTreeSet<EndpointId> {
        let policies: BTreeSet<_> = diff.policy_remove.iter().map(|row| row.policy_id).collect();
        self.attachments
            .keys()
            .copied()
            .filter(|endpoint| {
                peers_changed
                    || diff.endpoints_upsert.contains_key(endpoint)
                    || self
                        .mirror
                        .endpoints
                        .get(endpoint)
                        .is_some_and(|policy| policies.contains(&policy.policy_id))
            })
            .collect()
    }

    /// Holds exactly `held` fail-closed (drop all but node and link-control traffic,
    /// whatever their policy says), writing the endpoints whose state changes. To
    /// hold a RayCluster that lost its room: hold, then apply the tables without its
    /// rows; to release it: apply its rows, then release.
    pub fn hold(&mut self, held: BTreeSet<EndpointId>) -> Result<(), DatapathError> {
        let changed: Vec<EndpointId> = self.held.symmetric_difference(&held).copied().collect();
        self.held = held;
        for endpoint in changed {
            self.write_endpoint(endpoint)?;
        }
        Ok(())
    }

    /// Endpoints held fail-closed by [`Self::hold`].
    pub fn held(&self) -> &BTreeSet<EndpointId> {
        &self.held
    }

    /// The endpoint entry the datapath currently sees for a host veth.
    pub fn tc_endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, DatapathError> {
        let map = maps::endpoints_tc(&self.ebpf)?;
        match map.get(&ifindex, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(map.fail(error)),
        }
    }
}

fn is_full(error: &MapError) -> bool {
    match error {
        MapError::SyscallError(syscall) => matches!(
            syscall.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
        ),
        _ => false,
    }
}

fn remove_ok(result: Result<(), MapError>, map: &'static str) -> Result<(), DatapathError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall))
            if syscall.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(error) => Err(DatapathError::map(map, error)),
    }
}
