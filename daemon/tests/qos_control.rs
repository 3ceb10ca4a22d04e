//! Per-export throttling operated through the real binary: the control verbs (`export-add`
//! with `throttle` / `throttle-group`, `export-set-throttle`, `throttle-group-set`,
//! `throttle-group-del`, `query-throttle-groups`) check their limits and name the bad key;
//! `query-exports`, `query-stats` and Prometheus show limits, group and counters; limits change
//! under a connected libnbd client without a reconnect; a group in use cannot be deleted; a live
//! snapshot and an online resize keep the export's group; the command line's `--export
//! ...,iops-total=` and `--throttle-group`.
//!
//! The tests whose names end in `_is_enforced` need the engine to hold requests back; the rest
//! check the daemon's bookkeeping only.

use addcow_daemon_testkit::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn start_control(f: &Fixture, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let dir = f.dir.path().display().to_string();
    let mut args = vec!["--allow-dir", &dir, "--shutdown-grace", "5"];
    args.extend_from_slice(extra);
    Daemon::start_with_control(f, &args)
}

/// `query-exports`' entry for `name`.
fn export(c: &mut Control, name: &str) -> Value {
    c.ok("query-exports", json!({}))
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no export {name:?}"))
        .clone()
}

/// The error of a call that must fail.
fn refused(c: &mut Control, method: &str, params: Value) -> Value {
    c.call(method, params.clone())
        .err()
        .unwrap_or_else(|| panic!("{method} {params} was accepted"))
}

fn metrics(sock: &std::path::Path) -> String {
    run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--unix-socket",
            sock.to_str().unwrap(),
            "http://x/metrics",
        ],
    )
}

/// The value of the metrics line starting with `series` (name and labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn throttle_verbs_check_limits_and_show_them() {
    let f = Fixture::new(4 * MIB);
    let b = f.make_overlay("b");
    let msock = f.path("metrics.sock");
    let (_d, control) = start_control(&f, &["--metrics", msock.to_str().unwrap()]);
    let mut c = Control::connect(&control);
    let features = c.ok("hello", json!({}))["features"].clone();
    for m in [
        "export-set-throttle",
        "throttle-group-set",
        "throttle-group-del",
        "query-throttle-groups",
    ] {
        assert!(
            features.as_array().unwrap().contains(&json!(m)),
            "{features}"
        );
    }

    // Bad limits at export-add: refused naming the key; nothing is added.
    for (throttle, key) in [
        (json!({"iops-totl": 5}), "iops-totl"),
        (json!({"iops-total": "5k"}), "iops-total"),
        (json!({"bps-read": -1}), "bps-read"),
        (json!({"bps-write": [1]}), "bps-write"),
        (json!("iops-write"), "iops-write"),
    ] {
        let e = refused(
            &mut c,
            "export-add",
            json!({"name": "a", "overlay": f.overlay(), "throttle": throttle}),
        );
        assert_eq!(e["code"], -32602, "{e}");
        assert_eq!(e["data"]["class"], "invalid-limits", "{e}");
        assert_eq!(e["data"]["key"], key, "{e}");
        assert!(e["message"].as_str().unwrap().contains(key), "{e}");
    }
    let e = refused(
        &mut c,
        "export-add",
        json!({"name": "a", "overlay": f.overlay(), "throttle-group": "nope"}),
    );
    assert_eq!(e["data"]["class"], "no-such-group", "{e}");
    assert!(c
        .ok("query-exports", json!({}))
        .as_array()
        .unwrap()
        .is_empty());

    // Limits of its own: shown in query-exports (byte values with suffixes), no group.
    let info = c.ok(
        "export-add",
        json!({"name": "a", "overlay": f.overlay(),
               "throttle": {"iops-total": 5000, "bps-write": "50M"}}),
    );
    assert_eq!(info["throttle"]["iops-total"], 5000, "{info}");
    assert_eq!(info["throttle"]["bps-write"], 50 * MIB, "{info}");
    assert!(info.get("throttle-group").is_none(), "{info}");

    // A named group: made, joined, listed, not deletable while in use.
    let e = refused(
        &mut c,
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-totl": 1}}),
    );
    assert_eq!(e["data"]["key"], "iops-totl", "{e}");
    let e = refused(
        &mut c,
        "throttle-group-set",
        json!({"name": "bad name", "limits": {"iops-total": 1}}),
    );
    assert!(e["message"].as_str().unwrap().contains("bad name"), "{e}");
    let g = c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 3000}}),
    );
    assert_eq!(g["created"], true, "{g}");
    let e = refused(
        &mut c,
        "export-add",
        json!({"name": "b", "overlay": b, "throttle-group": "gold",
               "throttle": {"iops-total": 1}}),
    );
    assert!(e["message"].as_str().unwrap().contains("not both"), "{e}");
    let info = c.ok(
        "export-add",
        json!({"name": "b", "overlay": b, "throttle-group": "gold"}),
    );
    assert_eq!(info["throttle-group"], "gold", "{info}");
    assert_eq!(info["throttle"], json!({"iops-total": 3000}), "{info}");
    let groups = c.ok("query-throttle-groups", json!({}));
    assert_eq!(groups[0]["name"], "gold", "{groups}");
    assert_eq!(groups[0]["members"], json!(["b"]), "{groups}");
    assert_eq!(groups[0]["limits"], json!({"iops-total": 3000}), "{groups}");
    assert_eq!(groups[0]["stats"]["throttled_requests"], 0, "{groups}");
    // Updating the group changes every member's limits.
    let g = c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": "iops-total=4000,bps-total=1G"}),
    );
    assert_eq!(g["created"], false, "{g}");
    assert_eq!(
        export(&mut c, "b")["throttle"],
        json!({"iops-total": 4000, "bps-total": 1u64 << 30})
    );
    let e = refused(&mut c, "throttle-group-del", json!({"name": "gold"}));
    assert_eq!(e["data"]["class"], "group-in-use", "{e}");
    assert!(e["message"].as_str().unwrap().contains("\"b\""), "{e}");
    let e = refused(&mut c, "throttle-group-del", json!({"name": "silver"}));
    assert_eq!(e["data"]["class"], "no-such-group", "{e}");

    // export-set-throttle: a into the group, b out of it (its own limits), then none.
    let e = refused(&mut c, "export-set-throttle", json!({"name": "a"}));
    assert_eq!(e["code"], -32602, "{e}");
    let e = refused(
        &mut c,
        "export-set-throttle",
        json!({"name": "zz", "limits": {}}),
    );
    assert_eq!(e["data"]["class"], "no-such-export", "{e}");
    let e = refused(
        &mut c,
        "export-set-throttle",
        json!({"name": "a", "limits": {"iops-read": "x"}}),
    );
    assert_eq!(e["data"]["key"], "iops-read", "{e}");
    assert_eq!(
        export(&mut c, "a")["throttle"]["iops-total"],
        5000,
        "a refused change changes nothing"
    );
    c.ok(
        "export-set-throttle",
        json!({"name": "a", "throttle-group": "gold"}),
    );
    c.ok(
        "export-set-throttle",
        json!({"name": "b", "limits": {"iops-write": 10}}),
    );
    let (a, bx) = (export(&mut c, "a"), export(&mut c, "b"));
    assert_eq!(a["throttle-group"], "gold", "{a}");
    assert!(bx.get("throttle-group").is_none(), "{bx}");
    assert_eq!(bx["throttle"], json!({"iops-write": 10}), "{bx}");
    let groups = c.ok("query-throttle-groups", json!({}));
    assert_eq!(groups[0]["members"], json!(["a"]), "{groups}");
    c.ok("export-set-throttle", json!({"name": "a", "limits": {}}));
    let a = export(&mut c, "a");
    assert!(
        a.get("throttle").is_none() && a.get("throttle-group").is_none(),
        "{a}"
    );
    c.ok("throttle-group-del", json!({"name": "gold"}));
    assert_eq!(c.ok("query-throttle-groups", json!({})), json!([]));

    // query-stats and Prometheus carry the counters for every export.
    let s = c.ok("query-stats", json!({"name": "b"}));
    assert_eq!(
        s[0]["throttle"],
        json!({"throttled_requests": 0, "throttled_seconds": 0.0, "queued": 0}),
        "{s}"
    );
    let text = metrics(&msock);
    for name in ["a", "b"] {
        let l = format!("{{export=\"{name}\"}}");
        assert_eq!(
            metric(&text, &format!("addcow_throttled_requests_total{l}")),
            0.0
        );
        assert_eq!(
            metric(&text, &format!("addcow_throttled_seconds_total{l}")),
            0.0
        );
        assert_eq!(metric(&text, &format!("addcow_throttle_queued{l}")), 0.0);
    }

    // addcow ctl's key=value form reaches the same verbs.
    let ctl_path = control.to_str().unwrap();
    let (code, out, err) = ctl(&[
        "--control",
        ctl_path,
        "throttle-group-set",
        "name=silver",
        "limits=iops-total=100,bps-total=10M",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&[
        "--control",
        ctl_path,
        "export-set-throttle",
        "name=a",
        "throttle-group=silver",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        export(&mut c, "a")["throttle"],
        json!({"iops-total": 100, "bps-total": 10 * MIB})
    );
    let (code, _, err) = ctl(&[
        "--control",
        ctl_path,
        "export-set-throttle",
        "name=a",
        "limits=iops-totl=1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("iops-totl"), "{err}");
}

/// Limits set and removed while a libnbd client keeps reading: it is never disconnected and
/// its reads go on under each setting.
#[test]
fn limits_change_live_under_a_connected_client() {
    let f = Fixture::new(4 * MIB);
    let (d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    c.ok("export-add", json!({"name": "a", "overlay": f.overlay()}));
    let client = HoldingClient::start(&d.uri_of("a"));
    let reads = |c: &mut Control| -> u64 {
        c.ok("query-stats", json!({"name": "a"}))[0]["ops"]["read"]["requests"]
            .as_u64()
            .unwrap_or(0)
    };
    for limits in [
        json!({"iops-total": 1000}),
        json!({"iops-total": 2000, "bps-total": "10M"}),
        json!({}),
    ] {
        c.ok(
            "export-set-throttle",
            json!({"name": "a", "limits": limits.clone()}),
        );
        let shown = export(&mut c, "a");
        if limits == json!({}) {
            assert!(shown.get("throttle").is_none(), "{shown}");
        } else {
            assert_eq!(shown["throttle"]["iops-total"], limits["iops-total"]);
        }
        let before = reads(&mut c);
        wait_until("the connected client reads under the new limits", || {
            reads(&mut c) >= before + 5
        });
        assert_eq!(
            export(&mut c, "a")["clients"],
            1,
            "the client stayed connected"
        );
    }
    assert!(
        !client.output().contains("ended"),
        "client disconnected: {}",
        client.output()
    );
}

/// A live snapshot and an online resize switch the export to a new disk: its named group and
/// its own limits go with it (a switch never lifts a limit).
#[test]
fn snapshot_and_resize_keep_the_throttle_group() {
    let f = Fixture::new(4 * MIB);
    let b = f.make_overlay("b");
    let (d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 3000}}),
    );
    c.ok(
        "export-add",
        json!({"name": "a", "overlay": f.overlay(), "throttle-group": "gold"}),
    );
    c.ok(
        "export-add",
        json!({"name": "b", "overlay": b, "throttle": {"bps-total": "20M"}}),
    );
    qemu_io(&d.uri_of("a"), &["write -P 0x11 0 64k"]);
    let snap_a = f.path("a-1.add-cow");
    let snap_b = f.path("b-1.add-cow");
    c.ok("export-snapshot", json!({"name": "a", "overlay": snap_a}));
    c.ok("export-snapshot", json!({"name": "b", "overlay": snap_b}));
    for (name, overlay) in [("a", &snap_a), ("b", &snap_b)] {
        let e = export(&mut c, name);
        assert_eq!(e["overlay"], json!(overlay), "{e}");
    }
    let (a, bx) = (export(&mut c, "a"), export(&mut c, "b"));
    assert_eq!(
        a["throttle-group"], "gold",
        "snapshot dropped the group: {a}"
    );
    assert_eq!(a["throttle"], json!({"iops-total": 3000}), "{a}");
    assert_eq!(bx["throttle"], json!({"bps-total": 20 * MIB}), "{bx}");
    assert_eq!(
        c.ok("query-throttle-groups", json!({}))[0]["members"],
        json!(["a"])
    );
    // The group still cannot be deleted: the new disk is its member.
    let e = refused(&mut c, "throttle-group-del", json!({"name": "gold"}));
    assert_eq!(e["data"]["class"], "group-in-use", "{e}");

    c.ok("export-resize", json!({"name": "a", "size": "8M"}));
    c.ok("export-resize", json!({"name": "b", "size": "8M"}));
    let (a, bx) = (export(&mut c, "a"), export(&mut c, "b"));
    assert_eq!(a["size"], 8 * MIB, "{a}");
    assert_eq!(a["throttle-group"], "gold", "resize dropped the group: {a}");
    assert_eq!(bx["throttle"], json!({"bps-total": 20 * MIB}), "{bx}");
    // Changing the group after the switches reaches the export's current disk.
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 10}}),
    );
    assert_eq!(export(&mut c, "a")["throttle"], json!({"iops-total": 10}));
    qemu_io(&d.uri_of("a"), &["read -P 0x11 0 64k"]);
}

/// `--throttle-group` and `--export NAME=PATH,key=value,...` on the command line.
#[test]
fn command_line_exports_take_limits_and_groups() {
    let f = Fixture::new(4 * MIB);
    let b = f.make_overlay("b");
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--throttle-group",
            "gold:iops-total=1000,iops-total-max=2000",
            "--export",
            &format!("a={},throttle-group=gold", f.overlay().display()),
            "--export",
            &format!(
                "b={},bps-write=50M,iops-write=800,iops-size=4K",
                b.display()
            ),
        ],
    );
    let mut c = Control::connect(&control);
    let a = export(&mut c, "a");
    assert_eq!(a["throttle-group"], "gold", "{a}");
    assert_eq!(
        a["throttle"],
        json!({"iops-total": 1000, "iops-total-max": 2000}),
        "{a}"
    );
    let bx = export(&mut c, "b");
    assert_eq!(
        bx["throttle"],
        json!({"bps-write": 50 * MIB, "iops-write": 800, "iops-size": 4096}),
        "{bx}"
    );
    qemu_io(&d.uri_of("b"), &["write -P 1 0 64k", "read -P 1 0 64k"]);
    // A bad one is refused at start, naming the option and the key.
    let out = addcow(
        f.dir.path(),
        &[
            "serve",
            "--socket",
            f.path("x.sock").to_str().unwrap(),
            "--export",
            &format!("a={},iops-totl=5", f.overlay().display()),
        ],
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("--export") && t.contains("iops-totl"), "{t}");
    // Both helps show the throttle options and verbs.
    let help = addcow_ok(f.dir.path(), &["serve", "--help"]);
    assert!(
        help.contains("--throttle-group") && help.contains("iops-total="),
        "{help}"
    );
    let help = addcow_ok(f.dir.path(), &["ctl", "--help"]);
    for verb in [
        "export-set-throttle",
        "throttle-group-set",
        "throttle-group-del",
        "query-throttle-groups",
    ] {
        assert!(
            help.contains(verb),
            "{verb} missing from ctl --help:\n{help}"
        );
    }
}

/// QEMU's rules on limits (a burst below its rate, a burst length without a burst, values
/// past the maximum) are refused naming the key. Needs `ThrottleLimits::validate` (engine).
#[test]
fn limits_breaking_qemu_rules_are_refused_naming_the_key() {
    let f = Fixture::new(4 * MIB);
    let (_d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    for (limits, key) in [
        (
            json!({"iops-total": 100, "iops-total-max": 50}),
            "iops-total-max",
        ),
        (json!({"bps-read-max": 100}), "bps-read-max"),
        (
            json!({"iops-total": 100, "iops-total-max-length": 5}),
            "iops-total-max-length",
        ),
        (json!({"bps-total": 1_000_000_000_000_001u64}), "bps-total"),
    ] {
        let e = refused(
            &mut c,
            "throttle-group-set",
            json!({"name": "g", "limits": limits.clone()}),
        );
        assert_eq!(e["data"]["class"], "invalid-limits", "{limits}: {e}");
        assert_eq!(e["data"]["key"], key, "{limits}: {e}");
    }
}

/// With `iops-total=20`, 50 reads take the budget: some wait, and the counters say so in
/// query-stats, the group's stats and Prometheus. Needs the engine's enforcement.
#[test]
fn iops_limit_is_enforced() {
    let f = Fixture::new(4 * MIB);
    let msock = f.path("metrics.sock");
    let (d, control) = start_control(&f, &["--metrics", msock.to_str().unwrap()]);
    let mut c = Control::connect(&control);
    c.ok(
        "throttle-group-set",
        json!({"name": "slow", "limits": {"iops-total": 20}}),
    );
    c.ok(
        "export-add",
        json!({"name": "a", "overlay": f.overlay(), "throttle-group": "slow"}),
    );
    let cmds: Vec<String> = (0..50).map(|i| format!("read {}k 4k", i * 4)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri_of("a"), &cmds);
    let s = c.ok("query-stats", json!({"name": "a"}));
    let t = &s[0]["throttle"];
    assert!(t["throttled_requests"].as_u64().unwrap() > 0, "{s}");
    assert!(t["throttled_seconds"].as_f64().unwrap() > 0.0, "{s}");
    let g = c.ok("query-throttle-groups", json!({}));
    assert!(
        g[0]["stats"]["throttled_requests"].as_u64().unwrap() > 0,
        "{g}"
    );
    let text = metrics(&msock);
    assert!(metric(&text, "addcow_throttled_requests_total{export=\"a\"}") > 0.0);
    // A live snapshot opens a new disk: the export's counters carry on, never go back.
    let before = t["throttled_requests"].as_u64().unwrap();
    c.ok(
        "export-snapshot",
        json!({"name": "a", "overlay": f.path("a-1.add-cow")}),
    );
    let s = c.ok("query-stats", json!({"name": "a"}));
    assert!(
        s[0]["throttle"]["throttled_requests"].as_u64().unwrap() >= before,
        "{s}"
    );
}

/// A READ of an area that reads as zeros (past the base's end, nothing written) is answered by
/// the NBD planner without the engine when the export is not throttled; a throttled export's
/// are metered like any other read (QEMU meters every read), on both connection modes.
#[test]
fn reads_of_holes_are_metered_too() {
    for mode in ["ring", "threads"] {
        let f = Fixture::new(4 * MIB);
        let (d, control) = start_control(&f, &["--conn-mode", mode]);
        let mut c = Control::connect(&control);
        c.ok(
            "export-add",
            json!({"name": "a", "overlay": f.overlay(), "throttle": {"iops-total": 20}}),
        );
        // The fixture's base covers the first half: the second half is holes.
        let cmds: Vec<String> = (0..50)
            .map(|i| format!("read {}k 4k", 2048 + i * 4))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&d.uri_of("a"), &cmds);
        let s = c.ok("query-stats", json!({"name": "a"}));
        assert!(
            s[0]["throttle"]["throttled_requests"].as_u64().unwrap() > 0,
            "{mode}: reads of holes went past the limit: {s}"
        );
    }
}

/// A vhost-user-blk export takes its group at `export-add` and new limits while its libblkio
/// frontend stays connected and keeps reading and writing.
#[test]
fn vhost_exports_take_limits_live() {
    use addcow_daemon_testkit::vhost::{pattern, Frontend};
    let f = Fixture::new(4 * MIB);
    let (_d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 3000}}),
    );
    let vsock = f.path("v.sock");
    let added = c.ok(
        "export-add",
        json!({"name": "v", "overlay": f.overlay(), "type": "vhost-user-blk",
               "addr": vsock, "num-queues": 1, "throttle-group": "gold"}),
    );
    assert_eq!(added["throttle-group"], "gold", "{added}");
    let mut fe = Frontend::connect(&vsock, 1).expect("blkio connects");
    let data = pattern(7, 64 << 10);
    assert_eq!(fe.write(0, 0, &data), 0);
    for limits in [
        json!({"iops-total": 1000}),
        json!({"bps-total": "10M"}),
        json!({}),
    ] {
        c.ok(
            "export-set-throttle",
            json!({"name": "v", "limits": limits.clone()}),
        );
        let e = export(&mut c, "v");
        assert!(e.get("throttle-group").is_none(), "{e}");
        assert_eq!(
            e["vhost-user-blk"]["frontend_connected"], true,
            "the frontend stayed connected: {e}"
        );
        assert_eq!(fe.read(0, 0, data.len()), data, "reads under {limits}");
    }
    let e = export(&mut c, "v");
    assert!(e.get("throttle").is_none(), "{e}");
}

/// With `iops-total=20` on a vhost-user-blk export, 50 reads from libblkio wait for the
/// budget and the counters say so. Needs the engine's enforcement.
#[test]
fn vhost_iops_limit_is_enforced() {
    use addcow_daemon_testkit::vhost::Frontend;
    let f = Fixture::new(4 * MIB);
    let (_d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    let vsock = f.path("v.sock");
    c.ok(
        "export-add",
        json!({"name": "v", "overlay": f.overlay(), "type": "vhost-user-blk",
               "addr": vsock, "num-queues": 1, "throttle": {"iops-total": 20}}),
    );
    let mut fe = Frontend::connect(&vsock, 1).expect("blkio connects");
    for i in 0..50u64 {
        let _ = fe.read(0, i * 4096, 4096);
    }
    let s = c.ok("query-stats", json!({"name": "v"}));
    assert!(
        s[0]["throttle"]["throttled_requests"].as_u64().unwrap() > 0,
        "{s}"
    );
}

/// A client keeps many reads waiting for a tiny budget (`iops-total=1`: served at that rate
/// they would take minutes): a live snapshot and an online resize let them go at once instead
/// of waiting for the budget while holding the export (and the daemon's state). The bound is
/// generous; the throttled rate would take far longer. Needs the engine's enforcement.
#[test]
fn snapshot_of_a_throttled_export_does_not_wait_for_budget_is_enforced() {
    const QUEUE: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
bufs = [nbd.Buffer(4096) for _ in range(128)]
for i, b in enumerate(bufs):
    h.aio_pread(b, (i % 64) * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("drained", flush=True)
"#;
    let f = Fixture::new(4 * MIB);
    let (d, control) = start_control(&f, &[]);
    let mut c = Control::connect(&control);
    c.ok(
        "export-add",
        json!({"name": "a", "overlay": f.overlay(), "throttle": {"iops-total": 1}}),
    );
    let client = HoldingClient::run(QUEUE, &[&d.uri_of("a")]);
    let queued = |c: &mut Control| -> u64 {
        c.ok("query-stats", json!({"name": "a"}))[0]["throttle"]["queued"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until("reads wait for the export's budget", || {
        queued(&mut c) >= 60 || client.output().contains("Error")
    });
    assert!(!client.output().contains("Error"), "{}", client.output());
    let t = std::time::Instant::now();
    c.ok(
        "export-snapshot",
        json!({"name": "a", "overlay": f.path("a-1.add-cow")}),
    );
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "export-snapshot waited {took:?} for the throttle budget"
    );
    // The limit still holds on the new disk.
    assert_eq!(export(&mut c, "a")["throttle"], json!({"iops-total": 1}));
    drop(client);
}
