//! The crash rule of changed-block tracking (DESIGN.md invariant 7) on the real engine: client
//! threads write, write zeroes, trim and flush on both cores with an enabled persistent dirty
//! bitmap, with the crash recorder logging the raw image's writes and the bitmaps sidecar's
//! writes and syncs on one timeline; the checker (`addcow_engine_testkit::crash_dirty`) builds
//! crash states at every point of the log and asserts that every sector whose bytes may differ
//! from the start is dirty in the sidecar of that state. Under the test-only feature
//! `unsafe-dirty-bits-after-data` (data let go before its bits are durable) the checker must
//! find violations.
#![cfg(feature = "crash-recorder")]

use std::thread;
use std::time::Duration;

use addcow_engine::io::recorder::Recorder;
use addcow_engine::{CacheMode, DiskOptions, Engine, EngineConfig, Request};
use addcow_engine_testkit::crash_dirty::{check, DirtyReport};
use addcow_engine_testkit::engine::{call, seed, Fixture};
use addcow_engine_testkit::pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SECTORS: u64 = 1024; // 512 KiB
const BASE_LEN: u64 = 700 * 512 + 100;

fn run(seed: u64, granularity: u64, threads: usize, ops: usize) -> (DirtyReport, u64) {
    let fx = Fixture::new(SECTORS, BASE_LEN, |s| s % 64 < 8, |s| s % 64 == 20);
    let (meta0, image0, base0) = fx.files();
    let initial = addcow_engine_testkit::reference::RefView::decode(&meta0, &image0, Some(&base0))
        .expect("fixture decodes")
        .read_all();

    let recorder = Recorder::new();
    let engine = Engine::start(EngineConfig {
        cores: 2,
        queue_depth: 64,
        arena_bytes: 4 << 20,
        image_cache: CacheMode::Direct,
        base_cache: CacheMode::Buffered,
        commit_delay: None,
        base_timeout: Duration::from_secs(30),
        recorder: Some(recorder.clone()),
        ..EngineConfig::default()
    })
    .expect("engine starts");
    let disk = engine
        .open(&fx.meta, DiskOptions::default())
        .expect("overlay opens");
    disk.bitmaps()
        .add("b0", granularity, true, true)
        .expect("bitmap add");
    // A disabled bitmap must not hold the writes back, and a second enabled one with another
    // granularity is checked too.
    disk.bitmaps()
        .add("off", 4096, true, false)
        .expect("bitmap add");
    disk.bitmaps()
        .add("b1", granularity * 8, true, true)
        .expect("bitmap add");
    let sidecar0 = std::fs::read(disk.bitmaps().path()).expect("sidecar exists");
    let start = recorder.snapshot().len();

    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, disk) = (engine.clone(), disk.clone());
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ (0x77 * (t as u64 + 1)));
                let ranges = pattern::owned_ranges(t, threads, SECTORS * 512, 16 << 10);
                for i in 0..ops {
                    let (lo, hi) = ranges[rng.gen_range(0..ranges.len())];
                    let off = rng.gen_range(lo..hi);
                    let len = rng.gen_range(1..=(hi - off).min(9000));
                    let core = t + i;
                    let kind = rng.gen_range(0..100);
                    let req = if kind < 10 {
                        Request::Flush
                    } else if kind < 80 {
                        let data =
                            pattern::write_data(i as u64 + 1000 * t as u64, off, len as usize);
                        let mut buf = engine.alloc_buf(data.len());
                        buf.copy_from_slice(&data);
                        Request::Write {
                            offset: off,
                            data: buf.into(),
                            fua: rng.gen_bool(0.1),
                        }
                    } else if kind < 90 {
                        Request::WriteZeroes {
                            offset: off,
                            len,
                            punch: rng.gen_bool(0.5),
                            fua: false,
                        }
                    } else {
                        Request::Trim {
                            offset: off,
                            len,
                            fua: false,
                        }
                    };
                    call(&disk, core, req).expect("request");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    call(&disk, 0, Request::Flush).expect("final flush");
    let dirty_bytes = disk.bitmaps().list()[0].dirty_bytes;
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");
    let events = recorder.snapshot();
    let started = std::time::Instant::now();
    let report = check(&initial, &sidecar0, &events[start..], seed, 3);
    eprintln!(
        "granularity {granularity}: {} events, checked in {:?}; {report}",
        events.len() - start,
        started.elapsed()
    );
    (report, dirty_bytes)
}

#[cfg(not(feature = "unsafe-dirty-bits-after-data"))]
#[test]
fn dirty_bits_are_durable_before_their_data_in_every_crash_state() {
    let seed = seed("ADDCOW_CRASH_SEED");
    for granularity in [512, 4096] {
        let (report, dirty_bytes) = run(seed, granularity, 3, 150);
        assert!(
            report.sidecar_syncs > 0,
            "no sidecar sync recorded: {report}"
        );
        assert!(
            report.changed_sectors > 0,
            "workload changed nothing: {report}"
        );
        assert!(report.states >= 1000, "too few crash states: {report}");
        assert!(
            dirty_bytes >= report.changed_sectors as u64 * 512 / 2,
            "dirty bytes {dirty_bytes} too few for {} changed sectors",
            report.changed_sectors
        );
        assert_eq!(
            report.violating_states, 0,
            "seed {seed}, granularity {granularity}: {report}"
        );
    }
}

#[cfg(feature = "unsafe-dirty-bits-after-data")]
#[test]
fn crash_checker_detects_dirty_bits_after_data() {
    let seed = seed("ADDCOW_CRASH_SEED");
    let mut found = 0;
    for i in 0..4u64 {
        let (report, _) = run(seed.wrapping_add(i), 512, 3, 150);
        found += report.violating_states;
        if found > 0 {
            break;
        }
    }
    assert!(
        found > 0,
        "the checker missed data written before its dirty bits were durable"
    );
}

/// The sidecar the run leaves behind opens, and its dirty bits cover what was written.
#[cfg(not(feature = "unsafe-dirty-bits-after-data"))]
#[test]
fn reopened_bitmap_covers_the_writes() {
    let fx = Fixture::new(64, 64 * 512, |_| false, |_| false);
    let engine = Engine::start(EngineConfig {
        cores: 2,
        ..EngineConfig::default()
    })
    .expect("engine");
    let disk = engine.open(&fx.meta, DiskOptions::default()).expect("open");
    disk.bitmaps().add("b", 4096, true, true).expect("add");
    disk.write_at(5000, &[7u8; 100], false).expect("write");
    disk.write_at(20480, &[7u8; 8192], false).expect("write");
    disk.close().expect("close");
    let disk = engine
        .open(&fx.meta, DiskOptions::default())
        .expect("reopen");
    let ext = disk
        .bitmaps()
        .extents("b", 0, 64 * 512, usize::MAX)
        .expect("extents");
    let dirty: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.dirty)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(dirty, vec![(4096, 4096), (20480, 8192)]);
    disk.close().expect("close");
    engine.shutdown().expect("shutdown");
}
