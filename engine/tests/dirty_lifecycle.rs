//! Dirty bitmaps through the disk's lifecycle and the engine API: populate (stream,
//! copy-on-read) leaves them alone, resize grows them dirty, commit dirties the base's own
//! bitmaps, a checkpoint freezes and disables the previous one, and a corrupt sidecar is a
//! clear error.

use std::path::{Path, PathBuf};

use addcow_engine::dirty::{open_offline, DirtySet, DirtySource};
use addcow_engine::format::{create, CreateOptions};
use addcow_engine::lifecycle::{commit, resize, CommitOptions, Ops, ResizeOptions};
use addcow_engine::{DiskOptions, Engine, EngineConfig, ErrorKind};

const MIB: u64 = 1 << 20;
const K64: u64 = 64 << 10;

fn overlay(dir: &Path, name: &str, base: Option<PathBuf>, size: u64) -> PathBuf {
    let o = dir.join(format!("{name}.add-cow"));
    create(&CreateOptions {
        overlay: o.clone(),
        base,
        image: Some(dir.join(format!("{name}.raw"))),
        size: Some(size),
        force: false,
    })
    .expect("create");
    o
}

fn engine() -> Engine {
    Engine::start(EngineConfig {
        cores: 2,
        ..EngineConfig::default()
    })
    .expect("engine")
}

fn dirty(set: &DirtySet, name: &str) -> Vec<(u64, u64)> {
    set.extents(name, 0, u64::MAX, usize::MAX)
        .expect("extents")
        .into_iter()
        .filter(|e| e.dirty)
        .map(|e| (e.offset, e.len))
        .collect()
}

#[test]
fn populate_leaves_bitmaps_clean_and_writes_dirty_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; 4 * MIB as usize]).unwrap();
    let o = overlay(dir.path(), "top", Some(base), 4 * MIB);
    let e = engine();
    let disk = e
        .open(
            &o,
            DiskOptions {
                copy_on_read: true,
                ..DiskOptions::default()
            },
        )
        .unwrap();
    disk.bitmaps().add("b", K64, true, true).unwrap();
    disk.populate(0, 2 * MIB).unwrap();
    disk.read_at(3 * MIB, 4096).unwrap();
    disk.flush().unwrap();
    assert_eq!(
        dirty(disk.bitmaps(), "b"),
        vec![],
        "populate and copy-on-read"
    );
    disk.write_at(MIB + 10, &[1; 10], false).unwrap();
    assert_eq!(dirty(disk.bitmaps(), "b"), vec![(MIB, K64)]);
    disk.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn resize_grows_enabled_bitmaps_dirty_and_shrink_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let o = overlay(dir.path(), "d", None, 4 * MIB);
    {
        let off = open_offline(&o, false).unwrap();
        off.set.add("on", K64, true, true).unwrap();
        off.set.add("off", K64, true, false).unwrap();
        off.set.mark(0, 4096).unwrap();
    }
    let ops = Ops::new();
    resize(
        &ResizeOptions {
            overlay: o.clone(),
            size: 6 * MIB,
            shrink: false,
        },
        &ops,
    )
    .unwrap();
    let off = open_offline(&o, false).unwrap();
    assert_eq!(dirty(&off.set, "on"), vec![(0, K64), (4 * MIB, 2 * MIB)]);
    assert_eq!(dirty(&off.set, "off"), vec![]);
    drop(off);
    // The grow was made durable at that open: a read-only open sees it.
    let ro = open_offline(&o, true).unwrap();
    assert_eq!(ro.set.list()[0].dirty_bytes, K64 + 2 * MIB);
    drop(ro);
    resize(
        &ResizeOptions {
            overlay: o.clone(),
            size: 5 * MIB,
            shrink: true,
        },
        &ops,
    )
    .unwrap();
    let off = open_offline(&o, false).unwrap();
    assert_eq!(dirty(&off.set, "on"), vec![(0, K64), (4 * MIB, MIB)]);
}

#[test]
fn commit_dirties_the_bases_own_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let mid = overlay(dir.path(), "mid", None, 4 * MIB);
    let top = overlay(dir.path(), "top", Some(mid.clone()), 4 * MIB);
    {
        let off = open_offline(&mid, false).unwrap();
        off.set.add("m", K64, true, true).unwrap();
    }
    let e = engine();
    let disk = e.open(&top, DiskOptions::default()).unwrap();
    disk.write_at(2 * MIB, &[7; 8192], false).unwrap();
    disk.close().unwrap();
    e.shutdown().unwrap();
    commit(&CommitOptions { overlay: top }, &Ops::new()).unwrap();
    let off = open_offline(&mid, true).unwrap();
    assert_eq!(dirty(&off.set, "m"), vec![(2 * MIB, K64)]);
}

#[test]
fn checkpoint_freezes_and_disables_the_previous_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let o = overlay(dir.path(), "d", None, 4 * MIB);
    let e = engine();
    let disk = e.open(&o, DiskOptions::default()).unwrap();
    assert!(disk.checkpoint("c1", K64, None).unwrap().is_none());
    disk.write_at(0, &[1; 512], false).unwrap();
    let frozen = disk.checkpoint("c2", K64, Some("c1")).unwrap().unwrap();
    disk.write_at(MIB, &[1; 512], false).unwrap();
    assert_eq!(frozen.dirty_bytes(), K64);
    let ext = frozen.dirty_extents(0, 4 * MIB, usize::MAX).unwrap();
    assert_eq!(ext.iter().filter(|x| x.dirty).count(), 1);
    let list = disk.bitmaps().list();
    assert!(!list[0].enabled && list[1].enabled);
    assert_eq!(dirty(disk.bitmaps(), "c1"), vec![(0, K64)]);
    assert_eq!(dirty(disk.bitmaps(), "c2"), vec![(MIB, K64)]);
    assert!(disk.checkpoint("c2", K64, None).is_err(), "name taken");
    assert!(disk.checkpoint("c3", K64, Some("nope")).is_err());
    assert_eq!(
        disk.bitmaps().list().len(),
        2,
        "a refused checkpoint adds nothing"
    );
    // A retry from c1 (disabled since c2 began): c1 and the later c2 together, so the
    // write after c2's instant is not missed.
    let retry = disk.checkpoint("c3", K64, Some("c1")).unwrap().unwrap();
    let ext = retry.dirty_extents(0, 4 * MIB, usize::MAX).unwrap();
    let got: Vec<(u64, u64)> = ext
        .iter()
        .filter(|x| x.dirty)
        .map(|x| (x.offset, x.len))
        .collect();
    assert_eq!(got, vec![(0, K64), (MIB, K64)], "c1 merged with c2");
    assert!(!disk.bitmaps().list()[0].enabled);
    disk.close().unwrap();
    // A corrupt sidecar: the disk does not open, with an error that says why.
    let side = addcow_engine::dirty::sidecar_path(&o);
    let mut b = std::fs::read(&side).unwrap();
    b[0] = b'X';
    std::fs::write(&side, &b).unwrap();
    let err = e.open(&o, DiskOptions::default()).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::BadBitmaps(_)), "{err}");
    assert!(err.to_string().contains("magic"), "{err}");
    e.shutdown().unwrap();
}

/// An overlay created over an old one (`--force`) does not inherit the old one's bitmaps.
#[test]
fn a_new_overlay_at_a_path_drops_stale_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let o = overlay(dir.path(), "d", None, MIB);
    {
        let off = open_offline(&o, false).unwrap();
        off.set.add("old", K64, true, true).unwrap();
    }
    assert!(addcow_engine::dirty::sidecar_path(&o).exists());
    std::fs::remove_file(dir.path().join("d.raw")).unwrap();
    create(&CreateOptions {
        overlay: o.clone(),
        base: None,
        image: Some(dir.path().join("d.raw")),
        size: Some(MIB),
        force: true,
    })
    .unwrap();
    assert!(!addcow_engine::dirty::sidecar_path(&o).exists());
    assert!(open_offline(&o, true).unwrap().set.list().is_empty());
}
