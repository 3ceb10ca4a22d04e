//! End to end: `addcow map` on real files: its JSON against an independent model, a round trip
//! (create, set bits through the library, reopen, same map) and against `qemu-img map` on the
//! equivalent qcow2 overlay.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use addcow_daemon_testkit::addcow_ok;
use addcow_engine::format::{map_runs, MapRun, OpenOptions, Overlay, BITMAP_OFFSET};
use rand::{Rng, SeedableRng};

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    (t, root)
}

/// Sets sectors `[start, start+count)` through the library and persists the changed bytes.
fn set_and_persist(o: &Overlay, start: u64, count: u64) {
    if let Some((a, b)) = o.bitmap.set_range(start, count) {
        let mut buf = vec![0u8; (b - a + 1) as usize];
        o.bitmap.copy_bytes(a, &mut buf);
        o.meta.write_all_at(&buf, BITMAP_OFFSET + a).unwrap();
    }
}

fn map_json(root: &Path, overlay: &str) -> (String, Vec<MapRun>) {
    let s = addcow_ok(root, &["map", "--json", overlay]);
    let runs = serde_json::from_str(&s).unwrap();
    (s, runs)
}

#[test]
fn round_trip_against_a_model() {
    let (_t, root) = tmp();
    addcow_ok(&root, &["create", "--size", "1M", "rt.add-cow"]);
    let (_, fresh) = map_json(&root, "rt.add-cow");
    assert_eq!(
        fresh,
        vec![MapRun {
            start: 0,
            length: 1 << 20,
            depth: 0,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None
        }]
    );

    let sectors = 2048u64;
    let mut model = vec![false; sectors as usize];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    {
        let o = Overlay::open(&root.join("rt.add-cow"), &OpenOptions::default()).unwrap();
        for _ in 0..40 {
            let s = rng.gen_range(0..sectors);
            let n = rng.gen_range(1..64);
            set_and_persist(&o, s, n);
            for x in s..(s + n).min(sectors) {
                model[x as usize] = true;
            }
        }
    }
    // Expected runs from the model alone.
    let mut want: Vec<MapRun> = Vec::new();
    let mut s = 0usize;
    while s < model.len() {
        let v = model[s];
        let mut e = s;
        while e < model.len() && model[e] == v {
            e += 1;
        }
        let (start, length) = (s as u64 * 512, (e - s) as u64 * 512);
        want.push(MapRun {
            start,
            length,
            depth: 0,
            present: v,
            zero: !v,
            data: v,
            compressed: false,
            offset: v.then_some(start),
        });
        s = e;
    }
    let (text, got) = map_json(&root, "rt.add-cow");
    assert_eq!(got, want);
    // The library, reopened, agrees with the tool byte for byte.
    let o = Overlay::open(&root.join("rt.add-cow"), &OpenOptions::default()).unwrap();
    let lib = map_runs(&o).unwrap();
    assert_eq!(lib, want);
    assert_eq!(addcow_engine::format::map::map_json(&lib), text);

    // Text mode shows human-readable lengths.
    let t = addcow_ok(&root, &["map", "rt.add-cow"]);
    assert!(t.starts_with("Start"), "{t}");
    assert!(t.contains("raw image") && t.contains("zeros"), "{t}");
}

/// Drops the host offset of raw-image runs (qcow2 puts data elsewhere in its file) and merges
/// neighbours that then look the same.
fn normalize(runs: Vec<MapRun>) -> Vec<MapRun> {
    let mut out: Vec<MapRun> = Vec::new();
    for mut r in runs {
        if r.depth == 0 && r.present {
            r.offset = None;
        }
        if let Some(last) = out.last_mut() {
            let same = last.depth == r.depth
                && last.present == r.present
                && last.zero == r.zero
                && last.data == r.data
                && last.start + last.length == r.start
                && match (last.offset, r.offset) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a + last.length == b,
                    _ => false,
                };
            if same {
                last.length += r.length;
                continue;
            }
        }
        out.push(r);
    }
    out
}

#[test]
fn same_map_as_qemu_img_on_the_equivalent_qcow2() {
    for tool in ["qemu-img", "qemu-io"] {
        // Required, never skipped: scripts/test.sh installs qemu-utils.
        if let Err(e) = Command::new(tool).arg("--version").output() {
            panic!(
                "{tool} is not installed (apt-get install qemu-utils; scripts/test.sh does): {e}"
            );
        }
    }
    let (_t, root) = tmp();
    // A 4 MiB base with data at 64 KiB (4 KiB) and 1 MiB (64 KiB), holes elsewhere.
    let base = std::fs::File::create(root.join("base.raw")).unwrap();
    base.set_len(4 << 20).unwrap();
    base.write_all_at(&[0xab; 4096], 64 << 10).unwrap();
    base.write_all_at(&[0xcd; 65536], 1 << 20).unwrap();
    base.sync_all().unwrap();
    drop(base);

    // The disk is 6 MiB: 2 MiB past the base's end. Writes (64 KiB-aligned, qcow2's clusters):
    // inside the base's data, in a base hole, and past the base's end.
    let writes: [(u64, u64); 3] = [
        (1 << 20, 64 << 10),
        (2 << 20, 128 << 10),
        (5 << 20, 64 << 10),
    ];

    addcow_ok(
        &root,
        &["create", "-b", "base.raw", "--size", "6M", "ov.add-cow"],
    );
    {
        let o = Overlay::open(&root.join("ov.add-cow"), &OpenOptions::default()).unwrap();
        for (off, len) in writes {
            set_and_persist(&o, off / 512, len / 512);
        }
    }
    let q = |args: &[&str]| {
        let o = Command::new(args[0])
            .args(&args[1..])
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    q(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2", "6M",
    ]);
    for (off, len) in writes {
        q(&["qemu-io", "-c", &format!("write {off} {len}"), "ov.qcow2"]);
    }
    let qm = q(&["qemu-img", "map", "--output=json", "ov.qcow2"]);
    let qemu: Vec<MapRun> = serde_json::from_slice(&qm.stdout).unwrap();
    let (_, ours) = map_json(&root, "ov.add-cow");
    assert_eq!(
        normalize(ours.clone()),
        normalize(qemu.clone()),
        "\nours: {ours:#?}\nqemu: {qemu:#?}"
    );
}
