//! `qos`: per-export throttling measured, never asserted (the numbers are for people reading the
//! report). One `addcow serve --control` with `--cores N` (default 1: every export on one core)
//! and its exports added and throttled through the control socket (`export-add`,
//! `export-set-throttle`, `throttle-group-set`), driven by fio's nbd engine and, for the
//! vhost-user-blk part, by the libblkio load generator (`vhost/blkio_load.rs`).
//!
//! * **Accuracy** (NBD, fio QD32): 4 KiB random reads against `iops-total=L`, 64 KiB random reads
//!   against `bps-total=B`, each as a ratio to its limit (steady state: the run's average);
//!   bursts: `*-max = 2 L` for `*-max-length` seconds, the first seconds of fio's per-second log
//!   as a ratio to the burst and the rest as a ratio to the limit; a group of 3 exports each
//!   running fio against one group limit: the sum against the limit, each against a third.
//! * **Isolation**: export A 4 KiB random read QD1 alone, then while export B runs 4 KiB random
//!   write QD256 and 1 MiB sequential write QD32 (no limits), then with B at `iops-total=2000`:
//!   A's p99 completion latency as a ratio to alone.
//! * **Cost**: 4 KiB random read / random write QD32 and 1 MiB sequential write QD32 with no
//!   limits and with limits far above the rate, and (`--baseline-addcow BIN`) the same with no
//!   limits on another binary (today's main) in the same run, as ratios; rounds interleave.
//! * **vhost-user-blk** (`libblkio`): the accuracy (steady) and isolation checks again on
//!   vhost-user-blk exports (B's two loads on two exports B and B2 sharing B's group: one
//!   frontend per vhost-user-blk export; no per-second log there, so no burst figures).
//!
//! Writes `qos.md` and `qos.json` to `--out` (default `bench/results/<UTC date>-qos`) and prints
//! the markdown.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{QosArgs, RunLength};
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, FioResult};
use crate::prepare;
use crate::servers::{self, Running};
use crate::stats;
use crate::sysinfo;
use crate::vhost::blkio_load::{self, Load, Pattern};

/// One fio load on one export.
#[derive(Debug, Clone)]
struct FioJob {
    export: String,
    rw: &'static str,
    bs: u64,
    qd: u32,
    /// Write fio's per-second IOPS and bandwidth logs with this prefix.
    log: Option<PathBuf>,
}

impl FioJob {
    fn new(export: &str, rw: &'static str, bs: u64, qd: u32) -> FioJob {
        FioJob {
            export: export.to_owned(),
            rw,
            bs,
            qd,
            log: None,
        }
    }
}

/// A running `addcow serve` with its control socket.
struct Daemon {
    running: Running,
    nbd: PathBuf,
    control: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, dir: &Path, tag: &str, cores: usize) -> Result<Daemon> {
        let nbd = dir.join(format!("{tag}.sock"));
        let control = dir.join(format!("{tag}.ctl"));
        let _ = std::fs::remove_file(&control);
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&nbd)
            .arg("--control")
            .arg(&control)
            .arg("--allow-dir")
            .arg(dir)
            .args(["--cache", "direct", "--cores", &cores.to_string()]);
        let running = servers::spawn(cmd, &nbd, &dir.join(format!("{tag}.log")))?;
        Ok(Daemon {
            running,
            nbd,
            control,
        })
    }

    /// One control call; a JSON-RPC error is an error naming the method.
    fn call(&self, method: &str, params: Value) -> Result<Value> {
        let shown = format!("control {method} {params}");
        let fail = |message: String| BenchError::Command {
            command: shown.clone(),
            message,
        };
        let mut s = UnixStream::connect(&self.control).map_err(|e| fail(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| fail(e.to_string()))?;
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        writeln!(s, "{req}").map_err(|e| fail(e.to_string()))?;
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| fail(e.to_string()))? == 0 {
                return Err(fail("connection closed".into()));
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| fail(e.to_string()))?;
            if v.get("id") != Some(&json!(1)) {
                continue; // a notification
            }
            if let Some(e) = v.get("error") {
                return Err(fail(e.to_string()));
            }
            return Ok(v.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    fn add(&self, name: &str, overlay: &Path, extra: Value) -> Result<()> {
        let mut p = json!({"name": name, "overlay": overlay});
        if let (Some(o), Value::Object(e)) = (p.as_object_mut(), extra) {
            o.extend(e);
        }
        self.call("export-add", p).map(|_| ())
    }

    fn limit(&self, name: &str, limits: Value) -> Result<()> {
        self.call(
            "export-set-throttle",
            json!({"name": name, "limits": limits}),
        )
        .map(|_| ())
    }

    /// `query-stats`' throttle counters of `name`: (throttled requests, seconds).
    fn throttled(&self, name: &str) -> (u64, f64) {
        let v = self
            .call("query-stats", json!({"name": name}))
            .unwrap_or_default();
        let t = &v[0]["throttle"];
        (
            t["throttled_requests"].as_u64().unwrap_or(0),
            t["throttled_seconds"].as_f64().unwrap_or(0.0),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.running.stop();
        let _ = std::fs::remove_file(&self.control);
    }
}

/// Starts fio for `job` against the daemon's NBD socket.
fn spawn_fio(nbd: &Path, job: &FioJob, len: &RunLength, runtime_s: u64) -> Result<Child> {
    let mut cmd = Command::new("fio");
    cmd.arg("--output-format=json")
        .arg("--name=qos")
        .arg("--ioengine=nbd")
        .arg(format!(
            "--uri=nbd+unix:///{}?socket={}",
            job.export,
            nbd.display()
        ))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.qd))
        .arg(format!("--size={}", len.size))
        .arg(format!("--runtime={runtime_s}"))
        .arg("--time_based=1");
    if let Some(p) = &job.log {
        cmd.arg(format!("--write_iops_log={}", p.display()))
            .arg(format!("--write_bw_log={}", p.display()))
            .arg("--log_avg_msec=1000");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().map_err(|e| BenchError::Command {
        command: "fio".into(),
        message: format!("cannot start: {e}"),
    })
}

fn wait_fio(child: Child, job: &FioJob) -> Result<FioResult> {
    let out = child.wait_with_output().map_err(|e| BenchError::Command {
        command: format!("fio {} on {}", job.rw, job.export),
        message: e.to_string(),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(BenchError::Command {
            command: format!("fio {} on {}", job.rw, job.export),
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let r = fio::parse(&stdout)?;
    if r.errors != 0 {
        return Err(BenchError::Command {
            command: format!("fio {} on {}", job.rw, job.export),
            message: format!("{} I/O errors", r.errors),
        });
    }
    Ok(r)
}

/// Runs every job at once for `runtime_s` seconds; their results in order.
fn fio_together(
    nbd: &Path,
    jobs: &[FioJob],
    len: &RunLength,
    runtime_s: u64,
) -> Result<Vec<FioResult>> {
    let children = jobs
        .iter()
        .map(|j| spawn_fio(nbd, j, len, runtime_s))
        .collect::<Result<Vec<_>>>()?;
    children
        .into_iter()
        .zip(jobs)
        .map(|(c, j)| wait_fio(c, j))
        .collect()
}

fn fio_one(nbd: &Path, job: &FioJob, len: &RunLength, runtime_s: u64) -> Result<FioResult> {
    let c = spawn_fio(nbd, job, len, runtime_s)?;
    wait_fio(c, job)
}

/// The per-second values of one of fio's logs (`PREFIX_iops.1.log`, `PREFIX_bw.1.log`: time
/// in ms, value, direction, ...), summed over directions per second. Bandwidth logs are in
/// KiB/s; returned as bytes/s.
fn per_second(prefix: &Path, kind: &str) -> Vec<f64> {
    let path = PathBuf::from(format!("{}_{kind}.1.log", prefix.display()));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut secs: Vec<f64> = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        let (Some(t), Some(v)) = (
            f.first().and_then(|t| t.parse::<u64>().ok()),
            f.get(1).and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        // Each entry closes a one-second window at about `t` (a few ms late under load).
        let i = ((t + 500) / 1000).saturating_sub(1) as usize;
        if secs.len() <= i {
            secs.resize(i + 1, 0.0);
        }
        secs[i] += if kind == "bw" { v * 1024.0 } else { v };
    }
    secs
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One measured figure of the report.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    /// What part (accuracy, isolation, cost, vhost-...).
    part: &'static str,
    /// What was measured.
    what: String,
    /// The measured value (IOPS, bytes/s or µs) per round.
    measured: Vec<f64>,
    /// What it is compared with (the limit, the alone run, the baseline), per round.
    reference: Vec<f64>,
    /// The goal for the ratio, as text.
    goal: &'static str,
    /// Unit of `measured` and `reference` (IOPS, B/s, µs).
    unit: &'static str,
    /// Held back by the throttle during the run: requests, seconds (summed over rounds).
    throttled: (u64, f64),
}

impl Figure {
    fn new(part: &'static str, what: String, goal: &'static str) -> Figure {
        let unit = if what.contains("p99") {
            "µs"
        } else if what.contains("bytes/s") || what.contains("MiB") {
            "B/s"
        } else {
            "IOPS"
        };
        Figure {
            part,
            what,
            measured: Vec::new(),
            reference: Vec::new(),
            goal,
            unit,
            throttled: (0, 0.0),
        }
    }

    fn push(&mut self, measured: f64, reference: f64) {
        self.measured.push(measured);
        self.reference.push(reference);
    }

    fn ratio(&self) -> Option<f64> {
        let r: Vec<f64> = self
            .measured
            .iter()
            .zip(&self.reference)
            .filter_map(|(m, r)| stats::ratio(*m, *r))
            .collect();
        if r.len() != self.measured.len() {
            return None;
        }
        stats::median(&r)
    }
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
struct QosResults {
    date: String,
    cpus: usize,
    kernel: String,
    cores: usize,
    size: u64,
    runtime_s: u64,
    rounds: u32,
    iops_limit: u64,
    bps_limit: u64,
    burst_length_s: u64,
    baseline: Option<PathBuf>,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

/// Adds up `(requests, seconds)` pairs.
fn add(a: &mut (u64, f64), b: (u64, f64)) {
    a.0 += b.0;
    a.1 += b.1;
}

fn sub(after: (u64, f64), before: (u64, f64)) -> (u64, f64) {
    (after.0.saturating_sub(before.0), after.1 - before.1)
}

/// Runs the benchmark and writes the report.
pub fn run(args: &QosArgs) -> Result<()> {
    let len = args.run.length(
        RunLength {
            size: 1 << 30,
            runtime_s: 10,
            rounds: 1,
        },
        RunLength {
            size: 64 << 20,
            runtime_s: 1,
            rounds: 1,
        },
    );
    if !servers::on_path("fio") {
        return Err(BenchError::Missing(
            "fio (Debian: apt-get install fio)".into(),
        ));
    }
    let bin = crate::compare::addcow_binary(args.addcow.as_deref())?;
    let (work, _tmp) = prepare::work_dir(args.run.work.as_deref(), "addcow-bench-qos-")?;
    eprintln!(
        "preparing {} MiB of data in {}",
        len.size >> 20,
        work.display()
    );
    let prep = prepare::prepare(&work.join("data"), len.size, 0x0905, false)?;
    let fresh = |name: &str| -> Result<PathBuf> {
        let overlay = work.join(format!("{name}.add-cow"));
        let _ = std::fs::remove_file(&overlay);
        let _ = std::fs::remove_file(work.join(format!("{name}.raw")));
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: overlay.clone(),
            image: Some(work.join(format!("{name}.raw"))),
            size: Some(len.size),
            ..Default::default()
        })?;
        Ok(overlay)
    };
    let burst = args
        .burst_length
        .unwrap_or(if args.run.quick { 1 } else { 2 })
        .max(1);
    let (il, bl) = (args.iops_limit, args.bps_limit);
    let mut res = QosResults {
        date: sysinfo::utc_stamp(),
        cpus: sysinfo::cpus(),
        kernel: sysinfo::kernel(),
        cores: args.cores,
        size: len.size,
        runtime_s: len.runtime_s,
        rounds: len.rounds,
        iops_limit: il,
        bps_limit: bl,
        burst_length_s: burst,
        baseline: args.baseline_addcow.clone(),
        figures: Vec::new(),
        notes: Vec::new(),
    };

    // ---- accuracy and isolation over NBD ----
    let d = Daemon::start(&bin, &work, "qos", args.cores)?;
    let names = ["a", "b", "c", "d"];
    d.add("a", &prep.addcow, json!({}))?;
    for n in &names[1..] {
        d.add(n, &fresh(n)?, json!({}))?;
    }
    let mut iops = Figure::new(
        "accuracy",
        format!("fio 4 KiB randread QD32, iops-total={il}: IOPS / limit"),
        "within 5 %",
    );
    let mut bps = Figure::new(
        "accuracy",
        format!("fio 64 KiB randread QD32, bps-total={bl}: bytes/s / limit"),
        "within 5 %",
    );
    let mut iops_burst = Figure::new(
        "accuracy",
        format!(
            "iops-total-max={} for {burst} s: first {burst} s IOPS / max",
            2 * il
        ),
        "at *-max",
    );
    let mut iops_after = Figure::new(
        "accuracy",
        format!("after the burst: IOPS / iops-total={il}"),
        "within 5 %",
    );
    let mut bps_burst = Figure::new(
        "accuracy",
        format!(
            "bps-total-max={} for {burst} s: first {burst} s bytes/s / max",
            2 * bl
        ),
        "at *-max",
    );
    let mut bps_after = Figure::new(
        "accuracy",
        format!("after the burst: bytes/s / bps-total={bl}"),
        "within 5 %",
    );
    let mut group_sum = Figure::new(
        "accuracy",
        format!("group of 3 exports, iops-total={il}: sum of IOPS / limit"),
        "within 5 %",
    );
    let mut group_each: Vec<Figure> = (0..3)
        .map(|i| {
            Figure::new(
                "accuracy",
                format!("group member {}: IOPS / (limit / 3)", names[i + 1]),
                "within 20 %",
            )
        })
        .collect();
    let mut iso_free = Figure::new(
        "isolation",
        "A 4 KiB randread QD1 p99, B busy (randwrite QD256 + 1 MiB seqwrite QD32), no limits: p99 / alone".into(),
        "within 3x",
    );
    let mut iso_limited = Figure::new(
        "isolation",
        "the same with B at iops-total=2000: p99 / alone".into(),
        "within 1.5x",
    );
    let r = len.runtime_s;
    for round in 1..=len.rounds {
        eprintln!("round {round}/{}: NBD accuracy", len.rounds);
        let t0 = d.throttled("b");
        d.limit("b", json!({"iops-total": il}))?;
        let f = fio_one(&d.nbd, &FioJob::new("b", "randread", 4096, 32), &len, r)?;
        iops.push(f.iops, il as f64);
        d.limit("b", json!({"bps-total": bl}))?;
        let f = fio_one(&d.nbd, &FioJob::new("b", "randread", 65536, 32), &len, r)?;
        bps.push(f.bw_bytes, bl as f64);
        add(&mut iops.throttled, sub(d.throttled("b"), t0));

        // Bursts: a fresh limit (a full bucket), logged per second.
        let t0 = d.throttled("b");
        let burst_run = burst + r.max(3);
        for (kind, limits, bs, fig, after, limit) in [
            (
                "iops",
                json!({"iops-total": il, "iops-total-max": 2 * il, "iops-total-max-length": burst}),
                4096,
                &mut iops_burst,
                &mut iops_after,
                il,
            ),
            (
                "bw",
                json!({"bps-total": bl, "bps-total-max": 2 * bl, "bps-total-max-length": burst}),
                65536,
                &mut bps_burst,
                &mut bps_after,
                bl,
            ),
        ] {
            d.limit("b", json!({}))?;
            d.limit("b", limits)?;
            let log = work.join(format!("burst-{kind}-{round}"));
            let mut job = FioJob::new("b", "randread", bs, 32);
            job.log = Some(log.clone());
            fio_one(&d.nbd, &job, &len, burst_run)?;
            let s = per_second(&log, kind);
            let b = burst as usize;
            if let (Some(first), Some(rest)) = (
                mean(s.get(..b.min(s.len())).unwrap_or(&[])),
                mean(s.get(b + 1..).unwrap_or(&[])),
            ) {
                fig.push(first, 2.0 * limit as f64);
                after.push(rest, limit as f64);
            } else {
                res.notes.push(format!(
                    "round {round}: fio's per-second {kind} log had {} second(s), too few for the burst figures",
                    s.len()
                ));
            }
        }
        add(&mut iops_burst.throttled, sub(d.throttled("b"), t0));
        d.limit("b", json!({}))?;

        // A group of three.
        d.call(
            "throttle-group-set",
            json!({"name": "tenant", "limits": {"iops-total": il}}),
        )?;
        for n in &names[1..] {
            d.call(
                "export-set-throttle",
                json!({"name": n, "throttle-group": "tenant"}),
            )?;
        }
        let jobs: Vec<FioJob> = names[1..]
            .iter()
            .map(|n| FioJob::new(n, "randread", 4096, 32))
            .collect();
        let t0 = d.throttled("b");
        let rs = fio_together(&d.nbd, &jobs, &len, r)?;
        add(&mut group_sum.throttled, sub(d.throttled("b"), t0));
        group_sum.push(rs.iter().map(|f| f.iops).sum(), il as f64);
        for (g, f) in group_each.iter_mut().zip(&rs) {
            g.push(f.iops, il as f64 / 3.0);
        }
        for n in &names[1..] {
            d.limit(n, json!({}))?;
        }
        d.call("throttle-group-del", json!({"name": "tenant"}))?;

        eprintln!("round {round}/{}: NBD isolation", len.rounds);
        let a = FioJob::new("a", "randread", 4096, 1);
        let noisy = [
            FioJob::new("b", "randwrite", 4096, 256),
            FioJob::new("b", "write", 1 << 20, 32),
        ];
        prep.evict_cache();
        let alone = fio_one(&d.nbd, &a, &len, r)?.latency().p99_ns / 1e3;
        let mut all = vec![a.clone()];
        all.extend(noisy.iter().cloned());
        prep.evict_cache();
        let busy = fio_together(&d.nbd, &all, &len, r)?[0].latency().p99_ns / 1e3;
        iso_free.push(busy, alone);
        d.limit("b", json!({"iops-total": 2000}))?;
        let t0 = d.throttled("b");
        prep.evict_cache();
        let limited = fio_together(&d.nbd, &all, &len, r)?[0].latency().p99_ns / 1e3;
        add(&mut iso_limited.throttled, sub(d.throttled("b"), t0));
        iso_limited.push(limited, alone);
        d.limit("b", json!({}))?;
    }
    drop(d);
    res.figures.extend([
        iops, bps, iops_burst, iops_after, bps_burst, bps_after, group_sum,
    ]);
    res.figures.append(&mut group_each);
    res.figures.extend([iso_free, iso_limited]);

    // ---- cost ----
    let profiles: [(&str, &'static str, u64, u32); 3] = [
        ("a", "randread", 4096, 32),
        ("b", "randwrite", 4096, 32),
        ("b", "write", 1 << 20, 32),
    ];
    let mut variants: Vec<(&str, PathBuf, Value)> = Vec::new();
    if let Some(b) = &args.baseline_addcow {
        variants.push(("baseline, no limits", b.clone(), json!({})));
    }
    variants.push(("no limits", bin.clone(), json!({})));
    variants.push((
        "limits far above the rate",
        bin.clone(),
        json!({"iops-total": 10_000_000u64, "bps-total": 100u64 << 30}),
    ));
    // cost[profile][variant]: per round.
    let mut cost = vec![vec![Vec::new(); variants.len()]; profiles.len()];
    for round in 1..=len.rounds {
        for (v, (label, vbin, limits)) in variants.iter().enumerate() {
            eprintln!("round {round}/{}: cost, {label}", len.rounds);
            let d = Daemon::start(vbin, &work, "cost", args.cores)?;
            d.add("a", &prep.addcow, json!({}))?;
            d.add("b", &fresh("cost-b")?, json!({}))?;
            if limits != &json!({}) {
                d.limit("a", limits.clone())?;
                d.limit("b", limits.clone())?;
            }
            for (p, (export, rw, bs, qd)) in profiles.iter().enumerate() {
                prep.evict_cache();
                let f = fio_one(&d.nbd, &FioJob::new(export, rw, *bs, *qd), &len, r)?;
                cost[p][v].push(if *bs >= 1 << 20 { f.bw_bytes } else { f.iops });
            }
        }
    }
    let base = 0usize;
    for (p, (_, rw, bs, qd)) in profiles.iter().enumerate() {
        for v in 1..variants.len() {
            let mut f = Figure::new(
                "cost",
                format!(
                    "{} {rw} QD{qd}, {} / {}",
                    human(*bs),
                    variants[v].0,
                    variants[base].0
                ),
                "within 3 %",
            );
            for (m, r) in cost[p][v].iter().zip(&cost[p][base]) {
                f.push(*m, *r);
            }
            res.figures.push(f);
        }
    }
    if args.baseline_addcow.is_none() {
        res.notes.push(
            "cost: no --baseline-addcow given, so the ratios are against this binary with no limits"
                .into(),
        );
    }

    // ---- vhost-user-blk ----
    if args.skip_vhost {
        res.notes
            .push("vhost-user-blk part skipped (--skip-vhost)".into());
    } else {
        vhost_part(&bin, &work, &prep, &fresh, &len, args, &mut res)?;
    }

    let any_throttled = res.figures.iter().any(|f| f.throttled.0 > 0);
    if !any_throttled {
        res.notes.push(
            "no request was ever held back (query-stats throttled_requests stayed 0 in every limited run): \
             this daemon does not enforce limits, so the accuracy figures show the unthrottled rate"
                .into(),
        );
    }
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("{}-qos", res.date))
    });
    std::fs::create_dir_all(&out).map_err(io_err("create", &out))?;
    let md = markdown(&res);
    let md_path = out.join("qos.md");
    std::fs::write(&md_path, &md).map_err(io_err("write", &md_path))?;
    let json_path = out.join("qos.json");
    let text = serde_json::to_string_pretty(&res).unwrap_or_default();
    std::fs::write(&json_path, text).map_err(io_err("write", &json_path))?;
    print!("{md}");
    eprintln!("report: {}", md_path.display());
    Ok(())
}

/// The accuracy (steady) and isolation checks over vhost-user-blk with libblkio.
fn vhost_part(
    bin: &Path,
    work: &Path,
    prep: &prepare::Prepared,
    fresh: &dyn Fn(&str) -> Result<PathBuf>,
    len: &RunLength,
    args: &QosArgs,
    res: &mut QosResults,
) -> Result<()> {
    let d = Daemon::start(bin, work, "vhost", args.cores)?;
    let sock = |n: &str| work.join(format!("vhost-{n}.sock"));
    let vhost = |n: &str| json!({"type": "vhost-user-blk", "addr": sock(n), "num-queues": 1});
    d.add("a", &prep.addcow, vhost("a"))?;
    for n in ["b", "b2", "c", "d"] {
        d.add(n, &fresh(&format!("v{n}"))?, vhost(n))?;
    }
    let (il, bl) = (args.iops_limit, args.bps_limit);
    let rt = Duration::from_secs(len.runtime_s);
    let load = |pattern, bs: usize, depth| Load {
        pattern,
        bs,
        depth,
        span: len.size,
        runtime: rt,
    };
    let together = |loads: Vec<(String, Load)>| -> Result<Vec<blkio_load::LoadResult>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = loads
                .into_iter()
                .map(|(n, l)| {
                    let p = sock(&n);
                    s.spawn(move || blkio_load::run(&p, l))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(BenchError::Usage("a load thread panicked".into())))
                })
                .collect()
        })
    };
    let mut iops = Figure::new(
        "vhost-user-blk",
        format!("libblkio 4 KiB randread QD32, iops-total={il}: IOPS / limit"),
        "within 5 %",
    );
    let mut bps = Figure::new(
        "vhost-user-blk",
        format!("libblkio 64 KiB randread QD32, bps-total={bl}: bytes/s / limit"),
        "within 5 %",
    );
    let mut group_sum = Figure::new(
        "vhost-user-blk",
        format!("group of 3 exports, iops-total={il}: sum of IOPS / limit"),
        "within 5 %",
    );
    let mut iso_free = Figure::new(
        "vhost-user-blk",
        "A 4 KiB randread QD1 p99, B randwrite QD256 + B2 1 MiB seqwrite QD32, no limits: p99 / alone".into(),
        "within 3x",
    );
    let mut iso_limited = Figure::new(
        "vhost-user-blk",
        "the same with B and B2 in one group at iops-total=2000: p99 / alone".into(),
        "within 1.5x",
    );
    for round in 1..=len.rounds {
        eprintln!("round {round}/{}: vhost-user-blk", len.rounds);
        let t0 = d.throttled("b");
        d.limit("b", json!({"iops-total": il}))?;
        let r = blkio_load::run(&sock("b"), load(Pattern::RandRead, 4096, 32))?;
        iops.push(r.iops, il as f64);
        d.limit("b", json!({"bps-total": bl}))?;
        let r = blkio_load::run(&sock("b"), load(Pattern::RandRead, 65536, 32))?;
        bps.push(r.bw_bytes, bl as f64);
        add(&mut iops.throttled, sub(d.throttled("b"), t0));
        d.limit("b", json!({}))?;

        d.call(
            "throttle-group-set",
            json!({"name": "tenant", "limits": {"iops-total": il}}),
        )?;
        for n in ["b", "c", "d"] {
            d.call(
                "export-set-throttle",
                json!({"name": n, "throttle-group": "tenant"}),
            )?;
        }
        let t0 = d.throttled("b");
        let rs = together(
            ["b", "c", "d"]
                .iter()
                .map(|n| (n.to_string(), load(Pattern::RandRead, 4096, 32)))
                .collect(),
        )?;
        add(&mut group_sum.throttled, sub(d.throttled("b"), t0));
        group_sum.push(rs.iter().map(|r| r.iops).sum(), il as f64);
        for n in ["b", "c", "d"] {
            d.limit(n, json!({}))?;
        }
        d.call("throttle-group-del", json!({"name": "tenant"}))?;

        prep.evict_cache();
        let alone = blkio_load::run(&sock("a"), load(Pattern::RandRead, 4096, 1))?.lat_p99_us;
        let all = || {
            vec![
                ("a".to_string(), load(Pattern::RandRead, 4096, 1)),
                ("b".to_string(), load(Pattern::RandWrite, 4096, 256)),
                ("b2".to_string(), load(Pattern::SeqWrite, 1 << 20, 32)),
            ]
        };
        prep.evict_cache();
        iso_free.push(together(all())?[0].lat_p99_us, alone);
        d.call(
            "throttle-group-set",
            json!({"name": "noisy", "limits": {"iops-total": 2000}}),
        )?;
        for n in ["b", "b2"] {
            d.call(
                "export-set-throttle",
                json!({"name": n, "throttle-group": "noisy"}),
            )?;
        }
        let t0 = d.throttled("b");
        prep.evict_cache();
        iso_limited.push(together(all())?[0].lat_p99_us, alone);
        add(&mut iso_limited.throttled, sub(d.throttled("b"), t0));
        for n in ["b", "b2"] {
            d.limit(n, json!({}))?;
        }
        d.call("throttle-group-del", json!({"name": "noisy"}))?;
    }
    res.figures
        .extend([iops, bps, group_sum, iso_free, iso_limited]);
    Ok(())
}

fn human(bs: u64) -> String {
    if bs >= 1 << 20 {
        format!("{} MiB", bs >> 20)
    } else {
        format!("{} KiB", bs >> 10)
    }
}

fn number(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

/// The report: one table per part, medians over the rounds.
fn markdown(r: &QosResults) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# addcow QoS benchmark ({})\n", r.date);
    let _ = writeln!(
        out,
        "{} CPU(s), kernel {}; `addcow serve --cores {}`; {} MiB disks; {} s per run ({} s for \
         the burst runs), {} round(s); limits iops-total={}, bps-total={} (bursts at twice those \
         for {} s). Measured, not asserted: the goal column is the issue's.\n",
        r.cpus,
        r.kernel,
        r.cores,
        r.size >> 20,
        r.runtime_s,
        r.burst_length_s + r.runtime_s.max(3),
        r.rounds,
        r.iops_limit,
        r.bps_limit,
        r.burst_length_s
    );
    if let Some(b) = &r.baseline {
        let _ = writeln!(out, "Baseline binary: `{}`.\n", b.display());
    }
    for part in ["accuracy", "isolation", "cost", "vhost-user-blk"] {
        let figs: Vec<&Figure> = r.figures.iter().filter(|f| f.part == part).collect();
        if figs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "## {part}\n");
        let _ = writeln!(
            out,
            "| what | measured (median) | reference (median) | unit | ratio | goal | throttled (requests, s) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for f in figs {
            let m = stats::median(&f.measured).map_or("n/a".into(), number);
            let rf = stats::median(&f.reference).map_or("n/a".into(), number);
            let ratio = f.ratio().map_or("n/a".into(), |x| format!("{x:.3}"));
            let _ = writeln!(
                out,
                "| {} | {m} | {rf} | {} | {ratio} | {} | {}, {:.2} |",
                f.what, f.unit, f.goal, f.throttled.0, f.throttled.1
            );
        }
        let _ = writeln!(out);
    }
    if !r.notes.is_empty() {
        let _ = writeln!(out, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_logs_sum_directions_and_convert_bandwidth() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(
            dir.path().join("x_iops.1.log"),
            "1003, 5000, 0, 4096, 0\n2000, 4000, 0, 4096, 0\n1998, 1000, 1, 4096, 0\nbad\n",
        )
        .unwrap();
        assert_eq!(per_second(&p, "iops"), vec![5000.0, 5000.0]);
        std::fs::write(dir.path().join("x_bw.1.log"), "1000, 100, 0, 65536, 0\n").unwrap();
        assert_eq!(per_second(&p, "bw"), vec![102400.0]);
        assert!(per_second(&dir.path().join("none"), "iops").is_empty());
    }

    #[test]
    fn figures_take_the_median_ratio_and_missing_stays_missing() {
        let mut f = Figure::new("accuracy", "x".into(), "g");
        f.push(90.0, 100.0);
        f.push(110.0, 100.0);
        f.push(100.0, 100.0);
        assert_eq!(f.ratio(), Some(1.0));
        f.push(1.0, 0.0);
        assert_eq!(f.ratio(), None);
        let r = QosResults {
            date: "d".into(),
            cpus: 2,
            kernel: "k".into(),
            cores: 1,
            size: 64 << 20,
            runtime_s: 1,
            rounds: 1,
            iops_limit: 5000,
            bps_limit: 50 << 20,
            burst_length_s: 1,
            baseline: None,
            figures: vec![f],
            notes: vec!["n".into()],
        };
        let md = markdown(&r);
        assert!(md.contains("## accuracy") && md.contains("| n/a |") && md.contains("- n"));
    }
}
