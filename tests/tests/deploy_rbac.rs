//! The ClusterRole grants what the agent's API source needs and nothing more.
//!
//! Checked against the code's own list of watched kinds
//! (`rayfence::source::ObjectKind::ALL`, whose exhaustive match below makes a new
//! kind fail to compile until its rule is decided): the source runs one watcher
//! (list + watch) per kind, cluster-wide, NetworkPolicies only with
//! --enforce-networkpolicies; its Event reporter gets the object a problem is
//! about and creates an events.k8s.io/v1 Event.
//!
//! Not yet: running `rayfence agent` against tests/src/fake_api and comparing
//! `server.requests()` with the rules, which needs the API source wired into the
//! binary (branch `kube` + the runtime's main.rs).
mod deploy_common;

use std::collections::BTreeSet;

use anyhow::Result;
use deploy_common::*;
use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use rayfence::crd::RayCluster;
use rayfence::source::ObjectKind;

type Triple = (String, String, String);

fn triples<K: Resource>(verbs: &[&str]) -> Vec<Triple> {
    verbs
        .iter()
        .map(|v| {
            (
                K::GROUP.to_owned(),
                K::URL_PATH_SEGMENT.to_owned(),
                (*v).to_owned(),
            )
        })
        .collect()
}

/// What the agent does against the API server, from the kinds it knows.
fn needed(enforce_networkpolicies: bool) -> BTreeSet<Triple> {
    // A watcher lists then watches; the Event reporter gets the object first.
    const READ: &[&str] = &["get", "list", "watch"];
    let mut out = BTreeSet::new();
    for kind in ObjectKind::ALL {
        let rules = match kind {
            ObjectKind::RayCluster => triples::<RayCluster>(READ),
            ObjectKind::Pod => triples::<Pod>(READ),
            ObjectKind::Namespace => triples::<Namespace>(READ),
            ObjectKind::Service => triples::<Service>(READ),
            ObjectKind::EndpointSlice => triples::<EndpointSlice>(READ),
            ObjectKind::NetworkPolicy if enforce_networkpolicies => triples::<NetworkPolicy>(READ),
            ObjectKind::NetworkPolicy => Vec::new(),
            // Only this node (fieldSelector metadata.name), but RBAC cannot narrow
            // a list/watch to a name not known when the role is written.
            ObjectKind::Node => triples::<Node>(READ),
        };
        out.extend(rules);
    }
    out.extend(triples::<Event>(&["create"]));
    out
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_does() -> Result<()> {
    for (dir, enforce) in [
        ("deploy/base", false),
        ("deploy/overlays/audit", false),
        ("deploy/overlays/k3s-flannel", false),
        ("deploy/overlays/networkpolicies", true),
    ] {
        let docs = kustomize(dir)?;
        let env = agent_environment(&docs, find(&docs, "DaemonSet", "rayfence-agent"));
        assert_eq!(
            env["RAYFENCE_ENFORCE_NETWORKPOLICIES"],
            enforce.to_string(),
            "{dir}"
        );
        let granted = rule_triples(find(&docs, "ClusterRole", "rayfence-agent"));
        let needed = needed(enforce);
        let missing: Vec<_> = needed.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&needed).collect();
        assert!(missing.is_empty(), "{dir}: the agent needs {missing:?}");
        assert!(extra.is_empty(), "{dir}: granted but never used {extra:?}");
    }
    Ok(())
}

#[test]
fn the_role_is_bound_to_the_agents_service_account_only() -> Result<()> {
    let docs = kustomize("deploy/base")?;
    let binding = find(&docs, "ClusterRoleBinding", "rayfence-agent");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "rayfence-agent");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{
            "kind": "ServiceAccount",
            "name": "rayfence-agent",
            "namespace": "rayfence-system"
        }])
    );
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "rayfence-agent"
    );
    // Nothing else in deploy/ may carry API permissions.
    for dir in KUSTOMIZATIONS {
        for doc in kustomize(dir)? {
            let kind = doc["kind"].as_str().unwrap_or_default();
            assert!(
                !matches!(kind, "Role" | "RoleBinding")
                    && (!kind.starts_with("Cluster")
                        || doc["metadata"]["name"] == "rayfence-agent"),
                "{dir}: unexpected {kind} {}",
                doc["metadata"]["name"]
            );
        }
    }
    Ok(())
}
