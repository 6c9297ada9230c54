//! RayCluster isolation: parses `spec.networkPolicy` (KubeRay v1.7+),
//! `spec.networkIsolation` (KubeRay PR #4638) and the `rayfence.io/network-policy`
//! annotation, and compiles them, with the base flows, into per-role rule lists that
//! say exactly what KubeRay's generated NetworkPolicies (plus DNS) allow. Also reads
//! the `rayfence.io/audit` switch ([`ParsedCluster::audit`]).
//!
//! Must not: look at pods or decide which pod gets which role (that is `engine`), or
//! fail a whole cluster because one part is malformed: bad parts become [`Problem`]s
//! and the safe reading (docs/semantics.md "Bad input").
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{NetworkPolicyEgressRule, NetworkPolicyIngressRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::problem::{Invalid, ObjectRef, Problem, Severity};
use super::rule::{
    Block, NamespaceMatch, Peer, PortMatch, PortSpec, Role, Rule, RuleOrigin, parse_rule,
};
use super::selector::Selector;
use super::settings::{DnsMode, Settings};
use crate::crd::RayCluster;
use crate::tables::{Direction, protocol};

pub const ANNOTATION: &str = "rayfence.io/network-policy";
/// `"true"`: the cluster's pods are audit-only (evaluated and counted, not dropped).
pub const AUDIT_ANNOTATION: &str = "rayfence.io/audit";
pub const LABEL_CLUSTER: &str = "ray.io/cluster";
pub const LABEL_NODE_TYPE: &str = "ray.io/node-type";
pub const LABEL_GROUP: &str = "ray.io/group";
pub const LABEL_ORIGIN_NAME: &str = "ray.io/originated-from-cr-name";
pub const LABEL_ORIGIN_CRD: &str = "ray.io/originated-from-crd";
pub const LABEL_SUBMISSION_MODE: &str = "ray.io/job-submission-mode";
pub const DEFAULT_DASHBOARD_PORT: u16 = 8265;
pub const DEFAULT_CLIENT_PORT: u16 = 10001;

/// `mode` of the isolation block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    DenyAll,
    DenyAllIngress,
    DenyAllEgress,
}

impl Mode {
    pub fn isolates(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (Self::DenyAll, _)
                | (Self::DenyAllIngress, Direction::Ingress)
                | (Self::DenyAllEgress, Direction::Egress)
        )
    }
}

/// Which field the effective block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicySource {
    NetworkPolicy,
    NetworkIsolation,
    Annotation,
}

/// The user's rules for one role, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RoleRules {
    pub ingress: Vec<Arc<Rule>>,
    pub egress: Vec<Arc<Rule>>,
}

impl RoleRules {
    pub fn get(&self, direction: Direction) -> &[Arc<Rule>] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A valid isolation block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPolicy {
    pub mode: Mode,
    pub source: PolicySource,
    pub head: RoleRules,
    pub worker: RoleRules,
    /// `workerGroups[]` entries by group name; each replaces `worker` for its group.
    pub groups: BTreeMap<String, RoleRules>,
}

impl UserPolicy {
    /// The reading for an invalid mode with no last good policy.
    pub fn deny_all(source: PolicySource) -> Self {
        Self {
            mode: Mode::DenyAll,
            source,
            head: RoleRules::default(),
            worker: RoleRules::default(),
            groups: BTreeMap::new(),
        }
    }
}

/// What the object declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Declared {
    /// Neither field nor annotation: not isolated.
    Nothing,
    Valid(UserPolicy),
    /// Isolation was asked for but the block (or its mode) is invalid.
    Invalid(PolicySource),
}

/// A RayCluster as the engine needs it.
#[derive(Clone, Debug)]
pub struct ParsedCluster {
    pub object: Arc<ObjectRef>,
    pub declared: Declared,
    pub dashboard_port: u16,
    pub client_port: u16,
    /// The owning RayJob's name, when its submitter pods get the dashboard port.
    pub rayjob: Option<String>,
    /// `rayfence.io/audit` is `"true"`: would-drops of the cluster's pods pass and
    /// are counted as audit. An invalid value is `false` (enforced) and a problem.
    pub audit: bool,
    pub problems: Vec<Problem>,
}

struct Ctx<'a> {
    object: &'a Arc<ObjectRef>,
    namespace: &'a str,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn warn(&mut self, invalid: Invalid) {
        self.problems
            .push(invalid.at(self.object, Severity::Warning));
    }

    fn notice(&mut self, invalid: Invalid) {
        self.problems
            .push(invalid.at(self.object, Severity::Notice));
    }

    fn rules(
        &mut self,
        value: Option<&Value>,
        field: &str,
        role: &Role,
        direction: Direction,
    ) -> Vec<Arc<Rule>> {
        let items = match value {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.warn(Invalid::new(
                    field,
                    other.to_string(),
                    "expected a list of rules; none apply",
                ));
                return Vec::new();
            }
        };
        let mut rules = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let field = format!("{field}[{index}]");
            // Before deserialising, which would drop the field and widen the rule.
            if let Some(invalid) = super::rule::unknown_field(&field, direction, item) {
                self.warn(invalid);
                continue;
            }
            let origin = RuleOrigin::User {
                role: role.clone(),
                direction,
                index,
            };
            let parsed = match direction {
                Direction::Ingress => {
                    serde_json::from_value::<NetworkPolicyIngressRule>(item.clone())
                        .map_err(|e| e.to_string())
                        .map(|r| {
                            parse_rule(
                                origin,
                                self.object,
                                &field,
                                direction,
                                r.from.as_deref(),
                                r.ports.as_deref(),
                                self.namespace,
                            )
                        })
                }
                Direction::Egress => {
                    serde_json::from_value::<NetworkPolicyEgressRule>(item.clone())
                        .map_err(|e| e.to_string())
                        .map(|r| {
                            parse_rule(
                                origin,
                                self.object,
                                &field,
                                direction,
                                r.to.as_deref(),
                                r.ports.as_deref(),
                                self.namespace,
                            )
                        })
                }
            };
            match parsed {
                Err(e) => self.warn(Invalid::new(
                    field,
                    item.to_string(),
                    format!("malformed rule ({e}); the rule allows nothing"),
                )),
                Ok(Err(invalid)) => self.warn(invalid),
                Ok(Ok(parsed)) => {
                    for notice in parsed.notices {
                        self.notice(notice);
                    }
                    rules.push(Arc::new(parsed.rule));
                }
            }
        }
        rules
    }

    fn role(&mut self, value: Option<&Value>, field: &str, role: &Role) -> RoleRules {
        match value {
            None | Some(Value::Null) => RoleRules::default(),
            Some(Value::Object(map)) => RoleRules {
                ingress: self.rules(
                    map.get("ingressRules"),
                    &format!("{field}.ingressRules"),
                    role,
                    Direction::Ingress,
                ),
                egress: self.rules(
                    map.get("egressRules"),
                    &format!("{field}.egressRules"),
                    role,
                    Direction::Egress,
                ),
            },
            Some(other) => {
                self.warn(Invalid::new(
                    field,
                    other.to_string(),
                    "expected an object; no user rules apply",
                ));
                RoleRules::default()
            }
        }
    }

    /// Parses one isolation block; `None` when its mode (or shape) is invalid.
    fn block(&mut self, value: &Value, field: &str, source: PolicySource) -> Option<UserPolicy> {
        let Value::Object(map) = value else {
            self.warn(Invalid::new(
                field,
                value.to_string(),
                "expected an object; the last good policy (or DenyAll) applies",
            ));
            return None;
        };
        let mode = match map.get("mode") {
            None | Some(Value::Null) => Some(Mode::DenyAll),
            Some(Value::String(s)) if s == "DenyAll" => Some(Mode::DenyAll),
            Some(Value::String(s)) if s == "DenyAllIngress" => Some(Mode::DenyAllIngress),
            Some(Value::String(s)) if s == "DenyAllEgress" => Some(Mode::DenyAllEgress),
            Some(other) => {
                let shown = other
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| other.to_string());
                self.warn(Invalid::new(
                    format!("{field}.mode"),
                    shown,
                    "invalid mode (expected DenyAll, DenyAllIngress or DenyAllEgress); the last good policy (or DenyAll) applies",
                ));
                None
            }
        };
        let head = self.role(map.get("head"), &format!("{field}.head"), &Role::Head);
        let worker = self.role(map.get("worker"), &format!("{field}.worker"), &Role::Worker);
        let mut groups = BTreeMap::new();
        match (map.get("workerGroups"), source) {
            (None | Some(Value::Null), _) => {}
            (Some(_), PolicySource::NetworkIsolation) => self.notice(Invalid::new(
                format!("{field}.workerGroups"),
                "",
                "networkIsolation has no workerGroups; ignored",
            )),
            (Some(Value::Array(items)), _) => {
                for (i, item) in items.iter().enumerate() {
                    let f = format!("{field}.workerGroups[{i}]");
                    let Some(name) = item.get("groupName").and_then(Value::as_str) else {
                        self.warn(Invalid::new(
                            format!("{f}.groupName"),
                            item.get("groupName")
                                .map(Value::to_string)
                                .unwrap_or_default(),
                            "missing groupName; the entry is ignored and the group uses `worker`",
                        ));
                        continue;
                    };
                    let rules = self.role(Some(item), &f, &Role::Group(name.to_owned()));
                    if groups.contains_key(name) {
                        self.notice(Invalid::new(
                            format!("{f}.groupName"),
                            name,
                            "duplicate groupName; the first entry applies",
                        ));
                    } else {
                        groups.insert(name.to_owned(), rules);
                    }
                }
            }
            (Some(other), _) => self.warn(Invalid::new(
                format!("{field}.workerGroups"),
                other.to_string(),
                "expected a list; every group uses `worker`",
            )),
        }
        Some(UserPolicy {
            mode: mode?,
            source,
            head,
            worker,
            groups,
        })
    }
}

fn start_param(params: Option<&Value>, key: &str, default: u16, ctx: &mut Ctx<'_>) -> u16 {
    let value = params.and_then(|p| p.get(key));
    let parsed = match value {
        None | Some(Value::Null) => return default,
        Some(Value::String(s)) => s.trim().parse::<u16>().ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Some(_) => None,
    };
    match parsed.filter(|p| *p > 0) {
        Some(port) => port,
        None => {
            ctx.notice(Invalid::new(
                format!("spec.headGroupSpec.rayStartParams[{key}]"),
                value
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .unwrap_or_default(),
                format!("not a port number; the default {default} applies, as in KubeRay"),
            ));
            default
        }
    }
}

/// Reads `rayfence.io/audit`: `true`/`false` in any ASCII case (as YAML 1.1 and
/// Go's `strconv.ParseBool` spell booleans: `true`, `True`, `TRUE`), absent is
/// `false`. Anything else (`yes`, `1`, `""`, ` true`) is a warning and `false`: a
/// typo never loosens isolation.
fn audit_annotation(meta: &ObjectMeta, ctx: &mut Ctx<'_>) -> bool {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUDIT_ANNOTATION))
    else {
        return false;
    };
    if value.eq_ignore_ascii_case("true") {
        true
    } else if value.eq_ignore_ascii_case("false") {
        false
    } else {
        ctx.warn(Invalid::new(
            format!("metadata.annotations[\"{AUDIT_ANNOTATION}\"]"),
            value.as_str(),
            "expected \"true\" or \"false\"; the cluster is enforced (not audit)",
        ));
        false
    }
}

/// Parses what a RayCluster declares. Never fails: problems are collected.
pub fn parse(cluster: &RayCluster) -> ParsedCluster {
    let meta = &cluster.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let object = Arc::new(ObjectRef::new("RayCluster", &namespace, &name));
    let mut ctx = Ctx {
        object: &object,
        namespace: &namespace,
        problems: Vec::new(),
    };
    let spec = &cluster.spec;
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(ANNOTATION));
    let annotation_field = format!("metadata.annotations[{ANNOTATION}]");
    let declared = match (&spec.network_policy, &spec.network_isolation, annotation) {
        (Some(block), other, annotation) => {
            if other.is_some() {
                ctx.notice(Invalid::new(
                    "spec.networkIsolation",
                    "",
                    "both spec.networkPolicy and spec.networkIsolation are set; spec.networkPolicy wins",
                ));
            }
            if annotation.is_some() {
                ctx.notice(Invalid::new(
                    &annotation_field,
                    "",
                    "spec.networkPolicy is set; the annotation is ignored",
                ));
            }
            let policy = ctx.block(block, "spec.networkPolicy", PolicySource::NetworkPolicy);
            policy.map_or(
                Declared::Invalid(PolicySource::NetworkPolicy),
                Declared::Valid,
            )
        }
        (None, Some(block), annotation) => {
            if annotation.is_some() {
                ctx.notice(Invalid::new(
                    &annotation_field,
                    "",
                    "spec.networkIsolation is set; the annotation is ignored",
                ));
            }
            let policy = ctx.block(
                block,
                "spec.networkIsolation",
                PolicySource::NetworkIsolation,
            );
            policy.map_or(
                Declared::Invalid(PolicySource::NetworkIsolation),
                Declared::Valid,
            )
        }
        (None, None, Some(text)) => match serde_norway::from_str::<Value>(text) {
            Ok(block) => {
                let policy = ctx.block(&block, &annotation_field, PolicySource::Annotation);
                policy.map_or(Declared::Invalid(PolicySource::Annotation), Declared::Valid)
            }
            Err(e) => {
                ctx.warn(Invalid::new(
                    &annotation_field,
                    text.as_str(),
                    format!("not YAML or JSON ({e}); the last good policy (or DenyAll) applies"),
                ));
                Declared::Invalid(PolicySource::Annotation)
            }
        },
        (None, None, None) => Declared::Nothing,
    };
    let params = spec
        .head_group_spec
        .as_ref()
        .and_then(|h| h.get("rayStartParams"));
    let dashboard_port = start_param(params, "dashboard-port", DEFAULT_DASHBOARD_PORT, &mut ctx);
    let client_port = start_param(
        params,
        "ray-client-server-port",
        DEFAULT_CLIENT_PORT,
        &mut ctx,
    );
    let k8s_job_mode = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SUBMISSION_MODE))
        .is_some_and(|m| m == "K8sJobMode");
    let rayjob = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.controller == Some(true) && o.kind == "RayJob" && o.api_version.starts_with("ray.io/")
        })
        .filter(|_| k8s_job_mode)
        .map(|o| o.name.clone());
    let audit = audit_annotation(meta, &mut ctx);
    let problems = ctx.problems;
    ParsedCluster {
        object,
        declared,
        dashboard_port,
        client_port,
        rayjob,
        audit,
        problems,
    }
}

/// Per-role rule lists with the base flows, for the directions the mode isolates
/// (the other direction's lists are empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledCluster {
    pub mode: Mode,
    pub head: RoleRules,
    pub worker: RoleRules,
    pub groups: BTreeMap<String, RoleRules>,
}

impl CompiledCluster {
    pub fn role(&self, role: &Role) -> &RoleRules {
        match role {
            Role::Head => &self.head,
            Role::Worker => &self.worker,
            Role::Group(g) => self.groups.get(g).unwrap_or(&self.worker),
        }
    }
}

fn base(
    object: &Arc<ObjectRef>,
    origin: RuleOrigin,
    peers: Vec<Peer>,
    ports: Option<Vec<PortSpec>>,
) -> Arc<Rule> {
    Arc::new(Rule {
        field: format!("(base flow {origin:?})"),
        origin,
        object: object.clone(),
        peers,
        ports,
    })
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        protocol: protocol::TCP,
        port: PortMatch::Range(port, port),
    }
}

/// Compiles `policy` (the effective one: valid, last good, or DenyAll) for `parsed`.
/// The node-local DNS cache's addresses as peers of the DNS base flow: one host
/// prefix each (the engine never maps them to the node, so the prefix decides).
fn node_local_dns(settings: &Settings) -> impl Iterator<Item = Peer> + '_ {
    settings.dns_node_local.iter().map(|ip| {
        Peer::Block(Block {
            cidr: ipnet::IpNet::from(*ip),
            except: Vec::new(),
        })
    })
}

pub fn compile(
    parsed: &ParsedCluster,
    policy: &UserPolicy,
    settings: &Settings,
) -> CompiledCluster {
    let object = &parsed.object;
    let namespace = &object.namespace;
    let same_cluster = base(
        object,
        RuleOrigin::SameCluster,
        vec![Peer::Pods {
            namespaces: NamespaceMatch::Names(vec![namespace.clone()]),
            pods: Selector::from_labels([(LABEL_CLUSTER, object.name.as_str())]),
        }],
        None,
    );
    let operator = base(
        object,
        RuleOrigin::Operator,
        vec![Peer::Pods {
            namespaces: NamespaceMatch::Names(settings.operator_namespaces.clone()),
            pods: settings.operator_selector.clone(),
        }],
        Some(vec![tcp(parsed.dashboard_port), tcp(parsed.client_port)]),
    );
    let submitter = parsed.rayjob.as_ref().map(|job| {
        base(
            object,
            RuleOrigin::Submitter,
            vec![Peer::Pods {
                namespaces: NamespaceMatch::Names(vec![namespace.clone()]),
                pods: Selector::from_labels([
                    (LABEL_ORIGIN_NAME, job.as_str()),
                    (LABEL_ORIGIN_CRD, "RayJob"),
                ]),
            }],
            Some(vec![tcp(parsed.dashboard_port)]),
        )
    });
    let dns_ports = Some(vec![
        PortSpec {
            protocol: protocol::UDP,
            port: PortMatch::Range(53, 53),
        },
        tcp(53),
    ]);
    let dns = match &settings.dns {
        DnsMode::Service { namespace, name } => Some(base(
            object,
            RuleOrigin::Dns,
            std::iter::once(Peer::ServiceBackends {
                namespace: namespace.clone(),
                name: name.clone(),
            })
            .chain(node_local_dns(settings))
            .collect(),
            dns_ports,
        )),
        DnsMode::Anywhere => Some(base(
            object,
            RuleOrigin::Dns,
            Block::everything().map(Peer::Block).to_vec(),
            dns_ports,
        )),
        DnsMode::Off => None,
    };
    let isolate_in = policy.mode.isolates(Direction::Ingress);
    let isolate_out = policy.mode.isolates(Direction::Egress);
    let build = |user: &RoleRules, head: bool| {
        let mut rules = RoleRules::default();
        if isolate_in {
            rules.ingress.push(same_cluster.clone());
            if head {
                rules.ingress.push(operator.clone());
                rules.ingress.extend(submitter.clone());
            }
            rules.ingress.extend(user.ingress.iter().cloned());
        }
        if isolate_out {
            rules.egress.push(same_cluster.clone());
            rules.egress.extend(dns.clone());
            rules.egress.extend(user.egress.iter().cloned());
        }
        rules
    };
    CompiledCluster {
        mode: policy.mode,
        head: build(&policy.head, true),
        worker: build(&policy.worker, false),
        groups: policy
            .groups
            .iter()
            .map(|(g, r)| (g.clone(), build(r, false)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> RayCluster {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn modes_isolate_their_directions() {
        assert!(
            Mode::DenyAll.isolates(Direction::Ingress) && Mode::DenyAll.isolates(Direction::Egress)
        );
        assert!(
            Mode::DenyAllIngress.isolates(Direction::Ingress)
                && !Mode::DenyAllIngress.isolates(Direction::Egress)
        );
        assert!(
            !Mode::DenyAllEgress.isolates(Direction::Ingress)
                && Mode::DenyAllEgress.isolates(Direction::Egress)
        );
    }

    #[test]
    fn unknown_block_fields_are_ignored_and_one_bad_rule_does_not_fail_the_rest() {
        let parsed = parse(&cluster(
            "metadata: {name: c, namespace: n}\nspec:\n  unknownField: 1\n  networkPolicy:\n    mode: DenyAll\n    futureKnob: true\n    head:\n      ingressRules:\n      - {ports: [{port: 80}]}\n      - {ports: [{port: true}]}\n      - {from: [{podSelector: {}}]}\n",
        ));
        let Declared::Valid(policy) = &parsed.declared else {
            panic!("{:?}", parsed.declared);
        };
        assert_eq!(policy.head.ingress.len(), 2);
        assert_eq!(parsed.problems.len(), 1);
        assert_eq!(
            parsed.problems[0].field,
            "spec.networkPolicy.head.ingressRules[1]"
        );
        assert_eq!(
            policy.head.ingress[1].origin,
            RuleOrigin::User {
                role: Role::Head,
                direction: Direction::Ingress,
                index: 2
            }
        );
    }

    /// Issue 17: typos in the annotation widened rules (`frm` read as "from anyone",
    /// `matchLabel` as every namespace) without a word.
    #[test]
    fn a_rule_with_an_unknown_field_allows_nothing_and_is_reported() {
        let annotation = r#"{"head": {"ingressRules": [
            {"frm": [{"podSelector": {"matchLabels": {"app": "a"}}}]},
            {"from": [{"namespaceSelector": {"matchLabel": {"team": "t"}}}]},
            {"from": [{"namespaceSelector": {"nested": {"matchLabels": {"team": "t"}}}}]},
            {"from": [{"podSelector": {"matchLabels": {"app": "ok"}}}], "ports": [{"port": 80}]}
        ]}, "worker": {"egressRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "exept": ["10.1.0.0/16"]}}]}]}}"#;
        let yaml = format!(
            "metadata:\n  name: c\n  namespace: n\n  annotations:\n    {ANNOTATION}: '{}'\nspec: {{}}\n",
            annotation.replace('\n', " ")
        );
        let spec_yaml = format!(
            "metadata: {{name: c, namespace: n}}\nspec:\n  networkPolicy: {}\n",
            annotation.replace('\n', " ")
        );
        for (text, prefix) in [
            (yaml, format!("metadata.annotations[{ANNOTATION}]")),
            (spec_yaml, "spec.networkPolicy".to_owned()),
        ] {
            let parsed = parse(&cluster(&text));
            let Declared::Valid(policy) = &parsed.declared else {
                panic!("{:?}", parsed.declared);
            };
            // Only the rule without a typo survives; the worker's only rule is gone.
            assert_eq!(policy.head.ingress.len(), 1);
            assert_eq!(
                policy.head.ingress[0].origin,
                RuleOrigin::User {
                    role: Role::Head,
                    direction: Direction::Ingress,
                    index: 3
                }
            );
            assert!(policy.worker.egress.is_empty());
            let fields: Vec<_> = parsed
                .problems
                .iter()
                .map(|p| {
                    (
                        p.field.strip_prefix(&prefix).unwrap_or(&p.field),
                        p.severity,
                    )
                })
                .collect();
            assert_eq!(
                fields,
                [
                    (".head.ingressRules[0].frm", Severity::Warning),
                    (
                        ".head.ingressRules[1].from[0].namespaceSelector.matchLabel",
                        Severity::Warning
                    ),
                    (
                        ".head.ingressRules[2].from[0].namespaceSelector.nested",
                        Severity::Warning
                    ),
                    (
                        ".worker.egressRules[0].to[0].ipBlock.exept",
                        Severity::Warning
                    ),
                ]
            );
        }
    }

    #[test]
    fn invalid_mode_is_reported_with_its_value() {
        let parsed = parse(&cluster(
            "metadata: {name: c, namespace: n}\nspec:\n  networkPolicy: {mode: denyall}\n",
        ));
        assert_eq!(
            parsed.declared,
            Declared::Invalid(PolicySource::NetworkPolicy)
        );
        assert_eq!(parsed.problems[0].field, "spec.networkPolicy.mode");
        assert_eq!(parsed.problems[0].value, "denyall");
    }

    #[test]
    fn network_isolation_has_no_groups() {
        let parsed = parse(&cluster(
            "metadata: {name: c, namespace: n}\nspec:\n  networkIsolation:\n    workerGroups: [{groupName: g}]\n",
        ));
        let Declared::Valid(policy) = &parsed.declared else {
            panic!();
        };
        assert!(policy.groups.is_empty());
        assert_eq!(policy.source, PolicySource::NetworkIsolation);
        assert_eq!(parsed.problems[0].severity, Severity::Notice);
    }

    #[test]
    fn start_params_accept_strings_and_numbers() {
        let parsed = parse(&cluster(
            "metadata: {name: c, namespace: n}\nspec:\n  headGroupSpec: {rayStartParams: {dashboard-port: 9000, ray-client-server-port: ' 10002 '}}\n",
        ));
        assert_eq!((parsed.dashboard_port, parsed.client_port), (9000, 10002));
        let parsed = parse(&cluster("metadata: {name: c, namespace: n}\nspec: {}\n"));
        assert_eq!((parsed.dashboard_port, parsed.client_port), (8265, 10001));
        assert_eq!(parsed.declared, Declared::Nothing);
    }

    #[test]
    fn base_flows_are_added_only_for_isolated_directions() {
        let parsed = parse(&cluster(
            "metadata: {name: c, namespace: n}\nspec:\n  networkPolicy: {mode: DenyAllIngress}\n",
        ));
        let Declared::Valid(policy) = &parsed.declared else {
            panic!();
        };
        let compiled = compile(&parsed, policy, &Settings::new("node", vec![]));
        let origins: Vec<_> = compiled
            .head
            .ingress
            .iter()
            .map(|r| r.origin.clone())
            .collect();
        assert_eq!(origins, [RuleOrigin::SameCluster, RuleOrigin::Operator]);
        assert!(compiled.head.egress.is_empty());
        assert_eq!(compiled.worker.ingress.len(), 1);
    }
}
