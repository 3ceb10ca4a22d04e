//! Serving locks every file it relies on (OFD locks, so they hold between open file
//! descriptions of one process too): the overlay and its raw image exclusively when writable
//! (two overlays naming one raw image cannot both be served writable), and the base shared (so
//! nobody can take it for writing, e.g. to commit into it, while an overlay reads through it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use addcow_engine::format::{create, CreateOptions, OpenOptions, Overlay};
use addcow_engine::{DiskOptions, ErrorKind};
use addcow_engine_testkit::harness::*;

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

/// Waits (polling, bounded) until a file changed now in `dir` gets a later modification time
/// than `path` has: on kernels without fine-grained timestamps a change within the same clock
/// tick as the last one would leave the times as they were.
fn let_the_clock_tick(path: &Path) {
    let probe = path.with_extension("tick");
    let before = std::fs::metadata(path)
        .expect("stat")
        .modified()
        .expect("mtime");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        std::fs::write(&probe, b"tick").expect("write probe");
        let now = std::fs::metadata(&probe)
            .expect("stat")
            .modified()
            .expect("mtime");
        if now > before || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::yield_now();
    }
    let _ = std::fs::remove_file(&probe);
}

/// A served overlay whose locks were let go (`unlock_overlay`, as a disk switch does) is taken
/// back only if it is still what the disk let go of: untouched, the locks come back and it is
/// written again; written in place (`.add-cow` or raw image) or replaced at its path (a rebase
/// renames a new file over it) meanwhile, the relock fails with `ChangedWhileUnlocked`, leaves
/// no lock of the overlay's own held, and `abandon` closes the disk without writing anything.
#[test]
fn relocking_refuses_an_overlay_written_or_replaced_while_it_was_unlocked() {
    use std::os::unix::fs::FileExt;
    let e = engine(1);
    let image_of = |f: &Fixture| f.overlay.with_extension("raw");
    let unlocked = |f: &Fixture| {
        let d = open(&e, &f.overlay);
        d.write_at(0, &[0x5a; 4096], false).expect("write");
        d.flush().expect("flush");
        d.unlock_overlay();
        assert!(can_lock(&f.overlay, true), "the overlay was let go");
        let_the_clock_tick(&f.overlay);
        d
    };
    let refused = |f: &Fixture, d: addcow_engine::Disk, what: &str| {
        let err = d.relock_overlay(None).expect_err(what);
        assert!(
            matches!(err.kind(), ErrorKind::ChangedWhileUnlocked(_)),
            "{what}: {err}"
        );
        assert!(
            can_lock(&image_of(f), true),
            "{what}: the raw image stays unlocked"
        );
        let meta = std::fs::read(&f.overlay).expect("read overlay");
        d.abandon().expect("abandon");
        assert_eq!(
            std::fs::read(&f.overlay).expect("read overlay"),
            meta,
            "{what}: abandoning the disk wrote the overlay"
        );
    };

    // Untouched: taken back, written again.
    let f = fixture(1 << 20, 0);
    let d = unlocked(&f);
    d.relock_overlay(None).expect("relock an untouched overlay");
    assert!(!can_lock(&f.overlay, true) && !can_lock(&image_of(&f), true));
    d.write_at(4096, &[0x5b; 4096], true)
        .expect("write after the relock");
    d.close().expect("close");

    // The bitmap written in place by another writer (a `serve` that came and went).
    let f = fixture(1 << 20, 0);
    let d = unlocked(&f);
    let meta = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.overlay)
        .unwrap();
    meta.write_all_at(&[0xff], 2560 + 100).unwrap();
    drop(meta);
    refused(&f, d, "bitmap written in place");

    // The raw image written in place.
    let f = fixture(1 << 20, 0);
    let d = unlocked(&f);
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(image_of(&f))
        .unwrap();
    raw.write_all_at(&[0x77; 512], 8192).unwrap();
    drop(raw);
    refused(&f, d, "raw image written in place");

    // A new `.add-cow` renamed over the path, as `addcow rebase` does: the old disk holds an
    // inode nobody opens any more.
    let f = fixture(1 << 20, 0);
    let d = unlocked(&f);
    let new = f.overlay.with_extension("new");
    std::fs::copy(&f.overlay, &new).unwrap();
    std::fs::rename(&new, &f.overlay).unwrap();
    refused(&f, d, "overlay replaced at its path");
    drop(e);
}

/// A caller that changed the overlay itself while it was unlocked (an offline grow) hands the
/// stamp its tool left (`Resized::left`): the relock accepts exactly that state, and refuses it
/// once anything changed after the tool let go.
#[test]
fn relocking_after_an_offline_grow_accepts_what_the_grow_left_and_nothing_else() {
    use addcow_engine::lifecycle::{resize, Ops, ResizeOptions};
    use std::os::unix::fs::FileExt;
    let e = engine(1);
    let grow = |f: &Fixture| {
        let d = open(&e, &f.overlay);
        d.write_at(0, &[0x5a; 4096], true).expect("write");
        d.flush().expect("flush");
        d.unlock_overlay();
        let opts = ResizeOptions {
            overlay: f.overlay.clone(),
            size: 2 << 20,
            shrink: false,
        };
        let grown = resize(&opts, &Ops::new()).expect("grow");
        (d, grown.left)
    };
    let f = fixture(1 << 20, 0);
    let (d, left) = grow(&f);
    d.relock_overlay(Some(&left))
        .expect("the grow's own change is accepted");
    d.write_at(4096, &[0x5b; 4096], true)
        .expect("write after the relock");
    d.close().expect("close");

    let f = fixture(1 << 20, 0);
    let (d, left) = grow(&f);
    let_the_clock_tick(&f.overlay);
    let meta = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.overlay)
        .unwrap();
    meta.write_all_at(&[0xff], 2560 + 300).unwrap();
    drop(meta);
    let err = d
        .relock_overlay(Some(&left))
        .expect_err("written after the grow");
    assert!(
        matches!(err.kind(), ErrorKind::ChangedWhileUnlocked(_)),
        "{err}"
    );
    d.abandon().expect("abandon");
    drop(e);
}

/// A relock refused because another writer holds the raw image names the raw image (not the
/// `.add-cow`), and leaves the `.add-cow` unlocked again.
#[test]
fn a_relock_refused_on_the_raw_image_names_the_raw_image() {
    let e = engine(1);
    let f = fixture(1 << 20, 0);
    let image = f.overlay.with_extension("raw");
    let d = open(&e, &f.overlay);
    d.flush().expect("flush");
    d.unlock_overlay();
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    assert!(try_lock(&holder, true), "the raw image was let go");
    let err = d.relock_overlay(None).expect_err("the raw image is held");
    assert_eq!(err.kind(), &ErrorKind::Locked, "{err}");
    assert_eq!(err.path(), Some(image.as_path()), "{err}");
    assert!(can_lock(&f.overlay, true), "the .add-cow stays unlocked");
    d.abandon().expect("abandon");
    drop(holder);
    drop(e);
}
