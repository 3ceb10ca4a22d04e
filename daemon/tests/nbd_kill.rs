//! Flushed writes survive SIGKILL, cycle after cycle: 100 times a client writes, flushes, writes
//! more without flushing, and the daemon is killed and restarted. Every flushed write must be
//! there afterwards, and an unflushed one either whole or not at all (never torn, never stale
//! bytes: the bitmap never points at data that was not written).

use std::time::Duration;

use addcow_daemon_testkit::{Daemon, Fixture, RawClient};

const MIB: u64 = 1 << 20;
const CYCLES: u64 = 100;
const BLOCK: u64 = 64 << 10;

fn pattern(cycle: u64, unflushed: bool) -> Vec<u8> {
    let tag = (cycle % 200) as u8 + 1;
    (0..BLOCK)
        .map(|i| tag ^ (i as u8) ^ if unflushed { 0x80 } else { 0 })
        .collect()
}

#[test]
#[ignore = "heavy or timing-sensitive: run alone by scripts/test.sh"]
fn a_hundred_kill_cycles_lose_no_flushed_write() {
    let fx = Fixture::new(32 * MIB);
    let sock = fx.path("s.sock");
    let ov = fx.overlay();
    let ov_s = ov.to_str().unwrap();
    for cycle in 0..CYCLES {
        let mut d = Daemon::start(&sock, &[ov_s]);
        let mut c = RawClient::connect(&sock, "").unwrap();
        // The previous cycle's flushed write is there.
        if cycle > 0 {
            let mut buf = vec![0u8; BLOCK as usize];
            assert_eq!(c.read((cycle - 1) * BLOCK, &mut buf).unwrap(), 0);
            assert!(
                buf == pattern(cycle - 1, false),
                "cycle {cycle}: flushed write lost"
            );
        }
        assert_eq!(
            c.write(cycle * BLOCK, &pattern(cycle, false), false)
                .unwrap(),
            0
        );
        assert_eq!(c.flush().unwrap(), 0);
        // Unflushed, in the upper half (base data there is 0xab in the lower half, zeros above).
        assert_eq!(
            c.write(16 * MIB + cycle * BLOCK, &pattern(cycle, true), false)
                .unwrap(),
            0
        );
        d.signal(nix::sys::signal::Signal::SIGKILL);
        d.wait_exit();
        std::thread::sleep(Duration::from_millis(5));
    }
    let d = Daemon::start(&sock, &[ov_s]);
    let mut c = RawClient::connect(&sock, "").unwrap();
    let mut kept = 0;
    for cycle in 0..CYCLES {
        let mut buf = vec![0u8; BLOCK as usize];
        assert_eq!(c.read(cycle * BLOCK, &mut buf).unwrap(), 0);
        assert!(
            buf == pattern(cycle, false),
            "cycle {cycle}: flushed write lost"
        );
        assert_eq!(c.read(16 * MIB + cycle * BLOCK, &mut buf).unwrap(), 0);
        // Sector by sector: either the unflushed data or what was there before (zeros).
        let want = pattern(cycle, true);
        for (i, s) in buf.chunks(512).enumerate() {
            let new = s == &want[i * 512..(i + 1) * 512];
            assert!(
                new || s.iter().all(|&b| b == 0),
                "cycle {cycle}: unflushed sector {i} holds bytes never written"
            );
            kept += usize::from(new);
        }
    }
    eprintln!(
        "kill cycles: {CYCLES}; unflushed sectors that survived anyway: {kept} of {}",
        CYCLES * BLOCK / 512
    );
    drop(c);
    d.stop();
    let check = addcow_daemon_testkit::run(
        addcow_daemon_testkit::addcow_bin().to_str().unwrap(),
        &["check", ov_s],
    );
    eprintln!("{check}");
}

/// The on-disk bitmap bytes covering `len` bytes of the disk at `offset` (both sector aligned
/// to 8 sectors).
fn bitmap_on_disk(overlay: &std::path::Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (len / 512 / 8) as usize];
    std::fs::File::open(overlay)
        .unwrap()
        .read_exact_at(&mut buf, 2560 + offset / 512 / 8)
        .unwrap();
    buf
}

#[test]
fn the_commit_interval_decides_when_unflushed_bits_reach_the_disk() {
    let fx = Fixture::new(32 * MIB);
    let sock = fx.path("s.sock");
    let ov = fx.overlay();
    let ov_s = ov.to_str().unwrap();

    // --commit-interval 1: an unflushed write's bits reach the disk without any FLUSH, and
    // survive a SIGKILL.
    let mut d = Daemon::start(&sock, &["--commit-interval", "1", ov_s]);
    let mut c = RawClient::connect(&sock, "").unwrap();
    assert_eq!(c.write(8 * MIB, &pattern(1, true), false).unwrap(), 0);
    addcow_daemon_testkit::wait_until("a background commit persisted the bits", || {
        bitmap_on_disk(&ov, 8 * MIB, BLOCK)
            .iter()
            .all(|&b| b == 0xff)
    });
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(c);

    // --commit-interval 0: no background commit, even well past the default interval (5 s);
    // the shutdown's commit persists them.
    let d = Daemon::start(&sock, &["--commit-interval", "0", ov_s]);
    let mut c = RawClient::connect(&sock, "").unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    assert_eq!(c.read(8 * MIB, &mut buf).unwrap(), 0);
    assert!(
        buf == pattern(1, true),
        "the committed write survived SIGKILL"
    );
    assert_eq!(c.write(12 * MIB, &pattern(2, true), false).unwrap(), 0);
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        bitmap_on_disk(&ov, 12 * MIB, BLOCK).iter().all(|&b| b == 0),
        "a background commit ran with --commit-interval 0"
    );
    c.disconnect();
    d.stop();
    assert!(
        bitmap_on_disk(&ov, 12 * MIB, BLOCK)
            .iter()
            .all(|&b| b == 0xff),
        "the shutdown commit persisted the bits"
    );
}
