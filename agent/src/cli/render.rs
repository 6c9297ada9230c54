//! Answers as a person reads them: aligned tables and short sentences.
use std::fmt::Write as _;

use crate::api::{ExplainReport, FlowEnd, FlowRecord, StatusReport};

pub fn status(report: &StatusReport) -> String {
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
    if report.endpoints.is_empty() {
        return out;
    }
    let header = [
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
    ];
    let rows: Vec<[String; 10]> = report
        .endpoints
        .iter()
        .map(|e| {
            let isolated = match (e.isolate_ingress, e.isolate_egress) {
                (true, true) => "ingress+egress",
                (true, false) => "ingress",
                (false, true) => "egress",
                (false, false) => "-",
            };
            [
                format!("{}/{}", e.namespace, e.pod),
                e.raycluster.clone().unwrap_or_else(|| "-".into()),
                e.role.clone().unwrap_or_else(|| "-".into()),
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
        })
        .collect();
    table(&mut out, &header, &rows);
    out
}

fn table<const N: usize>(out: &mut String, header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, header.to_vec());
    for row in rows {
        line(out, row.iter().map(String::as_str).collect());
    }
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

pub fn explanation(report: &ExplainReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {} {}: {}",
        end(&report.from),
        end(&report.to),
        report.protocol,
        report.verdict.to_uppercase()
    );
    for side in &report.sides {
        let _ = writeln!(
            out,
            "  {:<7} {:<12} {}",
            side.direction, side.verdict, side.because
        );
        for rule in &side.rules {
            let _ = writeln!(out, "  {:<7} {:<12}   by {rule}", "", "");
        }
    }
    out
}

pub fn flow(record: &FlowRecord) -> String {
    let mut line = format!(
        "{} {:<7} {:<7} {} -> {} {} reason={}",
        record.time,
        record.verdict.as_str().to_uppercase(),
        record.direction,
        end(&record.source),
        end(&record.destination),
        record.protocol,
        record.reason,
    );
    if let Some(rc) = &record.raycluster {
        let _ = write!(line, " raycluster={rc}");
    }
    if let Some(role) = &record.role {
        let _ = write!(line, " role={role}");
    }
    if record.suppressed > 0 {
        let _ = write!(line, " (+{} suppressed before this)", record.suppressed);
    }
    line
}
