//! `addcow rebase`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::lifecycle::{rebase, Ops, RebaseOptions};

use super::{fail, human_size};

/// Arguments of `addcow rebase` (as `qemu-img rebase`).
///
/// Safe mode (default): every unwritten sector where the old and the new base differ is first
/// copied from the old base into the raw image, so the disk reads the same afterwards. The new
/// header is written as a whole new file and renamed over the old one, so a crash leaves the old
/// or the new header, never a mix.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  addcow rebase -b ubuntu-24.04.1.img vm1.add-cow   # same content, new base\n  addcow rebase -b '' vm1.add-cow                    # standalone: no base\n  addcow rebase -u -b /new/place/ubuntu.img vm1.add-cow   # the base moved: path only"
)]
pub struct RebaseArgs {
    /// The new base ("" for none: the overlay becomes standalone). A relative path is relative
    /// to the working directory and stored relative to the overlay's directory.
    #[arg(short = 'b', long = "base", value_name = "NEWBASE")]
    pub base: std::ffi::OsString,
    /// Unsafe: only rewrite the base path; the old base is not read (use when the base moved
    /// or the new one has the same content).
    #[arg(short = 'u')]
    pub unsafe_: bool,
    /// The `.add-cow` file (not while it is served).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// Runs `addcow rebase`.
pub fn run(args: RebaseArgs) -> ExitCode {
    let new_base = if args.base.is_empty() {
        None
    } else {
        Some(PathBuf::from(&args.base))
    };
    let opts = RebaseOptions {
        overlay: args.overlay.clone(),
        new_base,
        unsafe_: args.unsafe_,
    };
    match rebase(&opts, &Ops::new()) {
        Ok(r) => {
            let stored = String::from_utf8_lossy(&r.stored);
            println!(
                "Rebased {}: base {} -> {}{}",
                args.overlay.display(),
                r.old_base
                    .as_ref()
                    .map_or("none".to_string(), |p| p.display().to_string()),
                if stored.is_empty() {
                    "none".to_string()
                } else {
                    stored.into_owned()
                },
                if args.unsafe_ {
                    " (path only)".to_string()
                } else {
                    format!(", {} copied from the old base", human_size(r.copied))
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("rebase", e),
    }
}
