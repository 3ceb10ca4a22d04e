//! Serving locks every file it relies on (OFD locks, so they hold between open file
//! descriptions of one process too): the overlay and its raw image exclusively when writable
//! (two overlays naming one raw image cannot both be served writable), and the base shared (so
//! nobody can take it for writing, e.g. to commit into it, while an overlay reads through it).

mod engine_common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use addcow_engine::format::{create, CreateOptions, OpenOptions, Overlay};
use addcow_engine::{DiskOptions, ErrorKind};
use engine_common::*;

/// Tries an OFD lock on `path` (exclusive or shared) from a fresh open file description.
fn can_lock(path: &Path, exclusive: bool) -> bool {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(exclusive)
        .open(path)
        .expect("open");
    try_lock(&f, exclusive)
}

fn try_lock(f: &File, exclusive: bool) -> bool {
    // SAFETY: all-zero is a valid flock.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive {
        libc::F_WRLCK as libc::c_short
    } else {
        libc::F_RDLCK as libc::c_short
    };
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open fd with a valid flock.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) == 0 }
}

/// A second overlay `other.add-cow` naming the fixture's raw image.
fn second_overlay(f: &Fixture) -> std::path::PathBuf {
    let other = f.dir.path().join("other.add-cow");
    create(&CreateOptions {
        overlay: other.clone(),
        base: f.base.clone(),
        image: Some(f.dir.path().join("disk.raw")),
        size: None,
        force: false,
    })
    .expect("create a second overlay over the same raw image");
    other
}

#[test]
fn two_overlays_naming_one_raw_image_are_not_both_served_writable() {
    let f = fixture(1 << 20, 1 << 20);
    let other = second_overlay(&f);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let err = e
        .open(&other, DiskOptions::default())
        .expect_err("the raw image is already served writable");
    assert_eq!(err.kind(), &ErrorKind::Locked, "{err}");
    assert!(
        err.to_string().contains("disk.raw"),
        "the error names the raw image: {err}"
    );
    let err = e
        .open(
            &other,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect_err("not even read-only: the raw image is being written");
    assert_eq!(err.kind(), &ErrorKind::Locked, "{err}");
    let err = Overlay::open(
        &other,
        &OpenOptions {
            read_only: false,
            ..OpenOptions::default()
        },
    )
    .expect_err("format-level open is refused too");
    assert_eq!(err.kind(), &ErrorKind::Locked, "{err}");
    assert!(
        !can_lock(&f.dir.path().join("disk.raw"), false),
        "the raw image is locked exclusively"
    );
    // Closing releases the raw image at once.
    d.close().expect("close");
    let d2 = e
        .open(&other, DiskOptions::default())
        .expect("the second overlay opens once the first is closed");
    d2.close().expect("close");
    e.shutdown().expect("shutdown");
}

#[test]
fn read_only_overlays_share_their_raw_image() {
    let f = fixture(1 << 20, 1 << 20);
    let other = second_overlay(&f);
    let e = engine(1);
    let a = e
        .open(
            &f.overlay,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("read-only");
    let b = e
        .open(
            &other,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("a second read-only overlay over the same raw image");
    assert!(
        !can_lock(&f.dir.path().join("disk.raw"), true),
        "nobody may write the raw image meanwhile"
    );
    a.close().expect("close");
    b.close().expect("close");
    assert!(can_lock(&f.dir.path().join("disk.raw"), true));
    e.shutdown().expect("shutdown");
}

#[test]
fn serving_holds_a_shared_lock_on_the_base() {
    let f = fixture(1 << 20, 1 << 20);
    let base = f.base.clone().expect("base");
    // A second writable overlay over the same base (its own raw image) is fine.
    let other = f.dir.path().join("other.add-cow");
    create(&CreateOptions {
        overlay: other.clone(),
        base: Some(base.clone()),
        image: None,
        size: None,
        force: false,
    })
    .expect("create");
    let e = engine(1);
    let a = open(&e, &f.overlay);
    let b = open(&e, &other);
    assert!(
        !can_lock(&base, true),
        "the base cannot be locked for writing while overlays read through it"
    );
    assert!(can_lock(&base, false), "readers may share it");
    a.close().expect("close");
    assert!(!can_lock(&base, true), "the other overlay still reads it");
    b.close().expect("close");
    assert!(
        can_lock(&base, true),
        "closing the last overlay releases the base"
    );
    // The other way round: a base locked for writing (say a commit into it) cannot be served.
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&base)
        .expect("open base");
    assert!(try_lock(&w, true));
    let err = e
        .open(&f.overlay, DiskOptions::default())
        .expect_err("the base is locked for writing");
    assert_eq!(err.kind(), &ErrorKind::Locked, "{err}");
    drop(w);
    let d = open(&e, &f.overlay);
    d.close().expect("close");
    e.shutdown().expect("shutdown");
}

/// Runs a QEMU tool (qemu-utils must be installed: scripts/test.sh installs it).
fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (Debian: apt-get install qemu-utils): {e}"))
}

#[test]
fn qemu_can_read_a_base_an_overlay_reads_through_but_not_write_it() {
    // The base lock uses QEMU's lock bytes, so QEMU and addcow share one base for reading
    // (say qcow2 overlays and add-cow overlays of one golden image on one host).
    let f = fixture(1 << 20, 1 << 20);
    let base = f.base.clone().expect("base");
    let base_s = base.to_str().expect("utf-8 path");
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let info = qemu("qemu-img", &["info", "-f", "raw", base_s]);
    assert!(
        info.status.success(),
        "qemu-img info (which takes QEMU's locks) reads the base: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let read = qemu("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", base_s]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let write = qemu("qemu-io", &["-f", "raw", "-c", "write 0 512", base_s]);
    assert!(
        !write.status.success(),
        "QEMU must not write a base being read through"
    );
    let msg = String::from_utf8_lossy(&write.stderr);
    assert!(msg.contains("lock"), "refused for the lock: {msg}");
    d.close().expect("close");
    let write = qemu("qemu-io", &["-f", "raw", "-c", "write 0 512", base_s]);
    assert!(
        write.status.success(),
        "once the overlay is closed the base is free: {}",
        String::from_utf8_lossy(&write.stderr)
    );
    e.shutdown().expect("shutdown");
}
