//! A backup loop like virtnbdbackup's, with real clients: a full backup (checkpoint c0) of a
//! 256 MiB overlay over a base, then incrementals, each reading only the extents that
//! `qemu:dirty-bitmap:PREVIOUS` marks dirty on the point-in-time export while fio keeps writing
//! to the live export, applied in order onto the full copy: after each, the restore equals
//! (`qemu-img compare`) the live export at that backup's instant. One cycle SIGKILLs the daemon
//! while fio writes (flushed and unflushed writes), another SIGKILLs it during a backup and
//! retries from the same previous checkpoint: the next incrementals are still exact and still
//! incremental (bytes read per cycle are printed and bounded well below the disk's size).

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
/// after every 8 writes, at offsets that differ from run to run: `amount` bytes (`None`: until
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
