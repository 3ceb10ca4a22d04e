//! `addcow info`. OWNER: issue #2.

use std::process::ExitCode;

/// Arguments of `addcow info`.
#[derive(clap::Args, Debug)]
pub struct InfoArgs {}

/// Runs `addcow info`.
pub fn run(args: InfoArgs) -> ExitCode {
    let _ = args;
    eprintln!("addcow info: not yet implemented");
    ExitCode::from(1)
}
