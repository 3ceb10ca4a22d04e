//! Remote bases over NBD, end to end with real image servers: `nbdkit file` and `qemu-nbd`
//! on a Unix socket as the base of an overlay served by `addcow serve`, read by real clients.
//!
//! Every tool is required (scripts/test.sh installs them); a missing one fails loudly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::image_server::{free_port, ImageServer, Listen};
use addcow_daemon_testkit::scripted::{self, Handshake, Reply, Request, Script, ScriptedServer};
use addcow_daemon_testkit::*;
use rand::{RngCore, SeedableRng};

const SIZE: u64 = 8 << 20;
/// The base holds random data in its first 6 MiB; the rest is a hole.
const DATA: u64 = 6 << 20;

/// `nbdkit -f -U SOCK ARGS...` (plugin and filters in `args`).
fn nbdkit(sock: &Path, args: &[&str]) -> ImageServer {
    ImageServer::nbdkit(Listen::Unix(sock.to_path_buf()), args)
}

/// `qemu-nbd -f raw -r -t --shared=16 -k SOCK FILE` (read-only, so it allows multi-conn).
fn qemu_nbd(sock: &Path, file: &Path) -> ImageServer {
    qemu_nbd_named(sock, file, "")
}

/// [`qemu_nbd`] serving only the export `name`.
fn qemu_nbd_named(sock: &Path, file: &Path, name: &str) -> ImageServer {
    ImageServer::qemu_nbd(Listen::Unix(sock.to_path_buf()), file, &["-x", name])
}

/// `qemu-storage-daemon` exporting `file` read-only as `name` on a Unix socket.
fn qsd(sock: &Path, file: &Path, name: &str) -> ImageServer {
    let a = vec![
        "--blockdev".to_string(),
        format!(
            "driver=file,node-name=f,filename={},read-only=on",
            file.display()
        ),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", sock.display()),
        "--export".to_string(),
        format!("type=nbd,id=e,node-name=f,name={name},writable=off"),
    ];
    ImageServer::start("qemu-storage-daemon", a, Listen::Unix(sock.to_path_buf()))
}

/// A temp dir with `base.raw`: random bytes (seeded) then a hole.
struct Setup {
    dir: tempfile::TempDir,
    base: Vec<u8>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut base = vec![0u8; SIZE as usize];
        rand::rngs::StdRng::seed_from_u64(12).fill_bytes(&mut base[..DATA as usize]);
        let f = std::fs::File::create(dir.path().join("base.raw")).expect("create base");
        std::os::unix::fs::FileExt::write_all_at(&f, &base[..DATA as usize], 0).expect("write");
        f.set_len(SIZE).expect("size base");
        Setup { dir, base }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `addcow create -b BASE NAME.add-cow` (size from the base).
    fn create(&self, name: &str, base: &str) -> PathBuf {
        let ov = self.path(&format!("{name}.add-cow"));
        addcow_ok(".", &["create", "-b", base, &ov.display().to_string()]);
        ov
    }
}

/// Bytes of the overlay's bitmap that are not zero (no bit set anywhere when 0).
fn set_bitmap_bytes(overlay: &Path) -> usize {
    let b = std::fs::read(overlay).expect("read overlay");
    b[2560..].iter().filter(|&&x| x != 0).count()
}

#[test]
fn nbdkit_file_base_serves_writes_and_streams_free_of_the_server() {
    let s = Setup::new();
    let mut server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let ov = s.create("vm", &server.uri());
    let ovs = ov.display().to_string();
    // The URI is stored unchanged and shown by the tools.
    let info = addcow_ok(".", &["info", "--backing-chain", &ovs]);
    assert!(info.contains(&server.uri()), "{info}");
    assert!(info.contains("raw over NBD"), "{info}");
    let check = addcow_ok(".", &["check", &ovs]);
    assert!(check.contains("No errors"), "{check}");
    let map = addcow_ok(".", &["map", "--json", &ovs]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&map).expect("map json");
    assert_eq!(runs.len(), 2, "data then the base's hole: {map}");
    assert_eq!(runs[0]["length"], DATA);
    assert_eq!(runs[1]["zero"], true);

    let d = Daemon::start(&s.path("a.sock"), &[&ovs]);
    assert_identical(&s.p("base.raw"), &d.uri());
    // Unaligned writes read-modify-write from the remote base; one lands in its hole.
    qemu_io(
        &d.uri(),
        &["write -P 0x5a 1048676 5000", "write -P 0x77 7340032 4096"],
    );
    let mut expected = s.base.clone();
    expected[1048676..1048676 + 5000].fill(0x5a);
    expected[7340032..7340032 + 4096].fill(0x77);
    write_file(&s.path("expected.raw"), &expected);
    assert_identical(&s.p("expected.raw"), &d.uri());
    d.stop();

    // With the image server down, an overlay that still reads its base cannot be served: a
    // clear error naming the server, nothing served.
    server.kill();
    let out = addcow(".", &["serve", "--socket", &s.p("down.sock"), &ovs]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served with its base unreachable: {text}"
    );
    assert!(
        text.contains("img.sock"),
        "the error names the image server: {text}"
    );
    // With --size, creating an overlay on it needs no server.
    let fresh = s.path("fresh.add-cow");
    let uri = server.uri();
    let out = addcow_ok(
        ".",
        &[
            "create",
            "--size",
            "8M",
            "-b",
            &uri,
            fresh.to_str().unwrap(),
        ],
    );
    assert!(out.contains(&uri), "{out}");
    server.restart();
    // The offline tools that read or write a base refuse a remote one, saying why.
    for args in [vec!["rebase", "-b", "", &ovs], vec!["commit", &ovs]] {
        let out = addcow(".", &args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains("image server (NBD)"), "{args:?}: {text}");
    }

    // Stream copies the rest. The complete overlay then serves with the server gone, as it is
    // (it never reads its base), and dropping the base needs no server either.
    addcow_ok(".", &["stream", &ovs]);
    server.kill();
    let info = addcow_ok(".", &["info", &ovs]);
    assert!(info.contains("complete:       yes"), "{info}");
    let d = Daemon::start(&s.path("a.sock"), &[&ovs]);
    assert_identical(&s.p("expected.raw"), &d.uri());
    qemu_io(&d.uri(), &["write -P 0x31 4096 4096"]);
    expected[4096..8192].fill(0x31);
    write_file(&s.path("expected.raw"), &expected);
    assert_identical(&s.p("expected.raw"), &d.uri());
    d.stop();
    addcow_ok(".", &["rebase", "-u", "-b", "", &ovs]);
    let d = Daemon::start(&s.path("a.sock"), &[&ovs]);
    assert_identical(&s.p("expected.raw"), &d.uri());
    d.stop();
}

#[test]
fn qemu_nbd_base_is_read_over_several_connections() {
    let s = Setup::new();
    let _server = qemu_nbd(&s.path("img.sock"), &s.path("base.raw"));
    let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
    let ov = s.create("vm", &uri);
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--cores", "2", &ov.display().to_string()],
    );
    d.wait_log("remote base connected");
    assert!(
        d.log().contains("conns=2"),
        "qemu-nbd -r advertises multi-conn: one connection per core:\n{}",
        d.log()
    );
    assert_identical(&s.p("base.raw"), &d.uri());
    // Two clients at once (two cores, two connections to the image server).
    let a = std::thread::spawn({
        let u = d.uri();
        let b = s.p("base.raw");
        move || assert_identical(&b, &u)
    });
    assert_identical(&s.p("base.raw"), &d.uri());
    a.join().expect("second client");
    d.stop();
}

/// Reads random 4 KiB blocks of the served disk for `secs` seconds and checks each against
/// the expected file; prints `connected`, then `end: ok N` or `end: ` and the first failure.
/// Reads random 4 KiB blocks of `uri` and checks them against the file `ref`, for `secs`
/// seconds or (with a 4th argument) until that file exists; prints `reads N` every 10 reads,
/// then `end: ok N`, or `end: ...` naming the first error or mismatch.
const READ_LOOP_PY: &str = r#"
import os, sys, time, random, nbd
uri, ref, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
stop = sys.argv[4] if len(sys.argv) > 4 else None
want = open(ref, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
print("connected", flush=True)
end = time.time() + secs
n = 0
rnd = random.Random(5)
while time.time() < end and not (stop and os.path.exists(stop)):
    off = rnd.randrange(0, len(want) // 4096) * 4096
    try:
        got = h.pread(4096, off)
    except nbd.Error as e:
        print(f"end: error at {off}: {e.string} errno={e.errno}", flush=True)
        sys.exit(1)
    if got != want[off:off + 4096]:
        print(f"end: mismatch at {off}", flush=True)
        sys.exit(1)
    n += 1
    if n % 10 == 0:
        print(f"reads {n}", flush=True)
print(f"end: ok {n}", flush=True)
"#;

/// How many reads a [`READ_LOOP_PY`] client reported so far.
fn reads_done(c: &HoldingClient) -> u64 {
    c.output()
        .lines()
        .filter_map(|l| l.strip_prefix("reads ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits (polling, generous deadline: the machine may be loaded) until a [`READ_LOOP_PY`]
/// client has done `n` reads; returns how many it has done.
fn wait_reads(c: &HoldingClient, n: u64, d: &Daemon) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = reads_done(c);
        if done >= n {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "the client did only {done} of {n} reads in 180 s:
{}
{}",
            c.output(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of `log` that contain `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Waits (bounded) until the daemon's log holds more than `n` lines containing `needle`.
fn wait_log_more(d: &Daemon, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&d.log(), needle) <= n {
        assert!(
            Instant::now() < deadline,
            "log never showed another {needle:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn image_server_restarted_during_reads_pauses_them_without_an_error() {
    let s = Setup::new();
    let mut server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let ov = s.create("vm", &server.uri());
    let d = Daemon::start(&s.path("a.sock"), &[&ov.display().to_string()]);
    let client = HoldingClient::run(READ_LOOP_PY, &[&d.uri(), &s.p("base.raw"), "6"]);
    wait_reads(&client, 10, &d);
    server.kill();
    d.wait_log("reconnecting");
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    d.wait_log("image server reconnected");
    client.wait_for("end: ");
    let out = client.output();
    assert!(out.contains("end: ok"), "{out}");
    d.stop();
}

#[test]
fn image_server_gone_past_the_timeout_gives_eio_and_other_exports_still_serve() {
    let s = Setup::new();
    let mut server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let ov = s.create("vm", &server.uri());
    // A second export on a local base.
    let local = s.create("local", &s.p("base.raw"));
    let d = Daemon::start(
        &s.path("a.sock"),
        &[
            "--base-timeout",
            "2",
            "--export",
            &format!("vm={}", ov.display()),
            "--export",
            &format!("local={}", local.display()),
        ],
    );
    // Some of the overlay's own data, written while the server is up.
    qemu_io(&d.uri_of("vm"), &["write -P 0x33 0 65536"]);
    server.kill();
    let t0 = Instant::now();
    let out = run_raw(
        "qemu-io",
        &["-f", "raw", "-c", "read 2097152 4096", &d.uri_of("vm")],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "EIO expected:\n{text}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the read failed by the timeout, not a hang"
    );
    // The overlay's own data and the other export are unaffected.
    qemu_io(&d.uri_of("vm"), &["read -P 0x33 0 65536"]);
    let mut local_want = s.base.clone();
    local_want.truncate(SIZE as usize);
    write_file(&s.path("local.want"), &local_want);
    assert_identical(&s.p("local.want"), &d.uri_of("local"));
    assert!(
        d.log().contains("not answered within the timeout"),
        "{}",
        d.log()
    );
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
    // A failed base read set no bit beyond the write.
    let b = std::fs::read(&ov).expect("read overlay");
    assert!(
        b[2560 + 16..].iter().all(|&x| x == 0),
        "only the written 64 KiB is set"
    );
}

#[test]
fn base_read_errors_are_eio_and_set_no_bits() {
    let s = Setup::new();
    let _server = nbdkit(
        &s.path("img.sock"),
        &[
            "--filter=error",
            "file",
            &s.p("base.raw"),
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
    let ov = s.create("vm", &uri);
    let ovs = ov.display().to_string();
    // Copy-on-read on: a failed base read must not set bits through it either.
    let d = Daemon::start(&s.path("a.sock"), &["--copy-on-read", &ovs]);
    for cmd in ["read 0 4096", "write -P 1 100 200", "read 1048576 1048576"] {
        let out = run_raw("qemu-io", &["-f", "raw", "-c", cmd, &d.uri()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("Input/output error"),
            "{cmd}: EIO expected:\n{text}"
        );
    }
    // The hole of the base needs no read: it still serves.
    qemu_io(&d.uri(), &["read -P 0 7340032 4096"]);
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(set_bitmap_bytes(&ov), 0, "no bit set by a failed base read");
    // Stream fails the same way and sets no bit either.
    let out = addcow(".", &["stream", &ovs]);
    assert!(
        !out.status.success(),
        "stream over a failing base must fail"
    );
    assert_eq!(set_bitmap_bytes(&ov), 0, "no bit set by a failed stream");
}

/// A slow image server (2 s per read) never stalls the overlay's own data on the same core:
/// with one core and one connection, a read of an allocated range issued after a base read
/// completes while the base read is still pending.
const ORDER_PY: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
done = []
def cb(name):
    def f(*args):
        done.append(name)
        return 1
    return f
b1 = nbd.Buffer(4096)
b2 = nbd.Buffer(4096)
h.aio_pread(b1, 1048576, completion=cb("base"))
h.aio_pread(b2, 0, completion=cb("local"))
while len(done) < 2:
    h.poll(-1)
print("order " + " ".join(done), flush=True)
print("local ok" if b2.to_bytearray() == bytearray([0x44]) * 4096 else "local wrong", flush=True)
"#;

#[test]
fn slow_image_server_never_stalls_reads_of_local_data() {
    let s = Setup::new();
    let _server = nbdkit(
        &s.path("img.sock"),
        &["--filter=delay", "file", &s.p("base.raw"), "rdelay=2"],
    );
    let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
    let ov = s.create("vm", &uri);
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--cores", "1", &ov.display().to_string()],
    );
    qemu_io(&d.uri(), &["write -P 0x44 0 4096"]);
    let c = HoldingClient::run(ORDER_PY, &[&d.uri()]);
    c.wait_for("local ");
    // Ordering, not timing: the local read was answered while the base read (issued first,
    // on the same connection and core) was still waiting for its 2 s server.
    let out = c.output();
    assert!(out.contains("order local base"), "{out}");
    assert!(out.contains("local ok"), "{out}");
    d.stop();
}

#[test]
fn a_remote_raw_base_under_a_chain_of_overlays() {
    let s = Setup::new();
    let _server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
    let mid = s.create("mid", &uri);
    let d = Daemon::start(&s.path("a.sock"), &[&mid.display().to_string()]);
    qemu_io(&d.uri(), &["write -P 0x11 65536 65536"]);
    d.stop();
    let top = s.create("top", &s.p("mid.add-cow"));
    let info = addcow_ok(
        ".",
        &["info", "--backing-chain", &top.display().to_string()],
    );
    assert!(info.contains("layer 3:") && info.contains(&uri), "{info}");
    let d = Daemon::start(&s.path("b.sock"), &[&top.display().to_string()]);
    qemu_io(&d.uri(), &["write -P 0x22 131072 4096"]);
    let mut want = s.base.clone();
    want[65536..131072].fill(0x11);
    want[131072..135168].fill(0x22);
    write_file(&s.path("want.raw"), &want);
    assert_identical(&s.p("want.raw"), &d.uri());
    // allocation depth: top (1), mid (2), the remote base (3).
    let map = run("nbdinfo", &["--map=qemu:allocation-depth", &d.uri()]);
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect();
    // The remote base's hole is still supplied by it (depth 3), as a local raw base's is.
    assert_eq!(
        rows,
        vec![
            (0, 65536, 3),
            (65536, 65536, 2),
            (131072, 4096, 1),
            (135168, SIZE - 135168, 3)
        ],
        "{map}"
    );
    d.stop();
}

/// A hostile image server: a correct handshake (structured replies on), then a broken reply to
/// every read, by `mode`: `badmagic` (garbage where a reply header belongs), `pastchunk` (a data
/// chunk past the end of its read), `cookie` (a reply to a request never sent).
const HOSTILE_PY: &str = r#"
import os, socket, struct, sys, threading, time
path, mode, size = sys.argv[1], sys.argv[2], 8 << 20
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(16)
print("connected", flush=True)
def recvn(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b
def opt_reply(c, opt, typ, data=b""):
    c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, typ, len(data)) + data)
def handle(c):
    if mode == "hang":
        # Accepts and never says a word: a connect to it waits for its handshake timeout.
        # Says when it accepted, and when the client gave up (closed its end).
        print("accepted", flush=True)
        try:
            while c.recv(4096):
                pass
        except OSError:
            pass
        print("gone", flush=True)
        time.sleep(1e6)
    try:
        c.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))
        recvn(c, 4)
        while True:
            _, opt, ln = struct.unpack(">QII", recvn(c, 16))
            recvn(c, ln)
            if opt == 8:
                opt_reply(c, opt, 1)
            elif opt == 7:
                opt_reply(c, opt, 3, struct.pack(">HQH", 0, size, 1 | 2))
                opt_reply(c, opt, 1)
                break
            else:
                opt_reply(c, opt, 0x80000001)
        while True:
            _, _, typ, cookie, off, ln = struct.unpack(">IHHQQI", recvn(c, 28))
            if typ == 2:
                return
            if mode == "stall" and os.path.exists(path + ".stall"):
                # Stops reading; answers once, late, then never again.
                time.sleep(4)
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 8 + ln) + struct.pack(">Q", off) + b"\x5a" * ln)
                time.sleep(1e6)
            elif mode == "stall":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 8 + ln) + struct.pack(">Q", off) + b"\x5a" * ln)
            elif mode == "hugedata":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 8 + 16) + struct.pack(">Q", 0xFFFFFFFFFFFFFFF8) + bytes(16))
            elif mode == "hugehole":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 2, cookie, 12) + struct.pack(">QI", 0xFFFFFFFFFFFFFFF8, 16))
            elif mode == "badmagic":
                c.sendall(b"\xde\xad\xbe\xef" + bytes(16))
            elif mode == "pastchunk":
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 1, cookie, 8 + ln) + struct.pack(">Q", off + 512) + bytes(ln))
            else:
                c.sendall(struct.pack(">IHHQI", 0x668e33ef, 1, 0, cookie + 1000, 0))
    except (EOFError, OSError):
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

#[test]
fn hostile_image_servers_lose_their_connection_and_reads_fail_without_a_panic() {
    for mode in ["badmagic", "pastchunk", "cookie", "hugedata", "hugehole"] {
        let s = Setup::new();
        let sock = s.path("img.sock");
        let _server = HoldingClient::run(HOSTILE_PY, &[&sock.display().to_string(), mode]);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let ov = s.create("vm", &uri);
        let d = Daemon::start(
            &s.path("a.sock"),
            &["--base-timeout", "2", &ov.display().to_string()],
        );
        qemu_io(&d.uri(), &["write -P 0x66 0 4096"]);
        let out = run_raw("qemu-io", &["-f", "raw", "-c", "read 65536 4096", &d.uri()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("Input/output error"),
            "{mode}: EIO expected:\n{text}"
        );
        // The connection is dropped as broken (logged as the bad read fails).
        d.wait_log("broke the protocol");
        // The overlay's own data still reads.
        qemu_io(&d.uri(), &["read -P 0x66 0 4096"]);
        let log = d.stop();
        assert!(!log.contains("panicked"), "{mode}: {log}");
        assert_eq!(
            set_bitmap_bytes(&ov),
            1,
            "{mode}: only the written 4 KiB is set"
        );
    }
}

/// A server that stops answering (and reading) on a live connection: reads fail with EIO
/// within the base timeout, the connection is dropped (its late reply is dropped with it), and
/// once the server answers again reads work without restarting anything.
#[test]
fn a_server_that_stops_answering_fails_reads_in_time_and_is_reconnected() {
    let s = Setup::new();
    let sock = s.path("img.sock");
    let stall = PathBuf::from(format!("{}.stall", sock.display()));
    let _server = HoldingClient::run(HOSTILE_PY, &[&sock.display().to_string(), "stall"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let ov = s.create("vm", &uri);
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--base-timeout", "2", &ov.display().to_string()],
    );
    qemu_io(&d.uri(), &["read -P 0x5a 0 4096"]);
    std::fs::write(&stall, b"").expect("stall flag");
    let t0 = Instant::now();
    let out = run_raw("qemu-io", &["-f", "raw", "-c", "read 65536 4096", &d.uri()]);
    let took = t0.elapsed();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "EIO expected:\n{text}");
    assert!(
        took < Duration::from_secs(15),
        "failed after {took:?}, not within the 2 s timeout plus slack"
    );
    std::fs::remove_file(&stall).expect("unstall");
    // Back: reads work again on a new connection, without restarting the daemon.
    let t0 = Instant::now();
    loop {
        let out = run_raw(
            "qemu-io",
            &["-f", "raw", "-c", "read -P 0x5a 131072 4096", &d.uri()],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !text.contains("error") && !text.contains("fail") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "reads never worked again after the server came back:\n{text}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The late reply of the stalled connection came after its read was answered: dropped.
    std::thread::sleep(Duration::from_secs(3));
    qemu_io(&d.uri(), &["read -P 0x5a 196608 4096"]);
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// Closing a disk whose remote base's driver is inside a connect (the server accepts and never
/// handshakes; a connect waits up to 10 s) does not wait for that connect: the close signals
/// the driver and returns, and the core that closed it goes on serving other disks at once.
#[test]
fn closing_a_disk_does_not_wait_for_a_hanging_connect() {
    let s = Setup::new();
    let sock = s.path("img.sock");
    let server = HoldingClient::run(HOSTILE_PY, &[&sock.display().to_string(), "stall"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let ov = s.create("vm", &uri);
    let local = s.create("local", &s.p("base.raw"));
    let ctl = s.path("ctl.sock");
    let d = Daemon::start(
        &s.path("a.sock"),
        &[
            "--cores",
            "1",
            "--export",
            &format!("local={}", local.display()),
            "--control",
            &ctl.display().to_string(),
            "--allow-dir",
            &s.dir.path().display().to_string(),
            "--base-timeout",
            "30",
            "--export",
            &format!("vm={}", ov.display()),
        ],
    );
    qemu_io(&d.uri_of("vm"), &["read -P 0x5a 0 4096"]);
    // The server goes; one that never handshakes takes its place. The driver reconnects into
    // it and waits in the handshake.
    drop(server);
    let _ = std::fs::remove_file(&sock);
    let hang = HoldingClient::run(HOSTILE_PY, &[&sock.display().to_string(), "hang"]);
    // The driver reconnected into it and waits in the handshake (up to 10 s from now).
    hang.wait_for("accepted");
    let mut control = Control::connect(&ctl);
    control.ok(
        "export-del",
        serde_json::json!({"name": "vm", "mode": "hard"}),
    );
    // The one core closed the disk; it serves the other disk at once: while the driver is still
    // inside that connect (the server has not seen it give up). A core that waited for the
    // driver would serve this read only after the connect ended.
    qemu_io(&d.uri_of("local"), &["read 0 4096"]);
    assert!(
        !hang.output().contains("gone"),
        "the read of another disk was served only after the closed disk's driver gave up its \
         connect: the core waited for it ({})",
        hang.output()
    );
    drop(control);
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// A server that states block sizes (minimum 4096, maximum 64 KiB) and refuses anything else:
/// reads are aligned to its minimum and split to its maximum, so a 1 MiB client read at an odd
/// offset still succeeds.
#[test]
fn block_sizes_the_server_states_are_honoured() {
    let s = Setup::new();
    let _server = nbdkit(
        &s.path("img.sock"),
        &[
            "--filter=blocksize-policy",
            "file",
            &s.p("base.raw"),
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
    let info = run("nbdinfo", &[&uri]);
    assert!(info.contains("block_size_maximum: 65536"), "{info}");
    let ov = s.create("vm", &uri);
    let d = Daemon::start(&s.path("a.sock"), &[&ov.display().to_string()]);
    qemu_io(&d.uri(), &["read 100 1048576", "read 5000 3"]);
    assert_identical(&s.p("base.raw"), &d.uri());
    d.stop();
}

/// On reconnect, an export that vanished or whose size changed is a clear error and reads fail
/// with EIO at once; when the export is back as it was, reads work again.
#[test]
fn a_vanished_or_resized_export_fails_reads_until_it_is_back() {
    let s = Setup::new();
    let sock = s.path("img.sock");
    let base = s.path("base.raw");
    let mut server = qemu_nbd_named(&sock, &base, "golden");
    let uri = format!("nbd+unix:///golden?socket={}", sock.display());
    let ov = s.create("vm", &uri);
    // A long timeout: an unusable export fails reads at once, not by the timeout.
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--base-timeout", "100", &ov.display().to_string()],
    );
    qemu_io(&d.uri(), &["read 0 4096"]);
    let eio = |what: &str| {
        let t0 = Instant::now();
        let out = run_raw("qemu-io", &["-f", "raw", "-c", "read 4096 4096", &d.uri()]);
        assert!(
            t0.elapsed() < Duration::from_secs(50),
            "{what}: failed at once, not after the 100 s timeout"
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("Input/output error"),
            "{what}: EIO expected:\n{text}"
        );
    };
    // The export is gone: the server now serves another name.
    server.kill();
    let mut other = qemu_nbd_named(&sock, &base, "other");
    d.wait_log("not found on the server");
    eio("vanished export");
    other.kill();
    // The export is back with another size.
    let bigger = s.path("bigger.raw");
    std::fs::copy(&base, &bigger).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bigger)
        .and_then(|f| f.set_len(SIZE * 2))
        .expect("grow");
    let mut resized = qemu_nbd_named(&sock, &bigger, "golden");
    d.wait_log("size changed");
    eio("resized export");
    resized.kill();
    // Back as it was: reads work again.
    server.restart();
    d.wait_log("image server reconnected");
    assert_identical(&s.p("base.raw"), &d.uri());
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// Reads `[off, off + len)` of the disk at `uri` and compares it with the same range of `ref`;
/// prints `connected`, then `same` or `differs`.
const COMPARE_PY: &str = r#"
import sys, nbd
uri, ref, off, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
print("connected", flush=True)
want = open(ref, "rb").read()[off:off + n]
print("same" if h.pread(n, off) == want else "differs", flush=True)
"#;

/// Copy-on-read: what a VM read from the remote base is in its raw image afterwards (bits set,
/// committed), and reads the same with the image server gone; per export through export-add.
#[test]
fn copy_on_read_moves_what_was_read_to_the_local_disk() {
    let s = Setup::new();
    let mut server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let a = s.create("a", &server.uri());
    let b = s.create("b", &server.uri());
    let c = s.create("c", &server.uri());
    let ctl = s.path("ctl.sock");
    let d = Daemon::start(
        &s.path("a.sock"),
        &[
            "--copy-on-read",
            "--control",
            &ctl.display().to_string(),
            "--allow-dir",
            &s.dir.path().display().to_string(),
            "--export",
            &format!("a={}", a.display()),
        ],
    );
    let mut control = Control::connect(&ctl);
    // The daemon's default (on), and an export that turns it off.
    control.ok("export-add", serde_json::json!({"name": "b", "overlay": b}));
    control.ok(
        "export-add",
        serde_json::json!({"name": "c", "overlay": c, "copy_on_read": false}),
    );
    for e in ["a", "b", "c"] {
        qemu_io(&d.uri_of(e), &["read 0 1048576", "read 2097252 100"]);
    }
    // A guest write after the copy wins: it is what reads back.
    qemu_io(&d.uri_of("a"), &["write -P 0x42 4096 4096"]);
    // Copy-on-read runs after the read is answered: wait until it is done everywhere.
    let allocated = |control: &mut Control, name: &str| {
        let list = control.ok("query-exports", serde_json::json!({}));
        list.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name))
            .and_then(|e| e["allocated_bytes"].as_u64())
            .unwrap_or(0)
    };
    // (1 MiB, and the small read's unit: a sector, or the raw image's O_DIRECT unit.)
    wait_until("copy-on-read of a and b done", || {
        allocated(&mut control, "a") > 1048576 && allocated(&mut control, "b") > 1048576
    });
    // The copied range serves with the image server gone.
    server.kill();
    let mut want = s.base.clone();
    want[4096..8192].fill(0x42);
    write_file(&s.path("want.raw"), &want);
    let cmp = HoldingClient::run(
        COMPARE_PY,
        &[&d.uri_of("a"), &s.p("want.raw"), "0", "1048576"],
    );
    cmp.wait_for("same");
    drop(cmp);
    drop(control);
    d.stop();
    // 1 MiB = 256 bitmap bytes, all set; plus the unit around the small read (one byte).
    for ov in [&a, &b] {
        let bm = std::fs::read(ov).expect("read overlay");
        assert!(
            bm[2560..2560 + 256].iter().all(|&x| x == 0xff),
            "{}",
            ov.display()
        );
        assert_eq!(set_bitmap_bytes(ov), 257, "{}", ov.display());
    }
    assert_eq!(
        set_bitmap_bytes(&c),
        0,
        "copy_on_read: false copies nothing"
    );
}

/// `nbd://HOST:PORT/NAME` on loopback TCP works like a Unix socket.
#[test]
fn a_tcp_uri_base_on_loopback() {
    let s = Setup::new();
    let port = free_port();
    let _tcp = ImageServer::nbdkit(Listen::Tcp(port), &["file", &s.p("base.raw")]);
    let uri = format!("nbd://127.0.0.1:{port}/");
    let ov = s.create("vm", &uri);
    let d = Daemon::start(&s.path("a.sock"), &[&ov.display().to_string()]);
    assert_identical(&s.p("base.raw"), &d.uri());
    d.stop();
}

/// An image server that is down when `export-snapshot` or `export-resize` is called: the call
/// fails (opening the new disk needs the server) with an error that says the export still
/// serves its disk, and the export keeps serving its own data and taking writes, with nothing
/// left behind; once the server is back, both calls succeed.
#[test]
fn an_image_server_outage_fails_a_snapshot_or_resize_and_the_export_keeps_serving() {
    let s = Setup::new();
    let mut server = nbdkit(&s.path("img.sock"), &["file", &s.p("base.raw")]);
    let ov = s.create("vm", &server.uri());
    let control = s.path("ctl.sock");
    let d = Daemon::start(
        &s.path("a.sock"),
        &[
            "--control",
            &control.display().to_string(),
            "--allow-dir",
            &s.dir.path().display().to_string(),
            &ov.display().to_string(),
        ],
    );
    let uri = d.uri();
    qemu_io(&uri, &["write -P 0x33 0 64k"]);
    server.kill();
    let mut c = Control::connect(&control);
    let snap = s.path("vm-1.add-cow");
    let e = c
        .call(
            "export-snapshot",
            serde_json::json!({"name": "", "overlay": snap}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["class"], "snapshot-failed", "{e}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.contains("still serves"), "{e}");
    assert!(!snap.exists() && !s.path("vm-1.raw").exists(), "left files");
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 64k",
            "write -P 0x44 64k 64k",
            "read -P 0x44 64k 64k",
            "flush",
        ],
    );
    let e = c
        .call(
            "export-resize",
            serde_json::json!({"name": "", "size": 2 * SIZE}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["class"], "resize-failed", "{e}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(msg.contains("still serves"), "{e}");
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 64k",
            "read -P 0x44 64k 64k",
            "write -P 0x55 128k 64k",
            "flush",
        ],
    );
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), SIZE.to_string());
    // The server is back: both go through, and every byte written is there.
    server.restart();
    c.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    c.ok(
        "export-resize",
        serde_json::json!({"name": "", "size": 2 * SIZE}),
    );
    assert_eq!(
        run("nbdinfo", &["--size", &uri]).trim(),
        (2 * SIZE).to_string()
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 64k",
            "read -P 0x44 64k 64k",
            "read -P 0x55 128k 64k",
        ],
    );
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// The outcome of a read through `qemu-io`: its output, and whether it failed with EIO.
fn qemu_io_eio(uri: &str, cmd: &str) -> (String, bool) {
    let out = run_raw("qemu-io", &["-f", "raw", "-c", cmd, uri]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let eio = text.contains("Input/output error");
    (text, eio)
}

/// A server whose reply to a read covers some bytes twice and others never, while its chunk
/// lengths still add up to the read's length: the read fails with EIO (never answered with the
/// gap's zeros), and copy-on-read copies nothing up and sets no bit.
#[test]
fn reply_chunks_that_overlap_fail_the_read_and_copy_nothing_up() {
    let s = Setup::new();
    let mut script = Script::honest(s.base.clone());
    script.on_read = Box::new(|r: &mut Reply<'_>, q: Request| {
        let (off, len) = (q.offset, u64::from(q.len));
        if len < 2048 {
            return scripted::honest_read(r, q);
        }
        // `len / 2 + 512` bytes, then `len / 2 - 512` bytes from the middle: they add up to
        // `len`, the middle 512 bytes come twice and the last 512 never.
        let half = len / 2;
        r.data(0, q.cookie, off, half + 512)?;
        r.data(scripted::DONE, q.cookie, off + half, half - 512)
    });
    let server = ScriptedServer::start(&s.path("img.sock"), script);
    let ov = s.path("vm.add-cow");
    addcow_ok(
        ".",
        &[
            "create",
            "--size",
            "8M",
            "-b",
            &server.uri(),
            &ov.display().to_string(),
        ],
    );
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--copy-on-read", &ov.display().to_string()],
    );
    for cmd in ["read 0 4096", "read 1048576 65536"] {
        let (text, eio) = qemu_io_eio(&d.uri(), cmd);
        assert!(eio, "{cmd}: EIO expected, not the gap's zeros:\n{text}");
    }
    assert!(d.log().contains("overlaps"), "{}", d.log());
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        set_bitmap_bytes(&ov),
        0,
        "copy-on-read copied a bad reply up"
    );
}

/// At open the base's holes are asked with block status. A server that answers without end
/// (chunks for our context, or for another one, never done) or never answers is given up on
/// within the base timeout, without keeping what it sends: the disk opens, everything not known
/// to be a hole is read from the server (right bytes), and the daemon's memory stays small.
#[test]
fn block_status_that_never_ends_or_never_comes_is_bounded_at_open() {
    // The daemon's memory after the same reads from an honest server, for comparison.
    let mut baseline = 0;
    for mode in ["honest", "endless", "other-context", "silent"] {
        let s = Setup::new();
        let mut script = Script::honest(s.base.clone());
        if mode != "honest" {
            script.on_block_status = Box::new(move |r: &mut Reply<'_>, q: Request| {
                if mode == "silent" {
                    return Ok(());
                }
                let ctx = if mode == "endless" {
                    scripted::ALLOCATION_CTX
                } else {
                    7
                };
                // 64 chunks of 1 MiB (128 Ki extents each), none of them the last.
                let extents = vec![(512u32, 0u32); 131_071];
                for _ in 0..64 {
                    r.status(0, q.cookie, ctx, &extents)?;
                }
                Ok(())
            });
        }
        let server = ScriptedServer::start(&s.path("img.sock"), script);
        let ov = s.path("vm.add-cow");
        let ovs = ov.display().to_string();
        addcow_ok(".", &["create", "--size", "8M", "-b", &server.uri(), &ovs]);
        let d = Daemon::start(&s.path("a.sock"), &["--base-timeout", "3", &ovs]);
        assert_eq!(
            d.log().contains("block status of the remote base failed"),
            mode != "honest",
            "{mode}: {}",
            d.log()
        );
        assert_identical(&s.p("base.raw"), &d.uri());
        let rss = rss_kib(d.pid());
        if mode == "honest" {
            baseline = rss;
        }
        assert!(
            rss < baseline + 32 * 1024,
            "{mode}: the daemon holds {rss} KiB after the block status flood ({baseline} KiB \
             after an honest server's)"
        );
        let log = d.stop();
        assert!(!log.contains("panicked"), "{mode}: {log}");
    }
}

/// A block-status query that fails leaves the rest of its reply unread in the socket (here the
/// server sends the rest late, when the next request comes): that connection must not be used
/// for reads, whose replies it would mix up with the stray ones.
#[test]
fn a_failed_block_status_query_does_not_leave_its_connection_in_use() {
    let s = Setup::new();
    let stray: std::sync::Arc<std::sync::Mutex<Option<(usize, u64)>>> = Default::default();
    let mut script = Script::honest(s.base.clone());
    let st = stray.clone();
    script.on_block_status = Box::new(move |r: &mut Reply<'_>, q: Request| {
        // An error chunk, not the last one: the reply goes on.
        r.error(0, q.cookie, 5)?;
        *st.lock().unwrap() = Some((q.conn, q.cookie));
        Ok(())
    });
    let st = stray.clone();
    script.on_read = Box::new(move |r: &mut Reply<'_>, q: Request| {
        // The block-status reply's last chunk, sent before this read's answer.
        let pending = st.lock().unwrap().take_if(|(c, _)| *c == q.conn);
        if let Some((_, cookie)) = pending {
            r.chunk(scripted::DONE, scripted::NONE, cookie, &[])?;
        }
        scripted::honest_read(r, q)
    });
    let server = ScriptedServer::start(&s.path("img.sock"), script);
    let ov = s.path("vm.add-cow");
    let ovs = ov.display().to_string();
    addcow_ok(".", &["create", "--size", "8M", "-b", &server.uri(), &ovs]);
    let d = Daemon::start(&s.path("a.sock"), &["--base-timeout", "5", &ovs]);
    assert_identical(&s.p("base.raw"), &d.uri());
    let log = d.stop();
    assert!(!log.contains("remote base read failed"), "{log}");
    assert!(!log.contains("broke the protocol"), "{log}");
}

/// Servers whose maximum block size is less than four minimum blocks (here 8 KiB over 4 KiB,
/// and 4 KiB over 4 KiB) and that refuse any request breaking their sizes: unaligned reads are
/// cut into requests that each respect the minimum and the maximum.
#[test]
fn unaligned_reads_respect_a_small_maximum_block() {
    for (min, max) in [("4096", "8192"), ("4096", "4096"), ("512", "1024")] {
        let s = Setup::new();
        let _server = nbdkit(
            &s.path("img.sock"),
            &[
                "--filter=blocksize-policy",
                "file",
                &s.p("base.raw"),
                &format!("blocksize-minimum={min}"),
                &format!("blocksize-preferred={min}"),
                &format!("blocksize-maximum={max}"),
                "blocksize-error-policy=error",
            ],
        );
        let uri = format!("nbd+unix:///?socket={}", s.p("img.sock"));
        let ov = s.create("vm", &uri);
        let d = Daemon::start(&s.path("a.sock"), &[&ov.display().to_string()]);
        for cmd in [
            "read 100 8192",
            "read 5000 3",
            "read 4095 4098",
            "read 512 65536",
        ] {
            let (text, eio) = qemu_io_eio(&d.uri(), cmd);
            assert!(!eio, "min {min} max {max}, {cmd}:\n{text}");
        }
        assert_identical(&s.p("base.raw"), &d.uri());
        let log = d.stop();
        assert!(
            !log.contains("remote base read failed"),
            "min {min} max {max}: {log}"
        );
    }
}

/// A planned restart of the image server, as an operator does it: reads of clear sectors run
/// while the server gets SIGTERM, exits, is started again, and the reads go on. Every read
/// succeeds with the right bytes (the guest sees a pause), and the server exits on SIGTERM:
/// addcow lets a server that is going away go (on `ESHUTDOWN` on a busy connection, and on an
/// idle one through its probe: with two cores, one connection to the server sits idle).
///
/// Synchronised on what happened, never on sleeps: reads went through before SIGTERM and
/// after the restart (counted), the daemon saw the server gone and back (its log), and for
/// nbdkit, which answers `ESHUTDOWN`, every connection took the shutting-down path.
fn restart_during_reads(kind: &str, cores: &str) {
    let s = Setup::new();
    let sock = s.path("img.sock");
    let base = s.path("base.raw");
    let start = || match kind {
        "nbdkit" => nbdkit(&sock, &["file", &s.p("base.raw")]),
        "qemu-nbd" => qemu_nbd_named(&sock, &base, "base"),
        _ => qsd(&sock, &base, "base"),
    };
    let mut server = start();
    let uri = format!("nbd+unix:///base?socket={}", sock.display());
    let ov = s.create("vm", &uri);
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--cores", cores, &ov.display().to_string()],
    );
    d.wait_log("remote base connected");
    assert!(
        d.log().contains(&format!("conns={cores}")),
        "{kind}: {}",
        d.log()
    );
    let stop = s.p("reads.stop");
    let client = HoldingClient::run(READ_LOOP_PY, &[&d.uri(), &s.p("base.raw"), "900", &stop]);
    // Reads of the base go through the server before it is told to go.
    let before = wait_reads(&client, 20, &d);
    let unreachable = count(&d.log(), "image server unreachable");
    let reconnected = count(&d.log(), "image server reconnected");
    let exited = server.terminate(Duration::from_secs(60));
    assert!(
        exited,
        "{kind} did not exit within 60 s of SIGTERM: addcow held its connections open\n{}",
        d.log()
    );
    // The daemon found the server gone (a connect failed while it was down).
    wait_log_more(&d, "image server unreachable", unreachable);
    let log = d.log();
    if kind == "nbdkit" {
        // nbdkit answers ESHUTDOWN: each connection, the busy one and the idle one alike,
        // was closed on the shutting-down path (not as a lost connection, not by a timeout).
        for conn in 0..cores.parse::<usize>().expect("cores") {
            assert!(
                log.lines()
                    .any(|l| l.contains("the image server is shutting down")
                        && l.contains(&format!("conn={conn}"))),
                "{kind}: connection {conn} never took the ESHUTDOWN path:\n{log}"
            );
        }
    }
    let during = reads_done(&client);
    server.restart();
    wait_log_more(&d, "image server reconnected", reconnected);
    // Reads go on through the restarted server.
    let after = wait_reads(&client, during + 20, &d);
    std::fs::write(&stop, b"").expect("stop the reads");
    client.wait_for("end: ");
    let out = client.output();
    assert!(out.contains("end: ok"), "{kind}: {out}\n{}", d.log());
    assert!(before >= 20 && after >= during + 20, "{kind}: {out}");
    let log = d.stop();
    assert!(!log.contains("remote base read failed"), "{kind}: {log}");
    assert!(
        !log.contains("did not answer a read in time"),
        "{kind}: {log}"
    );
    assert!(!log.contains("panicked"), "{kind}: {log}");
}

#[test]
#[ignore = "heavy: restarts a real image server under reads (scripts/test.sh runs it)"]
fn planned_restart_of_nbdkit_during_reads() {
    restart_during_reads("nbdkit", "2");
}

/// One connection, busy: nbdkit answers its reads with `ESHUTDOWN` after SIGTERM.
#[test]
#[ignore = "heavy: restarts a real image server under reads (scripts/test.sh runs it)"]
fn planned_restart_of_nbdkit_during_reads_on_one_connection() {
    restart_during_reads("nbdkit", "1");
}

#[test]
#[ignore = "heavy: restarts a real image server under reads (scripts/test.sh runs it)"]
fn planned_restart_of_qemu_nbd_during_reads() {
    restart_during_reads("qemu-nbd", "2");
}

#[test]
#[ignore = "heavy: restarts a real image server under reads (scripts/test.sh runs it)"]
fn planned_restart_of_qemu_storage_daemon_during_reads() {
    restart_during_reads("qsd", "2");
}

/// A server that trickles its handshake a byte at a time (each byte well within the connect
/// timeout of the one before, the whole handshake minutes long) is given up on once the whole
/// handshake passes the 10 s connect timeout: `create` (which asks the server the export's
/// size) fails with an error naming the server, never waits for the handshake to end.
#[test]
fn a_handshake_trickled_a_byte_at_a_time_is_bounded_by_the_connect_timeout() {
    let s = Setup::new();
    let mut script = Script::honest(s.base.clone());
    script.handshake = Box::new(|_| Handshake::Trickle(Duration::from_millis(500)));
    let server = ScriptedServer::start(&s.path("img.sock"), script);
    let ov = s.path("vm.add-cow");
    let t0 = Instant::now();
    let out = addcow(
        ".",
        &["create", "-b", &server.uri(), &ov.display().to_string()],
    );
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "create went through a {took:?} handshake"
    );
    assert!(
        err.contains("img.sock"),
        "the error names the server: {err}"
    );
    // A bound (4 times the connect timeout), not a speed claim: the handshake takes ~75 s.
    assert!(
        took < Duration::from_secs(40),
        "gave up after {took:?}, not by the 10 s connect timeout: {err}"
    );
}

/// Reads of clear sectors wait for the image server no longer than the base timeout while the
/// connection's driver sits in a connect to a server that never completes its handshake
/// (silent, or trickling it): they fail with EIO by about `--base-timeout` (here 2 s), not once
/// the connect gives up (10 s), and the overlay's own data still reads.
#[test]
fn reads_fail_by_the_base_timeout_while_the_server_never_handshakes() {
    for how in [
        Handshake::Silent,
        Handshake::Trickle(Duration::from_millis(500)),
    ] {
        let s = Setup::new();
        let sock = s.path("img.sock");
        let server = ScriptedServer::start(&sock, Script::honest(s.base.clone()));
        let ov = s.path("vm.add-cow");
        let ovs = ov.display().to_string();
        addcow_ok(".", &["create", "--size", "8M", "-b", &server.uri(), &ovs]);
        let d = Daemon::start(
            &s.path("a.sock"),
            &["--cores", "1", "--base-timeout", "2", &ovs],
        );
        qemu_io(&d.uri(), &["write -P 0x66 0 4096", "read 65536 4096"]);
        // The server goes (its connections closed); one that never handshakes takes its place,
        // and the driver reconnects into it.
        drop(server);
        let mut script = Script::honest(s.base.clone());
        script.handshake = Box::new(move |_| how);
        let hang = ScriptedServer::start(&sock, script);
        wait_until("the driver connects to the new server", || {
            hang.connections.load(std::sync::atomic::Ordering::SeqCst) >= 1
        });
        let t0 = Instant::now();
        let (text, eio) = qemu_io_eio(&d.uri(), "read 1048576 4096");
        let took = t0.elapsed();
        assert!(eio, "{how:?}: EIO expected:\n{text}\n{}", d.log());
        // A bound (4 times the base timeout), not a speed claim.
        assert!(
            took < Duration::from_secs(8),
            "{how:?}: the read failed after {took:?}, not by the 2 s base timeout\n{}",
            d.log()
        );
        qemu_io(&d.uri(), &["read -P 0x66 0 4096"]);
        let log = d.stop();
        assert!(!log.contains("panicked"), "{how:?}: {log}");
    }
}

/// Opening a disk on a remote base is bounded by one 10 s deadline, whatever the server does:
/// here it never answers the holes query, and the second connection (the server allows one per
/// core) never handshakes. The open neither waits the base timeout (30 s) for the query nor
/// waits for (or fails on) the second connection: that one connects in its own driver, and
/// every byte reads right once it has.
#[test]
fn opening_a_remote_base_is_bounded_by_one_deadline() {
    let s = Setup::new();
    let mut script = Script::honest(s.base.clone());
    script.multi_conn = true;
    // The open's query goes unanswered (the probes of idle connections, one extent each, are
    // answered).
    script.on_block_status = Box::new(|r: &mut Reply<'_>, q: Request| {
        if q.flags & scripted::REQ_ONE != 0 {
            scripted::honest_status(r, q)
        } else {
            Ok(())
        }
    });
    script.handshake = Box::new(|n| {
        if n == 1 {
            Handshake::Silent
        } else {
            Handshake::Honest
        }
    });
    let server = ScriptedServer::start(&s.path("img.sock"), script);
    let ov = s.path("vm.add-cow");
    let ovs = ov.display().to_string();
    addcow_ok(".", &["create", "--size", "8M", "-b", &server.uri(), &ovs]);
    let before = server.connections.load(std::sync::atomic::Ordering::SeqCst);
    let t0 = Instant::now();
    let d = Daemon::start(
        &s.path("a.sock"),
        &["--cores", "2", "--base-timeout", "30", &ovs],
    );
    let took = t0.elapsed();
    assert!(before <= 1, "create made {before} connections");
    let log = d.log();
    assert!(log.contains("conns=2"), "{log}");
    assert!(
        log.contains("block status of the remote base failed"),
        "{log}"
    );
    // A bound (2.5 times the deadline), not a speed claim: the query alone used to wait 30 s.
    assert!(
        took < Duration::from_secs(25),
        "the open took {took:?}, not bounded by its 10 s deadline:\n{log}"
    );
    assert_identical(&s.p("base.raw"), &d.uri());
    let log = d.stop();
    assert!(!log.contains("remote base read failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// An idle connection is probed (so that a server going away can be let go) with a
/// block-status query of one extent when `base:allocation` was agreed, never a read of data
/// (which a server in front of object storage turns into a GET); without `base:allocation`,
/// with a small read. The probe's answer is taken in without dropping the connection.
#[test]
fn idle_connections_are_probed_with_one_extent_of_block_status() {
    for allocation in [true, false] {
        let s = Setup::new();
        let seen: std::sync::Arc<std::sync::Mutex<Vec<(u16, Request)>>> = Default::default();
        let mut script = Script::honest(s.base.clone());
        script.allocation = allocation;
        let log = seen.clone();
        script.on_read = Box::new(move |r: &mut Reply<'_>, q: Request| {
            log.lock().unwrap().push((0, q));
            scripted::honest_read(r, q)
        });
        let log = seen.clone();
        script.on_block_status = Box::new(move |r: &mut Reply<'_>, q: Request| {
            log.lock().unwrap().push((7, q));
            scripted::honest_status(r, q)
        });
        let server = ScriptedServer::start(&s.path("img.sock"), script);
        let ov = s.path("vm.add-cow");
        let ovs = ov.display().to_string();
        addcow_ok(".", &["create", "--size", "8M", "-b", &server.uri(), &ovs]);
        let d = Daemon::start(&s.path("a.sock"), &["--cores", "1", &ovs]);
        d.wait_log("remote base connected");
        let conns = server.connections.load(std::sync::atomic::Ordering::SeqCst);
        // Two probes, nothing else asked by anyone.
        let probes = |want: usize| {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(kind, q)| {
                    if allocation {
                        *kind == 7 && q.flags & scripted::REQ_ONE != 0
                    } else {
                        *kind == 0
                    }
                })
                .count()
                >= want
        };
        wait_until("two probes of the idle connection", || probes(2));
        let got = seen.lock().unwrap().clone();
        for (kind, q) in &got {
            if *kind == 7 && q.flags & scripted::REQ_ONE == 0 {
                // The open's holes query.
                continue;
            }
            assert!(q.offset == 0 && q.len <= 4096, "{allocation}: {got:?}");
            if allocation {
                assert_eq!(*kind, 7, "{allocation}: a probe read data: {got:?}");
            }
        }
        // Both probes came on the connection the open made: none of them dropped it.
        assert_eq!(
            server.connections.load(std::sync::atomic::Ordering::SeqCst),
            conns,
            "{allocation}: {}",
            d.log()
        );
        let log = d.stop();
        assert!(!log.contains("broke the protocol"), "{allocation}: {log}");
        assert!(!log.contains("panicked"), "{allocation}: {log}");
    }
}
