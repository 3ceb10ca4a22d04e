//! `addcow serve`: the NBD daemon. OWNER: issue #4.

use std::process::ExitCode;

/// Arguments of `addcow serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(args: ServeArgs) -> ExitCode {
    let _ = args;
    eprintln!("addcow serve: not yet implemented");
    ExitCode::from(1)
}
