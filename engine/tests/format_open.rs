//! `Overlay::open` on files built byte by byte from the spec: every refusal has its typed error,
//! and a hand-written overlay reads back with the right bits.

use std::path::{Path, PathBuf};

use addcow_engine::format::{OpenOptions, Overlay};
use addcow_engine::ErrorKind;

/// A header written by hand from the spec, independent of `Header::encode`.
fn hand_header(backing: &[u8], image: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(2560);
    h.extend_from_slice(&[0x41, 0x44, 0x44, 0x5F, 0x43, 0x4F, 0x57, 0xFF]);
    h.extend_from_slice(&[0, 0, 0, 1]);
    let mut field = |p: &[u8]| {
        let mut f = p.to_vec();
        f.resize(1024, 0);
        h.extend_from_slice(&f);
    };
    field(backing);
    field(image);
    h.resize(2560, 0);
    h
}

struct Dir {
    _t: tempfile::TempDir,
    root: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        Dir { _t: t, root }
    }
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.root.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn sparse(&self, name: &str, len: u64) -> PathBuf {
        let p = self.root.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

fn open_err(p: &Path) -> addcow_engine::Error {
    Overlay::open(p, &OpenOptions::default()).unwrap_err()
}

#[test]
fn hand_written_overlay_reads_back_with_the_right_bits() {
    let d = Dir::new();
    // 40 sectors: bitmap of 5 bytes. Set sectors 0, 3, 9..=15, 39.
    d.sparse("disk.raw", 40 * 512);
    d.file("base.img", &[7u8; 40 * 512]);
    let mut f = hand_header(b"base.img", b"disk.raw");
    f.extend_from_slice(&[0b0000_1001, 0b1111_1110, 0, 0, 0b1000_0000]);
    let p = d.file("disk.add-cow", &f);
    let o = Overlay::open(&p, &OpenOptions::default()).unwrap();
    assert_eq!(o.virtual_size, 40 * 512);
    assert_eq!(o.base_size, Some(40 * 512));
    assert_eq!(o.image_path, d.root.join("disk.raw"));
    assert_eq!(
        o.base_path.as_deref(),
        Some(d.root.join("base.img").as_path())
    );
    assert_eq!(o.header.backing_file, b"base.img");
    assert_eq!(o.header.image_file, b"disk.raw");
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    let set: Vec<u64> = (0..40).filter(|&s| o.bitmap.get(s)).collect();
    let mut want = vec![0, 3];
    want.extend(9..=15);
    want.push(39);
    assert_eq!(set, want);
    assert_eq!(o.bitmap.count_set(), 10);
    assert_eq!(o.bitmap.run_from(9, 100), (true, 7));
}

#[test]
fn no_base_and_absolute_paths() {
    let d = Dir::new();
    let img = d.sparse("img", 4096);
    let mut f = hand_header(b"", img.to_str().unwrap().as_bytes());
    f.push(0xff);
    let p = d.file("x.add-cow", &f);
    let o = Overlay::open(&p, &OpenOptions::default()).unwrap();
    assert!(o.base.is_none());
    assert_eq!(o.base_path, None);
    assert!(o.bitmap.is_full());
}

#[test]
fn relative_paths_follow_the_overlay_when_its_folder_moves() {
    let d = Dir::new();
    std::fs::create_dir(d.root.join("a")).unwrap();
    std::fs::create_dir(d.root.join("a/sub")).unwrap();
    d.sparse("a/sub/disk.raw", 512);
    d.sparse("a/base.img", 512);
    let mut f = hand_header(b"../base.img", b"disk.raw");
    f.push(1);
    d.file("a/sub/o.add-cow", &f);
    std::fs::rename(d.root.join("a"), d.root.join("moved")).unwrap();
    let o = Overlay::open(&d.root.join("moved/sub/o.add-cow"), &OpenOptions::default()).unwrap();
    assert_eq!(o.image_path, d.root.join("moved/sub/disk.raw"));
    assert_eq!(o.base_path.unwrap(), d.root.join("moved/sub/../base.img"));
    assert!(o.bitmap.get(0));
}

#[test]
fn short_header() {
    let d = Dir::new();
    for len in [0usize, 8, 2559] {
        let p = d.file("s.add-cow", &hand_header(b"", b"i")[..len]);
        let e = open_err(&p);
        assert_eq!(
            e.kind(),
            &ErrorKind::ShortHeader {
                need: 2560,
                have: len as u64
            }
        );
        assert!(e.to_string().contains("s.add-cow"), "{e}");
    }
}

#[test]
fn bad_magic() {
    let d = Dir::new();
    d.sparse("i", 512);
    let mut f = hand_header(b"", b"i");
    f.push(0);
    f[0] = b'Q';
    let e = open_err(&d.file("m.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::BadMagic);
    assert!(e.to_string().contains("not an add-cow file"), "{e}");
}

#[test]
fn wrong_version() {
    let d = Dir::new();
    d.sparse("i", 512);
    for v in [0u32, 2, 0x0100_0000] {
        let mut f = hand_header(b"", b"i");
        f.push(0);
        f[8..12].copy_from_slice(&v.to_be_bytes());
        let e = open_err(&d.file("v.add-cow", &f));
        assert_eq!(e.kind(), &ErrorKind::UnsupportedVersion(v));
    }
}

#[test]
fn unterminated_path_fields() {
    let d = Dir::new();
    d.sparse("i", 512);
    let mut f = hand_header(b"", b"i");
    f.push(0);
    f[12..1036].fill(b'b');
    let e = open_err(&d.file("u.add-cow", &f));
    assert_eq!(
        e.kind(),
        &ErrorKind::UnterminatedPath {
            field: "backing_file"
        }
    );
    let mut f = hand_header(b"", b"i");
    f.push(0);
    f[1036..2060].fill(b'i');
    let e = open_err(&d.file("u.add-cow", &f));
    assert_eq!(
        e.kind(),
        &ErrorKind::UnterminatedPath {
            field: "image_file"
        }
    );
}

#[test]
fn empty_image_file() {
    let d = Dir::new();
    let mut f = hand_header(b"base", b"");
    f.push(0);
    let e = open_err(&d.file("e.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::EmptyImagePath);
}

#[test]
fn protocol_paths_are_refused() {
    let d = Dir::new();
    d.sparse("i", 512);
    let mut f = hand_header(b"nbd+unix:///?socket=/tmp/s", b"i");
    f.push(0);
    let e = open_err(&d.file("p.add-cow", &f));
    assert!(
        matches!(
            e.kind(),
            ErrorKind::UnsupportedProtocol {
                field: "backing_file",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("unsupported protocol"), "{e}");
    let mut f = hand_header(b"", b"http://example.invalid/x.raw");
    f.push(0);
    let e = open_err(&d.file("p.add-cow", &f));
    assert!(matches!(
        e.kind(),
        ErrorKind::UnsupportedProtocol {
            field: "image_file",
            ..
        }
    ));
}

#[test]
fn missing_image_or_base() {
    let d = Dir::new();
    let mut f = hand_header(b"", b"nope.raw");
    f.push(0);
    let e = open_err(&d.file("n.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::NotFound);
    assert_eq!(e.path(), Some(d.root.join("nope.raw").as_path()));
    assert!(e.to_string().contains("open raw image"), "{e}");

    d.sparse("i", 512);
    let mut f = hand_header(b"nobase.img", b"i");
    f.push(0);
    let e = open_err(&d.file("n.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::NotFound);
    assert_eq!(e.path(), Some(d.root.join("nobase.img").as_path()));

    // The overlay itself missing.
    let e = open_err(&d.root.join("absent.add-cow"));
    assert_eq!(e.kind(), &ErrorKind::NotFound);
}

#[test]
fn unreadable_image() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let img = d.sparse("i", 512);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&img).is_ok() {
        // Running as root: permissions do not stop us; nothing to test.
        return;
    }
    let mut f = hand_header(b"", b"i");
    f.push(0);
    let e = open_err(&d.file("r.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::Io);
    assert_eq!(e.raw_os_error(), Some(libc_eacces()));
}

fn libc_eacces() -> i32 {
    13
}

#[test]
fn image_size_not_multiple_of_512() {
    let d = Dir::new();
    d.sparse("i", 1000);
    let mut f = hand_header(b"", b"i");
    f.push(0);
    let e = open_err(&d.file("a.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::UnalignedImageSize { size: 1000 });
}

#[test]
fn bitmap_truncated() {
    let d = Dir::new();
    d.sparse("i", 100 * 512); // needs 13 bytes
    let mut f = hand_header(b"", b"i");
    f.extend_from_slice(&[0u8; 12]);
    let e = open_err(&d.file("t.add-cow", &f));
    assert_eq!(e.kind(), &ErrorKind::BitmapTruncated { need: 13, have: 12 });
    assert!(
        e.to_string()
            .contains("bitmap truncated: need 13 bytes, file has 12"),
        "{e}"
    );
    // Exactly enough is fine; a header alone for an empty image is fine too.
    f.push(0);
    Overlay::open(&d.file("t.add-cow", &f), &OpenOptions::default()).unwrap();
    d.sparse("empty", 0);
    Overlay::open(
        &d.file("z.add-cow", &hand_header(b"", b"empty")),
        &OpenOptions::default(),
    )
    .unwrap();
}

#[test]
fn reserved_and_bits_past_end_are_warnings_not_errors() {
    let d = Dir::new();
    d.sparse("i", 3 * 512); // 1 bitmap byte, 3 bits used
    let mut f = hand_header(b"", b"i");
    f[2100] = 9;
    f.push(0b1000_0001); // bit 7 is past the end
    f.extend_from_slice(&[0, 0, 4]); // trailing bytes with a set bit
    let o = Overlay::open(&d.file("w.add-cow", &f), &OpenOptions::default()).unwrap();
    assert_eq!(o.warnings.len(), 3, "{:?}", o.warnings);
    assert!(o.warnings[0].contains("reserved"));
    assert!(o.warnings[1].contains("past the end"));
    assert!(o.warnings[2].contains("past the end"));
    assert_eq!(o.bitmap.count_set(), 1);
    assert!(o.bitmap.get(0));
}

#[test]
fn locking() {
    let d = Dir::new();
    d.sparse("i", 512);
    let mut f = hand_header(b"", b"i");
    f.push(0);
    let p = d.file("l.add-cow", &f);
    let rw = OpenOptions::default();
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let unlocked = OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    let a = Overlay::open(&p, &rw).unwrap();
    assert_eq!(
        Overlay::open(&p, &rw).unwrap_err().kind(),
        &ErrorKind::Locked
    );
    assert_eq!(
        Overlay::open(&p, &ro).unwrap_err().kind(),
        &ErrorKind::Locked
    );
    let e = Overlay::open(&p, &rw).unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    Overlay::open(&p, &unlocked).unwrap();
    drop(a);
    let r1 = Overlay::open(&p, &ro).unwrap();
    let _r2 = Overlay::open(&p, &ro).unwrap();
    assert_eq!(
        Overlay::open(&p, &rw).unwrap_err().kind(),
        &ErrorKind::Locked
    );
    drop(r1);
    drop(_r2);
    Overlay::open(&p, &rw).unwrap();
}

#[test]
fn read_only_open_does_not_need_write_permission() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let img = d.sparse("i", 512);
    let mut f = hand_header(b"", b"i");
    f.push(1);
    let p = d.file("ro.add-cow", &f);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    let o = Overlay::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(o.bitmap.get(0));
}

#[test]
fn roles_sharing_a_file_are_refused() {
    let d = Dir::new();
    d.sparse("disk.raw", 4096);
    // The base is the raw image itself: serving would write into the base.
    let mut f = hand_header(b"disk.raw", b"disk.raw");
    f.push(0);
    let e = open_err(&d.file("s.add-cow", &f));
    assert_eq!(
        e.kind(),
        &ErrorKind::SameFile {
            a: "raw image",
            b: "base"
        }
    );
    // Through a hard link, still the same file.
    std::fs::hard_link(d.root.join("disk.raw"), d.root.join("link.raw")).unwrap();
    let mut f = hand_header(b"link.raw", b"disk.raw");
    f.push(0);
    assert!(matches!(
        open_err(&d.file("s.add-cow", &f)).kind(),
        ErrorKind::SameFile { .. }
    ));
    // The raw image is the overlay file.
    let mut f = hand_header(b"", b"self.add-cow");
    f.resize(4096, 0);
    let e = open_err(&d.file("self.add-cow", &f));
    assert_eq!(
        e.kind(),
        &ErrorKind::SameFile {
            a: "overlay",
            b: "raw image"
        }
    );
}
