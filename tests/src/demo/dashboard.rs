//! The shipped Grafana dashboard (`deploy/components/monitoring/dashboard.json`)
//! on the demo's real data (`rf-demo --dashboard`): a Prometheus server scrapes the
//! agent while the matrix is probed, then every panel's queries run against it as
//! Grafana would send them, and each panel is printed as text (its series and
//! their current values). A panel whose queries return no series shows nothing in
//! Grafana either: the report names it.
//!
//! The server is the one `cargo xtask setup` takes out of Debian's `prometheus`
//! package for the tests ([`PROMETHEUS`]); it runs inside the first node's network
//! namespace, where the agent's metrics listen on loopback, with the labels the
//! shipped PodMonitor gives (`job="rayfence-agent"`, `node`).
//!
//! Must not: run without being asked (the plain demo needs no Prometheus), or
//! leave the server or its data behind (killed and removed on drop).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::agent::{self, METRICS_ADDR};
use crate::netns::Netns;

/// Where `cargo xtask setup` puts the Prometheus server (`RAYFENCE_PROMETHEUS`
/// overrides).
pub const PROMETHEUS: &str = "/usr/local/lib/rayfence/prometheus";
/// Where it listens, inside the node namespace.
const LISTEN: &str = "127.0.0.1:9090";
/// Its scrape interval: short, so the probing leaves enough samples for rates.
const SCRAPE_INTERVAL: &str = "1s";
/// What `$__rate_interval` becomes: the whole probing window.
const RATE_INTERVAL: &str = "1m";

/// A Prometheus server scraping the agent; killed on drop.
#[derive(Debug)]
pub struct Scraper<'a> {
    child: Option<Child>,
    netns: &'a Netns,
}

impl<'a> Scraper<'a> {
    /// Starts the server in `node` (whose agent's metrics are on
    /// [`METRICS_ADDR`]), with its configuration and data under `dir`, and waits
    /// for its first successful scrape.
    pub fn start(node: &'a Netns, node_name: &str, dir: &Path) -> Result<Scraper<'a>> {
        let binary = std::env::var_os("RAYFENCE_PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PROMETHEUS));
        if !binary.exists() {
            bail!(
                "{} is missing: `cargo xtask setup` takes it out of Debian's prometheus package",
                binary.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: rayfence-agent\n    static_configs:\n      \
                 - targets: ['{METRICS_ADDR}']\n        labels:\n          node: {node_name}\n"
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let mut cmd = node.cmd(&binary.to_string_lossy());
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let scraper = Scraper {
            child: Some(child),
            netns: node,
        };
        let started = Instant::now();
        loop {
            super::guard::check()?;
            if let Ok(result) = scraper.query("up{job=\"rayfence-agent\"} == 1")
                && !result.is_empty()
            {
                return Ok(scraper);
            }
            if started.elapsed() > Duration::from_secs(20) {
                let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
                bail!("Prometheus did not scrape the agent within 20s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query's result vector (`data.result`).
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let addr: SocketAddr = LISTEN.parse()?;
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (code, body) = agent::http_get_at(self.netns, addr, &path)?;
        let answer: Value =
            serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
        if answer["status"] != "success" {
            bail!("{promql}: {}", answer["error"]);
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Scraper<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The dashboard as it showed: one text block per panel, and the panels that
/// had no series at all.
#[derive(Debug, Default)]
pub struct Rendered {
    pub text: String,
    pub panels: usize,
    pub empty: Vec<String>,
}

/// Runs every query of every panel of `dashboard` on `scraper` with each
/// template variable at "All", as Grafana sends them.
pub fn render(dashboard: &Value, scraper: &Scraper<'_>) -> Result<Rendered> {
    let mut out = Rendered::default();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let Some(targets) = panel["targets"].as_array() else {
            continue;
        };
        let title = panel["title"].as_str().unwrap_or("?");
        out.panels += 1;
        let _ = writeln!(out.text, "  [{title}]");
        let mut series = 0;
        for target in targets {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            let promql = as_grafana_sends(expr);
            for sample in scraper.query(&promql)? {
                series += 1;
                let labels = sample["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let value = match sample["value"][1].as_str().unwrap_or("?") {
                    // A quantile of no observations: nothing happened in the window.
                    "NaN" => "NaN (none observed in the window)",
                    value => value,
                };
                // A series without labels is named by its legend, as Grafana does.
                let legend = target["legendFormat"].as_str().unwrap_or("(total)");
                let name = if labels.is_empty() { legend } else { &labels };
                let _ = writeln!(out.text, "    {name:<60} {value}");
            }
        }
        if series == 0 {
            let _ = writeln!(out.text, "    (no data)");
            out.empty.push(title.to_owned());
        }
    }
    Ok(out)
}

/// A panel query with the dashboard's variables as Grafana fills them with "All"
/// (`allValue` `.*`) and `$__rate_interval` spanning the probing.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$node", ".*")
        .replace("$namespace", ".*")
        .replace("$raycluster", ".*")
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_become_all_and_the_query_is_encoded() {
        let q = as_grafana_sends(
            r#"sum(rate(rayfence_drops_total{node=~"$node", raycluster=~"$raycluster"}[$__rate_interval]))"#,
        );
        assert_eq!(
            q,
            r#"sum(rate(rayfence_drops_total{node=~".*", raycluster=~".*"}[1m]))"#
        );
        assert_eq!(percent_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}
