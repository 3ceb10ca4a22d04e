//! `memory`: what opening a fresh (all-clear) overlay costs in resident memory. Target: a 1 TiB
//! overlay under 16 MiB.
//!
//! Each measurement runs in a child process (`memory-child`) so allocator state of earlier work
//! cannot hide or inflate it: the child reads `VmRSS` from `/proc/self/status`, opens the overlay
//! (through `Overlay::open`, or through `Engine::open` on an engine started beforehand so that the
//! engine's own arena is not counted), reads `VmRSS` and `VmHWM` again and prints JSON.

use std::path::Path;
use std::process::Command;

use addcow_engine::format::{self, CreateOptions, OpenOptions, Overlay};
use addcow_engine::{DiskOptions, Engine, EngineConfig};
use serde::{Deserialize, Serialize};

use crate::cli::{MemoryArgs, MemoryChildArgs};
use crate::error::{io_err, BenchError, Result};
use crate::sysinfo::proc_status_kib;

/// Target RSS increase in bytes.
pub const TARGET_BYTES: u64 = 16 << 20;

/// What one child measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildReport {
    /// `format` or `engine`.
    pub mode: String,
    /// VmRSS before opening, KiB.
    pub rss_before_kib: u64,
    /// VmRSS with the overlay open, KiB.
    pub rss_after_kib: u64,
    /// VmHWM (peak RSS) after opening, KiB.
    pub hwm_after_kib: u64,
    /// Heap bytes the bitmap reports (format mode).
    pub bitmap_heap_bytes: Option<usize>,
}

/// Creates the overlay and measures each way of opening it in a child.
pub fn run(args: &MemoryArgs) -> Result<()> {
    let (work, _tmp) = crate::prepare::work_dir(args.work.as_deref(), "addcow-memory-")?;
    let overlay = work.join("big.add-cow");
    format::create(&CreateOptions {
        overlay: overlay.clone(),
        base: None,
        image: Some(work.join("big.img")),
        size: Some(args.size),
        force: true,
    })?;
    let exe = std::env::current_exe().map_err(io_err("locate", Path::new("current exe")))?;
    println!(
        "fresh overlay of {} GiB (sparse files in {}); target: RSS increase < {} MiB",
        args.size >> 30,
        work.display(),
        TARGET_BYTES >> 20
    );
    let mut format_ok = false;
    for mode in ["format", "engine"] {
        let out = Command::new(&exe)
            .args(["memory-child", "--mode", mode, "--overlay"])
            .arg(&overlay)
            .output()
            .map_err(io_err("run", &exe))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed: Option<ChildReport> = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok());
        match (out.status.success(), parsed) {
            (true, Some(r)) => {
                let inc = r.rss_after_kib.saturating_sub(r.rss_before_kib) * 1024;
                let peak = r.hwm_after_kib.saturating_sub(r.rss_before_kib) * 1024;
                println!(
                    "{mode:<7} RSS +{:.2} MiB (peak +{:.2} MiB){}: {}",
                    inc as f64 / 1048576.0,
                    peak as f64 / 1048576.0,
                    r.bitmap_heap_bytes.map_or_else(String::new, |b| format!(
                        ", bitmap heap {:.2} MiB",
                        b as f64 / 1048576.0
                    )),
                    if inc < TARGET_BYTES {
                        "target met"
                    } else {
                        "target MISSED"
                    }
                );
                format_ok |= mode == "format";
            }
            _ => {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output");
                println!("{mode:<7} failed ({}): {last}", out.status);
            }
        }
    }
    if format_ok {
        Ok(())
    } else {
        Err(BenchError::Usage(
            "the format-level measurement failed".to_owned(),
        ))
    }
}

/// The child: opens the overlay one way and prints a [`ChildReport`] as one JSON line.
pub fn run_child(args: &MemoryChildArgs) -> Result<()> {
    let rss = |f: &str| {
        proc_status_kib(f).ok_or_else(|| BenchError::Usage(format!("/proc/self/status has no {f}")))
    };
    let report = match args.mode.as_str() {
        "format" => {
            let before = rss("VmRSS")?;
            let ov = Overlay::open(&args.overlay, &OpenOptions::default())?;
            let after = rss("VmRSS")?;
            let r = ChildReport {
                mode: "format".into(),
                rss_before_kib: before,
                rss_after_kib: after,
                hwm_after_kib: rss("VmHWM")?,
                bitmap_heap_bytes: Some(ov.bitmap.heap_bytes()),
            };
            drop(ov);
            r
        }
        "engine" => {
            let engine = Engine::start(EngineConfig {
                cores: 1,
                ..EngineConfig::default()
            })?;
            let before = rss("VmRSS")?;
            let disk = engine.open(&args.overlay, DiskOptions::default())?;
            let after = rss("VmRSS")?;
            let r = ChildReport {
                mode: "engine".into(),
                rss_before_kib: before,
                rss_after_kib: after,
                hwm_after_kib: rss("VmHWM")?,
                bitmap_heap_bytes: None,
            };
            let _ = disk.close();
            let _ = engine.shutdown();
            r
        }
        other => {
            return Err(BenchError::Usage(format!(
                "unknown mode {other:?} (format or engine)"
            )))
        }
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}
