//! Block status with real clients: ranges that read as zeros (trimmed ranges of the raw image,
//! holes of the base) are reported `HOLE|ZERO` so copying clients skip them; extents stay
//! 512-aligned when the base's size is not; and `qemu-img map` of a fragmented overlay stays
//! linear (each `REQ_ONE` request walks only what it reports).

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{run, Control, Daemon};

const MIB: u64 = 1 << 20;

/// `nbdinfo --map` as (offset, length, type) rows.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &["--map", uri]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

fn overlay_on(dir: &std::path::Path, base: &std::path::Path, size: u64) -> std::path::PathBuf {
    let overlay = dir.join("disk.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.to_path_buf()),
        image: Some(dir.join("disk.raw")),
        size: Some(size),
        force: false,
    })
    .expect("create overlay");
    overlay
}

/// Trimmed ranges and the base's holes read as zeros and are reported as such (3); copying the
/// export reads only the data.
#[test]
fn zero_ranges_are_reported_and_copies_skip_them() {
    let dir = tempfile::tempdir().unwrap();
    // Base, 8 MiB: data in [0, 2M) and [4M, 6M), holes elsewhere.
    let base = dir.path().join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(8 * MIB).unwrap();
    f.write_all_at(&vec![0xab; 2 * MIB as usize], 0).unwrap();
    f.write_all_at(&vec![0xcd; 2 * MIB as usize], 4 * MIB)
        .unwrap();
    drop(f);
    let overlay = overlay_on(dir.path(), &base, 8 * MIB);
    let control = dir.path().join("ctl.sock");
    let d = Daemon::start(
        &dir.path().join("s.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    );
    // Written data over [6M, 7M), then [6.5M, 7M) trimmed.
    addcow_daemon_testkit::qemu_io(
        &d.uri(),
        &["write -P 0x11 6M 1M", "discard 6656k 512k", "flush"],
    );
    let got = map(&d.uri());
    let want = vec![
        (0, 2 * MIB, 0),
        (2 * MIB, 2 * MIB, 3),
        (4 * MIB, 2 * MIB + 512 * 1024, 0),
        (6 * MIB + 512 * 1024, MIB + 512 * 1024, 3),
    ];
    assert_eq!(got, want, "nbdinfo --map");
    // QEMU (extended headers) sees the same.
    let qmap = run("qemu-img", &["map", "-f", "raw", "--output=json", &d.uri()]);
    assert!(
        qmap.contains("\"start\": 2097152, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
        "{qmap}"
    );
    // nbdcopy reads only the 4.5 MiB of data.
    let mut c = Control::connect(&control);
    let before = c.ok("query-stats", serde_json::json!({}))[0]["ops"]["read"]["bytes"]
        .as_u64()
        .unwrap();
    let out = dir.path().join("copy.raw");
    run("nbdcopy", &[&d.uri(), out.to_str().unwrap()]);
    let read = c.ok("query-stats", serde_json::json!({}))[0]["ops"]["read"]["bytes"]
        .as_u64()
        .unwrap()
        - before;
    assert!(
        read <= 4 * MIB + 512 * 1024,
        "nbdcopy read {read} bytes: zero ranges were not skipped"
    );
    // And the copy is right.
    let copy = std::fs::read(&out).unwrap();
    assert!(copy[..2 * MIB as usize].iter().all(|&b| b == 0xab));
    assert!(copy[2 * MIB as usize..4 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(copy[4 * MIB as usize..6 * MIB as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(copy[6 * MIB as usize..6 * MIB as usize + 512 * 1024]
        .iter()
        .all(|&b| b == 0x11));
    assert!(copy[6 * MIB as usize + 512 * 1024..]
        .iter()
        .all(|&b| b == 0));
    d.stop();
}

/// A base whose size is not a multiple of 512: every extent boundary inside the disk is.
#[test]
fn extents_stay_sector_aligned_with_an_odd_sized_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; (4 * MIB + 100) as usize]).unwrap();
    let overlay = overlay_on(dir.path(), &base, 8 * MIB);
    let d = Daemon::start(&dir.path().join("s.sock"), &[overlay.to_str().unwrap()]);
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let out = run("nbdinfo", &[&format!("--map={ctx}"), &d.uri()]);
        let mut end = 0;
        for l in out.lines() {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            if f.len() == 2 {
                end = f[0] + f[1];
                assert!(
                    end % 512 == 0 || end == 8 * MIB,
                    "{ctx}: extent ends at {end}:\n{out}"
                );
            }
        }
        assert_eq!(end, 8 * MIB, "{ctx}:\n{out}");
    }
    // The base's last (partial) sector is data; past it, zeros.
    let got = map(&d.uri());
    assert_eq!(
        got,
        vec![(0, 4 * MIB + 512, 0), (4 * MIB + 512, 4 * MIB - 512, 3)]
    );
    d.stop();
}

/// `qemu-img map` of an overlay fragmented into 32768 single-sector runs: QEMU asks `REQ_ONE`
/// from each extent to the end of the disk; with a walk bounded by what is reported this is
/// linear and finishes quickly, where walking the whole rest of the disk each time is quadratic.
#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn mapping_a_fragmented_overlay_stays_linear() {
    let dir = tempfile::tempdir().unwrap();
    // No base: clear bits read as zeros (3), set bits as the raw image's data (0).
    let overlay = dir.path().join("disk.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: None,
        image: Some(dir.path().join("disk.raw")),
        size: Some(64 * MIB),
        force: false,
    })
    .expect("create overlay");
    // Every other sector of the first 16 MiB held by the raw image (data written and bits set
    // by hand, as a long-lived guest leaves it).
    let runs = 16 * MIB / 512;
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("disk.raw"))
        .unwrap()
        .write_all_at(&vec![0x11u8; 16 * MIB as usize], 0)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&overlay)
        .unwrap()
        .write_all_at(&vec![0x55u8; (runs / 8) as usize], 2560)
        .unwrap();
    let d = Daemon::start(&dir.path().join("s.sock"), &[overlay.to_str().unwrap()]);
    let start = Instant::now();
    let out = run("qemu-img", &["map", "-f", "raw", "--output=json", &d.uri()]);
    let took = start.elapsed();
    let extents = out.lines().filter(|l| l.contains("\"start\"")).count();
    eprintln!("qemu-img map: {extents} extents in {took:?}");
    assert!(extents as u64 >= runs, "{extents} extents");
    // Generous for a loaded CI machine; the quadratic walk takes minutes here.
    assert!(
        took < Duration::from_secs(60),
        "qemu-img map took {took:?} for {extents} extents"
    );
    d.stop();
}
