//! `addcow map`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::format::map::map_json;
use addcow_engine::format::{map_runs, MapRun, Overlay};

use super::{fail, human_size};

/// Arguments of `addcow map`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "JSON output has the shape of `qemu-img map --output=json`: one object per run with \
start, length, depth (0 = raw image, 1 = base, 2 = the base's base in a backing chain, ...), present, zero, data, compressed and, where the \
bytes live in a file, offset. Runs past the base's end (or with no base) are present: false, \
zero: true."
)]
pub struct MapArgs {
    /// Print JSON in the shape of `qemu-img map --output=json` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The `.add-cow` file to map (read-only, without a lock).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

fn source(r: &MapRun, o: &Overlay) -> String {
    let layer = |depth: u32| {
        o.base
            .as_ref()
            .and_then(|c| c.layers.get(depth.checked_sub(1)? as usize))
            .map_or(String::new(), |l| l.path.display().to_string())
    };
    let name = |depth: u32| match depth {
        1 => "base".to_string(),
        d => format!("layer {}", d + 1),
    };
    match (r.depth, r.present, r.data) {
        (0, true, _) => format!("raw image  {}", o.image_path.display()),
        (d, true, true) => format!("{:<10} {}", name(d), layer(d)),
        (d, true, false) => format!("{:<10} {}", format!("{} hole", name(d)), layer(d)),
        _ => "zeros".to_string(),
    }
}

/// Runs `addcow map`.
pub fn run(args: MapArgs) -> ExitCode {
    let o = match super::inspect(&args.overlay) {
        Ok(o) => o,
        Err(e) => return fail("map", e),
    };
    let runs = match map_runs(&o) {
        Ok(r) => r,
        Err(e) => return fail("map", e),
    };
    if args.json {
        print!("{}", map_json(&runs));
        return ExitCode::SUCCESS;
    }
    println!("{:<20} {:<12} Source", "Start", "Length");
    for r in &runs {
        println!(
            "{:<20} {:<12} {}",
            format!("{:#x}", r.start),
            human_size(r.length),
            source(r, &o)
        );
    }
    ExitCode::SUCCESS
}
