//! A raw image on a device with 4096-byte logical blocks, whose size is not a multiple of 4096:
//! the last O_DIRECT unit is partial, and `O_DIRECT` cannot write it (a 512-byte direct write
//! fails with `EINVAL`, a 4096-byte one would grow the file). Every kind of request on the last
//! sector must still work and leave the file's size alone.
//!
//! The device is a loop device made with `losetup --sector-size 4096` over a sparse file, with
//! ext4 on it. That needs root and the loop driver, so the test is `#[ignore]`d and
//! `scripts/test.sh` runs it explicitly when it can (and says so when it cannot).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{CacheMode, DiskOptions, Engine, EngineConfig, Request};
use addcow_engine_testkit::harness::*;

/// A loop device with 4096-byte sectors over a file, formatted ext4 and mounted; torn down on
/// drop.
struct Loop4k {
    _dir: tempfile::TempDir,
    dev: String,
    mnt: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (needs util-linux/e2fsprogs and root)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Loop4k {
    fn new() -> Loop4k {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("dev.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("backing file");
        let img_s = img.to_str().expect("utf-8 path");
        let dev = run(
            "losetup",
            &["--find", "--show", "--sector-size", "4096", img_s],
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let lo = Loop4k {
            _dir: dir,
            dev: dev.clone(),
            mnt,
        };
        assert_eq!(
            run("blockdev", &["--getss", &dev]),
            "4096",
            "logical sector size"
        );
        run("mkfs.ext4", &["-q", "-F", &dev]);
        run("mount", &[&dev, lo.mnt.to_str().expect("utf-8 path")]);
        lo
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Proves the conditions: on this file system a 512-byte O_DIRECT write is refused.
fn assert_direct_needs_4096(dir: &Path) {
    let p = dir.join("probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    f.set_len(8192).expect("size");
    let buf = IoBufProbe::new();
    use std::os::unix::fs::FileExt;
    let err = f
        .write_at(buf.slice(512), 4096)
        .expect_err("a 512-byte O_DIRECT write on a 4096-byte device");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    drop(f);
    std::fs::remove_file(&p).expect("remove probe");
}

/// A 4096-aligned heap buffer for the probe.
struct IoBufProbe(addcow_engine::IoBuf);

impl IoBufProbe {
    fn new() -> IoBufProbe {
        IoBufProbe(addcow_engine::IoBuf::new_zeroed(4096))
    }
    fn slice(&self, n: usize) -> &[u8] {
        &self.0[..n]
    }
}

/// One request (or two) on the disk, and what it does to the model.
type Step = Box<dyn Fn(&addcow_engine::Disk, &mut Model)>;

#[test]
#[ignore = "needs root and loop devices (losetup --sector-size 4096, mkfs.ext4, mount); run by scripts/test.sh"]
fn every_request_on_the_last_sector_of_a_partial_4096_byte_unit() {
    let lo = Loop4k::new();
    assert_direct_needs_4096(&lo.mnt);
    const SIZE: u64 = 4096 * 16 + 512;
    let base = lo.mnt.join("base.img");
    let bytes: Vec<u8> = (0..SIZE).map(base_byte).collect();
    std::fs::write(&base, &bytes).expect("write base");
    let overlay = lo.mnt.join("disk.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.clone()),
        image: None,
        size: Some(SIZE),
        force: false,
    })
    .expect("create overlay");
    let image = lo.mnt.join("disk.raw");
    let config = EngineConfig {
        cores: 2,
        queue_depth: 64,
        arena_bytes: 8 << 20,
        image_cache: CacheMode::Direct,
        base_cache: CacheMode::Direct,
        commit_delay: None,
        base_timeout: std::time::Duration::from_secs(30),
        fair_share_requests: addcow_engine::DEFAULT_FAIR_SHARE_REQUESTS,
        fair_share_bytes: addcow_engine::DEFAULT_FAIR_SHARE_BYTES,
        #[cfg(feature = "crash-recorder")]
        recorder: None,
        #[cfg(feature = "fault-injection")]
        faults: None,
    };
    let mut model = Model {
        bytes: bytes.clone(),
    };
    const LAST: u64 = SIZE - 512;
    let last = LAST;
    {
        let e = Engine::start(config.clone()).expect("engine");
        let d = e.open(&overlay, DiskOptions::default()).expect("open");
        // Reads of the last sector (from the base), whole and in part.
        assert_eq!(d.read_at(last, 512).expect("read"), &bytes[last as usize..]);
        assert_eq!(
            d.read_at(last + 100, 300).expect("read"),
            &bytes[last as usize + 100..last as usize + 400]
        );
        let steps: Vec<(&str, Step)> = vec![
            (
                "sector-aligned write of the LAST sector",
                Box::new(|d, m| {
                    let p = payload(1, 512);
                    d.write_at(LAST, &p, false).expect("write");
                    m.write(LAST, &p);
                }),
            ),
            (
                "unaligned write inside the LAST sector",
                Box::new(|d, m| {
                    let p = payload(2, 100);
                    d.write_at(LAST + 7, &p, false).expect("write");
                    m.write(LAST + 7, &p);
                }),
            ),
            (
                "write from the LAST full unit into the partial one",
                Box::new(|d, m| {
                    let p = payload(3, 4096 + 300);
                    d.write_at(SIZE - 4096 - 412, &p, false).expect("write");
                    m.write(SIZE - 4096 - 412, &p);
                }),
            ),
            (
                "FUA write of the LAST sector",
                Box::new(|d, m| {
                    let p = payload(4, 512);
                    d.write_at(LAST, &p, true).expect("write");
                    m.write(LAST, &p);
                }),
            ),
            (
                "write zeroes (no holes) inside the LAST sector",
                Box::new(|d, m| {
                    d.request(Request::WriteZeroes {
                        offset: LAST + 10,
                        len: 50,
                        punch: false,
                        fua: false,
                    })
                    .expect("zeroes");
                    m.zero(LAST + 10, 50);
                }),
            ),
            (
                "write zeroes (no holes) of the LAST sector",
                Box::new(|d, m| {
                    d.write_at(LAST, &payload(5, 512), false).expect("write");
                    d.request(Request::WriteZeroes {
                        offset: LAST,
                        len: 512,
                        punch: false,
                        fua: false,
                    })
                    .expect("zeroes");
                    m.zero(LAST, 512);
                }),
            ),
            (
                "write zeroes (holes allowed) across the LAST two units",
                Box::new(|d, m| {
                    d.write_at(SIZE - 5000, &payload(6, 5000), false)
                        .expect("write");
                    d.request(Request::WriteZeroes {
                        offset: SIZE - 4700,
                        len: 4700,
                        punch: true,
                        fua: false,
                    })
                    .expect("zeroes");
                    m.write(SIZE - 5000, &payload(6, 5000));
                    m.zero(SIZE - 4700, 4700);
                }),
            ),
            (
                "trim of the LAST sector",
                Box::new(|d, m| {
                    d.write_at(LAST, &payload(7, 512), false).expect("write");
                    d.request(Request::Trim {
                        offset: LAST,
                        len: 512,
                        fua: true,
                    })
                    .expect("trim");
                    m.zero(LAST, 512);
                }),
            ),
            (
                "unaligned trim ending at the end of the disk",
                Box::new(|d, m| {
                    d.write_at(SIZE - 9000, &payload(8, 9000), false)
                        .expect("write");
                    d.request(Request::Trim {
                        offset: SIZE - 8999,
                        len: 8999,
                        fua: false,
                    })
                    .expect("trim");
                    m.write(SIZE - 9000, &payload(8, 9000));
                    m.zero(SIZE - 8999, 8999);
                }),
            ),
        ];
        for (what, step) in &steps {
            step(&d, &mut model);
            d.flush().unwrap_or_else(|e| panic!("{what}: flush: {e}"));
            model.check(&d);
            let len = std::fs::metadata(&image).expect("stat").len();
            assert_eq!(len, SIZE, "{what}: the raw image changed size");
        }
        d.close().expect("close");
        e.shutdown().expect("shutdown");
    }
    // Everything flushed is there after a reopen.
    let e = Engine::start(config).expect("engine");
    let d = e.open(&overlay, DiskOptions::default()).expect("reopen");
    model.check(&d);
    assert!(d.allocation(last, 512)[0].kind == addcow_engine::ExtentKind::Image);
    d.close().expect("close");
    e.shutdown().expect("shutdown");
}
