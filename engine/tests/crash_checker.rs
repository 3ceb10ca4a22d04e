//! Unit tests of the crash checker and the reference reader on hand-built logs: the checker
//! accepts a correctly ordered commit and flags every kind of broken one (bits persisted
//! before their data, a FLUSH answered without a commit, stale bits, zeros nobody wrote).
#![cfg(feature = "crash-recorder")]

use addcow_engine::io::recorder::{ClientEvent, Event, FileRole};
use addcow_engine_testkit::crash::{
    replay_all, CheckConfig, Checker, IssueLog, Report, Snapshot, WriteIssue,
};
use addcow_engine_testkit::pattern;
use addcow_engine_testkit::reference::{build_meta, set_bits, RefView, HEADER_SIZE};

const SECTORS: u64 = 16;

/// 16-sector overlay over a 12-sector base; sector 2 pre-allocated; stale garbage in the raw
/// image under clear bits 8..12.
fn snapshot() -> Snapshot {
    let base = pattern::fill(0, 12 * 512, pattern::base_byte);
    let meta = build_meta("base.img", "disk.raw", SECTORS, |s| s == 2);
    let mut image = vec![0u8; SECTORS as usize * 512];
    image[1024..1536].copy_from_slice(&pattern::fill(1024, 512, pattern::prealloc_byte));
    image[8 * 512..12 * 512].copy_from_slice(&pattern::fill(8 * 512, 2048, pattern::stale_byte));
    Snapshot {
        meta,
        image,
        base: Some(base),
    }
}

fn img_write(offset: u64, data: Vec<u8>) -> Event {
    Event::Write {
        file: FileRole::Image,
        offset,
        data,
    }
}

/// The metadata write a commit of `meta` (the in-memory copy) makes: the first 4096 bytes.
fn meta_write(meta: &[u8]) -> Event {
    let mut block = meta.to_vec();
    block.resize(4096, 0);
    Event::Write {
        file: FileRole::Meta,
        offset: 0,
        data: block,
    }
}

fn sync(file: FileRole, id: u64) -> [Event; 2] {
    [Event::SyncBegin { file, id }, Event::SyncEnd { file, id }]
}

fn answered(id: u64, offset: u64, data: &[u8]) -> Event {
    Event::Client(ClientEvent::WriteAnswered {
        id,
        offset,
        data: data.to_vec(),
    })
}

fn flushed(id: u64) -> Event {
    Event::Client(ClientEvent::FlushAnswered { id })
}

fn check(events: &[Event], issue: &IssueLog) -> Report {
    let snap = snapshot();
    let report = Checker::new(&snap, events, issue).run(&CheckConfig::new(7, 500));
    eprintln!("{report}");
    assert!(report.states >= 500);
    report
}

/// Write sector 5 (aligned) and 100 bytes at offset 7 of sector 0 (read-modify-write from the
/// base), then a correct commit: data sync, bitmap write, metadata sync, FLUSH answered.
fn correct_commit_log() -> Vec<Event> {
    let snap = snapshot();
    let d5 = pattern::write_data(0, 5 * 512, 512);
    let d0 = pattern::write_data(1, 7, 100);
    let mut sector0 = snap.base.as_ref().unwrap()[..512].to_vec();
    sector0[7..107].copy_from_slice(&d0);
    let mut meta = snap.meta.clone();
    set_bits(&mut meta, 5, 1);
    set_bits(&mut meta, 0, 1);
    let mut log = vec![
        img_write(5 * 512, d5.clone()),
        answered(0, 5 * 512, &d5),
        img_write(0, sector0),
        answered(1, 7, &d0),
    ];
    log.extend(sync(FileRole::Image, 1));
    log.push(meta_write(&meta));
    log.extend(sync(FileRole::Meta, 2));
    log.push(flushed(2));
    log
}

#[test]
fn crash_checker_accepts_correct_commit() {
    let report = check(&correct_commit_log(), &IssueLog::default());
    assert_eq!(report.violating_states, 0, "{report}");
    assert_eq!(report.client_writes, 2);
    assert_eq!(report.flushes, 1);
}

#[test]
fn crash_checker_detects_bits_persisted_before_data() {
    // Same writes, but the bitmap is written and synced before the raw image's sync.
    let mut log = correct_commit_log();
    let meta_ev = log.iter().position(|e| {
        matches!(
            e,
            Event::Write {
                file: FileRole::Meta,
                ..
            }
        )
    });
    let meta_ev = log.remove(meta_ev.unwrap());
    let img_sync = log
        .iter()
        .position(|e| {
            matches!(
                e,
                Event::SyncBegin {
                    file: FileRole::Image,
                    ..
                }
            )
        })
        .unwrap();
    log.insert(img_sync, meta_ev);
    // The log without its syncs and FLUSH answers.
    let unsynced: Vec<Event> = log
        .iter()
        .filter(|e| {
            !matches!(
                e,
                Event::SyncBegin { .. }
                    | Event::SyncEnd { .. }
                    | Event::Client(ClientEvent::FlushAnswered { .. })
            )
        })
        .cloned()
        .collect();
    // Swap the two syncs so the metadata is durable first.
    let reordered: Vec<Event> = unsynced
        .iter()
        .cloned()
        .chain(sync(FileRole::Meta, 2))
        .chain(sync(FileRole::Image, 1))
        .chain([flushed(2)])
        .collect();
    let report = check(&reordered, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
    assert!(report.examples[0].contains("reads 0x00"), "{report}");

    // Without any sync in between, the "metadata only" crash states still catch it.
    let report = check(&unsynced, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_checker_detects_flush_answered_without_commit() {
    let d = pattern::write_data(0, 3 * 512, 1024);
    let log = vec![
        img_write(3 * 512, d.clone()),
        answered(0, 3 * 512, &d),
        flushed(1),
    ];
    let report = check(&log, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
    // Only the data synced: bits lost, the guaranteed write reads as base data.
    let mut log = log;
    log.splice(2..2, sync(FileRole::Image, 1));
    let report = check(&log, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_checker_detects_stale_bit() {
    // A bit set over stale raw-image bytes that no client wrote.
    let mut meta = snapshot().meta;
    set_bits(&mut meta, 9, 1);
    let mut log = vec![meta_write(&meta)];
    log.extend(sync(FileRole::Meta, 1));
    let report = check(&log, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_checker_accepts_trim_and_detects_unwritten_zeros() {
    // A trim of sectors 3..5 answered with zeros: punch, set bits, commit.
    let mut meta = snapshot().meta;
    set_bits(&mut meta, 3, 2);
    let mut log = vec![
        Event::Punch {
            file: FileRole::Image,
            offset: 3 * 512,
            len: 1024,
        },
        answered(0, 3 * 512, &[0u8; 1024]),
    ];
    log.extend(sync(FileRole::Image, 1));
    log.push(meta_write(&meta));
    log.extend(sync(FileRole::Meta, 2));
    log.push(flushed(1));
    let report = check(&log, &IssueLog::default());
    assert_eq!(report.violating_states, 0, "{report}");

    // The same punch and bits with no client write behind them: zeros nobody wrote.
    let log: Vec<Event> = log
        .into_iter()
        .filter(|e| !matches!(e, Event::Client(_)))
        .collect();
    let report = check(&log, &IssueLog::default());
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_checker_detects_lost_write_after_fua() {
    // A FUA write answered with nothing synced: a crash right after must still read it.
    let d = pattern::write_data(0, 4 * 512, 512);
    let log = vec![img_write(4 * 512, d.clone()), answered(0, 4 * 512, &d)];
    let mut issue = IssueLog::default();
    issue.writes.insert(
        0,
        WriteIssue {
            clients_before: 0,
            fua: true,
        },
    );
    let report = check(&log, &issue);
    assert!(report.violating_states > 0, "{report}");
    // Not FUA: nothing is guaranteed and any crash state is fine.
    let report = check(&log, &IssueLog::default());
    assert_eq!(report.violating_states, 0, "{report}");
}

#[test]
fn crash_checker_flush_covers_only_writes_answered_before_it_was_issued() {
    // Write 0 is answered after flush 1 was issued and the commit (which missed it) ran: the
    // flush does not cover it, so losing it is no violation...
    let d = pattern::write_data(0, 6 * 512, 512);
    let mut log = vec![];
    log.extend(sync(FileRole::Image, 1));
    log.push(img_write(6 * 512, d.clone()));
    log.push(answered(0, 6 * 512, &d));
    log.push(flushed(1));
    let mut issue = IssueLog::default();
    issue.flushes.insert(1, 0);
    let report = check(&log, &issue);
    assert_eq!(report.violating_states, 0, "{report}");
    // ...but it is when the flush was issued after the write was answered.
    issue.flushes.insert(1, 1);
    let report = check(&log, &issue);
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_checker_write_cannot_appear_before_it_was_issued() {
    // Stale-looking data equal to a write issued only after the crash point is still flagged:
    // bits and data of write 1 appear in the log before the harness issued write 1.
    let d = pattern::write_data(1, 7 * 512, 512);
    let mut meta = snapshot().meta;
    set_bits(&mut meta, 7, 1);
    let mut log = vec![img_write(7 * 512, d.clone()), meta_write(&meta)];
    log.extend(sync(FileRole::Image, 1));
    log.extend(sync(FileRole::Meta, 2));
    log.push(answered(0, 0, &pattern::write_data(0, 0, 10)));
    log.push(answered(1, 7 * 512, &d));
    let mut issue = IssueLog::default();
    issue.writes.insert(
        1,
        WriteIssue {
            clients_before: 1,
            fua: false,
        },
    );
    let report = check(&log, &issue);
    assert!(report.violating_states > 0, "{report}");
}

#[test]
fn crash_replay_all_applies_every_file_operation() {
    let snap = snapshot();
    let (meta, image) = replay_all(&snap, &correct_commit_log());
    let view = RefView::decode(&meta, &image, snap.base.as_deref()).unwrap();
    assert!(view.bit(0) && view.bit(2) && view.bit(5) && !view.bit(1));
    assert_eq!(
        view.read(5 * 512, 512),
        pattern::write_data(0, 5 * 512, 512)
    );
    assert_eq!(view.read(7, 100), pattern::write_data(1, 7, 100));
    assert_eq!(view.read(0, 7), snap.base.as_ref().unwrap()[..7].to_vec());
}

#[test]
fn crash_reference_reader_decodes_per_spec() {
    let snap = snapshot();
    let view = RefView::decode(&snap.meta, &snap.image, snap.base.as_deref()).unwrap();
    assert_eq!(view.sectors(), SECTORS);
    assert_eq!(view.header.backing_file, b"base.img");
    assert_eq!(view.header.image_file, b"disk.raw");
    // LSB first: sector 2 is bit 2 (value 4) of byte 0.
    assert_eq!(snap.meta[HEADER_SIZE], 0b100);
    assert!(view.bit(2) && !view.bit(1) && !view.bit(3));
    // Set bit: raw image; clear: base; clear past the base's end: zeros (stale bytes ignored).
    assert_eq!(
        view.read(1024, 512),
        pattern::fill(1024, 512, pattern::prealloc_byte)
    );
    assert_eq!(
        view.read(512, 512),
        pattern::fill(512, 512, pattern::base_byte)
    );
    assert_eq!(
        view.read(8 * 512, 2048),
        pattern::fill(8 * 512, 2048, pattern::base_byte)
    );
    assert_eq!(view.read(12 * 512, 4 * 512), vec![0u8; 2048]);
    // A read spanning all three, unaligned at both ends.
    let all = view.read_all();
    assert_eq!(view.read(1000, 5000), all[1000..6000].to_vec());

    // No base: clear bits read zeros.
    let meta = build_meta("", "disk.raw", SECTORS, |s| s == 2);
    let view = RefView::decode(&meta, &snap.image, None).unwrap();
    assert_eq!(view.read(0, 1024), vec![0u8; 1024]);
    assert_eq!(
        view.read(1024, 512),
        pattern::fill(1024, 512, pattern::prealloc_byte)
    );
}

#[test]
fn crash_reference_reader_rejects_bad_overlays() {
    let snap = snapshot();
    let base = snap.base.as_deref();
    let mut bad = snap.meta.clone();
    bad[7] = 0;
    assert!(RefView::decode(&bad, &snap.image, base).is_err());
    let mut bad = snap.meta.clone();
    bad[11] = 2;
    assert!(RefView::decode(&bad, &snap.image, base).is_err());
    let bad = &snap.meta[..HEADER_SIZE + 1];
    assert!(RefView::decode(bad, &snap.image, base).is_err());
    let mut bad = snap.meta.clone();
    bad[1036..2060].fill(b'x');
    assert!(RefView::decode(&bad, &snap.image, base).is_err());
    assert!(RefView::decode(&snap.meta, &snap.image[..1000], base).is_err());
    assert!(RefView::decode(&snap.meta, &snap.image, None).is_err());
}
