//! Engine settings: which node this is, how the KubeRay operator and cluster DNS are
//! found (the DNS Service, and a node-local DNS cache's addresses), and whether plain
//! NetworkPolicies are enforced too.
//!
//! Must not: read flags, files or the environment; the CLI builds a [`Settings`].
use std::net::IpAddr;

use super::selector::Selector;

/// How the DNS base flow is expressed (docs/semantics.md "What an isolated pod may do", egress 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// UDP and TCP 53 to the given Service: its ClusterIPs and its endpoint pods.
    Service { namespace: String, name: String },
    /// UDP and TCP 53 to any address.
    Anywhere,
    /// No DNS base flow.
    Off,
}

impl Default for DnsMode {
    fn default() -> Self {
        Self::Service {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
        }
    }
}

/// Default namespaces the KubeRay operator may run in. The Helm chart installs into
/// whatever namespace the user picks; these are the ones KubeRay's own manifests and
/// most guides use. A cluster with the operator elsewhere (e.g. `default`, as in the
/// quickstart) must say so: an operator that is not found only loses access to isolated
/// heads, it never widens anything.
pub const DEFAULT_OPERATOR_NAMESPACES: [&str; 2] = ["ray-system", "kuberay-system"];

#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name: only pods with this `spec.nodeName` are endpoints.
    pub node_name: String,
    /// The node's own addresses: always allowed (identity `HOST`).
    pub node_addresses: Vec<IpAddr>,
    /// Namespaces the KubeRay operator runs in (labels AND namespace must match).
    pub operator_namespaces: Vec<String>,
    /// Labels of the KubeRay operator pods.
    pub operator_selector: Selector,
    pub dns: DnsMode,
    /// Addresses of a node-local DNS cache on this node (NodeLocal DNSCache's
    /// `169.254.20.10`): never the node (a hostNetwork pod answers there, not the
    /// node's own processes), and UDP/TCP 53 to them is part of the DNS base flow
    /// unless `dns` is [`DnsMode::Off`].
    pub dns_node_local: Vec<IpAddr>,
    /// Also enforce plain `networking.k8s.io/v1` NetworkPolicies.
    pub enforce_networkpolicies: bool,
    /// Mark every endpoint audit-only (evaluate and count, never drop).
    pub audit: bool,
}

impl Settings {
    /// Defaults for node `node_name` with the given addresses.
    pub fn new(node_name: impl Into<String>, node_addresses: Vec<IpAddr>) -> Self {
        Self {
            node_name: node_name.into(),
            node_addresses,
            operator_namespaces: DEFAULT_OPERATOR_NAMESPACES.map(String::from).to_vec(),
            operator_selector: Selector::from_labels([
                ("app.kubernetes.io/name", "kuberay-operator"),
                ("app.kubernetes.io/component", "kuberay-operator"),
            ]),
            dns: DnsMode::default(),
            dns_node_local: Vec::new(),
            enforce_networkpolicies: false,
            audit: false,
        }
    }
}
