//! Capacity admission per RayCluster: which RayClusters' policies the datapath's
//! `RF_CIDR_V1` and `RF_POLICY_V1` maps can hold, decided before anything is
//! written, so a RayCluster that does not fit is held fail-closed while every other
//! one keeps (and keeps updating) its policy. Without it, one cluster's rule with
//! thousands of `except`s filled the CIDR map and every isolated pod of the node
//! went fail-closed.
//!
//! What a RayCluster needs: the rows of the policies its pods use, the ipBlock
//! prefixes those policies name, and the rows other admitted policies get for those
//! prefixes (a `10.0.0.0/8` rule of one cluster has a row for every `except` prefix
//! another cluster names inside it). Entries already admitted cost nothing. The
//! datapath writes new entries before it removes old ones, so a cost is counted
//! against what the maps hold now plus what is new (the peak of the apply), never
//! against the end state alone.
//!
//! Order, stable: first what no RayCluster owns (pods outside RayClusters,
//! NetworkPolicy-only pods), always; then the RayClusters admitted last time, then
//! the others, each group by namespace/name. A RayCluster that does not fit is
//! refused; nothing admitted before it is evicted to make room.
//!
//! A held RayCluster's tables are those of an engine that never saw it: its rows and
//! the prefixes only it names are left out (rows of admitted policies for those
//! prefixes too, since their identities are then absent). Leaving a prefix out of
//! the longest-prefix match only moves an address to a shorter prefix whose rows the
//! admitted policies have computed for exactly their own blocks, so nothing admitted
//! gets wider. Its pods stay isolated and fail-closed (the datapath's `FAIL_CLOSED`
//! flag), whatever their policy id.
//!
//! Must not: touch the engine or the datapath, or admit a RayCluster partly (all of
//! its entries or none of its own).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;
use rayfence_common::map_names;

use crate::tables::{EndpointId, IdentityId, PolicyEntry, PolicyId, Tables, TablesDiff};

/// A RayCluster: `(namespace, name)`.
pub type Tenant = (String, String);

/// Entries the maps can hold for tables (the CIDR map's own barrier prefix excluded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub cidrs: usize,
    pub policy: usize,
}

/// Why a RayCluster is held: the first map its entries do not fit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Refusal {
    pub map: &'static str,
    /// New entries it needs in `map`.
    pub needed: usize,
    /// Entries of `map` free for it (after everything admitted before it).
    pub free: usize,
}

impl Refusal {
    pub fn describe(&self) -> String {
        format!(
            "needs {} entries in map {}, {} free",
            self.needed, self.map, self.free
        )
    }
}

/// What admission works on.
pub struct Request<'a> {
    /// The engine's tables.
    pub desired: &'a Tables,
    /// What the maps hold now.
    pub programmed: &'a Tables,
    /// The RayCluster each endpoint's policy comes from; endpoints not listed belong
    /// to no RayCluster (always admitted).
    pub tenants: &'a BTreeMap<EndpointId, Tenant>,
    /// The ipBlock prefixes each policy names.
    pub prefixes: &'a HashMap<PolicyId, &'a [IpNet]>,
    /// The RayClusters admitted last time (`None` on the first programming: those
    /// whose entries the maps already hold all of, adopted from a previous run).
    pub incumbents: Option<&'a BTreeSet<Tenant>>,
    pub capacity: Capacity,
}

/// The outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admission {
    pub admitted: BTreeSet<Tenant>,
    pub held: BTreeMap<Tenant, Refusal>,
    /// Endpoints of held RayClusters: fail-closed.
    pub held_endpoints: BTreeSet<EndpointId>,
    /// What to program when something is held; `None`: the desired tables as they are.
    pub tables: Option<Tables>,
}

/// Whether applying `diff` to `programmed` stays within `capacity` at its peak
/// (every new key written before any removal), so no admission is needed.
pub fn diff_fits(programmed: &Tables, diff: &TablesDiff, capacity: Capacity) -> bool {
    let new_cidrs = diff
        .cidrs_upsert
        .keys()
        .filter(|net| !programmed.cidrs.contains_key(*net))
        .count();
    let new_rows = diff
        .policy_add
        .iter()
        .filter(|row| !programmed.policy.contains(*row))
        .count();
    programmed.cidrs.len() + new_cidrs <= capacity.cidrs
        && programmed.policy.len() + new_rows <= capacity.policy
}

/// Decides which RayClusters fit; see the module docs.
pub fn admit(request: &Request<'_>) -> Admission {
    let mut ledger = Ledger::new(request);
    // Policies by who uses them: no RayCluster (base) or which ones.
    let mut base: BTreeSet<PolicyId> = BTreeSet::new();
    let mut by_tenant: BTreeMap<Tenant, BTreeSet<PolicyId>> = BTreeMap::new();
    for (endpoint, policy) in &request.desired.endpoints {
        match request.tenants.get(endpoint) {
            Some(tenant) => {
                by_tenant
                    .entry(tenant.clone())
                    .or_default()
                    .insert(policy.policy_id);
            }
            None => {
                base.insert(policy.policy_id);
            }
        }
    }
    // Rows of a policy no endpoint uses (none should exist) are nobody's: base.
    let used: HashSet<PolicyId> = request
        .desired
        .endpoints
        .values()
        .map(|p| p.policy_id)
        .collect();
    base.extend(ledger.rows_by_policy.keys().filter(|p| !used.contains(p)));
    for policies in by_tenant.values_mut() {
        policies.retain(|p| !base.contains(p));
    }

    // Prefixes no policy names (a ClusterIP /32, say) are nobody's either.
    let named: HashSet<IpNet> = request
        .prefixes
        .values()
        .flat_map(|nets| nets.iter().copied())
        .collect();
    let unowned: Vec<IpNet> = request
        .desired
        .cidrs
        .keys()
        .filter(|net| !named.contains(*net))
        .copied()
        .collect();
    ledger.commit_nets(&unowned);
    let (nets, rows) = ledger.cost(&base);
    ledger.commit(&base, &nets, &rows);

    let incumbent = |tenant: &Tenant, policies: &BTreeSet<PolicyId>| match request.incumbents {
        Some(set) => set.contains(tenant),
        None => ledger.fully_programmed(policies),
    };
    let mut order: Vec<(bool, &Tenant, &BTreeSet<PolicyId>)> = by_tenant
        .iter()
        .map(|(tenant, policies)| (!incumbent(tenant, policies), tenant, policies))
        .collect();
    order.sort();

    let mut admission = Admission::default();
    for (_, tenant, policies) in order {
        let (nets, rows) = ledger.cost(policies);
        match ledger.refusal(&nets, &rows) {
            None => {
                ledger.commit(policies, &nets, &rows);
                admission.admitted.insert(tenant.clone());
            }
            Some(refusal) => {
                admission.held.insert(tenant.clone(), refusal);
            }
        }
    }
    if admission.held.is_empty() {
        return admission;
    }
    admission.held_endpoints = request
        .tenants
        .iter()
        .filter(|(_, tenant)| admission.held.contains_key(*tenant))
        .map(|(endpoint, _)| *endpoint)
        .collect();
    let mut tables = request.desired.clone();
    tables.cidrs.retain(|net, _| ledger.nets.contains(net));
    tables.policy.retain(|row| ledger.rows.contains(row));
    admission.tables = Some(tables);
    admission
}

/// What is admitted so far and what it costs.
struct Ledger<'a> {
    request: &'a Request<'a>,
    rows_by_policy: HashMap<PolicyId, Vec<PolicyEntry>>,
    /// Rows whose peer is a prefix identity, by that identity.
    rows_by_prefix: HashMap<IdentityId, Vec<PolicyEntry>>,
    /// The prefixes behind each prefix identity: a row on one is needed only while
    /// one of its prefixes is in the map.
    prefix_nets: HashMap<IdentityId, Vec<IpNet>>,
    policies: HashSet<PolicyId>,
    nets: HashSet<IpNet>,
    rows: HashSet<PolicyEntry>,
    /// Entries the maps will hold at the apply's peak.
    used_cidrs: usize,
    used_rows: usize,
}

impl<'a> Ledger<'a> {
    fn new(request: &'a Request<'a>) -> Self {
        let desired = request.desired;
        // Identities that exact addresses map to (pods, Services, the node) are no
        // prefix's own, even where a prefix carries one (a ClusterIP's /32).
        let exact: HashSet<IdentityId> = desired.addresses.values().copied().collect();
        let mut prefix_nets: HashMap<IdentityId, Vec<IpNet>> = HashMap::new();
        for (net, identity) in &desired.cidrs {
            if !exact.contains(identity) {
                prefix_nets.entry(*identity).or_default().push(*net);
            }
        }
        let mut rows_by_policy: HashMap<PolicyId, Vec<PolicyEntry>> = HashMap::new();
        let mut rows_by_prefix: HashMap<IdentityId, Vec<PolicyEntry>> = HashMap::new();
        for row in &desired.policy {
            rows_by_policy.entry(row.policy_id).or_default().push(*row);
            if prefix_nets.contains_key(&row.identity) {
                rows_by_prefix.entry(row.identity).or_default().push(*row);
            }
        }
        Self {
            request,
            rows_by_policy,
            rows_by_prefix,
            prefix_nets,
            policies: HashSet::new(),
            nets: HashSet::new(),
            rows: HashSet::new(),
            used_cidrs: request.programmed.cidrs.len(),
            used_rows: request.programmed.policy.len(),
        }
    }

    fn prefixes_of(&self, policy: PolicyId) -> impl Iterator<Item = IpNet> + '_ {
        self.request
            .prefixes
            .get(&policy)
            .into_iter()
            .flat_map(|nets| nets.iter().copied())
            .filter(|net| self.request.desired.cidrs.contains_key(net))
    }

    /// The entries admitting `policies` adds: prefixes and rows not admitted yet.
    fn cost(&self, policies: &BTreeSet<PolicyId>) -> (Vec<IpNet>, Vec<PolicyEntry>) {
        let new: Vec<PolicyId> = policies
            .iter()
            .copied()
            .filter(|p| !self.policies.contains(p))
            .collect();
        let nets: BTreeSet<IpNet> = new
            .iter()
            .flat_map(|p| self.prefixes_of(*p))
            .filter(|net| !self.nets.contains(net))
            .collect();
        let present = |net: &IpNet| self.nets.contains(net) || nets.contains(net);
        let needed = |row: &PolicyEntry| match self.prefix_nets.get(&row.identity) {
            None => true,
            Some(prefixes) => prefixes.iter().any(present),
        };
        let mut rows: BTreeSet<PolicyEntry> = BTreeSet::new();
        for policy in &new {
            for row in self.rows_by_policy.get(policy).into_iter().flatten() {
                if needed(row) && !self.rows.contains(row) {
                    rows.insert(*row);
                }
            }
        }
        // Admitted policies' rows on the new prefixes.
        for net in &nets {
            let Some(identity) = self.request.desired.cidrs.get(net) else {
                continue;
            };
            for row in self.rows_by_prefix.get(identity).into_iter().flatten() {
                if self.policies.contains(&row.policy_id) && !self.rows.contains(row) {
                    rows.insert(*row);
                }
            }
        }
        (nets.into_iter().collect(), rows.into_iter().collect())
    }

    /// The first map `nets` and `rows` do not fit, if any.
    fn refusal(&self, nets: &[IpNet], rows: &[PolicyEntry]) -> Option<Refusal> {
        let programmed = self.request.programmed;
        let capacity = self.request.capacity;
        let new_cidrs = nets
            .iter()
            .filter(|net| !programmed.cidrs.contains_key(*net))
            .count();
        let new_rows = rows
            .iter()
            .filter(|row| !programmed.policy.contains(*row))
            .count();
        if self.used_cidrs + new_cidrs > capacity.cidrs {
            return Some(Refusal {
                map: map_names::CIDRS,
                needed: new_cidrs,
                free: capacity.cidrs.saturating_sub(self.used_cidrs),
            });
        }
        if self.used_rows + new_rows > capacity.policy {
            return Some(Refusal {
                map: map_names::POLICY,
                needed: new_rows,
                free: capacity.policy.saturating_sub(self.used_rows),
            });
        }
        None
    }

    fn commit_nets(&mut self, nets: &[IpNet]) {
        for net in nets {
            if self.nets.insert(*net) && !self.request.programmed.cidrs.contains_key(net) {
                self.used_cidrs += 1;
            }
        }
    }

    fn commit(&mut self, policies: &BTreeSet<PolicyId>, nets: &[IpNet], rows: &[PolicyEntry]) {
        self.policies.extend(policies.iter().copied());
        self.commit_nets(nets);
        for row in rows {
            if self.rows.insert(*row) && !self.request.programmed.policy.contains(row) {
                self.used_rows += 1;
            }
        }
    }

    /// Whether the maps already hold every entry of `policies` (adopted after a
    /// restart: those clusters were admitted by the previous run).
    fn fully_programmed(&self, policies: &BTreeSet<PolicyId>) -> bool {
        let programmed = self.request.programmed;
        policies.iter().all(|policy| {
            self.prefixes_of(*policy)
                .all(|net| programmed.cidrs.contains_key(&net))
                && self
                    .rows_by_policy
                    .get(policy)
                    .into_iter()
                    .flatten()
                    .all(|row| programmed.policy.contains(row))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{Direction, EndpointPolicy};

    const TENANT_ROWS: u32 = 3;

    /// A desired state: each tenant `(ns, name, policy id, prefixes)` has one
    /// endpoint (id = policy id) with `TENANT_ROWS` rows on pod identities, a block
    /// row on its first prefix's identity, and one identity per prefix.
    struct Scene {
        tables: Tables,
        tenants: BTreeMap<EndpointId, Tenant>,
        prefixes: HashMap<PolicyId, Vec<IpNet>>,
    }

    fn identity_of(net: &IpNet) -> IdentityId {
        // Distinct per prefix, far from the pod identities below.
        let (bits, len) = match net {
            IpNet::V4(n) => (u32::from(n.network()), n.prefix_len()),
            IpNet::V6(_) => (0, net.prefix_len()),
        };
        100_000 + bits % 1_000_000 + u32::from(len) * 1_000_000
    }

    fn scene(tenants: &[(&str, &str, PolicyId, Vec<&str>)]) -> Scene {
        let mut tables = Tables::default();
        let mut owners = BTreeMap::new();
        let mut prefixes = HashMap::new();
        for (ns, name, policy, nets) in tenants {
            tables.endpoints.insert(
                *policy,
                EndpointPolicy {
                    policy_id: *policy,
                    isolate_ingress: true,
                    isolate_egress: true,
                    audit: false,
                },
            );
            owners.insert(*policy, ((*ns).to_owned(), (*name).to_owned()));
            for peer in 0..TENANT_ROWS {
                tables
                    .policy
                    .insert(PolicyEntry::any(*policy, Direction::Ingress, 1000 + peer));
            }
            let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
            for net in &nets {
                tables.cidrs.insert(*net, identity_of(net));
            }
            if let Some(first) = nets.first() {
                tables.policy.insert(PolicyEntry::any(
                    *policy,
                    Direction::Egress,
                    identity_of(first),
                ));
            }
            prefixes.insert(*policy, nets);
        }
        Scene {
            tables,
            tenants: owners,
            prefixes,
        }
    }

    fn admit_in(
        scene: &Scene,
        programmed: &Tables,
        incumbents: Option<&BTreeSet<Tenant>>,
        capacity: Capacity,
    ) -> Admission {
        let prefixes: HashMap<PolicyId, &[IpNet]> = scene
            .prefixes
            .iter()
            .map(|(p, nets)| (*p, nets.as_slice()))
            .collect();
        admit(&Request {
            desired: &scene.tables,
            programmed,
            tenants: &scene.tenants,
            prefixes: &prefixes,
            incumbents,
            capacity,
        })
    }

    fn excepts(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}/32", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn tenant(ns: &str, name: &str) -> Tenant {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn everything_fits_admits_everyone_and_programs_the_desired_tables() {
        let s = scene(&[
            ("a", "one", 1, vec!["10.0.0.0/8"]),
            ("b", "two", 2, vec!["192.168.0.0/16"]),
        ]);
        let a = admit_in(
            &s,
            &Tables::default(),
            None,
            Capacity {
                cidrs: 2,
                policy: 8,
            },
        );
        assert_eq!(a.admitted.len(), 2);
        assert!(a.held.is_empty() && a.held_endpoints.is_empty());
        assert_eq!(a.tables, None);
    }

    #[test]
    fn an_oversized_newcomer_is_held_with_the_numbers_and_the_incumbent_keeps_its_entries() {
        let small = ("ns", "small", 1, vec!["192.168.0.0/16"]);
        let s = scene(std::slice::from_ref(&small));
        let capacity = Capacity {
            cidrs: 64,
            policy: 64,
        };
        // The incumbent is programmed.
        let first = admit_in(&s, &Tables::default(), None, capacity);
        assert_eq!(first.admitted, BTreeSet::from([tenant("ns", "small")]));
        let programmed = s.tables.clone();

        let big_nets = excepts(100);
        let mut big_prefixes: Vec<&str> = vec!["10.0.0.0/8"];
        big_prefixes.extend(big_nets.iter().map(String::as_str));
        let s = scene(&[small, ("ns", "big", 2, big_prefixes)]);
        let a = admit_in(&s, &programmed, Some(&first.admitted), capacity);
        assert_eq!(a.admitted, BTreeSet::from([tenant("ns", "small")]));
        assert_eq!(
            a.held.get(&tenant("ns", "big")),
            Some(&Refusal {
                map: map_names::CIDRS,
                needed: 101,
                free: 63,
            })
        );
        assert_eq!(
            a.held.get(&tenant("ns", "big")).map(Refusal::describe),
            Some("needs 101 entries in map RF_CIDR_V1, 63 free".to_owned())
        );
        assert_eq!(a.held_endpoints, BTreeSet::from([2]));
        let tables = a.tables.expect("filtered tables");
        assert_eq!(
            tables.cidrs, programmed.cidrs,
            "only the incumbent's prefix"
        );
        assert_eq!(
            tables.policy, programmed.policy,
            "only the incumbent's rows"
        );
        assert_eq!(tables.endpoints.len(), 2, "the held pod keeps its endpoint");
    }

    #[test]
    fn an_incumbent_is_never_evicted_by_a_newcomer_earlier_in_name_order() {
        // "a" sorts first but arrives second: it is refused, "z" keeps its place.
        let z = (
            "ns",
            "z",
            1,
            vec!["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"],
        );
        let s = scene(std::slice::from_ref(&z));
        let capacity = Capacity {
            cidrs: 4,
            policy: 64,
        };
        let first = admit_in(&s, &Tables::default(), None, capacity);
        let s = scene(&[z, ("ns", "a", 2, vec!["172.16.0.0/16", "172.17.0.0/16"])]);
        let a = admit_in(
            &s,
            &s_tables_of(&first, &s),
            Some(&first.admitted),
            capacity,
        );
        assert_eq!(a.admitted, BTreeSet::from([tenant("ns", "z")]));
        assert_eq!(
            a.held.get(&tenant("ns", "a")).map(|r| (r.needed, r.free)),
            Some((2, 1))
        );
        // Without history the order is by name: "a" then "z" (the same numbers
        // would then refuse "z"). Deterministic either way.
        let fresh = admit_in(&s, &Tables::default(), Some(&BTreeSet::new()), capacity);
        assert_eq!(fresh.admitted, BTreeSet::from([tenant("ns", "a")]));
    }

    /// What the maps hold after `admission` of `scene` was applied (tests only: the
    /// incumbent's own entries).
    fn s_tables_of(admission: &Admission, scene: &Scene) -> Tables {
        let mut tables = scene.tables.clone();
        let keep: BTreeSet<EndpointId> = scene
            .tenants
            .iter()
            .filter(|(_, t)| admission.admitted.contains(*t))
            .map(|(e, _)| *e)
            .collect();
        let prefixes: BTreeSet<IpNet> = keep
            .iter()
            .flat_map(|p| scene.prefixes[p].iter().copied())
            .collect();
        tables.cidrs.retain(|net, _| prefixes.contains(net));
        tables.policy.retain(|row| keep.contains(&row.policy_id));
        tables
    }

    #[test]
    fn an_incumbent_that_grows_past_the_room_is_held_and_the_others_stay() {
        let capacity = Capacity {
            cidrs: 8,
            policy: 64,
        };
        let one = ("ns", "one", 1, vec!["10.0.0.0/8"]);
        let two = ("ns", "two", 2, vec!["192.168.0.0/16"]);
        let s = scene(&[one.clone(), two.clone()]);
        let first = admit_in(&s, &Tables::default(), None, capacity);
        assert_eq!(first.admitted.len(), 2);
        let programmed = s.tables.clone();
        // "one" grows by ten excepts: seven are free.
        let nets = excepts(10);
        let mut grown: Vec<&str> = vec!["10.0.0.0/8"];
        grown.extend(nets.iter().map(String::as_str));
        let s = scene(&[("ns", "one", 1, grown), two]);
        let a = admit_in(&s, &programmed, Some(&first.admitted), capacity);
        assert_eq!(a.admitted, BTreeSet::from([tenant("ns", "two")]));
        let refusal = &a.held[&tenant("ns", "one")];
        assert_eq!((refusal.needed, refusal.free), (10, 6));
        // Held: none of its prefixes or rows are programmed, "two"'s all are.
        let tables = a.tables.expect("filtered");
        assert_eq!(
            tables.cidrs.keys().copied().collect::<Vec<_>>(),
            vec!["192.168.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(tables.policy.iter().all(|row| row.policy_id == 2));
        assert_eq!(
            tables.policy.len(),
            s.tables.policy.iter().filter(|r| r.policy_id == 2).count()
        );

        // Once its stale entries are gone it is a newcomer again; shrunk, it fits.
        let s = scene(&[one, ("ns", "two", 2, vec!["192.168.0.0/16"])]);
        let b = admit_in(&s, &tables, Some(&a.admitted), capacity);
        assert_eq!(b.admitted.len(), 2);
        assert!(b.held.is_empty());
    }

    #[test]
    fn rows_other_policies_get_for_a_prefix_are_charged_to_the_cluster_that_names_it() {
        // "wide" allows 10.0.0.0/8; "big" names /32s inside it: every /32 is a prefix
        // identity "wide" gets a row for. Those rows are "big"'s cost.
        let capacity = Capacity {
            cidrs: 64,
            policy: 16,
        };
        let nets = excepts(10);
        let mut big: Vec<&str> = vec!["10.0.0.0/8"];
        big.extend(nets.iter().map(String::as_str));
        let mut s = scene(&[("a", "wide", 1, vec!["10.0.0.0/8"]), ("b", "big", 2, big)]);
        for net in &nets {
            let net: IpNet = net.parse().unwrap();
            s.tables
                .policy
                .insert(PolicyEntry::any(1, Direction::Egress, identity_of(&net)));
        }
        let incumbents = BTreeSet::from([tenant("a", "wide")]);
        let a = admit_in(&s, &Tables::default(), Some(&incumbents), capacity);
        assert_eq!(a.admitted, incumbents);
        let refusal = &a.held[&tenant("b", "big")];
        assert_eq!(refusal.map, map_names::POLICY);
        // Its own 4 rows (3 pod rows + its block row) and wide's 10.
        assert_eq!((refusal.needed, refusal.free), (14, 12));
        let tables = a.tables.expect("filtered");
        assert!(
            tables.policy.iter().all(|row| row.policy_id == 1
                && !nets
                    .iter()
                    .any(|n| identity_of(&n.parse().unwrap()) == row.identity)),
            "wide keeps only its rows on what is programmed"
        );
        assert_eq!(tables.cidrs.len(), 1, "the shared /8 stays");
    }

    #[test]
    fn the_peak_counts_what_the_maps_still_hold() {
        // Replacing every prefix at once needs old and new side by side.
        let capacity = Capacity {
            cidrs: 3,
            policy: 64,
        };
        let s = scene(&[("ns", "one", 1, vec!["10.1.0.0/16", "10.2.0.0/16"])]);
        let first = admit_in(&s, &Tables::default(), None, capacity);
        let programmed = s.tables.clone();
        let s = scene(&[("ns", "one", 1, vec!["10.3.0.0/16", "10.4.0.0/16"])]);
        let a = admit_in(&s, &programmed, Some(&first.admitted), capacity);
        assert_eq!(a.held[&tenant("ns", "one")].free, 1);
        // After the held apply removed the old ones, it fits.
        let held = a.tables.expect("filtered");
        let b = admit_in(&s, &held, Some(&a.admitted), capacity);
        assert!(b.held.is_empty(), "{b:?}");
        // And the fast check agrees with the same numbers.
        assert!(!diff_fits(
            &programmed,
            &programmed.diff(&s.tables),
            capacity
        ));
        assert!(diff_fits(&held, &held.diff(&s.tables), capacity));
    }

    #[test]
    fn pods_of_no_raycluster_are_always_admitted_first() {
        let capacity = Capacity {
            cidrs: 1,
            policy: 64,
        };
        let mut s = scene(&[
            ("ns", "rc", 1, vec!["10.0.0.0/8"]),
            ("ns", "netpol-only", 2, vec!["172.16.0.0/12"]),
        ]);
        s.tenants.remove(&2);
        let a = admit_in(&s, &Tables::default(), None, capacity);
        assert_eq!(a.admitted, BTreeSet::new());
        assert!(a.held.contains_key(&tenant("ns", "rc")));
        let tables = a.tables.expect("filtered");
        assert!(tables.cidrs.contains_key(&"172.16.0.0/12".parse().unwrap()));
    }

    #[test]
    fn after_a_restart_the_clusters_the_maps_hold_go_first() {
        let capacity = Capacity {
            cidrs: 2,
            policy: 64,
        };
        let s = scene(&[("ns", "z", 1, vec!["10.1.0.0/16", "10.2.0.0/16"])]);
        let programmed = s.tables.clone();
        let s = scene(&[
            ("ns", "a", 2, vec!["10.3.0.0/16"]),
            ("ns", "z", 1, vec!["10.1.0.0/16", "10.2.0.0/16"]),
        ]);
        let a = admit_in(&s, &programmed, None, capacity);
        assert_eq!(a.admitted, BTreeSet::from([tenant("ns", "z")]));
        assert!(a.held.contains_key(&tenant("ns", "a")));
    }

    /// With the real engine: leaving a held cluster's prefixes and rows out gives
    /// every admitted pod exactly the verdicts the full tables give it.
    #[test]
    fn holding_a_cluster_changes_no_verdict_of_an_admitted_one() {
        use crate::policy::{Engine, Settings};
        use crate::tables::protocol;
        use serde_json::json;

        let mut engine = Engine::new(Settings::new(
            "node-a",
            vec!["192.168.0.10".parse().unwrap()],
        ));
        let pod = |name: &str, cluster: &str, ip: &str| {
            serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(json!({
                "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"),
                    "labels": {"ray.io/cluster": cluster, "ray.io/node-type": "head",
                               "ray.io/group": "headgroup"}},
                "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}))
            .unwrap()
        };
        let cluster = |name: &str, policy: serde_json::Value| {
            serde_json::from_value::<crate::crd::RayCluster>(json!({
                "apiVersion": "ray.io/v1", "kind": "RayCluster",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"networkPolicy": policy}}))
            .unwrap()
        };
        let nets = excepts(40);
        let mut big_except: Vec<String> =
            nets.iter().map(|n| n.replace("10.0.", "10.2.")).collect();
        big_except.push("10.1.2.0/24".into());
        engine.upsert_pod(&pod("wide-head", "wide", "10.244.0.11"));
        engine.upsert_pod(&pod("big-head", "big", "10.244.0.12"));
        engine.upsert_raycluster(&cluster("wide", json!({"mode": "DenyAll", "head": {
            "egressRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}],
            "ingressRules": [{"from": [{"ipBlock": {"cidr": "10.2.0.0/16"}}]}]}})));
        engine.upsert_raycluster(&cluster("big", json!({"mode": "DenyAll", "head": {
            "egressRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": big_except}}]}],
            "ingressRules": [{"from": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.3.0/24"]}}]}]}})));
        let desired = engine.tables().clone();
        let tenants: BTreeMap<EndpointId, Tenant> = engine
            .endpoints()
            .map(|m| (m.id, (m.namespace, m.cluster.unwrap())))
            .collect();
        let prefixes: HashMap<PolicyId, &[IpNet]> = engine.policy_prefixes().collect();
        let admission = admit(&Request {
            desired: &desired,
            programmed: &Tables::default(),
            tenants: &tenants,
            prefixes: &prefixes,
            incumbents: Some(&BTreeSet::from([tenant("ns", "wide")])),
            capacity: Capacity {
                cidrs: 10,
                policy: 1000,
            },
        });
        assert_eq!(admission.admitted, BTreeSet::from([tenant("ns", "wide")]));
        assert!(admission.held.contains_key(&tenant("ns", "big")));
        let reduced = admission.tables.expect("filtered");
        assert!(reduced.cidrs.len() <= 10 && reduced.cidrs.len() < desired.cidrs.len());
        let wide = engine.endpoint_id("ns", "wide-head").unwrap();
        let big = engine.endpoint_id("ns", "big-head").unwrap();
        let big_policy = desired.endpoints[&big].policy_id;
        assert!(reduced.policy.iter().all(|r| r.policy_id != big_policy));
        // Inside big's excepts and next to them, inside wide's except and big's
        // /24 in it, elsewhere in 10/8, outside it.
        let peers = [
            "10.2.0.0",
            "10.2.0.39",
            "10.2.0.40",
            "10.2.7.1",
            "10.1.2.3",
            "10.1.3.4",
            "10.1.0.1",
            "10.3.0.1",
            "10.244.0.12",
            "11.0.0.1",
        ];
        let mut verdicts = BTreeSet::new();
        for peer in peers {
            let peer: std::net::IpAddr = peer.parse().unwrap();
            for direction in [Direction::Ingress, Direction::Egress] {
                let full = desired.allows(wide, direction, peer, protocol::TCP, 80);
                assert_eq!(
                    reduced.allows(wide, direction, peer, protocol::TCP, 80),
                    full,
                    "{direction:?} {peer}"
                );
                verdicts.insert(full);
            }
        }
        assert_eq!(verdicts.len(), 2, "both verdicts are exercised");
    }
}
