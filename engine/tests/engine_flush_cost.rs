//! What a FLUSH costs, read off the engine's recorder log (every write, punch and fdatasync the
//! engine issues is logged): a FLUSH with nothing written since the last durable point issues
//! no I/O at all; one after overwrites of sectors whose bits are already set is one fdatasync of
//! the raw image and nothing else; one after a first write is the full chain (raw-image sync,
//! bitmap writes, metadata sync). FUA writes follow the same rules.
#![cfg(feature = "crash-recorder")]

use addcow_engine::io::recorder::{Event, FileRole, Recorder};
use addcow_engine::{Disk, Request};
use addcow_engine_testkit::harness::*;

/// The engine's own I/O logged since `from`, as short names (sync ends are left out).
fn io_since(rec: &Recorder, from: usize) -> Vec<&'static str> {
    rec.snapshot()[from..]
        .iter()
        .filter_map(|e| match e {
            Event::SyncBegin {
                file: FileRole::Image,
                ..
            } => Some("sync image"),
            Event::SyncBegin {
                file: FileRole::Meta,
                ..
            } => Some("sync meta"),
            Event::Write {
                file: FileRole::Meta,
                ..
            } => Some("write meta"),
            Event::Write {
                file: FileRole::Image,
                ..
            } => Some("write image"),
            Event::Punch { .. } => Some("punch"),
            _ => None,
        })
        .collect()
}

/// Runs `f` and returns the engine I/O it caused.
fn logged(rec: &Recorder, f: impl FnOnce()) -> Vec<&'static str> {
    let from = rec.snapshot().len();
    f();
    io_since(rec, from)
}

fn setup() -> (
    Fixture,
    std::sync::Arc<Recorder>,
    addcow_engine::Engine,
    Disk,
) {
    let f = fixture(4 << 20, 1 << 20);
    let rec = Recorder::new();
    let mut cfg = config(2);
    cfg.recorder = Some(rec.clone());
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    (f, rec, e, d)
}

/// With the test-only feature `unsafe-flush-skips-data-sync` (no sync when no bit is new) the
/// overwrite check must fail, and it is marked `should_panic` then.
#[test]
#[cfg_attr(
    feature = "unsafe-flush-skips-data-sync",
    should_panic(expected = "an overwrite of set bits")
)]
fn crash_flush_costs_only_what_was_written() {
    let (_f, rec, _e, d) = setup();
    let full = ["sync image", "write meta", "sync meta"];

    // A first write: its bit is new, so the whole chain.
    d.write_at(8192, &payload(1, 4096), false).expect("write");
    assert_eq!(logged(&rec, || d.flush().expect("flush")), full);
    // Nothing since: no I/O at all, however many FLUSHes.
    for _ in 0..3 {
        assert_eq!(logged(&rec, || d.flush().expect("flush")), [] as [&str; 0]);
    }

    // An overwrite of set bits: one raw-image fdatasync, no metadata write or sync.
    d.write_at(8192, &payload(2, 4096), false).expect("write");
    assert_eq!(
        logged(&rec, || d.flush().expect("flush")),
        ["sync image"],
        "a FLUSH after an overwrite of set bits"
    );
    assert_eq!(logged(&rec, || d.flush().expect("flush")), [] as [&str; 0]);

    // Read-modify-write inside set sectors, write-zeroes and a trim of set sectors: each one
    // data sync (their bits were set already).
    d.write_at(8192 + 7, &payload(3, 100), false)
        .expect("write");
    assert_eq!(logged(&rec, || d.flush().expect("flush")), ["sync image"]);
    for req in [
        Request::WriteZeroes {
            offset: 8192,
            len: 4096,
            punch: false,
            fua: false,
        },
        Request::Trim {
            offset: 8192,
            len: 4096,
            fua: false,
        },
    ] {
        d.request(req).expect("zero");
        assert_eq!(logged(&rec, || d.flush().expect("flush")), ["sync image"]);
        assert_eq!(logged(&rec, || d.flush().expect("flush")), [] as [&str; 0]);
    }

    // A populate of a clear range copies base bytes into the raw image and sets bits.
    d.request(Request::Populate {
        offset: 1 << 16,
        len: 4096,
    })
    .expect("populate");
    assert_eq!(logged(&rec, || d.flush().expect("flush")), full);
    // Populating it again changes nothing: no I/O for the FLUSH after.
    d.request(Request::Populate {
        offset: 1 << 16,
        len: 4096,
    })
    .expect("populate");
    assert_eq!(logged(&rec, || d.flush().expect("flush")), [] as [&str; 0]);

    // FUA: an overwrite of set bits is its data write plus one data sync.
    let io = logged(&rec, || {
        d.write_at(8192, &payload(4, 4096), true)
            .expect("fua write");
    });
    assert_eq!(io, ["write image", "sync image"]);
    let io = logged(&rec, || {
        d.write_at(1 << 20, &payload(5, 4096), true)
            .expect("fua write");
    });
    assert_eq!(io, ["write image", "sync image", "write meta", "sync meta"]);

    let s = d.stats();
    // Every FLUSH above that did no I/O was a skipped commit; every other one a real commit.
    assert_eq!((s.commits, s.commits_skipped), (8, 7), "{s:?}");
    d.close().expect("close");
}

/// Right after open the raw image may hold unsynced pages an earlier process left behind: the
/// first FLUSH syncs the raw image once (and only it), the next one nothing.
#[test]
fn crash_first_flush_after_open_syncs_the_raw_image_once() {
    let (_f, rec, _e, d) = setup();
    assert_eq!(logged(&rec, || d.flush().expect("flush")), ["sync image"]);
    assert_eq!(logged(&rec, || d.flush().expect("flush")), [] as [&str; 0]);
    d.close().expect("close");
}

/// FLUSHes from many threads with nothing written: none of them syncs, whatever commit (or
/// none) is in flight when they arrive.
#[test]
fn crash_concurrent_flushes_with_nothing_written_issue_no_sync() {
    let (_f, rec, _e, d) = setup();
    d.write_at(0, &payload(1, 4096), false).expect("write");
    d.flush().expect("flush");
    let io = logged(&rec, || {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        d.flush().expect("flush");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    });
    assert_eq!(io, [] as [&str; 0]);
    d.close().expect("close");
}
