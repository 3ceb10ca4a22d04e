//! `remote`: overlays whose base lives on an image server, read through NBD.
//!
//! The image server is `nbdkit file` on a random base file, behind `--filter=delay rdelay=D`
//! for each delay `D` of the run (`0` = no filter): the network latency of a central image
//! server, in the millisecond steps nbdkit's delay filter takes. Every overlay is freshly
//! created and empty, so every read goes to the base: this measures the remote path itself, not
//! a mix with local data. Per round, profile and delay, in this order:
//!
//! * `addcow-local`: `addcow serve --cache direct` on an add-cow overlay whose base is the base
//!   *file* (the reference: the same bytes with no image server; run once per round and profile,
//!   it does not depend on the delay);
//! * `addcow-remote`: the same, with the overlay's base the image server's NBD URI;
//! * `qemu-nbd-qcow2-remote`: `qemu-nbd -f qcow2 --cache=none --aio=io_uring` on a qcow2 overlay
//!   whose backing file is the same URI (`-F raw -b nbd+unix://...`).
//!
//! The report gives medians over the rounds and two ratios per delay: addcow-remote against
//! qemu-nbd-qcow2-remote (the peer), and addcow-remote against addcow-local (what the image
//! server costs).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::cli::{RemoteArgs, RunLength};
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, FioResult, Target};
use crate::prepare::{self, run_cmd};
use crate::profiles::{self, Effect, Profile};
use crate::servers::{self, Running};
use crate::stats::{median, ratio};
use crate::sysinfo;

/// One way of serving an overlay in this benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Setup {
    AddcowLocal,
    AddcowRemote,
    QemuNbdQcow2Remote,
}

impl Setup {
    fn id(self) -> &'static str {
        match self {
            Setup::AddcowLocal => "addcow-local",
            Setup::AddcowRemote => "addcow-remote",
            Setup::QemuNbdQcow2Remote => "qemu-nbd-qcow2-remote",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
struct Record {
    round: u32,
    profile: String,
    /// The image server's read delay (`0`, `1ms`, ...); `-` for `addcow-local`.
    delay: String,
    setup: &'static str,
    result: Option<FioResult>,
    error: Option<String>,
}

/// Everything the report is made from.
#[derive(Debug, Serialize)]
struct Results {
    date: String,
    cpus: usize,
    kernel: String,
    size: u64,
    runtime_s: u64,
    rounds: u32,
    quick: bool,
    delays: Vec<String>,
    nbdkit_version: Option<String>,
    qemu_nbd_version: Option<String>,
    runs: Vec<Record>,
}

/// The image server's NBD URI for its socket.
fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Checks a delay as nbdkit's delay filter reads it (seconds, or `NNms`).
fn check_delay(d: &str) -> Result<()> {
    let digits = d.strip_suffix("ms").unwrap_or(d);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(BenchError::Usage(format!(
            "delay {d:?}: give whole seconds or NNms (nbdkit's delay filter takes no finer step)"
        )))
    }
}

fn is_zero_delay(d: &str) -> bool {
    d.strip_suffix("ms").unwrap_or(d).bytes().all(|b| b == b'0')
}

/// Starts the image server: `nbdkit file` on `base`, behind the delay filter unless `delay` is 0.
fn start_image_server(base: &Path, sock: &Path, delay: &str, log: &Path) -> Result<Running> {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new("nbdkit");
    c.args(["-f", "-U"]).arg(sock);
    if !is_zero_delay(delay) {
        c.arg("--filter=delay");
    }
    c.arg("file").arg(format!("file={}", base.display()));
    if !is_zero_delay(delay) {
        c.arg(format!("rdelay={delay}"));
    }
    servers::spawn(c, sock, log)
}

/// Creates the fresh (empty) overlay of `setup` in `dir` on `base` (a file) or `base_uri`.
fn fresh_overlay(
    setup: Setup,
    addcow: &Path,
    dir: &Path,
    base: &Path,
    base_uri: &str,
    size: u64,
) -> Result<PathBuf> {
    for n in ["fresh.add-cow", "fresh.img", "fresh.qcow2"] {
        let _ = std::fs::remove_file(dir.join(n));
    }
    let size_s = size.to_string();
    match setup {
        Setup::AddcowLocal | Setup::AddcowRemote => {
            let meta = dir.join("fresh.add-cow");
            let mut c = Command::new(addcow);
            c.arg("create").arg("-b");
            if setup == Setup::AddcowLocal {
                c.arg(base);
            } else {
                c.arg(base_uri);
            }
            c.arg("-i")
                .arg(dir.join("fresh.img"))
                .args(["--size", &size_s])
                .arg(&meta);
            run_cmd(&mut c)?;
            Ok(meta)
        }
        Setup::QemuNbdQcow2Remote => {
            let q = dir.join("fresh.qcow2");
            run_cmd(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
                    .arg(base_uri)
                    .arg(&q)
                    .arg(&size_s),
            )?;
            Ok(q)
        }
    }
}

/// Serves `image` with `setup`'s server on `sock`.
fn start_server(
    setup: Setup,
    addcow: &Path,
    image: &Path,
    sock: &Path,
    log: &Path,
) -> Result<Running> {
    let server = match setup {
        Setup::AddcowLocal | Setup::AddcowRemote => servers::Server::Addcow,
        Setup::QemuNbdQcow2Remote => servers::Server::QemuNbdQcow2,
    };
    servers::start(server, addcow, &[], image, sock, log)
}

/// Runs the benchmark and writes its report.
pub fn run(args: &RemoteArgs) -> Result<()> {
    let len = args.run.length(
        RunLength {
            size: 2 << 30,
            runtime_s: 10,
            rounds: 3,
        },
        RunLength {
            size: 64 << 20,
            runtime_s: 2,
            rounds: 1,
        },
    );
    for tool in ["fio", "nbdkit", "qemu-nbd", "qemu-img"] {
        if !servers::on_path(tool) {
            return Err(BenchError::Missing(format!(
                "{tool} is not installed (scripts/test.sh installs fio, nbdkit and qemu-utils)"
            )));
        }
    }
    let delays: Vec<String> = if args.delays.is_empty() {
        vec!["0".to_owned(), "1ms".to_owned()]
    } else {
        args.delays.clone()
    };
    for d in &delays {
        check_delay(d)?;
    }
    let wanted = if args.profiles.is_empty() {
        vec!["randread".to_owned(), "seqread".to_owned()]
    } else {
        args.profiles.clone()
    };
    let profiles: Vec<Profile> = profiles::select(&wanted).map_err(BenchError::Usage)?;
    if let Some(p) = profiles.iter().find(|p| p.effect != Effect::ReadOnly) {
        return Err(BenchError::Usage(format!(
            "profile {} writes: the remote benchmark runs read profiles only",
            p.id
        )));
    }
    let addcow = crate::compare::addcow_binary(args.addcow.as_deref())?;
    let (work, _tmp) = prepare::work_dir(args.run.work.as_deref(), "addcow-bench-remote-")?;
    std::fs::create_dir_all(&work).map_err(io_err("create folder", &work))?;
    let base = work.join("base.raw");
    eprintln!(
        "writing a {} MiB random base in {}",
        len.size >> 20,
        work.display()
    );
    prepare::write_random(&base, len.size, &mut SmallRng::seed_from_u64(0xBA5E))?;
    let img_sock = work.join("image-server.sock");
    let sock = work.join("nbd.sock");
    let base_uri = uri(&img_sock);
    let jobs = profiles::configs_dir();
    let started = sysinfo::utc_stamp();

    let mut runs = Vec::new();
    for round in 1..=len.rounds {
        for p in &profiles {
            let one = |setup: Setup, delay: &str| {
                eprintln!(
                    "round {round}/{}: {} on {} (delay {delay})",
                    len.rounds,
                    p.id,
                    setup.id()
                );
                let log = work.join(format!("{}.log", setup.id()));
                let res = fresh_overlay(setup, &addcow, &work, &base, &base_uri, len.size)
                    .and_then(|image| start_server(setup, &addcow, &image, &sock, &log))
                    .and_then(|mut server| {
                        let r = fio::run(
                            &jobs.join(p.job),
                            &Target::Nbd(&sock),
                            len.size,
                            len.runtime_s,
                        );
                        server.stop();
                        r
                    })
                    .and_then(|r| {
                        if r.errors == 0 {
                            Ok(r)
                        } else {
                            Err(BenchError::FioOutput(format!(
                                "fio reported error {}",
                                r.errors
                            )))
                        }
                    });
                if let Err(e) = &res {
                    eprintln!("{} on {} (delay {delay}) failed: {e}", p.id, setup.id());
                }
                let (result, error) = match res {
                    Ok(r) => (Some(r), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                Record {
                    round,
                    profile: p.id.to_owned(),
                    delay: delay.to_owned(),
                    setup: setup.id(),
                    result,
                    error,
                }
            };
            runs.push(one(Setup::AddcowLocal, "-"));
            for d in &delays {
                let log = work.join("image-server.log");
                let mut image_server = start_image_server(&base, &img_sock, d, &log)?;
                runs.push(one(Setup::AddcowRemote, d));
                runs.push(one(Setup::QemuNbdQcow2Remote, d));
                image_server.stop();
            }
        }
    }

    let results = Results {
        date: started.clone(),
        cpus: sysinfo::cpus(),
        kernel: sysinfo::kernel(),
        size: len.size,
        runtime_s: len.runtime_s,
        rounds: len.rounds,
        quick: args.run.quick,
        delays,
        nbdkit_version: crate::compare::tool_version("nbdkit", "--version"),
        qemu_nbd_version: crate::compare::tool_version("qemu-nbd", "--version"),
        runs,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("remote-{started}"))
    });
    std::fs::create_dir_all(&out).map_err(io_err("create folder", &out))?;
    let json = serde_json::to_string_pretty(&results)
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    let jp = out.join("results.json");
    std::fs::write(&jp, json).map_err(io_err("write", &jp))?;
    let text = markdown(&results, &profiles);
    let mp = out.join("report.md");
    std::fs::write(&mp, &text).map_err(io_err("write", &mp))?;
    print!("{text}");
    eprintln!("report: {}", mp.display());
    let failed = results.runs.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(BenchError::Usage(format!(
            "{failed} of {} runs failed (listed in the report)",
            results.runs.len()
        )));
    }
    Ok(())
}

/// Median IOPS, bandwidth and p99 of one (profile, delay, setup) over the rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cell {
    iops: Option<f64>,
    mib_s: Option<f64>,
    p99_us: Option<f64>,
}

fn cell(r: &Results, profile: &str, delay: &str, setup: Setup) -> Cell {
    let ok: Vec<&FioResult> = r
        .runs
        .iter()
        .filter(|x| x.profile == profile && x.delay == delay && x.setup == setup.id())
        .filter_map(|x| x.result.as_ref())
        .collect();
    let col = |f: &dyn Fn(&FioResult) -> f64| median(&ok.iter().map(|x| f(x)).collect::<Vec<_>>());
    Cell {
        iops: col(&|x| x.iops),
        mib_s: col(&|x| x.bw_bytes / f64::from(1u32 << 20)),
        p99_us: col(&|x| x.latency().p99_ns / 1000.0),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.digits$}"))
}

fn ratio_text(a: Option<f64>, b: Option<f64>) -> String {
    a.zip(b)
        .and_then(|(a, b)| ratio(a, b))
        .map_or_else(|| "–".to_owned(), |x| format!("{x:.2}x"))
}

/// The Markdown report.
fn markdown(r: &Results, profiles: &[Profile]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# addcow benchmark: remote base ({})\n", r.date);
    let _ = writeln!(
        s,
        "Machine: {} CPUs, kernel {}. Base: {} MiB of random bytes served by `nbdkit file` over a Unix \
         socket (the image server), behind `--filter=delay rdelay=D` for D ≠ 0. Every overlay is fresh \
         and empty, so every read goes to the base. {} s per run, {} round(s), medians over the rounds.{}\n",
        r.cpus,
        r.kernel,
        r.size >> 20,
        r.runtime_s,
        r.rounds,
        if r.quick { " **Quick smoke run: not a measurement.**" } else { "" }
    );
    let _ = writeln!(
        s,
        "Tools: {}; {}. Client: fio's nbd engine (`fio-configs/`). `addcow-local`: the same empty overlay \
         on the base *file* (no image server). `qemu-nbd-qcow2-remote`: `qemu-nbd -f qcow2 --cache=none \
         --aio=io_uring` on a qcow2 overlay whose backing file is the same NBD URI.\n",
        r.nbdkit_version.as_deref().unwrap_or("nbdkit ?"),
        r.qemu_nbd_version.as_deref().unwrap_or("qemu-nbd ?"),
    );
    for p in profiles {
        let by_iops = p.metric == profiles::Metric::Iops;
        let _ = writeln!(s, "## {} (`{}`)\n", p.title, p.id);
        let _ = writeln!(
            s,
            "| delay | setup | IOPS | MiB/s | p99 µs | vs qemu-nbd-qcow2-remote | vs addcow-local |"
        );
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
        let local = cell(r, p.id, "-", Setup::AddcowLocal);
        let metric = |c: Cell| if by_iops { c.iops } else { c.mib_s };
        let _ = writeln!(
            s,
            "| – | addcow-local | {} | {} | {} | | |",
            num(local.iops, 0),
            num(local.mib_s, 1),
            num(local.p99_us, 0)
        );
        for d in &r.delays {
            let ours = cell(r, p.id, d, Setup::AddcowRemote);
            let peer = cell(r, p.id, d, Setup::QemuNbdQcow2Remote);
            let _ = writeln!(
                s,
                "| {d} | addcow-remote | {} | {} | {} | **{}** | {} |",
                num(ours.iops, 0),
                num(ours.mib_s, 1),
                num(ours.p99_us, 0),
                ratio_text(metric(ours), metric(peer)),
                ratio_text(metric(ours), metric(local)),
            );
            let _ = writeln!(
                s,
                "| {d} | qemu-nbd-qcow2-remote | {} | {} | {} | | {} |",
                num(peer.iops, 0),
                num(peer.mib_s, 1),
                num(peer.p99_us, 0),
                ratio_text(metric(peer), metric(local)),
            );
        }
        let _ = writeln!(s);
    }
    let failed: Vec<&Record> = r.runs.iter().filter(|x| x.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed runs\n");
        for f in failed {
            let _ = writeln!(
                s,
                "- round {}, {} on {} (delay {}): {}",
                f.round,
                f.profile,
                f.setup,
                f.delay,
                f.error.as_deref().unwrap_or("")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_checked_like_nbdkit_reads_them() {
        for ok in ["0", "1ms", "2", "250ms"] {
            assert!(check_delay(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ms", "0.5ms", "500us", "1s", "-1"] {
            assert!(check_delay(bad).is_err(), "{bad}");
        }
        assert!(is_zero_delay("0") && is_zero_delay("0ms"));
        assert!(!is_zero_delay("1ms"));
    }

    #[test]
    fn the_report_gives_both_ratios_per_delay() {
        let res = |iops: f64| FioResult {
            iops,
            bw_bytes: iops * 4096.0,
            read_lat: Some(fio::Latency {
                p50_ns: 1000.0,
                p99_ns: 2000.0,
                p999_ns: 3000.0,
            }),
            write_lat: None,
            errors: 0,
            total_ios: 1,
        };
        let rec = |delay: &str, setup: Setup, iops: f64| Record {
            round: 1,
            profile: "randread".into(),
            delay: delay.into(),
            setup: setup.id(),
            result: Some(res(iops)),
            error: None,
        };
        let r = Results {
            date: "d".into(),
            cpus: 2,
            kernel: "k".into(),
            size: 64 << 20,
            runtime_s: 2,
            rounds: 1,
            quick: false,
            delays: vec!["1ms".into()],
            nbdkit_version: None,
            qemu_nbd_version: None,
            runs: vec![
                rec("-", Setup::AddcowLocal, 1000.0),
                rec("1ms", Setup::AddcowRemote, 500.0),
                rec("1ms", Setup::QemuNbdQcow2Remote, 250.0),
            ],
        };
        let profiles = profiles::select(&["randread".to_owned()]).unwrap();
        let md = markdown(&r, &profiles);
        assert!(md.contains("| 1ms | addcow-remote | 500 |"), "{md}");
        assert!(md.contains("**2.00x** | 0.50x |"), "{md}");
        assert!(md.contains("| 1ms | qemu-nbd-qcow2-remote | 250 |"), "{md}");
        assert!(md.contains("| 0.25x |"), "{md}");
    }
}
