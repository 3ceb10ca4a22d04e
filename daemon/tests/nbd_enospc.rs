//! ENOSPC: the raw image lives on a 64 MiB ext4 (a loop device) that writes fill up. Clients
//! get ENOSPC (and no other error); the bitmap never points at data that was not written
//! (every acknowledged write reads back, every refused one reads as before, also after a
//! restart); once space is freed the export works again and `addcow check` is clean.
//!
//! Needs root (losetup, mkfs.ext4, mount): `#[ignore]`d, run by `scripts/test.sh`.

use std::path::PathBuf;
use std::process::Command;

use addcow_daemon_testkit::{addcow_bin, run, Daemon, RawClient};

const MIB: u64 = 1 << 20;

/// A 64 MiB ext4 on a loop device, mounted; unmounted and detached when dropped.
struct SmallFs {
    mnt: PathBuf,
    dev: String,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn new() -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let dev = run("losetup", &["-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let fs = SmallFs {
            mnt,
            dev,
            _dir: dir,
        };
        run("mount", &[&fs.dev, fs.mnt.to_str().unwrap()]);
        fs
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn fill(i: u64) -> u8 {
    (i % 250) as u8 + 1
}

/// Reads `[off, off+len)` and checks every byte is `want`.
fn expect(c: &mut RawClient, off: u64, len: u64, want: u8, what: &str) {
    let mut buf = vec![0u8; len as usize];
    assert_eq!(c.read(off, &mut buf).unwrap(), 0, "{what}: read failed");
    if let Some(p) = buf.iter().position(|&b| b != want) {
        panic!(
            "{what}: byte {} reads {:#x}, not {want:#x}",
            off + p as u64,
            buf[p]
        );
    }
}

#[test]
#[ignore = "needs root: loop-mounts a 64 MiB ext4 (run by scripts/test.sh)"]
fn a_full_file_system_gives_enospc_and_loses_nothing() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (losetup, mount)"
    );
    let fs = SmallFs::new();
    let dir = tempfile::tempdir().unwrap();
    // The base (24 MiB of 0xab) lives elsewhere; overlay and raw image (128 MiB virtual, sparse)
    // on the small file system, next to a 16 MiB file that is deleted later.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; 24 * MIB as usize]).unwrap();
    let overlay = fs.mnt.join("vm.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        image: Some(fs.mnt.join("vm.raw")),
        size: Some(128 * MIB),
        force: false,
    })
    .expect("create overlay");
    let filler = fs.mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 16 * MIB as usize]).unwrap();
    let before = |off: u64| if off < 24 * MIB { 0xab } else { 0 };

    let sock = dir.path().join("s.sock");
    let d = Daemon::start(&sock, &[overlay.to_str().unwrap()]);
    let mut c = RawClient::connect(&sock, "").unwrap();
    // 1 MiB writes until the file system is full, then a few more.
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    for i in 0..128 {
        let err = c
            .write(i * MIB, &vec![fill(i); MIB as usize], false)
            .unwrap();
        match err {
            0 if refused.is_empty() => acked.push(i),
            0 => panic!("write {i} succeeded after ENOSPC without space being freed"),
            28 => refused.push(i),
            e => panic!("write {i}: error {e}, expected ENOSPC (28)"),
        }
        if refused.len() >= 4 {
            break;
        }
    }
    assert!(!refused.is_empty(), "the file system never filled up");
    assert!(acked.len() > 8, "only {} writes fit", acked.len());
    // The commit may need space too (the bitmap's blocks of a fresh overlay are not allocated
    // yet): FLUSH answers ENOSPC or succeeds, nothing else.
    let flush = c.flush().unwrap();
    assert!(
        flush == 0 || flush == 28,
        "flush on a full file system: error {flush}"
    );
    // Acknowledged writes read back; refused ones read as before (bits never set for them).
    for &i in &acked {
        expect(
            &mut c,
            i * MIB,
            MIB,
            fill(i),
            &format!("acknowledged write {i}"),
        );
    }
    for &i in &refused {
        expect(
            &mut c,
            i * MIB,
            MIB,
            before(i * MIB),
            &format!("refused write {i}"),
        );
    }
    // Space is freed: the same connection works again, FLUSH commits everything.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(c.flush().unwrap(), 0, "flush once space is free");
    for &i in &refused {
        assert_eq!(
            c.write(i * MIB, &vec![fill(i); MIB as usize], false)
                .unwrap(),
            0
        );
    }
    assert_eq!(c.flush().unwrap(), 0, "flush after rewriting");
    c.disconnect();
    d.stop();

    // After a restart (the committed bitmap): every write there.
    let d = Daemon::start(&sock, &[overlay.to_str().unwrap()]);
    let mut c = RawClient::connect(&sock, "").unwrap();
    for &i in acked.iter().chain(&refused) {
        expect(
            &mut c,
            i * MIB,
            MIB,
            fill(i),
            &format!("after restart: write {i}"),
        );
    }
    let rest = refused.last().unwrap() + 1;
    expect(&mut c, rest * MIB, MIB, before(rest * MIB), "never written");
    c.disconnect();
    d.stop();
    let out = Command::new(addcow_bin())
        .args(["check"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "addcow check after ENOSPC: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[ignore = "needs root: loop-mounts a 64 MiB ext4 (run by scripts/test.sh)"]
fn a_grow_that_runs_out_of_space_leaves_the_overlay_as_it_was() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (losetup, mount)"
    );
    let fs = SmallFs::new();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xab; MIB as usize]).unwrap();
    let overlay = fs.mnt.join("vm.add-cow");
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        image: Some(fs.mnt.join("vm.raw")),
        size: Some(8 * MIB),
        force: false,
    })
    .expect("create overlay");
    let len_before = std::fs::metadata(&overlay).unwrap().len();

    // 1 TiB needs a 256 MiB bitmap, allocated up front: more than the file system holds.
    let out = addcow_daemon_testkit::run_raw(
        addcow_bin().to_str().unwrap(),
        &["resize", overlay.to_str().unwrap(), "1T"],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the grow must fail: {text}");
    assert!(
        text.contains("No space left on device") || text.contains("ENOSPC"),
        "the error names the cause: {text}"
    );
    assert_eq!(
        std::fs::metadata(&overlay).unwrap().len(),
        len_before,
        "the .add-cow file is trimmed back to its length before the failed grow"
    );
    let info = run(
        addcow_bin().to_str().unwrap(),
        &["info", overlay.to_str().unwrap()],
    );
    assert!(info.contains("8 MiB"), "the overlay keeps its size: {info}");
    let check = addcow_daemon_testkit::run_raw(
        addcow_bin().to_str().unwrap(),
        &["check", overlay.to_str().unwrap()],
    );
    assert!(
        check.status.success(),
        "check is clean: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // And the space is really back: a grow that fits still works.
    run(
        addcow_bin().to_str().unwrap(),
        &["resize", overlay.to_str().unwrap(), "1G"],
    );
    let info = run(
        addcow_bin().to_str().unwrap(),
        &["info", overlay.to_str().unwrap()],
    );
    assert!(info.contains("1 GiB"), "{info}");
}
