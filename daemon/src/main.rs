//! `addcow`: NBD daemon and image tools for add-cow overlays.
//!
//! Subcommands live in their own modules: `serve` in [`serve`], its control client `ctl` in
//! [`ctl`], the image tools `create`/`info`/`check`/`map`/`resize`/`rebase`/`commit`/`stream` in
//! [`tools`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use addcow_daemon::serve;

mod ctl;
mod tools;

/// addcow: serve add-cow copy-on-write overlays over NBD, and manage them.
#[derive(Parser, Debug)]
#[command(name = "addcow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve overlays over NBD on a Unix socket (with no overlay: a built-in demo), and the
    /// default export over vhost-user-blk with --vhost-user-blk.
    Serve(Box<serve::ServeArgs>),
    /// Drive a running daemon through its control socket (add/remove exports, stats, quit).
    Ctl(ctl::CtlArgs),
    /// Create an overlay on a base image.
    Create(tools::create::CreateArgs),
    /// Show an overlay's sizes, files and allocation.
    Info(tools::info::InfoArgs),
    /// Check an overlay for corruption (exit 0 clean, 2 corruption, 3 warnings only).
    Check(tools::check::CheckArgs),
    /// Print the allocation as runs, in the shape of `qemu-img map`.
    Map(tools::map::MapArgs),
    /// Grow (or, with --shrink, shrink) an overlay's virtual size.
    Resize(tools::resize::ResizeArgs),
    /// Point an overlay at another base (or none), keeping what it reads (as qemu-img rebase).
    Rebase(tools::rebase::RebaseArgs),
    /// Write an overlay's sectors into its base, then empty the overlay.
    Commit(tools::commit::CommitArgs),
    /// Copy every sector still read from the base into the raw image (resumable).
    Stream(tools::stream::StreamArgs),
    /// Add, remove, clear, enable, disable, merge or list an overlay's dirty bitmaps.
    Bitmap(tools::bitmap::BitmapArgs),
}

fn main() -> ExitCode {
    // Usage errors exit 1 (not clap's 2): `addcow check` uses 2 and 3 for its findings.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Ctl(args) => ctl::run(args),
        Command::Create(args) => tools::create::run(args),
        Command::Info(args) => tools::info::run(args),
        Command::Check(args) => tools::check::run(args),
        Command::Map(args) => tools::map::run(args),
        Command::Resize(args) => tools::resize::run(args),
        Command::Rebase(args) => tools::rebase::run(args),
        Command::Commit(args) => tools::commit::run(args),
        Command::Stream(args) => tools::stream::run(args),
        Command::Bitmap(args) => tools::bitmap::run(args),
    }
}
