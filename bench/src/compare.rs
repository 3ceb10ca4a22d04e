//! `compare`: every profile against every server, interleaved over rounds.
//!
//! Order: for each round, for each profile, for each server (A B C … A B C …), so drift over the
//! run hits every server alike. Each run starts its server, runs fio, and stops it again. Before a
//! run the served files are put back in their prepared state when an earlier run wrote to them
//! ([`crate::prepare::Prepared::restore_addcow`] / `restore_qcow2`), and the first-write profile
//! gets a freshly created overlay (add-cow / qcow2 / sparse raw file; nbdkit's cow layer starts
//! empty with every start).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{CompareArgs, RunLength};
use crate::cost::{self, Cost, PerfStat};
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, Target};
use crate::prepare::{self, Prepared};
use crate::profiles::{self, Effect, Profile};
use crate::report::{self, Meta, RunRecord};
use crate::servers::{self, Server};
use crate::sysinfo;

/// Settings of one compare run after defaults are applied.
#[derive(Debug, Clone)]
struct Settings {
    /// Disk sizes, each a section of the report, in the order given.
    sizes: Vec<u64>,
    runtime_s: u64,
    rounds: u32,
    perf: bool,
}

fn settings(args: &CompareArgs) -> Settings {
    let len = args.run.length(
        RunLength {
            size: 4 << 30,
            runtime_s: 20,
            rounds: 3,
        },
        RunLength {
            size: 64 << 20,
            runtime_s: 2,
            rounds: 1,
        },
    );
    let mut sizes = Vec::new();
    for &sz in &args.sizes {
        if !sizes.contains(&sz) {
            sizes.push(sz);
        }
    }
    if sizes.is_empty() {
        sizes.push(len.size);
    }
    Settings {
        sizes,
        runtime_s: len.runtime_s,
        rounds: len.rounds,
        perf: args.perf,
    }
}

/// One server as run: the server, its id in the report, and the extra `addcow serve`
/// arguments (`addcow-cores-N` runs addcow with `--cores N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contender {
    /// Which server.
    pub server: Server,
    /// Its id in the results (`addcow`, `addcow-cores-1`, `qemu-nbd-qcow2`, ...).
    pub id: String,
    /// Extra arguments of `addcow serve`.
    pub args: Vec<String>,
}

/// The contenders of a run: each server once, addcow once per `cores_scan` entry instead when
/// that is given; `extra` goes to every addcow.
pub fn contenders(servers: &[Server], cores_scan: &[u64], extra: &[String]) -> Vec<Contender> {
    let mut out = Vec::new();
    for &s in servers {
        if s == Server::Addcow && !cores_scan.is_empty() {
            for &n in cores_scan {
                let mut args = extra.to_vec();
                args.extend(["--cores".to_owned(), n.to_string()]);
                out.push(Contender {
                    server: s,
                    id: format!("addcow-cores-{n}"),
                    args,
                });
            }
        } else {
            out.push(Contender {
                server: s,
                id: s.id().to_owned(),
                args: if s == Server::Addcow {
                    extra.to_vec()
                } else {
                    Vec::new()
                },
            });
        }
    }
    out
}

/// Whether `perf stat` can count this machine's syscalls and context switches: `None` when it
/// can, else why not (for the report).
fn perf_problem() -> Option<String> {
    let out = std::process::Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches",
            "true",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output();
    match out {
        Err(e) => Some(format!(
            "--perf: perf cannot run ({e}); syscalls and context switches per request were not \
             measured (apt-get install linux-perf)"
        )),
        Ok(o) if !o.status.success() => {
            let why = String::from_utf8_lossy(&o.stderr);
            let why = why
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            Some(format!(
                "--perf: perf stat failed ({why}); syscalls and context switches per request \
                 were not measured (as root, or lower /proc/sys/kernel/perf_event_paranoid)"
            ))
        }
        Ok(_) => None,
    }
}

/// The `addcow` binary: `--addcow`, or `addcow` next to this runner, built with cargo (same
/// profile) when this runner was started by cargo.
pub fn addcow_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe().map_err(io_err("locate", Path::new("current exe")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let bin = dir.join("addcow");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "addcow-daemon", "--bin", "addcow"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        eprintln!("building addcow ({})", dir.display());
        prepare::run_cmd(&mut cmd)?;
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(BenchError::Missing(format!(
            "{} not found: build it with `cargo build --release -p addcow-daemon` or pass --addcow",
            bin.display()
        )))
    }
}

/// Runs the comparison and writes the report.
pub fn run(args: &CompareArgs) -> Result<()> {
    let mut st = settings(args);
    let profiles = profiles::select(&args.profiles).map_err(BenchError::Usage)?;
    let wanted: Vec<Server> = if args.servers.is_empty() {
        Server::ALL.to_vec()
    } else {
        args.servers
            .iter()
            .map(|id| {
                Server::from_id(id)
                    .ok_or_else(|| BenchError::Usage(format!("unknown server {id:?}")))
            })
            .collect::<Result<_>>()?
    };
    if !args.cores_scan.is_empty() && !wanted.contains(&Server::Addcow) {
        return Err(BenchError::Usage(
            "--cores-scan runs addcow: keep addcow in --servers".to_owned(),
        ));
    }
    let (servers, mut missing) = servers::check_tools(&wanted)?;
    for m in &missing {
        eprintln!("warning: {m}");
    }
    if st.perf {
        if let Some(why) = perf_problem() {
            eprintln!("warning: {why}");
            missing.push(why);
            st.perf = false;
        }
    }
    let runners = contenders(&servers, &args.cores_scan, &args.addcow_args);
    let addcow_bin = if servers.contains(&Server::Addcow) {
        addcow_binary(args.addcow.as_deref())?
    } else {
        PathBuf::from("addcow")
    };
    let needs_qcow2 = servers.contains(&Server::QemuNbdQcow2);
    if needs_qcow2 && !servers::on_path("qemu-img") {
        return Err(BenchError::Missing(
            "qemu-img (apt-get install qemu-utils)".to_owned(),
        ));
    }

    let (work, _tmp) = crate::prepare::work_dir(args.run.work.as_deref(), "addcow-bench-")?;
    let jobs_dir = profiles::configs_dir();
    let total_runs =
        st.sizes.len() as u64 * st.rounds as u64 * profiles.len() as u64 * runners.len() as u64;
    let bar = progress(total_runs * st.runtime_s);
    let started = sysinfo::utc_stamp();
    let mut sections = Vec::new();
    for &size in &st.sizes {
        bar.suspend(|| {
            eprintln!(
                "preparing {} MiB of data in {} (base, raw copy, add-cow{} overlays)",
                size >> 20,
                work.display(),
                if needs_qcow2 { " and qcow2" } else { "" }
            )
        });
        let data = work.join(format!("data-{}M", size >> 20));
        let prep = prepare::prepare(&data, size, 0xADDC0, needs_qcow2)?;
        let mut state = DirtyState::default();
        let mut records = Vec::new();
        for round in 1..=st.rounds {
            for p in &profiles {
                for c in &runners {
                    bar.set_message(format!(
                        "{} MiB · round {round}/{} · {} · {}",
                        size >> 20,
                        st.rounds,
                        p.id,
                        c.id
                    ));
                    if bar.is_hidden() {
                        eprintln!(
                            "{} MiB, round {round}/{}: {} on {}",
                            size >> 20,
                            st.rounds,
                            p.id,
                            c.id
                        );
                    }
                    let res = one_run(&prep, &mut state, p, c, &addcow_bin, &jobs_dir, &work, &st);
                    if let Err(e) = &res {
                        bar.suspend(|| {
                            eprintln!("{} on {} (round {round}) failed: {e}", p.id, c.id)
                        });
                    }
                    let (result, cost, error) = match res {
                        Ok((r, c)) => (Some(r), c, None),
                        Err(e) => (None, Cost::default(), Some(e.to_string())),
                    };
                    records.push(RunRecord {
                        round,
                        profile: p.id.to_owned(),
                        server: c.id.clone(),
                        result,
                        cost,
                        error,
                    });
                    bar.inc(st.runtime_s);
                }
            }
        }
        drop(prep);
        if st.sizes.last() != Some(&size) {
            // The next size needs the room (a 4 GiB section uses about 14 GiB).
            let _ = std::fs::remove_dir_all(&data);
        }
        let meta = Meta {
            date: started.clone(),
            cpus: sysinfo::cpus(),
            kernel: sysinfo::kernel(),
            size,
            runtime_s: st.runtime_s,
            rounds: st.rounds,
            quick: args.run.quick,
            fio_version: tool_version("fio", "--version"),
            qemu_nbd_version: tool_version("qemu-nbd", "--version"),
            nbdkit_version: tool_version("nbdkit", "--version"),
            missing: missing.clone(),
        };
        let ids: Vec<(String, String)> = runners
            .iter()
            .map(|c| (c.id.clone(), describe(c)))
            .collect();
        sections.push(report::build_named(meta, &profiles, &ids, records));
    }
    bar.finish_and_clear();

    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(&started)
    });
    let results = report::Report { sections };
    report::write_report(&out, &results)?;
    for r in &results.sections {
        println!("== {} MiB", r.meta.size >> 20);
        print!("{}", report::summary_text(r));
    }
    eprintln!("report: {}", out.join("report.md").display());
    let runs: Vec<_> = results.sections.iter().flat_map(|r| &r.runs).collect();
    let failed = runs.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(BenchError::Usage(format!(
            "{failed} of {} runs failed (listed in the report)",
            runs.len()
        )));
    }
    Ok(())
}

/// What a contender is, for the report: the server's description and its extra arguments.
fn describe(c: &Contender) -> String {
    if c.args.is_empty() {
        c.server.describe().to_owned()
    } else {
        format!("{} (with {})", c.server.describe(), c.args.join(" "))
    }
}

/// Which prepared overlays were written since they were last restored.
#[derive(Debug, Default)]
struct DirtyState {
    addcow: bool,
    qcow2: bool,
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    prep: &Prepared,
    dirty: &mut DirtyState,
    p: &Profile,
    c: &Contender,
    addcow_bin: &Path,
    jobs_dir: &Path,
    work: &Path,
    st: &Settings,
) -> Result<(fio::FioResult, Cost)> {
    let s = c.server;
    let fresh = p.effect == Effect::FreshOverlay;
    let image: PathBuf = match (s, fresh) {
        (Server::Addcow, true) => prep.fresh_addcow()?,
        (Server::QemuNbdQcow2, true) => prep.fresh_qcow2()?,
        (Server::QemuNbdRaw | Server::FioRaw, true) => prep.fresh_raw()?,
        (Server::Addcow, false) => {
            if dirty.addcow {
                prep.restore_addcow()?;
                dirty.addcow = false;
            }
            prep.addcow.clone()
        }
        (Server::QemuNbdQcow2, false) => {
            if dirty.qcow2 {
                prep.restore_qcow2()?;
                dirty.qcow2 = false;
            }
            prep.qcow2.clone().unwrap_or_default()
        }
        (Server::NbdkitCow, _) | (Server::QemuNbdRaw | Server::FioRaw, false) => {
            prep.disk_raw.clone()
        }
    };
    if p.effect == Effect::Writes {
        match s {
            Server::Addcow => dirty.addcow = true,
            Server::QemuNbdQcow2 => dirty.qcow2 = true,
            _ => {}
        }
    }
    prep.evict_cache();
    let job = jobs_dir.join(p.job);
    let mut cost = Cost::default();
    let result = if s == Server::FioRaw {
        fio::run(&job, &Target::File(&image), prep.size, st.runtime_s)
    } else {
        let sock = work.join("nbd.sock");
        let log = work.join(format!("{}.log", s.id()));
        let mut server = servers::start(s, addcow_bin, &c.args, &image, &sock, &log)?;
        let pid = server.pid();
        let perf = if st.perf {
            PerfStat::start(pid, &work.join("perf.csv"))
        } else {
            None
        };
        let cpu0 = cost::cpu_seconds(pid);
        let r = fio::run(&job, &Target::Nbd(&sock), prep.size, st.runtime_s);
        let cpu1 = cost::cpu_seconds(pid);
        if let Some(perf) = perf {
            (cost.syscalls, cost.context_switches) = perf.stop();
        }
        cost.cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
        server.stop();
        r
    };
    if fresh {
        prep.remove_fresh();
    }
    let r = result?;
    if r.errors != 0 {
        return Err(BenchError::FioOutput(format!(
            "fio reported error {}",
            r.errors
        )));
    }
    Ok((r, cost))
}

fn progress(total_s: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_s);
    let style = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {msg} · ~{eta} left")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

pub fn tool_version(tool: &str, flag: &str) -> Option<String> {
    let out = std::process::Command::new(tool).arg(flag).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::RunArgs;

    fn args(quick: bool) -> CompareArgs {
        CompareArgs {
            run: RunArgs {
                quick,
                ..RunArgs::default()
            },
            out: None,
            profiles: vec![],
            servers: vec![],
            addcow: None,
            perf: false,
            sizes: vec![],
            cores_scan: vec![],
            addcow_args: vec![],
        }
    }

    #[test]
    fn defaults_full_and_quick() {
        let s = settings(&args(false));
        assert_eq!(
            (s.sizes.clone(), s.runtime_s, s.rounds),
            (vec![4 << 30], 20, 3)
        );
        let q = settings(&args(true));
        assert_eq!(
            (q.sizes.clone(), q.runtime_s, q.rounds),
            (vec![64 << 20], 2, 1)
        );
        let mut two = args(false);
        two.sizes = vec![256 << 20, 4 << 30, 256 << 20];
        assert_eq!(settings(&two).sizes, vec![256 << 20, 4 << 30]);
        let mut one = args(false);
        one.run.size = Some(1 << 30);
        assert_eq!(settings(&one).sizes, vec![1 << 30]);
        let mut a = args(true);
        a.run.rounds = Some(3);
        a.run.runtime = Some(0);
        let s = settings(&a);
        assert_eq!((s.rounds, s.runtime_s), (3, 1));
    }

    #[test]
    fn a_cores_scan_replaces_addcow_by_one_run_per_core_count() {
        let extra = vec!["--base-cache".to_owned(), "buffered".to_owned()];
        let c = contenders(&[Server::Addcow, Server::QemuNbdQcow2], &[1, 2], &extra);
        let ids: Vec<_> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["addcow-cores-1", "addcow-cores-2", "qemu-nbd-qcow2"]);
        assert_eq!(c[0].args, ["--base-cache", "buffered", "--cores", "1"]);
        assert!(c[2].args.is_empty());
        let plain = contenders(&[Server::Addcow], &[], &extra);
        assert_eq!((plain[0].id.as_str(), &plain[0].args), ("addcow", &extra));
    }
}
