//! Restarts and upgrades are invisible to guests: `addcow serve` is stopped (SIGTERM, then the
//! control socket's `quit`) and started again twice while a real QEMU NBD client with
//! `reconnect-delay` carries a verified write workload, once with the listening socket handed
//! over across restarts the way systemd does (`LISTEN_FDS`), once with the daemon binding its
//! own socket path each time. No request may fail, and every byte written must be there after
//! the last restart.
//!
//! The QEMU client is qemu-storage-daemon: an `nbd` blockdev on addcow's socket
//! (`reconnect-delay=30`), exported onward on its own NBD socket, where fio (`verify=crc32c`,
//! `verify_fatal`) writes and reads back. A request addcow answered with an error would reach
//! fio as an I/O error (QEMU passes a server's error reply through; it only retries on a broken
//! connection), and a lost write would fail fio's verification.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{Daemon, Fixture};

const MIB: u64 = 1 << 20;

/// qemu-storage-daemon: an NBD blockdev on `upstream` with `reconnect-delay=30`, exported as
/// `disk` on the NBD socket `export` (writable).
struct Qsd {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Qsd {
    fn start(upstream: &Path, export: &Path) -> Qsd {
        let blockdev = serde_json::json!({
            "driver": "nbd",
            "node-name": "up",
            "server": {"type": "unix", "path": upstream},
            "reconnect-delay": 30,
            "open-timeout": 30,
        });
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(blockdev.to_string())
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", export.display()))
            .arg("--export")
            .arg("type=nbd,id=e0,node-name=up,name=disk,writable=on")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils... or qemu-system-common: scripts/test.sh installs it)");
        let log = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    eprint!("[qsd] {text}");
                    log.lock().unwrap().push_str(&text);
                }
            });
        }
        let q = Qsd { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(export).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start:\n{}",
                q.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fio's arguments for the workload: 4 KiB random writes over 48 MiB, 16 in flight, rate
/// limited so the write phase lasts several seconds, every block checked (crc32c) afterwards.
fn fio_args(uri: &str, verify_only: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=restart",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=48M",
        "--rate_iops=2500",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randseed=1234",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--uri={uri}"));
    if verify_only {
        a.push("--verify_only".into());
    }
    a
}

/// Runs fio to the end; returns (exit status success, output).
fn fio_wait(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn fio_spawn(uri: &str, verify_only: bool) -> Child {
    Command::new("timeout")
        .arg("300")
        .arg("fio")
        .args(fio_args(uri, verify_only))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (scripts/test.sh installs it)")
}

/// fio's JSON report: the job's error and the I/O it did.
fn fio_report(text: &str) -> serde_json::Value {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{text}"));
    let mut de = serde_json::Deserializer::from_str(&text[start..]).into_iter();
    de.next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("fio JSON unreadable:\n{text}"))
}

/// How a daemon is stopped for a restart.
#[derive(Clone, Copy, Debug)]
enum StopBy {
    Sigterm,
    Quit,
}

fn stop_daemon(mut d: Daemon, how: StopBy, control: &Path) -> String {
    match how {
        StopBy::Sigterm => d.signal(nix::sys::signal::Signal::SIGTERM),
        StopBy::Quit => {
            let mut c = addcow_daemon_testkit::Control::connect(control);
            c.ok("quit", serde_json::json!({}));
        }
    }
    let st = d.wait_exit();
    let log = d.log();
    assert!(st.success(), "addcow serve exit {st}:\n{log}");
    log
}

/// Runs the workload through qemu-storage-daemon while the daemon is restarted twice (SIGTERM,
/// then `quit`); `start` starts a daemon (the same way each time).
fn restarts_under_load(fx: &Fixture, start: &dyn Fn() -> Daemon) {
    let qsd_sock = fx.path("qsd.sock");
    let control = fx.path("ctl.sock");
    let mut d = start();
    let upstream = d.sock.clone();
    let qsd = Qsd::start(&upstream, &qsd_sock);
    let uri = format!("nbd+unix:///disk?socket={}", qsd_sock.display());
    let mut fio = fio_spawn(&uri, false);
    let mut logs = Vec::new();
    for (i, how) in [StopBy::Sigterm, StopBy::Quit].into_iter().enumerate() {
        // Let the workload run against this daemon for a while; it must still be writing.
        std::thread::sleep(Duration::from_millis(1500));
        if fio.try_wait().unwrap().is_some() {
            let (ok, out) = fio_wait(fio);
            panic!(
                "fio ended before restart {i} (success: {ok}): an error across the previous \
                 restart, or a workload too short to prove anything:\n{out}\n--- daemons:\n{}",
                logs.join("\n---\n")
            );
        }
        logs.push(stop_daemon(d, how, &control));
        d = start();
    }
    let (ok, out) = fio_wait(fio);
    let report = fio_report(&out);
    let job = &report["jobs"][0];
    let qsd_log = qsd.stop();
    assert!(
        ok && job["error"] == 0,
        "fio saw an error across the restarts:\n{out}\n--- qsd:\n{qsd_log}\n--- daemons:\n{}\n{}",
        logs.join("\n---\n"),
        d.log()
    );
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    assert_eq!(written, 48 * MIB, "fio wrote everything: {out}");
    // Every stopped daemon answered what it had taken in and failed nothing.
    for log in &logs {
        assert!(log.contains("all overlays committed"), "{log}");
        assert!(!log.contains("errors=1"), "{log}");
    }
    // Everything is there after the last restart, read straight from a fresh daemon.
    let _ = stop_daemon(d, StopBy::Sigterm, &control);
    let d = start();
    let direct = format!("nbd+unix:///?socket={}", d.sock.display());
    let (ok, out) = fio_wait(fio_spawn(&direct, true));
    assert!(ok, "data missing after the restarts:\n{out}");
    let report = fio_report(&out);
    assert_eq!(report["jobs"][0]["error"], 0, "{out}");
    let read = report["jobs"][0]["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert_eq!(read, 48 * MIB, "verify read everything back: {out}");
    drop(d);
}

/// The daemon's arguments for these tests: the default export, a control socket, logging of
/// in-flight requests at stop time.
fn daemon_args(fx: &Fixture) -> Vec<String> {
    vec![
        "--control".into(),
        fx.path("ctl.sock").display().to_string(),
        fx.overlay().display().to_string(),
    ]
}

#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn restarts_with_a_socket_handed_over_are_invisible_to_a_qemu_client() {
    let fx = Fixture::new(64 * MIB);
    let sock = fx.path("sd.sock");
    // The test plays systemd: it owns the listening socket for the whole test.
    let listener = UnixListener::bind(&sock).unwrap();
    let args = daemon_args(&fx);
    let start = || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_activated(&listener, sock.clone(), &a)
    };
    restarts_under_load(&fx, &start);
}

#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn plain_restarts_on_the_same_path_are_invisible_to_a_qemu_client() {
    let fx = Fixture::new(64 * MIB);
    let sock = fx.path("s.sock");
    let args = daemon_args(&fx);
    let start = || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&sock, &a)
    };
    restarts_under_load(&fx, &start);
}
