//! The control path's open checks (`host::allow`) on arbitrary path strings and header contents,
//! against real files: never a panic, never a block (no FIFO is opened), and nothing accepted
//! that is not a regular file beneath the allowed folder.
//!
//! Input: `MODE PATH \0 IMAGE_FILE \0 BACKING_FILE \0 REST`. The overlay `vms/fuzz.add-cow` gets
//! a header naming IMAGE_FILE and BACKING_FILE (MODE even), or REST as its raw bytes (MODE odd).
//! PATH is then checked as an overlay path (`vms/PATH`, and PATH itself), opened (non-blocking)
//! and its descriptor checked, and checked as a vhost-user-blk socket path.
#![no_main]

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use addcow_daemon::host::allow::{beneath, AllowError, AllowedDirs};
use addcow_engine::format::{Chain, FileRole, Header, MAX_CHAIN_DEPTH};
use libfuzzer_sys::fuzz_target;

/// `vms/` (allowed): `a.raw`, `sub/b.raw`, a socket `s.sock`, `up` (a symlink to `..`),
/// `out-link` (a symlink to `out/`); `out/` (not allowed): `c.raw`.
struct World {
    _t: tempfile::TempDir,
    vms: PathBuf,
    allowed: AllowedDirs,
    _sock: std::os::unix::net::UnixListener,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        let (vms, out) = (root.join("vms"), root.join("out"));
        std::fs::create_dir_all(vms.join("sub")).unwrap();
        std::fs::create_dir(&out).unwrap();
        for p in [vms.join("a.raw"), vms.join("sub/b.raw"), out.join("c.raw")] {
            std::fs::write(p, vec![0u8; 4096]).unwrap();
        }
        let sock = std::os::unix::net::UnixListener::bind(vms.join("s.sock")).unwrap();
        std::os::unix::fs::symlink("..", vms.join("up")).unwrap();
        std::os::unix::fs::symlink(&out, vms.join("out-link")).unwrap();
        let allowed = AllowedDirs::new(std::slice::from_ref(&vms)).unwrap();
        World {
            _t: t,
            vms,
            allowed,
            _sock: sock,
        }
    })
}

/// Whether `p` resolves to a regular file beneath `vms` (or cannot be resolved at all).
fn resolves_inside_or_not_at_all(vms: &Path, p: &Path) -> bool {
    match std::fs::canonicalize(p) {
        Ok(real) => real.starts_with(vms) && std::fs::metadata(&real).is_ok_and(|m| m.is_file()),
        Err(_) => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(4, |&b| b == 0);
    let path = parts.next().unwrap_or_default();
    let image_file = parts.next().unwrap_or_default();
    let backing_file = parts.next().unwrap_or_default();
    let raw = parts.next().unwrap_or_default();
    let w = world();
    let overlay = w.vms.join("fuzz.add-cow");
    let bytes = if mode % 2 == 0 {
        let h = Header {
            backing_file: backing_file.to_vec(),
            image_file: image_file.to_vec(),
            reserved_nonzero: false,
        };
        match h.encode() {
            Ok(b) => b.to_vec(),
            Err(_) => raw.to_vec(),
        }
    } else {
        raw.to_vec()
    };
    std::fs::write(&overlay, &bytes).unwrap();

    let given = Path::new(std::ffi::OsStr::from_bytes(path));
    for p in [w.vms.join(given), given.to_path_buf()] {
        // Before the open: whatever it accepts names only files inside (or none that resolve).
        if w.allowed.check_before_open(&p).is_ok() {
            assert!(p.is_absolute());
            assert!(resolves_inside_or_not_at_all(&w.vms, &p), "{}", p.display());
            // Safe to walk now: every file the walk opens was accepted above.
            if let Ok(files) = Chain::files_of(&p, MAX_CHAIN_DEPTH, None) {
                for f in files {
                    if !matches!(f.role, FileRole::Remote(_)) {
                        assert!(
                            resolves_inside_or_not_at_all(&w.vms, &f.path),
                            "{} accepted, names {}",
                            p.display(),
                            f.path.display()
                        );
                    }
                }
            }
        }
        // The descriptor check on whatever the path opens (never blocking: O_NONBLOCK).
        if let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
        {
            match w.allowed.check_fd("raw image", &p, file.as_fd()) {
                Ok(()) => {
                    assert!(file.metadata().unwrap().is_file());
                    let real = std::fs::read_link(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&file)
                    ))
                    .unwrap();
                    assert!(real.starts_with(&w.vms), "{}", real.display());
                }
                Err(AllowError::NotRegular { .. }) => {
                    assert!(!file.metadata().unwrap().is_file())
                }
                Err(_) => {}
            }
        }
        // The path decision alone: only plain names beneath the folder.
        if let Some((i, rel)) = beneath(w.allowed.dirs(), &p) {
            assert_eq!(i, 0);
            assert!(rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_))));
        }
        // As a socket to create: bound only at a real path beneath the folder.
        if let Ok(d) = w.allowed.check_socket(&p) {
            assert!(d.path().starts_with(&w.vms), "{}", d.path().display());
            let folder = d.path().parent().unwrap();
            assert_eq!(std::fs::canonicalize(folder).unwrap(), folder);
        }
    }
});
