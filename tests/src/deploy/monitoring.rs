//! The monitoring package (`deploy/components/monitoring`) as the tests read it:
//! Prometheus's own checker (`promtool`, which `cargo xtask setup` takes out of
//! Debian's `prometheus` package), the metric names an exposition declares, and the
//! metric names the alert rules and the dashboard query.
use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::workspace;

/// Where `cargo xtask setup` puts promtool (`RAYFENCE_PROMTOOL` overrides).
pub fn promtool() -> PathBuf {
    std::env::var_os("RAYFENCE_PROMTOOL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/promtool"))
}

/// Runs `promtool <args>` with `stdin`; its output when it succeeds.
pub fn run_promtool(args: &[&str], stdin: &str) -> Result<String> {
    let path = promtool();
    let mut child = Command::new(&path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} (cargo xtask setup installs it)", path.display()))?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// The series names a Prometheus text exposition declares: each `# TYPE` name,
/// and a histogram's `_bucket`, `_sum` and `_count`.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for declared in exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = declared.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_owned());
    }
    names
}

/// The label names of every sample line.
pub fn sample_label_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(labels, _)| labels)
        else {
            continue;
        };
        for pair in labels.split("\",") {
            if let Some((name, _)) = pair.split_once('=') {
                names.insert(name.trim().to_owned());
            }
        }
    }
    names
}

/// The metric names a PromQL expression reads: the identifiers that start like
/// rayfence's or the standard process series (recording rules, with a `:`, and
/// Prometheus's own `up` are left out).
pub fn queried_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            // A label matcher's value is not a metric name.
            quoted = !quoted;
            word.clear();
            continue;
        }
        if quoted {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if (word.starts_with("rayfence_") || word.starts_with("process_")) && !word.contains(':') {
            names.insert(word.clone());
        }
        word.clear();
    }
    names
}

fn component(file: &str) -> PathBuf {
    workspace().join("deploy/components/monitoring").join(file)
}

/// The PrometheusRule shipped in the component.
pub fn prometheus_rule() -> Result<Value> {
    let path = component("prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_norway::from_str(&text).with_context(|| path.display().to_string())
}

/// Every `expr` of the PrometheusRule.
pub fn rule_exprs(rule: &Value) -> Vec<String> {
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned))
        .collect()
}

/// Runs the alert rules' unit tests (`prometheusrule.test.yaml` in the component)
/// with `promtool test rules`, on the PrometheusRule's `spec` written as the
/// `rules.yaml` they load, in a scratch directory; promtool's report.
pub fn test_rules() -> Result<String> {
    let scratch = std::env::temp_dir().join(crate::names::unique_name("rules"));
    std::fs::create_dir_all(&scratch)?;
    let tested = (|| {
        let spec = serde_norway::to_string(&prometheus_rule()?["spec"])?;
        std::fs::write(scratch.join("rules.yaml"), spec)?;
        let tests = scratch.join("prometheusrule.test.yaml");
        std::fs::copy(component("prometheusrule.test.yaml"), &tests)?;
        run_promtool(
            &["test", "rules", tests.to_str().context("scratch path")?],
            "",
        )
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    tested
}

/// The dashboard JSON shipped in the component.
pub fn dashboard() -> Result<Value> {
    let path = component("dashboard.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// Every query of the dashboard: panel targets and template variables.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let targets = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["query"]["query"].as_str().map(str::to_owned));
    targets.chain(variables).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queried_names_are_the_metric_identifiers_only() {
        let expr = r#"sum by (pod_namespace) (rate(rayfence_drops_total{job="rayfence-agent", reason="rayfence_x"}[5m])) / raycluster:rayfence_drops:rate5m + up + process_open_fds"#;
        let names: Vec<String> = queried_names(expr).into_iter().collect();
        assert_eq!(names, ["process_open_fds", "rayfence_drops_total"]);
    }

    #[test]
    fn histograms_declare_their_three_series_and_labels_are_read_per_sample() {
        let text = "# TYPE rf_latency_seconds histogram\nrf_latency_seconds_bucket{le=\"1\"} 0\n# TYPE rf_drops_total counter\nrf_drops_total{direction=\"in\",pod_namespace=\"a,b\"} 1\n";
        let names = exported_names(text);
        assert!(names.contains("rf_latency_seconds_bucket") && names.contains("rf_drops_total"));
        let labels: Vec<String> = sample_label_names(text).into_iter().collect();
        assert_eq!(labels, ["direction", "le", "pod_namespace"]);
    }
}
