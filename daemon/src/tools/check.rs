//! `addcow check`. OWNER: issue #2.

use std::process::ExitCode;

/// Arguments of `addcow check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {}

/// Runs `addcow check`.
pub fn run(args: CheckArgs) -> ExitCode {
    let _ = args;
    eprintln!("addcow check: not yet implemented");
    ExitCode::from(1)
}
