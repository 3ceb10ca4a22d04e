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
    /// vhost-user-blk: addcow vs qemu-storage-daemon (qcow2), and addcow vhost-user-blk vs
    /// addcow NBD, same run (libblkio client; fio for NBD).
    Vhost(VhostArgs),
    /// RSS cost of opening a fresh 1 TiB overlay (target: under 16 MiB).
    Memory(MemoryArgs),
    /// Overlays on a base served over NBD (nbdkit, with a read delay): addcow against the same
    /// base local and against qemu-nbd on a qcow2 overlay backed by the same URI.
    Remote(RemoteArgs),
    /// What TLS costs: 4 KiB random read QD32 and 1 MiB sequential read over TCP against addcow
    /// in the clear, addcow with TLS and qemu-nbd with TLS (qcow2 overlay), same run; prints
    /// the medians and the ratios.
    Tls(TlsArgs),
    /// Per-export QoS (throttling), measured: accuracy of iops/bps limits, bursts and groups;
    /// isolation of a QD1 reader from a noisy neighbour; cost against a baseline binary; the
    /// same over vhost-user-blk. Writes qos.md and qos.json.
    Qos(QosArgs),
    /// Re-renders report.md and chart.svg of a compare run from its results.json.
    Render(RenderArgs),
    /// Internal: one isolated measurement for `memory` (prints JSON).
    #[command(hide = true)]
    MemoryChild(MemoryChildArgs),
}

/// How big and how long a benchmark run is (shared by `compare` and `embedded`).
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Smoke run: 2 s per run, a small disk (compare 64 MiB, embedded 256 MiB), 1 round (unless
    /// given explicitly).
    #[arg(long)]
    pub quick: bool,
    /// Virtual disk size (K/M/G/T suffixes). Default 4G (quick: compare 64M, embedded 256M).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Seconds per run. Default: compare 20, embedded 10 (quick: 2).
    #[arg(long)]
    pub runtime: Option<u64>,
    /// Rounds (compare: every profile × every server per round; embedded: engine and fio
    /// alternate). Default 3 (quick: 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Where to put the disk images (compare needs about 3.5× --size free). Default: a temp folder.
    #[arg(long)]
    pub work: Option<PathBuf>,
}

/// A run's size, seconds per run and rounds once defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLength {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Seconds per run (at least 1).
    pub runtime_s: u64,
    /// Rounds (at least 1).
    pub rounds: u32,
}

impl RunArgs {
    /// What was given, else the `quick` or `full` default; at least 1 s and 1 round.
    pub fn length(&self, full: RunLength, quick: RunLength) -> RunLength {
        let d = if self.quick { quick } else { full };
        RunLength {
            size: self.size.unwrap_or(d.size),
            runtime_s: self.runtime.unwrap_or(d.runtime_s).max(1),
            rounds: self.rounds.unwrap_or(d.rounds).max(1),
        }
    }
}

/// Arguments of `compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Size, length, rounds and work folder.
    #[command(flatten)]
    pub run: RunArgs,
    /// Report folder. Default bench/results/<UTC date>.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    /// little per syscall; CPU time per request is always measured). Without a working `perf`
    /// the run goes on and the report says those columns were not measured, and why.
    #[arg(long)]
    pub perf: bool,
    /// Run every profile at each of these sizes (comma separated, K/M/G/T), one report with a
    /// section per size. `--size S` is the same as `--sizes S`.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, conflicts_with = "size")]
    pub sizes: Vec<u64>,
    /// Run addcow once per core count given (`--cores N`; comma separated, e.g. 1,2) in place
    /// of the default addcow, as servers `addcow-cores-N`; the report shows the scaling.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..))]
    pub cores_scan: Vec<u64>,
    /// An extra argument for `addcow serve` (repeatable, e.g. `--addcow-arg=--base-cache
    /// --addcow-arg=buffered`).
    #[arg(long = "addcow-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub addcow_args: Vec<String>,
}

/// Arguments of `vhost`.
#[derive(Args, Debug)]
pub struct VhostArgs {
    /// Size (default 1G; quick 64M), seconds per run (default 10; quick 2), rounds (default
    /// 3; quick 1) and work folder.
    #[command(flatten)]
    pub run: RunArgs,
    /// Report folder (vhost.md, vhost.json). Default bench/results/<UTC date>-vhost.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `addcow` binary. Default: built next to this runner with cargo.
    #[arg(long)]
    pub addcow: Option<PathBuf>,
}

/// Arguments of `qos`.
#[derive(Args, Debug)]
pub struct QosArgs {
    /// Size (default 1G; quick 64M), seconds per run (default 10; quick 1), rounds (default
    /// 1) and work folder. `--quick` is the smoke run of scripts/test.sh.
    #[command(flatten)]
    pub run: RunArgs,
    /// Report folder (qos.md, qos.json). Default bench/results/<UTC date>-qos.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The `addcow` binary. Default: built next to this runner with cargo.
    #[arg(long)]
    pub addcow: Option<PathBuf>,
    /// Another `addcow` binary (today's main) run with no limits in the same run, for the cost
    /// ratios. Without it the cost ratios are against this binary with no limits.
    #[arg(long, value_name = "BIN")]
    pub baseline_addcow: Option<PathBuf>,
    /// `addcow serve --cores N` (1: every export on one core, as the isolation check wants).
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// The IOPS limit of the accuracy runs.
    #[arg(long, default_value_t = 5000)]
    pub iops_limit: u64,
    /// The bandwidth limit of the accuracy runs (bytes/s; K/M/G suffixes, binary).
    #[arg(long, value_parser = parse_size, default_value = "50M")]
    pub bps_limit: u64,
    /// `*-max-length` of the burst runs, in seconds (the burst is twice the limit). Default 2
    /// (quick: 1).
    #[arg(long)]
    pub burst_length: Option<u64>,
    /// Leave out the vhost-user-blk part.
    #[arg(long)]
    pub skip_vhost: bool,
}

/// Arguments of `tls`.
#[derive(Args, Debug)]
pub struct TlsArgs {
    /// Size (default 1G; quick 64M), seconds per run (default 10; quick 2), rounds (default
    /// 3; quick 1) and work folder.
    #[command(flatten)]
    pub run: RunArgs,
    /// The `addcow` binary. Default: built next to this runner with cargo.
    #[arg(long)]
    pub addcow: Option<PathBuf>,
}

/// Arguments of `embedded`.
#[derive(Args, Debug)]
pub struct EmbeddedArgs {
    /// Size, length, rounds and work folder.
    #[command(flatten)]
    pub run: RunArgs,
    /// Engine core threads. Default: one per CPU.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the engine's requests are submitted from: `channel` (one load-generator thread,
    /// requests cross to the cores through their channels) or `core` (a load generator on each
    /// core as a `CoreSource`, submitting with no thread hop, as vhost-user-blk does).
    #[arg(long, value_name = "FROM", default_value = "channel", value_parser = ["channel", "core"])]
    pub submit: String,
    /// Pin the load-generator thread (`--submit channel`) to the last CPU.
    #[arg(long)]
    pub pin_generator: bool,
    /// Instead of the profiles against fio: randwrite and seqwrite on the engine with one
    /// enabled persistent dirty bitmap vs none, in the same run (what changed-block tracking
    /// costs the writes).
    #[arg(long)]
    pub dirty_bitmap: bool,
    /// The overlay's allocation: `half` (a seeded random half of the 64 KiB chunks written,
    /// as `compare`) or `full` (every chunk written: every read is one run of the raw image).
    #[arg(long, value_name = "LAYOUT", default_value = "half", value_parser = ["half", "full"])]
    pub layout: String,
    /// Cache mode of the base: `direct` (O_DIRECT) or `buffered`.
    #[arg(long, value_name = "MODE", default_value = "direct", value_parser = ["direct", "buffered"])]
    pub base_cache: String,
}

/// Arguments of `remote`.
#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// Size, length, rounds and work folder (default 2G, 10 s, 3 rounds; quick 64M, 2 s, 1).
    #[command(flatten)]
    pub run: RunArgs,
    /// Report folder. Default bench/results/remote-<UTC date>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Read profiles to run (comma separated ids). Default randread,seqread.
    #[arg(long, value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// The image server's read delays (nbdkit's delay filter: whole seconds or NNms; 0 = no
    /// filter). Default 0,1ms.
    #[arg(long, value_delimiter = ',')]
    pub delays: Vec<String>,
    /// The `addcow` binary. Default: built next to this runner with cargo.
    #[arg(long)]
    pub addcow: Option<PathBuf>,
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

/// Parses `4G`, `64M`, `512K`, `1T`, `4GiB` or plain bytes (binary multiples, the `parse-size`
/// crate).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?} is not a size: {e} (e.g. 4G, 64M)"))
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
        assert!(args.run.quick);
        assert_eq!(args.run.size, Some(1 << 30));
        assert_eq!(args.servers, vec!["addcow", "fio-raw"]);
    }
}
