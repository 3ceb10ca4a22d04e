//! End to end: `addcow stream` on real files. A sparse base shorter than the overlay, with
//! sectors already written; the raw image alone must end byte-identical (`qemu-img compare`) to
//! what the engine read before the stream, `info` must say complete, and the base's holes and
//! the part past its end must stay holes. Interrupted (SIGINT) or killed (SIGKILL) streams leave
//! a clean overlay that a second run completes.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{addcow, addcow_bin, run_raw, text};
use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{CacheMode, DiskOptions, Engine, EngineConfig};

const MIB: u64 = 1 << 20;

/// A sparse base of `len` bytes with data in `data` ranges (a pattern), holes elsewhere.
fn sparse_base(path: &Path, len: u64, data: &[(u64, u64)]) {
    let mut f = File::create(path).expect("create base");
    f.set_len(len).expect("size base");
    for &(off, n) in data {
        let bytes: Vec<u8> = (off..off + n).map(|b| (b % 251) as u8 | 1).collect();
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&bytes).expect("write base");
    }
}

/// `dir/vm.add-cow` over a sparse base of `base_len` bytes (data in `data`), virtual size
/// `size`, with a few sectors written through the engine; returns the overlay and a reference
/// file holding what the disk reads (through the engine's read path).
fn fixture(dir: &Path, size: u64, base_len: u64, data: &[(u64, u64)]) -> (PathBuf, PathBuf) {
    let base = dir.join("base.img");
    sparse_base(&base, base_len, data);
    let overlay = dir.join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        size: Some(size),
        ..CreateOptions::default()
    })
    .expect("create");
    let engine = Engine::start(EngineConfig {
        cores: 1,
        arena_bytes: 8 << 20,
        image_cache: CacheMode::Buffered,
        ..EngineConfig::default()
    })
    .expect("engine");
    let disk = engine.open(&overlay, DiskOptions::default()).expect("open");
    // Over base data, over a base hole, past the base, unaligned.
    disk.write_at(4096 + 3, &[0xc1; 5000], false)
        .expect("write");
    disk.write_at(base_len / 2 / 512 * 512, &[0xc2; 65536], false)
        .expect("write");
    disk.write_at(size - 8192, &[0xc3; 4096], false)
        .expect("write");
    let mut reference = Vec::with_capacity(size as usize);
    while (reference.len() as u64) < size {
        let n = (size - reference.len() as u64).min(8 * MIB);
        reference.extend(
            disk.read_at(reference.len() as u64, n as u32)
                .expect("read"),
        );
    }
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");
    let ref_path = dir.join("reference.img");
    std::fs::write(&ref_path, &reference).expect("write reference");
    (overlay, ref_path)
}

/// What the overlay reads, through the engine (read-only).
fn read_overlay(overlay: &Path) -> Vec<u8> {
    let engine = Engine::start(EngineConfig {
        cores: 1,
        arena_bytes: 8 << 20,
        image_cache: CacheMode::Buffered,
        ..EngineConfig::default()
    })
    .expect("engine");
    // A killed process's io_uring may hold its files (and their locks) for a moment after it
    // exited, until the kernel has torn the ring down.
    let deadline = Instant::now() + Duration::from_secs(30);
    let disk = loop {
        match engine.open(
            overlay,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        ) {
            Ok(d) => break d,
            Err(e) if Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("open read-only: {e}"),
        }
    };
    let mut out = Vec::with_capacity(disk.size() as usize);
    while (out.len() as u64) < disk.size() {
        let n = (disk.size() - out.len() as u64).min(8 * MIB);
        out.extend(disk.read_at(out.len() as u64, n as u32).expect("read"));
    }
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");
    out
}

fn info(overlay: &Path) -> serde_json::Value {
    let o = addcow(".", &["info", "--json", overlay.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("info JSON")
}

fn assert_clean(overlay: &Path) {
    let o = addcow(".", &["check", overlay.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "check after an interrupted stream: {}",
        text(&o)
    );
}

fn assert_same(raw: &Path, reference: &Path) {
    let out = run_raw(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare: raw image differs from the reference:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `[off, off+len)` of `path` is entirely a hole.
fn is_hole(path: &Path, off: u64, len: u64) -> bool {
    let f = File::open(path).expect("open");
    // SAFETY: lseek on an open fd; no memory is passed.
    let d = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    d < 0 || d as u64 >= off + len
}

#[test]
fn stream_makes_the_raw_image_the_disk() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (size, base_len) = (24 * MIB, 12 * MIB + 1000);
    let (overlay, reference) = fixture(
        dir,
        size,
        base_len,
        &[(0, 3 * MIB), (8 * MIB, MIB + 512), (base_len - 4000, 4000)],
    );
    assert_eq!(info(&overlay)["complete"], false);
    // 4 MiB/s over about 20 MiB of clear sectors: not less than a few seconds.
    let started = Instant::now();
    let o = addcow(
        ".",
        &["stream", "--rate", "8M/s", overlay.to_str().unwrap()],
    );
    let took = started.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("copied") && out.contains("complete"),
        "{}",
        text(&o)
    );
    assert!(
        took >= Duration::from_secs(1),
        "--rate 8M over ~20 MiB took only {took:?}"
    );
    let i = info(&overlay);
    assert_eq!(i["complete"], true, "{i}");
    assert_same(&dir.join("vm.raw"), &reference);
    // Holes of the base and the part past its end stay holes of the raw image.
    assert!(is_hole(&dir.join("vm.raw"), 4 * MIB, 2 * MIB), "base hole");
    assert!(
        is_hole(&dir.join("vm.raw"), 13 * MIB, 8 * MIB),
        "past the base"
    );
    // Again: nothing left to do, still identical.
    let o = addcow(".", &["stream", overlay.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("copied 0 B"),
        "{}",
        text(&o)
    );
    assert_same(&dir.join("vm.raw"), &reference);
}

#[test]
fn an_interrupted_or_killed_stream_continues_where_it_stopped() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    let (size, base_len) = (64 * MIB, 48 * MIB);
    let (overlay, reference) = fixture(dir, size, base_len, &[(0, base_len)]);
    let path = overlay.to_str().unwrap();
    for (sig, code) in [
        (nix::sys::signal::Signal::SIGINT, Some(130)),
        (nix::sys::signal::Signal::SIGKILL, None),
    ] {
        let child = Command::new(addcow_bin())
            .args(["stream", "--rate", "8M", path])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stream");
        std::thread::sleep(Duration::from_millis(1500));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("kill");
        let o = child.wait_with_output().expect("wait");
        assert_eq!(o.status.code(), code, "{sig:?}: {}", text(&o));
        if code.is_some() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("interrupted") && err.contains("again"),
                "{}",
                text(&o)
            );
        }
        let i = info(&overlay);
        assert_eq!(i["complete"], false, "{sig:?} stopped it early: {i}");
        assert_clean(&overlay);
        // What the overlay reads did not change.
        assert!(
            read_overlay(&overlay) == std::fs::read(&reference).expect("reference"),
            "{sig:?}: the overlay reads differently after an interrupted stream"
        );
    }
    let allocated = info(&overlay)["allocated_bytes"]
        .as_u64()
        .expect("allocated");
    assert!(
        allocated > 8 * MIB,
        "the interrupted runs streamed something: {allocated}"
    );
    let o = addcow(".", &["stream", path]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(info(&overlay)["complete"], true);
    assert_same(&dir.join("vm.raw"), &reference);
}
