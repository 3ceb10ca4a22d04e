//! Extent-ahead allocation on real files: the first write into a clear region of a sparse raw
//! image allocates its aligned extent (no bytes change, never past the disk's size), once; off
//! when asked; a bad size is refused at open with a clear error.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use addcow_engine::{DiskOptions, ErrorKind};
use addcow_engine_testkit::harness::*;

fn allocated(raw: &Path) -> u64 {
    std::fs::metadata(raw).expect("stat raw image").blocks() * 512
}

fn raw_of(f: &Fixture) -> std::path::PathBuf {
    f.overlay.with_extension("raw")
}

fn open_with(e: &addcow_engine::Engine, f: &Fixture, extent_ahead: u64) -> addcow_engine::Disk {
    e.open(
        &f.overlay,
        DiskOptions {
            extent_ahead,
            ..DiskOptions::default()
        },
    )
    .expect("open overlay")
}

#[test]
fn a_first_write_allocates_its_extent_once_and_changes_no_byte() {
    // 8 MiB + 2 sectors: the last extent is clipped at the disk's end.
    let f = fixture((8 << 20) + 1024, 1 << 20);
    let raw = raw_of(&f);
    let mut model = Model::new(&f);
    let e = engine(2);
    let d = open_with(&e, &f, 1 << 20);
    assert_eq!(allocated(&raw), 0, "a new raw image is sparse");
    // 4 KiB into the middle of extent 3: the whole MiB is allocated.
    d.write_at((3 << 20) + 8192, &payload(1, 4096), false)
        .expect("write");
    model.write((3 << 20) + 8192, &payload(1, 4096));
    let a = allocated(&raw);
    assert!(
        ((1 << 20)..(1 << 20) + (64 << 10)).contains(&a),
        "one extent allocated: {a}"
    );
    // More writes into the same extent allocate nothing more.
    for i in 0..8u64 {
        d.write_at(
            (3 << 20) + (100 << 10) + i * 65536,
            &payload(2 + i, 4096),
            false,
        )
        .expect("write");
        model.write((3 << 20) + (100 << 10) + i * 65536, &payload(2 + i, 4096));
    }
    // (32 KiB written; at most an extent-tree block more, as the extent splits.)
    let more = allocated(&raw) - a;
    assert!(
        more <= 8192,
        "writes inside an allocated extent allocated {more} bytes"
    );
    // An unaligned write over the base (read-modify-write) in extent 0, and a write of the
    // disk's last sector: the last extent ends at the disk's end, the file keeps its size.
    d.write_at(1000, &payload(20, 3000), false).expect("write");
    model.write(1000, &payload(20, 3000));
    let size = f.size;
    d.write_at(size - 512, &payload(21, 512), false)
        .expect("write");
    model.write(size - 512, &payload(21, 512));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "KEEP_SIZE");
    let a = allocated(&raw);
    assert!(
        ((2 << 20) + 1024..(3 << 20)).contains(&a),
        "extents 0, 3 and the clipped last one: {a}"
    );
    model.check(&d);
    d.flush().expect("flush");
    model.check_after_reopen(d, e, &f.overlay);
}

#[test]
fn extent_ahead_off_allocates_only_what_is_written() {
    let f = fixture(8 << 20, 0);
    let raw = raw_of(&f);
    let e = engine(1);
    let d = open_with(&e, &f, 0);
    d.write_at(3 << 20, &payload(1, 4096), false)
        .expect("write");
    assert!(allocated(&raw) < (64 << 10), "{}", allocated(&raw));
    d.close().expect("close");
}

#[test]
fn a_raw_image_without_holes_gets_no_extent_ahead() {
    let f = fixture(4 << 20, 0);
    let raw = raw_of(&f);
    std::fs::write(&raw, vec![0u8; 4 << 20]).expect("fill raw image");
    let before = allocated(&raw);
    let e = engine(1);
    let d = open_with(&e, &f, 1 << 20);
    d.write_at(1 << 20, &payload(1, 4096), false)
        .expect("write");
    assert_eq!(allocated(&raw), before);
    d.close().expect("close");
}

#[test]
fn a_bad_extent_ahead_size_is_refused_at_open() {
    let f = fixture(4 << 20, 0);
    let e = engine(1);
    for bad in [3000, 2048, (1 << 20) + 4096] {
        let err = e
            .open(
                &f.overlay,
                DiskOptions {
                    extent_ahead: bad,
                    ..DiskOptions::default()
                },
            )
            .expect_err("refused");
        assert!(
            matches!(err.kind(), ErrorKind::InvalidArgument(_)),
            "{bad}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("extent-ahead") && msg.contains("disk.add-cow"),
            "{msg}"
        );
    }
    // Read-only disks never allocate: any size is ignored there.
    let d = e
        .open(
            &f.overlay,
            DiskOptions {
                read_only: true,
                extent_ahead: 3000,
                ..DiskOptions::default()
            },
        )
        .expect("read-only open");
    d.close().expect("close");
}
