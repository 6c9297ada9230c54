//! A deliberately tiny evaluator for deploy/helm/rayfence's templates, because no
//! helm binary is available where the tests run. It knows exactly the constructs
//! the chart uses and rejects anything else, so a template that grows a new
//! construct fails here rather than rendering wrongly:
//!
//! - `{{ .Values.a.b }}`, `{{ .Release.Namespace }}` (scalars: strings as is,
//!   numbers and booleans as Go prints them);
//! - `{{ X | quote }}` (a double-quoted string);
//! - `{{ join "," .Values.list | quote }}`;
//! - `{{- toYaml .Values.x | nindent N }}` (a newline, then the YAML indented N);
//! - `{{- if .Values.x }}` ... `{{- end }}` (Go template truthiness; nesting ok);
//! - `{{-` / `-}}` trim the whitespace before / after the action, as in Go.
//!
//! `values.yaml` is the default; [`render`] takes overrides as (dotted path, value).
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

use super::{documents, workspace};

pub fn chart_dir() -> std::path::PathBuf {
    workspace().join("deploy/helm/rayfence")
}

/// values.yaml as JSON.
pub fn default_values() -> Result<Value> {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    Ok(serde_norway::from_str(&text)?)
}

/// Every template file (name, text), sorted by name.
pub fn templates() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(chart_dir().join("templates"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read_to_string(&path)?));
        }
    }
    out.sort();
    Ok(out)
}

/// Every `.Values.a.b` path a template text refers to (without `.Values.`).
pub fn value_paths(template: &str) -> Vec<String> {
    template
        .match_indices(".Values.")
        .map(|(at, m)| {
            template[at + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect::<String>()
                .trim_end_matches('.')
                .to_owned()
        })
        .collect()
}

/// The value at a dotted path, `None` when a key is missing.
pub fn lookup<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(values, |v, key| v.as_object()?.get(key))
}

/// Sets a dotted path (which must exist: overrides of unknown values are mistakes).
pub fn set(values: &mut Value, path: &str, new: Value) {
    let mut at = values;
    for key in path.split('.') {
        at = at
            .as_object_mut()
            .and_then(|o| o.get_mut(key))
            .unwrap_or_else(|| panic!("values.yaml has no {path}"));
    }
    *at = new;
}

/// The chart's objects with values.yaml plus `overrides`, in namespace `namespace`.
pub fn render(overrides: &[(&str, Value)], namespace: &str) -> Result<Vec<Value>> {
    let mut values = default_values()?;
    for (path, value) in overrides {
        set(&mut values, path, value.clone());
    }
    let mut docs = Vec::new();
    for (name, text) in templates()? {
        let out = render_text(&text, &values, namespace).with_context(|| name.clone())?;
        docs.extend(documents(&out).with_context(|| format!("{name} rendered:\n{out}"))?);
    }
    Ok(docs)
}

/// One template's text.
pub fn render_text(template: &str, values: &Value, namespace: &str) -> Result<String> {
    // Split into text and actions, applying the trim markers.
    let mut pieces: Vec<(bool, String)> = Vec::new(); // (is_action, text)
    let mut rest = template;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = rest[..open].to_owned();
        if trim_next {
            text = text.trim_start().to_owned();
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| anyhow!("unclosed {{{{"))?;
        let mut action = &after[..close];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end().to_owned();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        pieces.push((false, text));
        pieces.push((true, action.trim().to_owned()));
        rest = &after[close + 2..];
    }
    let mut tail = rest.to_owned();
    if trim_next {
        tail = tail.trim_start().to_owned();
    }
    pieces.push((false, tail));

    let mut out = String::new();
    // The stack of enclosing `if`s: emit only when all are true.
    let mut conditions: Vec<bool> = Vec::new();
    for (is_action, piece) in pieces {
        let emitting = conditions.iter().all(|c| *c);
        if !is_action {
            if emitting {
                out.push_str(&piece);
            }
            continue;
        }
        if let Some(expr) = piece.strip_prefix("if ") {
            conditions.push(truthy(eval(expr.trim(), values, namespace)?));
        } else if piece == "end" {
            conditions
                .pop()
                .ok_or_else(|| anyhow!("{{{{ end }}}} without if"))?;
        } else if emitting {
            out.push_str(&pipeline(&piece, values, namespace)?);
        }
    }
    if !conditions.is_empty() {
        bail!("unterminated if");
    }
    Ok(out)
}

fn pipeline(action: &str, values: &Value, namespace: &str) -> Result<String> {
    let mut stages = action.split('|').map(str::trim);
    let first = stages.next().unwrap_or_default();
    let mut current = if let Some(arg) = first.strip_prefix("toYaml ") {
        Value::String(
            serde_norway::to_string(&eval(arg.trim(), values, namespace)?)?
                .trim_end()
                .to_owned(),
        )
    } else if let Some(args) = first.strip_prefix("join ") {
        let (sep, list) = args
            .trim()
            .split_once(' ')
            .ok_or_else(|| anyhow!("join SEP LIST"))?;
        let sep: String = serde_json::from_str(sep).context("join separator")?;
        let list = eval(list.trim(), values, namespace)?;
        let items = list
            .as_array()
            .ok_or_else(|| anyhow!("join of a non-list"))?;
        Value::String(
            items
                .iter()
                .map(scalar)
                .collect::<Result<Vec<_>>>()?
                .join(&sep),
        )
    } else {
        eval(first, values, namespace)?
    };
    for stage in stages {
        current = if stage == "quote" {
            Value::String(serde_json::to_string(&scalar(&current)?)?)
        } else if let Some(n) = stage.strip_prefix("nindent ") {
            let n: usize = n.trim().parse().context("nindent N")?;
            let pad = " ".repeat(n);
            let text = scalar(&current)?;
            Value::String(
                text.lines()
                    .map(|l| format!("\n{pad}{l}"))
                    .collect::<String>(),
            )
        } else {
            bail!("unsupported template function {stage:?} (see tests/src/deploy/chart.rs)");
        };
    }
    scalar(&current)
}

fn eval(expr: &str, values: &Value, namespace: &str) -> Result<Value> {
    if expr == ".Release.Namespace" {
        return Ok(Value::String(namespace.to_owned()));
    }
    let path = expr.strip_prefix(".Values.").ok_or_else(|| {
        anyhow!("unsupported expression {expr:?} (see tests/src/deploy/chart.rs)")
    })?;
    lookup(values, path)
        .cloned()
        .ok_or_else(|| anyhow!("values.yaml has no {path}"))
}

fn scalar(v: &Value) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => bail!("{other} is not a scalar (use toYaml)"),
    })
}

fn truthy(v: Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Does `dir` hold a Helm chart at all (Chart.yaml with apiVersion v2)?
pub fn is_chart(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Chart.yaml")).is_ok_and(|t| t.contains("apiVersion: v2"))
}
