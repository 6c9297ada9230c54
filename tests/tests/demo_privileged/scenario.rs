//! The demo scenario (`cargo xtask demo`) as tests, so CI runs it: with the agent
//! every verdict must match the hand-written matrix; without it, the harness must
//! see every flow get through, i.e. exactly the expected-dropped cells differ
//! (which checks the probing and the comparison themselves). With the agent,
//! `rayfence explain` must also give the datapath's verdict for every probed flow,
//! on every shape of node the lab builds ([`rayfence_tests::shape::SHAPES`]).
//! Root only.

use rayfence_tests::agent_bin::rayfence_bin;
use rayfence_tests::demo::{self, Options, Report};
use rayfence_tests::probe_bin;
use rayfence_tests::shape::{self, SHAPES, Shape};

#[test]
fn without_agent_exactly_the_expected_drops_get_through() {
    let report = demo::run(&Options::new(None, probe_bin())).expect("demo harness");
    assert_eq!(
        report.observed_allowed, report.probed,
        "with nothing enforcing, every probe must get through"
    );
    assert_eq!(
        report.mismatches.len(),
        report.expected_dropped,
        "the mismatches must be exactly the expected-dropped cells: {:#?}",
        report.mismatches
    );
    assert!(report.expected_dropped > 0 && !report.passed());
}

#[test]
fn with_agent_every_verdict_matches_the_expected_matrix_and_explain_agrees_on_each() {
    let report = every_verdict_matches_on(shape::DEFAULT.name, true);
    // The shipped dashboard on this run's data (a Prometheus server scraped the
    // agent during the probes): every panel has series, but the audit ones (no
    // RayCluster of the demo is in audit mode).
    let panels = rayfence_tests::deploy::monitoring::dashboard().expect("the dashboard")["panels"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(panels >= 10, "{panels} panels");
    assert_eq!(report.dashboard_panels, panels);
    let unexpected: Vec<&String> = report
        .dashboard_empty
        .iter()
        .filter(|title| !title.contains("Would-drops"))
        .collect();
    assert!(unexpected.is_empty(), "panels without data: {unexpected:?}");
}

/// The same matrix, with the agent, on every other shape the lab builds: the
/// expectation does not change with the CNI, the kube-proxy mode, the runtime, the
/// cgroup layout or the DNS (the README's support matrix links here).
#[test]
fn on_every_other_shape_every_verdict_matches_the_expected_matrix() {
    let mut failed = Vec::new();
    for shape in SHAPES.iter().filter(|s| **s != shape::DEFAULT) {
        if let Err(panic) = std::panic::catch_unwind(|| every_verdict_matches_on(shape.name, false))
        {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("shape {}: {why}", shape.name));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

fn every_verdict_matches_on(shape: &str, dashboard: bool) -> Report {
    let mut options = Options::new(
        Some(rayfence_bin().expect("the rayfence binary")),
        probe_bin(),
    );
    options.shape = Shape::named(shape).expect("a known shape");
    options.dashboard = dashboard;
    let report = demo::run(&options).expect("demo");
    assert!(
        report.passed(),
        "shape {shape}: {} of {} verdicts differ:\n{}\nexplain disagrees on {} of {}:\n{}",
        report.mismatches.len(),
        report.probed,
        report.mismatches.join("\n"),
        report.explain_disagreements.len(),
        report.explained,
        report.explain_disagreements.join("\n")
    );
    assert_eq!(
        report.explained, report.probed,
        "shape {shape}: every probed flow is explained"
    );
    report
}
