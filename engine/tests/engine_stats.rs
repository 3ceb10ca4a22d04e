//! `Disk::stats`, `Disk::allocated_bytes` and `Disk::is_complete` on real files: every counter
//! moves with the work it names and no other.

use addcow_engine_testkit::harness::*;

#[test]
fn counters_follow_base_reads_bits_and_commits() {
    let f = fixture(1 << 20, 512 << 10);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    let s0 = d.stats();
    assert_eq!(s0, Default::default(), "a fresh disk has done nothing");
    assert_eq!(d.allocated_bytes(), 0);
    assert!(!d.is_complete());

    // A read inside the base reads the base; one past it reads nothing from any disk.
    d.read_at(0, 8192).expect("read base");
    d.read_at(768 << 10, 4096)
        .expect("read zeros past the base");
    assert_eq!(d.stats().base_bytes_read, 8192);

    // An aligned write of 4 KiB sets 8 bits and reads nothing from the base.
    d.write_at(4096, &[1u8; 4096], false).expect("write");
    let s = d.stats();
    assert_eq!(s.bits_set, 8);
    assert_eq!(s.base_bytes_read, 8192);
    assert_eq!(
        s.commits, 0,
        "no commit before a flush (no background commits here)"
    );

    // Rewriting the same sectors sets no new bit.
    d.write_at(4096, &[2u8; 512], false).expect("rewrite");
    assert_eq!(d.stats().bits_set, 8);

    // An unaligned write into clear sectors reads its edge from the base (read-modify-write).
    d.write_at((64 << 10) + 7, &[3u8; 100], false)
        .expect("unaligned write");
    let s = d.stats();
    assert!(s.base_bytes_read > 8192, "the edge came from the base");
    assert!(s.bits_set > 8);
    assert_eq!(d.allocated_bytes(), s.bits_set * 512);

    d.flush().expect("flush");
    let s = d.stats();
    assert_eq!((s.commits, s.commits_failed, s.commit_waiters), (1, 0, 1));
    assert!(s.commit_bytes > 0, "the commit wrote bitmap bytes");
    assert_eq!(s.average_commit_batch(), 1.0);

    // A flush with nothing new is answered without a commit (no sync at all).
    d.flush().expect("second flush");
    let s = d.stats();
    assert_eq!((s.commits, s.commit_waiters, s.commits_skipped), (1, 1, 1));

    // Filling the disk makes it complete.
    d.write_at(0, &vec![4u8; 1 << 20], false).expect("fill");
    assert!(d.is_complete());
    assert_eq!(d.allocated_bytes(), 1 << 20);
    assert_eq!(d.stats().bits_set, 2048);
    d.close().expect("close");
    e.shutdown().expect("shutdown");
}
