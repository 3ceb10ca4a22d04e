//! `export-resize` on the control socket of a running `addcow serve`: the export grows, a new
//! NBD connection sees the new size (nbdinfo), data written past the old end reads back, the old
//! content is unchanged (qemu-img compare), a client connected across the resize stays
//! connected and every one of its reads (before, during and after the switch) returns the right
//! bytes; shrinking and bad sizes are refused with clear errors.

use addcow_daemon_testkit::*;
use serde_json::json;

/// Reads 8 KiB at 4 KiB on one connection until `stop` exists, checking every byte is 0x11;
/// prints one line: `done reads=N size=S` or the first failure.
const CHECKING_CLIENT_PY: &str = r#"
import os, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
n = 0
try:
    while not os.path.exists(sys.argv[2]):
        if h.pread(8192, 4096) != b"\x11" * 8192:
            print(f"bad bytes after {n} reads", flush=True)
            sys.exit(1)
        n += 1
        time.sleep(0.002)
    print(f"done reads={n} size={h.get_size()}", flush=True)
except nbd.Error as e:
    print(f"ended: errno={e.errno} after {n} reads: {e.string}", flush=True)
    sys.exit(1)
"#;

const MIB: u64 = 1 << 20;

/// A daemon serving the fixture's overlay as export `disk`, with a control socket and test seams:
/// the daemon, its seams folder and its control socket.
fn seamed_daemon(f: &Fixture) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let seams = f.path("seams");
    std::fs::create_dir(&seams).unwrap();
    let control = f.path("ctl.sock");
    let export = format!("disk={}", f.overlay().display());
    let d = Daemon::start_seamed(
        &f.path("nbd.sock"),
        &["--control", control.to_str().unwrap(), "--export", &export],
        &seams,
    );
    (d, seams, control)
}

#[test]
fn export_resize_grows_a_served_export() {
    let f = Fixture::new(MIB);
    let sock = f.path("nbd.sock");
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &sock,
        &[
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("disk={}", f.overlay().display()),
        ],
    );
    let uri = d.uri_of("disk");
    qemu_io(&uri, &["write -P 0x11 4k 8k", "write -P 0x44 900k 4k"]);
    let before = f.path("before.img");
    run("nbdcopy", &[&uri, before.to_str().unwrap()]);
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), MIB.to_string());

    // A client connected across the resize, reading and checking all the time.
    let stop = f.path("stop-reading");
    let reader = HoldingClient::run(CHECKING_CLIENT_PY, &[&uri, stop.to_str().unwrap()]);
    let mut c = Control::connect(&control);
    assert!(c.ok("hello", json!({}))["features"]
        .as_array()
        .unwrap()
        .contains(&json!("export-resize")));
    // Refusals first: nothing changes.
    let e = c
        .call("export-resize", json!({"name": "disk", "size": "512K"}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "shrink-refused", "{e}");
    assert!(e["message"].as_str().unwrap().contains("--shrink"), "{e}");
    let e = c
        .call("export-resize", json!({"name": "disk", "size": 1_000_000}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "invalid-size", "{e}");
    // The error names the export and its overlay.
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("\"disk\"") && msg.contains(&f.overlay().display().to_string()),
        "{e}"
    );
    let e = c
        .call("export-resize", json!({"name": "disk", "size": "lots"}))
        .unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("not a byte count"),
        "{e}"
    );
    let e = c
        .call("export-resize", json!({"name": "nope", "size": "2M"}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "no-such-export", "{e}");
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), MIB.to_string());

    let r = c.ok("export-resize", json!({"name": "disk", "size": "2M"}));
    assert_eq!(r["old_size"], MIB, "{r}");
    assert_eq!(r["new_size"], 2 * MIB, "{r}");
    assert_eq!(r["clients_disconnected"], 0, "{r}");
    // A new connection sees the new size; the old content is unchanged; past the old end is
    // writable and reads back.
    assert_eq!(
        run("nbdinfo", &["--size", &uri]).trim(),
        (2 * MIB).to_string()
    );
    assert_identical(before.to_str().unwrap(), &uri);
    qemu_io(&uri, &["write -P 0x5c 1536k 64k", "write -P 0x5d 1020k 8k"]);
    qemu_io(
        &uri,
        &[
            "read -P 0x5c 1536k 64k",
            "read -P 0x5d 1020k 8k",
            "read -P 0x11 4k 8k",
            "read -P 0 1600k 448k",
        ],
    );
    let exports = c.ok("query-exports", json!({}));
    assert_eq!(exports[0]["size"], 2 * MIB, "{exports}");
    // The client connected before the resize is still connected, read the right bytes all along
    // and still sees the size it negotiated (NBD cannot tell it the new one).
    std::fs::write(&stop, b"").unwrap();
    reader.wait_for("reads=");
    let text = reader.output();
    assert!(
        text.contains("done reads="),
        "reading client failed across the resize: {text}"
    );
    let reads: u64 = text
        .split("reads=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no read count in {text:?}"));
    assert!(reads >= 10, "the client read only {reads} times: {text}");
    assert!(text.contains(&format!("size={MIB}")), "{text}");
    d.stop();

    // On disk: the overlay is 2 MiB and clean.
    let o = addcow_engine::format::Overlay::open(
        &f.overlay(),
        &addcow_engine::format::OpenOptions {
            read_only: true,
            no_lock: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(o.virtual_size, 2 * MIB);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
}

/// A daemon on `f`'s overlay (export `disk`) with a control socket and `extra` arguments.
fn serve(f: &Fixture, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let control = f.path("ctl.sock");
    let export = format!("disk={}", f.overlay().display());
    let mut args = vec!["--control", control.to_str().unwrap(), "--export", &export];
    args.extend_from_slice(extra);
    (Daemon::start(&f.path("nbd.sock"), &args), control)
}

/// Sizes the daemon could not hold a bitmap for are refused before anything is touched, with a
/// clear error; the export keeps serving at its size.
#[test]
fn export_resize_refuses_sizes_past_the_limit() {
    let f = Fixture::new(MIB);
    let (d, control) = serve(&f, &[]);
    let uri = d.uri_of("disk");
    qemu_io(&uri, &["write -P 0x21 0 4k"]);
    let mut c = Control::connect(&control);
    for size in [1u64 << 62, (1 << 46) + 512] {
        let e = c
            .call("export-resize", json!({"name": "disk", "size": size}))
            .unwrap_err();
        assert_eq!(e["data"]["class"], "invalid-size", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or_default()
                .contains("at most"),
            "{e}"
        );
    }
    qemu_io(
        &uri,
        &[
            "read -P 0x21 0 4k",
            "write -P 0x22 4k 4k",
            "read -P 0x22 4k 4k",
        ],
    );
    assert_eq!(run("nbdinfo", &["--size", &uri]).trim(), MIB.to_string());
    let r = c.ok("export-resize", json!({"name": "disk", "size": 2 * MIB}));
    assert_eq!(r["new_size"], 2 * MIB, "{r}");
    d.stop();
}

/// The reopened overlay keeps the export's `--extent-ahead`: the first write past the old end
/// allocates a whole MiB of the raw image.
#[test]
fn export_resize_keeps_the_extent_ahead_setting() {
    use std::os::unix::fs::MetadataExt;
    let f = Fixture::new(MIB);
    let (d, control) = serve(&f, &["--extent-ahead", "1M"]);
    let uri = d.uri_of("disk");
    let mut c = Control::connect(&control);
    c.ok("export-resize", json!({"name": "disk", "size": 4 * MIB}));
    qemu_io(&uri, &["write -P 0x31 2M 4k", "flush"]);
    let got = std::fs::metadata(f.path("disk.raw")).unwrap().blocks() * 512;
    assert!(
        got >= MIB,
        "4 KiB written, {got} bytes allocated: extent-ahead was dropped"
    );
    d.stop();
}

/// Holds an exclusive OFD lock on the file argv[1] (as another writer would) until stdin closes.
const LOCKER_PY: &str = r#"
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    print("locked", flush=True)
except OSError as e:
    print("refused", e.errno, flush=True)
sys.stdin.read()
"#;

/// What a process that locks the overlay while a resize has it unlocked (see docs/LIFECYCLE.md)
/// can do: it gets the lock, the resize then fails, and the daemon, unable to lock the overlay
/// again, stops writing it (every request fails) instead of writing an overlay another process
/// holds; the reply says so. Outside the resize the lock is refused to it.
#[test]
fn a_process_that_locks_the_overlay_during_a_resize_gets_it_and_the_export_stops_writing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let f = Fixture::new(MIB);
    let (d, seams, control) = seamed_daemon(&f);
    let uri = d.uri_of("disk");
    qemu_io(&uri, &["write -P 0x41 0 4k"]);
    let lock = |overlay: &std::path::Path| {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", LOCKER_PY, overlay.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        (child, line.trim().to_string())
    };
    let (mut held, got) = lock(&f.overlay());
    assert!(
        got.starts_with("refused"),
        "the served overlay must be locked: {got}"
    );
    drop(held.stdin.take());
    held.wait().unwrap();
    std::fs::write(seams.join("resize-unlocked.pause"), b"").unwrap();
    let resizer = std::thread::spawn(move || {
        Control::connect(&control).call("export-resize", json!({"name": "disk", "size": 2 * MIB}))
    });
    wait_until("the resize paused with the overlay unlocked", || {
        seams.join("resize-unlocked.reached").exists()
    });
    let (mut racer, got) = lock(&f.overlay());
    assert_eq!(got, "locked", "the gap documented in docs/LIFECYCLE.md");
    std::fs::write(seams.join("resize-unlocked.go"), b"").unwrap();
    let e = resizer.join().unwrap().unwrap_err();
    assert_eq!(e["data"]["class"], "resize-failed", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("fails every request"),
        "{e}"
    );
    let out = run_raw("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 4k", &uri]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a write after losing the lock must fail:\n{text}"
    );
    drop(racer.stdin.take());
    racer.wait().unwrap();
    // What was written before is in the overlay.
    let raw = std::fs::read(f.path("disk.raw")).unwrap();
    assert!(raw[..4096].iter().all(|&b| b == 0x41));
    d.stop();
}

/// A resize whose grow fails (test seam `resize-grow`) while another process wrote the overlay
/// in place in the moment it was unlocked (a `serve` that came and went, `addcow resize
/// --shrink`): the old disk must not take it back, or its stale bitmap blocks would overwrite
/// what that process wrote. The reply says the overlay is lost, writes fail, and what the other
/// process wrote stays.
#[test]
fn a_failed_resize_does_not_take_back_an_overlay_written_meanwhile() {
    use std::os::unix::fs::FileExt;
    let f = Fixture::new(MIB);
    let (d, seams, control) = seamed_daemon(&f);
    let uri = d.uri_of("disk");
    qemu_io(&uri, &["write -P 0x41 0 4k", "flush"]);
    std::fs::write(seams.join("resize-unlocked.pause"), b"").unwrap();
    std::fs::write(seams.join("resize-grow.fail"), b"").unwrap();
    let resizer = std::thread::spawn(move || {
        Control::connect(&control).call("export-resize", json!({"name": "disk", "size": 2 * MIB}))
    });
    wait_until("the resize paused with the overlay unlocked", || {
        seams.join("resize-unlocked.reached").exists()
    });
    // The other writer: data for sectors 8..15, then their bits (bitmap byte 1).
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(f.path("disk.raw"))
        .unwrap();
    raw.write_all_at(&[0x43; 4096], 4096).unwrap();
    raw.sync_all().unwrap();
    let meta = std::fs::OpenOptions::new()
        .write(true)
        .open(f.overlay())
        .unwrap();
    meta.write_all_at(&[0xff], 2560 + 1).unwrap();
    meta.sync_all().unwrap();
    drop((raw, meta));
    std::fs::write(seams.join("resize-unlocked.go"), b"").unwrap();
    let e = resizer.join().unwrap().unwrap_err();
    assert_eq!(e["data"]["class"], "resize-failed", "{e}");
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("lost") && msg.contains("fails every request"),
        "the export took back an overlay written meanwhile: {e}"
    );
    let out = run_raw(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 4k", "-c", "flush", &uri],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a write to a lost overlay must fail:\n{text}"
    );
    d.stop();
    let meta = std::fs::read(f.overlay()).unwrap();
    assert_eq!(
        meta[2560 + 1],
        0xff,
        "the other writer's bits were overwritten"
    );
    assert_eq!(
        meta[2560], 0xff,
        "the export's own bits before the resize are there"
    );
    let raw = std::fs::read(f.path("disk.raw")).unwrap();
    assert!(raw[..4096].iter().all(|&b| b == 0x41));
    assert!(raw[4096..8192].iter().all(|&b| b == 0x43));
}
