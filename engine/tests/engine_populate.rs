//! POPULATE (copy-up) on a real engine: it never changes what the disk reads, fills the raw
//! image so that the raw image alone is the disk, leaves the base's holes and the part past the
//! base's end as holes of the raw image, never overwrites written sectors, and loses no write
//! that lands while it copies.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{CacheMode, Disk, DiskOptions, Engine, EngineConfig, Request, MAX_POPULATE};
use addcow_engine_testkit::engine::{call, seed};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

// The update fills `recorder` when the crash-recorder feature is on.
#[allow(clippy::needless_update)]
fn engine(image_cache: CacheMode) -> Engine {
    Engine::start(EngineConfig {
        cores: 2,
        queue_depth: 64,
        arena_bytes: 16 << 20,
        image_cache,
        base_cache: CacheMode::Buffered,
        commit_delay: Some(std::time::Duration::from_millis(2)),
        ..EngineConfig::default()
    })
    .expect("engine starts")
}

/// A sparse base of `len` bytes: data (a byte pattern) in `data` ranges, holes elsewhere.
fn sparse_base(path: &Path, len: u64, data: &[(u64, u64)]) {
    let mut f = File::create(path).expect("create base");
    f.set_len(len).expect("size base");
    for &(off, n) in data {
        let bytes: Vec<u8> = (off..off + n).map(|b| (b % 251) as u8 | 1).collect();
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&bytes).expect("write base");
    }
    f.sync_all().expect("sync base");
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut out = Vec::with_capacity(disk.size() as usize);
    while (out.len() as u64) < disk.size() {
        let n = (disk.size() - out.len() as u64).min(4 * MIB);
        out.extend(disk.read_at(out.len() as u64, n as u32).expect("read"));
    }
    out
}

/// Streams the whole disk in `chunk`-byte populates; returns (copied, zeroed).
fn stream(disk: &Disk, chunk: u64) -> (u64, u64) {
    let (mut copied, mut zeroed) = (0, 0);
    let mut at = 0;
    while let Some((off, len)) = disk.next_clear(at, chunk) {
        let (c, z) = disk.populate(off, len).expect("populate");
        copied += c;
        zeroed += z;
        at = off + len;
    }
    (copied, zeroed)
}

/// Whether `[off, off+len)` of `file` is entirely a hole.
fn is_hole(file: &File, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd; no memory is passed.
    let d = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    d < 0 || d as u64 >= off + len
}

fn populate_case(image_cache: CacheMode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.img");
    // 6 MiB + 300 bytes of base (a partial last sector), data at 0..1 MiB+4 KiB, 2..2.5 MiB and
    // the last 8 KiB; holes elsewhere. The overlay is 10 MiB: 4 MiB past the base reads zeros.
    let base_len = 6 * MIB + 300;
    sparse_base(
        &base,
        base_len,
        &[(0, MIB + 4096), (2 * MIB, MIB / 2), (base_len - 8192, 8192)],
    );
    let overlay = dir.path().join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        size: Some(10 * MIB),
        ..CreateOptions::default()
    })
    .expect("create");
    // Stale garbage in the raw image under clear bits (a write that never got its bits), over a
    // base hole and past the base: it must not show after the stream.
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("vm.raw"))
        .expect("raw image");
    raw.write_all_at(&[0xee; 8192], MIB + MIB / 2)
        .expect("garbage");
    raw.write_all_at(&[0xee; 8192], 7 * MIB).expect("garbage");
    drop(raw);
    let engine = engine(image_cache);
    let disk = engine.open(&overlay, DiskOptions::default()).expect("open");
    // Written sectors (some over base data, some over holes, some past the base): kept.
    disk.write_at(4096 + 7, &[0xa1; 3000], false)
        .expect("write");
    disk.write_at(3 * MIB, &[0xa2; 8192], false).expect("write");
    disk.write_at(8 * MIB + 512, &[0xa3; 512], false)
        .expect("write");
    disk.write_at(2 * MIB + 100, &[0xa4; 100], false)
        .expect("write");
    let before = read_all(&disk);
    let clear_before = disk.size() - disk.allocated_bytes();

    let (copied, zeroed) = stream(&disk, MIB);
    disk.flush().expect("flush");
    assert!(disk.is_complete(), "complete after the stream");
    assert_eq!(
        copied + zeroed,
        clear_before,
        "every clear sector copied or zeroed"
    );
    assert!(
        copied >= MIB + MIB / 2,
        "the base's data was copied: {copied}"
    );
    assert!(
        zeroed >= 4 * MIB,
        "holes and past-the-base were zeroed: {zeroed}"
    );
    assert!(
        read_all(&disk) == before,
        "populate changed what the disk reads"
    );
    // A second stream finds nothing to do.
    assert_eq!(stream(&disk, MIB), (0, 0));
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");

    // The raw image alone is the disk, with holes where the base had holes or had ended.
    let image = File::open(dir.path().join("vm.raw")).expect("raw image");
    let mut raw = vec![0u8; before.len()];
    image.read_exact_at(&mut raw, 0).expect("read raw image");
    if let Some(b) = (0..raw.len()).find(|&b| raw[b] != before[b]) {
        panic!(
            "raw image differs at byte {b}: {:#04x} != {:#04x}",
            raw[b], before[b]
        );
    }
    assert!(
        is_hole(&image, MIB + 8192, MIB - 8192),
        "base hole stays a hole"
    );
    assert!(
        is_hole(&image, 6 * MIB + 4096, MIB + 512),
        "past the base is a hole"
    );
}

#[test]
fn populate_keeps_content_and_makes_the_raw_image_the_disk() {
    populate_case(CacheMode::Direct);
}

#[test]
fn populate_keeps_content_and_makes_the_raw_image_the_disk_buffered() {
    populate_case(CacheMode::Buffered);
}

#[test]
fn populate_refuses_bad_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let overlay = dir.path().join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        size: Some(MIB),
        ..CreateOptions::default()
    })
    .expect("create");
    let engine = engine(CacheMode::Direct);
    let disk = engine.open(&overlay, DiskOptions::default()).expect("open");
    assert_eq!(
        disk.populate(MIB - 512, 1024).unwrap_err().errno,
        libc::EINVAL
    );
    assert_eq!(disk.populate(u64::MAX, 2).unwrap_err().errno, libc::EINVAL);
    assert_eq!(disk.populate(0, 0).expect("empty"), (0, 0));
    assert_eq!(
        disk.populate(0, MAX_POPULATE + 512).unwrap_err().errno,
        libc::EINVAL
    );
    disk.close().expect("close");
    let ro = engine
        .open(
            &overlay,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("read-only open");
    assert_eq!(ro.populate(0, 512).unwrap_err().errno, libc::EPERM);
    ro.close().expect("close");
    engine.shutdown().expect("shutdown");
}

/// Writers keep writing unique patterns to random sectors (aligned and unaligned; over base
/// data, base holes and past the base) while a stream populates the disk in small chunks: every write must survive (a
/// populate that copied a range before the write landed must not write the old bytes over it).
#[test]
fn a_write_that_lands_during_populate_wins() {
    let seed = seed("POPULATE_SEED");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.img");
    let size = 4 * MIB;
    // Base data, base holes and (past 3 MiB) no base at all: writes race both the copy and the
    // punch path of populate.
    sparse_base(&base, 3 * MIB, &[(0, MIB), (2 * MIB, MIB / 2)]);
    let engine = engine(CacheMode::Direct);
    for round in 0..4u64 {
        let overlay = dir.path().join(format!("vm{round}.add-cow"));
        create(&CreateOptions {
            overlay: overlay.clone(),
            base: Some(base.clone()),
            size: Some(size),
            ..CreateOptions::default()
        })
        .expect("create");
        let disk = engine.open(&overlay, DiskOptions::default()).expect("open");
        let expected = Arc::new(std::sync::Mutex::new(read_all(&disk)));
        let stop = Arc::new(AtomicBool::new(false));
        // Writes answered so far: the stream waits for a new one before each populate, so the
        // writes race the stream however the machine schedules the threads.
        let written = Arc::new((std::sync::Mutex::new(0u64), std::sync::Condvar::new()));
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let (disk, expected, stop) = (disk.clone(), expected.clone(), stop.clone());
                let written = written.clone();
                thread::spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(seed ^ (round * 7 + t + 1));
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Thread t owns the sectors s with s % 3 == t (bytes never shared).
                        let s = rng.gen_range(0..size / 512 / 3) * 3 + t;
                        let (off, len) = if rng.gen_bool(0.5) {
                            (s * 512, 512)
                        } else {
                            (s * 512 + rng.gen_range(0..256), rng.gen_range(1..256))
                        };
                        n += 1;
                        let data = vec![(n % 250) as u8 + 3 + t as u8; len as usize];
                        disk.write_at(off, &data, false).expect("write");
                        expected.lock().unwrap()[off as usize..(off + len) as usize]
                            .copy_from_slice(&data);
                        let (count, changed) = &*written;
                        *count.lock().unwrap() += 1;
                        changed.notify_all();
                    }
                    n
                })
            })
            .collect();
        let mut rng = SmallRng::seed_from_u64(seed ^ round);
        let mut core = 0;
        while !disk.is_complete() {
            let mut at = rng.gen_range(0..size / 512) * 512;
            while let Some((off, len)) = disk.next_clear(at, rng.gen_range(1..=64) * 4096) {
                let (count, changed) = &*written;
                let seen = *count.lock().unwrap();
                // At most 10 s, so a writer that died fails the test at its join, not here.
                let _ = changed
                    .wait_timeout_while(
                        count.lock().unwrap(),
                        std::time::Duration::from_secs(10),
                        |n| *n == seen,
                    )
                    .unwrap();
                call(&disk, core, Request::Populate { offset: off, len }).expect("populate");
                core += 1;
                at = off + len;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        assert!(writes > 20, "too few writes raced the stream: {writes}");
        let got = read_all(&disk);
        let want = expected.lock().unwrap();
        if let Some(b) = (0..got.len()).find(|&b| got[b] != want[b]) {
            panic!(
                "round {round}: byte {b} reads {:#04x}, last written {:#04x} (seed {seed})",
                got[b], want[b]
            );
        }
        disk.close().expect("close");
    }
    engine.shutdown().expect("shutdown");
}

/// Copy-on-read of a read larger than one populate (`MAX_POPULATE`): the copy-up is split into
/// populates of at most that size, so every sector of the read ends up set, none skipped.
#[test]
fn copy_on_read_of_a_read_larger_than_max_populate_sets_every_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    let len = MAX_POPULATE + 2 * MIB;
    sparse_base(&base, len, &[(0, len)]);
    let overlay = dir.path().join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        ..CreateOptions::default()
    })
    .expect("create");
    let engine = engine(CacheMode::Buffered);
    let cor = DiskOptions {
        copy_on_read: true,
        ..Default::default()
    };
    let disk = engine.open(&overlay, cor).expect("open");
    let want = MAX_POPULATE + MIB + 4096;
    let got = disk.read_at(4096, want as u32).expect("read");
    let expect: Vec<u8> = (4096..4096 + want).map(|b| (b % 251) as u8 | 1).collect();
    assert!(got == expect, "the read returns the base's bytes");
    // Close waits for the copy-ups (they count as requests of the disk).
    disk.close().expect("close");
    let disk = engine
        .open(&overlay, DiskOptions::default())
        .expect("reopen");
    let first_clear = disk.next_clear(4096, want).map(|(at, _)| at);
    assert_eq!(
        first_clear,
        Some(4096 + want),
        "every sector of the {want}-byte read was copied up, and none past it"
    );
    assert_eq!(disk.next_clear(0, 4096), Some((0, 4096)), "nothing else");
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");
}
