//! `addcow create`. OWNER: issue #2.

use std::process::ExitCode;

/// Arguments of `addcow create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {}

/// Runs `addcow create`.
pub fn run(args: CreateArgs) -> ExitCode {
    let _ = args;
    eprintln!("addcow create: not yet implemented");
    ExitCode::from(1)
}
