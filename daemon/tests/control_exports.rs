//! The control socket end to end, with the real binary and real clients: a daemon started with
//! `--control` and no export; exports added and written through with qemu-io; `query-stats`;
//! `export-del` safe (refused with a client) and hard (client disconnected, overlay committed
//! and unlocked so a second daemon can serve it); the allowed folders; errors that read like the
//! command line's; per-export read-only; `quit`.

use std::path::Path;

use addcow_daemon_testkit::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A daemon with a control socket (`--allow-dir` the fixture's folder, `--shutdown-grace 5`)
/// and `extra` arguments; returns it and the control socket's path.
fn start_control(f: &Fixture, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let dir = f.dir.path().display().to_string();
    let mut args = vec!["--allow-dir", &dir, "--shutdown-grace", "5"];
    args.extend_from_slice(extra);
    Daemon::start_with_control(f, &args)
}

fn export_names(c: &mut Control) -> Vec<String> {
    let v = c.ok("query-exports", json!({}));
    v.as_array()
        .expect("query-exports returns an array")
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

fn stats_of(c: &mut Control, name: &str) -> Value {
    let v = c.ok("query-stats", json!({ "name": name }));
    let a = v.as_array().expect("array");
    assert_eq!(a.len(), 1, "{v}");
    a[0].clone()
}

#[test]
fn runtime_exports_stats_and_delete_end_to_end() {
    let f = Fixture::new(8 * MIB);
    let a = f.overlay();
    let b = f.make_overlay("b");
    let (d, control) = start_control(&f, &[]);
    let ctl_path = control.display().to_string();
    let mut c = Control::connect(&control);
    // A second connection only listens: it must see the export-deleted notification.
    let mut watcher = Control::connect(&control);

    let hello = c.ok("hello", json!({}));
    let features: Vec<&str> = hello["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for m in [
        "hello",
        "export-add",
        "export-del",
        "query-exports",
        "query-stats",
        "quit",
    ] {
        assert!(features.contains(&m), "{hello}");
    }
    assert!(hello["version"].is_string(), "{hello}");
    assert!(export_names(&mut c).is_empty(), "started with no exports");
    watcher.ok("hello", json!({}));

    // Add two overlays; both are visible to NBD LIST at once.
    let info = c.ok("export-add", json!({"name": "a", "overlay": a}));
    assert_eq!(info["name"], "a");
    assert_eq!(info["size"], 8 * MIB);
    assert_eq!(info["read_only"], false);
    assert_eq!(info["clients"], 0);
    assert_eq!(info["allocated_bytes"], 0);
    assert_eq!(info["complete"], false);
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    assert_eq!(export_names(&mut c), ["a", "b"]);
    let list = run("nbdinfo", &["--list", &d.uri()]);
    assert!(
        list.contains("export=\"a\"") && list.contains("export=\"b\""),
        "{list}"
    );

    // qemu-io writes through each.
    qemu_io(
        &d.uri_of("a"),
        &["write -P 0x11 0 1M", "write -P 0x12 2M 64k", "flush"],
    );
    qemu_io(
        &d.uri_of("b"),
        &["write -P 0x22 1M 512k", "read -P 0x22 1M 512k", "flush"],
    );

    // The writes show in query-stats, with latency percentiles (once the clients' last
    // requests are accounted: that ends a moment after they saw their replies).
    for (name, writes, bytes) in [("a", 2, MIB + 65536), ("b", 1, 512 * 1024)] {
        wait_until("no request in flight", || {
            stats_of(&mut c, name)["in_flight"] == 0
        });
        let s = stats_of(&mut c, name);
        let w = &s["ops"]["write"];
        assert_eq!(w["requests"], writes, "{name}: {s}");
        assert_eq!(w["bytes"], bytes, "{name}: {s}");
        assert_eq!(w["errors"], 0, "{name}: {s}");
        for p in ["p50", "p99", "p999"] {
            let v = w["latency_us"][p].as_f64().unwrap_or(0.0);
            assert!(v > 0.0, "{name}: write latency {p} is {v}: {s}");
        }
        assert!(s["ops"]["flush"]["requests"].as_u64().unwrap() >= 1, "{s}");
        assert!(s["commits"].as_u64().unwrap() >= 1, "{name}: {s}");
        assert!(
            s["bits_set"].as_u64().unwrap() >= bytes / 512,
            "{name}: {s}"
        );
    }
    let s = stats_of(&mut c, "b");
    assert_eq!(s["ops"]["read"]["requests"], 1, "{s}");
    assert_eq!(s["ops"]["read"]["bytes"], 512 * 1024, "{s}");
    let (code, table, err) = ctl(&["--control", &ctl_path, "query-stats", "name=a"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("addcow ctl query-stats name=a:\n{table}");
    let write_row = table
        .lines()
        .find(|l| l.starts_with("write"))
        .unwrap_or_else(|| panic!("{table}"));
    assert_eq!(write_row.split_whitespace().nth(1), Some("2"), "{table}");
    let (code, exports, _) = ctl(&["--control", &ctl_path, "query-exports"]);
    assert_eq!(code, 0);
    eprintln!("addcow ctl query-exports:\n{exports}");
    assert!(
        exports
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("1.06 MiB")),
        "{exports}"
    );

    // While a is served here, no other process can open it for writing.
    let other = std::process::Command::new(addcow_bin())
        .args(["serve", "--socket"])
        .arg(f.path("other.sock"))
        .arg(&a)
        .output()
        .expect("run a second daemon");
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr).into_owned();
    assert!(err.contains("locked"), "{err}");

    // A client on a: safe delete is refused (and says how many clients), hard delete
    // disconnects it after answering its in-flight reads, never with an error reply.
    let client = HoldingClient::start(&d.uri_of("a"));
    // (qemu-io's connections leave a moment after their last reply.)
    wait_until("exactly the holding client connected", || {
        c.ok("query-exports", json!({}))[0]["clients"] == 1
    });
    let e = c
        .call("export-del", json!({"name": "a", "mode": "safe"}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "busy", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("1 client(s) connected"),
        "{e}"
    );
    let (code, _, err) = ctl(&["--control", &ctl_path, "export-del", "name=a"]);
    assert_eq!(code, 1, "safe is the default mode");
    assert!(err.contains("client(s) connected"), "{err}");
    assert_eq!(
        export_names(&mut c),
        ["a", "b"],
        "a refused delete changes nothing"
    );

    // A write that no FLUSH covered, just before the delete: the delete's commit makes it
    // durable (the background commit would only come a second later).
    run(
        "/usr/bin/python3",
        &[
            "-c",
            "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             h.pwrite(b'\\x33' * 65536, 5 << 20)\nh.shutdown()",
            &d.uri_of("a"),
        ],
    );
    let clients_of = |c: &mut Control, name: &str| {
        c.ok("query-exports", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["clients"].as_u64().unwrap())
    };
    wait_until("the writer gone, the holding client left", || {
        clients_of(&mut c, "a") == Some(1)
    });
    let deleted = c.ok("export-del", json!({"name": "a", "mode": "hard"}));
    assert_eq!(deleted["clients_disconnected"], 1, "{deleted}");
    assert_eq!(deleted["mode"], "hard");
    client.wait_for("ended:");
    let out = client.output();
    eprintln!("holding client: {out}");
    assert!(
        !out.contains("errno=108") && !out.to_lowercase().contains("shutdown"),
        "the client got an error reply instead of a disconnect: {out}"
    );
    assert_eq!(export_names(&mut c), ["b"]);
    let n = watcher.notification("export-deleted");
    assert_eq!(n["params"]["name"], "a", "{n}");
    assert_eq!(n["params"]["clients_disconnected"], 1, "{n}");
    assert!(n.get("id").is_none());
    let list = run("nbdinfo", &["--list", &d.uri()]);
    assert!(!list.contains("export=\"a\""), "{list}");

    // The overlay was committed and unlocked: a second daemon serves it, with the data.
    let d2 = Daemon::start(&f.path("second.sock"), &[a.to_str().unwrap()]);
    qemu_io(
        &d2.uri(),
        &[
            "read -P 0x11 0 1M",
            "read -P 0x12 2M 64k",
            "read -P 0xab 3M 64k",
            "read -P 0x33 5M 64k",
        ],
    );
    let log2 = d2.stop();
    assert!(log2.contains("all overlays committed"), "{log2}");

    // b (no client) goes with a safe delete, through addcow ctl.
    wait_until("no client on b", || clients_of(&mut c, "b") == Some(0));
    let (code, outp, err) = ctl(&["--control", &ctl_path, "export-del", "name=b", "mode=safe"]);
    assert_eq!(code, 0, "{err}");
    assert!(outp.contains("deleted export \"b\""), "{outp}");
    assert!(export_names(&mut c).is_empty());
    // Re-adding under the same name works (the name and the lock are free again).
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    qemu_io(&d.uri_of("b"), &["read -P 0x22 1M 512k"]);

    let log = d.stop();
    assert!(log.contains("all overlays committed"), "{log}");
}

#[test]
fn export_add_refusals_read_like_the_command_line() {
    let f = Fixture::new(4 * MIB);
    let outside = Fixture::new(4 * MIB);
    let (d, control) = start_control(&f, &["--export", &format!("x={}", f.overlay().display())]);
    let mut c = Control::connect(&control);

    // Outside --allow-dir: refused, nothing opened.
    let e = c
        .call(
            "export-add",
            json!({"name": "o", "overlay": outside.overlay()}),
        )
        .unwrap_err();
    assert_eq!(e["code"], -32000, "{e}");
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("--allow-dir"),
        "{e}"
    );
    // An overlay inside whose base is outside: refused too.
    let sneaky = f.path("sneaky.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: sneaky.clone(),
        base: Some(outside.path("base.raw")),
        image: None,
        size: Some(4 * MIB),
        force: false,
    })
    .unwrap();
    let e = c
        .call("export-add", json!({"name": "s", "overlay": sneaky}))
        .unwrap_err();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("the base lies outside"),
        "{e}"
    );
    // A symlink inside pointing outside.
    let link = f.path("link.add-cow");
    std::os::unix::fs::symlink(outside.overlay(), &link).unwrap();
    let e = c
        .call("export-add", json!({"name": "l", "overlay": link}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");

    // Errors of the engine carry the same text the command line prints.
    let cli_error = |overlay: &Path| -> String {
        let out = std::process::Command::new(addcow_bin())
            .args(["serve", "--socket"])
            .arg(f.path("cli.sock"))
            .arg("--export")
            .arg(format!("n={}", overlay.display()))
            .output()
            .expect("run addcow serve");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        err.lines()
            .find_map(|l| l.strip_prefix("addcow serve: "))
            .unwrap_or_else(|| panic!("{err}"))
            .to_string()
    };
    let missing = f.path("missing.add-cow");
    let corrupt = f.path("corrupt.add-cow");
    std::fs::write(&corrupt, vec![7u8; 4096]).unwrap();
    // An overlay another process serves: locked.
    let elsewhere = f.make_overlay("elsewhere");
    let other = Daemon::start(&f.path("other.sock"), &[elsewhere.to_str().unwrap()]);
    for (path, class, needle) in [
        (&missing, "open-failed", "file not found"),
        (&corrupt, "open-failed", "bad magic"),
        (&elsewhere, "open-failed", "locked by another process"),
    ] {
        let e = c
            .call("export-add", json!({"name": "n", "overlay": path}))
            .unwrap_err();
        assert_eq!(e["data"]["class"], class, "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg}");
        if class == "open-failed" {
            assert_eq!(msg, cli_error(path), "control and CLI word it differently");
        }
    }
    drop(other);
    // An overlay this daemon serves already (here through a symlink): said so.
    let alias = f.path("alias.add-cow");
    std::os::unix::fs::symlink(f.overlay(), &alias).unwrap();
    let e = c
        .call("export-add", json!({"name": "x2", "overlay": alias}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "already-served", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("as export \"x\""),
        "{e}"
    );
    // The name is taken; a relative path is refused; wrong types say what is wrong.
    let e = c
        .call(
            "export-add",
            json!({"name": "x", "overlay": f.make_overlay("y")}),
        )
        .unwrap_err();
    assert_eq!(e["data"]["class"], "name-taken", "{e}");
    let e = c
        .call(
            "export-add",
            json!({"name": "r", "overlay": "disk.add-cow"}),
        )
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("absolute"), "{e}");
    let e = c
        .call("export-add", json!({"name": 5, "overlay": f.overlay()}))
        .unwrap_err();
    assert_eq!(e["code"], -32602, "{e}");
    let e = c
        .call("export-del", json!({"name": "x", "mode": "gentle"}))
        .unwrap_err();
    assert_eq!(e["code"], -32602, "{e}");
    let e = c.call("export-del", json!({"name": "nope"})).unwrap_err();
    assert_eq!(e["data"]["class"], "no-such-export", "{e}");
    // addcow ctl exits 1 with the message.
    let (code, _, err) = ctl(&[
        "--control",
        control.to_str().unwrap(),
        "export-add",
        "name=o",
        &format!("overlay={}", outside.overlay().display()),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("addcow ctl: ") && err.contains("--allow-dir"),
        "{err}"
    );
    // Nothing was added by any of this.
    let names: Vec<Value> = c.ok("query-exports", json!({})).as_array().unwrap().clone();
    assert_eq!(names.len(), 1, "{names:?}");
    drop(d);
}

#[test]
fn without_allow_dir_or_command_line_overlays_export_add_is_refused() {
    let f = Fixture::new(4 * MIB);
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &["--control", control.to_str().unwrap()],
    );
    let mut c = Control::connect(&control);
    let e = c
        .call("export-add", json!({"name": "a", "overlay": f.overlay()}))
        .unwrap_err();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("export-add is disabled"),
        "{e}"
    );
    drop(d);
}

#[test]
fn read_only_exports_from_the_command_line_and_export_add() {
    let f = Fixture::new(4 * MIB);
    let b = f.make_overlay("b");
    let (d, control) = Daemon::start_with_control(
        &f,
        &["--export", &format!("ro={}:ro", f.overlay().display())],
    );
    let mut c = Control::connect(&control);
    c.ok(
        "export-add",
        json!({"name": "b", "overlay": b, "read_only": true}),
    );
    for name in ["ro", "b"] {
        let q = c.ok("query-exports", json!({}));
        let e = q
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap();
        assert_eq!(e["read_only"], true, "{q}");
        let out = run_raw(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 1 0 4k", &d.uri_of(name)],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "{name}: a write went through: {text}"
        );
        assert!(
            text.contains("read-only") || text.contains("Permission denied"),
            "{name}: {text}"
        );
        let r = run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 0xab 0 4k",
                &d.uri_of(name),
            ],
        );
        assert!(!r.contains("failed"), "{r}");
    }
    // Read-only opens take a shared lock: a second read-only daemon may serve the same file.
    let d2 = Daemon::start(
        &f.path("second.sock"),
        &["--read-only", b.to_str().unwrap()],
    );
    let r = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0xab 0 4k", &d2.uri()],
    );
    assert!(!r.contains("failed"), "{r}");
    d2.stop();
    d.stop();
}

#[test]
fn quit_shuts_down_like_sigterm() {
    let f = Fixture::new(4 * MIB);
    let (mut d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    c.ok("export-add", json!({"name": "a", "overlay": f.overlay()}));
    qemu_io(&d.uri_of("a"), &["write -P 0x5a 0 64k"]);
    let (code, out, err) = ctl(&["--control", control.to_str().unwrap(), "quit"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shutting down"), "{out}");
    let n = c.notification("shutdown");
    assert!(n["params"].is_object(), "{n}");
    let st = d.wait_exit();
    assert!(st.success(), "{st}\n{}", d.log());
    let log = d.log();
    assert!(log.contains("all overlays committed"), "{log}");
    assert!(!control.exists(), "control socket file left behind");
    assert!(!d.sock.exists(), "NBD socket file left behind");
    // The write was committed: a new daemon reads it.
    let d2 = Daemon::start(&f.path("again.sock"), &[f.overlay().to_str().unwrap()]);
    qemu_io(&d2.uri(), &["read -P 0x5a 0 64k"]);
    d2.stop();
}

#[test]
fn control_socket_hygiene() {
    let f = Fixture::new(4 * MIB);
    let (d, control) = start_control(&f, &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live control socket is refused to a second daemon.
    let out = std::process::Command::new(addcow_bin())
        .args(["serve", "--socket"])
        .arg(f.path("x.sock"))
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another server is listening"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A stale one (left by a killed daemon) is replaced.
    drop(d);
    assert!(control.exists(), "SIGKILL leaves the file");
    let (d, control) = start_control(&f, &[]);
    Control::connect(&control).ok("hello", json!({}));
    d.stop();
}

/// Remote bases through export-add: an `nbd+unix` base's socket must lie in an allowed folder,
/// and a TCP base is refused unless the daemon runs with `--allow-remote-bases` (then the add
/// gets as far as connecting).
#[test]
fn export_add_of_remote_bases_is_bounded_by_the_allowed_folders_and_a_flag() {
    let f = Fixture::new(4 * MIB);
    let outside = Fixture::new(4 * MIB);
    let remote = |name: &str, uri: &str| {
        let overlay = f.path(&format!("{name}.add-cow"));
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: overlay.clone(),
            base: Some(uri.into()),
            image: None,
            size: Some(4 * MIB),
            force: false,
        })
        .unwrap();
        overlay
    };
    let unix_out = remote(
        "unixout",
        &format!("nbd+unix:///?socket={}", outside.path("img.sock").display()),
    );
    let tcp = remote("tcp", "nbd://127.0.0.1:1/golden");
    let (d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    let e = c
        .call("export-add", json!({"name": "u", "overlay": unix_out}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("remote base's socket") && m.contains("img.sock"),
        "{e}"
    );
    let e = c
        .call("export-add", json!({"name": "t", "overlay": tcp}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--allow-remote-bases"),
        "{e}"
    );
    drop(c);
    d.stop();

    // With the flag the TCP base passes the check: the add fails only at connecting.
    let (d, control) = start_control(&f, &["--allow-remote-bases"]);
    let mut c = Control::connect(&control);
    let e = c
        .call("export-add", json!({"name": "t", "overlay": tcp}))
        .unwrap_err();
    assert_ne!(e["data"]["class"], "not-allowed", "{e}");
    let e = c
        .call("export-add", json!({"name": "u", "overlay": unix_out}))
        .unwrap_err();
    assert_eq!(e["data"]["class"], "not-allowed", "{e}");
    drop(c);
    d.stop();
}
