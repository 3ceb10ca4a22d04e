//! `addcow resize`.

use std::path::PathBuf;
use std::process::ExitCode;

use addcow_engine::lifecycle::{resize_from, Ops};

use super::{fail, human_size, parse_size};

/// A size argument: absolute, or relative with a leading `+` / `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// `SIZE`.
    Absolute(u64),
    /// `+SIZE`.
    Grow(u64),
    /// `-SIZE`.
    Shrink(u64),
}

/// Parses `[+|-]SIZE` (K/M/G/T suffixes, binary).
pub fn parse_size_arg(s: &str) -> Result<SizeArg, String> {
    let t = s.trim();
    if let Some(rest) = t.strip_prefix('+') {
        parse_size(rest).map(SizeArg::Grow)
    } else if let Some(rest) = t.strip_prefix('-') {
        parse_size(rest).map(SizeArg::Shrink)
    } else {
        parse_size(t).map(SizeArg::Absolute)
    }
}

impl SizeArg {
    /// The new size for a disk of `old` bytes.
    pub fn apply(self, old: u64) -> Result<u64, String> {
        match self {
            SizeArg::Absolute(n) => Ok(n),
            SizeArg::Grow(n) => old
                .checked_add(n)
                .ok_or_else(|| format!("{old} + {n} bytes is too large")),
            SizeArg::Shrink(n) => old
                .checked_sub(n)
                .ok_or_else(|| format!("cannot shrink a {old}-byte disk by {n} bytes")),
        }
    }
}

/// Arguments of `addcow resize`.
///
/// Grow: the new sectors read from the base where it has bytes, zeros past its end. Shrink
/// (only with --shrink) discards every sector past the new end.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  addcow resize vm1.add-cow +10G\n  addcow resize vm1.add-cow 40G\n  addcow resize --shrink vm1.add-cow -- -1G"
)]
pub struct ResizeArgs {
    /// Allow a smaller size (the data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// The `.add-cow` file (not while it is served).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
    /// New size: SIZE, +SIZE or -SIZE, in bytes or with a K/M/G/T suffix (binary); the result
    /// must be a multiple of 512.
    #[arg(value_name = "[+|-]SIZE", allow_hyphen_values = true, value_parser = parse_size_arg)]
    pub size: SizeArg,
}

/// Runs `addcow resize`.
pub fn run(args: ResizeArgs) -> ExitCode {
    // A relative size applies to the size read under the resize's lock, not to one read before
    // it (a server may grow the overlay and stop in between).
    let new_size = |old: u64| {
        args.size
            .apply(old)
            .map_err(|e| addcow_engine::Error::new(addcow_engine::ErrorKind::InvalidArgument(e)))
    };
    match resize_from(&args.overlay, args.shrink, new_size, &Ops::new()) {
        Ok(r) => {
            println!(
                "Resized {}: {} ({} bytes) -> {} ({} bytes)",
                args.overlay.display(),
                human_size(r.old_size),
                r.old_size,
                human_size(r.new_size),
                r.new_size
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("resize", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_args_parse() {
        assert_eq!(parse_size_arg("10G"), Ok(SizeArg::Absolute(10 << 30)));
        assert_eq!(parse_size_arg("+1M"), Ok(SizeArg::Grow(1 << 20)));
        assert_eq!(parse_size_arg("-512K"), Ok(SizeArg::Shrink(512 << 10)));
        assert!(parse_size_arg("+").is_err());
        assert!(parse_size_arg("--1G").is_err());
        assert!(parse_size_arg("1Q").is_err());
        assert_eq!(SizeArg::Grow(512).apply(1024), Ok(1536));
        assert!(SizeArg::Shrink(2048).apply(1024).is_err());
        assert!(SizeArg::Grow(u64::MAX).apply(1).is_err());
    }
}
