//! deploy/helm/rayfence installed the way helm installs it, because no helm binary
//! is available where the tests run: values.yaml merged with the overrides, checked
//! against values.schema.json ([`super::schema`]), then every template rendered
//! ([`super::template`], strict: an unknown construct, function or value is an
//! error) with `.Values`, `.Release` and `.Chart`. Must not: decide what the chart
//! should render; the assertions live in the tests.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Map, Value, json};

use super::template::{Templates, helm_numbers};
use super::{documents, schema, workspace};

/// The release name the README installs with, so the objects' names are the
/// Kustomize base's (rayfence-agent, ...).
pub const RELEASE: &str = "rayfence";

pub fn chart_dir() -> PathBuf {
    workspace().join("deploy/helm/rayfence")
}

fn yaml_file(name: &str) -> Result<Value> {
    let text = std::fs::read_to_string(chart_dir().join(name)).context(name.to_owned())?;
    serde_norway::from_str(&text).context(name.to_owned())
}

/// Chart.yaml as written.
pub fn chart_yaml() -> Result<Value> {
    yaml_file("Chart.yaml")
}

/// values.yaml as written.
pub fn default_values() -> Result<Value> {
    yaml_file("values.yaml")
}

/// values.schema.json.
pub fn values_schema() -> Result<Value> {
    let text = std::fs::read_to_string(chart_dir().join("values.schema.json"))?;
    serde_json::from_str(&text).context("values.schema.json")
}

/// Every file under templates/ (name, text), sorted by name: the manifests
/// (`*.yaml`), the named templates (`_*.tpl`) and NOTES.txt.
pub fn templates() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(chart_dir().join("templates"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".yaml") || name.ends_with(".tpl") || name == "NOTES.txt") {
            bail!("templates/{name}: neither a manifest, a named template nor NOTES.txt");
        }
        out.push((name, std::fs::read_to_string(&path)?));
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

/// Sets a dotted path as `--set path=value` does, making the maps on the way
/// (a key values.yaml lacks is for the schema to refuse, as helm does).
pub fn set(values: &mut Value, path: &str, new: Value) {
    let mut at = values;
    for key in path.split('.') {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        at = at
            .as_object_mut()
            .unwrap()
            .entry(key)
            .or_insert(Value::Null);
    }
    *at = new;
}

/// values.yaml with `overrides` (dotted path, value), checked against
/// values.schema.json: an Err names every field the schema refuses.
pub fn values(overrides: &[(&str, Value)]) -> Result<Value> {
    let mut values = default_values()?;
    for (path, value) in overrides {
        set(&mut values, path, value.clone());
    }
    // As helm reads a values file: every number a float64.
    let values = helm_numbers(&values);
    let refused = schema::violations(&values_schema()?, &values)?;
    if !refused.is_empty() {
        bail!(
            "the values do not meet values.schema.json:\n- {}",
            refused.join("\n- ")
        );
    }
    Ok(values)
}

/// What an install shows: the objects and NOTES.txt.
pub struct Installed {
    pub objects: Vec<Value>,
    pub notes: String,
}

/// `helm install RELEASE deploy/helm/rayfence -n NAMESPACE --set ...` as far as
/// the cluster sees it: the values checked, the manifests rendered.
pub fn install(release: &str, namespace: &str, overrides: &[(&str, Value)]) -> Result<Installed> {
    let values = values(overrides)?;
    let dot = dot(values, release, namespace)?;
    let mut parsed = Templates::default();
    let files = templates()?;
    for (name, text) in &files {
        parsed.add(name, text)?;
    }
    let mut objects = Vec::new();
    let mut notes = None;
    for (name, _) in &files {
        // Named templates render nothing of their own; helm skips `_*` files.
        if name.starts_with('_') {
            continue;
        }
        let out = parsed.render(name, &dot)?;
        if name == "NOTES.txt" {
            notes = Some(out);
        } else {
            objects.extend(documents(&out).with_context(|| format!("{name} rendered:\n{out}"))?);
        }
    }
    Ok(Installed {
        objects,
        notes: notes.ok_or_else(|| anyhow!("no templates/NOTES.txt"))?,
    })
}

/// The chart's objects with values.yaml plus `overrides`, release [`RELEASE`] in
/// namespace `namespace`.
pub fn render(overrides: &[(&str, Value)], namespace: &str) -> Result<Vec<Value>> {
    Ok(install(RELEASE, namespace, overrides)?.objects)
}

/// One template text with `.Values` = `values` (numbers as helm reads them),
/// release [`RELEASE`] in `namespace`, and the chart's named templates.
pub fn render_text(template: &str, values: &Value, namespace: &str) -> Result<String> {
    let mut parsed = Templates::default();
    parsed.add("inline", template)?;
    parsed.render("inline", &dot(helm_numbers(values), RELEASE, namespace)?)
}

/// The root of every template: `.Values`, `.Release`, `.Chart` (Chart.yaml's keys
/// as helm names them: `appVersion` is `.Chart.AppVersion`), `.Files`.
fn dot(values: Value, release: &str, namespace: &str) -> Result<Value> {
    let chart_yaml = chart_yaml()?;
    let chart: Map<String, Value> = chart_yaml
        .as_object()
        .ok_or_else(|| anyhow!("Chart.yaml is not a map"))?
        .iter()
        .map(|(key, v)| {
            let helm_key = match key.as_str() {
                "apiVersion" => "APIVersion".to_owned(),
                other => {
                    let mut chars = other.chars();
                    chars
                        .next()
                        .map(|first| first.to_uppercase().chain(chars).collect())
                        .unwrap_or_default()
                }
            };
            (helm_key, v.clone())
        })
        .collect();
    Ok(json!({
        "Values": values,
        "Release": {
            "Name": release,
            "Namespace": namespace,
            "Service": "Helm",
            "IsInstall": true,
            "IsUpgrade": false,
            "Revision": 1,
        },
        "Chart": chart,
        "Files": chart_files()?,
    }))
}

/// The chart's `files/` (what `.Files.Get "files/..."` reads), by path.
fn chart_files() -> Result<Value> {
    let mut files = Map::new();
    let dir = chart_dir().join("files");
    if dir.is_dir() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("{} has no name", path.display()))?;
            let text =
                std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
            files.insert(format!("files/{name}"), Value::String(text));
        }
    }
    Ok(Value::Object(files))
}

/// Does `dir` hold a Helm chart at all (Chart.yaml with apiVersion v2)?
pub fn is_chart(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Chart.yaml")).is_ok_and(|t| t.contains("apiVersion: v2"))
}
