//! The metrics endpoint is bounded: a header line that never ends is cut off without growing
//! the daemon, idle connections cannot lock a scraper out, and a non-loopback address has to
//! be asked for.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::*;

const MIB: u64 = 1 << 20;

/// The metrics address the daemon logged.
fn metrics_addr(d: &Daemon) -> String {
    let log = d.log();
    log.lines()
        .find(|l| l.contains("serving metrics"))
        .and_then(|l| l.split("metrics=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_string()
}

/// A daemon serving the fixture's overlay and metrics on a loopback port; its metrics address.
fn start_with_metrics(f: &Fixture) -> (Daemon, String) {
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &["--metrics", "127.0.0.1:0", f.overlay().to_str().unwrap()],
    );
    let addr = metrics_addr(&d);
    (d, addr)
}

/// One GET /metrics over a fresh connection: the status line and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// `GET /metrics HTTP/1.1\r\nX: ` followed by 64 MiB of `A` (the endless header line): the
/// daemon cuts the connection off long before, and its RSS does not grow by the line.
#[test]
fn an_endless_header_line_is_cut_off_without_growing_the_daemon() {
    let f = Fixture::new(4 * MIB);
    let (d, addr) = start_with_metrics(&f);
    assert!(scrape(&addr).0.contains(" 200 "));
    let before = rss_kib(d.pid());
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nX: ").unwrap();
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0usize;
    let mut cut = None;
    for _ in 0..64 {
        match s.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) => {
                cut = Some(e);
                break;
            }
        }
    }
    let after = rss_kib(d.pid());
    assert!(
        cut.is_some(),
        "the daemon read all {sent} bytes of one header line"
    );
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB while a header line was sent ({sent} bytes taken)"
    );
    // And it still serves.
    assert!(scrape(&addr).0.contains(" 200 "));
    d.stop();
}

/// Many idle connections (each sent half a request head, or nothing) do not lock a scraper
/// out.
#[test]
fn idle_connections_do_not_lock_a_scrape_out() {
    let f = Fixture::new(4 * MIB);
    let (d, addr) = start_with_metrics(&f);
    let mut idle = Vec::new();
    for i in 0..64 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /metrics HTTP/1.1\r\nX: y").unwrap();
        }
        idle.push(s);
    }
    let start = Instant::now();
    let (status, body) = scrape(&addr);
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("addcow_exports 1"), "{body}");
    eprintln!("scraped past 64 idle connections in {:?}", start.elapsed());
    drop(idle);
    d.stop();
}

/// A non-loopback metrics address is refused unless `--metrics-allow-remote`.
#[test]
fn remote_metrics_need_allowing() {
    let f = Fixture::new(4 * MIB);
    let child = std::process::Command::new(addcow_bin())
        .args([
            "serve",
            "--socket",
            f.path("a.sock").to_str().unwrap(),
            "--metrics",
            "0.0.0.0:0",
            f.overlay().to_str().unwrap(),
        ])
        .env("ADDCOW_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = exit_of(
        child,
        "the daemon served metrics on 0.0.0.0 without --metrics-allow-remote",
    );
    assert!(!status.success(), "started with remote metrics:\n{err}");
    assert!(err.contains("--metrics-allow-remote"), "{err}");
    let d = Daemon::start(
        &f.path("b.sock"),
        &[
            "--metrics",
            "0.0.0.0:0",
            "--metrics-allow-remote",
            f.overlay().to_str().unwrap(),
        ],
    );
    let port = metrics_addr(&d).rsplit(':').next().unwrap().to_string();
    assert!(scrape(&format!("127.0.0.1:{port}")).0.contains(" 200 "));
    d.stop();
}
