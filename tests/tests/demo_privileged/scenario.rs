//! The demo scenario (`cargo xtask demo`) as tests, so CI runs it: with the agent
//! every verdict must match the hand-written matrix; without it, the harness must
//! see every flow get through, i.e. exactly the expected-dropped cells differ
//! (which checks the probing and the comparison themselves). With the agent,
//! `rayfence explain` must also give the datapath's verdict for every probed flow.
//! Root only.

use rayfence_tests::agent_bin::rayfence_bin;
use rayfence_tests::demo::{self, Options};
use rayfence_tests::probe_bin;

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
    let report = demo::run(&Options::new(
        Some(rayfence_bin().expect("the rayfence binary")),
        probe_bin(),
    ))
    .expect("demo");
    assert!(
        report.passed(),
        "{} of {} verdicts differ:\n{}\nexplain disagrees on {} of {}:\n{}",
        report.mismatches.len(),
        report.probed,
        report.mismatches.join("\n"),
        report.explain_disagreements.len(),
        report.explained,
        report.explain_disagreements.join("\n")
    );
    assert_eq!(
        report.explained, report.probed,
        "every probed flow is explained"
    );
}
