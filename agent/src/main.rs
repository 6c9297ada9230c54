//! The `rayfence` binary: the node agent (`rayfence agent`) and its operator
//! commands (`rayfence status`, `explain`, `flows`, `cleanup`, `cni`).
//!
//! Parses every flag once (each has an environment variable too) and fails fast
//! with a message that names the flag; then runs the one command asked for. Each
//! command, with its flags, is a file of [`commands`].
//!
//! Errors: `Error: ` and the error's chain of causes on one line (no backtrace,
//! whatever `RUST_BACKTRACE` says), exit status 2 (`cli::exit::ERROR`), the status
//! clap gives bad arguments too. `explain` exits with its verdict ([`cli::exit`]).
//! A closed stdout ends a command quietly, with the status it would have had.
//!
//! Must not: hold agent logic (that is `rayfence::runtime`).
mod commands;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use rayfence::cli;

use commands::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.run() {
        Ok(code) => code,
        Err(error) if cli::stdout_closed(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}`: the chain of causes on one line; never anyhow's Debug form,
            // which adds a backtrace under RUST_BACKTRACE=1.
            let _ = writeln!(std::io::stderr().lock(), "Error: {error:#}");
            ExitCode::from(cli::exit::ERROR)
        }
    }
}
