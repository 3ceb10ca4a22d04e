//! `addcow check`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::format::check::try_check;
use addcow_engine::format::{Finding, Severity};

use super::fail;

/// Exit status: no findings.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: corruption found (the overlay cannot be served as it is).
pub const EXIT_CORRUPT: u8 = 2;
/// Exit status: warnings only (servable, but something is off).
pub const EXIT_WARNINGS: u8 = 3;

/// Arguments of `addcow check`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 clean, 1 usage or I/O error (the overlay could not be read), \
2 corruption found, 3 warnings only.\n\nCorruption: short header, bad magic or version, path \
field without NUL, empty or protocol image_file, missing or unreadable raw image or base, raw \
image size not a multiple of 512, truncated bitmap.\nWarnings: non-zero reserved header bytes, \
non-zero bytes after a path's NUL, bits set past the end of the disk."
)]
pub struct CheckArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The `.add-cow` file to check (read-only, without a lock).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

/// What `addcow check --json` prints.
#[derive(Debug, serde::Serialize)]
struct CheckJson<'a> {
    overlay: String,
    /// "clean", "warnings" or "corrupt".
    result: &'static str,
    corruptions: usize,
    warnings: usize,
    findings: &'a [Finding],
}

/// Runs `addcow check`.
pub fn run(args: CheckArgs) -> ExitCode {
    let report = match try_check(&args.overlay) {
        Ok(r) => r,
        Err(e) => return fail("check", e),
    };
    let corruptions = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Corruption)
        .count();
    let warnings = report.findings.len() - corruptions;
    let (result, code) = if corruptions > 0 {
        ("corrupt", EXIT_CORRUPT)
    } else if warnings > 0 {
        ("warnings", EXIT_WARNINGS)
    } else {
        ("clean", EXIT_CLEAN)
    };
    if args.json {
        let j = CheckJson {
            overlay: args.overlay.display().to_string(),
            result,
            corruptions,
            warnings,
            findings: &report.findings,
        };
        match serde_json::to_string_pretty(&j) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail("check", e),
        }
    } else {
        for f in &report.findings {
            let tag = match f.severity {
                Severity::Corruption => "corruption",
                Severity::Warning => "warning",
            };
            println!("{tag}: {}", f.message);
        }
        match result {
            "clean" => println!("No errors were found on {}.", args.overlay.display()),
            _ => println!(
                "{}: {corruptions} corruption(s), {warnings} warning(s).",
                args.overlay.display()
            ),
        }
    }
    ExitCode::from(code)
}
