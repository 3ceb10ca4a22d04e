//! The engine's failure paths, run by rewriting what the kernel answers (feature
//! `fault-injection`): a failed data fdatasync, a failed or short bitmap write, a failed metadata
//! fdatasync, a cancelled chain, ENOSPC and EIO on data writes, short reads and writes, and a
//! core that panics. Each ends with the request failed (or finished correctly), no bit persisted
//! for data that was not durable, and the disk still usable (or, after a failed data sync,
//! refusing commits with EIO).
//!
//! With the test-only feature `unsafe-bits-before-sync` (bitmap written before the data sync),
//! the failed-data-sync test must find the bit on disk, and it is `should_panic` then.
#![cfg(feature = "fault-injection")]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use addcow_engine::io::faults::{FaultAction, FaultFile, FaultOp, FaultPlan, FaultRule};
use addcow_engine::{CacheMode, Disk, Engine, ExtentKind, Request};
use addcow_engine_testkit::harness::*;

const HEADER: u64 = 2560;

fn faulty_engine(cores: usize, cache: CacheMode) -> (Engine, Arc<FaultPlan>) {
    let plan = FaultPlan::new();
    let mut cfg = config(cores);
    cfg.image_cache = cache;
    cfg.base_cache = cache;
    cfg.faults = Some(plan.clone());
    (Engine::start(cfg).expect("engine"), plan)
}

/// Whether the bit of `sector` is set in the metadata file on disk (what a crash would find,
/// at best: what was written, synced or not).
fn bit_on_disk(overlay: &Path, sector: u64) -> bool {
    let meta = std::fs::read(overlay).expect("read metadata");
    meta[(HEADER + sector / 8) as usize] & (1 << (sector % 8)) != 0
}

fn rule(file: FaultFile, op: FaultOp, action: FaultAction) -> FaultRule {
    FaultRule::new(file, op, action)
}

/// Reopens the overlay on a clean engine and checks it against `model`.
fn reopen_check(f: &Fixture, model: &Model) {
    let e = engine(1);
    let d = open(&e, &f.overlay);
    model.check(&d);
    d.close().expect("close");
}

#[test]
#[cfg_attr(
    feature = "unsafe-bits-before-sync",
    should_panic(expected = "no bit was written for data that is not durable")
)]
fn a_failed_data_fdatasync_persists_no_bit_and_later_commits_fail_with_eio() {
    let f = fixture(1 << 20, 1 << 20);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    let data = payload(1, 4096);
    d.write_at(64 << 10, &data, false).expect("write");
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Sync,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d.flush().expect_err("the data sync failed");
    assert_eq!(err.errno, libc::EIO, "{err}");
    assert_eq!(plan.fired(), 1);
    assert!(
        !bit_on_disk(&f.overlay, 128),
        "no bit was written for data that is not durable"
    );
    // The disk still serves reads and writes, but no commit can vouch for the data any more.
    assert_eq!(d.read_at(64 << 10, 4096).expect("read"), data);
    d.write_at(0, &payload(2, 512), false).expect("write");
    let err = d.flush().expect_err("commits are refused");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.op.contains("refused"), "{err}");
    let err = d
        .write_at(8192, &payload(3, 512), true)
        .expect_err("FUA needs a commit");
    assert_eq!(err.errno, libc::EIO);
    assert!(!bit_on_disk(&f.overlay, 128) && !bit_on_disk(&f.overlay, 0));
    assert!(d.close().is_err(), "the final commit is refused too");
    drop((d, e));
    // Reopening recovers: the bits on disk describe only durable data, so the unflushed writes
    // read as the base again.
    reopen_check(&f, &Model::new(&f));
}

#[test]
#[cfg_attr(
    feature = "unsafe-bits-before-sync",
    should_panic(expected = "reached the file after the data sync failed")
)]
fn a_failed_data_fdatasync_stops_every_later_chain_of_a_long_commit() {
    // 64 GiB (sparse): dirtying every 3rd of its 4096 metadata blocks makes a commit of about
    // 1400 bitmap writes, run as many linked chains. When the data sync at the head of the
    // first chain fails, no later chain may be sent: none of those bits reaches the file.
    let f = fixture(64 << 30, 0);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    let sectors: Vec<u64> = (1..4096u64)
        .step_by(3)
        .map(|b| (b * 4096 - HEADER + 8) * 8)
        .collect();
    for &s in &sectors {
        d.write_at(s * 512, &payload(s, 512), false).expect("write");
    }
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Sync,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d.flush().expect_err("the data sync failed");
    assert_eq!(err.errno, libc::EIO);
    let meta = std::fs::read(&f.overlay).expect("read metadata");
    for &s in &sectors {
        assert_eq!(
            meta[(HEADER + s / 8) as usize] & (1 << (s % 8)),
            0,
            "the bit of sector {s} reached the file after the data sync failed"
        );
    }
    drop(d.close());
}

#[test]
fn a_failed_bitmap_write_fails_the_flush_and_the_next_commit_writes_the_bits() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    let data = payload(1, 8192);
    d.write_at(128 << 10, &data, false).expect("write");
    model.write(128 << 10, &data);
    plan.add(rule(
        FaultFile::Meta,
        FaultOp::Write,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d.flush().expect_err("the bitmap write failed");
    assert_eq!((err.errno, err.op), (libc::EIO, "write bitmap"));
    assert!(
        !bit_on_disk(&f.overlay, 256),
        "the failed write left the bits off disk"
    );
    assert_eq!(d.stats().commits_failed, 1);
    // The blocks were re-marked: the next commit writes them.
    d.flush().expect("the next commit");
    assert!(bit_on_disk(&f.overlay, 256) && bit_on_disk(&f.overlay, 271));
    model.check(&d);
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn a_short_bitmap_write_breaks_the_chain_and_the_next_commit_retries() {
    let f = fixture(1 << 20, 0);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(1, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    d.write_at(0, &payload(1, 4096), false).expect("write");
    model.write(0, &payload(1, 4096));
    plan.add(rule(
        FaultFile::Meta,
        FaultOp::Write,
        FaultAction::Short(100),
    ));
    plan.add(rule(
        FaultFile::Meta,
        FaultOp::Sync,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d
        .flush()
        .expect_err("a short bitmap write fails the commit");
    assert_eq!(err.errno, libc::EIO);
    assert_eq!(plan.fired(), 1, "the metadata sync after it never ran");
    // The next commit rewrites the block; its metadata sync meets the second rule.
    d.flush().expect_err("the metadata sync failed");
    assert_eq!(plan.fired(), 2);
    // That one failed too, so the block is still dirty; a third commit persists it.
    d.flush().expect("third commit");
    assert!(bit_on_disk(&f.overlay, 7));
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn a_failed_metadata_fdatasync_fails_the_flush_and_the_next_commit_persists() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    d.write_at(4096, &payload(1, 4096), false).expect("write");
    model.write(4096, &payload(1, 4096));
    plan.add(rule(
        FaultFile::Meta,
        FaultOp::Sync,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d.flush().expect_err("the metadata sync failed");
    assert_eq!((err.errno, err.op), (libc::EIO, "fdatasync metadata"));
    // Unlike a data sync, a failed metadata sync is retried: the blocks are rewritten whole.
    d.flush().expect("the next commit");
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn a_cancelled_chain_fails_its_waiters_and_leaves_the_disk_usable() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    d.write_at(8192, &payload(1, 4096), false).expect("write");
    model.write(8192, &payload(1, 4096));
    // The whole chain is cancelled from its first op (as by an async cancel or ring teardown):
    // nothing ran, so nothing is known to have failed for good.
    plan.add(rule(FaultFile::Image, FaultOp::Sync, FaultAction::Cancel));
    let err = d.flush().expect_err("cancelled");
    assert_eq!(err.errno, libc::ECANCELED, "{err}");
    assert!(!bit_on_disk(&f.overlay, 16));
    d.flush()
        .expect("a cancelled data sync does not stop later commits");
    assert!(bit_on_disk(&f.overlay, 16));
    // Cancelled in the middle: the bitmap write is cancelled, so is the metadata sync after it.
    d.write_at(16384, &payload(2, 512), false).expect("write");
    model.write(16384, &payload(2, 512));
    plan.add(rule(FaultFile::Meta, FaultOp::Write, FaultAction::Cancel));
    plan.add(rule(
        FaultFile::Meta,
        FaultOp::Sync,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d.flush().expect_err("cancelled");
    assert_eq!(err.errno, libc::ECANCELED);
    assert_eq!(plan.fired(), 2, "the metadata sync never ran");
    assert!(!bit_on_disk(&f.overlay, 32));
    // The Fail rule on the metadata sync is still armed: it takes the next commit.
    d.flush().expect_err("metadata sync");
    d.flush().expect("and the one after persists");
    assert!(bit_on_disk(&f.overlay, 32));
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn enospc_and_eio_on_data_writes_fail_that_request_and_set_no_bit() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Write,
        FaultAction::Fail(libc::ENOSPC),
    ));
    let err = d
        .write_at(4096, &payload(1, 4096), false)
        .expect_err("no space");
    assert_eq!((err.errno, err.op), (libc::ENOSPC, "write raw image"));
    assert_eq!(d.allocation(4096, 4096)[0].kind, ExtentKind::Base);
    // A read-modify-write whose edge read fails.
    plan.add(rule(
        FaultFile::Base,
        FaultOp::Read,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d
        .write_at(20_000, &payload(2, 100), false)
        .expect_err("edge read failed");
    assert_eq!((err.errno, err.op), (libc::EIO, "read base"));
    assert_eq!(d.allocation(19_968, 512)[0].kind, ExtentKind::Base);
    // A hole punch that fails.
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Punch,
        FaultAction::Fail(libc::EIO),
    ));
    let err = d
        .request(Request::Trim {
            offset: 65536,
            len: 65536,
            fua: false,
        })
        .expect_err("punch failed");
    assert_eq!(err.errno, libc::EIO);
    assert_eq!(d.allocation(65536, 65536)[0].kind, ExtentKind::Base);
    assert_eq!(d.stats().bits_set, 0);
    // The disk goes on.
    d.write_at(4096, &payload(3, 4096), false).expect("write");
    model.write(4096, &payload(3, 4096));
    model.check(&d);
    d.flush().expect("flush");
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

/// Short reads and writes inside a file are finished with a second transfer (not answered
/// with EIO, nor as zeros).
fn short_transfers_are_finished(cache: CacheMode) {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(1, cache);
    let d = open(&e, &f.overlay);
    let data = payload(1, 256 << 10);
    plan.add(rule(FaultFile::Image, FaultOp::Write, FaultAction::Short(5000)).times(3));
    d.write_at(0, &data, false)
        .expect("short writes are finished");
    model.write(0, &data);
    plan.add(rule(FaultFile::Image, FaultOp::Read, FaultAction::Short(1000)).times(3));
    assert_eq!(
        d.read_at(0, 256 << 10).expect("short reads are finished"),
        data
    );
    plan.add(rule(FaultFile::Base, FaultOp::Read, FaultAction::Short(3000)).times(3));
    model.check(&d);
    assert!(
        plan.fired() >= 9,
        "every rule fired ({} faults)",
        plan.fired()
    );
    d.flush().expect("flush");
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn short_reads_and_writes_inside_the_file_are_finished_buffered() {
    short_transfers_are_finished(CacheMode::Buffered);
}

#[test]
fn short_reads_and_writes_inside_the_file_are_finished_direct() {
    short_transfers_are_finished(CacheMode::Direct);
}

#[test]
fn a_read_that_never_progresses_fails_with_eio() {
    let f = fixture(1 << 20, 1 << 20);
    let (e, plan) = faulty_engine(1, CacheMode::Buffered);
    let d = open(&e, &f.overlay);
    plan.add(rule(FaultFile::Base, FaultOp::Read, FaultAction::Short(0)).times(u64::MAX));
    let err = d.read_at(4096, 4096).expect_err("no progress");
    assert_eq!((err.errno, err.op), (libc::EIO, "read base"));
    plan.clear();
    assert_eq!(d.read_at(4096, 4096).expect("read").len(), 4096);
    d.close().expect("close");
}

/// Submits `n` reads spread over both cores of `d`; answers arrive as (id, ok).
fn submit_reads(d: &Disk, n: u64, tx: &mpsc::Sender<(u64, bool)>) {
    for i in 0..n {
        let tx = tx.clone();
        d.submit(
            i as usize,
            Request::Read {
                offset: (i % 200) * 4096,
                len: 4096,
            },
            Box::new(move |r| {
                let _ = tx.send((i, r.is_ok()));
            }),
        );
    }
}

#[test]
fn a_core_that_panics_answers_every_request_once_and_the_disk_still_closes() {
    let f = fixture(1 << 20, 1 << 20);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    d.write_at(0, &payload(1, 1 << 20), false).expect("fill");
    // The 50th raw-image read panics its core while others are in flight and queued.
    plan.add(rule(FaultFile::Image, FaultOp::Read, FaultAction::Panic).skip(50));
    let (tx, rx) = mpsc::channel();
    submit_reads(&d, 2000, &tx);
    let mut answers: HashMap<u64, u32> = HashMap::new();
    let mut ok = 0;
    while let Ok((i, good)) = rx.recv_timeout(Duration::from_secs(20)) {
        *answers.entry(i).or_default() += 1;
        ok += u64::from(good);
        if answers.len() == 2000 {
            break;
        }
    }
    assert_eq!(plan.fired(), 1, "a core panicked");
    assert_eq!(answers.len(), 2000, "every request was answered");
    assert!(answers.values().all(|&c| c == 1), "and only once");
    assert!(
        ok > 50 && ok < 2000,
        "{ok} answered OK: the dead core's failed"
    );
    // The other core still serves the disk; the dead one refuses at once.
    let (tx2, rx2) = mpsc::channel();
    submit_reads(&d, 20, &tx2);
    let mut got = 0;
    while let Ok((_, _)) = rx2.recv_timeout(Duration::from_secs(10)) {
        got += 1;
        if got == 20 {
            break;
        }
    }
    assert_eq!(got, 20);
    // Close (its final commit runs on the live core) and shutdown return.
    let (ctx, crx) = mpsc::channel();
    let closer = std::thread::spawn(move || {
        let r = d.close().map_err(|e| e.to_string());
        let s = e.shutdown().map_err(|e| e.to_string());
        let _ = ctx.send((r, s));
    });
    let (r, s) = crx
        .recv_timeout(Duration::from_secs(30))
        .expect("close and shutdown returned");
    closer.join().expect("closer");
    r.expect("close commits on the live core");
    s.expect("shutdown");
    drop(tx);
    reopen_check(&f, &{
        let mut m = Model::new(&f);
        m.write(0, &payload(1, 1 << 20));
        m
    });
}

#[test]
fn a_core_that_panics_while_holding_the_range_lock_lets_every_other_write_finish() {
    let f = fixture(1 << 20, 1 << 20);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    // Sub-sector writes into the same few sectors from both cores: each reads its unit back, so
    // they take the stripe exclusively in turns and most wait in the lock. The 20th raw-image
    // write panics its core while it holds the stripe.
    plan.add(rule(FaultFile::Image, FaultOp::Write, FaultAction::Panic).skip(20));
    let (tx, rx) = mpsc::channel();
    const N: u64 = 400;
    for i in 0..N {
        let mut buf = e.alloc_buf(100);
        buf.copy_from_slice(&payload(i, 100));
        let tx = tx.clone();
        d.submit(
            i as usize,
            Request::Write {
                offset: (i % 16) * 512 + 7,
                data: buf.into(),
                fua: false,
            },
            Box::new(move |r| {
                let _ = tx.send((i, r.is_ok()));
            }),
        );
    }
    let mut answers: HashMap<u64, u32> = HashMap::new();
    while let Ok((i, _)) = rx.recv_timeout(Duration::from_secs(20)) {
        *answers.entry(i).or_default() += 1;
        if answers.len() as u64 == N {
            break;
        }
    }
    assert_eq!(plan.fired(), 1, "a core panicked");
    assert_eq!(
        answers.len() as u64,
        N,
        "every write was answered (none waits forever for the stripe the dead core held)"
    );
    assert!(answers.values().all(|&c| c == 1), "and only once");
    let (ctx, crx) = mpsc::channel();
    let closer = std::thread::spawn(move || {
        let r = d.close().map_err(|e| e.to_string());
        let _ = e.shutdown();
        let _ = ctx.send(r);
    });
    crx.recv_timeout(Duration::from_secs(30))
        .expect("close returned")
        .expect("close commits on the live core");
    closer.join().expect("closer");
}

#[test]
fn a_failed_commit_does_not_advance_the_durable_point() {
    let f = fixture(1 << 20, 0);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = open(&e, &f.overlay);
    d.write_at(8192, &payload(1, 4096), false).expect("write");
    d.flush().expect("flush");
    // An overwrite of set bits: its commit is the data sync alone. Cancel it.
    d.write_at(8192, &payload(2, 4096), false)
        .expect("overwrite");
    model.write(8192, &payload(2, 4096));
    plan.add(rule(FaultFile::Image, FaultOp::Sync, FaultAction::Cancel));
    let err = d.flush().expect_err("cancelled");
    assert_eq!(err.errno, libc::ECANCELED, "{err}");
    // Nothing was written since, but the overwrite is not durable: the next FLUSH must sync
    // again (the armed rule takes that sync too).
    plan.add(rule(FaultFile::Image, FaultOp::Sync, FaultAction::Cancel));
    let err = d
        .flush()
        .expect_err("the FLUSH after a failed commit issued no data sync");
    assert_eq!(err.errno, libc::ECANCELED, "{err}");
    assert_eq!(plan.fired(), 2);
    d.flush().expect("this one syncs");
    // Now durable: a FLUSH issues no sync (an armed rule stays unfired).
    plan.add(rule(FaultFile::Image, FaultOp::Sync, FaultAction::Cancel));
    d.flush().expect("nothing to sync");
    assert_eq!(plan.fired(), 2, "a FLUSH with nothing written synced");
    plan.clear();
    assert_eq!(d.stats().commits_skipped, 1);
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}

#[test]
fn a_failing_extent_ahead_fallocate_does_not_fail_the_write() {
    let f = fixture(8 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let (e, plan) = faulty_engine(2, CacheMode::Direct);
    let d = e
        .open(
            &f.overlay,
            addcow_engine::DiskOptions {
                extent_ahead: 1 << 20,
                ..Default::default()
            },
        )
        .expect("open overlay");
    // ENOSPC: the write goes on without it; the next extent is tried again.
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Allocate,
        FaultAction::Fail(libc::ENOSPC),
    ));
    d.write_at(8192, &payload(1, 4096), false)
        .expect("write despite a failed fallocate");
    model.write(8192, &payload(1, 4096));
    assert_eq!(
        plan.fired(),
        1,
        "the first write into a clear extent allocates"
    );
    d.write_at(12288, &payload(2, 4096), false).expect("write");
    model.write(12288, &payload(2, 4096));
    assert_eq!(plan.fired(), 1, "an extent is asked for once");
    // EOPNOTSUPP: no more extent-ahead on this disk.
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Allocate,
        FaultAction::Fail(libc::EOPNOTSUPP),
    ));
    d.write_at((2 << 20) + 7, &payload(3, 5000), true)
        .expect("FUA write despite a failed fallocate");
    model.write((2 << 20) + 7, &payload(3, 5000));
    assert_eq!(plan.fired(), 2);
    plan.add(rule(
        FaultFile::Image,
        FaultOp::Allocate,
        FaultAction::Fail(libc::EIO),
    ));
    d.write_at(5 << 20, &payload(4, 4096), false)
        .expect("write");
    model.write(5 << 20, &payload(4, 4096));
    assert_eq!(plan.fired(), 2, "no fallocate after EOPNOTSUPP");
    plan.clear();
    model.check(&d);
    d.flush().expect("flush");
    d.close().expect("close");
    drop((d, e));
    reopen_check(&f, &model);
}
