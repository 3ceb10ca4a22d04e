//! The state file (`--state`) and throttling: limits set on an export, named throttle groups
//! made, changed and deleted at runtime come back after a SIGKILL and a restart; a change killed
//! before its record is durable was never replied to; a state file from before groups were
//! recorded still loads.
//!
//! Each daemon serves `a` from the command line in the command line's group `cfg`; the tests
//! change things over the control socket, kill the daemon (SIGKILL), restart it on the same
//! command line and state file, and compare `query-exports` / `query-throttle-groups`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use addcow_daemon_testkit::{wait_until, Control, Daemon, Fixture};
use serde_json::{json, Value};

/// What the daemon serves, as far as throttling goes: export → (`throttle`, `throttle-group`)
/// and named group → (`limits`, `members`).
#[derive(Debug, Clone, PartialEq)]
struct View {
    exports: BTreeMap<String, (Value, Value)>,
    groups: BTreeMap<String, (Value, Value)>,
}

fn view(control: &Path) -> View {
    let mut c = Control::connect(control);
    let exports = c.ok("query-exports", json!({}));
    let groups = c.ok("query-throttle-groups", json!({}));
    View {
        exports: exports
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().expect("name").to_string(),
                    (e["throttle"].clone(), e["throttle-group"].clone()),
                )
            })
            .collect(),
        groups: groups
            .as_array()
            .expect("a list")
            .iter()
            .map(|g| {
                (
                    g["name"].as_str().expect("name").to_string(),
                    (g["limits"].clone(), g["members"].clone()),
                )
            })
            .collect(),
    }
}

/// Starts the daemon: `a` in the command line's group `cfg` (`cfg_limits`), `--state`.
fn start(f: &Fixture, seams: Option<&Path>, cfg_limits: &str) -> (Daemon, PathBuf) {
    let control = f.path("ctl.sock");
    let state = f.path("state.json");
    let export = format!("a={},throttle-group=cfg", f.overlay().display());
    let group = format!("cfg:{cfg_limits}");
    let dir = f.dir.path().to_str().unwrap().to_string();
    let args = [
        "--control",
        control.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--throttle-group",
        &group,
        "--export",
        &export,
        "--allow-dir",
        &dir,
    ];
    let d = match seams {
        Some(s) => Daemon::start_seamed(&f.path("nbd.sock"), &args, s),
        None => Daemon::start(&f.path("nbd.sock"), &args),
    };
    (d, control)
}

fn kill(mut d: Daemon) {
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
}

fn recorded(f: &Fixture) -> Value {
    serde_json::from_slice(&std::fs::read(f.path("state.json")).unwrap()).unwrap()
}

#[test]
fn limits_groups_and_membership_come_back_after_sigkill() {
    let f = Fixture::new(1 << 20);
    let b = f.make_overlay("b");
    let (d, control) = start(&f, None, "iops-total=100");
    let mut c = Control::connect(&control);
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 1000, "bps-total": "10M"}}),
    );
    // The command line's export leaves its group for limits of its own; b joins gold, whose
    // limits then change; the command line's group gets new limits.
    c.ok(
        "export-set-throttle",
        json!({"name": "a", "limits": {"iops-total": 500}}),
    );
    c.ok(
        "export-set-throttle",
        json!({"name": "b", "throttle-group": "gold"}),
    );
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 2000}}),
    );
    c.ok(
        "throttle-group-set",
        json!({"name": "cfg", "limits": {"iops-total": 300}}),
    );
    let before = view(&control);
    let want = View {
        exports: [
            ("a".into(), (json!({"iops-total": 500}), Value::Null)),
            ("b".into(), (json!({"iops-total": 2000}), json!("gold"))),
        ]
        .into(),
        groups: [
            ("cfg".into(), (json!({"iops-total": 300}), json!([]))),
            ("gold".into(), (json!({"iops-total": 2000}), json!(["b"]))),
        ]
        .into(),
    };
    assert_eq!(before, want);
    drop(c);
    kill(d);
    let (d, control) = start(&f, None, "iops-total=100");
    assert_eq!(view(&control), want, "{}", d.log());

    // Limits removed and the group deleted (its member moved out first): gone after a restart,
    // and the keys gone from the recorded parameters.
    let mut c = Control::connect(&control);
    c.ok("export-set-throttle", json!({"name": "b", "limits": {}}));
    c.ok("export-set-throttle", json!({"name": "a", "limits": {}}));
    c.ok("throttle-group-del", json!({"name": "gold"}));
    drop(c);
    kill(d);
    let (d, control) = start(&f, None, "iops-total=100");
    let want = View {
        exports: [
            ("a".into(), (Value::Null, Value::Null)),
            ("b".into(), (Value::Null, Value::Null)),
        ]
        .into(),
        groups: [("cfg".into(), (json!({"iops-total": 300}), json!([])))].into(),
    };
    assert_eq!(view(&control), want, "{}", d.log());
    let state = recorded(&f);
    for name in ["a", "b"] {
        let p = &state["exports"][name]["params"];
        assert!(
            p.get("throttle").is_none() && p.get("throttle-group").is_none(),
            "{state}"
        );
    }
    d.stop();

    // The command line gives cfg new limits: the command line wins over the recorded change.
    let (d, control) = start(&f, None, "iops-total=50");
    let now = view(&control);
    assert_eq!(now.groups["cfg"].0, json!({"iops-total": 50}), "{now:?}");
    d.stop();
    assert!(
        recorded(&f)
            .get("throttle-groups")
            .and_then(|g| g.get("cfg"))
            .is_none(),
        "{}",
        recorded(&f)
    );
}

/// The steps before the change under test: b added, groups gold (b in it) and spare made.
fn prepare(c: &mut Control, f: &Fixture) {
    let b = f.make_overlay("b");
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    c.ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 1000}}),
    );
    c.ok(
        "export-set-throttle",
        json!({"name": "b", "throttle-group": "gold"}),
    );
    c.ok(
        "throttle-group-set",
        json!({"name": "spare", "limits": {"iops-total": 5}}),
    );
}

/// One run: [`prepare`], then `method` sent and the daemon killed at seam `stop` (after the
/// reply: `None`), restarted; returns the views before the change, after it (the live
/// daemon's, only when replied) and after the restart.
fn run(method: &str, params: &Value, stop: Option<&str>) -> (View, Option<View>, View) {
    let f = Fixture::new(1 << 20);
    let seams = tempfile::tempdir().unwrap();
    let (d, control) = start(&f, Some(seams.path()), "iops-total=100");
    let mut c = Control::connect(&control);
    prepare(&mut c, &f);
    let before = view(&control);
    let mut after = None;
    match stop {
        None => {
            c.ok(method, params.clone());
            after = Some(view(&control));
        }
        Some(point) => {
            std::fs::write(seams.path().join(format!("{point}.pause")), b"").unwrap();
            let req = json!({"jsonrpc": "2.0", "id": 99, "method": method, "params": params});
            c.sock
                .write_all(format!("{req}\n").as_bytes())
                .expect("send");
            let reached = seams.path().join(format!("{point}.reached"));
            wait_until(&format!("{method}: the daemon stops at {point}"), || {
                reached.exists()
            });
            // Stopped inside the record: no reply has been sent.
            c.sock.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            match c.sock.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("{method}: a reply before its record is durable: {other:?}"),
            }
        }
    }
    drop(c);
    kill(d);
    let (d, control) = start(&f, None, "iops-total=100");
    let now = view(&control);
    d.stop();
    (before, after, now)
}

#[test]
fn a_throttle_change_killed_before_its_record_is_durable_was_never_replied_to() {
    let verbs = [
        (
            "throttle-group-set",
            json!({"name": "gold", "limits": {"iops-total": 2000}}),
        ),
        (
            "export-set-throttle",
            json!({"name": "a", "limits": {"iops-total": 500}}),
        ),
        ("throttle-group-del", json!({"name": "spare"})),
    ];
    for (method, params) in &verbs {
        let (before, after, now) = run(method, params, None);
        let after = after.expect("replied");
        assert_ne!(before, after, "{method} changed nothing");
        assert_eq!(now, after, "{method}: replied, but lost by a restart");
        // Killed before the record is written: the old state; once the record's rename is
        // done (not yet replied): the new one.
        let (b, _, now) = run(method, params, Some("state-write"));
        assert_eq!(now, b, "{method} killed before its record");
        let (_, _, now) = run(method, params, Some("state-renamed"));
        assert_eq!(now, after, "{method} killed after its record");
    }
}

/// A state file written before throttle groups were recorded (no `throttle-groups` key) loads:
/// its exports are served, the command line's groups made; the next change adds the key.
#[test]
fn a_state_file_without_throttle_groups_still_loads() {
    let f = Fixture::new(1 << 20);
    let b = f.make_overlay("b");
    std::fs::write(
        f.path("state.json"),
        serde_json::to_vec_pretty(&json!({
            "version": 1,
            "exports": {"b": {"params": {"name": "b", "overlay": b}}},
        }))
        .unwrap(),
    )
    .unwrap();
    let (d, control) = start(&f, None, "iops-total=100");
    let v = view(&control);
    assert!(v.exports.contains_key("b"), "{v:?}\n{}", d.log());
    assert_eq!(
        v.groups["cfg"],
        (json!({"iops-total": 100}), json!(["a"])),
        "{v:?}"
    );
    Control::connect(&control).ok(
        "throttle-group-set",
        json!({"name": "gold", "limits": {"iops-total": 7}}),
    );
    kill(d);
    let (d, control) = start(&f, None, "iops-total=100");
    let v = view(&control);
    assert_eq!(v.groups["gold"].0, json!({"iops-total": 7}), "{v:?}");
    assert!(v.exports.contains_key("b"), "{v:?}");
    d.stop();
}
