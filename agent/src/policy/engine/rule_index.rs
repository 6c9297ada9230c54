//! Which of one policy's rules can select a peer identity. Rows for an identity then
//! cost the rules that can match it, not every rule of the policy: a RayCluster with
//! 10,000 rules otherwise compiled in time growing with rules × peer identities.
//!
//! Keys are those of the engine-wide `index` (a pod peer's required pod label, else its
//! namespace names or required namespace label), plus each ipBlock's cidr, found from a
//! prefix through its supernets.
//!
//! Must not: decide a match (`rows` does, exactly). It may return a rule that does not
//! select the peer; it must never leave out one that does.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;

use super::identities::PodIdentity;
use super::index::IndexKey;
use super::local::PolicySpec;
use crate::policy::rule::{NamespaceMatch, Peer};
use crate::policy::selector::Labels;

/// A rule's position in [`PolicySpec::rules`] (ingress first, then egress).
pub(super) type RulePos = u32;

#[derive(Debug, Default)]
pub(super) struct RuleIndex {
    /// Rules with a pod peer found under this key.
    by_key: HashMap<IndexKey, Vec<RulePos>>,
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
                    Peer::Pods { namespaces, pods } => match (pods.required_pair(), namespaces) {
                        (Some((k, v)), _) => index.key(IndexKey::PodPair(k.into(), v.into()), pos),
                        (None, NamespaceMatch::Names(names)) => {
                            for name in names {
                                index.key(IndexKey::NsName(name.clone()), pos);
                            }
                        }
                        (None, NamespaceMatch::Selector(s)) => match s.required_pair() {
                            Some((k, v)) => index.key(IndexKey::NsPair(k.into(), v.into()), pos),
                            None => index.every_pod.push(pos),
                        },
                    },
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

    fn key(&mut self, key: IndexKey, pos: RulePos) {
        self.by_key.entry(key).or_default().push(pos);
    }

    /// Rules that may select a pod identity whose namespace has `ns_labels`, in order.
    pub(super) fn for_pod(&self, identity: &PodIdentity, ns_labels: &Labels) -> Vec<RulePos> {
        let mut out = self.every_pod.clone();
        let mut add = |key: IndexKey| out.extend(self.by_key.get(&key).into_iter().flatten());
        for (k, v) in &identity.key.labels {
            add(IndexKey::PodPair(k.clone(), v.clone()));
        }
        for (k, v) in ns_labels {
            add(IndexKey::NsPair(k.clone(), v.clone()));
        }
        add(IndexKey::NsName(identity.key.namespace.clone()));
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
