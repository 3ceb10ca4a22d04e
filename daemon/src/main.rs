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
    /// Write the man pages (DIR/man/*.1) and shell completions (DIR/completions/: bash, zsh,
    /// fish) of this binary, from its own command-line definitions (for packaging).
    #[command(hide = true)]
    GenDocs {
        /// The folder to write into (made if missing).
        dir: std::path::PathBuf,
    },
}

/// `addcow gen-docs DIR`: man pages (one per visible subcommand, `addcow-serve.1`, ...) and
/// completions, generated from the clap definitions so they never drift from `--help`.
fn gen_docs(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = Cli::command();
    cmd.build();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    // `addcow help SUBCOMMAND` is clap's; its pages only repeat the others.
    for e in std::fs::read_dir(&man)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("addcow-help") {
            std::fs::remove_file(e.path())?;
        }
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "addcow", &completions)?;
    }
    Ok(())
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
        Command::Serve(args) => {
            // The words after `serve` (no option comes before the subcommand): which options
            // the command line gave, so that they override --config's.
            let words: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
            serve::run(*args, &words)
        }
        Command::Ctl(args) => ctl::run(args),
        Command::Create(args) => tools::create::run(args),
        Command::Info(args) => tools::info::run(args),
        Command::Check(args) => tools::check::run(args),
        Command::Map(args) => tools::map::run(args),
        Command::Resize(args) => tools::resize::run(args),
        Command::Rebase(args) => tools::rebase::run(args),
        Command::Commit(args) => tools::commit::run(args),
        Command::Stream(args) => tools::stream::run(args),
        Command::GenDocs { dir } => match gen_docs(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("addcow gen-docs {}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
        Command::Bitmap(args) => tools::bitmap::run(args),
    }
}
