//! Which of one policy's rules can select a peer identity. Rows for an identity then
//! cost the rules that can match it, not every rule of the policy: a RayCluster with
//! 10,000 rules otherwise compiled in time growing with rules × peer identities.
//!
//! A pod peer is found under its required pod label together with its namespace's
//! name or required label (either alone where it has only one), an ipBlock under its
//! cidr, found from a prefix through its supernets.
//!
//! Must not: decide a match (`rows` does, exactly). It may return a rule that does not
//! select the peer; it must never leave out one that does.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;

use super::identities::PodIdentity;
use super::spec::{PolicySpec, RulePos};
use crate::policy::rule::{NamespaceMatch, Peer};
use crate::policy::selector::{Labels, Selector};

/// What a pod peer requires, as precisely as one lookup can say it: a required pod
/// label together with the namespace's name or required label where the peer has
/// both (5,000 rules that all select `ray.io/group: cpu`, each in its own namespace,
/// are then not all looked at for every `cpu` identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RuleKey {
    Pod(String, String),
    PodInNamespace(String, String, String),
    PodInLabelled(String, String, String, String),
    Namespace(String),
    Labelled(String, String),
}

/// Policies with at most this many rules are not indexed: looking at each rule costs
/// less than building the keys to look them up (most policies have a handful).
const SCANNED_RULES: usize = 16;

#[derive(Debug, Default)]
pub(super) struct RuleIndex {
    /// Set when the policy is small enough to look at every rule: how many it has.
    scan_all: Option<RulePos>,
    /// Rules with a pod peer found under this key.
    by_key: HashMap<RuleKey, Vec<RulePos>>,
    /// Rules with an ipBlock peer, by the block's cidr.
    by_block: HashMap<IpNet, Vec<RulePos>>,
    /// The block prefix lengths present, by family (is IPv6): the supernets to look up.
    block_lens: BTreeSet<(bool, u8)>,
    /// Rules looked at for every pod identity: pod peers with nothing to key them by,
    /// and Service-backend peers (few per policy: DNS, the operator).
    every_pod: Vec<RulePos>,
}

impl RuleIndex {
    pub(super) fn new(spec: &PolicySpec) -> Self {
        let mut index = RuleIndex::default();
        let count = spec.ingress.len() + spec.egress.len();
        if count <= SCANNED_RULES {
            index.scan_all = RulePos::try_from(count).ok();
            return index;
        }
        for (pos, (_, rule)) in (0..).zip(spec.rules()) {
            for peer in &rule.peers {
                match peer {
                    Peer::Pods { namespaces, pods } => index.pod_peer(namespaces, pods, pos),
                    Peer::Block(block) => {
                        let cidr = block.cidr.trunc();
                        index
                            .block_lens
                            .insert((cidr.addr().is_ipv6(), cidr.prefix_len()));
                        index.by_block.entry(cidr).or_default().push(pos);
                    }
                    Peer::ServiceBackends { .. } => index.every_pod.push(pos),
                }
            }
        }
        index
    }

    fn pod_peer(&mut self, namespaces: &NamespaceMatch, pods: &Selector, pos: RulePos) {
        let pod = pods
            .required_pair()
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let mut key = |key: RuleKey| self.by_key.entry(key).or_default().push(pos);
        match (pod, namespaces) {
            (Some((k, v)), NamespaceMatch::Names(names)) => {
                for name in names {
                    key(RuleKey::PodInNamespace(k.clone(), v.clone(), name.clone()));
                }
            }
            (Some((k, v)), NamespaceMatch::Selector(s)) => match s.required_pair() {
                Some((nk, nv)) => key(RuleKey::PodInLabelled(k, v, nk.into(), nv.into())),
                None => key(RuleKey::Pod(k, v)),
            },
            (None, NamespaceMatch::Names(names)) => {
                for name in names {
                    key(RuleKey::Namespace(name.clone()));
                }
            }
            (None, NamespaceMatch::Selector(s)) => match s.required_pair() {
                Some((nk, nv)) => key(RuleKey::Labelled(nk.into(), nv.into())),
                None => self.every_pod.push(pos),
            },
        }
    }

    /// Rules that may select a pod identity whose namespace has `ns_labels`, in order.
    pub(super) fn for_pod(&self, identity: &PodIdentity, ns_labels: &Labels) -> Vec<RulePos> {
        if let Some(count) = self.scan_all {
            return (0..count).collect();
        }
        let mut out = self.every_pod.clone();
        let mut add = |key: RuleKey| out.extend(self.by_key.get(&key).into_iter().flatten());
        let ns = &identity.key.namespace;
        for (k, v) in &identity.key.labels {
            add(RuleKey::Pod(k.clone(), v.clone()));
            add(RuleKey::PodInNamespace(k.clone(), v.clone(), ns.clone()));
            for (nk, nv) in ns_labels {
                add(RuleKey::PodInLabelled(
                    k.clone(),
                    v.clone(),
                    nk.clone(),
                    nv.clone(),
                ));
            }
        }
        for (nk, nv) in ns_labels {
            add(RuleKey::Labelled(nk.clone(), nv.clone()));
        }
        add(RuleKey::Namespace(ns.clone()));
        out.sort_unstable();
        out.dedup();
        out
    }
    /// Rules with an ipBlock whose cidr contains `net`, in order.
    pub(super) fn for_prefix(&self, net: &IpNet) -> Vec<RulePos> {
        if let Some(count) = self.scan_all {
            return (0..count).collect();
        }
        let v6 = net.addr().is_ipv6();
        let mut out: Vec<RulePos> = self
            .block_lens
            .range((v6, 0)..=(v6, net.prefix_len()))
            .filter_map(|&(_, len)| IpNet::new(net.addr(), len).ok())
            .flat_map(|supernet| self.by_block.get(&supernet.trunc()).into_iter().flatten())
            .copied()
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use serde_json::json;

    use super::super::Engine;
    use super::super::rows::RulePeer;
    use crate::crd::RayCluster;
    use crate::policy::Settings;

    /// Every shape of peer, more rules than are scanned, so the index is used.
    const RULES: &str = r#"
      - from: [{podSelector: {matchLabels: {app: web}}}]
      - from: [{podSelector: {matchLabels: {app: db}}, namespaceSelector: {matchLabels: {team: b}}}]
        ports: [{port: 5432}]
      - from: [{namespaceSelector: {matchLabels: {tier: prod}}}]
      - from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: app, operator: Exists}]}}]
      - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}}]
        ports: [{port: 8265}]
      - from: [{podSelector: {matchLabels: {ray.io/group: cpu}}, namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ns-c}}}]
      - from: [{podSelector: {}}]
        ports: [{port: 6379}]
      - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.0/24]}}]
      - from: [{ipBlock: {cidr: 10.1.2.0/24}}]
        ports: [{port: 22}]
      - from: [{ipBlock: {cidr: 0.0.0.0/0}}]
        ports: [{port: 443}]
      - from: [{ipBlock: {cidr: '2001:db8::/32', except: ['2001:db8:1::/48']}}]
      - from: [{ipBlock: {cidr: 10.2.0.0/16}}, {podSelector: {matchLabels: {app: db}}}]
      - from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {tier: x}}}]
      - from: [{podSelector: {matchLabels: {app: web}}, namespaceSelector: {matchLabels: {tier: prod}}}]
      - from: [{ipBlock: {cidr: 10.2.3.128/25}}]
      - from: [{podSelector: {matchLabels: {app: nothing}}}]
      - from: [{namespaceSelector: {matchLabels: {team: c}}}]
        ports: [{port: 9000, endPort: 9010}]
      - ports: [{port: 53, protocol: UDP}]
    "#;

    fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("ns")
    }

    fn pod(ns: &str, name: &str, ip: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}-{name}"), "labels": labels},
            "spec": {"nodeName": "node-0", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .expect("pod")
    }

    #[test]
    fn the_index_never_leaves_out_a_rule_that_selects_the_peer() {
        let mut engine = Engine::new(Settings::new(
            "node-0",
            vec!["192.168.0.1".parse().expect("ip")],
        ));
        engine.upsert_namespace(&namespace("ns-a", json!({"team": "a", "tier": "prod"})));
        engine.upsert_namespace(&namespace("ns-b", json!({"team": "b"})));
        engine.upsert_namespace(&namespace("ns-c", json!({"team": "c"})));
        let labels = [
            json!({"app": "web"}),
            json!({"app": "db", "tier": "x"}),
            json!({"ray.io/group": "cpu"}),
            json!({}),
        ];
        let mut n = 10;
        for ns in ["ns-a", "ns-b", "ns-c", "ns-d"] {
            for l in &labels {
                n += 1;
                engine.upsert_pod(&pod(
                    ns,
                    &format!("p{n}"),
                    &format!("10.2.3.{n}"),
                    l.clone(),
                ));
            }
        }
        engine.upsert_pod(&pod(
            "ns-a",
            "rc-head",
            "10.9.0.1",
            json!({"ray.io/cluster": "rc", "ray.io/node-type": "head"}),
        ));
        let yaml = format!(
            "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {{name: rc, namespace: ns-a}}\n\
             spec:\n  networkPolicy:\n    mode: DenyAll\n    head:\n      ingressRules:{RULES}"
        );
        let cluster: RayCluster = serde_norway::from_str(&yaml).expect("cluster");
        engine.upsert_raycluster(&cluster);
        engine.take_diff();

        assert!(
            engine
                .policies
                .iter()
                .any(|(_, p)| p.rule_index().scan_all.is_none()),
            "the head's policy is indexed, not scanned"
        );
        let mut checked = 0;
        for (_, state) in engine.policies.iter() {
            let peers = engine
                .identities
                .pod_ids()
                .chain(engine.identities.prefix_ids());
            for peer in peers {
                let Some(rule_peer) = engine.rule_peer(peer) else {
                    continue;
                };
                let found = match &rule_peer {
                    RulePeer::Pod(identity) => state
                        .rule_index()
                        .for_pod(identity, &engine.ns_labels(&identity.key.namespace)),
                    RulePeer::Prefix(net) => state.rule_index().for_prefix(net),
                };
                for (pos, (_, rule)) in (0..).zip(state.spec().rules()) {
                    if engine.rule_selects(rule, &rule_peer) {
                        checked += 1;
                        assert!(
                            found.contains(&pos),
                            "rule {pos} ({}) selects identity {peer}",
                            rule.field
                        );
                    }
                }
            }
        }
        assert!(
            checked > 40,
            "the world exercises the index: {checked} selections"
        );
    }
}
