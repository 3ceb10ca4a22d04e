//! `Overlay::open` on files built byte by byte from the spec: every refusal has its typed error,
//! and a hand-written overlay reads back with the right bits.
//!
//! The permission tests must check something when run as root (as CI does), for whom file modes
//! do not apply: there the test binary re-runs that one test as an unprivileged user (see
//! [`as_unprivileged`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    _t: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        Dir { _t: Some(t), root }
    }
    /// Files in `root`, which someone else cleans up.
    fn at(root: &Path) -> Dir {
        Dir {
            _t: None,
            root: root.to_path_buf(),
        }
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

/// Set in a child re-run by [`as_unprivileged`]: the directory it works in.
const UNPRIVILEGED_DIR: &str = "ADDCOW_FORMAT_OPEN_UNPRIVILEGED_DIR";
/// The user (and group) the permission checks run as under root: `nobody`.
const NOBODY: u32 = 65534;

/// Serialises copying the test binary and spawning children: a child forked while another
/// thread holds a freshly written executable open for writing would make `exec` of that copy
/// fail with `ETXTBSY`.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether the effective user is root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a user that is neither owner nor in the group can reach and execute `exe`.
fn executable_by_others(exe: &Path) -> bool {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(exe) & 0o001 != 0 && exe.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

/// Runs `check(dir)` (in a fresh, empty, writable `dir`) where file permissions apply.
///
/// As an ordinary user it runs here. As root, whom file modes do not stop, the test binary
/// re-runs only `test` as uid/gid 65534 (`nobody`) with no supplementary groups (what
/// `setpriv --reuid=65534 --regid=65534 --clear-groups` does), in a directory under `/tmp`
/// that user owns; the child's failure is this test's failure. Either way `check` itself must
/// first show that permissions are in force, so it can never pass vacuously.
fn as_unprivileged(test: &str, check: impl FnOnce(&Path)) {
    if let Some(dir) = std::env::var_os(UNPRIVILEGED_DIR) {
        assert!(!is_root(), "the re-run child of {test} is still root");
        check(Path::new(&dir));
        println!("UNPRIVILEGED-CHECK-PASSED {test}");
        return;
    }
    if !is_root() {
        let t = tempfile::tempdir().unwrap();
        check(t.path());
        return;
    }
    let t = tempfile::Builder::new()
        .prefix("addcow-format-open-")
        .tempdir_in("/tmp")
        .unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(NOBODY), Some(NOBODY)).unwrap();
    // `tempdir` made the parent 0700 (root's): let others through to `work`.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let guard = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut exe = std::env::current_exe().unwrap();
    if !executable_by_others(&exe) {
        // The build tree is not reachable for `nobody` (a checkout under /root, say).
        let copy = t.path().join("format_open");
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        exe = copy;
    }
    // `uid` as root also drops every supplementary group before `setuid`.
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(&exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(UNPRIVILEGED_DIR, &work)
            .env("TMPDIR", &work)
            .current_dir(&work)
            .gid(NOBODY)
            .uid(NOBODY)
            .output()
            .unwrap_or_else(|e| panic!("re-run {test} as uid {NOBODY}: {e}"))
    };
    drop(guard);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("UNPRIVILEGED-CHECK-PASSED {test}")),
        "{test} as uid {NOBODY} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that this process cannot open `path` with `write` access: file modes are in force
/// here (not root), so a permission test run now checks something.
fn assert_permissions_apply(path: &Path, write: bool) {
    let e = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open(path)
        .expect_err(
            "permissions are not in force here (running as root?): the test would check nothing",
        );
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
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
    let mut f = hand_header(b"nbd:localhost:10809", b"i");
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
    // An NBD URI is a remote base: malformed, it says why; with no server, it names the URI.
    let mut f = hand_header(b"nbd+unix:///golden", b"i");
    f.push(0);
    let e = open_err(&d.file("p.add-cow", &f));
    assert!(matches!(e.kind(), ErrorKind::BadUri { .. }), "{e}");
    assert!(e.to_string().contains("missing ?socket=PATH"), "{e}");
    let gone = d.root.join("no-server.sock");
    let uri = format!("nbd+unix:///golden?socket={}", gone.display());
    let mut f = hand_header(uri.as_bytes(), b"i");
    f.push(0);
    let e = open_err(&d.file("p.add-cow", &f));
    assert!(matches!(e.kind(), ErrorKind::Remote { .. }), "{e}");
    assert!(e.to_string().contains(&uri), "{e}");
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
    as_unprivileged("unreadable_image", |dir| {
        let d = Dir::at(dir);
        let img = d.sparse("i", 512);
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert_permissions_apply(&img, false);
        let mut f = hand_header(b"", b"i");
        f.push(0);
        let e = open_err(&d.file("r.add-cow", &f));
        assert_eq!(e.kind(), &ErrorKind::Io, "{e}");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("open raw image") && text.contains(&*img.to_string_lossy()),
            "{text}"
        );
    });
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
    as_unprivileged("read_only_open_does_not_need_write_permission", |dir| {
        let ro = |p: &Path| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
        };
        let d = Dir::at(dir);
        let img = d.sparse("i", 512);
        let mut f = hand_header(b"", b"i");
        f.push(1);
        let p = d.file("ro.add-cow", &f);
        ro(&img);
        ro(&p);
        assert_permissions_apply(&img, true);
        assert_permissions_apply(&p, true);
        let o = Overlay::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("a read-only open needs only read permission");
        assert!(o.bitmap.get(0));
        drop(o);
        // Opening it for writing is refused with a clear error.
        let e = open_err(&p);
        assert_eq!(e.kind(), &ErrorKind::Io, "{e}");
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");

        // The base is opened read-only even for a writable overlay (it is never written).
        let base = d.file("base.img", &[5u8; 1024]);
        ro(&base);
        assert_permissions_apply(&base, true);
        d.sparse("w.raw", 1024);
        let mut f = hand_header(b"base.img", b"w.raw");
        f.push(0);
        let w = Overlay::open(&d.file("w.add-cow", &f), &OpenOptions::default())
            .expect("a writable overlay over a read-only base");
        assert_eq!(w.base_size, Some(1024));
    });
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
