//! Image tools: `create`, `info`, `check`, `map`, and the lifecycle tools `resize`, `rebase`,
//! `commit`, `stream`, and `bitmap` (dirty bitmaps).
//!
//! Shared here: size parsing (`--size 10G`), human-readable sizes for text output, and how an
//! error is reported (one line on stderr, exit status 1).

use std::process::ExitCode;

pub mod bitmap;
pub mod check;
pub mod commit;
pub mod create;
pub mod info;
pub mod map;
pub mod rebase;
pub mod resize;
pub mod stream;

/// Exit status of every tool on a usage error or a file that could not be opened or read
/// (`addcow check` reports its findings with 0, 2 and 3: [`check::EXIT_CORRUPT`]).
pub const EXIT_ERROR: u8 = 1;

/// Parses a size such as `4096`, `512K`, `10M`, `20G`, `1T` (binary multiples; `10GiB` and `10GB`
/// both mean 10 × 2^30), with the `parse-size` crate in binary mode.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| {
            let why = match e {
                parse_size::Error::InvalidDigit => "unknown size suffix or stray character",
                parse_size::Error::Empty => "empty",
                parse_size::Error::PosOverflow => "too large",
                _ => "not a size",
            };
            format!("{s:?} is not a size: {why} (examples: 4096, 512K, 10M, 20G, 1T)")
        })
}

/// A size for a person: `512 B`, `64 KiB`, `1.5 GiB` (exact bytes are in `--json`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        let s = format!("{v:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} {}", UNITS[unit])
    }
}

/// Opens an overlay for inspection: read-only and without taking its lock (like `qemu-img -U`),
/// so the tools work on an overlay a daemon is serving.
pub fn inspect(path: &std::path::Path) -> addcow_engine::Result<addcow_engine::format::Overlay> {
    let ro = addcow_engine::format::OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    addcow_engine::format::Overlay::open(path, &ro)
}

/// Prints `addcow <tool>: <error>` on stderr and returns exit status 1.
pub fn fail(tool: &str, err: impl std::fmt::Display) -> ExitCode {
    eprintln!("addcow {tool}: {err}");
    ExitCode::from(EXIT_ERROR)
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(tool: &str, value: &T) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(tool, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TB"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_print() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
        assert_eq!(human_size(1000), "1000 B");
        assert_eq!(human_size(1025), "1 KiB");
        assert_eq!(human_size(1100), "1.07 KiB");
    }
}
