//! `create` writes exactly the spec's bytes; created overlays open, and bits set through the
//! library survive a reopen.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use addcow_engine::format::{
    create, map_runs, CreateOptions, Header, OpenOptions, Overlay, BITMAP_OFFSET, MAX_VIRTUAL_SIZE,
};
use addcow_engine::ErrorKind;

fn setup() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    (t, root)
}

#[test]
fn create_output_byte_for_byte() {
    let (_t, root) = setup();
    let base = root.join("base.img");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let overlay = root.join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        ..Default::default()
    })
    .unwrap();
    let bytes = std::fs::read(&overlay).unwrap();
    // 1 MiB = 2048 sectors = 256 bitmap bytes.
    let mut want = vec![0u8; 2560 + 256];
    want[..8].copy_from_slice(b"ADD_COW\xff");
    want[8..12].copy_from_slice(&[0, 0, 0, 1]);
    let b = base.to_str().unwrap().as_bytes(); // absolute stays absolute
    want[12..12 + b.len()].copy_from_slice(b);
    want[1036..1036 + 6].copy_from_slice(b"vm.raw"); // default image, stored relative
    assert!(bytes == want, "create's bytes differ from the spec's");
    let raw = root.join("vm.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);

    // Refuses to overwrite without force; force works.
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::AlreadyExists);
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        force: true,
        ..Default::default()
    })
    .unwrap();
    assert!(std::fs::read(&overlay).unwrap() == want);
}

#[test]
fn create_sizes_and_refusals() {
    let (_t, root) = setup();
    let overlay = root.join("a.add-cow");
    // No base and no size.
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument(_)), "{e}");
    // Unaligned size.
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        size: Some(1000),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument(_)), "{e}");
    // Missing base.
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(root.join("missing.img")),
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotFound);
    // Protocol base.
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some("http://host/x".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::UnsupportedProtocol { .. }),
        "{e}"
    );
    // Path of 1024 bytes.
    let long = PathBuf::from(format!("/{}", "x".repeat(1023)));
    let e = create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(long),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::PathTooLong { .. }), "{e}");
    assert!(!overlay.exists());

    // --size with no base, and an existing image keeps its size.
    create(&CreateOptions {
        overlay: overlay.clone(),
        size: Some(3 << 20),
        ..Default::default()
    })
    .unwrap();
    let o = Overlay::open(&overlay, &OpenOptions::default()).unwrap();
    assert_eq!(o.virtual_size, 3 << 20);
    assert!(o.base.is_none());
    drop(o);
    let img = root.join("given.raw");
    std::fs::File::create(&img).unwrap().set_len(8192).unwrap();
    let o2 = root.join("b.add-cow");
    create(&CreateOptions {
        overlay: o2.clone(),
        image: Some(img.clone()),
        ..Default::default()
    })
    .unwrap();
    let o = Overlay::open(&o2, &OpenOptions::default()).unwrap();
    assert_eq!(o.virtual_size, 8192);
    // A locked overlay is not overwritten even with force.
    let e = create(&CreateOptions {
        overlay: o2.clone(),
        image: Some(img),
        force: true,
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Locked);
}

#[test]
fn set_bits_reopen_same_map() {
    let (_t, root) = setup();
    let base = root.join("base.img");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
    let overlay = root.join("rt.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        size: Some(8 << 20),
        ..Default::default()
    })
    .unwrap();
    let o = Overlay::open(&overlay, &OpenOptions::default()).unwrap();
    let before = map_runs(&o).unwrap();
    // Set sectors through the library and persist the bitmap bytes it reports.
    for (s, n) in [(0u64, 8u64), (4096, 2048), (16383, 1)] {
        let (a, b) = o.bitmap.set_range(s, n).unwrap();
        let mut buf = vec![0u8; (b - a + 1) as usize];
        o.bitmap.copy_bytes(a, &mut buf);
        o.meta.write_all_at(&buf, BITMAP_OFFSET + a).unwrap();
    }
    let after = map_runs(&o).unwrap();
    assert_ne!(before, after);
    drop(o);
    let o = Overlay::open(&overlay, &OpenOptions::default()).unwrap();
    assert_eq!(map_runs(&o).unwrap(), after);
    assert_eq!(o.bitmap.count_set(), 8 + 2048 + 1);
    let raw: Vec<_> = after.iter().filter(|r| r.depth == 0 && r.present).collect();
    assert_eq!(raw.len(), 3);
    assert_eq!((raw[1].start, raw[1].length), (4096 * 512, 2048 * 512));
    // Header untouched.
    let h = std::fs::read(&overlay).unwrap();
    let parsed = Header::parse(&h).unwrap();
    assert_eq!(parsed.image_file, b"rt.raw");
    assert_eq!(
        parsed.backing_file,
        root.join("base.img").to_str().unwrap().as_bytes()
    );
}

#[test]
fn relative_paths_stored_relative_to_overlay_dir() {
    let (_t, root) = setup();
    std::fs::create_dir_all(root.join("bases")).unwrap();
    std::fs::create_dir_all(root.join("vms/one")).unwrap();
    std::fs::File::create(root.join("bases/u.img"))
        .unwrap()
        .set_len(65536)
        .unwrap();
    // Run from `root` as the working directory through a child process is overkill: paths
    // relative to the cwd are built by going through the cwd's relation to `root`.
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let rel = |p: &str| pathdiff(&cwd, &root.join(p));
    let overlay = rel("vms/one/d.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(rel("bases/u.img")),
        ..Default::default()
    })
    .unwrap();
    let h = Header::parse(&std::fs::read(&overlay).unwrap()).unwrap();
    assert_eq!(h.backing_file, b"../../bases/u.img");
    assert_eq!(h.image_file, b"d.raw");
    std::fs::rename(root.join("vms"), root.join("bases/vms")).unwrap_or(());
    // Moving the whole tree keeps it working.
    let moved = root.parent().unwrap().join(format!(
        "{}-moved",
        root.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::rename(&root, &moved).unwrap();
    let o = Overlay::open(
        &moved.join("bases/vms/one/d.add-cow"),
        &OpenOptions::default(),
    );
    // The vms folder moved into bases, so ../../bases/u.img no longer resolves: refused clearly.
    assert_eq!(o.unwrap_err().kind(), &ErrorKind::NotFound);
    std::fs::rename(moved.join("bases/vms"), moved.join("vms")).unwrap();
    let o = Overlay::open(&moved.join("vms/one/d.add-cow"), &OpenOptions::default()).unwrap();
    assert_eq!(o.virtual_size, 65536);
    std::fs::rename(&moved, &root).unwrap();
}

/// A relative path from `from` (a directory) to `to`.
fn pathdiff(from: &std::path::Path, to: &std::path::Path) -> PathBuf {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

#[test]
fn create_refuses_to_overwrite_the_base() {
    let (_t, root) = setup();
    let base = root.join("base.img");
    std::fs::write(&base, vec![9u8; 8192]).unwrap();
    // Raw image = base.
    let e = create(&CreateOptions {
        overlay: root.join("o.add-cow"),
        base: Some(base.clone()),
        image: Some(base.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::SameFile { .. }), "{e}");
    // Overlay = base, even with --force.
    let e = create(&CreateOptions {
        overlay: base.clone(),
        base: Some(base.clone()),
        force: true,
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::SameFile { .. }), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), vec![9u8; 8192]);
}

/// Every file under `dir` with its bytes, to see that a refusal changed nothing.
fn files(dir: &std::path::Path) -> Vec<(PathBuf, u64, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let len = std::fs::metadata(&p).unwrap().len();
            // Huge sparse files: their length and first bytes.
            let mut head = vec![0u8; len.min(1 << 16) as usize];
            std::fs::File::open(&p)
                .unwrap()
                .read_exact_at(&mut head, 0)
                .unwrap();
            (p, len, head)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn create_refuses_a_size_over_the_limit_and_writes_nothing() {
    let (_t, root) = setup();
    let opts = CreateOptions {
        overlay: root.join("vm.add-cow"),
        size: Some(MAX_VIRTUAL_SIZE + 512),
        ..CreateOptions::default()
    };
    let e = create(&opts).unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::TooLarge {
            size: MAX_VIRTUAL_SIZE + 512,
            max: MAX_VIRTUAL_SIZE
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("vm.raw") && msg.contains("64 TiB"), "{msg}");
    assert!(
        files(&root).is_empty(),
        "a refused create left files behind"
    );
    // u64::MAX (rounded to sectors) too: no allocation is attempted.
    let e = create(&CreateOptions {
        size: Some(u64::MAX / 512 * 512),
        ..opts
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TooLarge { .. }), "{e}");
    assert!(files(&root).is_empty());
}

/// A raw image over the limit (a sparse file on tmpfs: ext4 holds at most 16 TiB): `create`
/// refuses it as an existing raw image, and opening an overlay whose raw image (or whose add-cow
/// base's raw image) grew past it is refused before its bitmap is allocated.
#[test]
fn raw_images_over_the_limit_are_refused_by_create_and_open() {
    let Ok(t) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("SKIPPED: no /dev/shm to hold a sparse file over 64 TiB");
        return;
    };
    let root = t.path();
    let big = root.join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_VIRTUAL_SIZE + 512)
        .unwrap();
    let before = files(root);
    let e = create(&CreateOptions {
        overlay: root.join("vm.add-cow"),
        image: Some(big.clone()),
        ..CreateOptions::default()
    })
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("big.raw"), "{e}");
    assert_eq!(files(root), before, "a refused create changed a file");

    // An overlay made at 1 MiB whose raw image then grew past the limit.
    let top = root.join("top.add-cow");
    create(&CreateOptions {
        overlay: top.clone(),
        size: Some(1 << 20),
        ..CreateOptions::default()
    })
    .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("top.raw"))
        .unwrap()
        .set_len(MAX_VIRTUAL_SIZE + 512)
        .unwrap();
    let e = Overlay::open(&top, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("top.raw"), "{e}");
    // The same overlay as the add-cow base of another one: the chain refuses that layer.
    let upper = root.join("upper.add-cow");
    create(&CreateOptions {
        overlay: upper.clone(),
        base: Some(top.clone()),
        size: Some(1 << 20),
        ..CreateOptions::default()
    })
    .unwrap();
    let e = Overlay::open(&upper, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("top.raw"), "{e}");
    // A raw base has no bitmap: any size is fine under a small overlay.
    let over_raw = root.join("over-raw.add-cow");
    create(&CreateOptions {
        overlay: over_raw.clone(),
        base: Some(big.clone()),
        size: Some(1 << 20),
        ..CreateOptions::default()
    })
    .unwrap();
    Overlay::open(&over_raw, &OpenOptions::default()).unwrap();
}

/// `create_exclusive` (a live snapshot's create) makes both files itself: anything already at
/// either path (a file, an empty file swapped in, a symlink to a file) is refused with
/// `AlreadyExists` and left exactly as it was, with nothing else created; a create that fails
/// after it made the raw image removes it; on success it reports both files, and `remove`
/// removes them, but not a file someone put at one of the paths since.
#[test]
fn create_exclusive_never_uses_an_existing_file_and_removes_only_what_it_made() {
    use addcow_engine::format::create_exclusive;
    let (_t, root) = setup();
    let base = root.join("base.img");
    std::fs::write(&base, vec![3u8; 1 << 16]).unwrap();
    let opts = |name: &str| CreateOptions {
        overlay: root.join(format!("{name}.add-cow")),
        base: Some(base.clone()),
        size: Some(1 << 16),
        // Ignored in exclusive mode.
        force: true,
        ..Default::default()
    };

    // An (empty) file at the overlay's path, as a racer could swap in: refused, not written.
    std::fs::write(root.join("a.add-cow"), b"").unwrap();
    let before = files(&root);
    let e = create_exclusive(&opts("a")).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::AlreadyExists, "{e}");
    assert_eq!(
        files(&root),
        before,
        "an exclusive create changed something"
    );

    // A file at the raw image's path: refused (never used as the new raw image).
    std::fs::write(root.join("b.raw"), vec![7u8; 1 << 16]).unwrap();
    let before = files(&root);
    let e = create_exclusive(&opts("b")).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::AlreadyExists, "{e}");
    assert_eq!(files(&root), before);

    // A symlink at the raw image's path, to an existing file: not followed.
    let other = root.join("other.img");
    std::fs::write(&other, vec![5u8; 1 << 16]).unwrap();
    std::os::unix::fs::symlink(&other, root.join("c.raw")).unwrap();
    let e = create_exclusive(&opts("c")).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&other).unwrap(), vec![5u8; 1 << 16]);
    assert!(!root.join("c.add-cow").exists());

    // The raw image is made, then the overlay cannot be: the raw image is removed again.
    let elsewhere = CreateOptions {
        overlay: root.join("missing-dir/d.add-cow"),
        image: Some(root.join("d.raw")),
        ..opts("d")
    };
    create_exclusive(&elsewhere).unwrap_err();
    assert!(
        !root.join("d.raw").exists(),
        "a failed create left its raw image"
    );

    // Success: both files reported; remove takes exactly those.
    let made = create_exclusive(&opts("e")).unwrap();
    let paths: Vec<PathBuf> = made.paths().map(PathBuf::from).collect();
    assert_eq!(paths, [root.join("e.raw"), root.join("e.add-cow")]);
    assert!(Overlay::open(&root.join("e.add-cow"), &OpenOptions::default()).is_ok());
    // Someone replaced the raw image meanwhile: theirs stays.
    std::fs::remove_file(root.join("e.raw")).unwrap();
    std::fs::write(root.join("e.raw"), b"theirs").unwrap();
    made.remove().unwrap();
    assert!(!root.join("e.add-cow").exists());
    assert_eq!(std::fs::read(root.join("e.raw")).unwrap(), b"theirs");
}
