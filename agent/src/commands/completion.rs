//! `rayfence completion SHELL`: a shell completion script for the whole command
//! tree.
//!
//! Must not: list a command or flag by hand (clap_complete reads them from [`Cli`]).
use std::process::ExitCode;

use clap::{Args, CommandFactory as _};
use rayfence::cli;

use super::Cli;

#[derive(Args, Debug)]
pub(super) struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub(super) fn run(args: CompletionArgs) -> anyhow::Result<ExitCode> {
    // Into a buffer first: clap_complete panics on a failed write.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "rayfence", &mut script);
    cli::out(&String::from_utf8_lossy(&script))?;
    Ok(ExitCode::SUCCESS)
}
