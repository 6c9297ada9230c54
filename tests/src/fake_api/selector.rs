//! Label and field selectors as the API server reads them from `labelSelector=` and
//! `fieldSelector=`, matched against objects held as JSON.
//!
//! Label selectors take the full set-based grammar (`a=b`, `a==b`, `a!=b`,
//! `a in (x,y)`, `a notin (x,y)`, `a`, `!a`). Field selectors take `=`, `==` and `!=`
//! on any dotted path (`metadata.name`, `spec.nodeName`, `status.phase`); a missing
//! field reads as the empty string, so `spec.nodeName=` finds unscheduled pods as
//! on a real server. Simplification: a real server accepts only a few field paths
//! per kind and rejects the others; this one accepts every path.
//!
//! No I/O here.

use serde_json::Value;

/// A parse failure, reported to the client as `400 BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    pub selector: String,
    pub reason: &'static str,
}

impl std::fmt::Display for SelectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unable to parse selector {:?}: {}",
            self.selector, self.reason
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(selector: &str, rest: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or(SelectorError {
            selector: selector.to_owned(),
            reason: "expected (values)",
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let err = |reason| SelectorError {
            selector: selector.to_owned(),
            reason,
        };
        let mut reqs = Vec::new();
        for part in split_top_level(selector) {
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement::DoesNotExist(key.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelRequirement::NotIn(k.trim().to_owned(), parse_set(selector, rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelRequirement::In(k.trim().to_owned(), parse_set(selector, rest)?)
            } else if part.contains(char::is_whitespace) || part.contains('(') {
                return Err(err("unknown operator"));
            } else {
                LabelRequirement::Exists(part.to_owned())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

/// The value of a dotted field path as the API server compares it: strings as they
/// are, numbers and booleans in their JSON spelling, anything missing as "".
fn field_value(object: &Value, path: &str) -> String {
    let mut cur = object;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(next) => cur = next,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl FieldSelector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top_level(selector) {
            let (path, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(SelectorError {
                    selector: selector.to_owned(),
                    reason: "field selectors need =, == or !=",
                });
            };
            reqs.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(path, equal, value)| (field_value(object, path) == *value) == *equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "head", "namespace": "ray", "labels": {"ray.io/node-type": "head", "app": "x"}},
            "spec": {"nodeName": "node-a"},
        })
    }

    #[test]
    fn set_based_label_requirements_match_as_on_a_real_server() {
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&pod());
        assert!(ok("ray.io/node-type=head,app"));
        assert!(ok("ray.io/node-type in (head, worker),!missing"));
        assert!(ok("app notin (y),missing!=z"));
        assert!(!ok("ray.io/node-type==worker"));
        assert!(!ok("missing in (a)"));
        assert!(!ok("!app"));
        assert!(ok(""));
    }

    #[test]
    fn field_selector_reads_dotted_paths_and_missing_fields_as_empty() {
        let ok = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod());
        assert!(ok("spec.nodeName=node-a,metadata.name==head"));
        assert!(ok("metadata.namespace!=default"));
        assert!(ok("status.phase="));
        assert!(!ok("spec.nodeName=node-b"));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }
}
