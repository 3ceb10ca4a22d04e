//! Results of a compare run: medians per (profile, server), ratios of addcow to each peer, the
//! targets, and the files `report.md`, `results.json` and `chart.svg`. [`targets`] judges the
//! issue's targets, [`chart`] draws the chart.

mod chart;
mod targets;

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cost::Cost;
use crate::error::{io_err, Result};
use crate::fio::FioResult;
use crate::profiles::{Metric, Profile};
#[cfg(test)]
use crate::servers::Server;
use crate::stats::{median, ratio};

/// The peer the targets are set against.
pub const TARGET_PEER: &str = "qemu-nbd-qcow2";

/// How and where the run was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// UTC start, `YYYY-MM-DDTHH-MM-SS`.
    pub date: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Seconds per run.
    pub runtime_s: u64,
    /// Rounds.
    pub rounds: u32,
    /// Whether this was a `--quick` smoke run.
    pub quick: bool,
    /// `fio --version`.
    pub fio_version: Option<String>,
    /// `qemu-nbd --version` (first line).
    pub qemu_nbd_version: Option<String>,
    /// `nbdkit --version`.
    pub nbdkit_version: Option<String>,
    /// Servers skipped for missing tools, with the package to install.
    pub missing: Vec<String>,
}

/// One fio run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// 1-based round.
    pub round: u32,
    /// Profile id.
    pub profile: String,
    /// Server id.
    pub server: String,
    /// The numbers, when the run worked.
    pub result: Option<FioResult>,
    /// What the server spent (not for `fio-raw`).
    #[serde(default)]
    pub cost: Cost,
    /// Why it failed, otherwise.
    pub error: Option<String>,
}

/// Medians over the rounds of one (profile, server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Profile id.
    pub profile: String,
    /// Server id.
    pub server: String,
    /// Successful runs the medians are taken over.
    pub runs: usize,
    /// Median operations per second.
    pub iops: f64,
    /// Median bytes per second.
    pub bw_bytes: f64,
    /// Median of the runs' p50 completion latency (ns; worse of read/write). NaN (`null` in
    /// `results.json`) when any run lacks it: missing, never zero.
    #[serde(deserialize_with = "crate::fio::nan_if_null")]
    pub p50_ns: f64,
    /// Median p99 (ns); NaN when missing.
    #[serde(deserialize_with = "crate::fio::nan_if_null")]
    pub p99_ns: f64,
    /// Median p99.9 (ns); NaN when missing.
    #[serde(deserialize_with = "crate::fio::nan_if_null")]
    pub p999_ns: f64,
    /// Median server CPU microseconds per request.
    pub cpu_us_per_op: Option<f64>,
    /// Median server system calls per request (with `--perf`).
    pub syscalls_per_op: Option<f64>,
    /// Median server context switches per request (with `--perf`).
    pub cswitches_per_op: Option<f64>,
    /// This server's median of the profile's metric over `fio-raw`'s (same profile, same size,
    /// same rounds): the fraction of the disk's own limit it reaches.
    #[serde(default)]
    pub raw_fraction: Option<f64>,
}

/// addcow against one peer on one profile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Profile id.
    pub profile: String,
    /// Peer server id.
    pub peer: String,
    /// What the profile is judged by.
    pub metric: Metric,
    /// addcow's median of `metric`.
    pub addcow: f64,
    /// The peer's median of `metric`.
    pub peer_value: f64,
    /// addcow / peer for `metric` (higher is better).
    pub ratio: Option<f64>,
    /// addcow p99 / peer p99 (lower is better).
    pub p99_ratio: Option<f64>,
    /// Target ratio for `metric` (only against qemu-nbd-qcow2, only where one is set).
    pub target: Option<f64>,
    /// Whether `ratio >= target`.
    pub target_met: Option<bool>,
    /// Whether addcow's p99 is no worse than the peer's (judged against qemu-nbd-qcow2 only;
    /// `None` when not judged or when a p99 is missing).
    pub p99_met: Option<bool>,
    /// addcow's or the peer's p99 is missing (fio did not report it): no verdict, and the
    /// report says so instead of showing a pass.
    #[serde(default)]
    pub p99_missing: bool,
}

/// Everything `results.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// Run settings and machine.
    pub meta: Meta,
    /// `(id, description)` of every server that ran.
    pub servers: Vec<(String, String)>,
    /// `(id, title)` of every profile that ran.
    pub profiles: Vec<(String, String)>,
    /// Every run.
    pub runs: Vec<RunRecord>,
    /// Medians.
    pub summary: Vec<Summary>,
    /// Ratios of addcow to each peer.
    pub comparisons: Vec<Comparison>,
}

impl Results {
    /// The summary of `(profile, server)`.
    pub fn get(&self, profile: &str, server: &str) -> Option<&Summary> {
        self.summary
            .iter()
            .find(|s| s.profile == profile && s.server == server)
    }
}

fn metric_of(s: &Summary, m: Metric) -> f64 {
    match m {
        Metric::Iops => s.iops,
        Metric::Bandwidth => s.bw_bytes,
    }
}

/// Medians and ratios from the runs (of the [`Server`]s, by their ids).
#[cfg(test)]
pub fn build(
    meta: Meta,
    profiles: &[Profile],
    servers: &[Server],
    runs: Vec<RunRecord>,
) -> Results {
    let ids: Vec<(String, String)> = servers
        .iter()
        .map(|s| (s.id().to_owned(), s.describe().to_owned()))
        .collect();
    build_named(meta, profiles, &ids, runs)
}

/// Medians and ratios from the runs of the servers `(id, description)` (ids as in the runs,
/// e.g. `addcow-cores-1`). addcow (id `addcow`) is compared with every server whose id does
/// not start with `addcow`.
pub fn build_named(
    meta: Meta,
    profiles: &[Profile],
    servers: &[(String, String)],
    runs: Vec<RunRecord>,
) -> Results {
    let mut summary = Vec::new();
    for p in profiles {
        for (sid, _) in servers {
            let ok: Vec<(&FioResult, &Cost)> = runs
                .iter()
                .filter(|r| r.profile == p.id && &r.server == sid)
                .filter_map(|r| r.result.as_ref().map(|x| (x, &r.cost)))
                .collect();
            if ok.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&FioResult) -> f64| {
                median(&ok.iter().map(|(r, _)| f(r)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            let per_op = |f: &dyn Fn(&Cost) -> Option<f64>| {
                let v: Vec<f64> = ok
                    .iter()
                    .filter_map(|(r, c)| f(c).and_then(|x| ratio(x, r.total_ios as f64)))
                    .collect();
                median(&v)
            };
            summary.push(Summary {
                profile: p.id.to_owned(),
                server: sid.clone(),
                runs: ok.len(),
                iops: med(&|r| r.iops),
                bw_bytes: med(&|r| r.bw_bytes),
                p50_ns: med(&|r| r.latency().p50_ns),
                p99_ns: med(&|r| r.latency().p99_ns),
                p999_ns: med(&|r| r.latency().p999_ns),
                cpu_us_per_op: per_op(&|c| c.cpu_s.map(|x| x * 1e6)),
                syscalls_per_op: per_op(&|c| c.syscalls.map(|x| x as f64)),
                cswitches_per_op: per_op(&|c| c.context_switches.map(|x| x as f64)),
                raw_fraction: None,
            });
        }
        let raw = summary
            .iter()
            .find(|s| s.profile == p.id && s.server == "fio-raw")
            .map(|s| metric_of(s, p.metric));
        for x in summary.iter_mut().filter(|s| s.profile == p.id) {
            x.raw_fraction = raw.and_then(|raw| ratio(metric_of(x, p.metric), raw));
        }
    }
    let mut comparisons = Vec::new();
    for p in profiles {
        let Some(a) = summary
            .iter()
            .find(|s| s.profile == p.id && s.server == "addcow")
        else {
            continue;
        };
        for peer in summary
            .iter()
            .filter(|s| s.profile == p.id && !s.server.starts_with("addcow"))
        {
            let r = ratio(metric_of(a, p.metric), metric_of(peer, p.metric));
            let p99 = ratio(a.p99_ns, peer.p99_ns);
            let is_target_peer = peer.server == TARGET_PEER;
            let target = if is_target_peer { p.target } else { None };
            comparisons.push(Comparison {
                profile: p.id.to_owned(),
                peer: peer.server.clone(),
                metric: p.metric,
                addcow: metric_of(a, p.metric),
                peer_value: metric_of(peer, p.metric),
                ratio: r,
                p99_ratio: p99,
                target,
                target_met: target.and_then(|t| r.map(|r| r >= t)),
                p99_met: if is_target_peer {
                    p99.map(|x| x <= 1.0)
                } else {
                    None
                },
                p99_missing: a.p99_ns.is_nan() || peer.p99_ns.is_nan(),
            });
        }
    }
    Results {
        meta,
        servers: servers.to_vec(),
        profiles: profiles
            .iter()
            .map(|p| (p.id.to_owned(), p.title.to_owned()))
            .collect(),
        runs,
        summary,
        comparisons,
    }
}

fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "missing".to_owned()
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.0} µs", ns / 1e3)
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
}

fn fmt_met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "–",
    }
}

/// The Markdown report of a one-size run.
#[cfg(test)]
pub fn markdown(r: &Results) -> String {
    markdown_sections(std::slice::from_ref(r))
}

/// The chart file of section `i` of `n`: `chart.svg` for a one-size report, else one per size.
fn chart_name(r: &Results, n: usize) -> String {
    if n == 1 {
        "chart.svg".to_owned()
    } else {
        format!("chart-{}M.svg", r.meta.size >> 20)
    }
}

/// The Markdown report: the header, the targets over every size, then one section per
/// size, the scaling over core counts when there was a `--cores-scan`, and the method.
pub fn markdown_sections(sections: &[Results]) -> String {
    let mut s = String::new();
    let Some(r) = sections.first() else {
        return "# addcow benchmark: compare\n\nNo results.\n".to_owned();
    };
    let m = &r.meta;
    let sizes: Vec<String> = sections
        .iter()
        .map(|r| format!("{} MiB", r.meta.size >> 20))
        .collect();
    let _ = writeln!(s, "# addcow benchmark: compare ({})\n", m.date);
    let _ = writeln!(
        s,
        "Machine: {} CPUs, kernel {}. Disk: {}, 50% of its 64 KiB chunks written in the overlays. \
         {} s per run, {} round(s), servers interleaved within each round; numbers are medians over the rounds.{}\n",
        m.cpus,
        m.kernel,
        sizes.join(" and "),
        m.runtime_s,
        m.rounds,
        if m.quick { " **Quick smoke run: not a measurement.**" } else { "" }
    );
    let _ = writeln!(
        s,
        "Tools: {}; {}; {}. Client: fio's nbd engine over a Unix socket (`fio-configs/`).\n",
        m.fio_version.as_deref().unwrap_or("fio ?"),
        m.qemu_nbd_version.as_deref().unwrap_or("qemu-nbd ?"),
        m.nbdkit_version.as_deref().unwrap_or("nbdkit ?")
    );
    let _ = writeln!(s, "How to read it: the issue's targets first, each met, missed or missing (a server or a \
        latency that did not run or was not reported), then per disk size: the per-profile ratios against \
        qemu-nbd serving the same data as a qcow2 overlay, every server's median IOPS, bandwidth, latency \
        percentiles and fraction of the raw limit (`fio-raw`: the disk itself, no server, same profile, size \
        and rounds), and what each server spent per request.\n");
    targets::write_block(&mut s, sections);
    let multi = sections.len() > 1;
    for r in sections {
        if multi {
            let _ = writeln!(s, "# Disk {} MiB\n", r.meta.size >> 20);
        }
        section(&mut s, r, &chart_name(r, sections.len()));
    }
    scaling(&mut s, sections);
    let _ = writeln!(s, "## Servers\n");
    for (id, d) in &r.servers {
        let _ = writeln!(s, "- `{id}`: {d}");
    }
    for miss in &m.missing {
        let _ = writeln!(s, "- skipped or not measured: {miss}");
    }
    let _ = writeln!(s, "\n## Method\n");
    let _ = writeln!(s, "- Data: a random base; the raw copy is the base with a seeded random half of its 64 KiB chunks \
        replaced; the add-cow overlay holds those chunks in its raw image with their bits set; the qcow2 overlay \
        (`qemu-img create -b disk.raw` then `qemu-img rebase -b base.raw`) holds exactly the clusters that differ. \
        All servers see the same bytes.");
    let _ = writeln!(s, "- Every run starts its server and stops it afterwards. After a run that wrote to an overlay, \
        that overlay is restored before it is served again (qcow2: pristine copy; add-cow: pristine metadata \
        file and holes punched over the chunks that were unwritten), so every server starts each profile from \
        the same allocation state. `firstwrite` gets a freshly created overlay (add-cow, qcow2) or sparse file (raw) \
        per run; nbdkit's cow layer is empty at every start.");
    let _ = writeln!(s, "- Before every run the page cache of every data file (base, raw copy, overlays) is dropped \
        (`posix_fadvise(DONTNEED)` after an fdatasync; no root needed), so a server that reads through the page \
        cache starts each run cold like the O_DIRECT ones.");
    let _ = writeln!(s, "- Latency is fio's completion latency (clat); for mixed profiles the worse of read and write.");

    s
}

/// One size's tables: targets against qemu-nbd qcow2, every profile, cost per request, failed runs.
fn section(s: &mut String, r: &Results, chart: &str) {
    let _ = writeln!(s, "## Targets (addcow vs {TARGET_PEER})\n");
    let _ = writeln!(s, "| profile | metric | addcow | qemu-nbd qcow2 | ratio | target | throughput | p99 ratio | p99 |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|---:|---|");
    for c in r.comparisons.iter().filter(|c| c.peer == TARGET_PEER) {
        let (a, b) = match c.metric {
            crate::profiles::Metric::Iops => (
                format!("{:.0} IOPS", c.addcow),
                format!("{:.0} IOPS", c.peer_value),
            ),
            crate::profiles::Metric::Bandwidth => (
                format!("{:.0} MiB/s", c.addcow / 1048576.0),
                format!("{:.0} MiB/s", c.peer_value / 1048576.0),
            ),
        };
        let _ = writeln!(
            s,
            "| {} | {:?} | {a} | {b} | {} | {} | {} | {} | {} |",
            c.profile,
            c.metric,
            fmt_ratio(c.ratio),
            c.target
                .map_or_else(|| "–".to_owned(), |t| format!("≥ {t}×")),
            fmt_met(c.target_met),
            if c.p99_missing {
                "missing".to_owned()
            } else {
                fmt_ratio(c.p99_ratio)
            },
            if c.p99_missing {
                "**missing**"
            } else {
                fmt_met(c.p99_met)
            }
        );
    }
    let _ = writeln!(s, "\n![IOPS per profile per server]({chart})\n");
    let _ = writeln!(s, "## Per profile\n");
    for (pid, title) in &r.profiles {
        let _ = writeln!(s, "### {pid}: {title}\n");
        let _ = writeln!(
            s,
            "| server | runs | IOPS | MiB/s | p50 | p99 | p99.9 | addcow / this | fraction of raw limit |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (sid, _) in &r.servers {
            let Some(x) = r.get(pid, sid) else {
                let _ = writeln!(s, "| {sid} | 0 | – | – | – | – | – | – | – |");
                continue;
            };
            let ratio = r
                .comparisons
                .iter()
                .find(|c| &c.profile == pid && &c.peer == sid)
                .and_then(|c| c.ratio);
            let _ = writeln!(
                s,
                "| {sid} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                x.runs,
                x.iops,
                x.bw_bytes / 1048576.0,
                fmt_ns(x.p50_ns),
                fmt_ns(x.p99_ns),
                fmt_ns(x.p999_ns),
                if sid.starts_with("addcow") {
                    "–".to_owned()
                } else {
                    fmt_ratio(ratio)
                },
                match (sid.as_str(), x.raw_fraction) {
                    ("fio-raw", _) => "(the limit)".to_owned(),
                    (_, Some(f)) => format!("{f:.2}"),
                    (_, None) => "–".to_owned(),
                }
            );
        }
        let _ = writeln!(s);
    }
    cost_tables(s, r);
    let failed: Vec<_> = r.runs.iter().filter(|x| x.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed runs ({} MiB)\n", r.meta.size >> 20);
        for f in failed {
            let _ = writeln!(
                s,
                "- round {} {} on {}: {}",
                f.round,
                f.profile,
                f.server,
                f.error.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(s);
    }
}

/// CPU, syscalls and context switches per request, one table each, servers side by side.
fn cost_tables(s: &mut String, r: &Results) {
    let servers: Vec<&str> = r
        .servers
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| *id != "fio-raw")
        .collect();
    let _ = writeln!(s, "## Server cost per request\n");
    let _ = writeln!(s, "CPU time of the server process per request (all threads; `/proc/PID/stat`), and with `--perf` \
        system calls and context switches per request (`perf stat -p`; `–`: not measured). Where a target is missed, \
        this is where the time goes.\n");
    type Pick = fn(&Summary) -> Option<f64>;
    let tables: [(&str, Pick, usize); 3] = [
        ("CPU µs/request", |x| x.cpu_us_per_op, 1),
        ("syscalls/request", |x| x.syscalls_per_op, 2),
        ("context switches/request", |x| x.cswitches_per_op, 2),
    ];
    for (what, pick, digits) in tables {
        let _ = writeln!(s, "| {what} | {} |", servers.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(servers.len()));
        for (pid, _) in &r.profiles {
            let cells: Vec<String> = servers
                .iter()
                .map(|sid| {
                    r.get(pid, sid)
                        .and_then(pick)
                        .map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
                })
                .collect();
            let _ = writeln!(s, "| {pid} | {} |", cells.join(" | "));
        }
        let _ = writeln!(s);
    }
}

/// The `addcow-cores-N` servers of a `--cores-scan`, per size and profile: the metric at each
/// core count and the ratio of the most cores to the fewest.
fn scaling(s: &mut String, sections: &[Results]) {
    let cores = |id: &str| {
        id.strip_prefix("addcow-cores-")
            .and_then(|n| n.parse::<u64>().ok())
    };
    if !sections
        .iter()
        .any(|r| r.servers.iter().any(|(id, _)| cores(id).is_some()))
    {
        return;
    }
    let _ = writeln!(s, "## Scaling over engine cores\n");
    let _ = writeln!(s, "addcow with `--cores N`, same run, same clients. The ratio is the most cores over the \
        fewest; on a machine with as many CPUs as the most cores, the clients (fio) share them with the server.\n");
    let _ = writeln!(
        s,
        "| size | profile | cores | IOPS | MiB/s | p99 | scaling |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for r in sections {
        for (pid, _) in &r.profiles {
            let mut runs: Vec<(u64, &Summary)> = r
                .summary
                .iter()
                .filter(|x| &x.profile == pid)
                .filter_map(|x| cores(&x.server).map(|n| (n, x)))
                .collect();
            runs.sort_by_key(|(n, _)| *n);
            let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
                continue;
            };
            let metric = r
                .comparisons
                .iter()
                .find(|c| &c.profile == pid)
                .map(|c| c.metric)
                .unwrap_or_else(|| crate::profiles::metric_of_id(pid));
            let scale = ratio(metric_of(last.1, metric), metric_of(first.1, metric));
            for (i, (n, x)) in runs.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} MiB | {pid} | {n} | {:.0} | {:.1} | {} | {} |",
                    r.meta.size >> 20,
                    x.iops,
                    x.bw_bytes / 1048576.0,
                    fmt_ns(x.p99_ns),
                    if i + 1 == runs.len() && runs.len() > 1 {
                        format!("{} ({} → {} cores)", fmt_ratio(scale), first.0, last.0)
                    } else {
                        "–".to_owned()
                    }
                );
            }
        }
    }
    let _ = writeln!(s);
}

/// A short plain-text table for the terminal.
pub fn summary_text(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<11} {:<15} {:>16} {:>16} {:>7}  target (vs {TARGET_PEER})",
        "profile", "peer", "addcow", "peer", "ratio"
    );
    let value = |m: Metric, v: f64| match m {
        Metric::Iops => format!("{v:.0} IOPS"),
        Metric::Bandwidth => format!("{:.0} MiB/s", v / 1048576.0),
    };
    let met = |t: bool| if t { "met" } else { "MISSED" };
    for c in &r.comparisons {
        let p99 = match (c.p99_met, c.p99_missing && c.peer == TARGET_PEER) {
            (_, true) => Some("MISSING (no data)"),
            (Some(p), false) => Some(if p { "ok" } else { "MISSED" }),
            (None, false) => None,
        };
        let verdict = match (c.target_met, p99) {
            (Some(t), Some(p)) => format!("{} (p99 {p})", met(t)),
            (Some(t), None) => met(t).to_owned(),
            (None, Some(p)) => format!("p99 {p}"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            s,
            "{:<11} {:<15} {:>16} {:>16} {:>7}  {verdict}",
            c.profile,
            c.peer,
            value(c.metric, c.addcow),
            value(c.metric, c.peer_value),
            fmt_ratio(c.ratio),
        );
    }
    s
}

/// A compare run: one [`Results`] per disk size, in the order run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// One per size.
    pub sections: Vec<Results>,
}

/// What `results.json` may hold: a report, or (written before `--sizes`) one size's results.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Report(Report),
    One(Box<Results>),
}

/// Rewrites `report.md` and the charts in `dir` from its `results.json`.
pub fn render(dir: &Path) -> Result<()> {
    let jp = dir.join("results.json");
    let text = std::fs::read(&jp).map_err(io_err("read", &jp))?;
    let stored: Stored = serde_json::from_slice(&text)
        .map_err(|e| crate::error::BenchError::Usage(format!("{}: {e}", jp.display())))?;
    let sections = match stored {
        Stored::Report(r) => r.sections,
        Stored::One(r) => vec![*r],
    };
    write_files(dir, &sections, false)
}

/// Writes `report.md`, `results.json` and `chart.svg` of a one-size run into `dir`.
#[cfg(test)]
pub fn write(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
    write_files(dir, std::slice::from_ref(r), true)
}

/// Writes `report.md`, `results.json` and the charts (one per size) into `dir`.
pub fn write_report(dir: &Path, r: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
    write_files(dir, &r.sections, true)
}

fn write_files(dir: &Path, sections: &[Results], json: bool) -> Result<()> {
    if json {
        let text = match sections {
            [one] => serde_json::to_string_pretty(one),
            _ => serde_json::to_string_pretty(&Report {
                sections: sections.to_vec(),
            }),
        }
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        let jp = dir.join("results.json");
        std::fs::write(&jp, text).map_err(io_err("write", &jp))?;
    }
    let mp = dir.join("report.md");
    std::fs::write(&mp, markdown_sections(sections)).map_err(io_err("write", &mp))?;
    for r in sections {
        chart::write_svg(&dir.join(chart_name(r, sections.len())), r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::Latency;
    use crate::profiles;

    fn meta() -> Meta {
        Meta {
            date: "2026-01-01T00-00-00".into(),
            cpus: 2,
            kernel: "6.1".into(),
            size: 64 << 20,
            runtime_s: 2,
            rounds: 3,
            quick: false,
            fio_version: None,
            qemu_nbd_version: None,
            nbdkit_version: None,
            missing: vec![],
        }
    }

    fn rec(round: u32, server: &str, iops: f64, p99: f64) -> RunRecord {
        let lat = Latency {
            p50_ns: p99 / 2.0,
            p99_ns: p99,
            p999_ns: p99 * 2.0,
        };
        RunRecord {
            round,
            profile: "randread".into(),
            server: server.into(),
            result: Some(FioResult {
                iops,
                bw_bytes: iops * 4096.0,
                read_lat: Some(lat),
                write_lat: None,
                errors: 0,
                total_ios: 1000,
            }),
            cost: Cost {
                cpu_s: Some(0.5),
                syscalls: Some(3000),
                context_switches: None,
            },
            error: None,
        }
    }

    #[test]
    fn medians_ratios_and_targets() {
        let ps: Vec<_> = profiles::all()
            .into_iter()
            .filter(|p| p.id == "randread")
            .collect();
        let servers = [Server::Addcow, Server::QemuNbdQcow2, Server::QemuNbdRaw];
        let runs = vec![
            rec(1, "addcow", 100.0, 10.0),
            rec(1, "qemu-nbd-qcow2", 50.0, 20.0),
            rec(1, "qemu-nbd-raw", 100.0, 5.0),
            rec(2, "addcow", 140.0, 10.0),
            rec(2, "qemu-nbd-qcow2", 100.0, 20.0),
            rec(2, "qemu-nbd-raw", 200.0, 5.0),
            rec(3, "addcow", 130.0, 30.0),
            rec(3, "qemu-nbd-qcow2", 1000.0, 20.0),
            RunRecord {
                error: Some("boom".into()),
                result: None,
                ..rec(3, "qemu-nbd-raw", 0.0, 0.0)
            },
        ];
        let r = build(meta(), &ps, &servers, runs);
        let a = r.get("randread", "addcow").unwrap();
        assert_eq!((a.runs, a.iops, a.p99_ns), (3, 130.0, 10.0));
        assert_eq!(r.get("randread", "qemu-nbd-raw").unwrap().runs, 2);
        let q = r
            .comparisons
            .iter()
            .find(|c| c.peer == TARGET_PEER)
            .unwrap();
        assert_eq!(q.ratio, Some(1.3));
        assert_eq!(q.target_met, Some(true));
        assert_eq!(q.p99_met, Some(true));
        let raw = r
            .comparisons
            .iter()
            .find(|c| c.peer == "qemu-nbd-raw")
            .unwrap();
        assert_eq!(raw.ratio, Some(130.0 / 150.0));
        assert_eq!(raw.target, None);
        let md = markdown(&r);
        assert!(
            md.contains("| randread | Iops | 130 IOPS | 100 IOPS | 1.30× | ≥ 1.3× | met |"),
            "{md}"
        );
        assert!(md.contains("boom"));
        assert_eq!(a.cpu_us_per_op, Some(500.0));
        assert_eq!(a.syscalls_per_op, Some(3.0));
        assert_eq!(a.cswitches_per_op, None);
    }

    #[test]
    fn a_missing_p99_is_reported_missing_never_met() {
        // addcow's runs have no p99 (fio did not report it); the peer's do. Before, the missing
        // value became 0 and "0 <= peer" read as "p99 no worse".
        let ps: Vec<_> = profiles::all()
            .into_iter()
            .filter(|p| p.id == "randread")
            .collect();
        let servers = [Server::Addcow, Server::QemuNbdQcow2];
        let no_p99 = |round| {
            let mut r = rec(round, "addcow", 200.0, 10.0);
            if let Some(x) = r.result.as_mut() {
                x.read_lat = x.read_lat.map(|l| Latency {
                    p99_ns: f64::NAN,
                    ..l
                });
            }
            r
        };
        let runs = vec![
            no_p99(1),
            rec(1, "qemu-nbd-qcow2", 100.0, 20.0),
            rec(2, "addcow", 200.0, 10.0),
            rec(2, "qemu-nbd-qcow2", 100.0, 20.0),
        ];
        let r = build(meta(), &ps, &servers, runs);
        let a = r.get("randread", "addcow").unwrap();
        assert!(
            a.p99_ns.is_nan(),
            "median over a run without p99: {}",
            a.p99_ns
        );
        assert_eq!(a.p50_ns, 5.0);
        let q = &r.comparisons[0];
        assert_eq!((q.peer.as_str(), q.target_met), (TARGET_PEER, Some(true)));
        assert_eq!(q.p99_ratio, None);
        assert_eq!(q.p99_met, None, "a missing p99 is no verdict");
        assert!(q.p99_missing);
        let md = markdown(&r);
        let row = md
            .lines()
            .find(|l| l.starts_with("| randread | Iops"))
            .unwrap();
        assert!(row.ends_with("| met | missing | **missing** |"), "{row}");
        assert!(
            md.contains("| addcow | 2 | 200 | 0.8 | 0 µs | missing | 0 µs | – | – |"),
            "{md}"
        );
        let text = summary_text(&r);
        assert!(text.contains("met (p99 MISSING (no data))"), "{text}");
        // The missing value survives results.json and re-renders as missing.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &r).unwrap();
        render(dir.path()).unwrap();
        let md2 = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md2.contains(row), "{md2}");
    }

    #[test]
    fn writes_all_three_files() {
        let ps = profiles::all();
        let r = build(
            meta(),
            &ps,
            &[Server::Addcow, Server::QemuNbdQcow2],
            vec![
                rec(1, "addcow", 10.0, 1.0),
                rec(1, "qemu-nbd-qcow2", 5.0, 2.0),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &r).unwrap();
        for f in ["report.md", "results.json", "chart.svg"] {
            let len = std::fs::metadata(dir.path().join(f)).unwrap().len();
            assert!(len > 100, "{f} is {len} bytes");
        }
        let back: Results =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap())
                .unwrap();
        assert_eq!(back.summary.len(), 2);
        std::fs::remove_file(dir.path().join("report.md")).unwrap();
        render(dir.path()).unwrap();
        assert!(dir.path().join("report.md").exists());
        assert!(render(&dir.path().join("nope")).is_err());
        let svg = std::fs::read_to_string(dir.path().join("chart.svg")).unwrap();
        assert!(svg.contains("randread") && svg.contains("qemu-nbd-qcow2"));
    }

    fn rec_of(profile: &str, server: &str, iops: f64, p99: f64) -> RunRecord {
        let mut r = rec(1, server, iops, p99);
        r.profile = profile.into();
        r
    }

    fn section_of(size: u64, runs: Vec<RunRecord>) -> Results {
        let ps: Vec<_> = profiles::all()
            .into_iter()
            .filter(|p| ["randread", "syncwrite", "seqread"].contains(&p.id))
            .collect();
        let mut m = meta();
        m.size = size;
        build(
            m,
            &ps,
            &[Server::Addcow, Server::QemuNbdQcow2, Server::FioRaw],
            runs,
        )
    }

    /// Two sizes: one section (heading, tables, chart) each; the targets block judges every
    /// profile at both sizes against qemu-nbd and the raw-limit targets against fio-raw; the
    /// fraction column is addcow over fio-raw of the same profile and size.
    #[test]
    fn two_sizes_targets_and_raw_fraction() {
        let small = section_of(
            256 << 20,
            vec![
                rec_of("randread", "addcow", 800.0, 10.0),
                rec_of("randread", "qemu-nbd-qcow2", 500.0, 20.0),
                rec_of("randread", "fio-raw", 1000.0, 5.0),
                rec_of("syncwrite", "addcow", 140.0, 10.0),
                rec_of("syncwrite", "qemu-nbd-qcow2", 100.0, 20.0),
                rec_of("syncwrite", "fio-raw", 200.0, 5.0),
                rec_of("seqread", "addcow", 200.0, 30.0),
                rec_of("seqread", "qemu-nbd-qcow2", 100.0, 20.0),
            ],
        );
        let big = section_of(
            4 << 30,
            vec![
                rec_of("randread", "addcow", 700.0, 10.0),
                rec_of("randread", "qemu-nbd-qcow2", 500.0, 20.0),
                rec_of("randread", "fio-raw", 1000.0, 5.0),
                rec_of("seqread", "addcow", 200.0, 10.0),
                rec_of("seqread", "qemu-nbd-qcow2", 100.0, 20.0),
                rec_of("seqread", "fio-raw", 400.0, 5.0),
            ],
        );
        assert_eq!(
            small.get("randread", "addcow").unwrap().raw_fraction,
            Some(0.8)
        );
        assert_eq!(
            small
                .get("randread", "qemu-nbd-qcow2")
                .unwrap()
                .raw_fraction,
            Some(0.5)
        );
        assert_eq!(small.get("seqread", "addcow").unwrap().raw_fraction, None);
        assert_eq!(
            big.get("seqread", "addcow").unwrap().raw_fraction,
            Some(0.5)
        );

        let md = markdown_sections(&[small.clone(), big.clone()]);
        for want in [
            "# Disk 256 MiB",
            "# Disk 4096 MiB",
            "](chart-256M.svg)",
            "](chart-4096M.svg)",
            // The fraction column: addcow 800 of fio-raw 1000 at 256 MiB, 700 at 4 GiB.
            "| addcow | 1 | 800 | 3.1 | 0 µs | 0 µs | 0 µs | – | 0.80 |",
            "| addcow | 1 | 700 | 2.7 | 0 µs | 0 µs | 0 µs | – | 0.70 |",
            "| fio-raw | 1 | 1000 | 3.9 | 0 µs | 0 µs | 0 µs | 0.80× | (the limit) |",
            // Targets: met, missed on p99, missed on the ratio, missing a server.
            "| 256 MiB | randread | IOPS vs qemu-nbd-qcow2 | ≥ 1.3×, p99 no worse | 1.60× | 0.50× | met |",
            "| 256 MiB | randread | IOPS vs fio-raw (the disk's limit) | ≥ 0.75× | 0.80× | – | met |",
            "| 4096 MiB | randread | IOPS vs fio-raw (the disk's limit) | ≥ 0.75× | 0.70× | – | **missed** |",
            "| 256 MiB | syncwrite | IOPS vs qemu-nbd-qcow2 | ≥ 1.5×, p99 no worse | 1.40× | 0.50× | **missed** |",
            "| 256 MiB | syncwrite | IOPS vs fio-raw (the disk's limit) | ≥ 0.5× | 0.70× | – | met |",
            "| 256 MiB | seqread | bandwidth vs qemu-nbd-qcow2 | ≥ 1.3×, p99 no worse | 2.00× | 1.50× | **missed** |",
            "| 4096 MiB | syncwrite | IOPS vs qemu-nbd-qcow2 | ≥ 1.5×, p99 no worse | – | – | **missing** (no addcow result) |",
            "| 4096 MiB | syncwrite | IOPS vs fio-raw (the disk's limit) | ≥ 0.5× | – | – | **missing** (no addcow result) |",
            "5 met, 3 missed, 2 missing of 10",
        ] {
            assert!(md.contains(want), "missing {want:?} in\n{md}");
        }
        // Costs side by side: one column per server (not fio-raw), a row per profile.
        assert!(
            md.contains("| CPU µs/request | addcow | qemu-nbd-qcow2 |"),
            "{md}"
        );
        assert!(md.contains("| randread | 500.0 | 500.0 |"), "{md}");
        assert!(
            md.contains("| syscalls/request | addcow | qemu-nbd-qcow2 |"),
            "{md}"
        );
        assert!(md.contains("| randread | – | – |"), "{md}");

        // Written and re-rendered from results.json as the same report, one chart per size.
        let dir = tempfile::tempdir().unwrap();
        write_report(
            dir.path(),
            &Report {
                sections: vec![small, big],
            },
        )
        .unwrap();
        for f in ["chart-256M.svg", "chart-4096M.svg", "results.json"] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        let first = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        render(dir.path()).unwrap();
        let again = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert_eq!(first, again);
    }

    /// A `--cores-scan` run: addcow-cores-N servers get a scaling table, are not peers of
    /// addcow, and the targets say addcow itself is missing.
    #[test]
    fn cores_scan_scaling_table() {
        let ps: Vec<_> = profiles::all()
            .into_iter()
            .filter(|p| p.id == "multiconn")
            .collect();
        let ids = vec![
            ("addcow-cores-1".to_owned(), "one core".to_owned()),
            ("addcow-cores-2".to_owned(), "two cores".to_owned()),
        ];
        let r = build_named(
            meta(),
            &ps,
            &ids,
            vec![
                rec_of("multiconn", "addcow-cores-1", 100.0, 10.0),
                rec_of("multiconn", "addcow-cores-2", 170.0, 10.0),
            ],
        );
        assert!(r.comparisons.is_empty());
        let md = markdown(&r);
        assert!(md.contains("## Scaling over engine cores"), "{md}");
        assert!(md.contains("| 64 MiB | multiconn | 1 | 100 |"), "{md}");
        assert!(
            md.contains("| 64 MiB | multiconn | 2 | 170 | 0.7 | 0 µs | 1.70× (1 → 2 cores) |"),
            "{md}"
        );
    }
}
