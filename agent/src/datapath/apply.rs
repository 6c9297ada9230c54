//! Tables to maps. The order never opens a gap and never cuts an allowed flow:
//! identities and CIDRs, then policy rows, then endpoints (so an endpoint switches to
//! a new policy id only once its rows exist), then removals, and last the generation
//! bump of the endpoints whose allowed flows a removal may have revoked (their
//! conntrack entries are re-checked by the datapath on their next packet).
//!
//! A write that fails because a map is full never opens the gate: the endpoints it
//! concerns (every isolated endpoint for an identity or CIDR) become fail-closed and
//! the error names the map and the count.
use std::collections::BTreeSet;

use aya::maps::{HashMap, LpmTrie, MapError, lpm_trie::Key};
use rayfence_common::{Addr, EndpointInfo, PolicyKey, PolicyValue, map_names};

use super::{Datapath, DatapathError, codec};
use crate::tables::{EndpointId, Tables, TablesDiff};

/// A map that could not take all its entries.
struct Overflow {
    map: &'static str,
    failed: usize,
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
        let mut overflows = Vec::new();
        let mut fail_all = false;
        let mut failed_policies = BTreeSet::new();

        // 1. Peers: new and changed addresses and prefixes.
        {
            const MAP: &str = map_names::IDENTITIES;
            let mut map: HashMap<_, Addr, u32> =
                HashMap::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            let mut failed = 0;
            let mut done = Vec::new();
            for (ip, identity) in &diff.addresses_upsert {
                match map.insert(&codec::addr(*ip), identity, 0) {
                    Ok(()) => done.push((*ip, *identity)),
                    Err(error) if is_full(&error) => failed += 1,
                    Err(error) => return Err(DatapathError::map(MAP, error)),
                }
            }
            self.mirror.addresses.extend(done);
            if failed > 0 {
                fail_all = true;
                overflows.push(Overflow { map: MAP, failed });
            }
        }
        {
            const MAP: &str = map_names::CIDRS;
            let mut map: LpmTrie<_, Addr, u32> =
                LpmTrie::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            let mut failed = 0;
            let mut done = Vec::new();
            for (net, identity) in &diff.cidrs_upsert {
                let (len, addr) = codec::prefix(*net);
                match map.insert(&Key::new(len, addr), identity, 0) {
                    Ok(()) => done.push((*net, *identity)),
                    Err(error) if is_full(&error) => failed += 1,
                    Err(error) => return Err(DatapathError::map(MAP, error)),
                }
            }
            self.mirror.cidrs.extend(done);
            if failed > 0 {
                fail_all = true;
                overflows.push(Overflow { map: MAP, failed });
            }
        }

        // 2. Policy rows.
        {
            const MAP: &str = map_names::POLICY;
            let mut map: LpmTrie<_, PolicyKey, PolicyValue> =
                LpmTrie::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            let mut failed = 0;
            let mut done = Vec::new();
            for row in &diff.policy_add {
                let (len, key) = codec::policy_key(row);
                match map.insert(&Key::new(len, key), &PolicyValue { cookie: 0 }, 0) {
                    Ok(()) => done.push(*row),
                    Err(error) if is_full(&error) => {
                        failed += 1;
                        failed_policies.insert(row.policy_id);
                    }
                    Err(error) => return Err(DatapathError::map(MAP, error)),
                }
            }
            self.mirror.policy.extend(done);
            if failed > 0 {
                overflows.push(Overflow { map: MAP, failed });
            }
        }

        // 3. Endpoints: now their rows exist. Fail-closed first for what did not fit.
        for (endpoint, policy) in &diff.endpoints_upsert {
            self.mirror.endpoints.insert(*endpoint, *policy);
        }
        let newly_failed: Vec<EndpointId> = self
            .mirror
            .endpoints
            .iter()
            .filter(|(_, policy)| {
                (fail_all && (policy.isolate_ingress || policy.isolate_egress))
                    || failed_policies.contains(&policy.policy_id)
            })
            .map(|(endpoint, _)| *endpoint)
            .collect();
        self.forced_fail_closed.extend(newly_failed.iter().copied());
        let to_write: BTreeSet<EndpointId> = diff
            .endpoints_upsert
            .keys()
            .chain(newly_failed.iter())
            .copied()
            .collect();
        for endpoint in &to_write {
            self.write_endpoint(*endpoint)?;
        }

        // 4. Removals.
        {
            const MAP: &str = map_names::POLICY;
            let mut map: LpmTrie<_, PolicyKey, PolicyValue> =
                LpmTrie::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for row in &diff.policy_remove {
                let (len, key) = codec::policy_key(row);
                remove_ok(map.remove(&Key::new(len, key)), MAP)?;
            }
            for row in &diff.policy_remove {
                self.mirror.policy.remove(row);
            }
        }
        {
            const MAP: &str = map_names::IDENTITIES;
            let mut map: HashMap<_, Addr, u32> =
                HashMap::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for ip in &diff.addresses_remove {
                remove_ok(map.remove(&codec::addr(*ip)), MAP)?;
            }
            for ip in &diff.addresses_remove {
                self.mirror.addresses.remove(ip);
            }
        }
        {
            const MAP: &str = map_names::CIDRS;
            let mut map: LpmTrie<_, Addr, u32> =
                LpmTrie::try_from(self.map_mut(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
            for net in &diff.cidrs_remove {
                let (len, addr) = codec::prefix(*net);
                remove_ok(map.remove(&Key::new(len, addr)), MAP)?;
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

        // 5. Re-check established flows of the endpoints a removal may affect.
        for endpoint in self.revocable(diff) {
            let next = self.generation(endpoint).wrapping_add(1).max(1);
            self.generations.insert(endpoint, next);
            self.write_endpoint(endpoint)?;
        }

        match overflows.into_iter().next() {
            None => Ok(()),
            Some(Overflow { map, failed }) => Err(DatapathError::MapFull {
                map,
                failed,
                fail_closed: self.forced_fail_closed.iter().copied().collect(),
            }),
        }
    }

    /// Attached endpoints whose allowed flows `diff` may take away.
    fn revocable(&self, diff: &TablesDiff) -> BTreeSet<EndpointId> {
        let peers_changed = !diff.addresses_remove.is_empty()
            || !diff.cidrs_remove.is_empty()
            // A new prefix can be an `except` that narrows a wider one.
            || !diff.cidrs_upsert.is_empty()
            || !diff.addresses_upsert.is_empty();
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

    /// The endpoint entry the datapath currently sees for a host veth.
    pub fn tc_endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, DatapathError> {
        const MAP: &str = map_names::ENDPOINTS_TC;
        let map: HashMap<_, u32, EndpointInfo> =
            HashMap::try_from(self.map(MAP)?).map_err(|e| DatapathError::map(MAP, e))?;
        match map.get(&ifindex, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(DatapathError::map(MAP, error)),
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
