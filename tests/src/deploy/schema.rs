//! The part of JSON Schema (draft-07) that deploy/helm/rayfence/values.schema.json
//! uses, checked the way helm checks a chart's values before rendering. Must not:
//! pass what it does not understand. A keyword it does not know is an error, so
//! the schema cannot carry a rule the tests do not enforce.
//!
//! Keywords: `type` (one or a list; `integer` is a number without a fraction, as
//! helm reads every number as a float), `enum`, `minimum`, `maximum`,
//! `minLength`, `properties`, `additionalProperties` (false or a schema),
//! `required`, `items`; `$schema`, `title` and `description` are notes.

use anyhow::{Result, bail};
use serde_json::Value;

/// Every way `value` breaks `schema`, each as "field: why" (the field dotted from
/// the top, `[i]` for list items); empty when it passes. Err for a schema this
/// check cannot read.
pub fn violations(schema: &Value, value: &Value) -> Result<Vec<String>> {
    let mut out = Vec::new();
    check(schema, value, "", &mut out)?;
    Ok(out)
}

fn check(schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) -> Result<()> {
    let Some(schema) = schema.as_object() else {
        bail!("{}: a schema must be an object", name(at));
    };
    let field = name(at);
    for (keyword, rule) in schema {
        match keyword.as_str() {
            "$schema" | "title" | "description" => {}
            "type" => {
                let types: Vec<&str> = match rule {
                    Value::String(t) => vec![t],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => bail!("{field}: type must be a string or a list"),
                };
                for t in &types {
                    if !matches!(
                        *t,
                        "object" | "array" | "string" | "integer" | "number" | "boolean" | "null"
                    ) {
                        bail!("{field}: unknown type {t:?}");
                    }
                }
                if !types.iter().any(|t| is_type(value, t)) {
                    out.push(format!(
                        "{field}: got {}, want {}",
                        type_of(value),
                        types.join(" or ")
                    ));
                }
            }
            "enum" => {
                let Some(allowed) = rule.as_array() else {
                    bail!("{field}: enum must be a list");
                };
                if !allowed.contains(value) {
                    out.push(format!(
                        "{field}: {value} is not one of {}",
                        serde_json::to_string(allowed)?
                    ));
                }
            }
            "minimum" | "maximum" => {
                let Some(bound) = rule.as_f64() else {
                    bail!("{field}: {keyword} must be a number");
                };
                if let Some(n) = value.as_f64() {
                    let within = if keyword == "minimum" {
                        n >= bound
                    } else {
                        n <= bound
                    };
                    if !within {
                        out.push(format!(
                            "{field}: {value} is out of range ({keyword} {rule})"
                        ));
                    }
                }
            }
            "minLength" => {
                let Some(min) = rule.as_u64() else {
                    bail!("{field}: minLength must be a count");
                };
                if let Some(s) = value.as_str()
                    && (s.chars().count() as u64) < min
                {
                    out.push(format!("{field}: {value} is shorter than {min}"));
                }
            }
            "properties" => {
                let Some(properties) = rule.as_object() else {
                    bail!("{field}: properties must be an object");
                };
                if let Some(map) = value.as_object() {
                    for (key, sub) in properties {
                        if let Some(v) = map.get(key) {
                            check(sub, v, &join(at, key), out)?;
                        }
                    }
                }
            }
            "additionalProperties" => {
                let known = schema.get("properties").and_then(Value::as_object);
                let Some(map) = value.as_object() else {
                    continue;
                };
                let extra = map
                    .iter()
                    .filter(|(k, _)| known.is_none_or(|p| !p.contains_key(*k)));
                for (key, v) in extra {
                    match rule {
                        Value::Bool(true) => {}
                        Value::Bool(false) => out.push(format!(
                            "{}: not allowed here (no such value in values.yaml)",
                            name(&join(at, key))
                        )),
                        sub => check(sub, v, &join(at, key), out)?,
                    }
                }
            }
            "required" => {
                let Some(keys) = rule.as_array() else {
                    bail!("{field}: required must be a list");
                };
                if let Some(map) = value.as_object() {
                    for key in keys.iter().filter_map(Value::as_str) {
                        if !map.contains_key(key) {
                            out.push(format!("{}: required", name(&join(at, key))));
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (i, v) in items.iter().enumerate() {
                        check(rule, v, &format!("{at}[{i}]"), out)?;
                    }
                }
            }
            other => bail!(
                "{field}: the schema keyword {other:?} is not checked (see tests/src/deploy/schema.rs)"
            ),
        }
    }
    Ok(())
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|n| n.fract() == 0.0),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

fn type_of(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "boolean".to_owned(),
        Value::Number(_) => format!("number {value}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "array".to_owned(),
        Value::Object(_) => "object".to_owned(),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn name(at: &str) -> String {
    if at.is_empty() {
        "(the values)".to_owned()
    } else {
        at.to_owned()
    }
}
