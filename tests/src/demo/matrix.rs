//! Probing every (source, target) cell and printing the matrix.
//!
//! Probes run in parallel (each is one short-lived `rf-probe` process): a dropped
//! flow costs a full timeout, so a sequential sweep of ~150 cells would take
//! minutes. A cell whose result differs from the expectation is probed once more,
//! alone, before it counts as a mismatch, so a probe that lost a race with the
//! scheduler on a busy machine is not reported as a policy bug.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::probe::{Outcome, Prober};

use super::expected::Expect;
use super::scenario::{Proto, Target};

/// One probe: who sends, where to.
#[derive(Debug, Clone)]
pub struct Cell {
    pub row: usize,
    pub col: usize,
    pub prober: Prober,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub expect: Expect,
}

/// What a probed cell showed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub outcome: Outcome,
    /// The first attempt disagreed with the expectation and was repeated.
    pub retried: bool,
}

impl Observed {
    pub fn allowed(&self) -> bool {
        self.outcome.is_ok()
    }
}

fn probe(c: &Cell, timeout: Duration) -> Outcome {
    match c.proto {
        Proto::Tcp => c.prober.tcp_connect(c.addr, c.port, timeout),
        Proto::Udp => c.prober.udp_probe(c.addr, c.port, timeout),
    }
}

/// Whether an outcome agrees with an expectation. A harness error (anything but a
/// clean success or a blocked flow) never agrees.
pub fn agrees(expect: Expect, o: &Outcome) -> bool {
    match expect {
        Expect::Allowed => o.is_ok(),
        Expect::Dropped => o.is_blocked(),
        Expect::NotProbed => true,
    }
}

/// Runs every cell with `parallel` probes at a time; returns outcomes by index.
pub fn run(cells: &[Cell], timeout: Duration, parallel: usize) -> Vec<Observed> {
    let queue: Mutex<VecDeque<usize>> = Mutex::new((0..cells.len()).collect());
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; cells.len()]);
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(i) = next else { break };
                    let Some(_slot) = super::guard::probe_slot() else {
                        break;
                    };
                    let o = probe(&cells[i], timeout);
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(o);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    cells
        .iter()
        .zip(results)
        .map(|(c, o)| {
            let o = o.unwrap_or_else(|| Outcome::Error("not probed".into()));
            if agrees(c.expect, &o) {
                Observed {
                    outcome: o,
                    retried: false,
                }
            } else {
                let outcome = match super::guard::probe_slot() {
                    Some(_slot) => probe(c, timeout),
                    None => Outcome::Error("interrupted".into()),
                };
                Observed {
                    outcome,
                    retried: true,
                }
            }
        })
        .collect()
}

/// The matrix as text: one row per source, one column per target; each cell says
/// what was expected and what happened.
pub fn render(
    sources: &[&str],
    targets: &[Target],
    cells: &[Cell],
    observed: &[Observed],
) -> String {
    const W: usize = 9;
    let mut grid: Vec<Vec<String>> = vec![vec!["·".into(); targets.len()]; sources.len()];
    // A cell may hold an IPv4 and an IPv6 probe: it shows ok/drop when both
    // agree, else the disagreement (suffixed `6` when it is IPv6's).
    let mut wrong = vec![vec![false; targets.len()]; sources.len()];
    for (c, o) in cells.iter().zip(observed) {
        let agreed = agrees(c.expect, &o.outcome);
        if wrong[c.row][c.col] && agreed {
            continue;
        }
        let v6 = if c.addr.is_ipv6() { "6" } else { "" };
        grid[c.row][c.col] = match (c.expect, agreed) {
            (Expect::Allowed, true) => "ok".into(),
            (Expect::Dropped, true) => "drop".into(),
            (Expect::Allowed, false) => format!("MISS{v6}:{}", short(&o.outcome)),
            (Expect::Dropped, false) => format!("LEAK{v6}"),
            (Expect::NotProbed, _) => "·".into(),
        };
        wrong[c.row][c.col] |= !agreed;
    }
    let mut out = String::new();
    let label_w = sources.iter().map(|s| s.len()).max().unwrap_or(4).max(6) + 2;
    let _ = write!(out, "{:label_w$}", "from \\ to");
    for t in targets {
        let _ = write!(out, "{:>W$}", t.who);
    }
    out.push('\n');
    let _ = write!(out, "{:label_w$}", "");
    for t in targets {
        let _ = write!(out, "{:>W$}", t.what());
    }
    out.push('\n');
    for (r, name) in sources.iter().enumerate() {
        let _ = write!(out, "{name:label_w$}");
        for cell in &grid[r] {
            let _ = write!(out, "{cell:>W$}");
        }
        out.push('\n');
    }
    out.push_str(
        "\n  ok = expected allowed, got through   drop = expected dropped, was dropped   · = not probed (self)\n  \
         MISS = expected allowed, was blocked  LEAK = expected dropped, got through  (MISS6, LEAK6: over IPv6)\n  \
         pod and node columns: an IPv4 and an IPv6 probe, both must agree; ClusterIP columns: IPv4\n",
    );
    out
}

fn short(o: &Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Timeout => "to",
        Outcome::Refused => "rst",
        Outcome::Unreachable => "unr",
        Outcome::Reset => "rst",
        Outcome::Error(_) => "err",
    }
}
