//! `vhost`: the vhost-user-blk benchmark pair, in one run.
//!
//! * addcow `serve --vhost-user-blk` vs qemu-storage-daemon's `--export type=vhost-user-blk`
//!   serving a qcow2 overlay of the same data (`cache.direct=on`, `aio=io_uring` on the overlay
//!   and on its base: both sides bypass the page cache), both driven by the same libblkio load
//!   generator ([`blkio_load`]);
//! * addcow vhost-user-blk vs addcow NBD: the same daemon command, NBD driven by fio's nbd
//!   engine with the same profile's job file (`fio-configs/`), as `compare` does.
//!
//! Profiles: 4 KiB random read QD32, 4 KiB random write QD32, 1 MiB sequential read QD8 (the
//! queue depths of `compare`'s job files), one queue. Order per round: for each profile, each
//! side (A B C A B C …); a side that wrote gets its overlay restored before the next run.
//! Reported: medians over rounds and the ratios per round and of the medians.

pub mod blkio_load;

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{RunLength, VhostArgs};
use crate::cost;
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, Target};
use crate::prepare::{self, Prepared};
use crate::profiles;
use crate::servers;
use crate::stats::{median, ratio};
use crate::sysinfo;
use blkio_load::{Load, Pattern};

/// One profile of the pair.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VProfile {
    /// Id (the `compare` profile whose fio job file the NBD side runs).
    pub id: &'static str,
    /// Title.
    pub title: &'static str,
    /// Judged by IOPS (else bandwidth).
    pub iops: bool,
    /// Target ratio of addcow vhost-user-blk over both peers (the issue's), if any.
    pub target: Option<f64>,
    #[serde(skip)]
    load: (Pattern, usize, usize),
    #[serde(skip)]
    job: &'static str,
}

/// The profiles, reads first (the write profile dirties the overlays).
pub const PROFILES: [VProfile; 3] = [
    VProfile {
        id: "randread",
        title: "4 KiB random read QD32",
        iops: true,
        target: Some(1.3),
        load: (Pattern::RandRead, 4096, 32),
        job: "randread-4k-qd32.fio",
    },
    VProfile {
        id: "seqread",
        title: "1 MiB sequential read QD8",
        iops: false,
        target: None,
        load: (Pattern::SeqRead, 1 << 20, 8),
        job: "seqread-1m-qd8.fio",
    },
    VProfile {
        id: "randwrite",
        title: "4 KiB random write QD32",
        iops: true,
        target: None,
        load: (Pattern::RandWrite, 4096, 32),
        job: "randwrite-4k-qd32.fio",
    },
];

/// Who serves and how it is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Side {
    /// `addcow serve --vhost-user-blk` + libblkio.
    AddcowVhost,
    /// `qemu-storage-daemon --export type=vhost-user-blk` (qcow2 overlay) + libblkio.
    QsdVhost,
    /// `addcow serve` over NBD + fio (nbd engine).
    AddcowNbd,
}

impl Side {
    const ALL: [Side; 3] = [Side::AddcowVhost, Side::QsdVhost, Side::AddcowNbd];

    fn id(self) -> &'static str {
        match self {
            Side::AddcowVhost => "addcow-vhost",
            Side::QsdVhost => "qsd-vhost-qcow2",
            Side::AddcowNbd => "addcow-nbd",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Side::AddcowVhost => {
                "addcow serve --cache direct --vhost-user-blk, add-cow overlay (50% written); libblkio client, 1 queue"
            }
            Side::QsdVhost => {
                "qemu-storage-daemon --export type=vhost-user-blk,num-queues=1, qcow2 overlay (50% written) and its raw base both cache.direct=on,aio=io_uring; libblkio client, 1 queue"
            }
            Side::AddcowNbd => {
                "addcow serve --cache direct over NBD (Unix socket); fio ioengine=nbd, same job file as compare"
            }
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Round (from 1).
    pub round: u32,
    /// Profile id.
    pub profile: &'static str,
    /// Side id.
    pub side: &'static str,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Completion latency p50 / p99 in µs (the worse direction for fio).
    pub lat_p50_us: f64,
    /// 99th percentile.
    pub lat_p99_us: f64,
    /// Server CPU seconds over the run.
    pub server_cpu_s: Option<f64>,
}

/// The whole run, as written to `vhost.json`.
#[derive(Debug, Clone, Serialize)]
pub struct VhostResults {
    /// UTC start.
    pub date: String,
    /// CPUs.
    pub cpus: usize,
    /// Kernel.
    pub kernel: String,
    /// Disk size.
    pub size: u64,
    /// Seconds per run.
    pub runtime_s: u64,
    /// Rounds.
    pub rounds: u32,
    /// Smoke run.
    pub quick: bool,
    /// `qemu-storage-daemon --version`.
    pub qsd_version: Option<String>,
    /// Every run.
    pub runs: Vec<Run>,
}

fn ready_vhost(sock: &Path) -> bool {
    sock.exists() && UnixStream::connect(sock).is_ok()
}

/// Waits for the NBD greeting (the daemon is serving) and then the vhost socket.
fn ready_addcow(nbd: &Path) -> bool {
    servers::greets(nbd) && ready_vhost(&nbd.with_file_name("vhost.sock"))
}

fn addcow_cmd(bin: &Path, overlay: &Path, nbd: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("serve")
        .arg("--socket")
        .arg(nbd)
        .arg("--vhost-user-blk")
        .arg(nbd.with_file_name("vhost.sock"))
        .args(["--cache", "direct"])
        .arg(overlay);
    c
}

fn qsd_cmd(prep: &Prepared, qcow2: &Path, sock: &Path) -> Command {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev").arg(format!(
        "driver=file,node-name=basefile,filename={},cache.direct=on,aio=io_uring,read-only=on",
        prep.base.display()
    ));
    c.args([
        "--blockdev",
        "driver=raw,node-name=base,file=basefile,read-only=on",
    ]);
    c.arg("--blockdev").arg(format!(
        "driver=file,node-name=file,filename={},cache.direct=on,aio=io_uring",
        qcow2.display()
    ));
    c.args([
        "--blockdev",
        "driver=qcow2,node-name=disk,file=file,backing=base",
    ]);
    c.arg("--export").arg(format!(
        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
        sock.display()
    ));
    c
}

/// Runs the pair and writes `vhost.md` and `vhost.json`.
pub fn run(args: &VhostArgs) -> Result<()> {
    let len = args.run.length(
        RunLength {
            size: 1 << 30,
            runtime_s: 10,
            rounds: 3,
        },
        RunLength {
            size: 64 << 20,
            runtime_s: 2,
            rounds: 1,
        },
    );
    for (tool, pkg) in [
        ("fio", "fio"),
        ("qemu-img", "qemu-utils"),
        ("qemu-storage-daemon", "qemu-utils"),
    ] {
        if !servers::on_path(tool) {
            return Err(BenchError::Missing(format!(
                "{tool} (Debian: apt-get install {pkg})"
            )));
        }
    }
    let addcow_bin = crate::compare::addcow_binary(args.addcow.as_deref())?;
    let (work, _tmp) = prepare::work_dir(args.run.work.as_deref(), "addcow-bench-vhost-")?;
    eprintln!(
        "preparing {} MiB of data in {} (base, add-cow and qcow2 overlays)",
        len.size >> 20,
        work.display()
    );
    let prep = prepare::prepare(&work.join("data"), len.size, 0xADDC0, true)?;
    let qcow2 = prep
        .qcow2
        .clone()
        .ok_or_else(|| BenchError::Usage("no qcow2 overlay prepared".to_owned()))?;
    let jobs = profiles::configs_dir();
    let date = sysinfo::utc_stamp();
    let mut runs = Vec::new();
    let (mut dirty_addcow, mut dirty_qcow2) = (false, false);
    for round in 1..=len.rounds {
        for p in &PROFILES {
            for side in Side::ALL {
                eprintln!("round {round}/{}: {} on {}", len.rounds, p.id, side.id());
                match side {
                    Side::AddcowVhost | Side::AddcowNbd if dirty_addcow => {
                        prep.restore_addcow()?;
                        dirty_addcow = false;
                    }
                    Side::QsdVhost if dirty_qcow2 => {
                        prep.restore_qcow2()?;
                        dirty_qcow2 = false;
                    }
                    _ => {}
                }
                let r = one(&prep, &qcow2, &addcow_bin, &jobs, &work, p, side, &len)?;
                if p.load.0 == Pattern::RandWrite {
                    match side {
                        Side::QsdVhost => dirty_qcow2 = true,
                        _ => dirty_addcow = true,
                    }
                }
                runs.push(Run { round, ..r });
            }
        }
    }
    let results = VhostResults {
        date: date.clone(),
        cpus: sysinfo::cpus(),
        kernel: sysinfo::kernel(),
        size: len.size,
        runtime_s: len.runtime_s,
        rounds: len.rounds,
        quick: args.run.quick,
        qsd_version: std::process::Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_owned())
            }),
        runs,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("{date}-vhost"))
    });
    std::fs::create_dir_all(&out).map_err(io_err("create", &out))?;
    let md = markdown(&results);
    let md_path = out.join("vhost.md");
    std::fs::write(&md_path, &md).map_err(io_err("write", &md_path))?;
    let json_path = out.join("vhost.json");
    let json = serde_json::to_string_pretty(&results)
        .map_err(|e| BenchError::Usage(format!("vhost.json: {e}")))?;
    std::fs::write(&json_path, json).map_err(io_err("write", &json_path))?;
    print!("{md}");
    eprintln!("report: {}", md_path.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one(
    prep: &Prepared,
    qcow2: &Path,
    addcow_bin: &Path,
    jobs: &Path,
    work: &Path,
    p: &VProfile,
    side: Side,
    len: &RunLength,
) -> Result<Run> {
    let nbd = work.join("nbd.sock");
    let vsock = work.join("vhost.sock");
    let _ = std::fs::remove_file(&nbd);
    let _ = std::fs::remove_file(&vsock);
    let log = work.join(format!("{}.log", side.id()));
    let mut server = match side {
        Side::AddcowVhost | Side::AddcowNbd => servers::spawn_until_ready(
            addcow_cmd(addcow_bin, &prep.addcow, &nbd),
            &nbd,
            &log,
            ready_addcow,
        )?,
        Side::QsdVhost => {
            servers::spawn_until_ready(qsd_cmd(prep, qcow2, &vsock), &vsock, &log, ready_vhost)?
        }
    };
    let pid = server.pid();
    let cpu0 = cost::cpu_seconds(pid);
    let (pattern, bs, depth) = p.load;
    let r = match side {
        Side::AddcowVhost | Side::QsdVhost => blkio_load::run(
            &vsock,
            Load {
                pattern,
                bs,
                depth,
                span: prep.size,
                runtime: Duration::from_secs(len.runtime_s),
            },
        )
        .map(|l| (l.iops, l.bw_bytes, l.lat_p50_us, l.lat_p99_us)),
        Side::AddcowNbd => fio::run(
            &jobs.join(p.job),
            &Target::Nbd(&nbd),
            prep.size,
            len.runtime_s,
        )
        .and_then(|f| {
            if f.errors != 0 {
                return Err(BenchError::FioOutput(format!(
                    "fio reported error {}",
                    f.errors
                )));
            }
            let l = f.latency();
            Ok((f.iops, f.bw_bytes, l.p50_ns / 1000.0, l.p99_ns / 1000.0))
        }),
    };
    let cpu1 = cost::cpu_seconds(pid);
    server.stop();
    let (iops, bw_bytes, lat_p50_us, lat_p99_us) = r.map_err(|e| BenchError::Command {
        command: format!("{} on {}", p.id, side.id()),
        message: format!("{e} (server log: {})", log.display()),
    })?;
    Ok(Run {
        round: 0,
        profile: p.id,
        side: side.id(),
        iops,
        bw_bytes,
        lat_p50_us,
        lat_p99_us,
        server_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
    })
}

fn metric(p: &VProfile, r: &Run) -> f64 {
    if p.iops {
        r.iops
    } else {
        r.bw_bytes / (1 << 20) as f64
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|v| format!("{v:.2}x"))
        .unwrap_or_else(|| "–".to_owned())
}

/// The report: setup, per profile the medians of each side and the two ratios (of the medians,
/// and per round).
pub fn markdown(r: &VhostResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vhost-user-blk benchmark pair ({})\n", r.date);
    let _ = writeln!(
        s,
        "{} CPUs, kernel {}, disk {} MiB (50% of 64 KiB chunks written in the overlay), {} s per run, {} round(s){}; {}.\n",
        r.cpus,
        r.kernel,
        r.size >> 20,
        r.runtime_s,
        r.rounds,
        if r.quick { " (--quick smoke run: not a measurement)" } else { "" },
        r.qsd_version.as_deref().unwrap_or("qemu-storage-daemon version unknown")
    );
    for side in Side::ALL {
        let _ = writeln!(s, "* `{}`: {}", side.id(), side.describe());
    }
    s.push_str(
        "\nThe vhost sides use the same libblkio load generator (`bench/src/blkio_load.rs`); the NBD \
         side uses fio, so vhost vs NBD also compares two clients. qemu-storage-daemon runs with \
         O_DIRECT like addcow; on its default page cache it serves reads of a warm cache from \
         memory and the picture changes (see docs/VHOST_USER_BLK.md).\n\n",
    );
    let _ = writeln!(
        s,
        "| profile | metric | addcow-vhost | qsd-vhost-qcow2 | addcow-nbd | vhost / qsd | vhost / nbd | per round (vhost/qsd; vhost/nbd) | p50 / p99 µs (vhost, qsd, nbd) | server CPU s (vhost, qsd, nbd) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for p in &PROFILES {
        let of = |side: Side| -> Vec<&Run> {
            r.runs
                .iter()
                .filter(|x| x.profile == p.id && x.side == side.id())
                .collect()
        };
        let med = |side: Side, f: &dyn Fn(&Run) -> f64| {
            median(&of(side).iter().map(|x| f(x)).collect::<Vec<_>>())
        };
        let m = |side: Side| med(side, &|x| metric(p, x));
        let (v, q, n) = (m(Side::AddcowVhost), m(Side::QsdVhost), m(Side::AddcowNbd));
        let rq = v.zip(q).and_then(|(a, b)| ratio(a, b));
        let rn = v.zip(n).and_then(|(a, b)| ratio(a, b));
        let per_round: Vec<String> = (1..=r.rounds)
            .map(|round| {
                let get = |side: Side| {
                    r.runs
                        .iter()
                        .find(|x| x.round == round && x.profile == p.id && x.side == side.id())
                        .map(|x| metric(p, x))
                };
                let a = get(Side::AddcowVhost);
                format!(
                    "{}; {}",
                    fmt_ratio(a.zip(get(Side::QsdVhost)).and_then(|(a, b)| ratio(a, b))),
                    fmt_ratio(a.zip(get(Side::AddcowNbd)).and_then(|(a, b)| ratio(a, b)))
                )
            })
            .collect();
        let num = |x: Option<f64>| x.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into());
        let lat = |side: Side| {
            format!(
                "{}/{}",
                num(med(side, &|x| x.lat_p50_us)),
                num(med(side, &|x| x.lat_p99_us))
            )
        };
        let cpu = |side: Side| {
            med(side, &|x| x.server_cpu_s.unwrap_or(f64::NAN))
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "–".into())
        };
        let target = p
            .target
            .map(|t| format!(" (target ≥ {t}x)"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {}, {}, {} | {}, {}, {} |",
            p.title,
            target,
            if p.iops { "IOPS" } else { "MiB/s" },
            num(v),
            num(q),
            num(n),
            fmt_ratio(rq),
            fmt_ratio(rn),
            per_round.join(" · "),
            lat(Side::AddcowVhost),
            lat(Side::QsdVhost),
            lat(Side::AddcowNbd),
            cpu(Side::AddcowVhost),
            cpu(Side::QsdVhost),
            cpu(Side::AddcowNbd),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(round: u32, profile: &'static str, side: Side, iops: f64) -> Run {
        Run {
            round,
            profile,
            side: side.id(),
            iops,
            bw_bytes: iops * 4096.0,
            lat_p50_us: 100.0,
            lat_p99_us: 300.0,
            server_cpu_s: Some(1.0),
        }
    }

    #[test]
    fn the_report_gives_ratios_of_medians_and_per_round() {
        let mut runs = Vec::new();
        for (round, v, q, n) in [(1, 300.0, 200.0, 100.0), (2, 330.0, 100.0, 300.0)] {
            runs.push(run_of(round, "randread", Side::AddcowVhost, v));
            runs.push(run_of(round, "randread", Side::QsdVhost, q));
            runs.push(run_of(round, "randread", Side::AddcowNbd, n));
        }
        let r = VhostResults {
            date: "d".into(),
            cpus: 2,
            kernel: "k".into(),
            size: 1 << 20,
            runtime_s: 1,
            rounds: 2,
            quick: false,
            qsd_version: None,
            runs,
        };
        let md = markdown(&r);
        // Medians 315 / 150 / 200: 2.10x and 1.57x; per round 1.50x; 3.00x · 3.30x; 1.10x.
        assert!(md.contains("| 315 | 150 | 200 | 2.10x | 1.57x |"), "{md}");
        assert!(md.contains("1.50x; 3.00x · 3.30x; 1.10x"), "{md}");
        // Profiles without runs show dashes, not zeros.
        assert!(
            md.contains("| 1 MiB sequential read QD8 | MiB/s | – | – | – | – | – |"),
            "{md}"
        );
    }
}
