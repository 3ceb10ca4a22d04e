//! `tls`: what NBD over TLS costs. The same overlay served by addcow over TCP in the clear, by
//! addcow over TCP with TLS (x509, `--tls require`, client certificates verified), and by
//! qemu-nbd with `tls-creds-x509` on a qcow2 overlay of the same bytes (the `qemu-nbd-qcow2`
//! peer of `compare`), under fio's nbd engine (libnbd) with two profiles of `fio-configs/`:
//! 4 KiB random read QD32 and 1 MiB sequential read. Servers alternate within each round;
//! the report is the median of the rounds and the ratios.
//!
//! Credentials: a throwaway CA made with the testkit (`openssl`). fio (libnbd) cannot be told
//! a certificate folder in a URI (libnbd refuses `tls-certificates=` unless the program allows
//! local files, and fio does not), so the client credentials go in libnbd's default folder
//! `$HOME/.pki/libnbd` of a temporary `HOME`. libnbd reads that folder only for a non-root
//! user (root always gets `/etc/pki/libnbd`), so when this runs as root fio runs as `nobody`
//! (`setpriv`), which the client folder and job files are readable by.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cli::{RunLength, TlsArgs};
use crate::compare::addcow_binary;
use crate::error::{io_err, BenchError, Result};
use crate::fio::{self, FioResult};
use crate::prepare;
use crate::profiles::{self, Metric, Profile};
use crate::servers::{self, Running};
use crate::stats;

/// The servers of a run, in the order they run within a round.
const SERVERS: [&str; 3] = ["addcow-tcp", "addcow-tls", "qemu-nbd-qcow2-tls"];

/// Runs the benchmark and prints the table and the ratios.
pub fn run(args: &TlsArgs) -> Result<()> {
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
    for tool in ["fio", "qemu-nbd", "qemu-img", "openssl", "setpriv"] {
        if !servers::on_path(tool) {
            return Err(BenchError::Missing(tool.to_owned()));
        }
    }
    let addcow = addcow_binary(args.addcow.as_deref())?;
    let (dir, _guard) = prepare::work_dir(args.run.work.as_deref(), "addcow-bench-tls-")?;
    eprintln!(
        "preparing {} MiB of data in {}",
        len.size >> 20,
        dir.display()
    );
    let prepared = prepare::prepare(&dir, len.size, 23, true)?;
    let qcow2 = prepared
        .qcow2
        .clone()
        .ok_or_else(|| BenchError::Usage("no qcow2 overlay was prepared".to_owned()))?;
    let creds = addcow_daemon_testkit::tls::x509(&dir.join("pki"), "addcow-bench-ca", "bench");
    let client = ClientSide::new(&creds)?;
    let selected = profiles::select(&["randread".to_owned(), "seqread".to_owned()])
        .map_err(BenchError::Usage)?;
    let jobs: Vec<(Profile, PathBuf)> = selected
        .into_iter()
        .map(|p| {
            let job = client.job(&p)?;
            Ok((p, job))
        })
        .collect::<Result<_>>()?;

    // results[profile][server]: one value per round (IOPS or bytes/s).
    let mut results = vec![vec![Vec::new(); SERVERS.len()]; jobs.len()];
    for round in 0..len.rounds {
        for (s, server) in SERVERS.iter().enumerate() {
            let port = free_port()?;
            let mut running = start(server, &addcow, &prepared, &qcow2, &creds, port, &dir)?;
            let uri = if *server == "addcow-tcp" {
                format!("nbd://127.0.0.1:{port}/")
            } else {
                format!("nbds://127.0.0.1:{port}/")
            };
            for (p, (profile, job)) in jobs.iter().enumerate() {
                prepared.evict_cache();
                let r = client.fio(job, &uri, len)?;
                if r.errors != 0 {
                    return Err(BenchError::Command {
                        command: format!("fio {} against {server}", profile.id),
                        message: format!("{} I/O errors", r.errors),
                    });
                }
                let v = value(profile, &r);
                eprintln!(
                    "round {}/{}: {} {server}: {}",
                    round + 1,
                    len.rounds,
                    profile.id,
                    shown(profile, v)
                );
                results[p][s].push(v);
            }
            running.stop();
        }
    }
    print!("{}", report(&jobs, &results, len));
    Ok(())
}

/// The profile's number of a run: IOPS or bytes per second.
fn value(p: &Profile, r: &FioResult) -> f64 {
    match p.metric {
        Metric::Bandwidth => r.bw_bytes,
        _ => r.iops,
    }
}

fn shown(p: &Profile, v: f64) -> String {
    match p.metric {
        Metric::Bandwidth => format!("{:.0} MiB/s", v / f64::from(1u32 << 20)),
        _ => format!("{v:.0} IOPS"),
    }
}

/// The markdown table (medians) and the ratios.
fn report(jobs: &[(Profile, PathBuf)], results: &[Vec<Vec<f64>>], len: RunLength) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "TLS cost: {} MiB, {} s per run, median of {} round(s)\n",
        len.size >> 20,
        len.runtime_s,
        len.rounds
    );
    let _ = writeln!(
        out,
        "| profile | addcow TCP | addcow TLS | qemu-nbd TLS | addcow TLS / TCP | addcow TLS / qemu-nbd TLS |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for ((profile, _), per_server) in jobs.iter().zip(results) {
        let m: Vec<Option<f64>> = per_server.iter().map(|v| stats::median(v)).collect();
        let cell = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| shown(profile, v));
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => {
                stats::ratio(a, b).map_or("n/a".to_owned(), |r| format!("{r:.2}"))
            }
            _ => "n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            profile.title,
            cell(m[0]),
            cell(m[1]),
            cell(m[2]),
            r(m[1], m[0]),
            r(m[1], m[2])
        );
    }
    out
}

/// A free TCP port on loopback (bound, then released).
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_err("bind", Path::new("127.0.0.1:0")))
}

/// Whether `addr` (a `HOST:PORT` given as a path, as [`servers::spawn_until_ready`] hands it)
/// accepts a TCP connection.
fn tcp_ready(addr: &Path) -> bool {
    addr.to_str()
        .is_some_and(|a| std::net::TcpStream::connect(a).is_ok())
}

/// Starts `server` on `127.0.0.1:port`.
fn start(
    server: &str,
    addcow: &Path,
    prepared: &prepare::Prepared,
    qcow2: &Path,
    creds: &addcow_daemon_testkit::tls::X509Creds,
    port: u16,
    dir: &Path,
) -> Result<Running> {
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join(format!("{server}.log"));
    let mut cmd;
    if server == "qemu-nbd-qcow2-tls" {
        cmd = Command::new("qemu-nbd");
        cmd.arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                creds.server_dir.display()
            ))
            .args(["--tls-creds", "tls0", "-f", "qcow2", "--cache=none"])
            .args(["--aio=io_uring", "-t", "-e", "0", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(qcow2);
    } else {
        let socket = dir.join(format!("{server}.sock"));
        let _ = std::fs::remove_file(&socket);
        cmd = Command::new(addcow);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(["--tcp", &addr, "--cache", "direct"]);
        if server == "addcow-tls" {
            cmd.arg("--tls-creds").arg(&creds.server_dir).args([
                "--tls",
                "require",
                "--tls-verify-peer",
            ]);
        }
        cmd.arg(&prepared.addcow);
    }
    servers::spawn_until_ready(cmd, Path::new(&addr), &log, tcp_ready)
}

/// fio's side: a temporary `HOME` with the client credentials in `.pki/libnbd`, and the job
/// files, all readable by `nobody`.
struct ClientSide {
    home: tempfile::TempDir,
    /// Run fio as `nobody` (this runs as root: libnbd would ignore `$HOME`).
    as_nobody: bool,
}

impl ClientSide {
    fn new(creds: &addcow_daemon_testkit::tls::X509Creds) -> Result<ClientSide> {
        let home = tempfile::Builder::new()
            .prefix("addcow-bench-tls-home-")
            .tempdir()
            .map_err(io_err("create temp folder", Path::new("$TMPDIR")))?;
        let pki = home.path().join(".pki/libnbd");
        std::fs::create_dir_all(&pki).map_err(io_err("create", &pki))?;
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            let to = pki.join(f);
            std::fs::copy(creds.client_dir.join(f), &to).map_err(io_err("copy", &to))?;
        }
        let as_nobody = nix::unistd::geteuid().is_root();
        if as_nobody {
            for d in [home.path(), &home.path().join(".pki"), &pki] {
                set_mode(d, 0o755)?;
            }
            for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
                set_mode(&pki.join(f), 0o644)?;
            }
        }
        Ok(ClientSide { home, as_nobody })
    }

    /// `profile`'s job file with its `[nbd]` section pointed at `${URI}` instead of a Unix
    /// socket, written next to the credentials.
    fn job(&self, profile: &Profile) -> Result<PathBuf> {
        let from = profiles::configs_dir().join(profile.job);
        let text = std::fs::read_to_string(&from).map_err(io_err("read", &from))?;
        let plain = "uri=nbd+unix:///?socket=${SOCK}";
        if !text.contains(plain) {
            return Err(BenchError::Usage(format!(
                "{}: no `{plain}` line to point at TCP",
                from.display()
            )));
        }
        let to = self.home.path().join(profile.job);
        std::fs::write(&to, text.replace(plain, "uri=${URI}")).map_err(io_err("write", &to))?;
        set_mode(&to, 0o644)?;
        Ok(to)
    }

    /// Runs `job` against `uri`.
    fn fio(&self, job: &Path, uri: &str, len: RunLength) -> Result<FioResult> {
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"]);
            c
        } else {
            Command::new("fio")
        };
        cmd.current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("URI", uri)
            .env("SIZE", len.size.to_string())
            .env("RUNTIME", len.runtime_s.to_string())
            .args(["--output-format=json", "--section=nbd"])
            .arg(job);
        let shown = format!("fio {} on {uri}", job.display());
        let out = cmd.output().map_err(|e| BenchError::Command {
            command: shown.clone(),
            message: format!("cannot start: {e}"),
        })?;
        if !out.status.success() {
            return Err(BenchError::Command {
                command: shown,
                message: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        fio::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))
}
