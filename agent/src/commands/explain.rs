//! `rayfence explain`: why a flow is allowed or denied, asked of the running agent
//! or answered offline from manifests; the exit status is the verdict.
//!
//! Must not: compute a verdict itself (the engine does, through `rayfence::cli`).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use rayfence::cli;

use super::args::{AgentConnection, OutputArgs, PolicyArgs};

/// What `rayfence explain --help` says after the flags.
pub(super) const EXIT_STATUS: &str = "\
Exit status (as `kubectl auth can-i` gives its answer):
  0  allowed: every side that is enforced allows the flow (a side rayfence does not
     isolate, `not-enforced`, lets it pass)
  1  denied, or audit: the policy denies it and only audit mode lets it through
     (the status does not change when audit mode is switched off)
  2  error: bad arguments, no agent, unreadable manifests, ...
  3  unknown: a side is decided by another node's agent (ask that node, or use
     --manifests, where every pod counts as local)
A closed stdout (`| head`) ends the command quietly with the same status.";

#[derive(Args, Debug)]
pub(super) struct ExplainArgs {
    /// The source: NAMESPACE/POD or an IP.
    #[arg(long, value_name = "NS/POD|IP")]
    from: String,
    /// The destination, then :PORT and /tcp|udp|sctp (default tcp); no port: ICMP echo.
    #[arg(long, value_name = "NS/POD|IP[:PORT[/PROTO]]")]
    to: String,
    /// Answer offline from the objects in DIR (YAML/JSON) instead of asking the agent.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    agent: AgentConnection,
    #[command(flatten)]
    output: OutputArgs,
}

pub(super) fn run(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let output = args.output.format();
    let report = match &args.manifests {
        Some(dir) => {
            let settings = args.policy.settings("offline")?;
            cli::explain_offline(dir, settings, &args.from, &args.to, output)?
        }
        None => {
            let address = args.agent.address()?;
            super::block_on(cli::explain(&address, &args.from, &args.to, output))?
        }
    };
    Ok(ExitCode::from(cli::verdict_exit_code(&report.verdict)))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use crate::commands::Cli;

    #[test]
    fn explain_help_documents_its_exit_status() {
        let mut command = Cli::command();
        let explain = command.find_subcommand_mut("explain").expect("explain");
        let help = explain.render_long_help().to_string();
        for needle in [
            "Exit status",
            "0  allowed",
            "1  denied",
            "2  error",
            "3  unknown",
        ] {
            assert!(help.contains(needle), "{needle}: {help}");
        }
    }
}
