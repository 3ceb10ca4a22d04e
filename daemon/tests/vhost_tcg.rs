//! A real guest on the vhost-user-blk export: QEMU (`qemu-system-x86_64 -accel tcg`, no KVM
//! needed) boots a Linux kernel with `-device vhost-user-blk-pci` on `addcow serve
//! --vhost-user-blk`, guest memory shared through `memory-backend-memfd,share=on`. The
//! initramfs (busybox and the kernel's virtio modules, packed by this test) reads the whole
//! disk (`md5sum /dev/vda`), its serial (GET_ID) and size, writes a pattern with `dd
//! conv=fsync` (a FLUSH), prints markers to the serial console and powers off. The test compares
//! the checksum with the overlay's content read over NBD by `qemu-img`, and afterwards reads the
//! pattern over NBD and again from a restarted daemon. The same guest boots a second time on
//! the NBD export through QEMU's NBD client and virtio-blk-pci. The QEMU disk arguments of both
//! are read from docs/INTEGRATION.md (its `(tcg: ...)` blocks), so the page's command lines are
//! the ones booted here.
//!
//! `#[ignore]`: run by `scripts/test.sh` (which installs `qemu-system-x86` and `busybox-static`,
//! fetches a Debian kernel when the host has none, and sets `ADDCOW_TCG=1`). The kernel is
//! `ADDCOW_TCG_KERNEL` (modules from `ADDCOW_TCG_MODULES`, else `../lib/modules/VERSION`
//! beside the kernel's folder) or the newest `/boot/vmlinuz-*`. Without QEMU, busybox or a
//! kernel it prints why and returns, unless `ADDCOW_TCG=1` asks for it to run (then it fails).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use addcow_daemon_testkit::{run, Daemon, Fixture, RawClient};

const MIB: u64 = 1 << 20;
/// The guest writes its pattern here (bytes), 64 KiB of it.
const PATTERN_AT: u64 = 5 * MIB;
const PATTERN_LEN: usize = 64 << 10;
/// Boot, read 16 MiB, write and power off: well under a minute on 2 busy cores under TCG.
const GUEST_DEADLINE: Duration = Duration::from_secs(240);

/// Module load order (each after its dependencies); those the kernel has built in are absent.
const MODULES: &[&str] = &[
    "virtio/virtio_ring.ko",
    "virtio/virtio.ko",
    "virtio/virtio_pci_modern_dev.ko",
    "virtio/virtio_pci_legacy_dev.ko",
    "virtio/virtio_pci.ko",
    "block/virtio_blk.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "ADDCOW-SIZE $(cat /sys/block/vda/size)"
echo "ADDCOW-SERIAL $(cat /sys/block/vda/serial)"
echo "ADDCOW-MD5 $(md5sum /dev/vda)"
dd if=/pattern of=/dev/vda bs=4096 seek=PATTERN_BLOCK conv=fsync,notrunc 2>/dev/null && echo "ADDCOW-WRITTEN"
sync
echo "ADDCOW-DONE"
poweroff -f
"#;

/// One entry of a `newc` cpio archive (what the kernel unpacks as an initramfs).
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let ino = out.len() as u32;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn initramfs(busybox: &Path, modules: &Path, pattern: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in ["bin", "dev", "modules", "proc", "sys"] {
        cpio_entry(&mut out, d, 0o040755, (0, 0), &[]);
    }
    cpio_entry(&mut out, "dev/console", 0o020600, (5, 1), &[]);
    let bb = std::fs::read(busybox).expect("read busybox");
    cpio_entry(&mut out, "bin/busybox", 0o100755, (0, 0), &bb);
    let init = INIT.replace("PATTERN_BLOCK", &(PATTERN_AT / 4096).to_string());
    cpio_entry(&mut out, "init", 0o100755, (0, 0), init.as_bytes());
    cpio_entry(&mut out, "pattern", 0o100644, (0, 0), pattern);
    for (i, m) in MODULES.iter().enumerate() {
        let p = modules.join("kernel/drivers").join(m);
        if let Ok(data) = std::fs::read(&p) {
            let name = format!("modules/{i}-{}", p.file_name().unwrap().to_string_lossy());
            cpio_entry(&mut out, &name, 0o100644, (0, 0), &data);
        }
    }
    cpio_entry(&mut out, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// The kernel and its modules folder, or why there is none.
fn find_kernel() -> Result<(PathBuf, PathBuf), String> {
    let kernel = match std::env::var_os("ADDCOW_TCG_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
                .map_err(|e| format!("no ADDCOW_TCG_KERNEL and /boot: {e}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
                .collect();
            found.sort();
            found
                .pop()
                .ok_or("no ADDCOW_TCG_KERNEL and no /boot/vmlinuz-*")?
        }
    };
    if !kernel.is_file() {
        return Err(format!("kernel {} is not a file", kernel.display()));
    }
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("")
        .to_string();
    let modules = match std::env::var_os("ADDCOW_TCG_MODULES") {
        Some(m) => PathBuf::from(m),
        None => kernel
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"))
            .join("lib/modules")
            .join(&version),
    };
    Ok((kernel, modules))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// Everything the test needs, or why it cannot run here.
fn prerequisites() -> Result<(PathBuf, PathBuf, PathBuf, PathBuf), String> {
    let qemu = which("qemu-system-x86_64")
        .ok_or("qemu-system-x86_64 not found (Debian: qemu-system-x86)")?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("busybox not found (Debian: busybox-static)")?;
    let (kernel, modules) = find_kernel()?;
    Ok((qemu, busybox, kernel, modules))
}

fn pattern() -> Vec<u8> {
    (0..PATTERN_LEN)
        .map(|i| (i as u8).wrapping_mul(13) ^ ((i >> 8) as u8) ^ 0x5a)
        .collect()
}

/// Reads `len` bytes at `offset` of export `name` over NBD.
fn nbd_read(sock: &Path, name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut c = RawClient::connect(sock, name).expect("nbd connect");
    let mut out = vec![0u8; len];
    assert_eq!(c.read(offset, &mut out).unwrap(), 0, "nbd read");
    c.disconnect();
    out
}

/// How the guest reaches the disk: the QEMU arguments of a `(tcg: TAG)` block of
/// docs/INTEGRATION.md, with the page's paths, export name, sizes and queue count replaced by
/// the test's.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    VhostUserBlk,
    Nbd,
}

/// The `-object`/`-numa`/`-chardev`/`-blockdev`/`-device` arguments of the command line under
/// `(tcg: TAG)` in docs/INTEGRATION.md (`-machine` and `-m` are the test's own).
fn documented_args(tag: &str) -> Vec<String> {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/INTEGRATION.md");
    let text = std::fs::read_to_string(&page).expect("docs/INTEGRATION.md");
    let marker = format!("(tcg: {tag}):");
    let at = text
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker} in {}", page.display()));
    let block = text[at..]
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block after the marker");
    let flat = block.replace("\\\n", " ");
    let words: Vec<&str> = flat.split_whitespace().collect();
    let mut out = Vec::new();
    for pair in words.windows(2) {
        if matches!(
            pair[0],
            "-object" | "-numa" | "-chardev" | "-blockdev" | "-device"
        ) {
            out.push(pair[0].to_string());
            out.push(pair[1].to_string());
        }
    }
    assert!(
        out.len() >= 4,
        "{tag}: no QEMU disk arguments found: {block}"
    );
    out
}

#[test]
#[ignore = "boots a guest under QEMU TCG; run by scripts/test.sh (ADDCOW_TCG=1)"]
fn a_tcg_guest_reads_and_writes_the_disk_through_vhost_user_blk_pci() {
    guest_reads_and_writes(Via::VhostUserBlk);
}

/// The same guest on the NBD export, through QEMU's NBD client and virtio-blk-pci.
#[test]
#[ignore = "boots a guest under QEMU TCG; run by scripts/test.sh (ADDCOW_TCG=1)"]
fn a_tcg_guest_reads_and_writes_the_disk_over_nbd() {
    guest_reads_and_writes(Via::Nbd);
}

fn guest_reads_and_writes(via: Via) {
    let required = std::env::var("ADDCOW_TCG").is_ok_and(|v| v == "1");
    let (qemu, busybox, kernel, modules) = match prerequisites() {
        Ok(p) => p,
        Err(why) if !required => {
            eprintln!("SKIPPED vhost_tcg: {why} (set ADDCOW_TCG=1 to make this a failure)");
            return;
        }
        Err(why) => panic!("ADDCOW_TCG=1 but the TCG smoke test cannot run: {why}"),
    };
    let fx = Fixture::new(16 * MIB);
    let (nbd, vsock) = (fx.path("nbd.sock"), fx.path("vhost.sock"));
    let overlay = fx.overlay();
    // The page's export is vm1 over NBD; over vhost-user-blk the default export.
    let name = if via == Via::Nbd { "vm1" } else { "" };
    let vm1 = format!("vm1={}", overlay.display());
    let args: Vec<&str> = match via {
        Via::VhostUserBlk => vec![
            "--cores",
            "1",
            "--vhost-user-blk",
            vsock.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
        Via::Nbd => vec!["--cores", "1", "--export", &vm1],
    };
    let d = Daemon::start(&nbd, &args);
    // Something of the overlay's own in the second half (the first half reads the base).
    let mut c = RawClient::connect(&nbd, name).expect("nbd connect");
    let own: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(11 * MIB, &own, false).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    // The disk's checksum as qemu-img reads it over NBD.
    let before = fx.path("before.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.uri_of(name),
            before.to_str().unwrap(),
        ],
    );
    let want_md5 = run("md5sum", &[before.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let initrd = fx.path("initrd.cpio");
    std::fs::write(&initrd, initramfs(&busybox, &modules, &pattern())).unwrap();
    let started = Instant::now();
    let mut guest = Command::new(&qemu)
        .args(["-accel", "tcg", "-m", "256M", "-smp", "1", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(
            documented_args(match via {
                Via::VhostUserBlk => "vhost-user-blk",
                Via::Nbd => "nbd",
            })
            .iter()
            .map(|a| {
                a.replace("/run/addcow/nbd.sock", nbd.to_str().unwrap())
                    .replace("/run/addcow/vm2.vhost", vsock.to_str().unwrap())
                    .replace("size=1G", "size=256M")
                    .replace("num-queues=2", "num-queues=1")
            }),
        )
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let (tx, rx) = mpsc::channel::<String>();
    let out = guest.stdout.take().unwrap();
    let err = guest.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("[qemu stderr] {l}"));
        }
    });
    let mut console = String::new();
    let deadline = Instant::now() + GUEST_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let l = l.trim_end_matches('\r').to_string();
                console.push_str(&l);
                console.push('\n');
                if l.contains("ADDCOW-DONE") {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = guest.kill();
                panic!(
                    "guest not done within {GUEST_DEADLINE:?}; console:\n{console}\ndaemon:\n{}",
                    d.log()
                );
            }
        }
    }
    // Powers off by itself; bounded.
    let exit_deadline = Instant::now() + Duration::from_secs(60);
    while guest.try_wait().ok().flatten().is_none() && Instant::now() < exit_deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = guest.kill();
    let _ = guest.wait();
    let elapsed = started.elapsed();
    eprintln!("vhost_tcg: guest ran {elapsed:.1?}");
    let marker = |name: &str| -> String {
        console
            .lines()
            .find_map(|l| l.find(name).map(|i| l[i + name.len()..].trim().to_string()))
            .unwrap_or_else(|| {
                panic!(
                    "no {name} on the guest's console:\n{console}\ndaemon:\n{}",
                    d.log()
                )
            })
    };
    assert_eq!(
        marker("ADDCOW-SIZE"),
        (16 * MIB / 512).to_string(),
        "sectors"
    );
    assert_eq!(
        marker("ADDCOW-SERIAL"),
        if via == Via::Nbd { "vm1" } else { "disk" },
        "the serial: -device serial= over NBD, GET_ID (the overlay's stem) over vhost-user-blk"
    );
    let md5 = marker("ADDCOW-MD5");
    assert_eq!(
        md5.split_whitespace().next(),
        Some(want_md5.as_str()),
        "md5sum /dev/vda in the guest vs qemu-img over NBD"
    );
    assert!(console.contains("ADDCOW-WRITTEN"), "dd failed:\n{console}");

    // The guest's write, over NBD, and after a restart (it was flushed by conv=fsync).
    assert!(
        nbd_read(&nbd, name, PATTERN_AT, PATTERN_LEN) == pattern(),
        "the guest's write over NBD"
    );
    assert!(
        nbd_read(&nbd, name, 11 * MIB, MIB as usize) == own,
        "the rest is untouched"
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let again = Daemon::start(&fx.path("nbd2.sock"), &[overlay.to_str().unwrap()]);
    assert!(
        nbd_read(&again.sock, "", PATTERN_AT, PATTERN_LEN) == pattern(),
        "the guest's flushed write after SIGKILL and restart"
    );
    again.stop();
}
