//! Test support of the daemon's end-to-end tests (`daemon/tests/*.rs`), one crate every test file
//! takes as a dev-dependency (`use addcow_daemon_testkit::...`):
//!
//! * here: the built `addcow` binary ([`addcow_bin`]), its tool commands ([`addcow`]), a
//!   fixture overlay on disk ([`Fixture`]), `addcow serve` on a temp socket ([`Daemon`]), real
//!   clients run with a time bound ([`run`], [`qemu_io`], [`HoldingClient`]), the control
//!   socket ([`Control`], [`ctl`]) and process probes ([`fd_count`], [`rss_kib`]).
//! * [`raw`]: a raw NBD client (handshake pieces, requests, simple / structured / extended
//!   replies, [`raw::RawClient`]) for tests that need exact control of the bytes.
//! * [`scripted`]: a scripted NBD image server that misbehaves in exactly one way.
//! * [`image_server`]: real image servers (nbdkit, qemu-nbd) as remote bases.
//! * [`vhost`]: a vhost-user-blk frontend (libblkio); [`vhost::hostile`]: one written by hand that
//!   misbehaves (re-posted heads, flipped lengths, a pipe as call fd).
//!
//! Every external tool is required: a missing one fails the test loudly (scripts/test.sh
//! installs them), it never passes silently.

pub mod image_server;
pub mod raw;
pub mod scripted;
pub mod tls;
pub mod vhost;

pub use raw::RawClient;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on any single client command.
pub const TOOL_TIMEOUT_SECS: u32 = 180;

/// The `addcow` binary under test: `ADDCOW_TEST_BIN` (to run a test against another build,
/// e.g. to show that it fails on an older daemon), else the one cargo built for the running
/// integration test. Cargo builds a package's binaries before its integration tests and puts
/// them in `target/PROFILE`, the tests in `target/PROFILE/deps` (the place
/// `CARGO_BIN_EXE_addcow` names in addcow-daemon's own test crates).
pub fn addcow_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ADDCOW_TEST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("addcow"))
        .unwrap_or_else(|| panic!("{} is not in target/PROFILE/deps", exe.display()));
    assert!(
        bin.is_file(),
        "{} missing: run the test with cargo test -p addcow-daemon (which builds it) or set \
         ADDCOW_TEST_BIN",
        bin.display()
    );
    bin
}

/// Runs `addcow ARGS...` to its end in `cwd` (`"."`: the test's own directory), stdin
/// closed, bounded by [`TOOL_TIMEOUT_SECS`]; returns its output, unchecked.
pub fn addcow(cwd: impl AsRef<Path>, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS.to_string())
        .arg(addcow_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run addcow under timeout")
}

/// [`addcow`] that must succeed (else the test fails with [`text`]); returns its stdout (which
/// must be UTF-8).
pub fn addcow_ok(cwd: impl AsRef<Path>, args: &[&str]) -> String {
    let o = addcow(cwd, args);
    assert!(o.status.success(), "addcow {args:?}: {}", text(&o));
    String::from_utf8(o.stdout).expect("addcow's stdout is UTF-8")
}

/// A command's exit status, stdout and stderr, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A temp dir with `base.raw` (first half of the disk, every byte 0xab) and `disk.add-cow` on it
/// (virtual size `size`; the second half reads as zeros past the base).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub size: u64,
}

impl Fixture {
    pub fn new(size: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture { dir, size };
        f.make_overlay("disk");
        f
    }

    /// Creates another overlay `NAME.add-cow` (+ `NAME.raw`) on the same base.
    pub fn make_overlay(&self, name: &str) -> PathBuf {
        let base = self.path("base.raw");
        if !base.exists() {
            std::fs::write(&base, vec![0xab; (self.size / 2) as usize]).expect("write base");
        }
        let overlay = self.path(&format!("{name}.add-cow"));
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: overlay.clone(),
            base: Some(base),
            image: Some(self.path(&format!("{name}.raw"))),
            size: Some(self.size),
            force: false,
        })
        .expect("create overlay");
        overlay
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn overlay(&self) -> PathBuf {
        self.path("disk.add-cow")
    }

    /// The bytes the fresh disk reads as.
    pub fn reference(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        v[..(self.size / 2) as usize].fill(0xab);
        v
    }
}

/// A running `addcow serve`.
pub struct Daemon {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub log: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `addcow serve --socket SOCK ARGS...` in `cwd` and waits until it accepts.
    pub fn start(sock: &Path, args: &[&str]) -> Daemon {
        Self::start_in(None, Some(sock), args)
    }

    /// Starts `addcow serve [--socket SOCK] ARGS...` in `cwd` (if given); `sock` is where it
    /// will listen (waited for).
    pub fn start_in(cwd: Option<&Path>, sock: Option<&Path>, args: &[&str]) -> Daemon {
        Self::start_env(cwd, sock, args, &[])
    }

    /// [`Daemon::start`] with the test seams of the daemon (`process::seam`) armed from folder
    /// `seams`: the test creates `POINT.pause` / `POINT.fail` there and waits for
    /// `POINT.reached`.
    pub fn start_seamed(sock: &Path, args: &[&str], seams: &Path) -> Daemon {
        let seams = seams.to_str().expect("utf-8 path");
        Self::start_env(None, Some(sock), args, &[("ADDCOW_TEST_SEAMS", seams)])
    }

    /// [`Daemon::start_in`] with extra environment variables.
    pub fn start_env(
        cwd: Option<&Path>,
        sock: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut cmd = Command::new(addcow_bin());
        cmd.envs(env.iter().copied());
        cmd.arg("serve");
        if let Some(s) = sock {
            cmd.arg("--socket").arg(s);
        }
        cmd.args(args)
            .env("ADDCOW_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let child = cmd.spawn().expect("spawn addcow serve");
        let sock = match (sock, cwd) {
            (Some(s), _) => s.to_path_buf(),
            (None, Some(d)) => d.join("addcow.sock"),
            (None, None) => PathBuf::from("addcow.sock"),
        };
        Daemon::from_child(child, sock)
    }

    /// `addcow serve --socket DIR/nbd.sock --control DIR/ctl.sock ARGS...` in the fixture's
    /// folder `DIR`; returns the daemon and the control socket's path.
    pub fn start_with_control(f: &Fixture, args: &[&str]) -> (Daemon, PathBuf) {
        let control = f.path("ctl.sock");
        let mut all = vec!["--control", control.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        (Daemon::start(&f.path("nbd.sock"), &all), control)
    }

    /// [`spawn_activated`] taken over and waited for until ready; `sock` is the listener's
    /// path (where clients connect), or empty for a TCP listener.
    pub fn start_activated(listener: &impl AsRawFd, sock: PathBuf, args: &[&str]) -> Daemon {
        Daemon::from_child(spawn_activated(listener, args), sock)
    }

    /// Takes over a started `addcow serve` (stdout and stderr piped) that will listen on `sock`,
    /// and waits until it is ready.
    pub fn from_child(mut child: Child, sock: PathBuf) -> Daemon {
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        pump(child.stderr.take().expect("stderr"), log.clone(), true);
        pump(child.stdout.take().expect("stdout"), stdout.clone(), false);
        let mut d = Daemon {
            child: Some(child),
            sock,
            log,
            stdout,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        // Ready once it logged that it listens (bound sockets queue connections); no probe
        // connection, so connection counts and logs stay exact.
        loop {
            if self.log().contains(" listening") {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("addcow serve exited early ({st}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "addcow serve not ready within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn uri_of(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Waits (bounded) for the daemon to exit; returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon already reaped");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("addcow serve did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let st = self.wait_exit();
        let log = self.log();
        assert!(st.success(), "addcow serve exit {st}:\n{log}");
        log
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_text(&self.log, needle, "log never showed");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (bounded, 60 s) until the text `pump` collects in `out` contains `needle`; else fails
/// the test with `never` and the text.
fn wait_text(out: &Mutex<String>, needle: &str, never: &str) {
    let text = || out.lock().map(|s| s.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text().contains(needle) {
        assert!(Instant::now() < deadline, "{never} {needle:?}:\n{}", text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pump(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[addcow] {line}");
            }
            if let Ok(mut s) = into.lock() {
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
}

/// `addcow serve ARGS...` started as systemd starts a socket-activated service: `listener` as
/// fd 3, `LISTEN_PID` its pid, `LISTEN_FDS=1`; stdin closed, stdout and stderr piped (for
/// [`Daemon::from_child`] or [`exit_of`]). Not waited for.
pub fn spawn_activated(listener: &impl AsRawFd, args: &[&str]) -> Child {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve \"$@\"")
        .arg(addcow_bin())
        .args(args)
        .env("ADDCOW_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2/fcntl are async-signal-safe; the child gets the listener as fd 3 (without
    // close-on-exec) and nothing else changes.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn addcow serve")
}

/// Waits (bounded, 60 s) for `child` to exit by itself, as a daemon that refuses to start
/// does; returns its status and its stderr (which must be piped). A child still running at
/// the deadline is killed and fails the test with `if_running`.
pub fn exit_of(mut child: Child, if_running: &str) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{if_running}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status, err)
}

/// Runs `prog args...` under `timeout`, returns its output (not checked).
pub fn run_raw(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(TOOL_TIMEOUT_SECS.to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} (scripts/test.sh installs it): {e}"))
}

/// `qemu-img compare` of two raw images (files or NBD URIs): fails the test unless they are
/// identical byte for byte.
pub fn assert_identical(a: &str, b: &str) {
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b]);
    assert!(out.contains("Images are identical"), "{a} vs {b}: {out}");
}

/// Runs a client and asserts exit 0; returns stdout + stderr. A missing tool fails loudly.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = run_raw(prog, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code() != Some(127),
        "{prog} is not installed (scripts/test.sh installs it)"
    );
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Runs qemu-io commands against `uri`; asserts success and no pattern mismatch.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Writes `data` to a new file.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
}

/// A JSON-RPC client on a daemon's control socket (one request at a time; notifications that
/// arrive meanwhile are kept in `notifications`).
pub struct Control {
    pub sock: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
    next_id: u64,
    pub notifications: Vec<serde_json::Value>,
}

impl Control {
    /// Connects to `path`; every read waits at most 120 s.
    pub fn connect(path: &Path) -> Control {
        let sock = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        let reader = BufReader::new(sock.try_clone().expect("clone"));
        Control {
            sock,
            reader,
            next_id: 1,
            notifications: Vec::new(),
        }
    }

    /// Reads one line as JSON (`None` once the daemon closed the connection: EOF, or a reset
    /// when it closed with our bytes unread).
    pub fn read_message(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        let n = match self.reader.read_line(&mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read from control socket: {e}"),
        };
        if n == 0 {
            return None;
        }
        Some(serde_json::from_str(line.trim_end()).unwrap_or_else(|e| {
            panic!("control socket sent a line that is not JSON ({e}): {line:?}")
        }))
    }

    /// Sends `method` with `params`; returns the result, or the error object.
    pub fn call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let mut line = req.to_string();
        line.push('\n');
        self.sock.write_all(line.as_bytes()).expect("send request");
        self.response(id)
    }

    /// Waits for the response to request `id`, keeping notifications.
    pub fn response(&mut self, id: u64) -> Result<serde_json::Value, serde_json::Value> {
        loop {
            let msg = self
                .read_message()
                .unwrap_or_else(|| panic!("control socket closed before answering {id}"));
            assert_eq!(msg["jsonrpc"], "2.0", "{msg}");
            if msg.get("id").is_none() {
                self.notifications.push(msg);
                continue;
            }
            assert_eq!(
                msg["id"],
                serde_json::json!(id),
                "answer to another request: {msg}"
            );
            if let Some(e) = msg.get("error") {
                return Err(e.clone());
            }
            return Ok(msg["result"].clone());
        }
    }

    /// Calls and expects success.
    pub fn ok(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.call(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params} failed: {e}"))
    }

    /// Waits for the notification `method` (already received or arriving).
    pub fn notification(&mut self, method: &str) -> serde_json::Value {
        loop {
            if let Some(i) = self
                .notifications
                .iter()
                .position(|n| n["method"] == method)
            {
                return self.notifications.remove(i);
            }
            let msg = self
                .read_message()
                .unwrap_or_else(|| panic!("control socket closed before {method}"));
            assert!(msg.get("id").is_none(), "unexpected answer {msg}");
            self.notifications.push(msg);
        }
    }
}

/// Runs `addcow ctl ARGS...` (bounded); returns (exit code, stdout, stderr).
pub fn ctl(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    let out = addcow(".", &all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A libnbd client (python3-libnbd) that connects to `uri`, prints "connected", then reads
/// 4 KiB every 10 ms until the connection fails; it then prints "ended: ERRNO MESSAGE" and exits.
/// The URI may name local files (`tls-certificates=`, `tls-psk-file=`): tests choose their URIs.
pub struct HoldingClient {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
}

const HOLDING_CLIENT_PY: &str = r#"
import sys, time, nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
print("connected", flush=True)
n = 0
try:
    while True:
        h.pread(4096, 0)
        n += 1
        time.sleep(0.01)
except nbd.Error as e:
    print(f"ended: errno={e.errno} after {n} reads: {e.string}", flush=True)
"#;

impl HoldingClient {
    /// Starts the client and waits (bounded) until it is connected.
    pub fn start(uri: &str) -> HoldingClient {
        HoldingClient::run(HOLDING_CLIENT_PY, &[uri])
    }

    /// Starts the python3-libnbd `script` with `args` and waits (bounded) until it printed
    /// `connected`.
    pub fn run(script: &str, args: &[&str]) -> HoldingClient {
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with python3-libnbd (scripts/test.sh installs it)");
        let out = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().expect("stdout"), out.clone(), false);
        pump(child.stderr.take().expect("stderr"), out.clone(), false);
        let c = HoldingClient { child, out };
        c.wait_for("connected");
        c
    }

    pub fn output(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (bounded) until the output contains `needle`.
    pub fn wait_for(&self, needle: &str) {
        wait_text(&self.out, needle, "client never printed");
    }
}

impl Drop for HoldingClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sample (over a Unix metrics socket, with curl) of `addcow_refused_connections_total{socket="KIND"}` from the metrics socket.
pub fn refused_connections_metric(metrics: &std::path::Path, kind: &str) -> u64 {
    let out = run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--unix-socket",
            metrics.to_str().unwrap(),
            "http://x/metrics",
        ],
    );
    let want = format!("addcow_refused_connections_total{{socket=\"{kind}\"}} ");
    out.lines()
        .find_map(|l| l.strip_prefix(&want))
        .unwrap_or_else(|| panic!("no {want:?} in the metrics:\n{out}"))
        .trim()
        .parse()
        .expect("a count")
}

/// Polls `cond` every 10 ms until it holds; fails after 30 s naming `what` (counters of a
/// connection that just ended settle a moment after the client saw its last reply).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What [`backup_client`] read.
#[derive(Debug, Clone, Copy)]
pub struct BackupRead {
    pub bytes_read: u64,
    pub extents: u64,
    pub size: u64,
}

/// Runs the pull-mode backup client (`backup_client.py`, python3 + libnbd, in the style of
/// virtnbdbackup) against `uri`: `context` `"full"` copies the whole export, a
/// `"qemu:dirty-bitmap:NAME"` only the extents that bitmap marks dirty, each written into the
/// existing file `out` at its offset (a restore: a full backup, then each incremental in order).
pub fn backup_client(uri: &str, context: &str, out: &Path) -> BackupRead {
    const SCRIPT: &str = include_str!("backup_client.py");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("backup_client.py");
    std::fs::write(&script, SCRIPT).expect("write backup_client.py");
    let text = run(
        "/usr/bin/python3",
        &[
            script.to_str().unwrap(),
            uri,
            context,
            out.to_str().expect("utf-8 path"),
        ],
    );
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("backup_client.py printed no result:\n{text}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("backup_client.py's JSON");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {line}"));
    BackupRead {
        bytes_read: n("bytes_read"),
        extents: n("extents"),
        size: n("size"),
    }
}
