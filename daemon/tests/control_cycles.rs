//! 50 export-add / export-del cycles on a daemon while fio loads another export: no error on
//! the loaded export, no leaked file descriptors (counted in /proc/PID/fd before and after),
//! and a flat RSS. Every cycle writes and reads through the added export with qemu-io; every
//! fifth one deletes it `hard` under a connected client, the others `safe`.

use std::time::{Duration, Instant};

use addcow_daemon_testkit::*;
use serde_json::json;

const MIB: u64 = 1 << 20;
const CYCLES: usize = 50;

/// Waits (bounded) until the daemon's fd count is back to `want`; returns the last count.
fn settle_fds(pid: i32, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = fd_count(pid);
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fifty_add_del_cycles_under_fio_load_leak_nothing() {
    let f = Fixture::new(64 * MIB);
    let load = f.make_overlay("load");
    let cyc = f.make_overlay("cyc");
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("load={}", load.display()),
            "--allow-dir",
            f.dir.path().to_str().unwrap(),
        ],
    );
    let pid = d.pid();
    let mut c = Control::connect(&control);

    // fio: 4 KiB random read/write at QD 8 on "load", until told to stop.
    let mut fio = std::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///load?socket={}", d.sock.display()),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=8",
            "--size=64M",
            "--time_based",
            "--runtime=600",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (scripts/test.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.ok("query-stats", json!({"name": "load"}));
        if s[0]["ops"]["write"]["requests"].as_u64().unwrap_or(0) > 100 {
            break;
        }
        assert!(Instant::now() < deadline, "fio never got going: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let cycle = |c: &mut Control, i: usize| {
        c.ok("export-add", json!({"name": "cyc", "overlay": cyc}));
        let pattern = format!("write -P {} {}k 64k", i % 250 + 1, i * 64);
        let check = format!("read -P {} {}k 64k", i % 250 + 1, i * 64);
        qemu_io(&d.uri_of("cyc"), &[&pattern, &check]);
        if i % 5 == 4 {
            let client = HoldingClient::start(&d.uri_of("cyc"));
            let del = c.ok("export-del", json!({"name": "cyc", "mode": "hard"}));
            assert_eq!(del["clients_disconnected"], 1, "{del}");
            client.wait_for("ended:");
        } else {
            // qemu-io's connection leaves a moment after its last reply; safe waits for that.
            wait_until("qemu-io gone", || {
                c.ok("query-exports", json!({}))
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|e| e["name"] != "cyc" || e["clients"] == 0)
            });
            c.ok("export-del", json!({"name": "cyc", "mode": "safe"}));
        }
    };
    // Warm-up cycles (first-use allocations), then the baseline.
    for i in 0..2 {
        cycle(&mut c, i);
    }
    let fds_before = fd_count(pid);
    let rss_before = rss_kib(pid);
    let mut rss_series = vec![rss_before];
    let started = Instant::now();
    for i in 2..2 + CYCLES {
        cycle(&mut c, i);
        if (i - 1) % 10 == 0 {
            rss_series.push(rss_kib(pid));
        }
    }
    let took = started.elapsed();
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the cycles did: they did not run under load"
    );
    let fds_after = settle_fds(pid, fds_before);
    let rss_after = rss_kib(pid);
    eprintln!(
        "{CYCLES} cycles in {took:?}: fds {fds_before} -> {fds_after}; RSS KiB {rss_before} -> \
         {rss_after} (every 10 cycles: {rss_series:?})"
    );
    assert_eq!(fds_after, fds_before, "file descriptors leaked");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew by {} KiB over {CYCLES} cycles: {rss_series:?}",
        rss_after.saturating_sub(rss_before)
    );

    // Stop fio (SIGINT: it reports and exits); no I/O error.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fio.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text
        .find('{')
        .unwrap_or_else(|| panic!("no fio JSON: {text}"));
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio saw an error: {job}");
    let ios =
        job["read"]["total_ios"].as_u64().unwrap() + job["write"]["total_ios"].as_u64().unwrap();
    eprintln!("fio: {ios} I/Os during the run, error 0");
    assert!(ios > 1000, "{job}");
    let s = c.ok("query-stats", json!({"name": "load"}));
    for (op, o) in s[0]["ops"].as_object().unwrap() {
        assert_eq!(o["errors"], 0, "{op}: {s}");
    }
    assert_eq!(
        c.ok("query-exports", json!({})).as_array().unwrap().len(),
        1
    );
    let log = d.stop();
    assert!(log.contains("all overlays committed"), "{log}");
}
