//! End to end: the built `addcow` binary's `resize`, `rebase` and `commit` on real files, each
//! compared byte for byte with what `addcow serve` served before (qemu-img compare, nbdcopy,
//! nbdinfo, qemu-io as clients), and their refusals.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use addcow_daemon_testkit::{
    addcow, addcow_ok, assert_identical, qemu_io, run, text, Daemon, Fixture, RawClient,
};
use addcow_engine::format::{bitmap_len, Header, OpenOptions, Overlay, BITMAP_OFFSET};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Runs a command that must fail with exit status 1; returns its stderr.
fn refused(cwd: &Path, args: &[&str]) -> String {
    let o = addcow(cwd, args);
    assert_eq!(o.status.code(), Some(1), "addcow {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Serves `overlay`, runs `f` with the URI, stops the server.
fn served<T>(fx: &Fixture, overlay: &Path, f: impl FnOnce(&str) -> T) -> T {
    let d = Daemon::start(&fx.path("s.sock"), &[overlay.to_str().unwrap()]);
    let out = f(&d.uri());
    d.stop();
    out
}

/// Every byte the served disk reads as (nbdcopy to a file).
fn dump(fx: &Fixture, overlay: &Path, name: &str) -> Vec<u8> {
    let file = fx.path(name);
    served(fx, overlay, |uri| {
        run("nbdcopy", &[uri, file.to_str().unwrap()]);
    });
    std::fs::read(&file).unwrap()
}

/// `qemu-img compare` of a raw file with the served overlay: identical, and the same size
/// (`nbdinfo --size`; `-s` would compare allocation too).
fn compare_served(fx: &Fixture, overlay: &Path, file: &Path) {
    served(fx, overlay, |uri| {
        let len = std::fs::metadata(file).unwrap().len();
        assert_eq!(run("nbdinfo", &["--size", uri]).trim(), len.to_string());
        assert_identical(file.to_str().unwrap(), uri);
    });
}

/// Some writes through the server: inside the base, across its end, past it.
fn write_some(fx: &Fixture, overlay: &Path) {
    served(fx, overlay, |uri| {
        qemu_io(
            uri,
            &[
                "write -P 0x11 4k 8k",
                "write -P 0x22 300k 1000",
                "write -P 0x33 500k 40k",
                "write -P 0x44 900k 4k",
            ],
        );
    });
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

/// The `.add-cow` file has a block under every byte of its bitmap (no hole a later bit write
/// could fail to allocate with ENOSPC).
fn bitmap_preallocated(meta: &Path, size: u64) {
    let m = std::fs::metadata(meta).unwrap();
    let need = BITMAP_OFFSET + bitmap_len(size);
    assert_eq!(m.len(), need);
    assert!(
        m.blocks() * 512 >= need,
        "{} bytes allocated for a {need}-byte .add-cow file",
        m.blocks() * 512
    );
}

#[test]
fn create_preallocates_the_bitmap() {
    let fx = Fixture::new(64 * MIB);
    bitmap_preallocated(&fx.overlay(), 64 * MIB);
}

#[test]
fn resize_grow_keeps_content_and_serves_the_new_size() {
    let fx = Fixture::new(MIB);
    let ov = fx.overlay();
    write_some(&fx, &ov);
    let before = dump(&fx, &ov, "before.img");
    let root = fx.dir.path();

    let out = addcow_ok(root, &["resize", "disk.add-cow", "+1M"]);
    assert!(
        out.contains("1 MiB (1048576 bytes) -> 2 MiB (2097152 bytes)"),
        "{out}"
    );
    assert_eq!(open_ro(&ov).virtual_size, 2 * MIB);
    bitmap_preallocated(&ov, 2 * MIB);

    // The first MiB reads as before; the new one as zeros (past the base's end).
    let mut want = before.clone();
    want.resize((2 * MIB) as usize, 0);
    std::fs::write(fx.path("want.img"), &want).unwrap();
    compare_served(&fx, &ov, &fx.path("want.img"));

    served(&fx, &ov, |uri| {
        assert_eq!(
            run("nbdinfo", &["--size", uri]).trim(),
            (2 * MIB).to_string()
        );
        qemu_io(uri, &["write -P 0x5c 1536k 64k", "write -P 0x5d 1020k 8k"]);
        qemu_io(
            uri,
            &[
                "read -P 0x5c 1536k 64k",
                "read -P 0x5d 1020k 8k",
                "read -P 0 1600k 448k",
                "read -P 0x44 900k 4k",
            ],
        );
    });
    // An absolute size works too.
    addcow_ok(root, &["resize", "disk.add-cow", "3M"]);
    assert_eq!(open_ro(&ov).virtual_size, 3 * MIB);
}

#[test]
fn resize_shrink_needs_the_flag_and_a_regrow_does_not_resurrect_data() {
    let fx = Fixture::new(MIB);
    let ov = fx.overlay();
    write_some(&fx, &ov);
    // Sectors 512..520 written: the shrink below ends inside their bitmap byte.
    served(&fx, &ov, |uri| {
        qemu_io(uri, &["write -P 0x66 256k 4k"]);
    });
    let before = dump(&fx, &ov, "before.img");
    let root = fx.dir.path();

    let e = refused(root, &["resize", "disk.add-cow", "256K"]);
    assert!(e.contains("--shrink") && e.contains("discards"), "{e}");
    assert_eq!(open_ro(&ov).virtual_size, MIB, "nothing changed");

    // 515 sectors: bits 515..519 of the last bitmap byte are past the new end.
    let small = 515 * 512;
    addcow_ok(
        root,
        &[
            "resize",
            "--shrink",
            "disk.add-cow",
            "--",
            &format!("-{}", MIB - small),
        ],
    );
    let o = open_ro(&ov);
    assert_eq!(o.virtual_size, small);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    drop(o);
    std::fs::write(fx.path("want.img"), &before[..small as usize]).unwrap();
    compare_served(&fx, &ov, &fx.path("want.img"));

    // Grown again: what the raw image held past the new end is gone; the base shows through
    // (0xab up to 512k), then zeros. Stale bits there would read the regrown raw image (zeros).
    addcow_ok(root, &["resize", "disk.add-cow", "1M"]);
    served(&fx, &ov, |uri| {
        qemu_io(
            uri,
            &[
                "read -P 0x66 256k 1536",
                &format!("read -P 0xab {small} {}", 512 * KIB - small),
                "read -P 0 512k 512k",
                "read -P 0x11 4k 8k",
            ],
        );
    });
}

#[test]
fn resize_refuses_bad_input_with_clear_messages() {
    let fx = Fixture::new(MIB);
    let root = fx.dir.path();
    let e = refused(root, &["resize", "disk.add-cow", "1000"]);
    assert!(e.contains("not a multiple of 512"), "{e}");
    let e = refused(root, &["resize", "disk.add-cow", "1Q"]);
    assert!(e.contains("unknown size suffix"), "{e}");
    let e = refused(root, &["resize", "disk.add-cow", "-2M"]);
    assert!(e.contains("cannot shrink"), "{e}");
    // Over the format's size limit (64 TiB): refused before anything is touched.
    let e = refused(root, &["resize", "disk.add-cow", "65T"]);
    assert!(e.contains("disk.add-cow") && e.contains("64 TiB"), "{e}");
    let e = refused(root, &["create", "--size", "65T", "huge.add-cow"]);
    assert!(e.contains("huge.raw") && e.contains("64 TiB"), "{e}");
    assert!(!fx.path("huge.add-cow").exists() && !fx.path("huge.raw").exists());
    let e = refused(root, &["resize", "missing.add-cow", "+1M"]);
    assert!(
        e.contains("missing.add-cow") && e.contains("not found"),
        "{e}"
    );
    // Served: locked.
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let e = refused(root, &["resize", "disk.add-cow", "+1M"]);
    assert!(e.contains("locked"), "{e}");
    d.stop();
    assert_eq!(open_ro(&fx.overlay()).virtual_size, MIB);
}

#[test]
fn rebase_keeps_content_byte_for_byte() {
    let fx = Fixture::new(MIB);
    let ov = fx.overlay();
    write_some(&fx, &ov);
    dump(&fx, &ov, "before.img");
    let root = fx.dir.path();
    // A new base that differs from the old one everywhere but in its first 64 KiB.
    let mut nb = vec![0xabu8; (768 * KIB) as usize];
    nb[(64 * KIB) as usize..].fill(0xcd);
    std::fs::write(fx.path("new.raw"), &nb).unwrap();

    let out = addcow_ok(root, &["rebase", "-b", "new.raw", "disk.add-cow"]);
    assert!(out.contains("-> new.raw"), "{out}");
    let h = Header::parse(&std::fs::read(&ov).unwrap()).unwrap();
    assert_eq!(h.backing_file, b"new.raw");
    assert!(!fx.path(".disk.add-cow.rebase-tmp").exists());
    bitmap_preallocated(&ov, MIB);
    compare_served(&fx, &ov, &fx.path("before.img"));

    // Standalone: no base at all.
    addcow_ok(root, &["rebase", "-b", "", "disk.add-cow"]);
    let o = open_ro(&ov);
    assert!(o.base_path.is_none());
    assert!(o.header.backing_file.is_empty());
    drop(o);
    compare_served(&fx, &ov, &fx.path("before.img"));
}

#[test]
fn rebase_unsafe_only_rewrites_the_path() {
    let fx = Fixture::new(MIB);
    let root = fx.dir.path();
    std::fs::write(fx.path("other.raw"), vec![0x77u8; MIB as usize]).unwrap();
    let raw_before = std::fs::read(fx.path("disk.raw")).unwrap();
    addcow_ok(root, &["rebase", "-u", "-b", "other.raw", "disk.add-cow"]);
    assert_eq!(std::fs::read(fx.path("disk.raw")).unwrap(), raw_before);
    served(&fx, &fx.overlay(), |uri| {
        qemu_io(uri, &["read -P 0x77 0 1M"]);
    });
}

#[test]
fn rebase_refuses_bad_input() {
    let fx = Fixture::new(MIB);
    let root = fx.dir.path();
    let e = refused(root, &["rebase", "-b", "nope.raw", "disk.add-cow"]);
    assert!(e.contains("nope.raw") && e.contains("not found"), "{e}");
    let e = refused(root, &["rebase", "-b", "disk.raw", "disk.add-cow"]);
    assert!(e.contains("same file"), "{e}");
    let e = refused(root, &["rebase", "-b", "http://host/x", "disk.add-cow"]);
    assert!(e.contains("unsupported protocol"), "{e}");
    let h = Header::parse(&std::fs::read(fx.overlay()).unwrap()).unwrap();
    assert_eq!(
        h.backing_file,
        fx.path("base.raw").as_os_str().as_encoded_bytes()
    );
}

#[test]
fn commit_writes_into_the_base_and_empties_the_overlay() {
    let fx = Fixture::new(MIB);
    let ov = fx.overlay();
    write_some(&fx, &ov);
    let before = dump(&fx, &ov, "before.img");
    let root = fx.dir.path();
    let out = addcow_ok(root, &["commit", "disk.add-cow"]);
    assert!(out.contains("base grown from 524288 bytes"), "{out}");
    // qemu-img commit grows a smaller base to the overlay's size: the base alone is the disk.
    assert_eq!(std::fs::read(fx.path("base.raw")).unwrap(), before);
    let o = open_ro(&ov);
    assert_eq!(o.bitmap.count_set(), 0);
    assert!(o.warnings.is_empty());
    drop(o);
    assert_eq!(
        std::fs::metadata(fx.path("disk.raw")).unwrap().blocks(),
        0,
        "raw image punched"
    );
    compare_served(&fx, &ov, &fx.path("before.img"));
}

#[test]
fn commit_is_refused_while_another_server_reads_the_base() {
    let fx = Fixture::new(MIB);
    let ov = fx.overlay();
    write_some(&fx, &ov);
    let other = fx.make_overlay("other");
    let root = fx.dir.path();
    let base_before = std::fs::read(fx.path("base.raw")).unwrap();

    let d = Daemon::start(&fx.path("o.sock"), &[other.to_str().unwrap()]);
    let e = refused(root, &["commit", "disk.add-cow"]);
    assert!(e.contains("in use") && e.contains("base.raw"), "{e}");
    assert_eq!(std::fs::read(fx.path("base.raw")).unwrap(), base_before);
    assert!(
        open_ro(&ov).bitmap.count_set() > 0,
        "the overlay was not emptied"
    );
    // The other VM still reads its (unchanged) base.
    qemu_io(&d.uri(), &["read -P 0xab 0 512k"]);
    d.stop();

    addcow_ok(root, &["commit", "disk.add-cow"]);
    assert_ne!(std::fs::read(fx.path("base.raw")).unwrap(), base_before);
}

/// The operator's script: `addcow serve --commit-interval 0`, 1 MiB written over NBD with no
/// FLUSH (its bits only in the server's memory), SIGTERM and `addcow commit` at once. The
/// server's shutdown commit races the tool: the tool must either be refused (the overlay or
/// its base still locked by the stopping server; then it runs again once the server exited) or
/// copy that 1 MiB. Either way the base ends up holding it. Before the tool read the bitmap
/// under its lock, the 1 MiB was missing from the base in most cycles (its bits cleared and
/// its data punched, never copied).
#[test]
fn commit_right_after_sigterm_keeps_the_servers_last_writes() {
    use std::os::unix::fs::FileExt;

    const CYCLES: u64 = 5;
    // A large overlay whose bitmap is written (zeros) rather than preallocated, so reading it
    // takes a while, as on a long-lived overlay: the window in which a read before the lock
    // missed the server's last commit.
    const SIZE: u64 = 128 << 30;
    let fx = Fixture::new(MIB);
    let root = fx.dir.path();
    let base = fx.path("big-base.raw");
    std::fs::File::create(&base).unwrap().set_len(SIZE).unwrap();
    addcow_ok(root, &["create", "-b", "big-base.raw", "big.add-cow"]);
    let ov = fx.path("big.add-cow");
    let meta = std::fs::OpenOptions::new().write(true).open(&ov).unwrap();
    let zeros = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < bitmap_len(SIZE) {
        let n = (bitmap_len(SIZE) - at).min(MIB) as usize;
        meta.write_all_at(&zeros[..n], BITMAP_OFFSET + at).unwrap();
        at += n as u64;
    }
    drop(meta);
    let sock = fx.path("s.sock");
    let mut refused_first = 0;
    for cycle in 0..CYCLES {
        let at = cycle * 2 * MIB + 4 * KIB;
        let data = vec![0x30 + cycle as u8; MIB as usize];
        let mut d = Daemon::start(&sock, &["--commit-interval", "0", ov.to_str().unwrap()]);
        let mut c = RawClient::connect(&sock, "").unwrap();
        assert_eq!(
            c.write(at, &data, false).unwrap(),
            0,
            "cycle {cycle}: write"
        );
        d.signal(nix::sys::signal::Signal::SIGTERM);
        let first = addcow(root, &["commit", "big.add-cow"]);
        if !first.status.success() {
            let e = String::from_utf8_lossy(&first.stderr);
            assert!(
                first.status.code() == Some(1) && (e.contains("locked") || e.contains("in use")),
                "cycle {cycle}: commit failed other than on a lock: {}",
                text(&first)
            );
            refused_first += 1;
        }
        drop(c);
        let st = d.wait_exit();
        assert!(
            st.success(),
            "cycle {cycle}: addcow serve exit {st}:\n{}",
            d.log()
        );
        if !first.status.success() {
            addcow_ok(root, &["commit", "big.add-cow"]);
        }
        let mut got = vec![0u8; MIB as usize];
        std::fs::File::open(&base)
            .unwrap()
            .read_exact_at(&mut got, at)
            .unwrap();
        assert!(
            got == data,
            "cycle {cycle}: the 1 MiB written before SIGTERM at {at} is not in the base \
             (commit {})",
            if first.status.success() {
                "ran at once"
            } else {
                "refused, then ran"
            },
        );
        let o = open_ro(&ov);
        assert_eq!(
            o.bitmap.count_set(),
            0,
            "cycle {cycle}: overlay not emptied"
        );
    }
    eprintln!("commit refused while the server stopped in {refused_first} of {CYCLES} cycles");
}

#[test]
fn commit_refuses_bad_input() {
    let fx = Fixture::new(MIB);
    let root = fx.dir.path();
    let e = refused(root, &["commit", "missing.add-cow"]);
    assert!(
        e.contains("missing.add-cow") && e.contains("not found"),
        "{e}"
    );
    addcow_ok(root, &["create", "--size", "1M", "solo.add-cow"]);
    let e = refused(root, &["commit", "solo.add-cow"]);
    assert!(e.contains("no base"), "{e}");
    // The overlay itself served: locked.
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);
    let e = refused(root, &["commit", "disk.add-cow"]);
    assert!(e.contains("locked"), "{e}");
    d.stop();
}
