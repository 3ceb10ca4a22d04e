//! `export-add {type: "vhost-user-blk", ...}` on the control socket, end to end: the real
//! daemon, libblkio's `virtio-blk-vhost-user` driver as the frontend, NBD (by export name) as
//! the second view of the same disk. `query-exports` shows the type and the socket;
//! `export-del` refuses a connected frontend in `safe` mode and in `hard` mode answers what is
//! in flight, disconnects the frontend and removes the socket, after which the same socket can
//! be added again; bad parameters get errors that say what is wrong and leave nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use addcow_daemon_testkit::vhost::{pattern, Frontend};
use addcow_daemon_testkit::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A daemon with a control socket, two cores, an NBD socket and no export.
fn start(f: &Fixture) -> (Daemon, PathBuf) {
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--allow-dir",
            f.dir.path().to_str().unwrap(),
            "--cores",
            "2",
            "--shutdown-grace",
            "10",
        ],
    );
    (d, control)
}

fn add_vhost(c: &mut Control, name: &str, overlay: &Path, sock: &Path) -> Value {
    c.ok(
        "export-add",
        json!({
            "name": name,
            "overlay": overlay,
            "type": "vhost-user-blk",
            "addr": {"type": "unix", "path": sock},
            "num-queues": 2,
            "serial": "vm-disk-7",
        }),
    )
}

fn export_of(c: &mut Control, name: &str) -> Option<Value> {
    let all = c.ok("query-exports", json!({}));
    all.as_array()
        .expect("array")
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

/// Reads `len` bytes at `offset` of export `name` over NBD.
fn nbd_read(sock: &Path, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut c = RawClient::connect(sock, name).expect("nbd connect");
    let mut out = vec![0u8; len];
    assert_eq!(c.read(offset, &mut out).unwrap(), 0, "nbd read");
    c.disconnect();
    out
}

#[test]
fn a_vhost_user_blk_export_added_at_runtime_serves_blkio_and_export_del_stops_it() {
    let f = Fixture::new(16 * MIB);
    let overlay = f.overlay();
    let (d, control) = start(&f);
    let vsock = f.path("vm.vhost");
    let mut c = Control::connect(&control);

    let added = add_vhost(&mut c, "vm", &overlay, &vsock);
    assert_eq!(added["type"], "vhost-user-blk", "{added}");
    assert_eq!(added["vhost-user-blk"]["num-queues"], 2, "{added}");
    assert_eq!(added["vhost-user-blk"]["serial"], "vm-disk-7", "{added}");
    assert_eq!(added["vhost-user-blk"]["socket"], json!(vsock), "{added}");
    let mode = std::fs::metadata(&vsock)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    let info = export_of(&mut c, "vm").expect("listed");
    assert_eq!(
        info["vhost-user-blk"]["frontend_connected"], false,
        "{info}"
    );

    // Two queues, a write on each, flushed, read back through both front ends.
    let mut fe = Frontend::connect(&vsock, 2).expect("blkio connects to the added export");
    assert_eq!(fe.capacity(), 16 * MIB);
    let (a, b) = (pattern(1, MIB as usize), pattern(2, MIB as usize));
    assert_eq!(fe.write(0, 0, &a), 0);
    assert_eq!(fe.write(1, 9 * MIB, &b), 0);
    assert_eq!(fe.flush(1), 0);
    assert!(
        fe.read(1, 0, MIB as usize) == a,
        "queue 1 reads queue 0's write"
    );
    assert!(
        nbd_read(&d.sock, "vm", 9 * MIB, MIB as usize) == b,
        "NBD sees the write"
    );
    wait_until("query-exports shows the frontend", || {
        export_of(&mut c, "vm").unwrap()["vhost-user-blk"]["frontend_connected"] == true
    });

    // safe: refused while the frontend is connected; nothing changes.
    let e = c
        .call("export-del", json!({"name": "vm"}))
        .expect_err("safe delete with a frontend connected");
    assert_eq!(e["data"]["class"], "busy", "{e}");
    assert!(vsock.exists(), "a refused delete leaves the socket");
    assert_eq!(
        fe.write(0, 4 * MIB, &b),
        0,
        "still served after a refused delete"
    );

    // hard: the frontend is disconnected, the socket removed, the export gone.
    let del = c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
    assert_eq!(del["clients_disconnected"], 1, "{del}");
    assert!(!vsock.exists(), "export-del removes the socket file");
    assert!(export_of(&mut c, "vm").is_none());
    fe.queues[0].read(
        0,
        fe.region.addr as *mut u8,
        4096,
        0,
        blkio::ReqFlags::empty(),
    );
    assert!(
        fe.wait(0, 1, 2).is_empty(),
        "a request after export-del is not answered"
    );
    drop(fe);

    // The same socket and overlay again: the data written before is there.
    add_vhost(&mut c, "vm", &overlay, &vsock);
    let mut fe = Frontend::connect(&vsock, 1).expect("blkio connects to the re-added export");
    assert!(fe.read(0, 0, MIB as usize) == a);
    assert!(fe.read(0, 4 * MIB, MIB as usize) == b);
    assert!(fe.read(0, 9 * MIB, MIB as usize) == b);
    drop(fe);
    wait_until("the frontend's disconnect is seen", || {
        export_of(&mut c, "vm").unwrap()["vhost-user-blk"]["frontend_connected"] == false
    });
    let del = c.ok("export-del", json!({"name": "vm"}));
    assert_eq!(del["clients_disconnected"], 0, "{del}");
    assert!(!vsock.exists());

    // A vhost-user-blk export still added at shutdown: its socket goes with the daemon.
    add_vhost(&mut c, "vm", &overlay, &vsock);
    let mut fe = Frontend::connect(&vsock, 1).expect("connect");
    assert_eq!(fe.write(0, 12 * MIB, &a), 0);
    let log = d.stop();
    assert!(!vsock.exists(), "socket removed at exit:\n{log}");
    drop(fe);
    let check = Daemon::start(&f.path("nbd2.sock"), &[overlay.to_str().unwrap()]);
    assert!(
        nbd_read(&check.sock, "", 12 * MIB, MIB as usize) == a,
        "written before SIGTERM"
    );
    check.stop();
}

#[test]
fn export_del_hard_answers_the_requests_in_flight_before_it_disconnects() {
    let f = Fixture::new(64 * MIB);
    let overlay = f.overlay();
    let (d, control) = start(&f);
    let vsock = f.path("vm.vhost");
    let mut c = Control::connect(&control);
    add_vhost(&mut c, "vm", &overlay, &vsock);
    let mut fe = Frontend::connect(&vsock, 1).expect("connect");
    const N: usize = 48;
    for i in 0..N {
        let data = pattern(100 + i as u64, MIB as usize);
        fe.buf()[i * MIB as usize..(i + 1) * MIB as usize].copy_from_slice(&data);
        fe.submit_write(0, i as u64 * MIB, i * MIB as usize, MIB as usize, i);
    }
    // Kicks, and waits for the first answer: the daemon has popped chains by then (on a loaded
    // machine it may not have when the delete comes otherwise, and a chain never popped is
    // rightly never answered), and the rest are in flight or waiting.
    let early = fe.wait(0, 1, 30);
    let del = c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
    // What the raw image holds the moment the delete returned (the overlay is unlocked now:
    // nothing may land in it any more).
    let raw = std::fs::read(f.path("disk.raw")).expect("read the raw image");
    assert_eq!(del["clients_disconnected"], 1, "{del}");
    let mut answered = early;
    loop {
        let got = fe.wait(0, 1, 2);
        if got.is_empty() {
            break;
        }
        answered.extend(got);
    }
    assert!(
        !answered.is_empty(),
        "no write was answered (the first answer was waited for before the delete)"
    );
    for (tag, ret) in &answered {
        assert_eq!(
            *ret, 0,
            "write {tag} answered with an error by a draining delete"
        );
        let at = *tag * MIB as usize;
        assert!(
            raw.get(at..at + MIB as usize) == Some(&pattern(100 + *tag as u64, MIB as usize)[..]),
            "write {tag} was answered but was not in the raw image when export-del returned"
        );
    }
    drop(fe);
    // Every answered write is in the overlay (committed and unlocked by the delete).
    c.ok("export-add", json!({"name": "check", "overlay": overlay}));
    for (tag, _) in &answered {
        let got = nbd_read(&d.sock, "check", *tag as u64 * MIB, MIB as usize);
        assert!(
            got == pattern(100 + *tag as u64, MIB as usize),
            "answered write {tag} is not in the overlay after export-del"
        );
    }
    eprintln!(
        "{} of {N} writes answered across the delete",
        answered.len()
    );
    d.stop();
}

#[test]
fn bad_vhost_user_blk_parameters_get_clear_errors_and_leave_nothing_behind() {
    let f = Fixture::new(8 * MIB);
    let overlay = f.overlay();
    let (d, control) = start(&f);
    let mut c = Control::connect(&control);
    let vsock = f.path("vm.vhost");
    let outside = tempfile::tempdir().unwrap();
    let busy_path = f.path("busy.sock");
    let _busy = std::os::unix::net::UnixListener::bind(&busy_path).unwrap();
    let plain = f.path("plain-file");
    std::fs::write(&plain, b"not a socket").unwrap();

    let base = json!({"name": "vm", "overlay": overlay, "type": "vhost-user-blk"});
    let with = |extra: Value| {
        let mut p = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"name": "vm", "overlay": overlay, "type": "virtio-fs", "addr": vsock}),
            "invalid-params",
            "unknown variant `virtio-fs`",
        ),
        (with(json!({})), "invalid-params", "needs addr"),
        (
            with(json!({"addr": {"type": "inet", "host": "::1", "port": "1"}})),
            "invalid-params",
            "Unix socket only",
        ),
        (
            with(json!({"addr": {"type": "unix"}})),
            "invalid-params",
            "expected {\"type\": \"unix\", \"path\": PATH}",
        ),
        (
            with(json!({"addr": vsock, "num-queues": 3})),
            "invalid-queues",
            "num-queues 3: must be between 1 and the daemon's core count (2)",
        ),
        (
            with(json!({"addr": vsock, "num-queues": 0})),
            "invalid-queues",
            "num-queues 0",
        ),
        (
            with(json!({"addr": vsock, "num-queues": "many"})),
            "invalid-params",
            "num-queues \"many\" is not a queue count",
        ),
        (
            with(json!({"addr": "vm.vhost"})),
            "not-allowed",
            "vm.vhost: the vhost-user-blk socket path must be absolute",
        ),
        (
            with(json!({"addr": outside.path().join("x.sock")})),
            "not-allowed",
            "socket's folder lies outside the folders export-add may open",
        ),
        (
            with(json!({"addr": f.path("no-such-dir/x.sock")})),
            "not-allowed",
            "no-such-dir",
        ),
        (
            with(json!({"addr": busy_path})),
            "socket-failed",
            "another server is listening on this socket",
        ),
        (
            with(json!({"addr": plain})),
            "socket-failed",
            "exists and is not a socket",
        ),
        (
            json!({"name": "vm", "overlay": overlay, "addr": vsock}),
            "invalid-params",
            "addr is a vhost-user-blk parameter",
        ),
        (
            with(json!({"addr": vsock, "read_only": true, "writable": true})),
            "invalid-params",
            "contradict",
        ),
    ];
    for (params, class, needle) in cases {
        let e = c
            .call("export-add", params.clone())
            .expect_err(&format!("{params} must fail"));
        let got_class = e["data"]["class"].as_str().unwrap_or("invalid-params");
        assert_eq!(got_class, class, "{params}: {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{params}: message {msg:?} lacks {needle:?}"
        );
        assert!(export_of(&mut c, "vm").is_none(), "{params} left an export");
        assert!(!vsock.exists(), "{params} left a socket file");
    }
    assert!(
        busy_path.exists() && plain.exists(),
        "files of others are left alone"
    );

    // The socket of another vhost-user-blk export of this daemon.
    let other = f.make_overlay("other");
    add_vhost(&mut c, "other", &other, &vsock);
    let e = c
        .call(
            "export-add",
            json!({"name": "vm", "overlay": overlay, "type": "vhost-user-blk", "addr": vsock}),
        )
        .expect_err("socket in use by another export");
    assert_eq!(e["data"]["class"], "socket-failed", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("another server is listening"),
        "{e}"
    );
    c.ok("export-del", json!({"name": "other"}));

    // After all that the overlay was never left open or locked: a good add works, read-only
    // through `writable: false`, and a write is refused.
    let added = c.ok(
        "export-add",
        json!({"name": "vm", "overlay": overlay, "type": "vhost-user-blk",
               "addr": {"type": "unix", "path": vsock}, "writable": false}),
    );
    assert_eq!(added["read_only"], true, "{added}");
    assert_eq!(
        added["vhost-user-blk"]["num-queues"], 2,
        "default: one queue per core"
    );
    assert_eq!(
        added["vhost-user-blk"]["serial"], "disk",
        "default: the overlay's stem"
    );
    let e = Frontend::connect(&vsock, 1)
        .err()
        .expect("a writable start of a read-only export must fail");
    assert!(e.message().contains("read-only"), "{}", e.message());
    let mut fe = Frontend::connect_with(&vsock, 2, true).expect("read-only connect");
    assert!(fe.read(1, 0, 4096) == f.reference()[..4096]);
    drop(fe);
    d.stop();
}

/// Threads of process `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == name)
        .count()
}

/// A live snapshot (`export-snapshot`) of a vhost-user-blk export under load: both queues keep
/// 32 writes in flight while the disk switches to the new overlay. Every request is answered
/// OK, requests that meet the switch wait on at most one thread per queue (not one each), and
/// afterwards both front ends read what was written, from the new overlay.
#[test]
fn a_live_snapshot_under_vhost_io_answers_every_request_and_keeps_the_data() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    const DEPTH: usize = 32;
    const LEN: usize = 64 << 10;
    let f = Fixture::new(16 * MIB);
    let overlay = f.overlay();
    let (d, control) = start(&f);
    let pid = d.child.as_ref().expect("daemon running").id();
    let vsock = f.path("vm.vhost");
    let mut c = Control::connect(&control);
    add_vhost(&mut c, "vm", &overlay, &vsock);
    let mut fe = Frontend::connect(&vsock, 2).expect("blkio connects");
    let mut model = f.reference();
    let slots = (16 * MIB) as usize / LEN;

    let snapshotting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let most_waiters = Arc::new(AtomicUsize::new(0));
    let snap = f.path("vm-1.add-cow");
    let snapper = {
        let (snapshotting, done, snap, control) = (
            Arc::clone(&snapshotting),
            Arc::clone(&done),
            snap.clone(),
            control.clone(),
        );
        std::thread::spawn(move || {
            let mut c = Control::connect(&control);
            std::thread::sleep(std::time::Duration::from_millis(300));
            snapshotting.store(true, Ordering::SeqCst);
            let r = c.call("export-snapshot", json!({"name": "vm", "overlay": snap}));
            snapshotting.store(false, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let sampler = {
        let (done, most) = (Arc::clone(&done), Arc::clone(&most_waiters));
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                most.fetch_max(threads_named(pid, "addcow-vhost-wa"), Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    // Each of the 2 x DEPTH tags has one write in flight at a time, from its own part of the
    // buffer, to slots no other tag writes (slot = tag mod 2 x DEPTH); answered ones are
    // resubmitted at once, so the queues never run dry while the disk switches.
    let tags = 2 * DEPTH;
    let mut count = vec![0u64; tags];
    let submit = |fe: &mut Frontend, model: &mut [u8], count: &mut [u64], k: usize| {
        let slot = (k + tags * count[k] as usize) % slots;
        let data = pattern(count[k] * 1000 + k as u64, LEN);
        fe.buf()[k * LEN..(k + 1) * LEN].copy_from_slice(&data);
        model[slot * LEN..(slot + 1) * LEN].copy_from_slice(&data);
        fe.submit_write(k / DEPTH, (slot * LEN) as u64, k * LEN, LEN, k);
        count[k] += 1;
    };
    for k in 0..tags {
        submit(&mut fe, &mut model, &mut count, k);
    }
    let (mut answered, mut during, mut after) = (0u64, 0u64, 0u64);
    while after < 2000 {
        for q in 0..2 {
            for (tag, ret) in fe.wait(q, 0, 1) {
                assert_eq!(ret, 0, "write {tag} (#{}) failed\n{}", count[tag], d.log());
                answered += 1;
                if snapshotting.load(Ordering::SeqCst) {
                    during += 1;
                }
                if done.load(Ordering::SeqCst) {
                    after += 1;
                }
                if after < 2000 {
                    submit(&mut fe, &mut model, &mut count, tag);
                }
            }
        }
        assert!(answered < 10_000_000, "the snapshot never ended");
    }
    // Drain what is still in flight.
    let mut left = count.iter().sum::<u64>() - answered;
    while left > 0 {
        for q in 0..2 {
            for (tag, ret) in fe.wait(q, 0, 1) {
                assert_eq!(ret, 0, "write {tag} failed\n{}", d.log());
                left -= 1;
            }
        }
    }
    let r = snapper.join().unwrap().expect("export-snapshot");
    assert_eq!(r["overlay"], json!(snap), "{r}");
    sampler.join().unwrap();
    let waiters = most_waiters.load(Ordering::SeqCst);
    eprintln!(
        "{answered} writes answered, {during} during the snapshot; at most {waiters} waiter threads"
    );
    assert!(
        during > 0,
        "no write was answered during the snapshot (timing): the test proved nothing"
    );
    assert!(
        waiters <= 2,
        "{waiters} addcow-vhost-wait threads at once for 2 queues"
    );
    assert_eq!(export_of(&mut c, "vm").unwrap()["overlay"], json!(snap));
    for chunk in 0..16u64 {
        let at = (chunk * MIB) as usize;
        assert!(
            fe.read(0, chunk * MIB, MIB as usize) == model[at..at + MIB as usize],
            "vhost read of MiB {chunk} after the snapshot"
        );
        assert!(
            nbd_read(&d.sock, "vm", chunk * MIB, MIB as usize) == model[at..at + MIB as usize],
            "NBD read of MiB {chunk} after the snapshot"
        );
    }
    drop(fe);
    d.stop();
}

/// `export-del` safe closes the vhost-user-blk socket to new frontends in the same step as it
/// checks that none is connected (a frontend that connects after the check is the one refused,
/// not one being served); when the delete is then refused for another reason (an NBD client),
/// the socket is open again: a frontend connects and is served.
#[test]
fn a_safe_delete_refused_by_an_nbd_client_leaves_the_vhost_socket_open() {
    let f = Fixture::new(16 * MIB);
    let overlay = f.overlay();
    let (d, control) = start(&f);
    let vsock = f.path("vm.vhost");
    let mut c = Control::connect(&control);
    add_vhost(&mut c, "vm", &overlay, &vsock);
    let nbd = RawClient::connect(&d.sock, "vm").expect("nbd connect");
    let e = c
        .call("export-del", json!({"name": "vm"}))
        .expect_err("safe delete with an NBD client connected");
    assert_eq!(e["data"]["class"], "busy", "{e}");
    let mut fe = Frontend::connect(&vsock, 1).expect("a frontend after the refused delete");
    let data = pattern(3, 4096);
    assert_eq!(fe.write(0, 0, &data), 0, "served after the refused delete");
    assert!(fe.read(0, 0, 4096) == data);
    drop(fe);
    nbd.disconnect();
    d.stop();
}
