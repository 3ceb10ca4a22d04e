//! `addcow commit`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::lifecycle::{commit, CommitOptions, Ops};

use super::{fail, human_size};

/// Arguments of `addcow commit` (as `qemu-img commit`).
///
/// Writes every sector the overlay holds into its base, makes that durable, then empties the
/// overlay (clears its bits, frees its raw image). A base smaller than the overlay is grown to
/// its size first. Refused while anyone else has the base open (a served overlay share-locks
/// its base, and so does QEMU): other disks on that base would see it change.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  addcow commit vm1.add-cow   # vm1's writes go into its base")]
pub struct CommitArgs {
    /// The `.add-cow` file (not while it is served).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Runs `addcow commit`.
pub fn run(args: CommitArgs) -> ExitCode {
    match commit(
        &CommitOptions {
            overlay: args.overlay.clone(),
        },
        &Ops::new(),
    ) {
        Ok(c) => {
            println!(
                "Committed {} into {}: {} ({} bytes){}; the overlay is empty",
                args.overlay.display(),
                c.base.display(),
                human_size(c.bytes),
                c.bytes,
                c.base_grown_from.map_or(String::new(), |old| format!(
                    ", base grown from {old} bytes"
                )),
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("commit", e),
    }
}
