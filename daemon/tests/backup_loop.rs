//! A backup loop like virtnbdbackup's, with real clients: a full backup (checkpoint c0) of a
//! 256 MiB overlay over a base, then incrementals, each reading only the extents that
//! `qemu:dirty-bitmap:PREVIOUS` marks dirty on the point-in-time export while fio keeps writing
//! to the live export, applied in order onto the full copy: after each, the restore equals
//! (`qemu-img compare`) the live export at that backup's instant. One cycle SIGKILLs the daemon
//! while fio writes (flushed and unflushed writes), another SIGKILLs it during a backup and
//! retries from the same previous checkpoint: the next incrementals are still exact and still
//! incremental (bytes read per cycle are printed and bounded well below the disk's size).
//! The same with qemu-storage-daemon and a persistent qcow2 bitmap: after a SIGKILL its bitmap
//! is lost or inconsistent, and only a full backup is left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use addcow_daemon_testkit::{assert_identical, backup_client, run, wait_until, Control, Daemon};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

struct Setup {
    dir: tempfile::TempDir,
    overlay: PathBuf,
    control: PathBuf,
    sock: PathBuf,
}

/// A 256 MiB overlay over a 64 MiB base of non-zero bytes (past it: zeros).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_bytes: Vec<u8> = (0..64 * MIB).map(|i| (i % 251) as u8 | 1).collect();
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

fn start(s: &Setup) -> Daemon {
    let export = format!("vm={}", s.overlay.display());
    Daemon::start(
        &s.sock,
        &[
            "--control",
            s.control.to_str().unwrap(),
            "--allow-dir",
            s.dir.path().to_str().unwrap(),
            "--export",
            &export,
        ],
    )
}

/// fio writing random 64 KiB blocks of fresh random data over the whole live export, a FLUSH
/// after every 8 writes, at offsets that differ from seed to seed: `amount` bytes (`None`: until
/// killed).
fn fio(uri: &str, seed: u64, amount: Option<&str>) -> Child {
    let mut args = vec![
        "--name=guest".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        "--bs=64k".into(),
        "--iodepth=4".into(),
        "--refill_buffers".into(),
        "--randrepeat=0".into(),
        "--fsync=8".into(),
        format!("--randseed={seed}"),
        "--output-format=terse".into(),
    ];
    match amount {
        Some(a) => args.push(format!("--io_size={a}")),
        None => {
            args.push("--time_based".into());
            args.push("--runtime=600".into());
        }
    }
    Command::new("fio")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (scripts/test.sh installs it)")
}

fn wait_ok(child: Child, what: &str) {
    let out = child.wait_with_output().expect(what);
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn convert(uri: &str, to: &Path) {
    let _ = std::fs::remove_file(to);
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

/// `query-bitmaps` of the live export: (name, enabled, dirty bytes, backup role).
fn bitmaps(ctl: &mut Control) -> Vec<(String, bool, u64, String)> {
    let r = ctl.ok("query-bitmaps", json!({"export": "vm"}));
    r.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["enabled"].as_bool().unwrap(),
                b["count"].as_u64().unwrap(),
                b["backup"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn dirty_of(ctl: &mut Control, name: &str) -> u64 {
    bitmaps(ctl)
        .into_iter()
        .find(|b| b.0 == name)
        .unwrap_or_else(|| panic!("no bitmap {name}"))
        .2
}

/// SIGKILL and restart on the same overlay (and sidecar); a new control connection.
fn kill_restart(s: &Setup, mut d: Daemon) -> (Daemon, Control) {
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let d = start(s);
    let ctl = Control::connect(&s.control);
    (d, ctl)
}

#[test]
#[ignore = "heavy: a 256 MiB disk, fio and six backups (scripts/test.sh runs it)"]
fn incrementals_restore_exactly_across_sigkills() {
    let s = setup();
    let mut d = start(&s);
    let mut ctl = Control::connect(&s.control);
    let restore = s.dir.path().join("restore.img");
    let truth = s.dir.path().join("truth.raw");
    std::fs::File::create(&restore).unwrap();

    // Some writes before the full backup.
    wait_ok(fio(&d.uri_of("vm"), 1, Some("8M")), "fio");
    convert(&d.uri_of("vm"), &truth);
    ctl.ok("backup-begin", json!({"export": "vm", "checkpoint": "c0"}));
    let writer = fio(&d.uri_of("vm"), 2, Some("8M"));
    let full = backup_client(&d.uri_of("vm-backup"), "full", &restore);
    wait_ok(writer, "fio during the full backup");
    ctl.ok("backup-end", json!({"export": "vm"}));
    assert_eq!(full.size, SIZE);
    assert_identical(restore.to_str().unwrap(), truth.to_str().unwrap());
    eprintln!("full backup c0: bytes_read {} of {SIZE}", full.bytes_read);

    let mut prev = "c0".to_string();
    for k in 1..=6u64 {
        let live = d.uri_of("vm");
        let mut note = "";
        match k {
            3 => {
                // SIGKILL while fio writes: some of its writes were flushed, the last ones not.
                let before = dirty_of(&mut ctl, &prev);
                let mut writer = fio(&live, 100 + k, None);
                wait_until("fio's writes reach the bitmap", || {
                    dirty_of(&mut ctl, &prev) >= before + 16 * MIB
                });
                drop(ctl);
                (d, ctl) = kill_restart(&s, d);
                let _ = writer.kill();
                let _ = writer.wait();
                note = " (after a SIGKILL while fio wrote)";
            }
            5 => {
                // SIGKILL during a backup from prev: the retry from prev is still exact.
                wait_ok(fio(&live, 100 + k, Some("8M")), "fio");
                ctl.ok(
                    "backup-begin",
                    json!({"export": "vm", "checkpoint": "c5-failed", "incremental": prev}),
                );
                wait_ok(
                    fio(&live, 200 + k, Some("8M")),
                    "fio during the failed backup",
                );
                drop(ctl);
                (d, ctl) = kill_restart(&s, d);
                note = " (a retry after a SIGKILL during the backup from the same checkpoint)";
            }
            _ => {}
        }
        let live = d.uri_of("vm");
        wait_ok(fio(&live, 100 + k * 7, Some("8M")), "fio");
        // The truth: the live export at the backup's instant (no writes until backup-begin).
        convert(&live, &truth);
        let cp = format!("c{k}");
        ctl.ok(
            "backup-begin",
            json!({"export": "vm", "checkpoint": cp, "incremental": prev}),
        );
        let roles = bitmaps(&mut ctl);
        assert!(
            roles
                .iter()
                .any(|b| b.0 == cp && b.1 && b.3 == "checkpoint")
                && roles
                    .iter()
                    .any(|b| b.0 == prev && !b.1 && b.3 == "incremental"),
            "{roles:?}"
        );
        let writer = fio(&live, 300 + k, Some("8M"));
        let ctx = format!("qemu:dirty-bitmap:{prev}");
        let got = backup_client(&d.uri_of("vm-backup"), &ctx, &restore);
        wait_ok(writer, "fio during the incremental");
        ctl.ok("backup-end", json!({"export": "vm"}));
        eprintln!(
            "incremental {cp} from {prev}{note}: bytes_read {} in {} extents of {SIZE}",
            got.bytes_read, got.extents
        );
        assert_identical(restore.to_str().unwrap(), truth.to_str().unwrap());
        assert!(got.bytes_read > 0, "something changed");
        assert!(
            got.bytes_read < SIZE / 4,
            "{cp} is still incremental: {} bytes read",
            got.bytes_read
        );
        prev = cp;
    }
    drop(ctl);
    d.stop();
}

/// A QMP connection to qemu-storage-daemon (capabilities negotiated).
struct Qmp(std::io::BufReader<std::os::unix::net::UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let s = std::os::unix::net::UnixStream::connect(path).expect("QMP socket");
        let mut q = Qmp(std::io::BufReader::new(s));
        q.line();
        q.call("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.0.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP {l:?}: {e}"))
    }

    /// The command's `return`, or its `error`.
    fn call(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use std::io::Write;
        let msg = json!({"execute": cmd, "arguments": args}).to_string() + "\n";
        self.0
            .get_mut()
            .write_all(msg.as_bytes())
            .expect("QMP write");
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }

    /// The dirty bitmaps of node `node` as query-named-block-nodes reports them.
    fn bitmaps(&mut self, node: &str) -> serde_json::Value {
        let nodes = self
            .call("query-named-block-nodes", json!({"flat": true}))
            .expect("query-named-block-nodes");
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == node)
            .map(|n| n["dirty-bitmaps"].clone())
            .unwrap_or_else(|| panic!("no node {node}: {nodes}"))
    }
}

/// qemu-storage-daemon with the qcow2 image `image` as node `disk`, an NBD server on `nbd` and
/// QMP on `qmp` (waited for).
fn qsd(image: &Path, nbd: &Path, qmp: &Path) -> (Child, Qmp) {
    let _ = std::fs::remove_file(qmp);
    let _ = std::fs::remove_file(nbd);
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=file,filename={}", image.display()),
            "--blockdev",
            "driver=qcow2,node-name=disk,file=file",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", qmp.display()),
            "--monitor",
            "chardev=m",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon (scripts/test.sh installs it)");
    wait_until("qemu-storage-daemon's QMP socket", || qmp.exists());
    (child, Qmp::connect(qmp))
}

/// The same changed-block tracking with qemu-storage-daemon and a persistent qcow2 bitmap:
/// incremental while the daemon lives, but a SIGKILL loses a bitmap added since the image was
/// opened, and marks one that was stored before `inconsistent` (the qcow2 header still says
/// `in-use`): it records nothing, cannot be exported or cleared, and the next backup must read
/// the whole disk. (addcow's loop above stays incremental.)
#[test]
fn qemu_storage_daemon_needs_a_full_backup_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let base = p("base.raw");
    std::fs::write(&base, vec![7u8; (64 * MIB) as usize]).unwrap();
    let image = p("vm.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            image.to_str().unwrap(),
            "256M",
        ],
    );
    let (nbd, qmp_path) = (p("nbd.sock"), p("qmp.sock"));
    let uri = format!("nbd+unix:///vm?socket={}", nbd.display());
    let export = |q: &mut Qmp, bitmaps: &[&str]| {
        q.call(
            "block-export-add",
            json!({"type": "nbd", "id": "vm", "node-name": "disk", "name": "vm",
                   "writable": true, "bitmaps": bitmaps}),
        )
    };
    let (mut child, mut q) = qsd(&image, &nbd, &qmp_path);
    q.call(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c0", "persistent": true, "granularity": 65536}),
    )
    .expect("block-dirty-bitmap-add");
    export(&mut q, &[]).expect("export");
    wait_ok(fio(&uri, 1, Some("8M")), "fio");
    let b = q.bitmaps("disk");
    eprintln!("qemu-storage-daemon, before the SIGKILL: {b}");
    assert_eq!(b[0]["recording"], true, "{b}");
    assert!(b[0]["count"].as_u64().unwrap() > 0, "{b}");
    // The incremental a live qsd serves: only the dirty extents.
    q.call("block-export-del", json!({"id": "vm"}))
        .expect("del");
    wait_until("the export is gone", || {
        q.call("query-block-exports", json!({}))
            .map(|r| r.as_array().is_some_and(|a| a.is_empty()))
            .unwrap_or(false)
    });
    export(&mut q, &["c0"]).expect("export with c0");
    let out = p("restore.img");
    std::fs::File::create(&out).unwrap();
    let inc = backup_client(&uri, "qemu:dirty-bitmap:c0", &out);
    eprintln!(
        "qemu-storage-daemon incremental from c0 while it runs: bytes_read {}",
        inc.bytes_read
    );
    assert!(inc.bytes_read > 0 && inc.bytes_read < SIZE / 4, "{inc:?}");
    // Writes (flushed every 8), then a SIGKILL: a bitmap added since the image was opened is
    // not in the qcow2 file at all (QEMU stores persistent bitmaps when it closes the image).
    wait_ok(fio(&uri, 2, Some("8M")), "fio");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(q);
    let qcow_bitmaps = || {
        let info = run(
            "qemu-img",
            &["info", "--output=json", image.to_str().unwrap()],
        );
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        info["format-specific"]["data"]["bitmaps"].clone()
    };
    let lost = qcow_bitmaps();
    eprintln!("qemu-img info after a SIGKILL, bitmap added while running: bitmaps {lost}");
    assert!(lost.as_array().is_none_or(|a| a.is_empty()), "{lost}");
    // Added again and stored by a clean stop; then the image is opened (the bitmap marked
    // in-use in its header), written, and the daemon killed.
    let (mut child, mut q) = qsd(&image, &nbd, &qmp_path);
    q.call(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c0", "persistent": true, "granularity": 65536}),
    )
    .expect("block-dirty-bitmap-add");
    q.call("quit", json!({})).expect("quit");
    child.wait().unwrap();
    drop(q);
    let (mut child, mut q) = qsd(&image, &nbd, &qmp_path);
    export(&mut q, &["c0"]).expect("export with c0");
    wait_ok(fio(&uri, 3, Some("8M")), "fio");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(q);
    let flags = qcow_bitmaps()[0]["flags"].clone();
    eprintln!("qemu-img info after the SIGKILL: bitmap c0 flags {flags}");
    assert!(
        flags
            .as_array()
            .is_some_and(|f| f.contains(&json!("in-use"))),
        "{flags}"
    );

    let (mut child, mut q) = qsd(&image, &nbd, &qmp_path);
    let b = q.bitmaps("disk");
    eprintln!("qemu-storage-daemon, restarted: {b}");
    assert_eq!(b[0]["inconsistent"], true, "{b}");
    assert_eq!(b[0]["recording"], false, "{b}");
    let e = export(&mut q, &["c0"]).unwrap_err();
    eprintln!("block-export-add with bitmaps [c0]: {e}");
    assert!(e["desc"].as_str().unwrap().contains("inconsistent"), "{e}");
    let e = q
        .call(
            "block-dirty-bitmap-clear",
            json!({"node": "disk", "name": "c0"}),
        )
        .unwrap_err();
    assert!(e["desc"].as_str().unwrap().contains("inconsistent"), "{e}");
    // What is left: a full backup (and a new bitmap from there).
    export(&mut q, &[]).expect("export");
    let full = backup_client(&uri, "full", &out);
    eprintln!(
        "qemu-storage-daemon after the SIGKILL: a full backup, bytes_read {} of {SIZE}",
        full.bytes_read
    );
    assert_eq!(full.bytes_read, SIZE);
    drop(q);
    child.kill().unwrap();
    child.wait().unwrap();
}
