//! Pull-mode backup (`backup-begin` / `backup-end`) with real clients: the point-in-time export
//! equals (`qemu-img compare`) a copy of the live export taken just before `backup-begin`, while
//! fio and qemu-io write, zero and trim the live export (and while nbdcopy reads the backup
//! export); the live export has the new writes; `backup-end` leaves the live export serving and
//! the scratch gone. A SIGKILL during a backup: the restarted daemon serves the live overlay
//! with everything flushed, and a new backup replaces the stale scratch. Bad input gets clear
//! errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use addcow_daemon_testkit::{assert_identical, qemu_io, run, Control, Daemon};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

struct Setup {
    dir: tempfile::TempDir,
    overlay: PathBuf,
    control: PathBuf,
    sock: PathBuf,
}

/// A 32 MiB overlay over a 20 MiB base of non-zero bytes (past it: zeros).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes: Vec<u8> = (0..20 * MIB).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let overlay = dir.path().join("vm.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        size: Some(SIZE),
        ..Default::default()
    })
    .unwrap();
    Setup {
        control: dir.path().join("ctl.sock"),
        sock: dir.path().join("s.sock"),
        dir,
        overlay,
    }
}

fn start(s: &Setup, extra: &[&str]) -> Daemon {
    let export = format!("vm={}", s.overlay.display());
    let mut args = vec![
        "--control",
        s.control.to_str().unwrap(),
        "--allow-dir",
        s.dir.path().to_str().unwrap(),
        "--export",
        &export,
    ];
    args.extend_from_slice(extra);
    Daemon::start(&s.sock, &args)
}

fn scratch_of(s: &Setup) -> PathBuf {
    s.dir.path().join("vm.add-cow.backup-scratch")
}

fn convert(uri: &str, to: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            to.to_str().unwrap(),
        ],
    );
}

/// fio on the live export over NBD: `rw` of `bs` blocks over `size` bytes at `offset`.
fn fio(uri: &str, rw: &str, bs: &str, offset: &str, size: &str) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=guest",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--iodepth=8",
            "--randseed=7",
            "--output-format=terse",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (scripts/test.sh installs it)")
}

fn wait_ok(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().expect(what);
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_backup_export_is_the_instant_while_the_guest_writes() {
    let s = setup();
    let d = start(&s, &[]);
    let live = d.uri_of("vm");
    let backup = d.uri_of("vm-backup");
    // Before: some writes, then the copy the backup must equal.
    qemu_io(
        &live,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 5000 3000",
            "write -P 0x13 22M 2M",
            "flush",
        ],
    );
    let before = s.dir.path().join("before.raw");
    convert(&live, &before);

    let mut ctl = Control::connect(&s.control);
    let r = ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c1"}));
    assert_eq!(r["target"], "vm-backup", "{r}");
    assert_eq!(r["scratch"], json!(scratch_of(&s)), "{r}");
    assert!(scratch_of(&s).exists());
    let info = ctl.ok("query-exports", json!({}));
    let by = |n: &str| {
        info.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no export {n}: {info}"))
    };
    assert_eq!(by("vm")["backup"]["role"], "source", "{info}");
    assert_eq!(by("vm")["backup"]["checkpoint"], "c1", "{info}");
    assert_eq!(by("vm-backup")["backup"]["role"], "view", "{info}");
    assert_eq!(by("vm-backup")["read_only"], true, "{info}");

    // The guest writes (fio random writes and trims, qemu-io writes, zeroes and discards,
    // unaligned too) while nbdcopy reads the backup export.
    // (Apart from the ranges qemu-io writes, which are checked on the live export after.)
    let w = fio(&live, "randwrite", "4k", "8M", "8M");
    let t = fio(&live, "randtrim", "64k", "16M", "4M");
    let during = s.dir.path().join("during.raw");
    let copy = Command::new("nbdcopy")
        .args([&backup, during.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdcopy");
    qemu_io(
        &live,
        &[
            "write -P 0x21 1000 5000",
            "write -z 3M 1M",
            "discard 20M 3M",
            "write -P 0x22 31M 1M",
            "write -P 0x23 100k 777",
        ],
    );
    wait_ok(w, "fio randwrite");
    wait_ok(t, "fio randtrim");
    wait_ok(copy, "nbdcopy of the backup export");
    assert_identical(before.to_str().unwrap(), during.to_str().unwrap());
    assert_identical(before.to_str().unwrap(), &backup);
    // The live export has the new writes.
    qemu_io(
        &live,
        &[
            "read -P 0x21 1000 5000",
            "read -P 0 3M 1M",
            "read -P 0x22 31M 1M",
            "read -P 0x23 100k 777",
        ],
    );
    let out = addcow_daemon_testkit::run_raw(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            before.to_str().unwrap(),
            &live,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the live export changed: {out:?}"
    );
    // Block status of the backup export: nbdinfo maps it (the view's base:allocation).
    let map = run("nbdinfo", &["--map", &backup]);
    assert!(map.contains("data"), "{map}");

    let now = s.dir.path().join("now.raw");
    convert(&live, &now);
    let r = ctl.ok("backup-end", json!({"export": "vm"}));
    assert_eq!(r["checkpoint"], "c1", "{r}");
    assert!(r["bytes_copied"].as_u64().unwrap() > 0, "{r}");
    assert!(!scratch_of(&s).exists(), "backup-end removes the scratch");
    let info = ctl.ok("query-exports", json!({}));
    let names: Vec<&str> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm"], "{info}");
    assert!(info[0].get("backup").is_none(), "{info}");
    // The live export still serves, unchanged by the end; the backup export is gone.
    assert_identical(now.to_str().unwrap(), &live);
    let gone = addcow_daemon_testkit::run_raw("nbdinfo", &[&backup]);
    assert!(!gone.status.success(), "the backup export is gone");
    // A second backup of the same export begins and ends again.
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c2"}));
    assert_identical(now.to_str().unwrap(), &backup);
    ctl.ok("backup-end", json!({"export": "vm"}));
    d.stop();
}

#[test]
fn sigkill_during_a_backup_keeps_the_live_overlay_intact() {
    let s = setup();
    let mut d = start(&s, &[]);
    let live = d.uri_of("vm");
    let mut ctl = Control::connect(&s.control);
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c1"}));
    qemu_io(
        &live,
        &[
            "write -P 0x31 0 2M",
            "write -P 0x32 12345 6789",
            "discard 4M 1M",
            "write -z 8M 64k",
            "flush",
        ],
    );
    let want = s.dir.path().join("want.raw");
    convert(&live, &want);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(ctl);
    assert!(scratch_of(&s).exists(), "a crash leaves the scratch behind");
    let d = start(&s, &[]);
    let live = d.uri_of("vm");
    assert_identical(want.to_str().unwrap(), &live);
    // The stale scratch is not in use: a new backup replaces it, and its end removes it.
    let mut ctl = Control::connect(&s.control);
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c2"}));
    assert_eq!(
        std::fs::metadata(scratch_of(&s)).unwrap().len(),
        SIZE,
        "a fresh scratch"
    );
    assert_identical(want.to_str().unwrap(), &d.uri_of("vm-backup"));
    ctl.ok("backup-end", json!({"export": "vm"}));
    assert!(!scratch_of(&s).exists());
    // A clean stop with a backup running ends it too (no scratch left).
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c3"}));
    d.stop();
    assert!(!scratch_of(&s).exists(), "shutdown ends the backup");
}

#[test]
fn bad_input_gets_clear_errors() {
    let s = setup();
    let ro = s.dir.path().join("ro.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: ro.clone(),
        size: Some(MIB),
        ..Default::default()
    })
    .unwrap();
    let d = start(&s, &[]);
    let mut ctl = Control::connect(&s.control);
    ctl.ok(
        "export-add",
        json!({"name": "ro", "overlay": ro, "read_only": true}),
    );
    let class = |e: &serde_json::Value| e["data"]["class"].as_str().unwrap_or("").to_string();
    let mut err = |method: &str, p: serde_json::Value| {
        let e = ctl.call(method, p.clone()).unwrap_err();
        (
            class(&e),
            e["message"].as_str().unwrap_or("").to_string(),
            e,
        )
    };
    let (c, m, _) = err("backup-begin", json!({"export": "nope", "checkpoint": "c"}));
    assert_eq!(c, "no-such-export", "{m}");
    let (c, m, _) = err("backup-end", json!({"export": "vm"}));
    assert_eq!(c, "no-backup", "{m}");
    assert!(m.contains("no backup running"), "{m}");
    let (c, m, _) = err("backup-begin", json!({"export": "ro", "checkpoint": "c"}));
    assert_eq!(c, "read-only", "{m}");
    let (c, m, _) = err(
        "backup-begin",
        json!({"export": "vm", "checkpoint": "c2", "incremental": "c1"}),
    );
    assert_eq!(c, "no-such-checkpoint", "{m}");
    assert!(m.contains("\"c1\""), "{m}");
    let (_, m, e) = err("backup-begin", json!({"export": "vm", "checkpoint": ""}));
    assert_eq!(e["code"], -32602, "{m}");
    let (c, m, _) = err(
        "backup-begin",
        json!({"export": "vm", "checkpoint": "c", "scratch": "/tmp/elsewhere.scratch"}),
    );
    assert_eq!(c, "not-allowed", "{m}");
    let (c, m, _) = err(
        "backup-begin",
        json!({"export": "vm", "checkpoint": "c", "scratch": s.overlay}),
    );
    assert_eq!(c, "not-allowed", "{m}");
    let (c, m, _) = err(
        "backup-begin",
        json!({"export": "vm", "checkpoint": "c", "target": "ro"}),
    );
    assert_eq!(c, "name-taken", "{m}");
    assert!(!scratch_of(&s).exists(), "no refused begin made a scratch");

    // While a backup runs: a second one, and what would leave it behind, are refused.
    let custom = s.dir.path().join("custom.scratch");
    ctl.ok(
        "backup-begin",
        json!({"export": "vm", "checkpoint": "c", "target": "bk", "scratch": custom}),
    );
    assert!(custom.exists());
    let mut err = |method: &str, p: serde_json::Value| {
        let e = ctl.call(method, p.clone()).unwrap_err();
        (class(&e), e["message"].as_str().unwrap_or("").to_string())
    };
    let (c, m) = err("backup-begin", json!({"export": "vm", "checkpoint": "d"}));
    assert_eq!(c, "backup-running", "{m}");
    let (c, m) = err("backup-begin", json!({"export": "bk", "checkpoint": "d"}));
    assert_eq!(c, "read-only", "{m}");
    for name in ["vm", "bk"] {
        let (c, m) = err("export-del", json!({"name": name}));
        assert_eq!(c, "backup-running", "{m}");
        assert!(m.contains("backup-end"), "{m}");
    }
    let snap = s.dir.path().join("snap.add-cow");
    let (c, m) = err("export-snapshot", json!({"name": "vm", "overlay": snap}));
    assert_eq!(c, "backup-running", "{m}");
    let (c, m) = err("export-resize", json!({"name": "vm", "size": "64M"}));
    assert_eq!(c, "backup-running", "{m}");
    let (c, m) = err("backup-end", json!({"export": "bk"}));
    assert_eq!(c, "no-backup", "{m}");
    // The backup export takes no write.
    let out = addcow_daemon_testkit::run_raw(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 512", &d.uri_of("bk")],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "a write to the backup export: {text}"
    );
    ctl.ok("backup-end", json!({"export": "vm"}));
    assert!(!custom.exists());
    // After the end, what was refused works again.
    ctl.ok("export-resize", json!({"name": "vm", "size": "64M"}));
    d.stop();
}

/// Writes `byte` over `[offset, offset+len)` of `uri` with nbdsh and disconnects without a
/// FLUSH (qemu-io flushes when it closes).
fn write_unflushed(uri: &str, byte: u8, offset: u64, len: u64) {
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\n\
         h.pwrite(bytes([{byte}]) * {len}, {offset})\nh.shutdown()\n"
    );
    run("/usr/bin/python3", &["-c", &script]);
}

/// Dirty bytes of bitmap `name` on export `vm`.
fn dirty_bytes(ctl: &mut Control, name: &str) -> u64 {
    let q = ctl.ok("query-bitmaps", json!({"export": "vm"}));
    q.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("bitmap {name:?} in {q}"))["dirty-bytes"]
        .as_u64()
        .unwrap()
}

/// Writes answered but never flushed before `backup-begin` (or `bitmap-clear`) are part of the
/// instant: after a SIGKILL right after it (well within the commit interval), every granule the
/// checkpoint's bitmap calls clean holds the bytes the backup export had. Otherwise the next
/// incremental would skip sectors that went back to their base bytes.
#[test]
fn a_checkpoint_after_unflushed_writes_survives_a_sigkill() {
    let s = setup();
    let mut d = start(&s, &[]);
    let live = d.uri_of("vm");
    let mut ctl = Control::connect(&s.control);
    write_unflushed(&live, 0x41, 0, 2 * MIB);
    write_unflushed(&live, 0x42, 21 * MIB, 64 << 10);
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c1"}));
    let at_c1 = s.dir.path().join("c1.raw");
    convert(&d.uri_of("vm-backup"), &at_c1);
    ctl.ok("backup-end", json!({"export": "vm"}));
    // The same for bitmap-clear.
    ctl.ok("bitmap-add", json!({"export": "vm", "name": "b"}));
    write_unflushed(&live, 0x43, 4 * MIB, 1 << 20);
    ctl.ok("bitmap-clear", json!({"export": "vm", "name": "b"}));
    let mut at_clear = std::fs::read(&at_c1).unwrap();
    at_clear[4 * MIB as usize..5 * MIB as usize].fill(0x43);
    let at_clear_path = s.dir.path().join("clear.raw");
    std::fs::write(&at_clear_path, &at_clear).unwrap();
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(ctl);
    let d = start(&s, &[]);
    let mut ctl = Control::connect(&s.control);
    assert_eq!(dirty_bytes(&mut ctl, "c1"), MIB, "c1: the 0x43 write only");
    assert_eq!(
        dirty_bytes(&mut ctl, "b"),
        0,
        "b was cleared after its only write"
    );
    // b is clean everywhere: the disk must be what it was at the clear.
    assert_identical(at_clear_path.to_str().unwrap(), &d.uri_of("vm"));
    d.stop();
}

/// A scratch path that is the overlay's dirty-bitmaps sidecar (by name, or by a link with
/// another name) is refused with a clear error, and the sidecar and its bitmaps are intact.
#[test]
fn a_scratch_on_the_bitmaps_sidecar_is_refused() {
    let s = setup();
    let mut d = start(&s, &[]);
    let mut ctl = Control::connect(&s.control);
    ctl.ok("bitmap-add", json!({"export": "vm", "name": "b"}));
    qemu_io(&d.uri_of("vm"), &["write -P 0x51 0 64k", "flush"]);
    let sidecar = addcow_engine::dirty::sidecar_path(&s.overlay);
    let before = std::fs::read(&sidecar).unwrap();
    let link = s.dir.path().join("innocent.scratch");
    std::fs::hard_link(&sidecar, &link).unwrap();
    let mut tmp = sidecar.clone().into_os_string();
    tmp.push(".tmp");
    for scratch in [sidecar.clone(), link.clone(), PathBuf::from(tmp)] {
        let e = ctl
            .call(
                "backup-begin",
                json!({"export": "vm", "checkpoint": "c1", "scratch": scratch}),
            )
            .unwrap_err();
        let m = e["message"].as_str().unwrap_or("");
        assert_eq!(e["data"]["class"], "not-allowed", "{scratch:?}: {e}");
        assert!(m.contains("sidecar"), "{scratch:?}: {m}");
        assert_eq!(std::fs::read(&sidecar).unwrap(), before, "{scratch:?}");
    }
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(ctl);
    let d = start(&s, &[]);
    let mut ctl = Control::connect(&s.control);
    assert_eq!(dirty_bytes(&mut ctl, "b"), 64 << 10);
    d.stop();
}
