//! Label selectors: `matchLabels` and `matchExpressions` (`In`, `NotIn`, `Exists`,
//! `DoesNotExist`) normalised into a hashable value, and matched against labels.
//!
//! Must not: know about pods, namespaces or identities; it only answers "do these
//! labels match".
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use super::problem::Invalid;

/// The fields of a `LabelSelector`.
pub const SELECTOR_FIELDS: &[&str] = &["matchLabels", "matchExpressions"];
/// The fields of one `matchExpressions` entry.
pub const EXPRESSION_FIELDS: &[&str] = &["key", "operator", "values"];

/// The first field of the raw label selector `value` (at path `field`) that
/// `LabelSelector` does not have, including inside its `matchExpressions` entries.
/// `matchLabels` keys are labels, so any key is valid there.
pub fn unknown_field(field: &str, value: &Value) -> Option<Invalid> {
    Invalid::unknown_field(field, value, SELECTOR_FIELDS).or_else(|| {
        let Some(Value::Array(expressions)) = value.get("matchExpressions") else {
            return None;
        };
        expressions.iter().enumerate().find_map(|(i, e)| {
            Invalid::unknown_field(
                &format!("{field}.matchExpressions[{i}]"),
                e,
                EXPRESSION_FIELDS,
            )
        })
    })
}

/// Labels as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector; all must hold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// `key` is present with one of `values` (`matchLabels` entries are `In` with one value).
    In {
        key: String,
        values: Vec<String>,
    },
    /// `key` is absent, or present with a value not in `values`.
    NotIn {
        key: String,
        values: Vec<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Self::In { key, .. }
            | Self::NotIn { key, .. }
            | Self::Exists { key }
            | Self::DoesNotExist { key } => key,
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

/// A normalised label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// Sorted and deduplicated, so equal selectors compare equal.
    pub requirements: Vec<Requirement>,
}

/// Why a selector could not be understood. The rule that holds it allows nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown operator {operator:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator { index: usize, operator: String },
    #[error("operator {operator} needs at least one value")]
    MissingValues { index: usize, operator: String },
    #[error("operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
}

impl SelectorError {
    /// Index into `matchExpressions` of the offending expression.
    pub fn index(&self) -> usize {
        match self {
            Self::UnknownOperator { index, .. }
            | Self::MissingValues { index, .. }
            | Self::UnexpectedValues { index, .. } => *index,
        }
    }

    pub fn operator(&self) -> &str {
        match self {
            Self::UnknownOperator { operator, .. }
            | Self::MissingValues { operator, .. }
            | Self::UnexpectedValues { operator, .. } => operator,
        }
    }
}

impl Selector {
    /// Matches everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// `key=value` for every pair.
    pub fn from_labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self::from_requirements(pairs.into_iter().map(|(key, value)| Requirement::In {
            key: key.to_owned(),
            values: vec![value.to_owned()],
        }))
    }

    pub fn from_requirements(requirements: impl IntoIterator<Item = Requirement>) -> Self {
        let mut requirements: Vec<Requirement> = requirements
            .into_iter()
            .map(|mut r| {
                if let Requirement::In { values, .. } | Requirement::NotIn { values, .. } = &mut r {
                    values.sort();
                    values.dedup();
                }
                r
            })
            .collect();
        requirements.sort();
        requirements.dedup();
        Self { requirements }
    }

    /// Normalises a Kubernetes `LabelSelector`.
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In {
                key: key.clone(),
                values: vec![value.clone()],
            });
        }
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let values = expr.values.clone().unwrap_or_default();
            let key = expr.key.clone();
            let operator = expr.operator.clone();
            let requirement = match operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::MissingValues { index, operator });
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues { index, operator });
                }
                "In" => Requirement::In { key, values },
                "NotIn" => Requirement::NotIn { key, values },
                "Exists" => Requirement::Exists { key },
                "DoesNotExist" => Requirement::DoesNotExist { key },
                _ => return Err(SelectorError::UnknownOperator { index, operator }),
            };
            requirements.push(requirement);
        }
        Ok(Self::from_requirements(requirements))
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// A `key=value` pair every matching label set must carry, for index lookups.
    pub fn required_pair(&self) -> Option<(&str, &str)> {
        self.requirements.iter().find_map(|r| match r {
            Requirement::In { key, values } if values.len() == 1 => {
                Some((key.as_str(), values[0].as_str()))
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some([("app".to_string(), "x".to_string())].into()),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "x"), ("tier", "a"), ("team", "t")])));
        assert!(s.matches(&labels(&[
            ("app", "x"),
            ("tier", "b"),
            ("team", "t"),
            ("env", "dev")
        ])));
        assert!(!s.matches(&labels(&[("app", "y"), ("tier", "a"), ("team", "t")])));
        assert!(!s.matches(&labels(&[("app", "x"), ("tier", "c"), ("team", "t")])));
        assert!(!s.matches(&labels(&[
            ("app", "x"),
            ("tier", "a"),
            ("team", "t"),
            ("env", "prod")
        ])));
        assert!(!s.matches(&labels(&[("app", "x"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[
            ("app", "x"),
            ("tier", "a"),
            ("team", "t"),
            ("legacy", "")
        ])));
    }

    #[test]
    fn not_in_matches_absent_key() {
        let s = Selector::parse(&LabelSelector {
            match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]),
            ..Default::default()
        })
        .unwrap();
        assert!(s.matches(&labels(&[])));
    }

    #[test]
    fn bad_operators_are_errors() {
        for (e, want) in [
            (expr("a", "Equals", &["x"]), "Equals"),
            (expr("a", "In", &[]), "In"),
            (expr("a", "Exists", &["x"]), "Exists"),
        ] {
            let err = Selector::parse(&LabelSelector {
                match_expressions: Some(vec![e]),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(err.operator(), want);
            assert_eq!(err.index(), 0);
        }
    }

    #[test]
    fn equal_selectors_normalise_equal() {
        let a = Selector::from_labels([("b", "2"), ("a", "1")]);
        let b = Selector::from_labels([("a", "1"), ("b", "2"), ("a", "1")]);
        assert_eq!(a, b);
    }
}
