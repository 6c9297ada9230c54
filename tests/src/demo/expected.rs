//! The expected verdicts, written BY HAND from the contract, docs/semantics.md (never
//! computed by the policy engine: the demo checks the engine, it must not trust it).
//!
//! `A` allowed, `D` dropped, `-` not probed (a pod to itself, or through a
//! ClusterIP, NodePort or hostPort back to itself: hairpin traffic never leaves the
//! pod's veth the way the demo's flows do; and the external client to ClusterIPs,
//! which only exist inside the cluster). Columns are [`super::scenario::TARGETS`], rows are
//! [`super::scenario::sources`]; `table()` checks both shapes.
//!
//! The two clusters (section 1): `alpha` (team-a) is `spec.networkPolicy`
//! `DenyAll`, so ingress AND egress of its pods are isolated, with two user ingress
//! rules for the head: TCP 8080 from pods labelled `app=prometheus` in namespace
//! `monitoring` (one peer: both selectors must match, section 4), and TCP 8265 from
//! the external client's addresses (two ipBlocks). `beta` (team-b)
//! is `spec.networkIsolation` `DenyAllIngress`: only ingress is isolated, egress is
//! free. A flow is allowed when the sender's egress AND the receiver's ingress allow
//! it; pods of no isolated RayCluster are left alone (section 1, last points).
//!
//! Why each row is what it is. Section numbers name the parts of docs/semantics.md
//! in order: 1 "Inputs", 2 "Which pods are isolated", 3 "What an isolated pod may
//! do" (with its numbered items), 4 "Rule semantics", 5 "Where the decision is
//! made", 5a "What counts as the node":
//! - `node`: traffic from the node a pod runs on is always allowed (3, ingress 2),
//!   to every Ray pod, through ClusterIPs too; nothing restricts the node itself.
//! - `coredns`, `outsider`, `grafana`: not in any RayCluster, so no ingress item
//!   lets them into alpha or beta (3: "everything else ... is dropped"); their own
//!   traffic to non-Ray pods and the node is untouched. `grafana` is in
//!   `monitoring` but lacks `app=prometheus`: the rule's peer is namespace AND pod
//!   selector (4), so it gets nothing.
//! - `operator`: labels and namespace (`ray-system`, a default) match the KubeRay
//!   operator, so it reaches each head's dashboard (8265) and client (10001) ports
//!   (3, head 4), also through the head Service's ClusterIP (5: decided on the
//!   backend); not GCS 6379, not metrics 8080, not the workers.
//! - `impostor`: the operator's labels in namespace `other`: "A pod elsewhere that
//!   copies the labels gets nothing" (3, head 4).
//! - `prometheus`: alpha's head rule allows exactly TCP 8080 on alpha's head (3,
//!   ingress 3); not the worker (the rule is the head's), nothing on beta.
//! - `a-head`, `a-worker` (DenyAll): to their own cluster on every port (3, egress 1
//!   and ingress 1), svc-a lands on alpha's head so it is intra-cluster (5); DNS via
//!   the kube-dns ClusterIP and to its endpoint pod, UDP and TCP 53 (3, egress 3);
//!   the node (3, egress 2); nothing else: not the outsider, not beta (egress is
//!   isolated, and beta's ingress would refuse anyway).
//! - `b-head`, `b-worker` (DenyAllIngress): egress is not isolated, so DNS, the
//!   outsider and the node are fine; alpha refuses them (alpha's ingress 1-3 do not
//!   cover another cluster); within beta every port (3, ingress 1), svc-b too (5).
//!
//! What counts as the node (section 5a), the last four columns and two rows:
//! - `np-a` (alpha's head Service as `type: NodePort`, externalTrafficPolicy
//!   Cluster, on the node's IPv4 address): kube-proxy DNATs to alpha's head and
//!   masquerades to the node's address, but the head judges the original source.
//!   So exactly who may reach the head's dashboard (8265) and client port (10001)
//!   directly may reach them this way: the node's own processes, the operator,
//!   alpha's worker, and the external client on 8265 only (its ipBlock); a pod of
//!   no cluster, beta or the hostNetwork pod may not. To itself: not probed.
//! - `hostport` (the outsider's hostPort 18080 -> 8080, the portmap plugin's DNAT on
//!   every node address): egress to it is decided by the backend, the outsider, as
//!   for a ClusterIP: alpha's egress-isolated pods may not; everyone else may (the
//!   outsider is not isolated).
//! - `hostnet` (a hostNetwork pod's port 9100 on the node's address): it is not
//!   the node, so alpha's egress-isolated pods may not reach it (no rule selects
//!   it); everyone else may (nothing isolates it).
//! - row `hostnet` (`monitoring/node-exporter`, hostNetwork, `app=node-exporter`):
//!   not the node, and not `app=prometheus`: alpha and beta refuse it like any pod
//!   of no cluster, also through ClusterIPs and the NodePort; the rest is open.
//! - row `external` (a client outside the cluster, 10.1.0.200 / fd00:10:1::c8): an
//!   ordinary address; alpha's head lets it reach 8265 (its ipBlock) directly and
//!   through the NodePort (the original source), nothing else of alpha or beta;
//!   non-Ray pods, the node, the hostPort and the hostNetwork pod are open.

use anyhow::{Result, bail};

use super::scenario::{TARGETS, sources};

/// What a cell should show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Dropped,
    NotProbed,
}

/// Hand-written, one line per source. Columns:
///
/// ```text
///  1 a-head:6379   2 a-head:8265   3 a-head:10001  4 a-head:8080   5 a-worker:8080
///  6 b-head:6379   7 b-head:8265   8 b-head:10001  9 b-head:8080  10 b-worker:8080
/// 11 svc-a:8265   12 svc-b:8265   13 kube-dns:udp53 14 kube-dns:tcp53
/// 15 coredns:udp53 (the DNS pod itself) 16 outsider:8080  17 node:10250
/// 18 np-a:30265 (-> a-head:8265)  19 np-a:30001 (-> a-head:10001)
/// 20 hostport:18080 (-> outsider:8080)  21 hostnet:9100 (the hostNetwork pod)
/// ```
#[rustfmt::skip]
const TABLE: &[(&str, &str)] = &[
    //               a-head   a-wk b-head   b-wk svc   dns   cd  out node  np-a  hp hn
    //               1 2 3 4  5    6 7 8 9  10   11 12 13 14 15  16  17    18 19 20 21
    ("node",        "A A A A  A    A A A A  A    A  A  A  A  A   A   -     A  A  A  A"),
    ("coredns",     "D D D D  D    D D D D  D    D  D  -  -  -   A   A     D  D  A  A"),
    ("operator",    "D A A D  D    D A A D  D    A  A  A  A  A   A   A     A  A  A  A"),
    ("impostor",    "D D D D  D    D D D D  D    D  D  A  A  A   A   A     D  D  A  A"),
    ("outsider",    "D D D D  D    D D D D  D    D  D  A  A  A   -   A     D  D  -  A"),
    ("prometheus",  "D D D A  D    D D D D  D    D  D  A  A  A   A   A     D  D  A  A"),
    ("grafana",     "D D D D  D    D D D D  D    D  D  A  A  A   A   A     D  D  A  A"),
    ("a-head",      "- - - -  A    D D D D  D    -  D  A  A  A   D   A     -  -  D  D"),
    ("a-worker",    "A A A A  -    D D D D  D    A  D  A  A  A   D   A     A  A  D  D"),
    ("b-head",      "D D D D  D    - - - -  A    D  -  A  A  A   A   A     D  D  A  A"),
    ("b-worker",    "D D D D  D    A A A A  -    D  A  A  A  A   A   A     D  D  A  A"),
    ("hostnet",     "D D D D  D    D D D D  D    D  D  A  A  A   A   A     D  D  A  -"),
    ("external",    "D A D D  D    D D D D  D    -  -  -  -  A   A   A     A  D  A  A"),
];

/// The table as (source, one [`Expect`] per target), checked against the
/// scenario's rows and columns.
pub fn table() -> Result<Vec<(&'static str, Vec<Expect>)>> {
    let rows = sources();
    if rows.len() != TABLE.len() {
        bail!(
            "expected table has {} rows, the scenario {} sources",
            TABLE.len(),
            rows.len()
        );
    }
    let mut out = Vec::new();
    for ((source, line), want) in TABLE.iter().zip(rows) {
        if *source != want {
            bail!("expected table row {source:?} where the scenario has {want:?}");
        }
        let cells = line
            .split_whitespace()
            .map(|c| match c {
                "A" => Ok(Expect::Allowed),
                "D" => Ok(Expect::Dropped),
                "-" => Ok(Expect::NotProbed),
                other => bail!("row {source}: bad cell {other:?}"),
            })
            .collect::<Result<Vec<_>>>()?;
        if cells.len() != TARGETS.len() {
            bail!(
                "row {source}: {} cells for {} targets",
                cells.len(),
                TARGETS.len()
            );
        }
        out.push((*source, cells));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_matches_the_scenario_shape() {
        super::table().expect("well-formed table");
    }
}
