//! Answers as a person reads them: aligned tables and short sentences (`-o table`),
//! or the same with every field shown (`-o wide`). Plain text, no colour.
use std::fmt::Write as _;

use comfy_table::{Table, presets::NOTHING};

use crate::operator::wire::{EndpointStatus, ExplainReport, FlowEnd, FlowRecord, StatusReport};

pub fn status(report: &StatusReport, wide: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {}, source {}, {} local endpoint(s){}{}",
        report.node,
        if report.ready { "ready" } else { "NOT READY" },
        report.source,
        report.endpoints.len(),
        if report.audit {
            ", global audit mode"
        } else {
            ""
        },
        match report.problems {
            0 => String::new(),
            n => format!(", {n} input problem(s) (see the agent's log or Events)"),
        }
    );
    if !report.node_trust.is_empty() {
        let _ = writeln!(out, "node trust: {}", report.node_trust);
    }
    if !report.host_network_pods.is_empty() {
        let _ = writeln!(
            out,
            "hostNetwork pods (their traffic is theirs, not the node's): {}",
            report.host_network_pods.join(", ")
        );
    }
    for held in &report.held {
        let _ = writeln!(
            out,
            "RayCluster {}/{} held fail-closed: needs {} entries in map {}, {} free (the other RayClusters keep their policy)",
            held.namespace, held.name, held.needed, held.map, held.free
        );
    }
    if !report.guarded_namespaces.is_empty() {
        let _ = writeln!(
            out,
            "CNI guard: new pods in {} are closed until programmed",
            report.guarded_namespaces.join(", ")
        );
    }
    for pod in &report.guarded {
        let _ = writeln!(
            out,
            "pending: {}/{} held by the CNI guard for {:.1}s (only its node reaches it; not programmed yet)",
            pod.namespace,
            pod.pod,
            pod.waited_ms as f64 / 1e3
        );
    }
    if report.endpoints.is_empty() {
        return out;
    }
    let (header, rows): (&[&str], Vec<Vec<String>>) = if wide {
        (
            &[
                "NAMESPACE",
                "POD",
                "RAYCLUSTER",
                "ROLE",
                "HOOK",
                "STATE",
                "MODE",
                "INGRESS",
                "EGRESS",
                "GEN",
                "DROPS",
                "WOULD-DROP",
                "DETAIL",
            ],
            report.endpoints.iter().map(wide_row).collect(),
        )
    } else {
        (
            &[
                "POD",
                "RAYCLUSTER",
                "ROLE",
                "HOOK",
                "STATE",
                "MODE",
                "ISOLATED",
                "GEN",
                "DROPS",
                "WOULD-DROP",
            ],
            report.endpoints.iter().map(row).collect(),
        )
    };
    out.push_str(&table(header, rows));
    out
}

fn row(e: &EndpointStatus) -> Vec<String> {
    let isolated = match (e.isolate_ingress, e.isolate_egress) {
        (true, true) => "ingress+egress",
        (true, false) => "ingress",
        (false, true) => "egress",
        (false, false) => "-",
    };
    vec![
        format!("{}/{}", e.namespace, e.pod),
        dash(e.raycluster.as_deref()),
        dash(e.role.as_deref()),
        e.hook.clone(),
        match &e.detail {
            Some(d) if e.state != "attached" => format!("{} ({d})", e.state),
            _ => e.state.clone(),
        },
        e.mode.clone(),
        isolated.into(),
        e.generation.to_string(),
        e.drops.to_string(),
        e.would_drops.to_string(),
    ]
}

fn wide_row(e: &EndpointStatus) -> Vec<String> {
    let isolated = |on: bool| if on { "isolated" } else { "-" }.to_owned();
    vec![
        e.namespace.clone(),
        e.pod.clone(),
        dash(e.raycluster.as_deref()),
        dash(e.role.as_deref()),
        e.hook.clone(),
        e.state.clone(),
        e.mode.clone(),
        isolated(e.isolate_ingress),
        isolated(e.isolate_egress),
        e.generation.to_string(),
        e.drops.to_string(),
        e.would_drops.to_string(),
        dash(e.detail.as_deref()),
    ]
}

fn dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// Columns left-aligned, two spaces apart, no borders (as `kubectl get` prints).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = Table::new();
    table
        .load_style(NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt() + "\n"
}

/// `ray/head (10.0.0.7:8265)`, `node 10.0.0.1`, `10.1.2.3 (ipBlock 10.1.0.0/16)`.
pub fn end(end: &FlowEnd) -> String {
    let addr = match end.port {
        0 => end.ip.to_string(),
        port if end.ip.is_ipv6() => format!("[{}]:{port}", end.ip),
        port => format!("{}:{port}", end.ip),
    };
    match (end.kind.as_str(), &end.namespace, &end.name) {
        ("pod", Some(ns), Some(name)) => format!("{ns}/{name} ({addr})"),
        ("service", Some(ns), Some(name)) => format!("service {ns}/{name} ({addr})"),
        ("node", ..) => format!("node {addr}"),
        ("cidr", ..) => format!("{addr} (ipBlock {})", end.cidr.as_deref().unwrap_or("?")),
        _ => format!("{addr} (outside the cluster's pods)"),
    }
}

/// Wide: the end's RayCluster, when it has one.
fn end_wide(flow_end: &FlowEnd) -> String {
    match &flow_end.raycluster {
        Some(rc) => format!("{} [raycluster {rc}]", end(flow_end)),
        None => end(flow_end),
    }
}

pub fn explanation(report: &ExplainReport, wide: bool) -> String {
    let show = if wide { end_wide } else { end };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {} {}: {}",
        show(&report.from),
        show(&report.to),
        report.protocol,
        report.verdict.to_uppercase()
    );
    for side in &report.sides {
        let _ = write!(
            out,
            "  {:<7} {:<12} {}",
            side.direction, side.verdict, side.because
        );
        if wide {
            if let Some(pod) = &side.pod {
                let _ = write!(out, " [at {pod}]");
            }
            if side.audit {
                let _ = write!(out, " [audit mode]");
            }
        }
        out.push('\n');
        for rule in &side.rules {
            let _ = writeln!(out, "  {:<7} {:<12}   by {rule}", "", "");
        }
    }
    out
}

pub fn flow(record: &FlowRecord, wide: bool) -> String {
    let show = if wide { end_wide } else { end };
    let mut line = format!(
        "{} {:<7} {:<7} {} -> {} {} reason={}",
        record.time,
        record.verdict.as_str().to_uppercase(),
        record.direction,
        show(&record.source),
        show(&record.destination),
        record.protocol,
        record.reason,
    );
    if let Some(rc) = &record.raycluster {
        let _ = write!(line, " raycluster={rc}");
    }
    if let Some(role) = &record.role {
        let _ = write!(line, " role={role}");
    }
    if wide {
        let _ = write!(
            line,
            " pod={}/{} bytes={} suppressed={}",
            record.namespace, record.pod, record.bytes, record.suppressed
        );
    } else if record.suppressed > 0 {
        let _ = write!(line, " (+{} suppressed before this)", record.suppressed);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(pod: &str, state: &str, detail: Option<&str>) -> EndpointStatus {
        EndpointStatus {
            namespace: "team-a".into(),
            pod: pod.into(),
            raycluster: Some("alpha".into()),
            role: Some("head".into()),
            hook: "tc".into(),
            state: state.into(),
            detail: detail.map(Into::into),
            mode: "enforce".into(),
            isolate_ingress: true,
            isolate_egress: false,
            generation: 3,
            drops: 12,
            would_drops: 0,
        }
    }

    fn report() -> StatusReport {
        StatusReport {
            node: "n1".into(),
            version: "0.1.0 (abc)".into(),
            ready: true,
            source: "files".into(),
            audit: false,
            problems: 0,
            node_trust: String::new(),
            host_network_pods: Vec::new(),
            held: Vec::new(),
            guarded_namespaces: Vec::new(),
            guarded: Vec::new(),
            endpoints: vec![
                endpoint("alpha-head-8x2kq", "attached", None),
                endpoint("w", "pending", Some("no cgroup yet")),
            ],
        }
    }

    #[test]
    fn the_status_table_is_aligned_two_spaces_apart_without_trailing_blanks() {
        let text = status(&report(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("POD                      RAYCLUSTER  ROLE"));
        assert!(lines[2].starts_with("team-a/alpha-head-8x2kq  alpha       head"));
        assert!(lines[3].contains("pending (no cgroup yet)"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text:?}");
        // Every column starts at the header's offset.
        let at = lines[1].find("WOULD-DROP").expect("header");
        assert_eq!(&lines[2][at..], "0");
    }

    #[test]
    fn wide_status_gives_every_field_its_own_column() {
        let text = status(&report(), true);
        let header = text.lines().nth(1).expect("header");
        for column in ["NAMESPACE", "INGRESS", "EGRESS", "DETAIL"] {
            assert!(header.contains(column), "{header}");
        }
        let pending = text.lines().nth(3).expect("row");
        assert!(
            pending.contains(" pending ") && pending.ends_with("no cgroup yet"),
            "{pending}"
        );
    }

    #[test]
    fn status_says_how_node_trust_works_and_which_host_network_pods_are_known() {
        let mut report = report();
        report.node_trust = "conntrack: NATed traffic is judged by its original source".into();
        report.host_network_pods = vec!["monitoring/node-exporter".into()];
        let text = status(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "node trust: conntrack: NATed traffic is judged by its original source"
        );
        assert_eq!(
            lines[2],
            "hostNetwork pods (their traffic is theirs, not the node's): monitoring/node-exporter"
        );
        assert!(lines[3].starts_with("POD "), "{text}");
    }

    #[test]
    fn status_lists_guarded_namespaces_and_pending_guarded_pods() {
        let mut report = report();
        report.guarded_namespaces = vec!["team-a".into(), "team-b".into()];
        report.guarded = vec![crate::operator::wire::GuardedPod {
            namespace: "team-a".into(),
            pod: "alpha-worker-x".into(),
            ifindex: 12,
            waited_ms: 2500,
        }];
        let text = status(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "CNI guard: new pods in team-a, team-b are closed until programmed"
        );
        assert_eq!(
            lines[2],
            "pending: team-a/alpha-worker-x held by the CNI guard for 2.5s (only its node reaches it; not programmed yet)"
        );
    }

    #[test]
    fn status_names_a_held_raycluster_with_its_numbers() {
        let mut report = report();
        report.held = vec![crate::operator::wire::HeldRayCluster {
            namespace: "team-b".into(),
            name: "big".into(),
            map: "RF_CIDR_V1".into(),
            needed: 17001,
            free: 1003,
        }];
        let text = status(&report, false);
        assert_eq!(
            text.lines().nth(1),
            Some(
                "RayCluster team-b/big held fail-closed: needs 17001 entries in map RF_CIDR_V1, 1003 free (the other RayClusters keep their policy)"
            ),
            "{text}"
        );
    }
}
