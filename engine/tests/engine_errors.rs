//! Real kernel errors fail the request, never the engine: a file-size limit (`RLIMIT_FSIZE`,
//! with `SIGXFSZ` ignored) makes the kernel answer writes past it with `EFBIG`. The limit is
//! per process, so the test re-runs itself as a child process that sets it.
//!
//! In the child: (1) a write past the limit fails with EFBIG while writes below it and reads
//! keep working; (2) a commit whose bitmap write lands past the limit fails the FLUSH with EFBIG,
//! re-marks its blocks, and the next FLUSH (limit lifted) persists the bits.

use std::process::Command;

use addcow_engine::ExtentKind;
use addcow_engine_testkit::harness::*;

const CHILD_ENV: &str = "ADDCOW_ENGINE_EFBIG_CHILD";

/// Sets the soft `RLIMIT_FSIZE` to `limit` (capped at the hard limit, which is left alone, so
/// no privilege is needed). Lowering the soft limit is always allowed: a failure here is a
/// failure of the test, never a reason to skip it.
fn set_fsize_limit(limit: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut rl) } != 0 {
        panic!(
            "getrlimit(RLIMIT_FSIZE): {}",
            std::io::Error::last_os_error()
        );
    }
    rl.rlim_cur = (limit as libc::rlim_t).min(rl.rlim_max);
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &rl) } != 0 {
        panic!(
            "setrlimit(RLIMIT_FSIZE, {limit}): {}",
            std::io::Error::last_os_error()
        );
    }
}

fn child() {
    // SAFETY: ignoring a signal installs no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // 64 MiB disk: its bitmap is 16 KiB, so the metadata file is 2560 + 16384 bytes.
    let f = fixture(64 << 20, 0);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    // A write whose bit lives in metadata block 4 (file offset 16384..), made before the limit.
    let high = 60u64 << 20;
    d.write_at(high, &[7; 4096], false)
        .expect("write before the limit");
    set_fsize_limit(8192);
    // (1) Past the limit: EFBIG for that request only.
    let err = d
        .write_at(1 << 20, &[1; 4096], false)
        .expect_err("write past RLIMIT_FSIZE");
    assert_eq!(err.errno, libc::EFBIG, "{err}");
    let err = d
        .write_at((1 << 20) + 3, &[1; 10], false)
        .expect_err("RMW write past the limit");
    assert_eq!(err.errno, libc::EFBIG, "{err}");
    assert!(
        d.allocation(1 << 20, 8192)
            .iter()
            .all(|x| x.kind != ExtentKind::Image),
        "failed writes set no bits"
    );
    d.write_at(512, &[2; 1024], false)
        .expect("write below the limit still works");
    assert_eq!(d.read_at(512, 1024).expect("read"), vec![2; 1024]);
    // (2) The commit's bitmap write at offset 16384 is past the limit: the FLUSH fails.
    let err = d
        .flush()
        .expect_err("flush whose bitmap write hits the limit");
    assert_eq!(err.errno, libc::EFBIG, "{err}");
    set_fsize_limit(libc::RLIM_INFINITY);
    d.flush()
        .expect("the next flush retries the re-marked blocks");
    let meta = std::fs::read(&f.overlay).expect("read meta");
    let sector = high / 512;
    assert_eq!(
        meta[2560 + (sector / 8) as usize],
        0xff,
        "bits of the early write persisted"
    );
    d.close().expect("close");
    drop(e);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    assert_eq!(d.read_at(high, 4096).expect("read"), vec![7; 4096]);
    println!("CHILD-OK");
}

#[test]
fn kernel_efbig_fails_the_request_not_the_engine() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args([
            "--exact",
            "kernel_efbig_fails_the_request_not_the_engine",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("CHILD-OK"),
        "child failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// A file that shrinks behind the engine's back (another process truncates the raw image or
/// the base) must give EIO, never zeros the client did not write; the engine keeps serving.
#[test]
fn read_of_a_file_truncated_behind_the_engine_is_eio_not_zeros() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    d.write_at(0, &[9; 8192], false).expect("write");
    d.flush().expect("flush");

    let image_path = addcow_engine::format::Overlay::open(
        &f.overlay,
        &addcow_engine::format::OpenOptions {
            read_only: true,
            no_lock: true,
            ..Default::default()
        },
    )
    .expect("inspect overlay")
    .image_path;
    let image = std::fs::OpenOptions::new()
        .write(true)
        .open(&image_path)
        .expect("open raw image");
    image.set_len(4096).expect("truncate raw image");
    let err = d.read_at(0, 8192).expect_err("read across the truncation");
    assert_eq!(err.errno, libc::EIO, "{err}");

    let base = f.base.clone().expect("fixture has a base");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .and_then(|b| b.set_len(64 << 10))
        .expect("truncate base");
    let err = d
        .read_at(512 << 10, 4096)
        .expect_err("read of clear bits past the truncated base");
    assert_eq!(err.errno, libc::EIO, "{err}");

    // Still serving: the part of the raw image that is left reads back.
    assert_eq!(d.read_at(0, 4096).expect("read"), vec![9; 4096]);
    d.close().expect("close");
}
