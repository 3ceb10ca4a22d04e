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
start, length, depth (0 = raw image, 1 = base), present, zero, data, compressed and, where the \
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
    match (r.depth, r.present, r.data) {
        (0, true, _) => format!("raw image  {}", o.image_path.display()),
        (_, true, true) => format!(
            "base       {}",
            o.base_path
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        ),
        (_, true, false) => format!(
            "base hole  {}",
            o.base_path
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        ),
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
