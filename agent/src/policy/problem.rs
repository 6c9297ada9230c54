//! Problems found in the input: what the agent turns into Kubernetes Events and log
//! lines (docs/semantics.md "Bad input").
//!
//! Must not: decide anything. A problem only describes; the safe reading is applied
//! where the problem is found.
use std::fmt;

use serde_json::Value;

/// The object a problem is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `RayCluster`, `NetworkPolicy`, `Pod`, ...
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// How an event should be typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Invalid input; a safe (never looser) reading applies.
    Warning,
    /// Valid but noteworthy (e.g. `networkPolicy` and `networkIsolation` both set).
    Notice,
}

/// One thing wrong (or worth saying) about an input object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    pub object: ObjectRef,
    /// Field path, e.g. `spec.networkPolicy.worker.egressRules[0].to[0].ipBlock.cidr`.
    pub field: String,
    /// The offending value as written (JSON for structured values).
    pub value: String,
    /// What is wrong and which reading applies.
    pub message: String,
    pub severity: Severity,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} = {:?}: {}",
            self.object, self.field, self.value, self.message
        )
    }
}

/// A problem before it is tied to an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub value: String,
    pub message: String,
}

impl Invalid {
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.into(),
            message: message.into(),
        }
    }

    /// The first key of the JSON object `value` (at path `field`) that is not in
    /// `known`, as an invalid input that makes the holding rule allow nothing. `None`
    /// when every key is known or `value` is not an object (its type is reported
    /// where it is deserialised).
    ///
    /// The `networking.k8s.io/v1` types drop unknown keys when deserialised, so a typo
    /// would vanish: `{"frm": [...]}` would read as "from anyone" and
    /// `namespaceSelector: {matchLabel: ...}` as "every namespace". This is checked
    /// on the raw value before that happens.
    pub fn unknown_field(field: &str, value: &Value, known: &[&str]) -> Option<Self> {
        let Value::Object(map) = value else {
            return None;
        };
        map.iter()
            .find(|(key, _)| !known.contains(&key.as_str()))
            .map(|(key, value)| {
                let expected = known.join(", ");
                Self::new(
                    format!("{field}.{key}"),
                    value.to_string(),
                    format!("unknown field (expected one of {expected}); the rule allows nothing"),
                )
            })
    }

    pub fn at(self, object: &ObjectRef, severity: Severity) -> Problem {
        Problem {
            object: object.clone(),
            field: self.field,
            value: self.value,
            message: self.message,
            severity,
        }
    }
}
