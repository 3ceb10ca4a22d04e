//! Dirty bitmaps (changed-block tracking) with real clients: `nbdinfo --map=qemu:dirty-bitmap:B`
//! and `qemu-img map` with `x-dirty-bitmap` show exactly the written ranges rounded to the
//! granularity; the `bitmap-*` verbs validate; bits survive a SIGKILL of the daemon after the
//! writes and a FLUSH; the offline `addcow bitmap` tool and `addcow info` see them.

use std::path::Path;

use addcow_daemon_testkit::{addcow, addcow_ok, qemu_io, run, Control, Daemon, Fixture};
use serde_json::json;

const MIB: u64 = 1 << 20;
const K64: u64 = 64 << 10;

/// `nbdinfo --map=CONTEXT` as (offset, length, flags) rows.
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// The dirty ranges of a map.
fn dirty(rows: &[(u64, u64, u32)]) -> Vec<(u64, u64)> {
    rows.iter()
        .filter(|r| r.2 == 1)
        .map(|r| (r.0, r.1))
        .collect()
}

/// `qemu-img map` through QEMU's NBD client reading `qemu:dirty-bitmap:NAME` as its allocation
/// (`x-dirty-bitmap`): the ranges it reports as not data are the dirty ones.
fn qemu_dirty(sock: &Path, export: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("qemu-img map json");
    let mut got: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("array") {
        if e["data"] == json!(false) {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match got.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => got.push((s, l)),
            }
        }
    }
    got
}

fn start(f: &Fixture, exports: &[&str]) -> (Daemon, std::path::PathBuf) {
    let mut args = Vec::new();
    for e in exports {
        args.push("--export");
        args.push(e);
    }
    Daemon::start_with_control(f, &args)
}

#[test]
fn dirty_bitmaps_over_nbd_survive_a_kill_and_validate() {
    let f = Fixture::new(16 * MIB);
    let overlay = f.overlay();
    let ov = overlay.to_str().unwrap();
    // Offline: a 64 KiB bitmap before the daemon serves the overlay.
    addcow_ok(f.dir.path(), &["bitmap", "add", ov, "b0"]);
    let spec = format!("a={ov},bitmap=b0");
    let (d, control) = start(&f, &[&spec]);
    let mut c = Control::connect(&control);
    c.ok(
        "bitmap-add",
        json!({"export": "a", "name": "b1", "granularity": "4K"}),
    );
    // Nothing dirty yet.
    assert_eq!(dirty(&map(&d.uri_of("a"), "qemu:dirty-bitmap:b0")), vec![]);
    qemu_io(
        &d.uri_of("a"),
        &[
            "write -P 0x11 1M 4k",
            "write -P 0x22 5243000 300",
            "write -z 9M 128k",
            "discard 12M 64k",
            "flush",
        ],
    );
    let want = vec![
        (MIB, K64),
        (5 * MIB, K64),
        (9 * MIB, 2 * K64),
        (12 * MIB, K64),
    ];
    let rows = map(&d.uri_of("a"), "qemu:dirty-bitmap:b0");
    assert_eq!(dirty(&rows), want, "nbdinfo --map {rows:?}");
    assert_eq!(
        rows.iter().map(|r| r.1).sum::<u64>(),
        16 * MIB,
        "the map covers the disk"
    );
    assert_eq!(
        qemu_dirty(&f.path("nbd.sock"), "a", "b0"),
        want,
        "qemu-img map"
    );
    // base:allocation is still served alongside.
    assert!(!map(&d.uri_of("a"), "base:allocation").is_empty());

    let q = c.ok("query-bitmaps", json!({"export": "a"}));
    let b0 = &q[0];
    assert_eq!(b0["name"], "b0");
    assert_eq!(b0["granularity"], 65536);
    assert_eq!(b0["dirty-bytes"], 5 * K64);
    assert_eq!(b0["exported"], true);
    // b1 (4 KiB): 4K + 4K (5243000..5243300 lies in one 4 KiB granule) + 128K + 64K.
    assert_eq!(q[1]["dirty-bytes"], 4096 + 4096 + 128 * 1024 + 64 * 1024);

    // The verbs validate.
    let err = |c: &mut Control, m: &str, p: serde_json::Value| {
        c.call(m, p.clone())
            .expect_err(&format!("{m} {p} must fail"))
            .to_string()
    };
    assert!(err(
        &mut c,
        "bitmap-add",
        json!({"export": "a", "name": "x", "granularity": 1000})
    )
    .contains("power of two"));
    assert!(err(
        &mut c,
        "bitmap-add",
        json!({"export": "a", "name": "x", "granularity": "128M"})
    )
    .contains("power of two"));
    assert!(err(&mut c, "bitmap-add", json!({"export": "a", "name": "b1"})).contains("exists"));
    assert!(err(&mut c, "bitmap-add", json!({"export": "nope", "name": "x"})).contains("nope"));
    assert!(err(
        &mut c,
        "bitmap-remove",
        json!({"export": "a", "name": "b0"})
    )
    .contains("serves"));
    assert!(err(&mut c, "bitmap-clear", json!({"export": "a", "name": "zz"})).contains("zz"));
    assert!(err(
        &mut c,
        "bitmap-merge",
        json!({"export": "a", "target": "b1", "sources": ["zz"]})
    )
    .contains("zz"));
    assert!(err(&mut c, "bitmap-add", json!({"export": "a", "name": ""})).contains("name"));
    // Disable, merge, clear.
    c.ok("bitmap-disable", json!({"export": "a", "name": "b1"}));
    qemu_io(&d.uri_of("a"), &["write -P 0x33 14M 4k", "flush"]);
    let q = c.ok("query-bitmaps", json!({"export": "a"}));
    assert_eq!(q[1]["enabled"], false);
    assert_eq!(
        q[1]["dirty-bytes"], 204800,
        "a disabled bitmap records nothing"
    );
    c.ok(
        "bitmap-add",
        json!({"export": "a", "name": "m", "granularity": 65536, "disabled": true}),
    );
    c.ok(
        "bitmap-merge",
        json!({"export": "a", "target": "m", "sources": ["b0", "b1"]}),
    );
    let q = c.ok("query-bitmaps", json!({"export": "a"}));
    assert_eq!(q[2]["dirty-bytes"], 6 * K64);
    c.ok("bitmap-clear", json!({"export": "a", "name": "b1"}));
    c.ok("bitmap-enable", json!({"export": "a", "name": "b1"}));
    c.ok("bitmap-remove", json!({"export": "a", "name": "m"}));
    let q = c.ok("query-bitmaps", json!({"export": "a"}));
    assert_eq!(q.as_array().unwrap().len(), 2);
    assert_eq!(q[1]["dirty-bytes"], 0);
    // export-add with bitmaps: a missing one is refused.
    let other = f.make_overlay("other");
    assert!(err(
        &mut c,
        "export-add",
        json!({"name": "o", "overlay": other, "bitmaps": ["nope"]})
    )
    .contains("nope"));

    // Writes after a FLUSH, then SIGKILL: the bits are there after a restart.
    qemu_io(&d.uri_of("a"), &["write -P 0x44 15M 512", "flush"]);
    drop(c);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let mut d = d;
    d.wait_exit();
    let (d, _control) = start(&f, &[&spec]);
    let want = vec![
        (MIB, K64),
        (5 * MIB, K64),
        (9 * MIB, 2 * K64),
        (12 * MIB, K64),
        (14 * MIB, K64),
        (15 * MIB, K64),
    ];
    assert_eq!(dirty(&map(&d.uri_of("a"), "qemu:dirty-bitmap:b0")), want);
    // `qemu:` in LIST names the bitmap too.
    let list = run("nbdinfo", &["--list", "--json", &d.uri()]);
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");
    d.stop();

    // Offline: list and info see the bitmaps; the sidecar's corruption is a clear error.
    let out = addcow_ok(f.dir.path(), &["bitmap", "list", "--json", ov]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "b0");
    assert_eq!(v[0]["dirty_bytes"], 7 * K64);
    let info = addcow_ok(f.dir.path(), &["info", ov]);
    assert!(info.contains("dirty bitmap:   b0"), "{info}");
    addcow_ok(f.dir.path(), &["bitmap", "clear", ov, "b0"]);
    addcow_ok(f.dir.path(), &["bitmap", "remove", ov, "b1"]);
    let out = addcow_ok(f.dir.path(), &["bitmap", "list", "--json", ov]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["dirty_bytes"], 0);
    let side = f.path("disk.add-cow.bitmaps");
    let mut bytes = std::fs::read(&side).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&side, &bytes).unwrap();
    let o = addcow(f.dir.path(), &["bitmap", "list", ov]);
    let text = addcow_daemon_testkit::text(&o);
    assert!(!o.status.success() && text.contains("checksum"), "{text}");
}

/// A live snapshot moves the export to a new overlay: its bitmaps go with it (the writes before
/// and after the switch are both dirty, over NBD and after a restart on the new overlay), and
/// an export-resize grows them dirty.
#[test]
fn bitmaps_follow_a_live_snapshot_and_a_resize() {
    let f = Fixture::new(8 * MIB);
    let ov = f.overlay();
    let ov = ov.to_str().unwrap();
    addcow_ok(f.dir.path(), &["bitmap", "add", ov, "b0"]);
    let (d, control) = start(&f, &[&format!("a={ov},bitmap=b0")]);
    let mut c = Control::connect(&control);
    qemu_io(&d.uri_of("a"), &["write -P 0x11 1M 4k", "flush"]);
    let snap = f.path("snap.add-cow");
    c.ok("export-snapshot", json!({"name": "a", "overlay": snap}));
    qemu_io(&d.uri_of("a"), &["write -P 0x22 3M 4k", "flush"]);
    let want = vec![(MIB, K64), (3 * MIB, K64)];
    assert_eq!(dirty(&map(&d.uri_of("a"), "qemu:dirty-bitmap:b0")), want);
    c.ok("export-resize", json!({"name": "a", "size": 9 * MIB}));
    let q = c.ok("query-bitmaps", json!({"export": "a"}));
    assert_eq!(q[0]["dirty-bytes"], 2 * K64 + MIB, "the grown MiB is dirty");
    drop(c);
    d.stop();
    // The new overlay's sidecar holds the bitmap, with both writes and the grown area.
    let sp = snap.to_str().unwrap();
    let out = addcow_ok(f.dir.path(), &["bitmap", "list", "--json", sp]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "b0");
    assert_eq!(v[0]["dirty_bytes"], 2 * K64 + MIB);
}
