//! `rf-demo`: the demo scenario (see `rayfence_tests::demo`). Run as root; `cargo
//! xtask demo` builds everything and runs it.
//!
//! ```text
//! rf-demo --rayfence PATH [--shape NAME] [--probe PATH] [--timeout-ms N] [--parallel N] [--ipv4-only]
//! rf-demo --shapes                     the shapes --shape takes
//!
//! --dashboard also shows the shipped Grafana dashboard's panels on the run's data
//! (a Prometheus server scrapes the agent; `cargo xtask setup` provides it).
//! rf-demo --no-agent [--probe PATH]    harness self-check: no enforcement, so
//!                                      every expected-dropped cell must LEAK
//! ```
//!
//! Exit status: 0 when every verdict matches the expected matrix, 1 when some
//! differ (or when run without an agent), 2 when the demo could not run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rayfence_tests::ProbeBin;
use rayfence_tests::demo::{self, Options, guard};
use rayfence_tests::shape::{self, SHAPES, Shape};

const USAGE: &str = "usage: rf-demo (--rayfence PATH | --no-agent) [--shape NAME] [--probe PATH] [--timeout-ms N] [--parallel N] [--ipv4-only] [--dashboard]\n       rf-demo --shapes";

fn parse() -> Result<Options> {
    let mut rayfence = None;
    let mut no_agent = false;
    let mut probe = None;
    let mut timeout = None;
    let mut parallel = None;
    let mut ipv4_only = false;
    let mut dashboard = false;
    let mut shape = shape::DEFAULT;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().with_context(|| format!("{flag} needs a value"));
        match a.as_str() {
            "--rayfence" => rayfence = Some(PathBuf::from(value("--rayfence")?)),
            "--no-agent" => no_agent = true,
            "--ipv4-only" => ipv4_only = true,
            "--dashboard" => dashboard = true,
            "--shape" => shape = Shape::named(&value("--shape")?)?,
            "--shapes" => {
                for s in SHAPES {
                    println!("{:<14} {}", s.name, s.stands_for);
                }
                std::process::exit(0);
            }
            "--probe" => probe = Some(PathBuf::from(value("--probe")?)),
            "--timeout-ms" => {
                timeout = Some(Duration::from_millis(
                    value("--timeout-ms")?.parse().context("--timeout-ms")?,
                ));
            }
            "--parallel" => parallel = Some(value("--parallel")?.parse().context("--parallel")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if rayfence.is_none() && !no_agent {
        bail!("say which agent to run (--rayfence PATH) or --no-agent\n{USAGE}");
    }
    let probe = match probe {
        Some(p) => ProbeBin::at(p),
        None => ProbeBin::locate()?,
    };
    let mut opts = Options::new(if no_agent { None } else { rayfence }, probe);
    if let Some(t) = timeout {
        opts.timeout = t;
    }
    if let Some(p) = parallel {
        opts.parallel = p;
    }
    opts.ipv6 = !ipv4_only;
    opts.shape = shape;
    opts.dashboard = dashboard;
    Ok(opts)
}

fn main() {
    let code = match parse().and_then(|opts| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("run as root: the demo creates network namespaces and loads eBPF programs");
        }
        guard::install()?;
        let result = demo::run(&opts);
        // Interrupted: the guards inside run() have cleaned up by now.
        guard::exit_if_interrupted();
        result
    }) {
        Ok(report) if report.passed() => {
            println!(
                "\nPASS: all {} verdicts match the expected matrix on shape {}, and rayfence explain gives each of them",
                report.probed, report.shape
            );
            0
        }
        Ok(report) if !report.with_agent => {
            println!(
                "\nNO AGENT: {} of {} flows differ from the expected matrix (the flows the agent must drop); \
                 the demo needs `rayfence agent` (--rayfence PATH)",
                report.mismatches.len(),
                report.probed
            );
            1
        }
        Ok(report) => {
            println!(
                "\nFAIL: {} of {} verdicts differ from the expected matrix; rayfence explain disagrees with the datapath on {} of {}",
                report.mismatches.len(),
                report.probed,
                report.explain_disagreements.len(),
                report.explained
            );
            1
        }
        Err(e) => {
            eprintln!("rf-demo: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
