//! DESIGN invariant 1, checked on the engine's own recorder log: every bit that a metadata write
//! persists covers data that an fdatasync of the raw image made durable *before* that write.
//! Concretely, for each `Write{Meta}` at log position `m` and each bit it sets, the last raw-image
//! write (or punch) of that sector at position `w < m` must be covered by an image sync with
//! `SyncBegin > w` and `SyncEnd < m`.
//!
//! And the FLUSH rule of invariant 3: a FLUSH is answered only by a commit that began after the
//! writes answered before it, so their data and bits are durable when it is answered (checked
//! with another thread keeping commits in flight, so FLUSHes must wait for the next one).
//!
//! With the test-only feature `unsafe-bits-before-sync` (which persists bitmap blocks before the
//! data sync) this test must fail, and it is marked `should_panic` then.
#![cfg(feature = "crash-recorder")]

use std::collections::HashMap;

use addcow_engine::io::recorder::{ClientEvent, Event, FileRole, Recorder};
use addcow_engine::Request;
use addcow_engine_testkit::harness::*;

const HEADER: u64 = 2560;

/// Checks the log; returns how many (meta write, set bit with a data write) pairs it verified.
fn check_bits_after_data_sync(events: &[Event]) -> usize {
    let mut last_data: HashMap<u64, usize> = HashMap::new();
    let mut sync_begin: HashMap<u64, usize> = HashMap::new();
    let mut image_syncs: Vec<(usize, usize)> = Vec::new();
    let mut checked = 0;
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Event::Write {
                file: FileRole::Image,
                offset,
                data,
            } => {
                for s in offset / 512..(offset + data.len() as u64).div_ceil(512) {
                    last_data.insert(s, i);
                }
            }
            Event::Punch {
                file: FileRole::Image,
                offset,
                len,
            } => {
                for s in offset / 512..(offset + len).div_ceil(512) {
                    last_data.insert(s, i);
                }
            }
            Event::SyncBegin {
                file: FileRole::Image,
                id,
            } => {
                sync_begin.insert(*id, i);
            }
            Event::SyncEnd {
                file: FileRole::Image,
                id,
            } => {
                let begin = sync_begin
                    .get(id)
                    .copied()
                    .expect("SyncEnd without SyncBegin");
                image_syncs.push((begin, i));
            }
            Event::Write {
                file: FileRole::Meta,
                offset,
                data,
            } => {
                for (k, &byte) in data.iter().enumerate() {
                    let pos = offset + k as u64;
                    if pos < HEADER || byte == 0 {
                        continue;
                    }
                    for b in 0..8 {
                        if byte & (1 << b) == 0 {
                            continue;
                        }
                        let sector = (pos - HEADER) * 8 + b;
                        let Some(&w) = last_data.get(&sector) else {
                            continue; // set before this run: no data write in the log
                        };
                        let durable = image_syncs.iter().any(|&(sb, se)| sb > w && se < i);
                        assert!(
                            durable,
                            "bit persisted before its data was durable: sector {sector}, data \
                             write at log position {w}, metadata write at {i}"
                        );
                        checked += 1;
                    }
                }
            }
            _ => {}
        }
    }
    checked
}

#[test]
#[cfg_attr(
    feature = "unsafe-bits-before-sync",
    should_panic(expected = "bit persisted before its data was durable")
)]
fn crash_order_bitmap_reaches_disk_only_after_the_data_sync() {
    let f = fixture(4 << 20, 2 << 20);
    let rec = Recorder::new();
    let mut cfg = config(2);
    cfg.recorder = Some(rec.clone());
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let off = (t << 20) + (i * 20_011) % (1 << 20);
                    match i % 5 {
                        0 => d.write_at(off, &payload(i, 4096), false).expect("write"),
                        1 => d
                            .write_at(off + 7, &payload(i, 300), i % 2 == 0)
                            .expect("write"),
                        2 => {
                            d.request(Request::Trim {
                                offset: off,
                                len: 9000,
                                fua: false,
                            })
                            .expect("trim");
                        }
                        3 => {
                            d.request(Request::WriteZeroes {
                                offset: off,
                                len: 5000,
                                punch: false,
                                fua: false,
                            })
                            .expect("zeroes");
                        }
                        _ => d.flush().expect("flush"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    d.close().expect("close");
    let events = rec.snapshot();
    let checked = check_bits_after_data_sync(&events);
    assert!(
        checked > 100,
        "the log exercised the invariant ({checked} bits checked)"
    );
}

#[test]
#[cfg_attr(
    feature = "unsafe-bits-before-sync",
    should_panic(expected = "bit persisted before its data was durable")
)]
fn crash_order_holds_for_a_commit_longer_than_one_chain() {
    // A 64 GiB overlay (sparse): every 3rd of its 4096 metadata blocks is dirtied, so one commit
    // has about 1400 spans and runs as many chains, each pushed when the one before completed.
    // The raw image is buffered and 64 MiB of it dirty, so its fdatasync takes a while: a bitmap
    // write sent along before it ends would complete (and be logged) before it.
    let f = fixture(64 << 30, 0);
    let rec = Recorder::new();
    let mut cfg = config(2);
    cfg.recorder = Some(rec.clone());
    cfg.image_cache = addcow_engine::CacheMode::Buffered;
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    for i in 0..64u64 {
        d.write_at((1 << 30) + (i << 20), &payload(i, 1 << 20), false)
            .expect("write");
    }
    for b in (1..4096u64).step_by(3) {
        let sector = (b * 4096 - HEADER + 8) * 8;
        d.write_at(sector * 512, &payload(b, 512), false)
            .expect("write");
    }
    d.flush().expect("flush");
    d.close().expect("close");
    let checked = check_bits_after_data_sync(&rec.snapshot());
    assert!(checked >= 1365, "every dirtied bit was checked ({checked})");
}

/// For a FLUSH answered at log position `p` and a write answered (by the same thread, before
/// it sent the FLUSH) whose data write completed at `w` (the last raw-image write of its first
/// sector before its answer; a commit launched between that completion and the answer covers
/// it, and a FLUSH may share that commit): some image fdatasync began after `w` and ended
/// before `p`, and the
/// write's (fresh) bit was written to the metadata file by a write that a metadata fdatasync
/// (begun after that write, ended before `p`) made durable. (The bit's write may precede `w`: a
/// concurrent commit can persist it between the bit being set and the answer being logged.)
/// Returns the pairs checked.
fn check_flush_covers_earlier_writes(events: &[Event]) -> usize {
    let mut checked = 0;
    let mut answered: Vec<(usize, u64, usize)> = Vec::new(); // (pos, offset, len)
    let mut begins: HashMap<(bool, u64), usize> = HashMap::new();
    let mut syncs: Vec<(bool, usize, usize)> = Vec::new(); // (is_meta, begin, end)
    let mut meta_writes: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    let mut last_data: HashMap<u64, usize> = HashMap::new();
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Event::Write {
                file: FileRole::Image,
                offset,
                data,
            } => {
                for s in offset / 512..(offset + data.len() as u64).div_ceil(512) {
                    last_data.insert(s, i);
                }
            }
            Event::SyncBegin { file, id } => {
                begins.insert((*file == FileRole::Meta, *id), i);
            }
            Event::SyncEnd { file, id } => {
                let meta = *file == FileRole::Meta;
                let b = begins
                    .get(&(meta, *id))
                    .copied()
                    .expect("SyncEnd without SyncBegin");
                syncs.push((meta, b, i));
            }
            Event::Write {
                file: FileRole::Meta,
                offset,
                data,
            } => {
                meta_writes.push((i, *offset, data.clone()));
            }
            Event::Client(ClientEvent::WriteAnswered { offset, data, .. }) => {
                let w = last_data
                    .get(&(offset / 512))
                    .copied()
                    .expect("a write answered before its data write was logged");
                answered.push((w, *offset, data.len()));
            }
            Event::Client(ClientEvent::FlushAnswered { .. }) => {
                for &(w, offset, len) in &answered {
                    assert!(
                        syncs.iter().any(|&(m, b, e)| !m && b > w && e < i),
                        "FLUSH at {i} answered without a raw-image sync begun after write at {w}"
                    );
                    let sector = offset / 512;
                    let (byte, bit) = (HEADER + sector / 8, sector % 8);
                    let persisted = meta_writes.iter().any(|(mi, mo, md)| {
                        byte >= *mo
                            && byte < *mo + md.len() as u64
                            && md[(byte - mo) as usize] & (1 << bit) != 0
                            && syncs.iter().any(|&(m, b, e)| m && b > *mi && e < i)
                    });
                    assert!(persisted, "FLUSH at {i} answered before the bit of write at {w} ({len} bytes) was durable");
                    checked += 1;
                }
                answered.clear();
            }
            _ => {}
        }
    }
    checked
}

#[test]
fn crash_order_flush_is_answered_by_a_commit_that_covers_earlier_writes() {
    let f = fixture(8 << 20, 0);
    let rec = Recorder::new();
    let mut cfg = config(2);
    cfg.recorder = Some(rec.clone());
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    // A thread that keeps commits in flight, so the checked FLUSHes often arrive while one is
    // running and must wait for (and join) the next one.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spammer = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                d.write_at((4 << 20) + (n % 2048) * 512, &[1; 512], false)
                    .expect("write");
                d.flush().expect("flush");
                n += 1;
            }
        })
    };
    for i in 0..60u64 {
        // Fresh sectors each time, so every checked bit is new.
        let offset = i * 8192 + (i % 3) * 512;
        let data = payload(i, 512 + (i as usize % 2) * 512);
        d.write_at(offset, &data, false).expect("write");
        rec.push(Event::Client(ClientEvent::WriteAnswered {
            id: i,
            offset,
            data,
        }));
        d.flush().expect("flush");
        rec.push(Event::Client(ClientEvent::FlushAnswered { id: i }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spammer.join().expect("spammer");
    d.close().expect("close");
    let checked = check_flush_covers_earlier_writes(&rec.snapshot());
    assert_eq!(checked, 60);
}
