//! Command-line interface of `addcow-bench`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// addcow benchmarks: side-by-side NBD server comparison, embedded engine, memory.
#[derive(Parser, Debug)]
#[command(name = "addcow-bench", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Every fio profile against addcow, qemu-nbd (qcow2, raw), nbdkit (cow) and fio on the raw file.
    Compare(CompareArgs),
    /// The engine without a socket vs fio io_uring on the raw file (same profiles, same run).
    Embedded(EmbeddedArgs),
    /// RSS cost of opening a fresh 1 TiB overlay (target: under 16 MiB).
    Memory(MemoryArgs),
    /// Re-renders report.md and chart.svg of a compare run from its results.json.
    Render(RenderArgs),
    /// Internal: one isolated measurement for `memory` (prints JSON).
    #[command(hide = true)]
    MemoryChild(MemoryChildArgs),
}

/// Arguments of `compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Smoke run: 2 s per profile, a 64 MiB disk, 1 round (unless given explicitly).
    #[arg(long)]
    pub quick: bool,
    /// Virtual disk size (K/M/G/T suffixes). Default 4G (quick: 64M).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds per run. Default 20 (quick: 2).
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Rounds (every profile × every server per round). Default 3 (quick: 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Report folder. Default bench/results/<UTC date>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to put the disk images (needs about 3.5× --size free). Default: a temp folder.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Only these profiles (comma separated ids, see fio-configs/).
    #[arg(long, value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// Only these servers (comma separated: addcow, qemu-nbd-qcow2, qemu-nbd-raw, nbdkit-cow, fio-raw).
    #[arg(long, value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The `addcow` binary. Default: built next to this runner with cargo.
    #[arg(long)]
    pub addcow: Option<PathBuf>,
    /// Also count each server's system calls and context switches with `perf stat` (costs a
    /// little per syscall; CPU time per request is always measured).
    #[arg(long)]
    pub perf: bool,
}

/// Arguments of `embedded`.
#[derive(Args, Debug)]
pub struct EmbeddedArgs {
    /// Short run: 2 s per profile, 256 MiB disk, 1 round.
    #[arg(long)]
    pub quick: bool,
    /// Virtual disk size. Default 4G (quick: 256M).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds per profile. Default 10 (quick: 2).
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Rounds (engine and fio alternate). Default 3 (quick: 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Engine core threads. Default: one per CPU.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Where to put the disk images. Default: a temp folder.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Arguments of `memory`.
#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Virtual size of the fresh overlay. Default 1T.
    #[arg(long, value_parser = parse_size, default_value = "1T")]
    pub size: u64,
    /// Where to create the sparse files. Default: a temp folder.
    #[arg(long)]
    pub work: Option<PathBuf>,
}

/// Arguments of `render`.
#[derive(Args, Debug)]
pub struct RenderArgs {
    /// The folder holding results.json (report.md and chart.svg are rewritten there).
    pub dir: PathBuf,
}

/// Arguments of the hidden `memory-child`.
#[derive(Args, Debug)]
pub struct MemoryChildArgs {
    /// `format` (Overlay::open) or `engine` (Engine::open).
    #[arg(long)]
    pub mode: String,
    /// The `.add-cow` file.
    #[arg(long)]
    pub overlay: PathBuf,
}

/// Parses `4G`, `64M`, `512K`, `1T`, `4GiB` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (t.get(..i).unwrap_or(""), shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a size: {s:?} (e.g. 4G, 64M)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "addcow-bench",
            "compare",
            "--quick",
            "--size",
            "1G",
            "--servers",
            "addcow,fio-raw",
        ]);
        let Ok(Cli {
            command: Command::Compare(args),
        }) = cli
        else {
            panic!("compare did not parse");
        };
        assert!(args.quick);
        assert_eq!(args.size, Some(1 << 30));
        assert_eq!(args.servers, vec!["addcow", "fio-raw"]);
    }
}
