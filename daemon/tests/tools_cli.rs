//! End to end: the built `addcow` binary's `create`, `info`, `check` and `--help` on real files.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use addcow_daemon_testkit::{addcow, text};
use addcow_engine::format::{Header, OpenOptions, Overlay, BITMAP_OFFSET};

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    (t, root)
}

fn sparse(p: &Path, len: u64) {
    std::fs::File::create(p).unwrap().set_len(len).unwrap();
}

#[test]
fn help_on_every_command() {
    let (_t, root) = tmp();
    let top = addcow(&root, &["--help"]);
    assert!(top.status.success());
    let s = String::from_utf8_lossy(&top.stdout);
    for cmd in ["create", "info", "check", "map", "serve", "stream"] {
        assert!(s.contains(cmd), "{s}");
    }
    for (cmd, flags) in [
        (
            "create",
            &[
                "--base",
                "--image",
                "--size",
                "--force",
                "--preallocation",
                "OVERLAY",
            ][..],
        ),
        ("info", &["--json", "OVERLAY"]),
        ("check", &["--json", "OVERLAY", "Exit status"]),
        ("map", &["--json", "OVERLAY"]),
        ("stream", &["--rate", "OVERLAY"]),
    ] {
        let o = addcow(&root, &[cmd, "--help"]);
        assert!(o.status.success(), "{}", text(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        for f in flags {
            assert!(s.contains(f), "{cmd} --help lacks {f}: {s}");
        }
    }
}

#[test]
fn usage_errors_exit_1() {
    let (_t, root) = tmp();
    for args in [
        &["check"][..],
        &["check", "--bogus", "x"],
        &["create", "--size", "12Q", "x.add-cow"],
        &["nosuchcommand"],
    ] {
        let o = addcow(&root, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
    }
}

#[test]
fn create_stores_paths_relative_to_the_overlay_dir() {
    let (_t, root) = tmp();
    std::fs::create_dir_all(root.join("bases")).unwrap();
    std::fs::create_dir_all(root.join("vms/a")).unwrap();
    sparse(&root.join("bases/u.img"), 1 << 20);
    let o = addcow(&root, &["create", "-b", "bases/u.img", "vms/a/d.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    let h = Header::parse(&std::fs::read(root.join("vms/a/d.add-cow")).unwrap()).unwrap();
    assert_eq!(h.backing_file, b"../../bases/u.img");
    assert_eq!(h.image_file, b"d.raw");
    assert_eq!(
        std::fs::metadata(root.join("vms/a/d.raw")).unwrap().len(),
        1 << 20
    );
    // The new raw image is sparse.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(root.join("vms/a/d.raw"))
            .unwrap()
            .blocks(),
        0
    );

    // An explicit image relative to the cwd, with a size suffix.
    let o = addcow(
        &root,
        &[
            "create",
            "-b",
            "bases/u.img",
            "-i",
            "bases/e.raw",
            "--size",
            "2M",
            "vms/e.add-cow",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let h = Header::parse(&std::fs::read(root.join("vms/e.add-cow")).unwrap()).unwrap();
    assert_eq!(h.backing_file, b"../bases/u.img");
    assert_eq!(h.image_file, b"../bases/e.raw");
    assert_eq!(
        std::fs::metadata(root.join("bases/e.raw")).unwrap().len(),
        2 << 20
    );

    // Moving the whole tree keeps the overlay working (info from another cwd).
    let moved = root.join("moved");
    std::fs::create_dir(&moved).unwrap();
    std::fs::rename(root.join("vms"), moved.join("vms")).unwrap();
    std::fs::rename(root.join("bases"), moved.join("bases")).unwrap();
    let o = addcow(
        Path::new("/"),
        &["info", moved.join("vms/a/d.add-cow").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));

    // Absolute paths stay absolute.
    let abs_base = moved.join("bases/u.img");
    let o = addcow(
        &root,
        &["create", "-b", abs_base.to_str().unwrap(), "abs.add-cow"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let h = Header::parse(&std::fs::read(root.join("abs.add-cow")).unwrap()).unwrap();
    assert_eq!(h.backing_file, abs_base.to_str().unwrap().as_bytes());
}

#[test]
fn create_refusals() {
    let (_t, root) = tmp();
    sparse(&root.join("base.img"), 65536);
    let ok = addcow(&root, &["create", "-b", "base.img", "o.add-cow"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let before = std::fs::read(root.join("o.add-cow")).unwrap();

    let o = addcow(&root, &["create", "-b", "base.img", "o.add-cow"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        text(&o)
    );
    let o = addcow(&root, &["create", "-b", "base.img", "--force", "o.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(root.join("o.add-cow")).unwrap(), before);

    let long = format!("/{}", "x".repeat(1030));
    for (args, needle) in [
        (
            vec!["create", "-b", "missing.img", "m.add-cow"],
            "file not found",
        ),
        (vec!["create", "m.add-cow"], "size"),
        (
            vec!["create", "--size", "1000", "m.add-cow"],
            "multiple of 512",
        ),
        (
            vec!["create", "-b", "http://h/x", "m.add-cow"],
            "unsupported protocol",
        ),
        (
            vec!["create", "-b", "nbd+unix:///x", "m.add-cow"],
            "missing ?socket=PATH",
        ),
        (
            vec![
                "create",
                "-b",
                "nbd+unix:///x?socket=/nonexistent/s.sock",
                "m.add-cow",
            ],
            "image server nbd+unix:///x?socket=/nonexistent/s.sock",
        ),
        (
            vec!["create", "-b", long.as_str(), "m.add-cow"],
            "at most 1023",
        ),
    ] {
        let o = addcow(&root, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!root.join("m.add-cow").exists());
    }
}

#[test]
fn info_text_and_json() {
    let (_t, root) = tmp();
    sparse(&root.join("base.img"), 4 << 20);
    let o = addcow(
        &root,
        &["create", "-b", "base.img", "--size", "8M", "vm.add-cow"],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Set 1 MiB worth of sectors through the library and persist the bitmap bytes.
    {
        let ov = Overlay::open(&root.join("vm.add-cow"), &OpenOptions::default()).unwrap();
        let (a, b) = ov.bitmap.set_range(2048, 2048).unwrap();
        let mut buf = vec![0u8; (b - a + 1) as usize];
        ov.bitmap.copy_bytes(a, &mut buf);
        ov.meta.write_all_at(&buf, BITMAP_OFFSET + a).unwrap();
    }
    let o = addcow(&root, &["info", "--json", "vm.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["format"], "add-cow");
    assert_eq!(j["version"], 1);
    assert_eq!(j["virtual_size"], 8u64 << 20);
    assert_eq!(j["backing_file"], "base.img");
    assert_eq!(
        j["backing_file_resolved"],
        root.join("base.img").to_str().unwrap()
    );
    assert_eq!(j["backing_size"], 4u64 << 20);
    assert_eq!(j["image_file"], "vm.raw");
    assert_eq!(j["bitmap_bytes"], 2048);
    assert_eq!(j["allocated_bytes"], 1u64 << 20);
    assert_eq!(j["allocated_percent"], 12.5);
    assert_eq!(j["complete"], false);

    let o = addcow(&root, &["info", "vm.add-cow"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("virtual size:   8 MiB (8388608 bytes)"), "{s}");
    assert!(
        s.contains("allocated:      1 MiB (1048576 bytes), 12.50%"),
        "{s}"
    );
    assert!(s.contains("complete:       no"), "{s}");
    assert!(
        s.contains("base:           ") && s.contains("stored as \"base.img\""),
        "{s}"
    );

    // Fill every bit: complete.
    {
        let ov = Overlay::open(&root.join("vm.add-cow"), &OpenOptions::default()).unwrap();
        ov.bitmap.set_range(0, u64::MAX);
        let mut buf = vec![0u8; 2048];
        ov.bitmap.copy_bytes(0, &mut buf);
        ov.meta.write_all_at(&buf, BITMAP_OFFSET).unwrap();
    }
    let o = addcow(&root, &["info", "--json", "vm.add-cow"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["complete"], true);
    assert_eq!(j["allocated_percent"], 100.0);

    // info on a broken overlay: exit 1 with the reason.
    std::fs::remove_file(root.join("base.img")).unwrap();
    let o = addcow(&root, &["info", "vm.add-cow"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("base.img"),
        "{}",
        text(&o)
    );
}

#[test]
fn info_does_not_need_the_lock_but_create_force_does() {
    let (_t, root) = tmp();
    let o = addcow(&root, &["create", "--size", "1M", "l.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    let _held = Overlay::open(&root.join("l.add-cow"), &OpenOptions::default()).unwrap();
    let o = addcow(&root, &["info", "l.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = addcow(&root, &["create", "--size", "1M", "--force", "l.add-cow"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("locked"),
        "{}",
        text(&o)
    );
}

/// Writes `bytes` at `offset` of `path`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn check_exit_codes() {
    let (_t, root) = tmp();
    sparse(&root.join("base.img"), 1 << 20);
    let mk = |name: &str| {
        let o = addcow(
            &root,
            &[
                "create",
                "-b",
                "base.img",
                "--size",
                "20K",
                &format!("{name}.add-cow"),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        root.join(format!("{name}.add-cow"))
    };
    let check = |p: &Path| addcow(&root, &["check", p.to_str().unwrap()]);
    let check_json = |p: &Path| {
        let o = addcow(&root, &["check", "--json", p.to_str().unwrap()]);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (o.status.code(), j)
    };

    // Clean.
    let clean = mk("clean");
    let o = check(&clean);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (code, j) = check_json(&clean);
    assert_eq!(code, Some(0));
    assert_eq!(j["result"], "clean");

    // Warnings only: reserved byte, bits past the end (20K = 40 sectors = 5 bytes, so use a
    // trailing byte after the bitmap).
    let warn = mk("warn");
    poke(&warn, 2100, &[1]);
    let o = check(&warn);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("reserved"));
    let past = mk("past");
    poke(&past, BITMAP_OFFSET + 5, &[0x10]);
    let (code, j) = check_json(&past);
    assert_eq!(code, Some(3), "{j}");
    assert_eq!(j["result"], "warnings");
    assert!(j["findings"][0]["message"]
        .as_str()
        .unwrap()
        .contains("past the end"));
    assert_eq!(j["findings"][0]["severity"], "Warning");

    // Corruption, each case.
    let trunc = mk("trunc");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trunc)
        .unwrap()
        .set_len(BITMAP_OFFSET + 4)
        .unwrap();
    let magic = mk("magic");
    poke(&magic, 0, b"QFI\xfb");
    let version = mk("version");
    poke(&version, 8, &[0, 0, 0, 9]);
    let unterminated = mk("unterm");
    poke(&unterminated, 1036, &[b'a'; 1024]);
    let noimage = mk("noimage");
    std::fs::remove_file(root.join("noimage.raw")).unwrap();
    let nobase = mk("nobase");
    poke(&nobase, 12, b"zzz.img\0");
    let unaligned = mk("unaligned");
    sparse(&root.join("unaligned.raw"), 20 * 1024 + 100);
    let short = root.join("short.add-cow");
    std::fs::write(&short, b"ADD_COW\xff").unwrap();
    for (p, needle) in [
        (&trunc, "bitmap truncated: need 5 bytes, file has 4"),
        (&magic, "bad magic"),
        (&version, "version 9"),
        (&unterminated, "image_file field is not NUL-terminated"),
        (&noimage, "noimage.raw"),
        (&nobase, "zzz.img"),
        (&unaligned, "not a multiple of 512"),
        (&short, "need 2560 bytes, file has 8"),
    ] {
        let o = check(p);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(needle),
            "{needle}: {}",
            text(&o)
        );
        let (code, j) = check_json(p);
        assert_eq!(code, Some(2));
        assert_eq!(j["result"], "corrupt");
    }

    // The overlay itself missing: an I/O error, exit 1.
    let o = check(&root.join("absent.add-cow"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn qemu_img_sees_the_raw_image() {
    // Required, never skipped: scripts/test.sh installs qemu-utils.
    if let Err(e) = Command::new("qemu-img").arg("--version").output() {
        panic!("qemu-img is not installed (apt-get install qemu-utils; scripts/test.sh does): {e}");
    }
    let (_t, root) = tmp();
    let o = addcow(&root, &["create", "--size", "3G", "vm.add-cow"]);
    assert!(o.status.success(), "{}", text(&o));
    let q = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw", "vm.raw"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", text(&q));
    let j: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    assert_eq!(j["format"], "raw");
    assert_eq!(j["virtual-size"], 3u64 << 30);
    // Sparse: qemu sees (next to) no allocated bytes.
    assert!(j["actual-size"].as_u64().unwrap() < 1 << 20, "{j}");
}

/// `(allocated bytes, first data offset or None)` of `p`.
fn allocation(p: &Path) -> (u64, Option<u64>) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(p).unwrap();
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    (
        f.metadata().unwrap().blocks() * 512,
        u64::try_from(data).ok(),
    )
}

#[test]
fn create_preallocation_modes() {
    let (_t, root) = tmp();
    let size = 8u64 << 20;
    for mode in ["off", "falloc", "full"] {
        let overlay = format!("{mode}.add-cow");
        let o = addcow(
            &root,
            &["create", "--size", "8M", "--preallocation", mode, &overlay],
        );
        assert!(o.status.success(), "{mode}: {}", text(&o));
        let raw = root.join(format!("{mode}.raw"));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "{mode}");
        let (allocated, data) = allocation(&raw);
        match mode {
            "off" => assert_eq!((allocated, data), (0, None), "sparse"),
            // Unwritten extents: allocated, and no data for SEEK_DATA on ext4 / xfs.
            "falloc" => assert!(allocated >= size, "falloc allocated {allocated}"),
            _ => assert_eq!((allocated >= size, data), (true, Some(0)), "full"),
        }
        let bytes = std::fs::read(&raw).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "{mode}: reads zeros");
        // The overlay opens and reads as an all-clear disk of that size.
        let ov = Overlay::open(&root.join(&overlay), &OpenOptions::default()).unwrap();
        assert_eq!(
            (ov.virtual_size, ov.bitmap.count_set()),
            (size, 0),
            "{mode}"
        );
        drop(ov);
        let info = Command::new("qemu-img")
            .args(["info", "-f", "raw", "--output=json"])
            .arg(&raw)
            .output()
            .expect("qemu-img (qemu-utils) is needed");
        assert!(info.status.success(), "{}", text(&info));
        let j: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(j["virtual-size"], size, "{mode}: {j}");
        assert_eq!(
            j["actual-size"].as_u64().unwrap() >= size,
            mode != "off",
            "{mode}: {j}"
        );
    }
    // All three raw images hold the same bytes.
    for mode in ["falloc", "full"] {
        let c = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", "off.raw"])
            .arg(format!("{mode}.raw"))
            .current_dir(&root)
            .output()
            .expect("qemu-img");
        assert!(c.status.success(), "off vs {mode}: {}", text(&c));
    }
    // An existing raw image is used as it is: preallocating it is refused, untouched.
    std::fs::write(root.join("busy.raw"), vec![7u8; 4096]).unwrap();
    for mode in ["falloc", "full"] {
        let o = addcow(
            &root,
            &[
                "create",
                "--preallocation",
                mode,
                "-i",
                "busy.raw",
                "b.add-cow",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("preallocation") && err.contains("busy.raw") && err.contains("exists"),
            "{err}"
        );
        assert!(!root.join("b.add-cow").exists());
    }
    assert_eq!(
        std::fs::read(root.join("busy.raw")).unwrap(),
        vec![7u8; 4096]
    );
    let o = addcow(
        &root,
        &[
            "create",
            "--size",
            "1M",
            "--preallocation",
            "metadata",
            "x.add-cow",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("off, falloc or full"),
        "{}",
        text(&o)
    );
    assert!(!root.join("x.raw").exists());
}
