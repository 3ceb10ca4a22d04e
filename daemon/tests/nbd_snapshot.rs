//! Live snapshots (`export-snapshot`) with a real client connected across them: a python3-libnbd
//! client keeps reading (and checking) while the export switches to a new overlay, then writes
//! on the same connection. The old overlay must equal, byte for byte (`qemu-img compare`), a copy
//! of the export taken just before the snapshot, and the new writes must be only in the new
//! overlay. A SIGKILL right after the snapshot reply, then a restart on the new overlay, must
//! lose nothing. Refusals: an existing target, a folder outside `--allow-dir`, a read-only
//! export, a relative path, an unknown export.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use addcow_daemon_testkit::{assert_identical, qemu_io, run, wait_until, Control, Daemon};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

/// A python3-libnbd client on one connection, driven line by line.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const CLIENT: &str = r#"
import nbd, sys, threading
h = nbd.NBD()
h.connect_uri(sys.argv[1])
ref = b''
stop = threading.Event()
stats = {'reads': 0, 'bad': 0, 'errors': 0}
def reader():
    off = 0
    while not stop.is_set():
        n = 65536 + (off % 7) * 512
        if off + n > len(ref):
            off = 0
        try:
            got = h.pread(n, off)
            if got != ref[off:off + n]:
                stats['bad'] += 1
        except Exception as e:
            stats['errors'] += 1
            print('read error', e, file=sys.stderr, flush=True)
        stats['reads'] += 1
        off += 12345
t = None
for line in sys.stdin:
    w = line.split()
    if w[0] == 'write':
        off, n, b = int(w[1]), int(w[2]), int(w[3])
        h.pwrite(bytes([b]) * n, off)
        print('ok', flush=True)
    elif w[0] == 'flush':
        h.flush()
        print('ok', flush=True)
    elif w[0] == 'readloop':
        ref = open(sys.argv[2], 'rb').read()
        t = threading.Thread(target=reader)
        t.start()
        while stats['reads'] < 20:
            pass
        print('ok', flush=True)
    elif w[0] == 'stop':
        stop.set()
        t.join()
        print('reads', stats['reads'], 'bad', stats['bad'], 'errors', stats['errors'], flush=True)
    elif w[0] == 'fastzero':
        try:
            h.zero(int(w[2]), int(w[1]), nbd.CMD_FLAG_FAST_ZERO)
            print('ok', flush=True)
        except nbd.Error as e:
            print('err', e.errno, flush=True)
    elif w[0] == 'quit':
        h.shutdown()
        print('ok', flush=True)
        break
"#;

impl Client {
    fn start(uri: &str, reference: &Path) -> Client {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT, uri, reference.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with the nbd module (python3-libnbd; scripts/test.sh installs it)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client {
            child,
            stdin,
            stdout,
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        assert!(!out.is_empty(), "client died on {line:?}");
        out.trim().to_string()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    overlay: PathBuf,
    control: PathBuf,
    sock: PathBuf,
    /// What the disk reads as (kept by the test).
    model: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8 + 1).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let overlay = dir.path().join("vm.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        size: Some(SIZE),
        ..Default::default()
    })
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    model[..base_bytes.len()].copy_from_slice(&base_bytes);
    Setup {
        control: dir.path().join("ctl.sock"),
        sock: dir.path().join("s.sock"),
        dir,
        overlay,
        model,
    }
}

fn start(s: &Setup, overlay: &Path) -> Daemon {
    Daemon::start(
        &s.sock,
        &[
            "--control",
            s.control.to_str().unwrap(),
            "--allow-dir",
            s.dir.path().to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    )
}

fn write(c: &mut Client, model: &mut [u8], off: u64, len: u64, byte: u8) {
    assert_eq!(c.cmd(&format!("write {off} {len} {byte}")), "ok");
    model[off as usize..(off + len) as usize].fill(byte);
}

/// qemu-img compare of a raw file with an export; panics unless identical.
fn same(raw: &Path, uri: &str) {
    assert_identical(raw.to_str().unwrap(), uri);
}

#[test]
fn a_client_stays_connected_across_a_live_snapshot() {
    let mut s = setup();
    let d = start(&s, &s.overlay);
    let uri = d.uri();
    let mut c = Client::start(&uri, &s.dir.path().join("ref.raw"));
    // Before: writes (partial sectors too) over the base and past its end, no flush.
    let mut model = std::mem::take(&mut s.model);
    // The reference file the reader checks is written before the client starts reading.
    for (off, len, b) in [
        (0, 4096, 0x11),
        (100_000, 777, 0x22),
        (3 * MIB + 5, 70_000, 0x33),
    ] {
        write(&mut c, &mut model, off, len, b);
    }
    std::fs::write(s.dir.path().join("ref.raw"), &model).unwrap();
    // The copy the test takes of the content at snapshot time (a second client).
    let at_snapshot = s.dir.path().join("at-snapshot.raw");
    run("nbdcopy", &[&uri, at_snapshot.to_str().unwrap()]);
    assert!(std::fs::read(&at_snapshot).unwrap() == model);

    // Reads in flight on the connection while the export switches (checked against
    // `ref.raw`, the disk's content).
    assert_eq!(c.cmd("readloop"), "ok");
    let mut ctl = Control::connect(&s.control);
    let snap = s.dir.path().join("vm-1.add-cow");
    let r = ctl.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    assert_eq!(r["overlay"], serde_json::json!(snap), "{r}");
    assert_eq!(r["base"], serde_json::json!(s.overlay), "{r}");
    let n = ctl.notification("export-snapshot");
    assert_eq!(n["params"]["overlay"], serde_json::json!(snap), "{n}");
    let stats = c.cmd("stop");
    let f: Vec<&str> = stats.split_whitespace().collect();
    assert_eq!(
        (f[2], f[3], f[4], f[5]),
        ("bad", "0", "errors", "0"),
        "{stats}"
    );
    assert!(f[1].parse::<u64>().unwrap() >= 20, "{stats}");
    // After: writes on the same connection go to the new overlay.
    let before = model.clone();
    for (off, len, b) in [
        (2048, 1000, 0x44),
        (100_000, 100, 0x55),
        (3 * MIB + MIB / 2, 8192, 0x66),
    ] {
        write(&mut c, &mut model, off, len, b);
    }
    assert_eq!(c.cmd("flush"), "ok");
    assert_eq!(c.cmd("quit"), "ok");
    drop(c);
    let info = ctl.ok("query-exports", serde_json::json!({}));
    assert_eq!(info[0]["overlay"], serde_json::json!(snap), "{info}");
    // The whole disk now: what was written before and after.
    let now = s.dir.path().join("now.raw");
    std::fs::write(&now, &model).unwrap();
    same(&now, &uri);
    // The old overlay is share-locked as the new one's base: it cannot be opened for writing.
    let e = addcow_engine::format::Overlay::open(&s.overlay, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), &addcow_engine::ErrorKind::Locked, "{e}");
    d.stop();

    // The old overlay, alone (read-only), is the point-in-time image.
    let d = Daemon::start(&s.sock, &["--read-only", s.overlay.to_str().unwrap()]);
    same(&at_snapshot, &d.uri());
    d.stop();
    assert!(std::fs::read(&at_snapshot).unwrap() == before);
    // The new overlay holds only what was written after (its own bits), over the old one.
    let out = run("qemu-img", &["--version"]);
    assert!(out.contains("qemu-img"));
    let map = Command::new(addcow_daemon_testkit::addcow_bin())
        .args(["map", "--json", snap.to_str().unwrap()])
        .output()
        .unwrap();
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    let own: Vec<(u64, u64)> = runs
        .iter()
        .filter(|r| r["depth"] == 0 && r["present"] == true)
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        own,
        vec![(2048, 1024), (99_840, 512), (3 * MIB + MIB / 2, 8192)],
        "the new overlay's own sectors: {runs:?}"
    );
    // Served, the new overlay is a chain: its writes at depth 1, the old overlay's at 2, the
    // base's at 3, zeros past the base at 0.
    let d = Daemon::start(&s.sock, &["--read-only", snap.to_str().unwrap()]);
    let out = run("nbdinfo", &["--map=qemu:allocation-depth", &d.uri()]);
    let depth_at = |off: u64| -> u64 {
        out.lines()
            .filter_map(|l| {
                let f: Vec<u64> = l
                    .split_whitespace()
                    .take(3)
                    .filter_map(|w| w.parse().ok())
                    .collect();
                (f.len() == 3).then(|| (f[0], f[1], f[2]))
            })
            .find(|&(o, l, _)| o <= off && off < o + l)
            .map(|r| r.2)
            .unwrap_or_else(|| panic!("no extent at {off}: {out}"))
    };
    assert_eq!(depth_at(2048), 1, "{out}");
    assert_eq!(depth_at(0), 2, "{out}");
    assert_eq!(depth_at(MIB), 3, "{out}");
    assert_eq!(depth_at(3 * MIB + 1024), 2, "{out}");
    assert_eq!(depth_at(3 * MIB + 100 * 1024), 0, "{out}");
    assert_eq!(depth_at(SIZE - 512), 0, "{out}");
    d.stop();
}

#[test]
fn sigkill_right_after_the_snapshot_reply_loses_nothing() {
    let mut s = setup();
    let mut d = start(&s, &s.overlay);
    let uri = d.uri();
    let mut model = std::mem::take(&mut s.model);
    let mut c = Client::start(&uri, &s.overlay);
    // Acknowledged, never flushed by the client: the snapshot's commit makes them durable.
    for (off, len, b) in [
        (512, 3000, 0x71),
        (MIB + 1, 65536, 0x72),
        (3 * MIB + 100, 1, 0x73),
    ] {
        write(&mut c, &mut model, off, len, b);
    }
    let mut ctl = Control::connect(&s.control);
    let snap = s.dir.path().join("vm-1.add-cow");
    ctl.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(c);
    let d = start(&s, &snap);
    let want = s.dir.path().join("want.raw");
    std::fs::write(&want, &model).unwrap();
    same(&want, &d.uri());
    d.stop();
}

#[test]
fn snapshots_are_refused_with_clear_errors() {
    let s = setup();
    let d = start(&s, &s.overlay);
    let mut ctl = Control::connect(&s.control);
    let call = |ctl: &mut Control, name: &str, overlay: &Path| {
        ctl.call(
            "export-snapshot",
            serde_json::json!({"name": name, "overlay": overlay}),
        )
        .unwrap_err()
    };
    // The target exists (or its raw image does).
    let taken = s.dir.path().join("taken.add-cow");
    std::fs::write(&taken, b"x").unwrap();
    let e = call(&mut ctl, "", &taken);
    assert_eq!(e["data"]["class"], "exists", "{e}");
    std::fs::write(s.dir.path().join("img.raw"), b"x").unwrap();
    let e = call(&mut ctl, "", &s.dir.path().join("img.add-cow"));
    assert_eq!(e["data"]["class"], "exists", "{e}");
    assert!(e["message"].as_str().unwrap().contains("img.raw"), "{e}");
    // Outside the allowed folders; relative.
    let other = tempfile::tempdir().unwrap();
    let e = call(&mut ctl, "", &other.path().join("s.add-cow"));
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("--allow-dir"),
        "{e}"
    );
    assert!(!other.path().join("s.add-cow").exists());
    let e = call(&mut ctl, "", Path::new("rel.add-cow"));
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    // No such export.
    let e = call(&mut ctl, "nope", &s.dir.path().join("n.add-cow"));
    assert_eq!(e["data"]["class"], "no-such-export", "{e}");
    // A read-only export.
    let ro = s.dir.path().join("ro.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: ro.clone(),
        size: Some(MIB),
        ..Default::default()
    })
    .unwrap();
    ctl.ok(
        "export-add",
        serde_json::json!({"name": "ro", "overlay": ro, "read_only": true}),
    );
    let e = call(&mut ctl, "ro", &s.dir.path().join("ro-1.add-cow"));
    assert_eq!(e["data"]["class"], "read-only", "{e}");
    assert!(!s.dir.path().join("ro-1.add-cow").exists());
    // Nothing changed: the export still serves its overlay.
    let info = ctl.ok("query-exports", serde_json::json!({}));
    assert_eq!(info[0]["overlay"], serde_json::json!(s.overlay), "{info}");
    // `addcow ctl` (a relative overlay= is made absolute by ctl, so use a name in the dir).
    let snap = s.dir.path().join("vm-ctl.add-cow");
    let (code, out, err) = addcow_daemon_testkit::ctl(&[
        "--control",
        s.control.to_str().unwrap(),
        "export-snapshot",
        "name=",
        &format!("overlay={}", snap.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("now writes to") && out.contains("vm-ctl.add-cow"),
        "{out}"
    );
    let (code, _, err) = addcow_daemon_testkit::ctl(&[
        "--control",
        s.control.to_str().unwrap(),
        "export-snapshot",
        "name=",
        &format!("overlay={}", snap.display()),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    d.stop();
}

/// `addcow serve` on `overlay` with the control socket and `extra` arguments, its test seams
/// armed from `seams`.
fn start_seamed(s: &Setup, overlay: &Path, seams: &Path, extra: &[&str]) -> Daemon {
    std::fs::create_dir_all(seams).unwrap();
    let mut args = vec![
        "--control",
        s.control.to_str().unwrap(),
        "--allow-dir",
        s.dir.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(overlay.to_str().unwrap());
    Daemon::start_seamed(&s.sock, &args, seams)
}

/// `(offset, length, type)` of each line of `nbdinfo --map` (base:allocation).
fn map_lines(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((
                w.first()?.parse().ok()?,
                w.get(1)?.parse().ok()?,
                w.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// A BLOCK_STATUS answered while a snapshot switches the export's disk describes one disk: here
/// the daemon is paused (a test seam) after it walked the old overlay's bitmap and before it
/// asked the file system where the raw image's holes are, a snapshot is started meanwhile, and
/// the answer must still report the old overlay's data as data (not as holes of the new, empty
/// raw image, which made copying clients skip it).
#[test]
fn block_status_during_a_snapshot_describes_one_disk() {
    let s = setup();
    let seams = s.dir.path().join("seams");
    let d = start_seamed(&s, &s.overlay, &seams, &[]);
    let uri = d.uri();
    // The overlay's own data: its first MiB, in its raw image.
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);
    std::fs::write(seams.join("status-walked.pause"), b"").unwrap();
    let map = Command::new("timeout")
        .args(["120", "nbdinfo", "--map", &uri])
        .stdout(Stdio::piped())
        .spawn()
        .expect("nbdinfo");
    wait_until("block status paused in the seam", || {
        seams.join("status-walked.reached").exists()
    });
    let control = s.control.clone();
    let snap = s.dir.path().join("vm-1.add-cow");
    let snapper = std::thread::spawn(move || {
        Control::connect(&control).call(
            "export-snapshot",
            serde_json::json!({"name": "", "overlay": snap}),
        )
    });
    // Either the snapshot went through while the answer was half made, or it waits for it.
    wait_until("the snapshot ran or waited for the block status", || {
        snapper.is_finished() || seams.join("switch-blocked.reached").exists()
    });
    std::fs::write(seams.join("status-walked.go"), b"").unwrap();
    let out = map.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    snapper.join().unwrap().expect("snapshot");
    let lines = map_lines(&text);
    let first = lines.first().copied().unwrap_or_default();
    assert!(
        first.0 == 0 && first.1 >= MIB && first.2 == 0,
        "the overlay's first MiB is data, not a hole:\n{text}"
    );
    d.stop();
}

/// Copies of the export taken while snapshots keep switching its disk are byte for byte what the
/// disk holds: a copying client that trusts BLOCK_STATUS (nbdcopy skips holes) loses nothing.
#[test]
fn copies_running_across_snapshots_are_exact() {
    let mut s = setup();
    let d = start(&s, &s.overlay);
    let uri = d.uri();
    let mut model = std::mem::take(&mut s.model);
    // Data in the raw image, holes punched in it, and untouched base ranges.
    let mut c = Client::start(&uri, &s.overlay);
    for i in 0..16u64 {
        write(
            &mut c,
            &mut model,
            i * 256 * 1024,
            128 * 1024,
            0x20 + i as u8,
        );
    }
    assert_eq!(c.cmd("flush"), "ok");
    drop(c);
    qemu_io(&uri, &["write -z -u 64k 64k", "flush"]);
    model[64 * 1024..128 * 1024].fill(0);
    let want = s.dir.path().join("want.raw");
    std::fs::write(&want, &model).unwrap();
    let control = s.control.clone();
    let dir = s.dir.path().to_path_buf();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let snapper = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut ctl = Control::connect(&control);
            for i in 1..=12 {
                let snap = dir.join(format!("loop-{i}.add-cow"));
                ctl.ok(
                    "export-snapshot",
                    serde_json::json!({"name": "", "overlay": snap}),
                );
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let copy = s.dir.path().join("copy.raw");
    let mut copies = 0;
    while !done.load(std::sync::atomic::Ordering::SeqCst) || copies < 3 {
        let _ = std::fs::remove_file(&copy);
        run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
        let got = std::fs::read(&copy).unwrap();
        assert!(got == model, "copy {copies} differs from the disk");
        copies += 1;
    }
    snapper.join().unwrap();
    same(&want, &uri);
    d.stop();
}

/// A failed snapshot leaves no file behind (only what it created itself is removed), so the same
/// snapshot can be retried at once and succeeds.
#[test]
fn a_failed_snapshot_leaves_nothing_and_a_retry_succeeds() {
    let s = setup();
    let seams = s.dir.path().join("seams");
    let d = start_seamed(&s, &s.overlay, &seams, &[]);
    let uri = d.uri();
    qemu_io(&uri, &["write -P 0x61 0 64k"]);
    let mut ctl = Control::connect(&s.control);
    let snap = s.dir.path().join("vm-1.add-cow");
    let image = s.dir.path().join("vm-1.raw");
    std::fs::write(seams.join("snapshot-create.fail"), b"").unwrap();
    let e = ctl
        .call(
            "export-snapshot",
            serde_json::json!({"name": "", "overlay": snap}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["class"], "snapshot-failed", "{e}");
    assert!(
        !snap.exists(),
        "the failed snapshot left {}",
        snap.display()
    );
    assert!(
        !image.exists(),
        "the failed snapshot left {}",
        image.display()
    );
    qemu_io(&uri, &["read -P 0x61 0 64k", "write -P 0x62 64k 64k"]);
    let r = ctl.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    assert_eq!(r["overlay"], serde_json::json!(snap), "{r}");
    qemu_io(&uri, &["read -P 0x61 0 64k", "read -P 0x62 64k 64k"]);
    d.stop();
}

/// Allocated bytes of `path` (st_blocks).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The new overlay of a snapshot is opened with the export's options: `--extent-ahead 1M`
/// allocates a whole MiB of its raw image on the first write into it.
#[test]
fn a_snapshot_keeps_the_extent_ahead_setting() {
    let s = setup();
    let seams = s.dir.path().join("seams");
    let d = start_seamed(&s, &s.overlay, &seams, &["--extent-ahead", "1M"]);
    let uri = d.uri();
    let mut ctl = Control::connect(&s.control);
    let snap = s.dir.path().join("vm-1.add-cow");
    ctl.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    qemu_io(&uri, &["write -P 0x71 0 4k", "flush"]);
    let got = allocated(&s.dir.path().join("vm-1.raw"));
    assert!(
        got >= MIB,
        "4 KiB written, {got} bytes allocated: extent-ahead was dropped"
    );
    d.stop();
}

/// A connection that negotiated before a snapshot checks FAST_ZERO against the disk it writes to
/// now: the new overlay's raw image on tmpfs zeroes in 4 KiB units (ext4 here: 512), so a
/// 512-byte fast zero that the old disk could punch must fail fast on the new one.
#[test]
fn fast_zero_follows_the_disk_after_a_snapshot() {
    let s = setup();
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let d = Daemon::start(
        &s.sock,
        &[
            "--control",
            s.control.to_str().unwrap(),
            "--allow-dir",
            s.dir.path().to_str().unwrap(),
            "--allow-dir",
            shm.path().to_str().unwrap(),
            s.overlay.to_str().unwrap(),
        ],
    );
    let uri = d.uri();
    let mut c = Client::start(&uri, &s.overlay);
    // The old disk (on the test's folder) punches 512-byte units.
    assert_eq!(
        c.cmd("fastzero 512 512"),
        "ok",
        "the test needs a 512-byte unit first"
    );
    let mut ctl = Control::connect(&s.control);
    let snap = shm.path().join("vm-1.add-cow");
    ctl.ok(
        "export-snapshot",
        serde_json::json!({"name": "", "overlay": snap}),
    );
    let r = c.cmd("fastzero 1024 512");
    assert!(
        r.starts_with("err"),
        "a 512-byte fast zero on tmpfs must fail fast: {r}"
    );
    assert_eq!(c.cmd("fastzero 8192 4096"), "ok");
    assert_eq!(c.cmd("quit"), "ok");
    d.stop();
}

/// A snapshot whose new overlay does not open (an image server under the chain stalls, then
/// fails: test seam `snapshot-open`) while `addcow rebase` renames a new `.add-cow` over the
/// export's overlay in the moment it is unlocked: the export must not take the orphaned file
/// back (every write's bits would go to a file nobody opens again). The reply says the overlay is
/// lost, writes fail, and the file at the path stays exactly as the rebase put it.
#[test]
fn a_failed_snapshot_does_not_take_back_an_overlay_replaced_meanwhile() {
    let s = setup();
    let seams = s.dir.path().join("seams");
    let d = start_seamed(&s, &s.overlay, &seams, &[]);
    let uri = d.uri();
    qemu_io(&uri, &["write -P 0x61 0 64k", "flush"]);
    let snap = s.dir.path().join("vm-1.add-cow");
    std::fs::write(seams.join("snapshot-unlocked.pause"), b"").unwrap();
    std::fs::write(seams.join("snapshot-open.fail"), b"").unwrap();
    let snapper = {
        let (control, snap) = (s.control.clone(), snap.clone());
        std::thread::spawn(move || {
            Control::connect(&control).call(
                "export-snapshot",
                serde_json::json!({"name": "", "overlay": snap}),
            )
        })
    };
    wait_until("the snapshot paused with the overlay unlocked", || {
        seams.join("snapshot-unlocked.reached").exists()
    });
    let renamed = s.dir.path().join("vm.add-cow.rebase");
    std::fs::copy(&s.overlay, &renamed).unwrap();
    std::fs::rename(&renamed, &s.overlay).unwrap();
    let put = std::fs::read(&s.overlay).unwrap();
    std::fs::write(seams.join("snapshot-unlocked.go"), b"").unwrap();
    let e = snapper.join().unwrap().unwrap_err();
    assert_eq!(e["data"]["class"], "snapshot-failed", "{e}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("lost") && msg.contains("fails every request"),
        "the export took back an overlay replaced at its path: {e}"
    );
    let out = addcow_daemon_testkit::run_raw(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x62 64k 4k", &uri],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a write to a lost overlay must fail:\n{text}"
    );
    assert_eq!(
        std::fs::read(&s.overlay).unwrap(),
        put,
        "the export wrote the file put at its overlay's path"
    );
    assert!(
        !snap.exists(),
        "the failed snapshot left {}",
        snap.display()
    );
    d.stop();
}
