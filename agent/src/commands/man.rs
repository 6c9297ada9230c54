//! `rayfence man`: the manual page rayfence(1) on stdout, or one page per command
//! written into a directory.
//!
//! Must not: write a page by hand (clap_mangen renders them from [`Cli`]).
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use rayfence::cli;

use super::Cli;

#[derive(Args, Debug)]
pub(super) struct ManArgs {
    /// Write rayfence.1 and rayfence-COMMAND.1 for every command into DIR.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub(super) fn run(args: ManArgs) -> anyhow::Result<ExitCode> {
    match args.dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
            .with_context(|| format!("--dir {}", dir.display()))?,
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .context("rendering the manual page")?;
            cli::out(&String::from_utf8_lossy(&page))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
