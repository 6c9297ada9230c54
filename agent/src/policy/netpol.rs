//! Plain `networking.k8s.io/v1` NetworkPolicies, the optional second source: parsed
//! into the same [`Rule`]s as RayCluster isolation.
//!
//! Must not: decide whether NetworkPolicies are enforced (`Settings`), or which pods a
//! policy selects right now (`engine`).
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::problem::{Invalid, ObjectRef, Problem, Severity};
use super::rule::{Rule, RuleOrigin, parse_rule};
use super::selector::Selector;
use crate::tables::Direction;

/// A NetworkPolicy as the engine needs it.
#[derive(Clone, Debug)]
pub struct ParsedNetpol {
    pub object: Arc<ObjectRef>,
    /// `None` if `spec.podSelector` is invalid: the policy selects no pod (the API
    /// server validates selectors, so this only happens with hand-fed objects).
    pub selector: Option<Selector>,
    pub isolate_ingress: bool,
    pub isolate_egress: bool,
    pub ingress: Vec<Arc<Rule>>,
    pub egress: Vec<Arc<Rule>>,
    pub problems: Vec<Problem>,
}

/// Set by the manifests source on a NetworkPolicy whose rules have fields their
/// `networking.k8s.io/v1` type does not have (the API server rejects or prunes those;
/// a file is read into the type, which would drop them and widen the rule): a JSON
/// list of `{"field", "value", "message"}`. The rules they are in allow nothing. Set by
/// hand it can only take rules away.
pub const UNKNOWN_RULE_FIELDS_ANNOTATION: &str = "rayfence.io/unknown-rule-fields";

/// The unknown fields [`UNKNOWN_RULE_FIELDS_ANNOTATION`] lists (none if unreadable).
fn unknown_rule_fields(policy: &NetworkPolicy) -> Vec<Invalid> {
    #[derive(serde::Deserialize)]
    struct Field {
        field: String,
        value: String,
        message: String,
    }
    policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(UNKNOWN_RULE_FIELDS_ANNOTATION))
        .and_then(|text| serde_json::from_str::<Vec<Field>>(text).ok())
        .into_iter()
        .flatten()
        .map(|f| Invalid::new(f.field, f.value, f.message))
        .collect()
}

/// Whether `field` lies inside the rule at path `rule` (`spec.ingress[0]`).
fn inside(field: &str, rule: &str) -> bool {
    field
        .strip_prefix(rule)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

pub fn parse(policy: &NetworkPolicy) -> ParsedNetpol {
    let namespace = policy.metadata.namespace.clone().unwrap_or_default();
    let name = policy.metadata.name.clone().unwrap_or_default();
    let object = Arc::new(ObjectRef::new("NetworkPolicy", &namespace, &name));
    let mut problems = Vec::new();
    let spec = policy.spec.clone().unwrap_or_default();
    let selector = match Selector::parse(&spec.pod_selector.clone().unwrap_or_default()) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(
                Invalid::new(
                    format!("spec.podSelector.matchExpressions[{}].operator", e.index()),
                    e.operator(),
                    format!("{e}; the policy selects no pod"),
                )
                .at(&object, Severity::Warning),
            );
            None
        }
    };
    let types = spec.policy_types.clone();
    let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (isolate_ingress, isolate_egress) = match &types {
        Some(t) if !t.is_empty() => (
            t.iter().any(|t| t == "Ingress"),
            t.iter().any(|t| t == "Egress"),
        ),
        _ => (true, has_egress),
    };
    for (i, t) in types.iter().flatten().enumerate() {
        if t != "Ingress" && t != "Egress" {
            problems.push(
                Invalid::new(
                    format!("spec.policyTypes[{i}]"),
                    t.as_str(),
                    "unknown policy type; ignored",
                )
                .at(&object, Severity::Warning),
            );
        }
    }
    let unknown = unknown_rule_fields(policy);
    let mut collect = |direction: Direction, items: Vec<(Option<&[_]>, Option<&[_]>)>| {
        let mut rules = Vec::new();
        let key = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        for (index, (peers, ports)) in items.into_iter().enumerate() {
            let origin = RuleOrigin::NetworkPolicy {
                name: name.clone(),
                direction,
                index,
            };
            let field = format!("spec.{key}[{index}]");
            if let Some(invalid) = unknown.iter().find(|u| inside(&u.field, &field)) {
                problems.push(invalid.clone().at(&object, Severity::Warning));
                continue;
            }
            match parse_rule(origin, &object, &field, direction, peers, ports, &namespace) {
                Ok(parsed) => {
                    problems.extend(
                        parsed
                            .notices
                            .into_iter()
                            .map(|n| n.at(&object, Severity::Notice)),
                    );
                    rules.push(Arc::new(parsed.rule));
                }
                Err(invalid) => problems.push(invalid.at(&object, Severity::Warning)),
            }
        }
        rules
    };
    let ingress = if isolate_ingress {
        collect(
            Direction::Ingress,
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                .collect(),
        )
    } else {
        Vec::new()
    };
    let egress = if isolate_egress {
        collect(
            Direction::Egress,
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                .collect(),
        )
    } else {
        Vec::new()
    };
    ParsedNetpol {
        object,
        selector,
        isolate_ingress,
        isolate_egress,
        ingress,
        egress,
        problems,
    }
}
