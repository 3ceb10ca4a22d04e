//! `addcow map`. OWNER: issue #2.

use std::process::ExitCode;

/// Arguments of `addcow map`.
#[derive(clap::Args, Debug)]
pub struct MapArgs {}

/// Runs `addcow map`.
pub fn run(args: MapArgs) -> ExitCode {
    let _ = args;
    eprintln!("addcow map: not yet implemented");
    ExitCode::from(1)
}
