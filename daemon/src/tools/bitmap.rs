//! `addcow bitmap`: the dirty bitmaps (changed-block tracking) of an overlay no daemon serves:
//! `add`, `remove`, `clear`, `enable`, `disable`, `merge`, `list`, `drop`. Each takes the overlay's lock
//! (exclusive; `list` shared) and changes its `.bitmaps` sidecar durably before it returns.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::dirty::{drop_offline, open_offline, DEFAULT_GRANULARITY};

use super::{fail, human_size, parse_size, print_json};

/// Arguments of `addcow bitmap`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  addcow bitmap add vm1.add-cow daily --granularity 64K\n  addcow bitmap list vm1.add-cow\n  addcow bitmap merge vm1.add-cow weekly daily\n  addcow bitmap clear vm1.add-cow daily"
)]
pub struct BitmapArgs {
    #[command(subcommand)]
    pub op: Op,
}

/// One `addcow bitmap` operation.
#[derive(clap::Subcommand, Debug)]
pub enum Op {
    /// Add a persistent bitmap (enabled unless --disabled).
    Add {
        /// The `.add-cow` file (not while it is served).
        overlay: PathBuf,
        /// The bitmap's name.
        name: String,
        /// Bytes per bit: a power of two from 512 to 64M (default 64K).
        #[arg(long, value_parser = parse_size)]
        granularity: Option<u64>,
        /// Add it disabled (it records no writes until enabled).
        #[arg(long)]
        disabled: bool,
    },
    /// Remove a bitmap.
    Remove { overlay: PathBuf, name: String },
    /// Clear a bitmap (nothing dirty).
    Clear { overlay: PathBuf, name: String },
    /// Make a bitmap record writes.
    Enable { overlay: PathBuf, name: String },
    /// Stop a bitmap recording writes (its bits stay).
    Disable { overlay: PathBuf, name: String },
    /// Make TARGET dirty wherever any SOURCE is.
    Merge {
        overlay: PathBuf,
        target: String,
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// Delete the overlay's bitmaps sidecar and every bitmap in it: for a sidecar that cannot
    /// be opened (corrupt). The next backup of the disk must be a full one.
    Drop { overlay: PathBuf },
    /// List the bitmaps with their dirty bytes.
    List {
        overlay: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `addcow bitmap`.
pub fn run(args: BitmapArgs) -> ExitCode {
    if let Op::Drop { overlay } = &args.op {
        return match drop_offline(overlay) {
            Ok(was) => {
                if was {
                    println!("dropped the bitmaps of {}", overlay.display());
                } else {
                    println!("{} has no bitmaps sidecar", overlay.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail("bitmap drop", e),
        };
    }
    let (overlay, read_only) = match &args.op {
        Op::List { overlay, .. } | Op::Drop { overlay } => (overlay, true),
        Op::Add { overlay, .. }
        | Op::Remove { overlay, .. }
        | Op::Clear { overlay, .. }
        | Op::Enable { overlay, .. }
        | Op::Disable { overlay, .. }
        | Op::Merge { overlay, .. } => (overlay, false),
    };
    let off = match open_offline(overlay, read_only) {
        Ok(o) => o,
        Err(e) => return fail("bitmap", e),
    };
    let set = &off.set;
    let res = match &args.op {
        Op::Add {
            name,
            granularity,
            disabled,
            ..
        } => set.add(
            name,
            granularity.unwrap_or(DEFAULT_GRANULARITY),
            true,
            !disabled,
        ),
        Op::Remove { name, .. } => set.remove(name),
        Op::Clear { name, .. } => set.clear(name),
        Op::Enable { name, .. } => set.set_enabled(name, true),
        Op::Disable { name, .. } => set.set_enabled(name, false),
        Op::Drop { .. } => Ok(()),
        Op::Merge {
            target, sources, ..
        } => {
            let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
            set.merge(target, &refs)
        }
        Op::List { json, .. } => {
            let list = set.list();
            if *json {
                return print_json("bitmap", &list);
            }
            if list.is_empty() {
                println!("no bitmaps");
            }
            for b in list {
                println!(
                    "{}: granularity {}, {}, {}, {} dirty ({} bytes)",
                    b.name,
                    human_size(b.granularity),
                    if b.enabled { "enabled" } else { "disabled" },
                    if b.persistent {
                        "persistent"
                    } else {
                        "transient"
                    },
                    human_size(b.dirty_bytes),
                    b.dirty_bytes
                );
            }
            return ExitCode::SUCCESS;
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("bitmap", e),
    }
}
