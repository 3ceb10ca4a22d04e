//! Protocol corners against the real daemon, over raw sockets: oversized options, header options
//! out of order or twice, error strings within the 4096-byte limit, and FAST_ZERO where the
//! raw image cannot punch holes (root: a ramfs).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use addcow_daemon_testkit::{raw, run, Daemon, Fixture, RawClient};

const MIB: u64 = 1 << 20;

const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

/// A client in option haggling.
struct Opts {
    s: UnixStream,
}

impl Opts {
    fn connect(d: &Daemon) -> Opts {
        let mut s = UnixStream::connect(&d.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        raw::greeting(&mut s).unwrap();
        s.write_all(&raw::CLIENT_FLAGS.to_be_bytes()).unwrap();
        Opts { s }
    }

    /// Sends `option` with `data`; returns (type, payload) of each reply up to the final one.
    fn ask(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.s.write_all(&raw::option(option, data)).unwrap();
        raw::option_replies(&mut self.s).expect("option replies up to the final one")
    }
}

#[test]
fn option_corners_against_the_daemon() {
    let fx = Fixture::new(4 * MIB);
    let d = Daemon::start(&fx.path("s.sock"), &[fx.overlay().to_str().unwrap()]);

    // An option over 64 KiB is read and refused with ERR_TOO_BIG; haggling goes on.
    let mut c = Opts::connect(&d);
    let r = c.ask(99, &vec![0u8; 100_000]);
    assert_eq!(r.last().unwrap().0, REP_ERR_TOO_BIG);
    let r = c.ask(7, &raw::go_data(b""));
    assert_eq!(
        r.last().unwrap().0,
        raw::REP_ACK,
        "GO after an oversized option"
    );

    // STRUCTURED_REPLY after EXTENDED_HEADERS, and either one twice.
    let mut c = Opts::connect(&d);
    assert_eq!(c.ask(11, &[]).last().unwrap().0, raw::REP_ACK);
    assert_eq!(c.ask(8, &[]).last().unwrap().0, REP_ERR_EXT_HEADER_REQD);
    assert_eq!(c.ask(11, &[]).last().unwrap().0, REP_ERR_INVALID);
    let mut c = Opts::connect(&d);
    assert_eq!(c.ask(8, &[]).last().unwrap().0, raw::REP_ACK);
    assert_eq!(c.ask(8, &[]).last().unwrap().0, REP_ERR_INVALID);
    assert_eq!(c.ask(7, &raw::go_data(b"")).last().unwrap().0, raw::REP_ACK);

    // Error strings stay within 4096 bytes, whatever the name.
    let mut c = Opts::connect(&d);
    let name = vec![1u8; 4096];
    for option in [6u32, 7] {
        let r = c.ask(option, &raw::go_data(&name));
        let (kind, msg) = r.last().unwrap();
        assert_eq!(*kind, REP_ERR_UNKNOWN);
        assert!(msg.len() <= 4096, "a {}-byte error string", msg.len());
        assert!(std::str::from_utf8(msg).is_ok());
    }
    d.stop();
}

/// Sends WRITE_ZEROES (flags) over a raw connection and returns the reply's error.
fn write_zeroes(sock: &std::path::Path, flags: u16, offset: u64, len: u32) -> u32 {
    let mut c = RawClient::connect(sock, "").unwrap();
    c.write_zeroes(flags, offset, len).unwrap()
}

/// FAST_ZERO must fail fast (ENOTSUP, nothing changed) when the engine would write zeros: here
/// the raw image lives on a ramfs, which cannot punch holes. Plain WRITE_ZEROES still works.
#[test]
#[ignore = "needs root: mounts a ramfs (run by scripts/test.sh)"]
fn fast_zero_fails_fast_where_holes_cannot_be_punched() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (mount)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("ram");
    std::fs::create_dir(&mnt).unwrap();
    run("mount", &["-t", "ramfs", "ramfs", mnt.to_str().unwrap()]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; 4 * MIB as usize]).unwrap();
    let overlay = mnt.join("vm.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        image: Some(mnt.join("vm.raw")),
        size: Some(4 * MIB),
        force: false,
    })
    .expect("create overlay");
    // ramfs has no O_DIRECT either.
    let sock = dir.path().join("s.sock");
    let d = Daemon::start(&sock, &["--cache", "buffered", overlay.to_str().unwrap()]);
    assert_eq!(
        write_zeroes(&sock, raw::FLAG_FAST_ZERO, 0, 64 << 10),
        95,
        "ENOTSUP"
    );
    addcow_daemon_testkit::qemu_io(&d.uri(), &["read -P 0xab 0 64k"]);
    assert_eq!(write_zeroes(&sock, 0, 0, 64 << 10), 0);
    addcow_daemon_testkit::qemu_io(&d.uri(), &["read -P 0 0 64k", "read -P 0xab 64k 4k"]);
    d.stop();
}
