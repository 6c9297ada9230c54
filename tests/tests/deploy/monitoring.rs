//! deploy/overlays/monitoring (the base plus deploy/components/monitoring): the
//! PodMonitor scrapes exactly the agent pods, on the port they serve metrics on,
//! with the job and node labels the alerts and the dashboard select on, and never
//! lets a series' own labels win over the target's; every alert says how bad it is
//! and what to do; the dashboard ConfigMap is the dashboard file, for Grafana's
//! sidecar; the alerts' unit tests (`prometheusrule.test.yaml`: each alert fires on
//! the series that should raise it, after its `for:`, with its rendered annotations,
//! and stays silent otherwise) pass `promtool test rules`. (That the rules and the
//! dashboard query only series the agent exports,
//! and that promtool accepts both the scrape and the rules, is checked against a
//! real agent in agent_privileged.)

use anyhow::Result;
use rayfence_tests::deploy::monitoring::{dashboard, dashboard_exprs, rule_exprs, test_rules};
use rayfence_tests::deploy::*;
use serde_json::Value;

const OVERLAY: &str = "deploy/overlays/monitoring";

#[test]
fn the_pod_monitor_selects_the_agent_pods_on_their_metrics_port_as_job_rayfence_agent() -> Result<()>
{
    let docs = kustomize(OVERLAY)?;
    let ds = find(&docs, "DaemonSet", "rayfence-agent");
    let monitor = only(&docs, "PodMonitor");
    assert_eq!(
        monitor["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&pod_labels[key], value, "the agent pods carry {key}");
    }
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"][0],
        ds["metadata"]["namespace"]
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let port = endpoint["port"].as_str().expect("port by name");
    let ports = agent_container(ds)["ports"].as_array().expect("ports");
    assert!(
        ports.iter().any(|p| p["name"] == port),
        "the agent container has no port {port}: {ports:?}"
    );
    assert_eq!(endpoint["path"], "/metrics");
    // The agent's labels never take the place of the target's (it has none named
    // like them: pod_namespace, not namespace).
    assert_eq!(endpoint["honorLabels"], false);
    let relabel = |target: &str| -> Value {
        endpoint["relabelings"]
            .as_array()
            .expect("relabelings")
            .iter()
            .find(|r| r["targetLabel"] == target)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(relabel("job")["replacement"], "rayfence-agent");
    assert_eq!(
        relabel("node")["sourceLabels"][0],
        "__meta_kubernetes_pod_node_name"
    );
    // Metrics need a bearer token for the rayfence audience in the base.
    let env = agent_environment(&docs, ds);
    assert_eq!(
        env.get("RAYFENCE_METRICS_AUTH").map(String::as_str),
        Some("true")
    );
    assert_eq!(endpoint["authorization"]["type"], "Bearer");
    assert_eq!(
        endpoint["authorization"]["credentials"]["name"],
        "rayfence-metrics-token"
    );
    Ok(())
}

#[test]
fn every_alert_has_a_severity_a_summary_and_what_to_do_and_selects_the_monitor_job() -> Result<()> {
    let docs = kustomize(OVERLAY)?;
    let rule = only(&docs, "PrometheusRule");
    let mut alerts = 0;
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let Some(name) = r["alert"].as_str() else {
                assert!(r["record"].is_string(), "neither alert nor record: {r}");
                continue;
            };
            alerts += 1;
            let severity = r["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    r["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| !a.is_empty()),
                    "{name}: no {annotation}"
                );
            }
        }
    }
    assert!(alerts >= 8, "{alerts} alerts");
    // The same file the agent tests check, and every query is the monitor's job.
    let shipped = rayfence_tests::deploy::monitoring::prometheus_rule()?;
    assert_eq!(rule["spec"], shipped["spec"]);
    for expr in rule_exprs(rule) {
        if expr.contains("rayfence_") && !expr.contains("raycluster:rayfence_drops:rate5m") {
            assert!(expr.contains("job=\"rayfence-agent\""), "{expr}");
        }
    }
    Ok(())
}

#[test]
fn the_dashboard_config_map_is_the_dashboard_file_for_grafanas_sidecar() -> Result<()> {
    let docs = kustomize(OVERLAY)?;
    let map = find(&docs, "ConfigMap", "rayfence-dashboard");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let text = map["data"]["rayfence.json"]
        .as_str()
        .expect("rayfence.json");
    let rendered: Value = serde_json::from_str(text)?;
    let file = dashboard()?;
    assert_eq!(rendered, file);
    assert_eq!(file["uid"], "rayfence");
    for panel in file["panels"].as_array().expect("panels") {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
    }
    for expr in dashboard_exprs(&file) {
        if expr.contains("rayfence_") || expr.contains("process_") {
            assert!(expr.contains("job=\"rayfence-agent\""), "{expr}");
        }
    }
    Ok(())
}

#[test]
fn the_chart_renders_the_same_monitoring_as_the_component_and_none_by_default() -> Result<()> {
    use rayfence_tests::deploy::chart::{chart_dir, render};
    use serde_json::json;

    let none = render(&[], "rayfence-system")?;
    for kind in ["PodMonitor", "PrometheusRule"] {
        assert!(none.iter().all(|d| d["kind"] != kind), "{kind} by default");
    }
    let on = render(
        &[
            ("monitoring.podMonitor.enabled", json!(true)),
            ("monitoring.prometheusRule.enabled", json!(true)),
            ("monitoring.dashboard.enabled", json!(true)),
        ],
        "rayfence-system",
    )?;
    let docs = kustomize(OVERLAY)?;
    // The same scrape: the chart's selector also names the release (instance).
    let (chart_monitor, kustomize_monitor) = (only(&on, "PodMonitor"), only(&docs, "PodMonitor"));
    assert_eq!(
        chart_monitor["spec"]["podMetricsEndpoints"],
        kustomize_monitor["spec"]["podMetricsEndpoints"]
    );
    assert_eq!(
        chart_monitor["spec"]["namespaceSelector"],
        kustomize_monitor["spec"]["namespaceSelector"]
    );
    let chart_selector = &chart_monitor["spec"]["selector"]["matchLabels"];
    for (key, value) in kustomize_monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&chart_selector[key], value, "{key}");
    }
    let chart_pod =
        &find(&on, "DaemonSet", "rayfence-agent")["spec"]["template"]["metadata"]["labels"];
    for (key, value) in chart_selector.as_object().expect("matchLabels") {
        assert_eq!(&chart_pod[key], value, "the chart's agent pods carry {key}");
    }
    // The same rules, the same dashboard, read from the chart's own copies.
    assert_eq!(
        only(&on, "PrometheusRule")["spec"],
        only(&docs, "PrometheusRule")["spec"]
    );
    let dashboard_of = |docs: &[Value]| -> Value {
        let text = find(docs, "ConfigMap", "rayfence-dashboard")["data"]["rayfence.json"]
            .as_str()
            .expect("rayfence.json")
            .to_owned();
        serde_json::from_str(&text).expect("dashboard JSON")
    };
    assert_eq!(dashboard_of(&on), dashboard_of(&docs));
    assert_eq!(
        std::fs::read(chart_dir().join("files/dashboard.json"))?,
        std::fs::read(workspace().join("deploy/components/monitoring/dashboard.json"))?,
        "the chart's dashboard is a copy of the component's"
    );
    // Without metrics auth the scrape sends no token; with TLS it speaks HTTPS.
    let plain = render(
        &[
            ("monitoring.podMonitor.enabled", json!(true)),
            ("metrics.auth.enabled", json!(false)),
        ],
        "rayfence-system",
    )?;
    let endpoint = &only(&plain, "PodMonitor")["spec"]["podMetricsEndpoints"][0];
    assert!(endpoint.get("authorization").is_none(), "{endpoint}");
    Ok(())
}

#[test]
fn every_alert_fires_on_its_unit_test_series_and_only_there() -> Result<()> {
    let report = test_rules()?;
    assert!(report.contains("SUCCESS"), "{report}");
    // Every alert of the rule has a test case.
    let tests = std::fs::read_to_string(
        workspace().join("deploy/components/monitoring/prometheusrule.test.yaml"),
    )?;
    let rule = rayfence_tests::deploy::monitoring::prometheus_rule()?;
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for alert in group["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter_map(|r| r["alert"].as_str())
        {
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "no unit test for alert {alert}"
            );
        }
    }
    Ok(())
}
