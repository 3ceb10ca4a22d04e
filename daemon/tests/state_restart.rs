//! The state file (`--state`): a daemon killed (SIGKILL) at any step of an export-add /
//! export-snapshot / export-del sequence comes back serving either the set before that call or
//! the set after it, never a mix and never nothing; and a reply means the change survives.
//!
//! Each run starts a daemon with test seams armed (`process::seam`: `POINT.pause`), drives
//! the sequence up to the step under test, waits for the daemon to stop at the point, kills it,
//! restarts it on the same configuration and state file, and compares `query-exports`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use addcow_daemon_testkit::{qemu_io, wait_until, Control, Daemon, Fixture};
use serde_json::{json, Value};

/// The served set: export name → overlay file name.
type Set = BTreeMap<String, String>;

fn set(pairs: &[(&str, &str)]) -> Set {
    pairs
        .iter()
        .map(|(n, o)| (n.to_string(), o.to_string()))
        .collect()
}

fn served(control: &Path) -> Set {
    let mut c = Control::connect(control);
    let list = c.ok("query-exports", json!({}));
    list.as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            let overlay = PathBuf::from(e["overlay"].as_str().expect("overlay"));
            (
                e["name"].as_str().expect("name").to_string(),
                overlay.file_name().unwrap().to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// The sequence: (method, params) with its set after it. The set before step 0 is `a` on
/// `disk.add-cow` (from the command line).
fn steps(f: &Fixture) -> Vec<(&'static str, Value, Set)> {
    let b = f.make_overlay("b");
    vec![
        (
            "export-add",
            json!({"name": "b", "overlay": b}),
            set(&[("a", "disk.add-cow"), ("b", "b.add-cow")]),
        ),
        (
            "export-snapshot",
            json!({"name": "a", "overlay": f.path("a2.add-cow")}),
            set(&[("a", "a2.add-cow"), ("b", "b.add-cow")]),
        ),
        (
            "export-del",
            json!({"name": "b"}),
            set(&[("a", "a2.add-cow")]),
        ),
    ]
}

fn start(f: &Fixture, seams: Option<&Path>) -> (Daemon, PathBuf) {
    let control = f.path("ctl.sock");
    let disk = format!("a={}", f.overlay().display());
    let state = f.path("state.json");
    let dir = f.dir.path().to_str().unwrap().to_string();
    let args = [
        "--control",
        control.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--export",
        &disk,
        "--allow-dir",
        &dir,
        "--commit-interval",
        "0",
    ];
    let d = match seams {
        Some(s) => Daemon::start_seamed(&f.path("nbd.sock"), &args, s),
        None => Daemon::start(&f.path("nbd.sock"), &args),
    };
    (d, control)
}

/// Where a run stops the daemon: at `point` (a seam, after `then` more seams armed in turn
/// once each is reached: a later passage of a point), or after the reply (`None`).
struct Stop {
    points: &'static [&'static str],
}

/// One run: steps before `step` done, then `step` sent and the daemon killed where `stop`
/// says; returns the set the restarted daemon serves, and whether the reply came.
fn run(step: usize, stop: &Stop) -> (Set, Set, Set, bool) {
    let f = Fixture::new(1 << 20);
    let seams = tempfile::tempdir().unwrap();
    let all = steps(&f);
    let before = if step == 0 {
        set(&[("a", "disk.add-cow")])
    } else {
        all[step - 1].2.clone()
    };
    let (mut d, control) = start(&f, Some(seams.path()));
    let mut c = Control::connect(&control);
    for (m, p, _) in &all[..step] {
        c.ok(m, p.clone());
    }
    let (method, params, after) = &all[step];
    let mut replied = false;
    let mut written = false;
    if stop.points.is_empty() {
        c.ok(method, params.clone());
        replied = true;
    } else {
        std::fs::write(seams.path().join(format!("{}.pause", stop.points[0])), b"").unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 99, "method": method, "params": params});
        c.sock
            .write_all(format!("{req}\n").as_bytes())
            .expect("send");
        for (i, point) in stop.points.iter().enumerate() {
            let reached = seams.path().join(format!("{point}.reached"));
            wait_until(&format!("the daemon stops at {point}"), || reached.exists());
            if let Some(next) = stop.points.get(i + 1) {
                std::fs::write(seams.path().join(format!("{next}.pause")), b"").unwrap();
                std::fs::write(seams.path().join(format!("{point}.go")), b"").unwrap();
            }
        }
    }
    // A snapshot stopped after its switch: a write answered on the new overlay (flushed)
    // must survive the restart.
    if step == 1 && stop.points.len() > 1 {
        let out = qemu_io(&d.uri_of("a"), &["write -P 0xcd 0 4096", "flush"]);
        assert!(out.contains("wrote 4096/4096"), "{out}");
        written = true;
    }
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let (d2, control) = start(&f, None);
    let now = served(&control);
    // The export that is served reads (not only is listed).
    for name in now.keys() {
        let pattern = if written && name == "a" {
            "0xcd"
        } else {
            "0xab"
        };
        let out = qemu_io(&d2.uri_of(name), &[&format!("read -P {pattern} 0 4096")]);
        assert!(
            out.contains("read 4096/4096") && !out.contains("Pattern verification failed"),
            "step {step} at {:?}: export {name} does not read {pattern}: {out}",
            stop.points
        );
    }
    d2.stop();
    (before, after.clone(), now, replied)
}

#[test]
fn sigkill_at_every_step_serves_the_old_or_the_new_set() {
    let cases: &[(usize, &[&str])] = &[
        // export-add: opened, before the record; the record at each stage; after the reply.
        (0, &["export-add-opened"]),
        (0, &["state-write"]),
        (0, &["state-synced"]),
        (0, &["state-renamed"]),
        (0, &[]),
        // export-snapshot: its first record (before the snapshot) at each stage; in the
        // middle of the snapshot (new overlay made, not yet serving); its second record.
        (1, &["state-synced"]),
        (1, &["state-renamed"]),
        (1, &["snapshot-unlocked"]),
        (1, &["snapshot-unlocked", "state-synced"]),
        (1, &["snapshot-unlocked", "state-renamed"]),
        (1, &[]),
        // export-del: deleted, before the record; the record's stages; after the reply.
        (2, &["state-write"]),
        (2, &["state-synced"]),
        (2, &["state-renamed"]),
        (2, &[]),
    ];
    for (step, points) in cases {
        let (before, after, now, replied) = run(*step, &Stop { points });
        eprintln!("step {step} killed at {points:?}: {now:?}");
        assert!(
            now == before || now == after,
            "step {step} killed at {points:?}: serves {now:?}, neither {before:?} nor {after:?}"
        );
        if replied || points.last() == Some(&"state-renamed") && points.len() > 1 {
            assert_eq!(now, after, "step {step} at {points:?}: the change was lost");
        }
        // Before its first record is durable, no change may have been kept.
        if matches!(
            points,
            ["state-write"] | ["state-synced"] | ["export-add-opened"]
        ) {
            assert_eq!(now, before, "step {step} at {points:?}");
        }
    }
}

/// Without a crash: the sequence's end state comes back after a clean restart (a snapshotted
/// command-line export on its new overlay, a deleted runtime export gone), and a second
/// restart with the command line naming another overlay for `a` serves the command line's.
#[test]
fn a_restart_serves_what_was_served_and_the_command_line_wins_a_new_overlay() {
    let f = Fixture::new(1 << 20);
    let all = steps(&f);
    let (d, control) = start(&f, None);
    let mut c = Control::connect(&control);
    for (m, p, _) in &all[..2] {
        c.ok(m, p.clone());
    }
    drop(c);
    d.stop();
    let (d, control) = start(&f, None);
    assert_eq!(served(&control), all[1].2);
    d.stop();

    // The configuration now names c.add-cow for a: it wins, the recorded snapshot is dropped.
    let other = f.make_overlay("c");
    let control = f.path("ctl.sock");
    let state = f.path("state.json");
    let export = format!("a={}", other.display());
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--export",
            &export,
        ],
    );
    assert_eq!(
        served(&control),
        set(&[("a", "c.add-cow"), ("b", "b.add-cow")])
    );
    d.stop();
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(f.path("state.json")).unwrap()).unwrap();
    assert!(recorded["exports"].get("a").is_none(), "{recorded}");
}

/// A vhost-user-blk export added at runtime comes back as one, on its socket, after a SIGKILL
/// (its socket file left behind by the killed daemon is no obstacle).
#[test]
fn a_vhost_user_blk_export_comes_back_after_sigkill() {
    let f = Fixture::new(1 << 20);
    let b = f.make_overlay("b");
    let vsock = f.path("b.vhost");
    let (mut d, control) = start(&f, None);
    let mut c = Control::connect(&control);
    c.ok(
        "export-add",
        json!({"name": "b", "overlay": b, "type": "vhost-user-blk", "addr": vsock, "num-queues": 1}),
    );
    drop(c);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let (d, control) = start(&f, None);
    let mut c = Control::connect(&control);
    let list = c.ok("query-exports", json!({}));
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "b")
        .unwrap_or_else(|| panic!("b is not served: {list}\n{}", d.log()));
    assert_eq!(b["type"], "vhost-user-blk", "{b}");
    assert!(vsock.exists());
    d.stop();
}

/// `export-resize` needs no record: the size lives in the overlay's header, durable before the
/// reply, so a runtime export grown and then killed comes back at its new size.
#[test]
fn a_resized_export_comes_back_at_its_new_size_after_sigkill() {
    let f = Fixture::new(1 << 20);
    let b = f.make_overlay("b");
    let (mut d, control) = start(&f, None);
    let mut c = Control::connect(&control);
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    c.ok("export-resize", json!({"name": "b", "size": "4M"}));
    drop(c);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let (d, control) = start(&f, None);
    let list = Control::connect(&control).ok("query-exports", json!({}));
    let b = list.as_array().unwrap().iter().find(|e| e["name"] == "b");
    assert_eq!(b.map(|e| e["size"].clone()), Some(json!(4 << 20)), "{list}");
    d.stop();
}

/// A command-line overlay outside the allowed folders, snapshotted into one: after a SIGKILL
/// the export comes back on the snapshot, whose base (the command line's overlay) lies outside
/// the allowed folders, as it did before the restart.
#[test]
fn a_snapshotted_command_line_export_outside_the_allowed_folders_comes_back() {
    let f = Fixture::new(1 << 20);
    let allowed = f.path("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let control = f.path("ctl.sock");
    let state = f.path("state.json");
    let export = format!("a={}", f.overlay().display());
    let args = [
        "--control",
        control.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--export",
        &export,
        "--allow-dir",
        allowed.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&f.path("nbd.sock"), &args);
    let snap = allowed.join("a2.add-cow");
    Control::connect(&control).ok("export-snapshot", json!({"name": "a", "overlay": snap}));
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    let d = Daemon::start(&f.path("nbd.sock"), &args);
    assert_eq!(served(&control), set(&[("a", "a2.add-cow")]), "{}", d.log());
    d.stop();
}

/// Creates (or, with `force`, recreates) the overlay `overlay` on `base` (its raw image beside
/// it): what a control client can do to a file it owns between two daemon starts.
fn overlay_on(overlay: &Path, base: &Path, force: bool) {
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.to_path_buf(),
        base: Some(base.to_path_buf()),
        image: Some(overlay.with_extension("raw")),
        size: Some(1 << 20),
        force,
    })
    .expect("create overlay");
}

/// A control client deletes a command-line export and adds one under its name on an overlay
/// it controls (inside the allowed folders then), then points that overlay's base outside them.
/// A restart holds the recorded export to the allowed folders as any export-add (not the
/// command line's trust): it is refused with a log naming it, and the rest is served.
#[test]
fn an_export_added_under_a_command_line_name_is_held_to_the_allowed_folders() {
    let f = Fixture::new(1 << 20);
    let allowed = f.path("allowed");
    std::fs::create_dir(&allowed).unwrap();
    let inside = allowed.join("base.raw");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    let (b, evil) = (allowed.join("b.add-cow"), allowed.join("evil.add-cow"));
    overlay_on(&b, &inside, false);
    overlay_on(&evil, &inside, false);
    let control = f.path("ctl.sock");
    let state = f.path("state.json");
    let export = format!("a={}", f.overlay().display());
    let args = [
        "--control",
        control.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--export",
        &export,
        "--allow-dir",
        allowed.to_str().unwrap(),
    ];
    let d = Daemon::start(&f.path("nbd.sock"), &args);
    let mut c = Control::connect(&control);
    c.ok("export-add", json!({"name": "b", "overlay": b}));
    c.ok("export-del", json!({"name": "a"}));
    c.ok("export-add", json!({"name": "a", "overlay": evil}));
    drop(c);
    d.stop();
    // Its base now lies outside the allowed folders.
    overlay_on(&evil, &f.path("base.raw"), true);
    let d = Daemon::start(&f.path("nbd.sock"), &args);
    assert_eq!(served(&control), set(&[("b", "b.add-cow")]), "{}", d.log());
    let log = d.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot be served") && l.contains("export=a")),
        "{log}"
    );
}

/// Two daemons given one state file would each record over the other's exports: the second
/// is refused at start, naming the file, while the first serves on.
#[test]
fn a_second_daemon_on_the_same_state_file_is_refused() {
    let f = Fixture::new(1 << 20);
    let (d, control) = start(&f, None);
    let state = f.path("state.json");
    let out = addcow_daemon_testkit::addcow(
        f.dir.path(),
        &[
            "serve",
            "--socket",
            f.path("other.sock").to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
    );
    let t = addcow_daemon_testkit::text(&out);
    assert!(!out.status.success(), "the second daemon started: {t}");
    assert!(
        t.contains("state.json") && t.contains("another running daemon"),
        "{t}"
    );
    assert_eq!(served(&control), set(&[("a", "disk.add-cow")]));
    d.stop();
}
