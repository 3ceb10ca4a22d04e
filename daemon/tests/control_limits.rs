//! The control socket cannot be held by idle clients: a connection that sends nothing is
//! closed after `--control-idle-timeout`, and one uid's idle connections never lock that uid
//! (or others) out; names a client chose cannot forge a log line.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Waits (bounded) until the daemon closes `s`; false if it is still open after `limit`.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 256];
    let until = Instant::now() + limit;
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if Instant::now() > until {
            return false;
        }
    }
}

/// A connection that sends nothing is closed after the idle timeout (and logged); one that
/// sends requests stays.
#[test]
fn idle_control_connections_are_closed_after_the_timeout() {
    let f = Fixture::new(4 * MIB);
    let (d, ctl) = Daemon::start_with_control(
        &f,
        &["--control-idle-timeout", "1", f.overlay().to_str().unwrap()],
    );
    let mut idle = UnixStream::connect(&ctl).unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(60)),
        "an idle control connection was never closed"
    );
    d.wait_log("control connection idle; closing");
    d.stop();
}

/// Sixteen idle connections (the old shared cap) do not lock their own uid out: a fresh
/// connection still gets answered, and the uid never holds more than its per-uid cap.
#[test]
fn idle_connections_do_not_lock_an_operator_out() {
    let f = Fixture::new(4 * MIB);
    let (d, ctl) = Daemon::start_with_control(&f, &[f.overlay().to_str().unwrap()]);
    let mut idle: Vec<UnixStream> = Vec::new();
    for _ in 0..16 {
        idle.push(UnixStream::connect(&ctl).unwrap());
    }
    // Each got its slot (or replaced an older one of the same uid) before the next check.
    let mut c = Control::connect(&ctl);
    let hello = c.ok("hello", json!({}));
    assert!(hello.get("version").is_some(), "{hello}");
    // Some of the idle ones were closed to make room; the fresh one keeps working.
    let closed = idle
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(200)))
        .filter(|&c| c)
        .count();
    assert!(
        closed >= 16 + 1 - 8,
        "only {closed} idle connections gave up their slot"
    );
    c.ok("query-exports", json!({}));
    drop(idle);
    d.stop();
}

/// A method name and an export name with line breaks in them are logged escaped: no line of
/// the log starts with the text that followed the break.
#[test]
fn names_with_line_breaks_cannot_forge_log_lines() {
    let f = Fixture::new(4 * MIB);
    let (d, ctl) = Daemon::start_with_control(&f, &[f.overlay().to_str().unwrap()]);
    let mut c = Control::connect(&ctl);
    let forged = "FORGED INFO addcow: export deleted";
    let e = c
        .call(&format!("x\n{forged}"), json!({}))
        .expect_err("no such method");
    assert_eq!(e["code"], json!(-32601));
    let e = c
        .call("export-del", json!({"name": format!("vm\n{forged}")}))
        .expect_err("no such export");
    assert!(e["message"].as_str().is_some(), "{e}");
    let e = c
        .call(
            "export-add",
            json!({"name": format!("n\r\n{forged}"), "overlay": format!("/nonexistent\n{forged}.add-cow")}),
        )
        .expect_err("bad overlay");
    assert!(e["message"].as_str().is_some(), "{e}");
    // A request line that is itself broken JSON with a raw break inside a string.
    c.sock
        .write_all(
            format!("{{\"jsonrpc\":\"2.0\",\"method\":\"a\\u000a{forged}\",\"id\":9}}\n")
                .as_bytes(),
        )
        .unwrap();
    assert!(c.response(9).is_err());
    d.wait_log("control request failed");
    let log = d.stop();
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED"),
            "a client forged a log line: {line:?}\n{log}"
        );
    }
    assert!(
        log.contains("FORGED"),
        "the names were not logged at all:\n{log}"
    );
}
