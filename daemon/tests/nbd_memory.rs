//! The daemon-wide buffer budget (`--max-buffer-memory`): many clients pipelining 32 MiB WRITEs
//! and never reading a reply cannot push the daemon's RSS past the budget, and a new client is
//! still served meanwhile. RSS is sampled throughout and the figures printed.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{qemu_io, raw, rss_kib, Daemon, Fixture};

const MIB: u64 = 1 << 20;
const BUDGET_MIB: u64 = 128;
const CLIENTS: usize = 16;
const WRITE: u32 = 32 << 20;

#[test]
#[ignore = "heavy (it loads both cores): run alone by scripts/test.sh"]
fn pipelined_big_writes_that_are_never_acknowledged_stay_within_the_budget() {
    let fx = Fixture::new(64 * MIB);
    let budget = format!("{BUDGET_MIB}M");
    let overlay = fx.overlay();
    let mut args = vec!["--max-buffer-memory", &budget, overlay.to_str().unwrap()];
    // A daemon from before the budget existed (ADDCOW_TEST_BIN) is run without the option, to
    // show what the flood does to it.
    if std::env::var_os("ADDCOW_TEST_NO_BUDGET_OPTION").is_some() {
        args.drain(..2);
    }
    let d = Daemon::start(&fx.path("s.sock"), &args);
    let pid = d.pid();
    // Warm up what every daemon keeps anyway (engine buffers, a connection's threads).
    qemu_io(
        &d.uri(),
        &["write -P 1 0 32M", "read -P 1 0 32M", "write -P 0xab 0 32M"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let base = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let payload = Arc::new(vec![0x5au8; WRITE as usize]);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (sock, stop, sent, payload) =
                (d.sock.clone(), stop.clone(), sent.clone(), payload.clone());
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                raw::handshake(&mut s, "", &[]).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut cookie = 0u64;
                // Pipeline 32 MiB writes and never read a reply.
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&raw::request(raw::CMD_WRITE, 0, cookie, 0, WRITE))
                        .is_err()
                    {
                        break;
                    }
                    let mut done = 0;
                    while done < payload.len() && !stop.load(Ordering::Relaxed) {
                        match s.write(&payload[done..]) {
                            Ok(n) => done += n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break,
                        }
                    }
                    if done < payload.len() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    cookie += 1;
                }
                s
            })
        })
        .collect();

    // Sample RSS for 10 s; in the middle a new client must be served.
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    qemu_io(&d.uri(), &["write -P 0x77 40M 1M", "read -P 0x77 40M 1M"]);
    let new_client = t.elapsed();
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let socks: Vec<UnixStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let writes = sent.load(Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed);
    let grew_mib = (peak.saturating_sub(base)) / 1024;
    eprintln!(
        "memory: budget {BUDGET_MIB} MiB, {CLIENTS} clients, {writes} writes of 32 MiB sent \
         ({} GiB), RSS base {} MiB, peak {} MiB (+{grew_mib} MiB); a new client's 1 MiB \
         write+read took {new_client:?}",
        writes * 32 / 1024,
        base / 1024,
        peak / 1024
    );
    assert!(
        writes >= CLIENTS as u64,
        "the flood never got going ({writes} writes)"
    );
    // The budget, plus room for what is not a request buffer (threads' stacks and read
    // buffers of the 17 connections, allocator slack).
    assert!(
        grew_mib <= BUDGET_MIB + 48,
        "RSS grew by {grew_mib} MiB with a {BUDGET_MIB} MiB budget"
    );
    drop(socks);
    d.stop();
}
