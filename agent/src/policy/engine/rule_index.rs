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
use super::local::PolicySpec;
use crate::policy::rule::{NamespaceMatch, Peer};
use crate::policy::selector::{Labels, Selector};

/// A rule's position in [`PolicySpec::rules`] (ingress first, then egress).
pub(super) type RulePos = u32;

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

#[derive(Debug, Default)]
pub(super) struct RuleIndex {
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
