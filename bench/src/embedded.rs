//! `embedded`: the engine driven in-process (no socket) against fio's io_uring engine with
//! O_DIRECT on the raw copy of the same data, same profiles, same run.
//!
//! Profiles: 4 KiB random read QD32 on the 50%-allocated overlay, 1 MiB sequential read QD8,
//! 4 KiB random write QD32. The engine side keeps `qd` requests in flight from one thread
//! (requests spread round-robin over the engine's cores); completions come back over a channel,
//! and latency (submit to completion seen by the caller) goes into an hdrhistogram. Targets:
//! random read ≥ 0.9× fio's IOPS, sequential read ≥ 0.95× fio's bandwidth.

use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use addcow_engine::{
    CacheMode, CoreSource, Disk, DiskOptions, Done, Engine, EngineConfig, IoBuf, Request,
    RequestError, SourceCtx,
};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::cli::{EmbeddedArgs, RunLength};
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, Target};
use crate::prepare;
use crate::profiles;
use crate::stats::{median, ratio};

/// Access pattern of an embedded profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Pattern {
    RandRead,
    SeqRead,
    RandWrite,
    SeqWrite,
}

/// One embedded profile and its fio twin.
#[derive(Debug, Clone, Serialize)]
struct EmbProfile {
    id: &'static str,
    job: &'static str,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    /// Target ratio engine / fio and whether it is judged on IOPS (else bandwidth).
    target: Option<(f64, bool)>,
}

fn emb_profiles() -> [EmbProfile; 3] {
    [
        EmbProfile {
            id: "randread",
            job: "randread-4k-qd32.fio",
            pattern: Pattern::RandRead,
            bs: 4096,
            qd: 32,
            target: Some((0.9, true)),
        },
        EmbProfile {
            id: "seqread",
            job: "seqread-1m-qd8.fio",
            pattern: Pattern::SeqRead,
            bs: 1 << 20,
            qd: 8,
            target: Some((0.95, false)),
        },
        EmbProfile {
            id: "randwrite",
            job: "randwrite-4k-qd32.fio",
            pattern: Pattern::RandWrite,
            bs: 4096,
            qd: 32,
            target: None,
        },
    ]
}

/// Numbers of one run (engine or fio).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Numbers {
    /// Operations per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Completion latency percentiles, ns.
    pub p50_ns: f64,
    /// 99th.
    pub p99_ns: f64,
    /// 99.9th.
    pub p999_ns: f64,
}

impl From<&fio::FioResult> for Numbers {
    fn from(r: &fio::FioResult) -> Numbers {
        let l = r.latency();
        Numbers {
            iops: r.iops,
            bw_bytes: r.bw_bytes,
            p50_ns: l.p50_ns,
            p99_ns: l.p99_ns,
            p999_ns: l.p999_ns,
        }
    }
}

/// Per-profile medians and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct EmbSummary {
    /// Profile id.
    pub profile: String,
    /// Engine medians.
    pub engine: Numbers,
    /// fio medians.
    pub fio: Numbers,
    /// engine / fio IOPS.
    pub iops_ratio: Option<f64>,
    /// engine / fio bandwidth.
    pub bw_ratio: Option<f64>,
    /// The target ratio, if any.
    pub target: Option<f64>,
    /// Whether it was met.
    pub met: Option<bool>,
}

fn med_numbers(v: &[Numbers]) -> Numbers {
    let m =
        |f: fn(&Numbers) -> f64| median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN);
    Numbers {
        iops: m(|n| n.iops),
        bw_bytes: m(|n| n.bw_bytes),
        p50_ns: m(|n| n.p50_ns),
        p99_ns: m(|n| n.p99_ns),
        p999_ns: m(|n| n.p999_ns),
    }
}

/// `--dirty-bitmap`: randwrite (4 KiB QD32) and seqwrite (1 MiB QD8) on the engine with no
/// dirty bitmap and with one enabled persistent bitmap (64 KiB granularity, clean at the start
/// of each run, so every granule's first write pays the sidecar sync), alternating in the same
/// run; prints the medians and the ratio bitmap / none.
fn dirty_cost(args: &EmbeddedArgs, size: u64, runtime: Duration, rounds: u32) -> Result<()> {
    let (work, _tmp) = crate::prepare::work_dir(args.run.work.as_deref(), "addcow-dirty-")?;
    eprintln!("preparing {} MiB in {}", size >> 20, work.display());
    let prep = prepare::prepare_layout(&work.join("data"), size, 0xe3bed, false, false)?;
    let mut config = EngineConfig::default();
    if let Some(c) = args.cores {
        config.cores = c.max(1);
    }
    let cores = config.cores;
    let profiles = [
        EmbProfile {
            id: "randwrite",
            job: "randwrite-4k-qd32.fio",
            pattern: Pattern::RandWrite,
            bs: 4096,
            qd: 32,
            target: None,
        },
        EmbProfile {
            id: "seqwrite",
            job: "seqwrite-1m-qd8.fio",
            pattern: Pattern::SeqWrite,
            bs: 1 << 20,
            qd: 8,
            target: None,
        },
    ];
    let sidecar = addcow_engine::dirty::sidecar_path(&prep.addcow);
    // [profile][with bitmap]
    let mut runs: Vec<[Vec<Numbers>; 2]> = vec![[Vec::new(), Vec::new()]; profiles.len()];
    for round in 1..=rounds {
        for (i, p) in profiles.iter().enumerate() {
            for with in [false, true] {
                prep.restore_addcow()?;
                let _ = std::fs::remove_file(&sidecar);
                eprintln!(
                    "round {round}/{rounds}: {} {}",
                    p.id,
                    if with { "with a bitmap" } else { "no bitmap" }
                );
                let engine = Engine::start(config.clone())?;
                let disk = engine.open(&prep.addcow, DiskOptions::default())?;
                if with {
                    disk.bitmaps().add("bench", 64 << 10, true, true)?;
                }
                let r = drive(&engine, &disk, cores, p, size, runtime);
                let closed = disk.close();
                drop(disk);
                let stopped = engine.shutdown();
                let n = r?;
                closed?;
                stopped?;
                runs[i][usize::from(with)].push(n);
            }
        }
    }
    let _ = std::fs::remove_file(&sidecar);
    println!(
        "dirty-bitmap cost: engine ({cores} cores), {} MiB, {} s x {rounds} rounds, medians; one enabled persistent 64 KiB bitmap vs none",
        size >> 20,
        runtime.as_secs()
    );
    println!(
        "{:<10} {:>12} {:>12} {:>7} {:>11} {:>11} {:>7}  {:>16}  {:>16}",
        "profile",
        "IOPS none",
        "IOPS bitmap",
        "ratio",
        "MiB/s none",
        "MiB/s bmp",
        "ratio",
        "p99 us none",
        "p99 us bitmap"
    );
    for (i, p) in profiles.iter().enumerate() {
        let none = med_numbers(&runs[i][0]);
        let with = med_numbers(&runs[i][1]);
        let rat = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x"));
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>7} {:>11.1} {:>11.1} {:>7}  {:>16.0}  {:>16.0}",
            p.id,
            none.iops,
            with.iops,
            rat(ratio(with.iops, none.iops)),
            none.bw_bytes / (1 << 20) as f64,
            with.bw_bytes / (1 << 20) as f64,
            rat(ratio(with.bw_bytes, none.bw_bytes)),
            none.p99_ns / 1e3,
            with.p99_ns / 1e3
        );
    }
    Ok(())
}

/// Runs the embedded benchmark.
pub fn run(args: &EmbeddedArgs) -> Result<()> {
    let RunLength {
        size,
        runtime_s,
        rounds,
    } = args.run.length(
        RunLength {
            size: 4 << 30,
            runtime_s: 10,
            rounds: 3,
        },
        RunLength {
            size: 256 << 20,
            runtime_s: 2,
            rounds: 1,
        },
    );
    let runtime = Duration::from_secs(runtime_s);
    if args.dirty_bitmap {
        return dirty_cost(args, size, runtime, rounds);
    }
    if !crate::servers::on_path("fio") {
        return Err(BenchError::Missing(
            "fio (Debian: apt-get install fio)".to_owned(),
        ));
    }
    let (work, _tmp) = crate::prepare::work_dir(args.run.work.as_deref(), "addcow-embedded-")?;
    eprintln!("preparing {} MiB in {}", size >> 20, work.display());
    let full = args.layout == "full";
    let prep = prepare::prepare_layout(&work.join("data"), size, 0xe3bed, false, full)?;
    let mut config = EngineConfig::default();
    if let Some(c) = args.cores {
        config.cores = c.max(1);
    }
    if args.base_cache == "buffered" {
        config.base_cache = CacheMode::Buffered;
    }
    let on_core = args.submit == "core";

    let cores = config.cores;
    let jobs = profiles::configs_dir();
    let list = emb_profiles();
    let mut eng_runs: Vec<Vec<Numbers>> = vec![Vec::new(); list.len()];
    let mut fio_runs: Vec<Vec<Numbers>> = vec![Vec::new(); list.len()];
    let mut dirty = false;
    for round in 1..=rounds {
        for (i, p) in list.iter().enumerate() {
            if dirty {
                prep.restore_addcow()?;
                dirty = false;
            }
            eprintln!(
                "round {round}/{rounds}: {} engine ({cores} cores) then fio",
                p.id
            );
            // A fresh engine per run: shutting it down releases every file (and the overlay's
            // lock), so the overlay can be restored and reopened for the next run.
            let engine = Engine::start(config.clone())?;
            let disk = engine.open(&prep.addcow, DiskOptions::default())?;
            let r = if on_core {
                drive_on_cores(&engine, &disk, cores, p, size, runtime)
            } else {
                // Pinned only while it drives the engine: fio, started from this thread
                // afterwards, must not inherit the pin.
                let unpin = args.pin_generator.then(pin_to_last_cpu).flatten();
                let r = drive(&engine, &disk, cores, p, size, runtime);
                if let Some(mask) = unpin {
                    set_affinity(&mask);
                }
                r
            };
            let closed = disk.close();
            drop(disk);
            let stopped = engine.shutdown();
            let n = r?;
            closed?;
            stopped?;
            if p.pattern == Pattern::RandWrite {
                dirty = true;
            }
            if let Some(v) = eng_runs.get_mut(i) {
                v.push(n);
            }
            let f = fio::run(
                &jobs.join(p.job),
                &Target::File(&prep.disk_raw),
                size,
                runtime.as_secs(),
            )?;
            if let Some(v) = fio_runs.get_mut(i) {
                v.push(Numbers::from(&f));
            }
        }
    }
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let e = med_numbers(eng_runs.get(i).map_or(&[][..], |v| v.as_slice()));
        let f = med_numbers(fio_runs.get(i).map_or(&[][..], |v| v.as_slice()));
        let iops_ratio = ratio(e.iops, f.iops);
        let bw_ratio = ratio(e.bw_bytes, f.bw_bytes);
        let met = p
            .target
            .and_then(|(t, by_iops)| if by_iops { iops_ratio } else { bw_ratio }.map(|r| r >= t));
        out.push(EmbSummary {
            profile: p.id.to_owned(),
            engine: e,
            fio: f,
            iops_ratio,
            bw_ratio,
            target: p.target.map(|t| t.0),
            met,
        });
    }
    println!(
        "setup: submit from {}, generator {}, layout {}, base {}",
        args.submit,
        if args.pin_generator {
            "pinned to the last CPU"
        } else {
            "not pinned"
        },
        args.layout,
        args.base_cache
    );
    print!("{}", table(&out, size, runtime.as_secs(), rounds, cores));
    if let Some(j) = &args.json {
        let text = serde_json::to_string_pretty(&out).unwrap_or_default();
        std::fs::write(j, text).map_err(io_err("write", j))?;
    }
    Ok(())
}

fn table(rows: &[EmbSummary], size: u64, runtime_s: u64, rounds: u32, cores: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "embedded engine ({cores} cores) vs fio io_uring --direct=1 on the raw copy; {} MiB, {runtime_s} s x {rounds} rounds, medians", size >> 20);
    let _ = writeln!(
        s,
        "{:<10} {:>11} {:>11} {:>7} {:>10} {:>10} {:>7}  {:>22}  {:>22}  target",
        "profile",
        "engine IOPS",
        "fio IOPS",
        "ratio",
        "eng MiB/s",
        "fio MiB/s",
        "ratio",
        "engine p50/p99/p99.9 us",
        "fio p50/p99/p99.9 us"
    );
    for r in rows {
        let us = |n: &Numbers| {
            format!(
                "{:.0}/{:.0}/{:.0}",
                n.p50_ns / 1e3,
                n.p99_ns / 1e3,
                n.p999_ns / 1e3
            )
        };
        let rat = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}x"));
        let verdict = match (r.target, r.met) {
            (Some(t), Some(true)) => format!(">= {t}x met"),
            (Some(t), _) => format!(">= {t}x MISSED"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            s,
            "{:<10} {:>11.0} {:>11.0} {:>7} {:>10.1} {:>10.1} {:>7}  {:>22}  {:>22}  {verdict}",
            r.profile,
            r.engine.iops,
            r.fio.iops,
            rat(r.iops_ratio),
            r.engine.bw_bytes / 1048576.0,
            r.fio.bw_bytes / 1048576.0,
            rat(r.bw_ratio),
            us(&r.engine),
            us(&r.fio)
        );
    }
    s
}

/// Keeps `p.qd` requests in flight on `disk` for `runtime`; returns throughput and latency.
fn drive(
    engine: &Engine,
    disk: &Disk,
    cores: usize,
    p: &EmbProfile,
    size: u64,
    runtime: Duration,
) -> Result<Numbers> {
    type Msg = (Instant, std::result::Result<Done, RequestError>);
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    let blocks = (size / p.bs).max(1);
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| BenchError::Usage(format!("histogram: {e}")))?;
    let mut spare: Vec<IoBuf> = Vec::new();
    if matches!(p.pattern, Pattern::RandWrite | Pattern::SeqWrite) {
        for _ in 0..p.qd {
            let mut b = engine.alloc_buf(p.bs as usize);
            rng.fill_bytes(&mut b);
            spare.push(b);
        }
    }
    let (mut next_seq, mut turn, mut inflight, mut ops, mut bytes) =
        (0u64, 0usize, 0usize, 0u64, 0u64);
    let start = Instant::now();
    let end = start + runtime;
    loop {
        while inflight < p.qd && Instant::now() < end {
            let block = match p.pattern {
                Pattern::SeqRead | Pattern::SeqWrite => {
                    let b = next_seq;
                    next_seq = (next_seq + 1) % blocks;
                    b
                }
                _ => rng.gen_range(0..blocks),
            };
            let offset = block * p.bs;
            let req = match p.pattern {
                Pattern::RandWrite | Pattern::SeqWrite => {
                    let data = spare
                        .pop()
                        .unwrap_or_else(|| engine.alloc_buf(p.bs as usize));
                    Request::Write {
                        offset,
                        data: data.into(),
                        fua: false,
                    }
                }
                _ => Request::Read {
                    offset,
                    len: p.bs as u32,
                },
            };
            let tx = tx.clone();
            let t0 = Instant::now();
            disk.submit(
                turn % cores,
                req,
                Box::new(move |r| {
                    let _ = tx.send((t0, r));
                }),
            );
            turn = turn.wrapping_add(1);
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        // Block for one completion, then take every other one already there, so one wakeup
        // of this thread refills the queue for a whole batch.
        let first = rx
            .recv()
            .map_err(|_| BenchError::Usage("engine dropped a completion".to_owned()))?;
        for (t0, r) in std::iter::once(first).chain(rx.try_iter()) {
            inflight -= 1;
            let lat = u64::try_from(t0.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ = hist.record(lat);
            ops += 1;
            match r? {
                Done::Read(b) => bytes += b.len() as u64,
                Done::Filled(b) => bytes += b.len() as u64,
                Done::Written(b) => {
                    bytes += b.len() as u64;
                    spare.extend(b.into_owned());
                }
                Done::Ok | Done::Populated { .. } => {}
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(Numbers {
        iops: ops as f64 / secs,
        bw_bytes: bytes as f64 / secs,
        p50_ns: hist.value_at_quantile(0.5) as f64,
        p99_ns: hist.value_at_quantile(0.99) as f64,
        p999_ns: hist.value_at_quantile(0.999) as f64,
    })
}

/// Pins the calling thread to the machine's last CPU (the engine's core threads are not
/// pinned, so the scheduler keeps them off it when it can). Returns the mask it had, to put
/// back with [`set_affinity`]; `None` (and a warning) when pinning failed.
fn pin_to_last_cpu() -> Option<libc::cpu_set_t> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes inside `old`
    // and CPU_SET inside `set`.
    let (old, set, got) = unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        let got = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        (old, set, got)
    };
    if got != 0 || !set_affinity(&set) {
        eprintln!(
            "warning: pinning the generator failed: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(old)
}

/// Sets the calling thread's CPU mask; whether it worked.
fn set_affinity(mask: &libc::cpu_set_t) -> bool {
    // SAFETY: sched_setaffinity only reads the mask.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), mask) == 0 }
}

/// Answers a generator's completions queued on its core, for its next `ready`.
type Answers = Arc<Mutex<Vec<(Instant, std::result::Result<Done, RequestError>)>>>;

/// What one core's generator collected.
struct GenTally {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    error: Option<RequestError>,
}

/// State shared by the generators of one run and the thread that waits for them.
struct GenShared {
    p: EmbProfile,
    blocks: u64,
    end: Instant,
    /// Next block of the sequential pattern (shared, so the cores read one stream).
    next_seq: AtomicU64,
    /// Requests in flight over all cores.
    inflight: AtomicUsize,
}

/// A load generator on one core: keeps its share of the queue depth in flight, submitting
/// from the core itself ([`SourceCtx::submit`]); completions (on the same core) queue their
/// result and kick the eventfd once per batch.
struct CoreGen {
    disk: Disk,
    shared: Arc<GenShared>,
    depth: usize,
    mine: usize,
    rng: SmallRng,
    spare: Vec<IoBuf>,
    done: Answers,
    kick: Arc<OwnedFd>,
    tally: Arc<Mutex<GenTally>>,
}

fn kick(fd: &OwnedFd) {
    addcow_engine::sys::eventfd_signal(fd);
}

impl CoreSource for CoreGen {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        let done = std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()));
        if let Ok(mut t) = self.tally.lock() {
            for (t0, r) in done {
                self.mine -= 1;
                self.shared.inflight.fetch_sub(1, Ordering::SeqCst);
                let lat = u64::try_from(t0.elapsed().as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let _ = t.hist.record(lat);
                t.ops += 1;
                match r {
                    Ok(Done::Read(b)) => t.bytes += b.len() as u64,
                    Ok(Done::Written(b)) => {
                        t.bytes += b.len() as u64;
                        self.spare.extend(b.into_owned());
                    }
                    Ok(_) => {}
                    Err(e) => t.error = Some(e),
                }
            }
        }
        let p = &self.shared.p;
        let blocks = self.shared.blocks;
        while self.mine < self.depth && Instant::now() < self.shared.end {
            let block = match p.pattern {
                Pattern::SeqRead => self.shared.next_seq.fetch_add(1, Ordering::Relaxed) % blocks,
                _ => self.rng.gen_range(0..blocks),
            };
            let offset = block * p.bs;
            let req = match p.pattern {
                Pattern::RandWrite => match self.spare.pop() {
                    Some(data) => Request::Write {
                        offset,
                        data: data.into(),
                        fua: false,
                    },
                    None => break,
                },
                _ => Request::Read {
                    offset,
                    len: p.bs as u32,
                },
            };
            let (q, k) = (Arc::clone(&self.done), Arc::clone(&self.kick));
            let t0 = Instant::now();
            self.mine += 1;
            self.shared.inflight.fetch_add(1, Ordering::SeqCst);
            ctx.submit(
                &self.disk,
                req,
                Box::new(move |r| {
                    let mut q = q.lock().unwrap_or_else(|e| e.into_inner());
                    q.push((t0, r));
                    if q.len() == 1 {
                        kick(&k);
                    }
                }),
            );
        }
    }
}

/// As [`drive`], with a generator on every core submitting from the core itself (no channel
/// hop per request); the queue depth is split over the cores.
fn drive_on_cores(
    engine: &Engine,
    disk: &Disk,
    cores: usize,
    p: &EmbProfile,
    size: u64,
    runtime: Duration,
) -> Result<Numbers> {
    let start = Instant::now();
    let shared = Arc::new(GenShared {
        p: p.clone(),
        blocks: (size / p.bs).max(1),
        end: start + runtime,
        next_seq: AtomicU64::new(0),
        inflight: AtomicUsize::new(0),
    });
    let mut ids = Vec::new();
    let mut tallies = Vec::new();
    for core in 0..cores {
        let depth = p.qd / cores + usize::from(core < p.qd % cores);
        if depth == 0 {
            continue;
        }
        let fd = addcow_engine::sys::eventfd(addcow_engine::sys::EventFdMode::NonBlocking)
            .map(Arc::new)
            .map_err(io_err("eventfd", std::path::Path::new("eventfd")))?;
        let watch = fd
            .try_clone()
            .map_err(io_err("dup eventfd", std::path::Path::new("eventfd")))?;
        let mut rng = SmallRng::seed_from_u64(0x5eed + core as u64);
        let spare = if p.pattern == Pattern::RandWrite {
            (0..depth)
                .map(|_| {
                    let mut b = engine.alloc_buf(p.bs as usize);
                    rng.fill_bytes(&mut b);
                    b
                })
                .collect()
        } else {
            Vec::new()
        };
        let tally = Arc::new(Mutex::new(GenTally {
            hist: Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
                .map_err(|e| BenchError::Usage(format!("histogram: {e}")))?,
            ops: 0,
            bytes: 0,
            error: None,
        }));
        let gen = CoreGen {
            disk: disk.clone(),
            shared: Arc::clone(&shared),
            depth,
            mine: 0,
            rng,
            spare,
            done: Arc::new(Mutex::new(Vec::new())),
            kick: Arc::clone(&fd),
            tally: Arc::clone(&tally),
        };
        ids.push(engine.attach_source(core, watch, Box::new(gen))?);
        kick(&fd);
        tallies.push(tally);
    }
    // Wait for the run's end, then for the last answers.
    std::thread::sleep(runtime);
    let give_up = Instant::now() + Duration::from_secs(30);
    while shared.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    for id in ids {
        engine.detach_source(id)?;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| BenchError::Usage(format!("histogram: {e}")))?;
    let (mut ops, mut bytes) = (0u64, 0u64);
    for t in tallies {
        let t = t.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &t.error {
            return Err(BenchError::Usage(format!("engine request failed: {e}")));
        }
        let _ = hist.add(&t.hist);
        ops += t.ops;
        bytes += t.bytes;
    }
    Ok(Numbers {
        iops: ops as f64 / secs,
        bw_bytes: bytes as f64 / secs,
        p50_ns: hist.value_at_quantile(0.5) as f64,
        p99_ns: hist.value_at_quantile(0.99) as f64,
        p999_ns: hist.value_at_quantile(0.999) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_numbers() {
        let n = |x: f64| Numbers {
            iops: x,
            bw_bytes: x * 2.0,
            p50_ns: x,
            p99_ns: x,
            p999_ns: x,
        };
        let m = med_numbers(&[n(1.0), n(3.0), n(2.0)]);
        assert_eq!((m.iops, m.bw_bytes), (2.0, 4.0));
        assert!(med_numbers(&[]).iops.is_nan());
    }

    /// The on-core generators keep requests in flight on every core and count what they got:
    /// every read answered with its bytes, every write acknowledged, nothing left in flight.
    #[test]
    fn on_core_generators_drive_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 << 20;
        let prep = prepare::prepare(&dir.path().join("d"), size, 7, false).unwrap();
        let config = EngineConfig {
            cores: 2,
            arena_bytes: 16 << 20,
            ..EngineConfig::default()
        };
        for p in emb_profiles() {
            let engine = Engine::start(config.clone()).unwrap();
            let disk = engine.open(&prep.addcow, DiskOptions::default()).unwrap();
            let n = drive_on_cores(&engine, &disk, 2, &p, size, Duration::from_millis(300))
                .unwrap_or_else(|e| panic!("{}: {e}", p.id));
            assert!(n.iops > 0.0, "{}: nothing answered", p.id);
            let per_op = n.bw_bytes / n.iops;
            assert!((per_op - p.bs as f64).abs() < 1.0, "{}: {per_op}", p.id);
            assert!(n.p50_ns > 0.0 && n.p99_ns >= n.p50_ns, "{}", p.id);
            disk.close().unwrap();
            engine.shutdown().unwrap();
        }
    }

    #[test]
    fn profiles_match_job_files() {
        let all = profiles::all();
        for p in emb_profiles() {
            assert!(all.iter().any(|q| q.job == p.job), "{}", p.job);
        }
    }
}
