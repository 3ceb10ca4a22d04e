//! The lifecycle library calls (resize, rebase, commit) on real files, beyond what the crash
//! checker covers: add-cow bases on either side of a rebase, `-u`, a base larger than the
//! overlay, nothing to commit, stray bits past the end, and the locks.

use std::path::Path;

use addcow_engine::format::{OpenOptions, Overlay};
use addcow_engine::lifecycle::{
    commit, rebase, resize, CommitOptions, Ops, RebaseOptions, ResizeOptions,
};
use addcow_engine::ErrorKind;
use addcow_engine_testkit::lifecycle::{guest, overlay, raw_base};

fn set(s: u64) -> bool {
    s % 3 == 0 || (40..60).contains(&s)
}

fn open_ro(p: &Path) -> Overlay {
    Overlay::open(
        p,
        &OpenOptions {
            read_only: true,
            no_lock: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

/// `mid.add-cow` (+ `mid.raw`) over `base.img`, every fourth sector written.
fn mid_overlay(dir: &Path, sectors: u64) -> std::path::PathBuf {
    let m = overlay(dir, Some("base.img"), sectors, |s| s % 4 == 1);
    std::fs::rename(&m, dir.join("mid.add-cow")).unwrap();
    std::fs::rename(dir.join("disk.raw"), dir.join("mid.raw")).unwrap();
    let mid = dir.join("mid.add-cow");
    let mut bytes = std::fs::read(&mid).unwrap();
    bytes[1036..1036 + 8].copy_from_slice(b"mid.raw\0");
    std::fs::write(&mid, bytes).unwrap();
    mid
}

#[test]
fn rebase_between_raw_and_add_cow_bases_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    let mid = mid_overlay(d, 200);
    let meta = overlay(d, Some("mid.add-cow"), 200, set);
    let before = guest(&meta);
    // Onto the raw base below the add-cow one: the middle layer's sectors are copied up.
    let r = rebase(
        &RebaseOptions {
            overlay: meta.clone(),
            new_base: Some(d.join("base.img")),
            unsafe_: false,
        },
        &Ops::new(),
    )
    .unwrap();
    assert!(r.copied > 0);
    assert_eq!(guest(&meta), before);
    assert_eq!(
        open_ro(&meta).base_path.as_deref(),
        Some(d.join("base.img").as_path())
    );
    // And back onto the add-cow one: the two bases differ only at the middle layer's own
    // sectors, which the first rebase already set in the top: nothing to copy.
    let r = rebase(
        &RebaseOptions {
            overlay: meta.clone(),
            new_base: Some(mid.clone()),
            unsafe_: false,
        },
        &Ops::new(),
    )
    .unwrap();
    assert_eq!(
        r.copied, 0,
        "every sector where they differ is already in the top"
    );
    assert_eq!(guest(&meta), before);
    assert!(open_ro(&meta).warnings.is_empty());
}

#[test]
fn rebase_unsafe_changes_only_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    raw_base(d, "other.img", 60_000, 7);
    let meta = overlay(d, Some("base.img"), 200, set);
    let raw_before = std::fs::read(d.join("disk.raw")).unwrap();
    let bitmap_before = std::fs::read(&meta).unwrap()[2560..].to_vec();
    rebase(
        &RebaseOptions {
            overlay: meta.clone(),
            new_base: Some(d.join("other.img")),
            unsafe_: true,
        },
        &Ops::new(),
    )
    .unwrap();
    assert_eq!(std::fs::read(d.join("disk.raw")).unwrap(), raw_before);
    assert_eq!(std::fs::read(&meta).unwrap()[2560..], bitmap_before[..]);
    let o = open_ro(&meta);
    assert_eq!(o.base_path.as_deref(), Some(d.join("other.img").as_path()));
    // Clear sectors now read the other base.
    let g = guest(&meta);
    let other = std::fs::read(d.join("other.img")).unwrap();
    assert_eq!(g[512..1024], other[512..1024]);
}

#[test]
fn commit_into_a_larger_base_keeps_its_size_and_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 300 * 512 + 100, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    let before = guest(&meta);
    let base_before = std::fs::read(d.join("base.img")).unwrap();
    let c = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &Ops::new(),
    )
    .unwrap();
    assert_eq!(c.base_grown_from, None);
    assert_eq!(c.bytes, (0..200).filter(|&s| set(s)).count() as u64 * 512);
    let base = std::fs::read(d.join("base.img")).unwrap();
    assert_eq!(base.len(), base_before.len());
    assert_eq!(base[..before.len()], before[..]);
    assert_eq!(base[before.len()..], base_before[before.len()..]);
    assert_eq!(open_ro(&meta).bitmap.count_set(), 0);
    assert_eq!(guest(&meta), before);
    // Committing an empty overlay changes nothing.
    let c = commit(&CommitOptions { overlay: meta }, &Ops::new()).unwrap();
    assert_eq!(c.bytes, 0);
    assert_eq!(std::fs::read(d.join("base.img")).unwrap(), base);
}

#[test]
fn commit_into_an_add_cow_base_sets_its_bits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    let mid = mid_overlay(d, 150);
    let meta = overlay(d, Some("mid.add-cow"), 200, set);
    let before = guest(&meta);
    let c = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &Ops::new(),
    )
    .unwrap();
    assert_eq!(c.base_grown_from, Some(150 * 512));
    let m = open_ro(&mid);
    assert_eq!(m.virtual_size, 200 * 512);
    assert!(m.warnings.is_empty());
    for s in 0..200 {
        assert_eq!(
            m.bitmap.get(s),
            set(s) || (s < 150 && s % 4 == 1),
            "sector {s}"
        );
    }
    drop(m);
    assert_eq!(guest(&mid), before);
    assert_eq!(guest(&meta), before);
}

#[test]
fn commit_is_refused_while_the_base_is_share_locked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    let base_before = std::fs::read(d.join("base.img")).unwrap();
    // A second overlay on the same base, opened as serving opens it (locks on).
    let other_dir = tempfile::tempdir().unwrap();
    let other = overlay(
        other_dir.path(),
        Some(d.join("base.img").to_str().unwrap()),
        200,
        |_| false,
    );
    let served = Overlay::open(&other, &OpenOptions::default()).unwrap();
    let e = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &Ops::new(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Locked);
    assert!(e.to_string().contains("in use"), "{e}");
    assert_eq!(std::fs::read(d.join("base.img")).unwrap(), base_before);
    assert!(open_ro(&meta).bitmap.count_set() > 0);
    drop(served);
    commit(&CommitOptions { overlay: meta }, &Ops::new()).unwrap();
}

#[test]
fn resize_grow_clears_stray_bits_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 200 * 512, 0);
    // 101 sectors: byte 12 covers sectors 96..104; set 97 and (stray) 101..104.
    let meta = overlay(d, Some("base.img"), 101, |s| s == 97);
    let mut m = std::fs::read(&meta).unwrap();
    m[2560 + 12] |= 0xe0;
    m.extend_from_slice(&[0xff; 3]); // and stray bytes after the bitmap
    std::fs::write(&meta, m).unwrap();
    assert!(!open_ro(&meta).warnings.is_empty());
    let before = guest(&meta);
    resize(
        &ResizeOptions {
            overlay: meta.clone(),
            size: 200 * 512,
            shrink: false,
        },
        &Ops::new(),
    )
    .unwrap();
    let o = open_ro(&meta);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    assert_eq!(o.bitmap.count_set(), 1);
    drop(o);
    let g = guest(&meta);
    assert_eq!(g[..before.len()], before[..]);
    // The grown sectors read the base, not the (hole) raw image.
    let base = std::fs::read(d.join("base.img")).unwrap();
    assert_eq!(g[before.len()..], base[before.len()..]);
}

#[test]
fn resize_over_the_size_limit_is_refused_and_changes_nothing() {
    use addcow_engine::format::MAX_VIRTUAL_SIZE;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 200 * 512, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    let read = || ["disk.add-cow", "disk.raw"].map(|f| std::fs::read(d.join(f)).unwrap());
    let before = read();
    for size in [u64::MAX / 512 * 512, MAX_VIRTUAL_SIZE + 512] {
        let e = resize(
            &ResizeOptions {
                overlay: meta.clone(),
                size,
                shrink: false,
            },
            &Ops::new(),
        )
        .unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::TooLarge {
                size,
                max: MAX_VIRTUAL_SIZE
            }
        );
        assert!(e.to_string().contains("disk.add-cow"), "{e}");
        assert!(read() == before, "a refused resize changed a file");
    }
}

/// `addcow resize --shrink OVERLAY -- -SIZE` while a server that grew the overlay
/// (`export-resize`) is stopping: the relative size applies to the size under the lock.
/// Applied to a size read before it, the shrink would cut into the grown disk's data.
#[cfg(feature = "lifecycle-hooks")]
#[test]
fn a_relative_resize_applies_to_the_size_under_the_lock() {
    use addcow_engine::lifecycle::resize_from;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 200 * 512, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    let before = guest(&meta);
    let m = meta.clone();
    // The server grows the disk to 400 sectors, then lets go, just before the tool's lock.
    let ops = Ops::new().before_lock(move || {
        resize(
            &ResizeOptions {
                overlay: m,
                size: 400 * 512,
                shrink: false,
            },
            &Ops::new(),
        )
        .unwrap();
    });
    let r = resize_from(&meta, true, |old| Ok(old - 100 * 512), &ops).unwrap();
    assert_eq!((r.old_size, r.new_size), (400 * 512, 300 * 512));
    let g = guest(&meta);
    assert_eq!(
        g.len(),
        300 * 512,
        "shrunk from a size read before the lock"
    );
    assert!(
        g[..before.len()] == before[..],
        "the first 200 sectors changed"
    );
}

#[test]
fn rebase_refuses_a_symlinked_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    std::os::unix::fs::symlink(&meta, d.join("link.add-cow")).unwrap();
    let e = rebase(
        &RebaseOptions {
            overlay: d.join("link.add-cow"),
            new_base: None,
            unsafe_: false,
        },
        &Ops::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(std::fs::symlink_metadata(d.join("link.add-cow"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!d.join(".link.add-cow.rebase-tmp").exists());
}

#[test]
fn rebase_unsafe_repairs_an_overlay_whose_base_vanished() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    // The base moved: the overlay no longer opens, and -u is how to point it at the new place.
    std::fs::rename(d.join("base.img"), d.join("moved.img")).unwrap();
    assert!(Overlay::open(&meta, &OpenOptions::default()).is_err());
    rebase(
        &RebaseOptions {
            overlay: meta.clone(),
            new_base: Some(d.join("moved.img")),
            unsafe_: true,
        },
        &Ops::new(),
    )
    .expect("rebase -u needs no old base");
    let o = open_ro(&meta);
    assert_eq!(o.base_path.as_deref(), Some(d.join("moved.img").as_path()));
}

#[test]
fn a_rebase_that_would_make_a_loop_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    // top over mid over base.img; rebasing mid onto top would loop.
    let mid = mid_overlay(d, 150);
    let top = overlay(d, Some("mid.add-cow"), 150, set);
    let mid_before = std::fs::read(&mid).unwrap();
    for unsafe_ in [true, false] {
        let e = rebase(
            &RebaseOptions {
                overlay: mid.clone(),
                new_base: Some(top.clone()),
                unsafe_,
            },
            &Ops::new(),
        )
        .unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::BackingLoop(_)),
            "-u {unsafe_}: {e}"
        );
        assert_eq!(std::fs::read(&mid).unwrap(), mid_before, "-u {unsafe_}");
    }
    // Still opens and reads.
    let _ = guest(&top);
}

/// A server that still has the overlay open when `commit` starts: commit is refused and changes
/// nothing (the base, the bits and the raw image are as they were).
#[test]
fn commit_is_refused_while_the_overlay_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 200 * 512, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    let files = |d: &Path| {
        ["base.img", "disk.add-cow", "disk.raw"].map(|f| std::fs::read(d.join(f)).unwrap())
    };
    let before = files(d);
    let served = Overlay::open(&meta, &OpenOptions::default()).unwrap();
    let e = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &Ops::new(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Locked, "{e}");
    assert!(files(d) == before, "a refused commit changed a file");
    drop(served);
}

/// A server stopping while `commit` starts (`addcow serve` got SIGTERM, a script runs `addcow
/// commit` at once): its last commit lands (data durable, then its bits) and it lets go of the
/// overlay at the moment commit is about to lock it. Every sector of that last commit must
/// reach the base, which holds only if commit reads the bitmap under its lock; read before it,
/// those sectors had their bits cleared and their data punched without ever being copied.
#[cfg(feature = "lifecycle-hooks")]
#[test]
fn commit_copies_what_a_stopping_server_committed_just_before_the_lock() {
    use std::os::unix::fs::FileExt;

    use addcow_engine::format::BITMAP_OFFSET;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 200 * 512, 0);
    let meta = overlay(d, Some("base.img"), 200, set);
    // The server's last commit: sectors it wrote that are not in the overlay yet.
    let late: Vec<u64> = (100..160).filter(|&s| !set(s)).collect();
    let mut want = guest(&meta);
    for &s in &late {
        want[(s * 512) as usize..((s + 1) * 512) as usize].fill(0xee);
    }
    let server = Overlay::open(&meta, &OpenOptions::default()).unwrap();
    let last = late.clone();
    let ops = Ops::new().before_lock(move || {
        for &s in &last {
            server.image.write_all_at(&[0xee; 512], s * 512).unwrap();
        }
        server.image.sync_data().unwrap();
        for &s in &last {
            let at = BITMAP_OFFSET + s / 8;
            let mut b = [0u8; 1];
            server.meta.read_exact_at(&mut b, at).unwrap();
            b[0] |= 1 << (s % 8);
            server.meta.write_all_at(&b, at).unwrap();
        }
        server.meta.sync_data().unwrap();
        // It closes: its locks go.
        drop(server);
    });
    let c = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &ops,
    )
    .unwrap();
    let base = std::fs::read(d.join("base.img")).unwrap();
    for &s in &late {
        let r = (s * 512) as usize..((s + 1) * 512) as usize;
        assert!(
            base[r.clone()] == want[r],
            "sector {s}: committed by the server just before the commit locked the overlay, \
             but not copied into the base (it reads the old base now)"
        );
    }
    assert!(
        base == want,
        "the base differs from what the overlay served"
    );
    assert_eq!(
        c.bytes,
        ((0..200).filter(|&s| set(s)).count() + late.len()) as u64 * 512
    );
    assert_eq!(open_ro(&meta).bitmap.count_set(), 0);
    assert!(
        guest(&meta) == want,
        "the emptied overlay reads differently"
    );
}

#[test]
fn commit_into_a_smaller_add_cow_base_over_a_larger_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.img (300 sectors) under mid (150 sectors) under top (200 sectors): top's sectors
    // 150..200 read zeros today; growing mid would show base.img's bytes there.
    raw_base(d, "base.img", 300 * 512, 0);
    let mid = mid_overlay(d, 150);
    let meta = overlay(d, Some("mid.add-cow"), 200, set);
    let before = guest(&meta);
    let mid_before = std::fs::read(&mid).unwrap();
    let e = commit(
        &CommitOptions {
            overlay: meta.clone(),
        },
        &Ops::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("commit refused"), "{e}");
    assert_eq!(std::fs::read(&mid).unwrap(), mid_before);
    assert_eq!(guest(&meta), before);
}

#[test]
fn rebase_keeps_the_overlay_files_owner_group_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    raw_base(d, "base.img", 60_000, 0);
    raw_base(d, "other.img", 60_000, 7);
    let meta = overlay(d, Some("base.img"), 200, set);
    // As root (CI), the overlay belongs to another user first: the rebased file must too.
    let (uid, gid) = if nix_is_root() { (65534, 65534) } else { own() };
    std::os::unix::fs::chown(&meta, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&meta, std::fs::Permissions::from_mode(0o640)).unwrap();
    for unsafe_ in [false, true] {
        rebase(
            &RebaseOptions {
                overlay: meta.clone(),
                new_base: Some(d.join(if unsafe_ { "base.img" } else { "other.img" })),
                unsafe_,
            },
            &Ops::new(),
        )
        .unwrap();
        let m = std::fs::metadata(&meta).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid), "-u {unsafe_}");
        assert_eq!(m.permissions().mode() & 0o7777, 0o640, "-u {unsafe_}");
    }
}

/// Whether the tests run as root.
fn nix_is_root() -> bool {
    own().0 == 0
}

/// The uid and gid this process creates files with.
fn own() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::NamedTempFile::new().unwrap();
    let md = probe.as_file().metadata().unwrap();
    (md.uid(), md.gid())
}
