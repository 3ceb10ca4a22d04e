//! Socket hygiene and bounds of `addcow serve` as a process: the pid file and socket locks,
//! staleness, readiness (the path appears when it works; `sd_notify`), remote TCP, cleanup
//! after a failed start, TCP keepalive, the payload and idle timeouts, and running out of file
//! descriptors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{addcow, addcow_bin, qemu_io, raw, run, Daemon, Fixture};

const MIB: u64 = 1 << 20;

/// `addcow serve ARGS...` run to its end (bounded); (exit code, stderr).
fn serve_fails(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let out = addcow(".", &all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Waits (bounded by `limit`) until the daemon closes `s`; returns how long that took.
fn closed_within(s: &mut UnixStream, limit: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("not closed within {limit:?}: {e}"),
        }
    }
}

#[test]
fn the_pid_file_is_locked_kept_by_its_owner_and_taken_over_when_stale() {
    let fx = Fixture::new(4 * MIB);
    let pid = fx.path("addcow.pid");
    let a_sock = fx.path("a.sock");
    let second = fx.make_overlay("second");
    let mut a = Daemon::start(
        &a_sock,
        &[
            "--pid-file",
            pid.to_str().unwrap(),
            fx.overlay().to_str().unwrap(),
        ],
    );
    let a_pid = a.pid().to_string();
    assert_eq!(std::fs::read_to_string(&pid).unwrap().trim(), a_pid);
    // A second daemon with the same pid file is refused, and the file stays the first's.
    let b_sock = fx.path("b.sock");
    let (code, err) = serve_fails(&[
        "--socket",
        b_sock.to_str().unwrap(),
        "--pid-file",
        pid.to_str().unwrap(),
        second.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("held by another running process"), "{err}");
    assert!(err.contains(&a_pid), "names the holder: {err}");
    assert_eq!(std::fs::read_to_string(&pid).unwrap().trim(), a_pid);
    assert!(!b_sock.exists(), "the refused daemon left its socket");
    // A killed daemon leaves a stale pid file: the next one takes it over.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    a.wait_exit();
    assert!(pid.exists());
    let c = Daemon::start(
        &a_sock,
        &[
            "--pid-file",
            pid.to_str().unwrap(),
            fx.overlay().to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap().trim(),
        c.pid().to_string()
    );
    c.stop();
    assert!(!pid.exists(), "removed by its owner at exit");
}

/// With a stale socket file in place, several daemons started at once on one path: exactly one
/// serves it, the others are refused; nobody's socket is unlinked from under it.
#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn daemons_starting_together_cannot_both_bind() {
    let fx = Fixture::new(4 * MIB);
    let sock = fx.path("s.sock");
    const N: usize = 6;
    let overlays: Vec<PathBuf> = (0..N).map(|i| fx.make_overlay(&format!("d{i}"))).collect();
    for round in 0..3 {
        drop(UnixListener::bind(&sock).unwrap()); // a stale socket file
        let mut children: Vec<Child> = overlays
            .iter()
            .map(|o| {
                Command::new(addcow_bin())
                    .args(["serve", "--socket"])
                    .arg(&sock)
                    .arg(o)
                    .env("ADDCOW_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // The refused ones exit; give the rest time to settle.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exited = [None; N];
        while Instant::now() < deadline {
            for (i, c) in children.iter_mut().enumerate() {
                if exited[i].is_none() {
                    exited[i] = c.try_wait().unwrap();
                }
            }
            if exited.iter().filter(|e| e.is_none()).count() <= 1 && sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        for (i, c) in children.iter_mut().enumerate() {
            if exited[i].is_none() {
                exited[i] = c.try_wait().unwrap();
            }
        }
        let alive: Vec<usize> = (0..N).filter(|&i| exited[i].is_none()).collect();
        let mut errs = String::new();
        for (i, c) in children.iter_mut().enumerate() {
            if exited[i].is_some() {
                let mut e = String::new();
                c.stderr.take().unwrap().read_to_string(&mut e).unwrap();
                assert!(
                    e.contains("another server is listening"),
                    "round {round}: daemon {i} failed otherwise:\n{e}"
                );
                errs.push_str(&e);
            }
        }
        assert_eq!(
            alive.len(),
            1,
            "round {round}: {alive:?} still running\n{errs}"
        );
        run(
            "nbdinfo",
            &[&format!("nbd+unix:///?socket={}", sock.display())],
        );
        for i in alive {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(children[i].id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            assert!(children[i].wait().unwrap().success());
        }
        assert!(
            !sock.exists(),
            "round {round}: the survivor removes its socket"
        );
    }
}

/// Only a refused connection makes a socket file stale: another program's datagram socket at
/// the path is left alone and the daemon is refused.
#[test]
fn a_socket_file_is_stale_only_when_connections_are_refused() {
    let fx = Fixture::new(4 * MIB);
    let sock = fx.path("s.sock");
    let _other = UnixDatagram::bind(&sock).unwrap();
    let (code, err) = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        fx.overlay().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not removing it"), "{err}");
    assert!(sock.exists(), "another program's socket was removed");
}

#[test]
fn tcp_off_loopback_needs_allow_remote() {
    let fx = Fixture::new(4 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let any = format!("0.0.0.0:{port}");
    let sock = fx.path("s.sock");
    let (code, err) = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--tcp",
        &any,
        fx.overlay().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--allow-remote") && err.contains("no authentication"),
        "{err}"
    );
    assert!(!sock.exists(), "socket left behind by a refused start");
    let help = run(addcow_bin().to_str().unwrap(), &["serve", "--help"]);
    assert!(help.contains("no authentication"), "{help}");
    assert!(help.contains("--allow-remote"), "{help}");
    // --allow-remote alone is not enough without TLS required (see nbd_tls.rs); serving in
    // the clear off loopback takes --allow-insecure-remote.
    let d = Daemon::start(
        &sock,
        &[
            "--tcp",
            &any,
            "--allow-insecure-remote",
            fx.overlay().to_str().unwrap(),
        ],
    );
    qemu_io(&format!("nbd://127.0.0.1:{port}/"), &["read -P 0xab 0 4k"]);
    d.stop();
}

/// Readiness: systemd hears READY=1 only when the socket works (its path exists and a client
/// gets the greeting), STOPPING=1 at shutdown.
#[test]
fn sd_notify_ready_comes_when_the_socket_works() {
    let fx = Fixture::new(4 * MIB);
    let notify = fx.path("notify.sock");
    let n = UnixDatagram::bind(&notify).unwrap();
    n.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let sock = fx.path("s.sock");
    let child = Command::new(addcow_bin())
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg(fx.overlay())
        .env("NOTIFY_SOCKET", &notify)
        .env("ADDCOW_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let k = n.recv(&mut buf).expect("no sd_notify message within 60 s");
    let msg = String::from_utf8_lossy(&buf[..k]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // At READY the socket is there and served.
    let mut c = UnixStream::connect(&sock).expect("socket path missing at READY=1");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw::greeting(&mut c).unwrap();
    drop(c);
    let d = Daemon::from_child(child, sock);
    d.stop();
    let k = n.recv(&mut buf).expect("no STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..k]).contains("STOPPING=1"));
}

/// The socket path appears only once the daemon serves: a start that fails after binding never
/// shows it (watched with inotify), and leaves no socket, lock or pid file behind.
#[test]
fn the_socket_path_never_appears_for_a_start_that_fails() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let fx = Fixture::new(4 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let pid = dir.path().join("addcow.pid");
    // Fails after the NBD socket is bound: the metrics port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let ino = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    ino.add_watch(
        dir.path(),
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
    )
    .unwrap();
    let (code, err) = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--pid-file",
        pid.to_str().unwrap(),
        "--metrics",
        &metrics,
        fx.overlay().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--metrics"), "{err}");
    let mut seen = Vec::new();
    while let Ok(events) = ino.read_events() {
        if events.is_empty() {
            break;
        }
        seen.extend(events.into_iter().filter_map(|e| e.name));
    }
    assert!(
        !seen.iter().any(|n| n == "s.sock"),
        "the socket path appeared during a failed start: {seen:?}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// TCP connections get keepalive probes (the kernel's keepalive timer runs on the daemon's side
/// of an idle connection: timer kind 2 in /proc/net/tcp).
#[test]
fn tcp_connections_have_keepalive() {
    let fx = Fixture::new(4 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(
        &fx.path("s.sock"),
        &[
            "--tcp",
            &format!("127.0.0.1:{port}"),
            fx.overlay().to_str().unwrap(),
        ],
    );
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw::handshake(&mut c, "", &[]).unwrap();
    let client_port = c.local_addr().unwrap().port();
    // The daemon's side: local port `port`, remote port `client_port`.
    let want_local = format!(":{port:04X}");
    let want_remote = format!(":{client_port:04X}");
    // Wait for the connection to go quiet (the handshake's last segment acknowledged): an idle
    // connection runs the keepalive timer (02) if it has keepalive, none (00) if not.
    let deadline = Instant::now() + Duration::from_secs(30);
    let timer = loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let row = table.lines().skip(1).find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[1].ends_with(&want_local) && f[2].ends_with(&want_remote)
        });
        if let Some(row) = row {
            let f: Vec<&str> = row.split_whitespace().collect();
            // Field 5 is "tr:tm->when": the timer kind first.
            let t = f[5].split(':').next().unwrap().to_string();
            if t != "01" {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "daemon's socket not found:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        timer, "02",
        "no keepalive timer on the daemon's side of the connection"
    );
    drop(c);
    d.stop();
}

/// A WRITE whose payload stalls is dropped after the payload timeout; with --idle-timeout a
/// silent client is dropped, a busy one is not.
#[test]
fn stalled_payloads_and_idle_clients_are_dropped() {
    let fx = Fixture::new(4 * MIB);
    let d = Daemon::start(
        &fx.path("s.sock"),
        &[
            "--payload-timeout",
            "2",
            "--idle-timeout",
            "3",
            fx.overlay().to_str().unwrap(),
        ],
    );
    // Stalled inside a payload.
    let mut a = UnixStream::connect(&d.sock).unwrap();
    raw::handshake(&mut a, "", &[]).unwrap();
    a.write_all(&raw::request(1, 0, 1, 0, 4096)).unwrap();
    a.write_all(&[7u8; 100]).unwrap();
    // Silent after the handshake.
    let mut b = UnixStream::connect(&d.sock).unwrap();
    raw::handshake(&mut b, "", &[]).unwrap();
    // Busy: a read every 300 ms for 6 s.
    let busy_sock = d.sock.clone();
    let busy = std::thread::spawn(move || {
        let mut c = UnixStream::connect(&busy_sock).unwrap();
        raw::handshake(&mut c, "", &[]).unwrap();
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(6) {
            c.write_all(&raw::request(0, 0, i, 0, 512)).unwrap();
            let mut r = vec![0u8; 16 + 512];
            c.read_exact(&mut r).expect("the busy client was dropped");
            assert_eq!(&r[4..8], &[0, 0, 0, 0]);
            i += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let ta = closed_within(&mut a, Duration::from_secs(30));
    assert!(
        ta >= Duration::from_millis(1500) && ta < Duration::from_secs(15),
        "stalled payload closed after {ta:?} with --payload-timeout 2"
    );
    let tb = closed_within(&mut b, Duration::from_secs(30));
    assert!(
        tb < Duration::from_secs(15),
        "idle client closed after {tb:?}"
    );
    busy.join().unwrap();
    d.wait_log("payload timeout");
    d.wait_log("idle timeout");
    // Nothing of the stalled write reached the disk.
    qemu_io(&d.uri(), &["read -P 0xab 0 4k"]);
    d.stop();
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The lowest descriptor number process `pid` does not use: with the limit set to it, the
/// process can open nothing more.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

fn set_nofile(pid: i32, n: u64) {
    run(
        "prlimit",
        &["--pid", &pid.to_string(), &format!("--nofile={n}:")],
    );
}

/// Out of file descriptors: the accept loop backs off instead of spinning or flooding the log,
/// a connection that cannot be set up is refused (not served untracked), and serving resumes
/// once descriptors are free.
#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn running_out_of_descriptors_backs_off_and_recovers() {
    let fx = Fixture::new(4 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let pid = d.pid();
    // Not a single descriptor left: every accept fails with EMFILE.
    set_nofile(pid, lowest_free_fd(pid));
    let pending: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&d.sock).unwrap())
        .collect();
    d.wait_log("out of resources");
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - t0;
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    assert!(
        used * 10 < 3 * ticks_per_s,
        "the daemon used {used} ticks of CPU in 3 s while out of descriptors: it spins"
    );
    let lines = d.log().lines().filter(|l| l.contains("accept")).count();
    assert!(
        lines < 10,
        "{lines} log lines about accepting in 3 s: the log floods"
    );
    // Descriptors back: the waiting connections are served.
    set_nofile(pid, 4096);
    for mut p in pending {
        p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        raw::greeting(&mut p).expect("a pending connection was never served");
    }
    d.wait_log("accepting connections again");
    // Let those three connections end, so their descriptors are free again.
    addcow_daemon_testkit::wait_until("the pending connections closed", || {
        d.log()
            .matches("connection closed during handshake")
            .count()
            >= 3
    });
    // One descriptor left: the connection is accepted but cannot be set up (tracked) and is
    // refused, not served untracked.
    set_nofile(pid, lowest_free_fd(pid) + 1);
    let mut c = UnixStream::connect(&d.sock).unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(30)) < Duration::from_secs(30));
    d.wait_log("connection refused: cannot set it up");
    set_nofile(pid, 4096);
    qemu_io(&d.uri(), &["read -P 0xab 0 4k"]);
    d.stop();
}
