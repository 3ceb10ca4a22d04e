//! `addcow serve` as a process: hostile clients, SIGKILL + restart, SIGTERM shutdown, the demo,
//! socket hygiene (mode, stale socket, pid file), `--max-connections`, TCP and systemd sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{
    addcow, addcow_bin, qemu_io, raw, run, run_raw, Daemon, Fixture, RawClient,
};

const MIB: u64 = 1 << 20;

/// How long a test waits for the daemon to close a connection before calling it a failure.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// A client socket, Unix or TCP.
trait Conn: Read + Write {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Conn for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// Reads until the daemon closes the connection (EOF, or a reset when it closed with bytes of
/// ours unread) and returns what came before. No close within [`CLOSE_WAIT`] fails the test.
fn read_to_close(s: &mut impl Conn) -> Vec<u8> {
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the daemon did not close the connection within {CLOSE_WAIT:?}"
        );
        s.set_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return v,
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return v,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the daemon did not close the connection within {CLOSE_WAIT:?}: {e}"),
        }
    }
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A client over loopback TCP. The daemon names the peer address on every log line about a
/// connection, so the test can check what happened to *this* connection.
struct Tcp {
    s: TcpStream,
    /// `peer=ADDR` as the daemon logs it.
    peer: String,
}

impl Tcp {
    fn connect(port: u16) -> Tcp {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let peer = format!("peer={}", s.local_addr().unwrap());
        Tcp { s, peer }
    }

    fn greeting(&mut self) {
        raw::greeting(&mut self.s).unwrap();
    }

    /// The daemon closes this connection (see [`read_to_close`]) and logs `message` for it.
    fn expect_closed(mut self, d: &Daemon, message: &str) {
        read_to_close(&mut self.s);
        wait_conn_log(d, &self.peer, message);
    }
}

/// Waits (bounded) for the daemon's log line `message` about the connection of `peer`
/// (`peer=ADDR`): the message followed by its fields, one of them exactly `peer`.
fn wait_conn_log(d: &Daemon, peer: &str, message: &str) {
    let with_fields = format!("{message} conn=");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = d.log();
        if log
            .lines()
            .any(|l| l.contains(&with_fields) && l.split_whitespace().any(|f| f == peer))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} line for the connection of {peer}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hostile_clients_do_not_disturb_a_good_one() {
    let fx = Fixture::new(8 * MIB);
    // The good client uses the Unix socket; the hostile ones come over TCP, so each close is
    // checked on its own connection (by its peer address in the log), never met by the good
    // client's own "connection closed" lines.
    let port = free_port();
    let d = Daemon::start(
        &fx.path("s.sock"),
        &[
            "--tcp",
            &format!("127.0.0.1:{port}"),
            fx.overlay().to_str().unwrap(),
        ],
    );
    let uri = d.uri();
    // A good client keeps working in the background the whole time.
    let good_uri = uri.clone();
    let good = std::thread::spawn(move || {
        for i in 0..20 {
            let p = format!("0x{:x}", 0x10 + i);
            qemu_io(
                &good_uri,
                &[
                    &format!("aio_write -P {p} 1M 256k"),
                    "aio_flush",
                    &format!("read -P {p} 1M 256k"),
                    "read -P 0xab 2M 64k",
                ],
            );
        }
    });

    let connect = || Tcp::connect(port);
    const IN_HANDSHAKE: &str = "connection closed during handshake";
    const IN_TRANSMISSION: &str = "connection closed";
    // 1. Garbage instead of client flags / options.
    let mut c = connect();
    c.greeting();
    c.s.write_all(&[0xff; 64]).unwrap();
    c.expect_closed(&d, IN_HANDSHAKE);
    // 2. Option with a huge length.
    let mut c = connect();
    c.greeting();
    let mut o = raw::CLIENT_FLAGS.to_be_bytes().to_vec();
    o.extend_from_slice(raw::IHAVEOPT);
    o.extend_from_slice(&7u32.to_be_bytes());
    o.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&o).unwrap();
    c.expect_closed(&d, IN_HANDSHAKE);
    // 3. Vanish mid-option: the daemon ends that connection.
    let mut c = connect();
    c.greeting();
    c.s.write_all(&[0, 0, 0, 3, b'I', b'H']).unwrap();
    let peer = c.peer.clone();
    drop(c);
    wait_conn_log(&d, &peer, IN_HANDSHAKE);
    // 4. After a good handshake: unknown command gets EINVAL and the connection goes on.
    let mut c = connect();
    raw::handshake(&mut c.s, "", &[]).unwrap();
    let s = &mut c.s;
    s.write_all(&raw::request(99, 0, 1, 0, 0)).unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        &r[4..8],
        &22u32.to_be_bytes(),
        "EINVAL for an unknown command"
    );
    // Write past the end: ENOSPC, payload drained, next request fine.
    s.write_all(&raw::request(1, 0, 2, 8 * MIB, 512)).unwrap();
    s.write_all(&[7u8; 512]).unwrap();
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[4..8], &28u32.to_be_bytes(), "ENOSPC past the end");
    s.write_all(&raw::request(0, 0, 3, 0, 16)).unwrap();
    let mut rr = [0u8; 32];
    s.read_exact(&mut rr).unwrap();
    assert_eq!(&rr[4..8], &[0, 0, 0, 0]);
    assert_eq!(&rr[16..], &[0xab; 16]);
    // Then garbage: the connection closes.
    s.write_all(&[0x42; 28]).unwrap();
    c.expect_closed(&d, IN_TRANSMISSION);
    // 5. Oversized write length: closed, not allocated.
    let mut c = connect();
    raw::handshake(&mut c.s, "", &[]).unwrap();
    c.s.write_all(&raw::request(1, 0, 4, 0, u32::MAX)).unwrap();
    c.expect_closed(&d, IN_TRANSMISSION);
    // 6. Truncated header, then vanish; and vanish in the middle of a write payload.
    let mut c = connect();
    raw::handshake(&mut c.s, "", &[]).unwrap();
    c.s.write_all(&raw::request(0, 0, 5, 0, 512)[..10]).unwrap();
    let peer6a = c.peer.clone();
    drop(c);
    let mut c = connect();
    raw::handshake(&mut c.s, "", &[]).unwrap();
    c.s.write_all(&raw::request(1, 0, 6, 0, 65536)).unwrap();
    c.s.write_all(&[1u8; 1000]).unwrap();
    let peer6b = c.peer.clone();
    drop(c);
    // 7. Many requests, then vanish without reading replies.
    let mut c = connect();
    raw::handshake(&mut c.s, "", &[]).unwrap();
    for i in 0..300 {
        c.s.write_all(&raw::request(0, 0, i, 0, 65536)).unwrap();
    }
    let peer7 = c.peer.clone();
    drop(c);
    for peer in [peer6a, peer6b, peer7] {
        wait_conn_log(&d, &peer, IN_TRANSMISSION);
    }

    good.join()
        .expect("good client failed while hostile clients ran");
    // The half-written 64 KiB write never reached the disk.
    qemu_io(&uri, &["read -P 0xab 0 1000"]);
    run("nbdinfo", &[&uri]);
    d.stop();
}

#[test]
fn flushed_data_survives_sigkill_and_restart() {
    let fx = Fixture::new(8 * MIB);
    let sock = fx.path("s.sock");
    let ov = fx.overlay();
    let mut d = Daemon::start(&sock, &[ov.to_str().unwrap()]);
    qemu_io(
        &d.uri(),
        &[
            "write -P 0x77 512k 1M",
            "write -P 0x78 5M 4097",
            "write -P 0x79 3 5",
            "flush",
        ],
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    assert!(sock.exists(), "a killed daemon leaves its socket behind");
    // The restart removes the stale socket, takes the lock again and sees the data.
    let d = Daemon::start(&sock, &[ov.to_str().unwrap()]);
    qemu_io(
        &d.uri(),
        &[
            "read -P 0x77 512k 1M",
            "read -P 0x78 5M 4097",
            "read -P 0x79 3 5",
            "read -P 0xab 0 3",
            "read -P 0 7M 1M",
        ],
    );
    d.stop();
}

/// Reads simple replies until the daemon closes the connection; panics on an error reply.
/// Returns the cookies answered.
fn read_ok_replies(mut s: UnixStream) -> Vec<u64> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut cookies = Vec::new();
    let mut r = [0u8; 16];
    loop {
        match s.read_exact(&mut r) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return cookies
            }
            Err(e) => panic!("no close within 60 s: {e}"),
        }
        assert_eq!(
            &r[..4],
            &raw::SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "simple reply magic"
        );
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        assert_eq!(
            error, 0,
            "request {cookie} was answered with error {error} during the stop"
        );
        cookies.push(cookie);
    }
}

/// SIGTERM while a client pipelines writes: no request is answered with an error; the daemon
/// stops reading, answers what it took in, closes the connection, commits and cleans up. Every
/// write answered is on disk after a restart, and no write left unanswered was carried out (a
/// reconnecting client resends exactly those).
#[test]
fn sigterm_fails_no_request_answers_in_flight_commits_and_cleans_up() {
    let fx = Fixture::new(8 * MIB);
    let sock = fx.path("s.sock");
    let pid = fx.path("addcow.pid");
    let ov = fx.overlay();
    let mut d = Daemon::start(
        &sock,
        &[
            "--pid-file",
            pid.to_str().unwrap(),
            "--shutdown-grace",
            "120",
            ov.to_str().unwrap(),
        ],
    );
    let pid_text = std::fs::read_to_string(&pid).expect("pid file");
    assert_eq!(pid_text.trim(), d.pid().to_string());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // An unflushed write, then a client that keeps writing through the SIGTERM.
    qemu_io(&d.uri(), &["write -P 0x3c 1M 64k"]);
    const N: u64 = 1000;
    let mut c = UnixStream::connect(&sock).unwrap();
    raw::handshake(&mut c, "", &[]).unwrap();
    let replies = {
        let r = c.try_clone().unwrap();
        std::thread::spawn(move || read_ok_replies(r))
    };
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            let mut frame = raw::request(1, 0, i, 2 * MIB + i * 4096, 4096);
            frame.extend_from_slice(&[(i % 250) as u8 + 1; 4096]);
            if c.write_all(&frame).is_err() {
                return i;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        N
    });
    std::thread::sleep(Duration::from_millis(300));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_log("shutting down");
    let sent = writer.join().unwrap();
    let answered = replies.join().expect("an error reply during the stop");
    assert!(
        !answered.is_empty() && (answered.len() as u64) < N,
        "the stop must come while the client writes: {} of {N} answered, {sent} sent",
        answered.len()
    );
    let st = d.wait_exit();
    assert!(st.success(), "exit status {st}:\n{}", d.log());
    assert!(!sock.exists(), "socket removed");
    assert!(!pid.exists(), "pid file removed");
    assert!(!fx.path("s.sock.lock").exists(), "socket lock removed");

    // Everything answered was committed; nothing unanswered was carried out.
    let d = Daemon::start(&sock, &[ov.to_str().unwrap()]);
    qemu_io(&d.uri(), &["read -P 0x3c 1M 64k"]);
    let out = fx.path("out.raw");
    run("nbdcopy", &[&d.uri(), out.to_str().unwrap()]);
    let disk = std::fs::read(&out).unwrap();
    let answered: std::collections::HashSet<u64> = answered.into_iter().collect();
    for i in 0..N {
        let at = (2 * MIB + i * 4096) as usize;
        let block = &disk[at..at + 4096];
        let want = if answered.contains(&i) {
            (i % 250) as u8 + 1
        } else if (at as u64) < 4 * MIB {
            0xab
        } else {
            0
        };
        assert!(
            block.iter().all(|&b| b == want),
            "write {i} (answered: {}) reads {:#x}, not {want:#x}",
            answered.contains(&i),
            block[0]
        );
    }
    d.stop();
}

#[test]
fn demo_prints_commands_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_in(Some(dir.path()), None, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let banner = loop {
        let s = d.stdout.lock().unwrap().clone();
        if s.contains("Stop with") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no demo banner:\n{s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(dir.path().join("addcow-demo/disk.add-cow").exists());
    let cmds: Vec<&str> = banner
        .lines()
        .filter_map(|l| l.strip_prefix("  $ "))
        .collect();
    assert!(cmds.len() >= 5, "{banner}");
    for c in &cmds {
        let out = run_raw("sh", &["-c", c]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "printed command failed: {c}\n{text}");
        assert!(!text.contains("Pattern verification failed"), "{c}\n{text}");
    }
    d.stop();
    // Second start reuses the demo files.
    let d = Daemon::start_in(Some(dir.path()), None, &[]);
    qemu_io(&d.uri(), &["read -P 0x5a 1M 64k"]);
    d.stop();
}

#[test]
fn tcp_socket_mode_and_max_connections() {
    let fx = Fixture::new(4 * MIB);
    let sock = fx.path("s.sock");
    // Pick a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = Daemon::start(
        &sock,
        &[
            "--socket-mode",
            "0660",
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--max-connections",
            "1",
            fx.overlay().to_str().unwrap(),
        ],
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // One connection held open: a second one is refused (closed at once).
    let mut held = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    held.read_exact(&mut g).unwrap();
    let mut second = UnixStream::connect(&sock).unwrap();
    assert!(
        read_to_close(&mut second).is_empty(),
        "refused at once, without a greeting"
    );
    d.wait_log("too many connections");
    drop(held);
    d.wait_log("connection closed during handshake");
    qemu_io(&format!("nbd://127.0.0.1:{port}/"), &["read -P 0xab 0 64k"]);
    d.wait_log("export=");
    d.wait_log("requests=");
    d.stop();
}

#[test]
fn handshake_time_limit_drops_silent_clients() {
    let fx = Fixture::new(4 * MIB);
    let d = Daemon::start(
        &fx.path("s.sock"),
        &["--handshake-timeout", "1", fx.overlay().to_str().unwrap()],
    );
    let start = Instant::now();
    let mut s = UnixStream::connect(&d.sock).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    // Say nothing: the daemon hangs up after the limit.
    assert!(read_to_close(&mut s).is_empty());
    let waited = start.elapsed();
    // The limit counts from the accept, which follows `start`: never sooner than 1 s. The
    // upper bound is generous for a loaded machine yet far below the 10 s default, so a limit
    // that is ignored (or a default that wins) fails here.
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(6),
        "a silent client was dropped after {waited:?} with --handshake-timeout 1"
    );
    d.wait_log("handshake failed");
    d.stop();
}

#[test]
fn systemd_socket_activation() {
    let fx = Fixture::new(4 * MIB);
    let sock = fx.path("sd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let d = Daemon::start_activated(&listener, sock, &[fx.overlay().to_str().unwrap()]);
    drop(listener);
    let out = run("nbdinfo", &["--size", &d.uri()]);
    assert_eq!(out.trim(), (4 * MIB).to_string());
    d.stop();
}

/// A daemon restarted right after its predecessor died can find the overlay still locked for a
/// moment (the kernel tears a dead process's io_uring down asynchronously): it waits for the
/// lock (`--lock-wait`), publishes its socket only once it has the overlay, and serves the data;
/// with `--lock-wait 0` a locked overlay is refused at once, as before.
#[test]
fn a_daemon_started_while_its_overlay_is_locked_waits_for_the_lock_then_serves() {
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    let fx = Fixture::new(4 * MIB);
    let ov = fx.overlay();
    let a_sock = fx.path("a.sock");
    let a = Daemon::start(&a_sock, &[ov.to_str().unwrap()]);
    let mut c = RawClient::connect(&a_sock, "").unwrap();
    assert_eq!(c.write(0, &[0x5a; 4096], false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);

    let b_sock = fx.path("b.sock");
    let mut b = Command::new(addcow_bin())
        .args(["serve", "--lock-wait", "120", "--socket"])
        .arg(&b_sock)
        .arg(&ov)
        .env("ADDCOW_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    {
        let log = Arc::clone(&log);
        let mut err = b.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let wait_log = |needle: &str, b: &mut std::process::Child| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !log.lock().unwrap().contains(needle) {
            if let Ok(Some(st)) = b.try_wait() {
                panic!("second daemon exited ({st}):\n{}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_log("waiting for the lock", &mut b);
    assert!(!b_sock.exists(), "no socket while the overlay is not ours");

    // Meanwhile a daemon that does not wait is refused at once.
    let out = addcow(
        ".",
        &[
            "serve",
            "--lock-wait",
            "0",
            "--socket",
            fx.path("c.sock").to_str().unwrap(),
            ov.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked"));

    a.stop();
    wait_log(" listening", &mut b);
    let mut c = RawClient::connect(&b_sock, "").unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(c.read(0, &mut buf).unwrap(), 0);
    assert!(
        buf.iter().all(|&x| x == 0x5a),
        "the first daemon's flushed write"
    );
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(b.wait().unwrap().success());
}

#[test]
fn a_locked_overlay_or_a_bad_command_line_is_a_clear_error() {
    let fx = Fixture::new(4 * MIB);
    let ov = fx.overlay();
    let d = Daemon::start(&fx.path("a.sock"), &[ov.to_str().unwrap()]);
    let serve = |args: &[&str]| {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let out = addcow(".", &all);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let b = fx.path("b.sock");
    let (code, err) = serve(&[
        "--lock-wait",
        "1",
        "--socket",
        b.to_str().unwrap(),
        ov.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("locked"), "{err}");
    assert!(!b.exists(), "no socket left behind by a failed start");
    // The running daemon still owns its socket: a second daemon on it is refused.
    let second = fx.make_overlay("second");
    let a = fx.path("a.sock");
    let (code, err) = serve(&["--socket", a.to_str().unwrap(), second.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another server is listening"), "{err}");
    let (code, err) = serve(&[
        "--socket",
        b.to_str().unwrap(),
        "--export",
        &format!("x={}", second.display()),
        "--export",
        &format!("x={}", second.display()),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("given twice"), "{err}");
    // A pid file that cannot be written: error, and the socket it had bound is removed.
    let bad_pid = fx.path("no/such/dir/pid");
    let (code, err) = serve(&[
        "--socket",
        b.to_str().unwrap(),
        "--pid-file",
        bad_pid.to_str().unwrap(),
        second.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no/such/dir/pid"), "{err}");
    assert!(!b.exists(), "socket removed after a failed start");
    let (code, err) = serve(&["--socket", b.to_str().unwrap(), "--export", "novalue"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("NAME=OVERLAY"), "{err}");
    qemu_io(&d.uri(), &["read -P 0xab 0 4k"]);
    d.stop();
}
