//! Who may connect to the daemon's sockets: per-socket modes and groups, the `SO_PEERCRED`
//! allow-lists (a refused connection is closed, logged and counted in `query-sockets` and in
//! the metrics), and TCP sockets systemd passes held to the same loopback rule as `--tcp`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use addcow_daemon_testkit::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether the daemon closed a fresh connection to `path` without a word (a refused peer).
fn closed_at_once(path: &std::path::Path) -> bool {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// The NBD socket's allow-list: our uid listed lets nbdinfo in; a list without it (and
/// without our groups) closes the connection at once, logs it and counts it.
#[test]
fn nbd_allow_list_lets_in_listed_uids_only_and_counts_refusals() {
    let f = Fixture::new(4 * MIB);
    let ov = f.overlay();
    let ov = ov.to_str().unwrap();
    let me_s = me().to_string();
    let a = Daemon::start(&f.path("a.sock"), &["--socket-allow-uid", &me_s, ov]);
    let out = run("nbdinfo", &["--size", &a.uri()]);
    assert_eq!(out.trim(), (4 * MIB).to_string());
    a.stop();

    let other = me().wrapping_add(1).to_string();
    let no_gid = nix::unistd::getegid().as_raw().wrapping_add(1).to_string();
    let ctl = f.path("ctl.sock");
    let metrics = f.path("metrics.sock");
    let b = Daemon::start(
        &f.path("b.sock"),
        &[
            "--socket-allow-uid",
            &other,
            "--socket-allow-gid",
            &no_gid,
            "--control",
            ctl.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
            ov,
        ],
    );
    assert!(closed_at_once(&b.sock), "a peer not in the list was served");
    assert!(
        RawClient::connect(&b.sock, "").is_err(),
        "an NBD handshake succeeded for a refused peer"
    );
    b.wait_log("connection refused: peer not in the allow-list");
    let mut c = Control::connect(&ctl);
    wait_until("two refusals counted in query-sockets", || {
        c.ok("query-sockets", json!({}))["nbd"]["refused_connections"] == json!(2)
    });
    assert_eq!(
        c.ok("query-sockets", json!({}))["control"]["refused_connections"],
        json!(0)
    );
    assert_eq!(refused_connections_metric(&metrics, "nbd"), 2);
    b.stop();
}

/// The control socket's own allow-list and mode, independent of the NBD socket's.
#[test]
fn control_allow_list_and_modes_are_per_socket() {
    let f = Fixture::new(4 * MIB);
    let ov = f.overlay();
    let ctl = f.path("ctl.sock");
    let metrics = f.path("metrics.sock");
    let other = me().wrapping_add(1).to_string();
    let gid = nix::unistd::getegid().as_raw().to_string();
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            &gid,
            "--control",
            ctl.to_str().unwrap(),
            "--control-mode",
            "0640",
            "--control-allow-uid",
            &other,
            "--metrics",
            metrics.to_str().unwrap(),
            ov.to_str().unwrap(),
        ],
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.sock), 0o660);
    assert_eq!(mode(&ctl), 0o640);
    // The NBD socket has no list: we get in there.
    assert_eq!(
        run("nbdinfo", &["--size", &d.uri()]).trim(),
        (4 * MIB).to_string()
    );
    assert!(
        closed_at_once(&ctl),
        "a peer not in the control list was served"
    );
    d.wait_log("connection refused: peer not in the allow-list");
    wait_until("the control refusal counted", || {
        refused_connections_metric(&metrics, "control") == 1
    });
    assert_eq!(refused_connections_metric(&metrics, "nbd"), 0);
    d.stop();
}

/// `--vhost-socket-mode` sets the vhost-user-blk socket's bits; `--socket-mode` no longer
/// widens it.
#[test]
fn vhost_socket_has_its_own_mode() {
    let f = Fixture::new(4 * MIB);
    let ov = f.overlay();
    let vhost = f.path("vhost.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--socket-mode",
            "0666",
            "--vhost-user-blk",
            vhost.to_str().unwrap(),
            "--vhost-socket-mode",
            "0640",
            ov.to_str().unwrap(),
        ],
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    wait_until("the vhost socket is published", || vhost.exists());
    assert_eq!(mode(&d.sock), 0o666);
    assert_eq!(mode(&vhost), 0o640);
    d.stop();
}

/// A TCP socket systemd passes is held to the rule of `--tcp`: off loopback the daemon refuses
/// to start unless `--allow-remote`; on loopback it serves.
#[test]
fn systemd_tcp_sockets_off_loopback_need_allow_remote() {
    let f = Fixture::new(4 * MIB);
    let ov = f.overlay();
    let ov = ov.to_str().unwrap();
    let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let (status, err) = exit_of(
        spawn_activated(&any, &[ov]),
        "the daemon kept serving a non-loopback systemd socket without --allow-remote",
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("not a loopback address") && err.contains("--allow-remote"),
        "{err}"
    );

    // --allow-remote alone is not enough without TLS required; with --allow-insecure-remote
    // (which implies --allow-remote) it serves (reached over loopback here).
    let out = spawn_activated(&any, &["--allow-remote", ov])
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--allow-insecure-remote"), "{err}");
    let port = any.local_addr().unwrap().port();
    let d = Daemon::start_activated(&any, Default::default(), &["--allow-insecure-remote", ov]);
    let out = run("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}")]);
    assert_eq!(out.trim(), (4 * MIB).to_string());
    d.stop();

    // A loopback one needs nothing.
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = lo.local_addr().unwrap().port();
    let d = Daemon::start_activated(&lo, Default::default(), &[ov]);
    let out = run("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}")]);
    assert_eq!(out.trim(), (4 * MIB).to_string());
    d.stop();
}
