//! Overlay fixtures for the lifecycle tools (resize, rebase, commit): written byte by byte with
//! the reference writer, so the tools are judged against the format, not the library.

use std::path::{Path, PathBuf};

use addcow_engine::lifecycle::View;

use crate::pattern;
use crate::reference::{build_meta, SECTOR};

/// `disk.add-cow` over `disk.raw` in `dir`, over the base file `base` (stored by file name;
/// `None`: no base) of `sectors` sectors: sectors with `set(s)` hold `prealloc_byte` data, every
/// fifth other sector holds stale `stale_byte` garbage under a clear bit, the rest is a hole.
pub fn overlay(dir: &Path, base: Option<&str>, sectors: u64, set: impl Fn(u64) -> bool) -> PathBuf {
    let meta = dir.join("disk.add-cow");
    std::fs::write(
        &meta,
        build_meta(base.unwrap_or(""), "disk.raw", sectors, &set),
    )
    .unwrap();
    let f = std::fs::File::create(dir.join("disk.raw")).unwrap();
    f.set_len(sectors * SECTOR as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for s in 0..sectors {
        let off = s * SECTOR as u64;
        if set(s) {
            f.write_all_at(&pattern::fill(off, SECTOR, pattern::prealloc_byte), off)
                .unwrap();
        } else if s % 5 == 1 {
            f.write_all_at(&pattern::fill(off, SECTOR, pattern::stale_byte), off)
                .unwrap();
        }
    }
    meta
}

/// A raw base of `len` bytes with the `base_byte` pattern shifted by `salt`.
pub fn raw_base(dir: &Path, name: &str, len: usize, salt: u8) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = pattern::fill(0, len, pattern::base_byte)
        .into_iter()
        .map(|b| b.wrapping_add(salt))
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// Every byte the guest sees through the image at `path`.
pub fn guest(path: &Path) -> Vec<u8> {
    View::open(Some(path), false)
        .and_then(|l| l.read_all())
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}
