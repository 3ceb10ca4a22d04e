//! `addcow stream`: copy every sector the overlay still reads from its base into the raw image,
//! so the raw image alone becomes the disk (offline; a served overlay is streamed with the
//! control socket's `job-start {type: "stream"}` instead).
//!
//! SIGINT and SIGTERM are blocked before the engine starts (its threads inherit the mask) and
//! taken by one thread with `sigwait`, which asks the loop to stop: the chunks in flight finish,
//! everything populated is flushed, and the tool exits 130 with a message. Running it again
//! continues from the bits.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use addcow_daemon::stream::{stream, StreamControl};
use addcow_engine::{CacheMode, DiskOptions, Engine, EngineConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::{fail, human_size, parse_size};

/// Exit status when interrupted (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Arguments of `addcow stream`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  addcow stream vm1.add-cow                 # as fast as the disks allow\n  addcow stream --rate 50M vm1.add-cow      # at most 50 MiB/s\n\nInterrupted (Ctrl-C) or killed, the overlay stays valid and reads the same; run it again to\ncontinue. When it ends, `addcow info` says complete and the raw image alone is the disk."
)]
pub struct StreamArgs {
    /// Most bytes per second to stream, with a K/M/G/T suffix (binary) and an optional `/s`
    /// [default: no limit].
    #[arg(long, value_name = "BYTES/s", value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// The `.add-cow` file (opened read-write with its lock: not while a daemon serves it).
    #[arg(value_name = "OVERLAY")]
    pub overlay: PathBuf,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    match parse_size(t)? {
        0 => Err(format!("{s:?}: the rate must be above 0")),
        n => Ok(n),
    }
}

/// The offline controller: a stop flag (set by the signal thread) and the progress bar.
struct Cli {
    stop: Arc<AtomicBool>,
    rate: Option<u64>,
    bar: ProgressBar,
}

impl StreamControl for Cli {
    fn proceed(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }
    fn rate(&self) -> Option<u64> {
        self.rate
    }
    fn progress(&self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }
    fn wants_pause(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Blocks SIGINT/SIGTERM in this thread (and every thread started after) and starts the thread
/// that takes them and sets `stop`.
fn catch_signals(stop: Arc<AtomicBool>) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    std::thread::Builder::new()
        .name("stream-signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                if stop.swap(true, Ordering::SeqCst) {
                    eprintln!("addcow stream: {sig:?} again: still finishing the chunks in flight");
                } else {
                    eprintln!(
                        "addcow stream: {sig:?}: finishing the chunks in flight and flushing"
                    );
                }
            }
        })?;
    Ok(())
}

/// Runs `addcow stream`.
pub fn run(args: StreamArgs) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = catch_signals(Arc::clone(&stop)) {
        return fail("stream", format!("cannot take SIGINT/SIGTERM: {e}"));
    }
    // Buffered, both files: a stream is one long sequential copy, where the kernel's readahead
    // and write-back merging beat O_DIRECT chunks (1 GiB of base data: about twice as fast, and
    // on par with `qemu-img rebase -b ''` of a qcow2 overlay; numbers in docs/STREAM.md).
    // Durability is unchanged: the commit fdatasyncs the raw image before any bit is written.
    let engine = match Engine::start(EngineConfig {
        cores: 2,
        arena_bytes: 16 << 20,
        image_cache: CacheMode::Buffered,
        base_cache: CacheMode::Buffered,
        ..EngineConfig::default()
    }) {
        Ok(e) => e,
        Err(e) => return fail("stream", e),
    };
    let disk = match engine.open(&args.overlay, DiskOptions::default()) {
        Ok(d) => d,
        Err(e) => {
            let _ = engine.shutdown();
            return fail("stream", e);
        }
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let cli = Cli {
        stop: Arc::clone(&stop),
        rate: args.rate,
        bar,
    };
    let result = stream(&disk, &cli);
    cli.bar.finish_and_clear();
    let complete = disk.is_complete();
    let closed = disk.close();
    let _ = engine.shutdown();
    let stats = match result {
        Ok(s) => s,
        Err(e) => return fail("stream", e),
    };
    if let Err(e) = closed {
        return fail("stream", e);
    }
    let secs = stats.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        (stats.done() as f64 / secs) as u64
    } else {
        0
    };
    println!(
        "{}: copied {} from the base, zeroed {}, in {:.1} s ({}/s); {} of {} done",
        args.overlay.display(),
        human_size(stats.copied),
        human_size(stats.zeroed),
        secs,
        human_size(rate),
        human_size(stats.done()),
        human_size(stats.total),
    );
    if stats.stopped {
        eprintln!(
            "addcow stream: interrupted; the overlay is valid and what was streamed is durable. \
             Run `addcow stream {}` again to continue.",
            args.overlay.display()
        );
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    if complete {
        println!("complete: the raw image alone is now the disk");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert_eq!(parse_rate("10M/s"), Ok(10 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
