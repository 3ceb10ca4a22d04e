//! Soak: 256 connections over 16 exports (16 fio processes with 16 jobs each, `verify=crc32c`,
//! run in rounds, so every round disconnects and reconnects all of them), plus clients that
//! drop their connections at random moments (their answered writes are checked at the end)
//! and hostile raw-socket clients, all at once. At the end: no verify error, every answered
//! write there, the daemon serving, and its descriptor count and RSS back where they were
//! after the first round.
//!
//! Bounded for the suite: `ADDCOW_SOAK_SECS` (default 30) seconds of load; set it higher for a
//! long soak (e.g. `ADDCOW_SOAK_SECS=1800 scripts/test.sh`, or this test alone with
//! `cargo test -p addcow-daemon --test nbd_soak -- --ignored --nocapture`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{fd_count, qemu_io, raw, rss_kib, Daemon, Fixture, RawClient};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const EXPORTS: usize = 16;
const JOBS: usize = 16;
/// Each fio job's region; the exports' first `JOBS * JOB_REGION` bytes are fio's.
const JOB_REGION: u64 = 2 * MIB;
/// Where the chaos clients write (after fio's part).
const CHAOS_AT: u64 = JOBS as u64 * JOB_REGION;
const CHAOS_LEN: u64 = 4 * MIB;
const SIZE: u64 = CHAOS_AT + CHAOS_LEN;

fn soak_secs() -> u64 {
    std::env::var("ADDCOW_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// One fio round on export `name`: 16 jobs (16 connections), each writing its own 2 MiB with
/// 4 KiB random writes, 4 in flight, then verifying it. Returns fio's output on failure.
fn fio_round(sock: &Path, name: &str, seed: u64) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg("600")
        .arg("fio")
        .args([
            "--name=soak",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///{name}?socket={}", sock.display()),
            "--thread",
            &format!("--numjobs={JOBS}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            &format!("--size={}", JOB_REGION),
            &format!("--offset_increment={}", JOB_REGION),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--randseed={seed}"),
            "--group_reporting",
            "--output-format=terse",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio (scripts/test.sh installs it): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "fio on {name} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What the chaos clients got acknowledged: (export, offset) → fill byte.
type Acked = Arc<Mutex<HashMap<(usize, u64), u8>>>;

/// A client that connects to a random export, does a few writes (4 KiB in the chaos region,
/// recorded when acknowledged) and reads, and drops the connection at a random moment: between
/// requests, in the middle of a WRITE payload, or with replies unread.
fn chaos_client(sock: &Path, rng: &mut impl Rng, acked: &Acked) {
    let e = rng.gen_range(0..EXPORTS);
    let Ok(mut c) = RawClient::connect(sock, &format!("e{e}")) else {
        return;
    };
    for _ in 0..rng.gen_range(1..20) {
        let off = CHAOS_AT + rng.gen_range(0..CHAOS_LEN / 4096) * 4096;
        let fill: u8 = rng.gen_range(1..=255);
        match rng.gen_range(0..10) {
            0 => {
                // Vanish inside a payload: never acknowledged, must not land.
                let h = raw::request(raw::CMD_WRITE, 0, 999, off, 4096);
                let _ = c.s.write_all(&h);
                let _ = c.s.write_all(&[0xee; 1000]);
                return;
            }
            1 => {
                // Pipeline reads and leave without reading the replies.
                for i in 0..32u64 {
                    let h = raw::request(raw::CMD_READ, 0, 5000 + i, i * 65536, 65536);
                    let _ = c.s.write_all(&h);
                }
                return;
            }
            2 => {
                let mut buf = vec![0u8; 4096];
                if c.read(off, &mut buf).is_err() {
                    return;
                }
            }
            _ => {
                // Hold the record's lock across the write so two clients writing the same
                // block record the one that landed last.
                let mut a = acked.lock().unwrap();
                match c.write(off, &vec![fill; 4096], false) {
                    Ok(0) => {
                        a.insert((e, off), fill);
                    }
                    Ok(err) => panic!("chaos write answered with error {err}"),
                    Err(_) => return,
                }
            }
        }
    }
    if rng.gen_bool(0.5) {
        c.disconnect();
    }
}

/// A hostile client: garbage, oversized options, a silent handshake, bad magic after GO.
fn hostile_client(sock: &Path, rng: &mut impl Rng) {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if raw::greeting(&mut s).is_err() {
        return;
    }
    match rng.gen_range(0..4) {
        0 => {
            let junk: Vec<u8> = (0..rng.gen_range(1..4096)).map(|_| rng.gen()).collect();
            let _ = s.write_all(&junk);
        }
        1 => {
            let mut o = raw::CLIENT_FLAGS.to_be_bytes().to_vec();
            o.extend_from_slice(&raw::option(raw::OPT_GO, &vec![0u8; 200_000]));
            let _ = s.write_all(&o);
            let mut r = [0u8; 20];
            let _ = s.read_exact(&mut r);
        }
        2 => std::thread::sleep(Duration::from_millis(rng.gen_range(10..500))),
        _ => {
            drop(s);
            if let Ok(mut c) = RawClient::connect(sock, "e0") {
                let _ = c.s.write_all(&[0x42; 28]);
                let mut sink = Vec::new();
                let _ = c.s.read_to_end(&mut sink);
            }
            return;
        }
    }
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
#[ignore = "heavy (it loads both cores): run alone by scripts/test.sh"]
fn soak_256_connections_16_exports_verified_with_chaos_and_hostile_clients() {
    let secs = soak_secs();
    let fx = Fixture::new(SIZE);
    let mut args: Vec<String> = vec![
        "--max-connections".into(),
        "512".into(),
        "--handshake-timeout".into(),
        "5".into(),
    ];
    for i in 0..EXPORTS {
        let o = if i == 0 {
            fx.overlay()
        } else {
            fx.make_overlay(&format!("d{i}"))
        };
        args.push("--export".into());
        args.push(format!("e{i}={}", o.display()));
    }
    let sock: PathBuf = fx.path("s.sock");
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&sock, &a);
    let pid = d.pid();

    // Warm-up round on every export at once (256 connections), then the baseline.
    let round = |seed: u64| -> Vec<String> {
        let handles: Vec<_> = (0..EXPORTS)
            .map(|i| {
                let sock = sock.clone();
                std::thread::spawn(move || fio_round(&sock, &format!("e{i}"), seed + i as u64))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().err())
            .collect()
    };
    let errs = round(1);
    assert!(errs.is_empty(), "warm-up round: {}", errs.join("\n"));
    std::thread::sleep(Duration::from_millis(500));
    let (fd_base, rss_base) = (fd_count(pid), rss_kib(pid));

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let chaos_n = Arc::new(AtomicU64::new(0));
    let hostile_n = Arc::new(AtomicU64::new(0));
    let mut side = Vec::new();
    for t in 0..4u64 {
        let (sock, stop, acked, n) = (sock.clone(), stop.clone(), acked.clone(), chaos_n.clone());
        side.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(100 + t);
            while !stop.load(Ordering::Relaxed) {
                chaos_client(&sock, &mut rng, &acked);
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in 0..2u64 {
        let (sock, stop, n) = (sock.clone(), stop.clone(), hostile_n.clone());
        side.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(200 + t);
            while !stop.load(Ordering::Relaxed) {
                hostile_client(&sock, &mut rng);
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    let mut rounds = 1;
    let mut peak_rss = rss_base;
    while start.elapsed() < Duration::from_secs(secs) {
        let errs = round(1000 * rounds);
        assert!(errs.is_empty(), "round {rounds}: {}", errs.join("\n"));
        peak_rss = peak_rss.max(rss_kib(pid));
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for h in side {
        h.join().expect("a chaos or hostile client thread failed");
    }

    // Every acknowledged chaos write is there.
    let acked = acked.lock().unwrap().clone();
    let mut by_export: HashMap<usize, Vec<(u64, u8)>> = HashMap::new();
    for ((e, off), fill) in &acked {
        by_export.entry(*e).or_default().push((*off, *fill));
    }
    for (e, blocks) in by_export {
        let mut c = RawClient::connect(&sock, &format!("e{e}")).unwrap();
        for (off, fill) in blocks {
            let mut buf = vec![0u8; 4096];
            assert_eq!(c.read(off, &mut buf).unwrap(), 0);
            assert!(
                buf.iter().all(|&b| b == fill),
                "e{e} at {off}: acknowledged write of {fill:#x} reads {:#x}",
                buf[0]
            );
        }
        c.disconnect();
    }
    qemu_io(
        &d.uri_of("e3"),
        &["write -P 0x12 1M 64k", "read -P 0x12 1M 64k"],
    );

    // Flat at the end: every connection gone, descriptors back, memory not grown.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fd_count(pid) > fd_base && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fd_end, rss_end) = (fd_count(pid), rss_kib(pid));
    eprintln!(
        "soak: {secs} s, {rounds} fio rounds x {EXPORTS} exports x {JOBS} connections \
         (verify=crc32c), {} chaos clients ({} acknowledged writes checked), {} hostile clients; \
         fds {fd_base} -> {fd_end}; RSS after warm-up {} MiB, peak {} MiB, end {} MiB",
        chaos_n.load(Ordering::Relaxed),
        acked.len(),
        hostile_n.load(Ordering::Relaxed),
        rss_base / 1024,
        peak_rss / 1024,
        rss_end / 1024
    );
    assert_eq!(fd_end, fd_base, "descriptors leaked");
    assert!(
        rss_end <= rss_base + 64 * 1024,
        "RSS grew from {} to {} MiB",
        rss_base / 1024,
        rss_end / 1024
    );
    d.stop();
}
