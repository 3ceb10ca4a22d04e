//! Remote bases over NBD with TLS (`nbds://`, `nbds+unix://`), end to end with real image
//! servers that require it: `nbdkit --tls=require` with x509 certificates or a PSK file, and
//! `qemu-nbd --tls-creds` with QEMU's `tls-creds-x509` (which asks for a client certificate)
//! and `tls-creds-psk`. The overlays are made, inspected and served by the real `addcow`.
//!
//! Every refusal is checked for its reason (a wrong CA, a certificate for another host, a
//! server without TLS, a wrong key), and a control case beside it shows the same setup
//! succeeding, so that the refusal is the check's doing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::image_server::{free_port, ImageServer, Listen};
use addcow_daemon_testkit::tls::{self, X509Creds};
use addcow_daemon_testkit::*;
use rand::{RngCore, SeedableRng};

const SIZE: u64 = 4 << 20;

/// `nbdkit -f LISTEN TLS... file FILE` (`tls`: `--tls=require` and the credentials, or
/// nothing for a server without TLS).
fn nbdkit(listen: Listen, tls: &[String], file: &Path) -> ImageServer {
    let file = file.display().to_string();
    let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
    args.extend(["file", &file]);
    ImageServer::nbdkit(listen, &args)
}

/// `qemu-nbd -r -t` on TCP with `--object OBJECT --tls-creds tls0` (OBJECT's id `tls0`).
fn qemu_nbd(port: u16, object: &str, file: &Path) -> ImageServer {
    ImageServer::qemu_nbd(
        Listen::Tcp(port),
        file,
        &["--object", object, "--tls-creds", "tls0"],
    )
}

/// A temp dir with `base.raw` (random bytes, seeded), x509 credentials (`creds`: a CA, a
/// server certificate for localhost / 127.0.0.1, a client certificate) and a PSK file.
struct Setup {
    dir: tempfile::TempDir,
    creds: X509Creds,
    psk: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut base = vec![0u8; SIZE as usize];
        rand::rngs::StdRng::seed_from_u64(23).fill_bytes(&mut base);
        write_file(&dir.path().join("base.raw"), &base);
        let creds = tls::x509(&dir.path().join("x509"), "ca-good", "client");
        let psk = tls::psk(
            &dir.path().join("psk"),
            &[
                ("alice", "0123456789abcdef0123456789abcdef"),
                ("bob", "fedcba9876543210fedcba9876543210"),
            ],
        );
        Setup { dir, creds, psk }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// nbdkit on a new port requiring TLS with the setup's server certificate.
    fn nbdkit_x509(&self) -> (ImageServer, u16) {
        let port = free_port();
        let tls = [
            "--tls=require".to_string(),
            format!("--tls-certificates={}", self.creds.server_dir.display()),
        ];
        (
            nbdkit(Listen::Tcp(port), &tls, &self.path("base.raw")),
            port,
        )
    }

    /// `addcow create -b BASE NAME.add-cow`, unchecked.
    fn create(&self, name: &str, base: &str) -> std::process::Output {
        let ov = self.path(&format!("{name}.add-cow"));
        addcow(".", &["create", "-b", base, &ov.display().to_string()])
    }

    /// [`Setup::create`] that must succeed; the overlay's path.
    fn create_ok(&self, name: &str, base: &str) -> String {
        let o = self.create(name, base);
        assert!(o.status.success(), "create -b {base}: {}", text(&o));
        self.p(&format!("{name}.add-cow"))
    }

    /// [`Setup::create`] that must fail with `why` in its message.
    fn create_refused(&self, name: &str, base: &str, why: &str) {
        let o = self.create(name, base);
        let t = text(&o);
        assert!(!o.status.success(), "create -b {base} succeeded: {t}");
        assert!(
            t.contains(why),
            "create -b {base}: expected {why:?} in: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }

    /// Serves `overlay` with `addcow serve` and checks every byte reads as the base.
    fn serve_identical(&self, overlay: &str) {
        let d = Daemon::start(&self.path("a.sock"), &[overlay]);
        assert_identical(&self.p("base.raw"), &d.uri());
        let log = d.stop();
        assert!(!log.contains("remote base read failed"), "{log}");
    }
}

/// x509 through nbdkit: `create`, `info` and `map` read the base over TLS, and `addcow serve`
/// serves its bytes exactly.
#[test]
fn an_nbds_base_on_nbdkit_with_certificates_serves_its_bytes() {
    let s = Setup::new();
    let (_server, port) = s.nbdkit_x509();
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        s.creds.client_dir.display()
    );
    let ov = s.create_ok("vm", &uri);
    let info = addcow_ok(".", &["info", &ov]);
    assert!(info.contains(&uri), "{info}");
    assert!(
        info.contains(&format!("base size:      {}", SIZE / 1024 / 1024)),
        "{info}"
    );
    let map = addcow_ok(".", &["map", &ov]);
    assert!(!map.is_empty(), "{map}");
    s.serve_identical(&ov);
}

/// qemu-nbd's `tls-creds-x509` asks for a client certificate (verify-peer defaults to on): the
/// folder's `client-cert.pem` is presented and accepted; a folder with the CA alone gets a
/// refusal that says a client certificate may be wanted.
#[test]
fn an_nbds_base_on_qemu_nbd_presents_the_client_certificate() {
    let s = Setup::new();
    let port = free_port();
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        s.creds.server_dir.display()
    );
    let _server = qemu_nbd(port, &object, &s.path("base.raw"));
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        s.creds.client_dir.display()
    );
    let ov = s.create_ok("vm", &uri);
    s.serve_identical(&ov);
    // The CA alone (the server's folder holds no client certificate).
    let ca_only = s.path("ca-only");
    std::fs::create_dir_all(&ca_only).expect("mkdir");
    std::fs::copy(
        s.creds.ca_dir.join("ca-cert.pem"),
        ca_only.join("ca-cert.pem"),
    )
    .expect("cp");
    s.create_refused(
        "nocert",
        &format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            ca_only.display()
        ),
        "client certificate",
    );
}

/// TLS-PSK with nbdkit and with qemu-nbd: the file's first identity without `tls-username`,
/// the named one with it; a wrong key or an identity the file lacks is refused.
#[test]
fn an_nbds_base_with_a_psk() {
    let s = Setup::new();
    let port = free_port();
    let tls = [
        "--tls=require".to_string(),
        format!("--tls-psk={}", s.psk.display()),
    ];
    let _nbdkit = nbdkit(Listen::Tcp(port), &tls, &s.path("base.raw"));
    let psk = s.psk.display().to_string();
    s.create_ok(
        "first",
        &format!("nbds://127.0.0.1:{port}/?tls-psk-file={psk}"),
    );
    let ov = s.create_ok(
        "bob",
        &format!("nbds://127.0.0.1:{port}/?tls-psk-file={psk}&tls-username=bob"),
    );
    s.serve_identical(&ov);
    // The right identity with another key.
    let wrong = tls::psk(
        &s.path("wrong"),
        &[("alice", "00000000000000000000000000000000")],
    );
    s.create_refused(
        "wrong",
        &format!("nbds://127.0.0.1:{port}/?tls-psk-file={}", wrong.display()),
        "TLS handshake",
    );
    s.create_refused(
        "nobody",
        &format!("nbds://127.0.0.1:{port}/?tls-psk-file={psk}&tls-username=carol"),
        "no key for the identity \"carol\"",
    );

    let qport = free_port();
    let object = format!(
        "tls-creds-psk,id=tls0,endpoint=server,dir={}",
        s.psk.parent().expect("psk folder").display()
    );
    let _qemu = qemu_nbd(qport, &object, &s.path("base.raw"));
    let ov = s.create_ok(
        "qemu",
        &format!("nbds://127.0.0.1:{qport}/?tls-psk-file={psk}&tls-username=alice"),
    );
    s.serve_identical(&ov);
}

/// A PSK URI authenticates the server by the key alone: a server that answers with a
/// certificate handshake instead (TLS 1.3 lets a server ignore the offered key), here one
/// holding only x509 credentials, proves nothing about itself and is refused, however its
/// certificate looks.
#[test]
fn a_psk_base_refuses_a_server_that_answers_with_a_certificate() {
    let s = Setup::new();
    let (_server, port) = s.nbdkit_x509();
    let psk = s.psk.display().to_string();
    s.create_refused(
        "impostor",
        &format!("nbds://localhost:{port}/?tls-psk-file={psk}"),
        "TLS handshake",
    );
    assert!(
        !s.path("impostor.add-cow").exists(),
        "an overlay was made over an unauthenticated base"
    );
}

/// nbds+unix with neither a CA of the operator's own, nor a host name, nor a key would trust
/// any certificate a public CA signed: refused before connecting.
#[test]
fn an_nbds_unix_base_needs_a_ca_a_name_or_a_key() {
    let s = Setup::new();
    s.create_refused(
        "bare",
        &format!("nbds+unix:///?socket={}", s.p("nowhere.sock")),
        "an nbds+unix URI needs tls-certificates=DIR",
    );
}

/// The server's certificate is checked: signed by another CA (or, without
/// `tls-certificates`, by no CA the system trusts) it is refused, and so is a certificate for
/// another host, which `tls-hostname=` naming that host accepts (so the name was the reason).
#[test]
fn a_server_certificate_of_another_ca_or_host_is_refused() {
    let s = Setup::new();
    let (_server, port) = s.nbdkit_x509();
    let other = tls::x509(&s.path("other"), "ca-other", "client");
    s.create_refused(
        "wrongca",
        &format!(
            "nbds://localhost:{port}/?tls-certificates={}",
            other.client_dir.display()
        ),
        "certificate is not trusted",
    );
    s.create_refused(
        "system",
        &format!("nbds://localhost:{port}/"),
        "certificate is not trusted",
    );
    // A server whose certificate names img.example alone.
    let far = tls::x509_for(&s.path("far"), "ca-far", "client", &["img.example"]);
    let port2 = free_port();
    let tls = [
        "--tls=require".to_string(),
        format!("--tls-certificates={}", far.server_dir.display()),
    ];
    let _far = nbdkit(Listen::Tcp(port2), &tls, &s.path("base.raw"));
    let cd = far.client_dir.display();
    s.create_refused(
        "byname",
        &format!("nbds://localhost:{port2}/?tls-certificates={cd}"),
        "hostname mismatch",
    );
    s.create_refused(
        "byip",
        &format!("nbds://127.0.0.1:{port2}/?tls-certificates={cd}"),
        "mismatch",
    );
    s.create_ok(
        "named",
        &format!("nbds://127.0.0.1:{port2}/?tls-certificates={cd}&tls-hostname=img.example"),
    );
}

/// nbds:// to a server without TLS fails with the server's refusal of STARTTLS, and nothing
/// falls back to plain; plain nbd:// to a server that requires TLS says so.
#[test]
fn no_plain_fallback_either_way() {
    let s = Setup::new();
    let port = free_port();
    let _plain = nbdkit(Listen::Tcp(port), &[], &s.path("base.raw"));
    s.create_refused(
        "plain",
        &format!(
            "nbds://localhost:{port}/?tls-certificates={}",
            s.creds.client_dir.display()
        ),
        "the server refused STARTTLS",
    );
    let (_tls, tport) = s.nbdkit_x509();
    s.create_refused(
        "notls",
        &format!("nbd://localhost:{tport}/"),
        "the server requires TLS",
    );
}

/// nbds+unix: the certificate's chain is checked (another CA is refused) but a Unix socket has
/// no host name to check, unless `tls-hostname=` names one.
#[test]
fn an_nbds_unix_base_checks_the_chain_and_a_named_host_only() {
    let s = Setup::new();
    let far = tls::x509_for(&s.path("far"), "ca-far", "client", &["img.example"]);
    let sock = s.path("img.sock");
    let tls = [
        "--tls=require".to_string(),
        format!("--tls-certificates={}", far.server_dir.display()),
    ];
    let _server = nbdkit(Listen::Unix(sock.clone()), &tls, &s.path("base.raw"));
    let uri = |dir: &Path, extra: &str| {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}{extra}",
            sock.display(),
            dir.display()
        )
    };
    let ov = s.create_ok("vm", &uri(&far.client_dir, ""));
    s.serve_identical(&ov);
    s.create_refused(
        "wrongca",
        &uri(&s.creds.client_dir, ""),
        "certificate is not trusted",
    );
    s.create_refused(
        "named",
        &uri(&far.client_dir, "&tls-hostname=localhost"),
        "hostname mismatch",
    );
}

/// The image server killed and started again: the base reconnects with a new TLS handshake
/// and reads go on, every byte right.
#[test]
#[ignore = "heavy: kills and restarts a real TLS image server (scripts/test.sh runs it)"]
fn an_nbds_base_reconnects_over_tls_after_the_server_restarts() {
    let s = Setup::new();
    let (mut server, port) = s.nbdkit_x509();
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        s.creds.client_dir.display()
    );
    let ov = s.create_ok("vm", &uri);
    let d = Daemon::start(&s.path("a.sock"), &["--cores", "2", &ov]);
    d.wait_log("remote base connected");
    assert_identical(&s.p("base.raw"), &d.uri());
    let count = |needle: &str| d.log().matches(needle).count();
    let lost = count("image server unreachable");
    let back = count("image server reconnected");
    server.kill();
    wait_until("the daemon finds the image server gone", || {
        count("image server unreachable") > lost
    });
    server.restart();
    wait_until("the daemon reconnects over TLS", || {
        count("image server reconnected") > back
    });
    assert_identical(&s.p("base.raw"), &d.uri());
    let log = d.stop();
    assert!(!log.contains("remote base read failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// A TLS image server that stops answering reads (nbdkit's delay filter, 30 s a read) under a
/// 2 s base timeout: the read fails with EIO in time and the connection is dropped (the TLS
/// session's reader is woken, not left waiting for the server), and the daemon stops cleanly.
#[test]
fn a_tls_server_that_stops_answering_fails_reads_in_time() {
    let s = Setup::new();
    let port = free_port();
    let _server = ImageServer::nbdkit(
        Listen::Tcp(port),
        &[
            "--tls=require",
            &format!("--tls-certificates={}", s.creds.server_dir.display()),
            "--filter=delay",
            "file",
            &s.p("base.raw"),
            "rdelay=30",
        ],
    );
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        s.creds.client_dir.display()
    );
    let ov = s.create_ok("vm", &uri);
    let d = Daemon::start(&s.path("a.sock"), &["--base-timeout", "2", &ov]);
    d.wait_log("remote base connected");
    let t0 = Instant::now();
    let out = run_raw("qemu-io", &["-f", "raw", "-c", "read 0 4096", &d.uri()]);
    let took = t0.elapsed();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.contains("Input/output error"), "EIO expected:\n{t}");
    assert!(
        took < Duration::from_secs(20),
        "failed after {took:?}: not by the 2 s timeout, but by the server's 30 s delay"
    );
    d.wait_log("did not answer a read in time; dropping the connection");
    let log = d.stop();
    assert!(!log.contains("panicked"), "{log}");
}
