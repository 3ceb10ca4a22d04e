//! Results of a compare run: medians per (profile, server), ratios of addcow to each peer, the
//! targets, and the files `report.md`, `results.json` and `chart.svg`.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cost::Cost;
use crate::error::{io_err, Result};
use crate::fio::FioResult;
use crate::profiles::{Metric, Profile};
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

/// Medians and ratios from the runs.
pub fn build(
    meta: Meta,
    profiles: &[Profile],
    servers: &[Server],
    runs: Vec<RunRecord>,
) -> Results {
    let mut summary = Vec::new();
    for p in profiles {
        for s in servers {
            let ok: Vec<(&FioResult, &Cost)> = runs
                .iter()
                .filter(|r| r.profile == p.id && r.server == s.id())
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
                server: s.id().to_owned(),
                runs: ok.len(),
                iops: med(&|r| r.iops),
                bw_bytes: med(&|r| r.bw_bytes),
                p50_ns: med(&|r| r.latency().p50_ns),
                p99_ns: med(&|r| r.latency().p99_ns),
                p999_ns: med(&|r| r.latency().p999_ns),
                cpu_us_per_op: per_op(&|c| c.cpu_s.map(|x| x * 1e6)),
                syscalls_per_op: per_op(&|c| c.syscalls.map(|x| x as f64)),
                cswitches_per_op: per_op(&|c| c.context_switches.map(|x| x as f64)),
            });
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
            .filter(|s| s.profile == p.id && s.server != "addcow")
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
        servers: servers
            .iter()
            .map(|s| (s.id().to_owned(), s.describe().to_owned()))
            .collect(),
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

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let _ = writeln!(s, "# addcow benchmark: compare ({})\n", m.date);
    let _ = writeln!(
        s,
        "Machine: {} CPUs, kernel {}. Disk: {} MiB, 50% of its 64 KiB chunks written in the overlays. \
         {} s per run, {} round(s), servers interleaved within each round; numbers are medians over the rounds.{}\n",
        m.cpus,
        m.kernel,
        m.size >> 20,
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
    let _ = writeln!(s, "How to read it: the first table says, per profile, whether addcow met the issue's target against \
        qemu-nbd serving the same data as a qcow2 overlay (throughput ratio ≥ target, and p99 latency no worse). \
        The per-profile tables give every server's median IOPS, bandwidth and completion-latency percentiles; \
        `fio-raw` is the disk itself (no server) and bounds what any server can reach.\n");
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
    let _ = writeln!(s, "\n![IOPS per profile per server](chart.svg)\n");
    let _ = writeln!(s, "## Per profile\n");
    for (pid, title) in &r.profiles {
        let _ = writeln!(s, "### {pid}: {title}\n");
        let _ = writeln!(
            s,
            "| server | runs | IOPS | MiB/s | p50 | p99 | p99.9 | addcow / this |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for (sid, _) in &r.servers {
            let Some(x) = r.get(pid, sid) else {
                let _ = writeln!(s, "| {sid} | 0 | – | – | – | – | – | – |");
                continue;
            };
            let ratio = r
                .comparisons
                .iter()
                .find(|c| &c.profile == pid && &c.peer == sid)
                .and_then(|c| c.ratio);
            let _ = writeln!(
                s,
                "| {sid} | {} | {:.0} | {:.1} | {} | {} | {} | {} |",
                x.runs,
                x.iops,
                x.bw_bytes / 1048576.0,
                fmt_ns(x.p50_ns),
                fmt_ns(x.p99_ns),
                fmt_ns(x.p999_ns),
                if sid == "addcow" {
                    "–".to_owned()
                } else {
                    fmt_ratio(ratio)
                }
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Server cost per request\n");
    let _ = writeln!(s, "CPU time of the server process per request (all threads; `/proc/PID/stat`), and with `--perf` \
        system calls and context switches per request (`perf stat -p`). Where a target is missed, this is where the time goes.\n");
    let _ = writeln!(
        s,
        "| profile | server | CPU µs/req | syscalls/req | context switches/req |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|");
    let opt = |x: Option<f64>, d: usize| x.map_or_else(|| "–".to_owned(), |v| format!("{v:.d$}"));
    for x in r.summary.iter().filter(|x| x.server != "fio-raw") {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            x.profile,
            x.server,
            opt(x.cpu_us_per_op, 1),
            opt(x.syscalls_per_op, 2),
            opt(x.cswitches_per_op, 2)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Servers\n");
    for (id, d) in &r.servers {
        let _ = writeln!(s, "- `{id}`: {d}");
    }
    for miss in &m.missing {
        let _ = writeln!(s, "- skipped: {miss}");
    }
    let failed: Vec<_> = r.runs.iter().filter(|x| x.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\n## Failed runs\n");
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
    let _ = writeln!(s, "- Latency is fio's completion latency (clat); for mixed profiles the worse of read and write.");
    s
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

/// Rewrites `report.md` and `chart.svg` in `dir` from its `results.json`.
pub fn render(dir: &Path) -> Result<()> {
    let jp = dir.join("results.json");
    let text = std::fs::read(&jp).map_err(io_err("read", &jp))?;
    let r: Results = serde_json::from_slice(&text)
        .map_err(|e| crate::error::BenchError::Usage(format!("{}: {e}", jp.display())))?;
    let mp = dir.join("report.md");
    std::fs::write(&mp, markdown(&r)).map_err(io_err("write", &mp))?;
    crate::chart::write_svg(&dir.join("chart.svg"), &r)
}

/// Writes `report.md`, `results.json` and `chart.svg` into `dir`.
pub fn write(dir: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
    let json =
        serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    let jp = dir.join("results.json");
    std::fs::write(&jp, json).map_err(io_err("write", &jp))?;
    let mp = dir.join("report.md");
    std::fs::write(&mp, markdown(r)).map_err(io_err("write", &mp))?;
    crate::chart::write_svg(&dir.join("chart.svg"), r)
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
            md.contains("| addcow | 2 | 200 | 0.8 | 0 µs | missing | 0 µs | – |"),
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
}
