//! Hostile input on the control socket: not JSON, unknown methods, wrong field types, invalid
//! requests, a 10 MiB line, a client that never reads, too many connections. Each gets a
//! JSON-RPC error or a closed connection, while the daemon, its other control clients and its
//! NBD clients carry on.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Sends `line` (a newline is added) and returns the next message.
fn send_line(c: &mut Control, line: &[u8]) -> Value {
    let mut l = line.to_vec();
    l.push(b'\n');
    c.sock.write_all(&l).expect("send");
    c.read_message()
        .expect("an answer, not a closed connection")
}

/// Sends hello; whether it was answered (false: the connection was closed).
fn try_hello(c: &mut Control) -> bool {
    let _ = c
        .sock
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"hello\",\"id\":1}\n");
    c.read_message().is_some()
}

/// A connection that is served (closed ones may still count against the limit briefly).
fn connect_when_free(path: &std::path::Path) -> Control {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = Control::connect(path);
        if try_hello(&mut c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no control connection is served any more"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error: {v}"))
}

#[test]
fn bad_control_input_gets_errors_or_a_closed_connection_and_nothing_else_suffers() {
    let f = Fixture::new(16 * MIB);
    let (d, control) = Daemon::start_with_control(&f, &[f.overlay().to_str().unwrap()]);
    // An NBD client reading all along; it must still be connected at the end.
    let nbd_client = HoldingClient::start(&d.uri());

    // Garbage lines on one connection: each gets its error, and the connection goes on.
    let mut c = Control::connect(&control);
    let v = send_line(&mut c, b"this is not json");
    assert_eq!(error_code(&v), -32700, "{v}");
    assert_eq!(v["id"], Value::Null);
    assert_eq!(error_code(&send_line(&mut c, b"\xff\xfe{]")), -32700);
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    assert_eq!(error_code(&send_line(&mut c, deep.as_bytes())), -32700);
    for bad in [
        r#"[{"jsonrpc":"2.0","method":"hello","id":1}]"#,
        r#"{"jsonrpc":"2.0","id":2}"#,
        r#"{"jsonrpc":"1.0","method":"hello","id":3}"#,
        r#"{"jsonrpc":"2.0","method":"hello","id":{"x":1}}"#,
        r#""just a string""#,
    ] {
        assert_eq!(
            error_code(&send_line(&mut c, bad.as_bytes())),
            -32600,
            "{bad}"
        );
    }
    let v = send_line(
        &mut c,
        br#"{"jsonrpc":"2.0","method":"format-disk","id":"u"}"#,
    );
    assert_eq!(error_code(&v), -32601, "{v}");
    assert_eq!(v["id"], "u");
    for (method, params) in [
        ("export-add", json!({"name": 5, "overlay": "/x"})),
        ("export-add", json!({"name": "a"})),
        (
            "export-add",
            json!({"name": "a", "overlay": "/x", "read_only": "yes"}),
        ),
        ("export-del", json!({"name": "", "mode": 1})),
        ("query-stats", json!({"name": ["a"]})),
        ("query-exports", json!({"verbose": true})),
        ("hello", json!([1, 2])),
    ] {
        let e = c.call(method, params.clone()).unwrap_err();
        assert_eq!(e["code"], -32602, "{method} {params}: {e}");
    }
    // A notification (no id) gets no answer, even when it fails; the next request does.
    c.sock
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"nope\"}\n")
        .unwrap();
    assert!(c.ok("hello", json!({}))["version"].is_string());

    // More connections than one uid's slots (8): each new one is served and takes the slot of
    // that uid's longest-idle connection (see control_limits.rs); 8 stay open.
    let mut held = vec![c];
    for _ in 0..12 {
        let mut x = Control::connect(&control);
        assert!(try_hello(&mut x), "a new connection was not served");
        held.push(x);
    }
    let open: Vec<bool> = held.iter_mut().map(try_hello).collect();
    assert_eq!(
        open.iter().filter(|&&o| o).count(),
        8,
        "one uid's connections held at once: {open:?}"
    );
    assert!(open[open.len() - 8..].iter().all(|&o| o), "{open:?}");
    drop(held);

    // A 10 MiB line: an error, then the connection is closed.
    let mut big = connect_when_free(&control);
    let mut w = big.sock.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = w.write_all(b"\n");
    });
    let v = big.read_message().expect("an error before the close");
    assert_eq!(error_code(&v), -32600, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than"),
        "{v}"
    );
    assert!(big.read_message().is_none(), "connection should be closed");
    flood.join().unwrap();

    // A client that sends requests and never reads the answers: the daemon cuts it off, and
    // meanwhile answers others at once.
    let stuffer = UnixStream::connect(&control).unwrap();
    let mut w = stuffer.try_clone().unwrap();
    let stuff = std::thread::spawn(move || {
        let req = b"{\"jsonrpc\":\"2.0\",\"method\":\"query-exports\",\"id\":1}\n".repeat(1000);
        let start = Instant::now();
        for _ in 0..1000 {
            if w.write_all(&req).is_err() {
                return Some(start.elapsed());
            }
        }
        None
    });
    let mut other = connect_when_free(&control);
    for _ in 0..20 {
        let t = Instant::now();
        other.ok("query-exports", json!({}));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a stuck client held up another"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let cut = stuff.join().unwrap();
    assert!(
        cut.is_some(),
        "a client that never reads was never disconnected (1M requests went through)"
    );
    // The daemon says why (its log reaches us through a pipe: wait for it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = d.log();
        if log.contains("does not read its replies") || log.contains("not reading or gone") {
            break;
        }
        assert!(Instant::now() < deadline, "no reason logged:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stuffer);

    drop(other);

    // The NBD client never noticed; new clients work; the daemon stops cleanly.
    assert!(
        !nbd_client.output().contains("ended:"),
        "the NBD client was disturbed: {}",
        nbd_client.output()
    );
    qemu_io(&d.uri(), &["write -P 0x7e 0 64k", "read -P 0x7e 0 64k"]);
    let mut c = connect_when_free(&control);
    wait_until("only the NBD client left connected", || {
        c.ok("query-exports", json!({}))[0]["clients"] == 1
    });
    drop(nbd_client);
    let log = d.stop();
    assert!(log.contains("all overlays committed"), "{log}");
}
