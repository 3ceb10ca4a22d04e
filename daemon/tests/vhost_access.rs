//! Who may be served on a vhost-user-blk socket: `--vhost-socket-allow-uid` and
//! `--vhost-socket-allow-gid` (`SO_PEERCRED`), for the command line's socket and for the
//! sockets `export-add` opens. A listed peer is served as usual (libblkio, reconnects too); a
//! peer not listed is disconnected before any request of it is served (a write it posted never
//! reaches the disk, its ring gets no used entry), logged, and counted in `query-sockets` and
//! in `addcow_refused_connections_total{socket="vhost-user-blk"}`.

use std::path::Path;

use ::vhost::VhostBackend;
use addcow_daemon_testkit::vhost::hostile::{Call, Hostile, Memory, DATA, T_OUT};
use addcow_daemon_testkit::vhost::{pattern, Frontend};
use addcow_daemon_testkit::*;
use serde_json::json;
use vm_memory::Bytes;

const MIB: u64 = 1 << 20;

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn my_gid() -> u32 {
    nix::unistd::getegid().as_raw()
}

/// Reads `len` bytes at `offset` of export `name` over NBD.
fn nbd_read(sock: &Path, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut c = RawClient::connect(sock, name).expect("nbd connect");
    let mut out = vec![0u8; len];
    assert_eq!(c.read(offset, &mut out).unwrap(), 0, "nbd read");
    c.disconnect();
    out
}

/// `query-sockets`' count of refused vhost-user-blk connections.
fn vhost_refusals(c: &mut Control) -> u64 {
    c.ok("query-sockets", json!({}))["vhost-user-blk"]["refused_connections"]
        .as_u64()
        .expect("a count")
}

/// libblkio writes, flushes and reads back 64 KiB at 1 MiB; the NBD side sees the write.
fn served(vsock: &Path, nbd: &Path, export: &str, seed: u64) {
    let data = pattern(seed, 64 * 1024);
    let mut f = Frontend::connect(vsock, 1).expect("a listed frontend connects");
    assert_eq!(f.write(0, MIB, &data), 0, "write");
    assert_eq!(f.flush(0), 0, "flush");
    assert!(f.read(0, MIB, data.len()) == data, "read back");
    drop(f);
    assert!(
        nbd_read(nbd, export, MIB, data.len()) == data,
        "seen over NBD"
    );
}

/// The hand-written frontend, not on the list, posts a 4 KiB write of 0x5a at sector 0: the
/// daemon disconnects it and serves nothing of it. Returns once the daemon is done with the
/// connection (`disconnected` is logged after every chain of it was answered).
fn refused(d: &Daemon, vsock: &Path, nbd: &Path, export: &str, ctl: &mut Control, n: u64) {
    let mem = Memory::new(4 * MIB);
    mem.mem
        .write_slice(&[0x5a; 4096], vm_memory::GuestAddress(DATA))
        .expect("fill guest data");
    mem.data_chain(0, T_OUT, 0, DATA, 4096);
    // The daemon may close the connection before the setup is through (then nothing was
    // posted) or after (then the chain is posted and kicked, and must not be served).
    let conn = match Hostile::try_connect(vsock, &mem, Call::EventFd, false) {
        Ok(h) => {
            mem.post(&[0]);
            h.kick();
            Some(h)
        }
        Err(e) => {
            eprintln!("the refused frontend's setup failed at {e}");
            None
        }
    };
    wait_until("the refusal counted in query-sockets", || {
        vhost_refusals(ctl) == n
    });
    d.wait_log("connection refused: peer not in the allow-list");
    if let Some(h) = &conn {
        wait_until("the refused connection closed", || {
            h.fe.get_features().is_err()
        });
    }
    // Logged by the listener once the connection's chains were all answered.
    wait_until("the daemon done with the refused frontend", || {
        d.log()
            .matches("frontend disconnected; waiting for the next")
            .count() as u64
            >= n
    });
    assert_eq!(mem.used_idx(), 0, "a refused frontend's chain was answered");
    assert_eq!(
        mem.status(0),
        0xff,
        "a refused frontend's chain got a status"
    );
    assert!(
        nbd_read(nbd, export, 0, 4096).iter().all(|&b| b == 0xab),
        "a refused frontend's write reached the disk"
    );
    assert!(
        !d.log().contains("vhost-user-blk frontend connected"),
        "a refused frontend was recorded as connected"
    );
}

/// `--vhost-user-blk` with our uid listed: served, and served again after a reconnect (each
/// accepted connection is found anew); nothing refused.
#[test]
fn a_listed_frontend_is_served_and_reconnects() {
    let f = Fixture::new(16 * MIB);
    let (nbd, vsock, ctl) = (f.path("nbd.sock"), f.path("vhost.sock"), f.path("ctl.sock"));
    let me_s = me().to_string();
    let d = Daemon::start(
        &nbd,
        &[
            "--vhost-user-blk",
            vsock.to_str().unwrap(),
            "--vhost-socket-allow-uid",
            &me_s,
            "--control",
            ctl.to_str().unwrap(),
            f.overlay().to_str().unwrap(),
        ],
    );
    wait_until("the vhost socket is published", || vsock.exists());
    served(&vsock, &nbd, "", 1);
    served(&vsock, &nbd, "", 2);
    let mut c = Control::connect(&ctl);
    assert_eq!(vhost_refusals(&mut c), 0);
    let log = d.stop();
    assert!(!log.contains("connection refused"), "{log}");
}

/// `--vhost-user-blk` with a list that holds neither our uid nor our groups: the frontend is
/// disconnected unserved, logged and counted (query-sockets, metrics), twice in a row; the
/// NBD socket (no list) is not affected.
#[test]
fn a_frontend_not_listed_is_disconnected_unserved_and_counted() {
    let f = Fixture::new(16 * MIB);
    let (nbd, vsock, ctl) = (f.path("nbd.sock"), f.path("vhost.sock"), f.path("ctl.sock"));
    let metrics = f.path("metrics.sock");
    let other = me().wrapping_add(1).to_string();
    let no_gid = my_gid().wrapping_add(1).to_string();
    let d = Daemon::start(
        &nbd,
        &[
            "--vhost-user-blk",
            vsock.to_str().unwrap(),
            "--vhost-socket-allow-uid",
            &other,
            "--vhost-socket-allow-gid",
            &no_gid,
            "--control",
            ctl.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
            f.overlay().to_str().unwrap(),
        ],
    );
    wait_until("the vhost socket is published", || vsock.exists());
    let mut c = Control::connect(&ctl);
    refused(&d, &vsock, &nbd, "", &mut c, 1);
    refused(&d, &vsock, &nbd, "", &mut c, 2);
    assert_eq!(refused_connections_metric(&metrics, "vhost-user-blk"), 2);
    assert_eq!(refused_connections_metric(&metrics, "nbd"), 0);
    d.stop();
}

/// `export-add {type: "vhost-user-blk"}` sockets follow the daemon's list: refused when it
/// does not hold us; served when it holds one of our groups.
#[test]
fn export_add_sockets_follow_the_daemons_allow_list() {
    let f = Fixture::new(16 * MIB);
    let other = me().wrapping_add(1).to_string();
    let gid = my_gid().to_string();
    for (allow_gid, listed) in [(None, false), (Some(gid.as_str()), true)] {
        let (nbd, vsock, ctl) = (f.path("nbd.sock"), f.path("vm.vhost"), f.path("ctl.sock"));
        let mut args = vec![
            "--control",
            ctl.to_str().unwrap(),
            "--allow-dir",
            f.dir.path().to_str().unwrap(),
            "--vhost-socket-allow-uid",
            &other,
        ];
        if let Some(g) = allow_gid {
            args.extend(["--vhost-socket-allow-gid", g]);
        }
        let d = Daemon::start(&nbd, &args);
        let mut c = Control::connect(&ctl);
        c.ok(
            "export-add",
            json!({
                "name": "vm",
                "overlay": f.overlay(),
                "type": "vhost-user-blk",
                "addr": {"type": "unix", "path": vsock},
                "num-queues": 1,
            }),
        );
        if listed {
            served(&vsock, &nbd, "vm", 3);
            assert_eq!(vhost_refusals(&mut c), 0);
        } else {
            refused(&d, &vsock, &nbd, "vm", &mut c, 1);
        }
        c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
        drop(c);
        d.stop();
    }
}
