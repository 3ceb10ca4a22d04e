//! `rebase`: point an overlay at another base (or none), as `qemu-img rebase` does.
//!
//! Safe mode (the default): (1) for every clear sector where the old base and the new one read
//! differently, copy the old base's bytes into the raw image; fdatasync the raw image;
//! (2) write a complete new `.add-cow` file next to the old one (`.NAME.rebase-tmp`: the new
//! header, the bitmap with those sectors' bits set, its blocks allocated); fdatasync it;
//! (3) rename it over the old one; fsync the directory.
//!
//! Before (3) is durable the old file is in place, whole: the raw image only gained bytes under
//! clear bits, which nobody reads. After, the new file is in place, whole (it was durable before
//! the rename), and its new bits cover data made durable in (1). A rename replaces the name
//! atomically, so the header is never torn and a path never mixed, whatever the file system
//! does with a 2560-byte write. A leftover temporary file is harmless and removed by the next
//! rebase.
//!
//! Unsafe mode (`-u`): only (2) and (3), with the bitmap unchanged; the guest sees the new base.
//! The old base is not opened at all, so `-u` repairs an overlay whose base moved or vanished.
//!
//! In both modes the new chain is checked before anything is written: a new base whose chain
//! leads back to this overlay's files (a loop) is refused, so a rebase can never make an overlay
//! that no longer opens.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::format::chain::{BaseChain, ChainOpenOptions};
use crate::format::header::check_storable;
use crate::format::paths::{refuse_protocol, storage_path};
use crate::format::{bitmap_len, Header, OpenOptions, Overlay, BITMAP_OFFSET, SECTOR_SIZE};
use crate::lifecycle::fileops::Ops;
use crate::lifecycle::view::View;
use crate::lifecycle::WINDOW;
use crate::sys::{ofd_lock, LockKind};

/// Bytes compared at a time.
const CHUNK: u64 = 1 << 20;

/// What to rebase.
#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The `.add-cow` file.
    pub overlay: PathBuf,
    /// The new base as the user gave it (relative to the working directory); `None`: no base,
    /// the overlay becomes standalone.
    pub new_base: Option<PathBuf>,
    /// Only rewrite the path (`qemu-img rebase -u`): the caller vouches that both bases read the
    /// same, or wants the new base's bytes to show through.
    pub unsafe_: bool,
}

/// What `rebase` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebased {
    /// The base before (resolved), if any.
    pub old_base: Option<PathBuf>,
    /// The stored path of the new base (empty: none).
    pub stored: Vec<u8>,
    /// Bytes copied from the old base into the raw image.
    pub copied: u64,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Rebases the overlay at `opts.overlay` (locked for writing meanwhile, so not while served).
pub fn rebase(opts: &RebaseOptions, ops: &Ops) -> Result<Rebased> {
    ops.about_to_lock();
    let o = Overlay::open(
        &opts.overlay,
        &OpenOptions {
            skip_base: opts.unsafe_,
            ..OpenOptions::default()
        },
    )?;
    // Renaming over a symbolic link would replace the link, not the overlay it names (and
    // relative paths are resolved from the link's folder): refused.
    if std::fs::symlink_metadata(&o.meta_path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "{} is a symbolic link: rebase replaces the overlay file by renaming a new one over \
             it; give the overlay's real path",
            o.meta_path.display()
        ))));
    }
    let opts_overlay = opts.overlay.clone();
    let new_base = opts
        .new_base
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty());
    let stored = match new_base {
        None => Vec::new(),
        Some(b) => {
            refuse_protocol("backing_file", b.as_os_str().as_bytes())?;
            if same_file(b, &o.meta_path) {
                return Err(Error::new(ErrorKind::SameFile {
                    a: "overlay",
                    b: "new base",
                })
                .with_path(b));
            }
            if same_file(b, &o.image_path) {
                return Err(Error::new(ErrorKind::SameFile {
                    a: "raw image",
                    b: "new base",
                })
                .with_path(b));
            }
            // The new chain must open below this overlay: no loop back to its files, not too
            // deep. Unlocked: only its shape is checked here.
            let upper = [
                (&o.meta, o.meta_path.as_path(), "overlay"),
                (&o.image, o.image_path.as_path(), "raw image"),
            ];
            let opts = ChainOpenOptions {
                direct: false,
                no_lock: true,
                ..ChainOpenOptions::default()
            };
            BaseChain::open(b, &upper, opts).map_err(|e| e.with_op("check the new base chain"))?;
            let s = storage_path(&opts_overlay, b)?;
            check_storable("backing_file", s.as_os_str().as_bytes())?;
            s.as_os_str().as_bytes().to_vec()
        }
    };
    let header = Header {
        backing_file: stored.clone(),
        image_file: o.header.image_file.clone(),
        reserved_nonzero: false,
    }
    .encode()?;

    let image = ops.open(&o.image, &o.image_path)?;
    let mut copied = 0u64;
    if !opts.unsafe_ {
        let old = View::open(o.base_path.as_deref(), true)?;
        let new = View::open(new_base, true)?;
        let mut a = vec![0u8; CHUNK as usize];
        let mut b = vec![0u8; CHUNK as usize];
        let sectors = o.sectors();
        let mut s = 0;
        while s < sectors {
            let (set, n) = o.bitmap.run_from(s, CHUNK / SECTOR_SIZE);
            if n == 0 {
                break;
            }
            if !set {
                let at = s * SECTOR_SIZE;
                let len = (n * SECTOR_SIZE) as usize;
                old.read_at(&mut a[..len], at)?;
                new.read_at(&mut b[..len], at)?;
                // Runs of sectors that differ: copy the old bytes, then mark them.
                let mut k = 0;
                while k < n {
                    let differs = |k: u64| {
                        let r = (k * SECTOR_SIZE) as usize..((k + 1) * SECTOR_SIZE) as usize;
                        a[r.clone()] != b[r]
                    };
                    if !differs(k) {
                        k += 1;
                        continue;
                    }
                    let first = k;
                    while k < n && differs(k) {
                        k += 1;
                    }
                    let r = (first * SECTOR_SIZE) as usize..(k * SECTOR_SIZE) as usize;
                    image.write_at(&a[r.clone()], at + r.start as u64, "copy old base")?;
                    copied += r.len() as u64;
                    o.bitmap.set_range(s + first, k - first);
                }
            }
            s += n;
        }
        #[cfg(not(feature = "unsafe-lifecycle-order"))]
        image.sync("fdatasync raw image")?;
    }

    // The new metadata file, complete, next to the old one.
    let dir = match o.meta_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = o.meta_path.file_name().ok_or_else(|| {
        Error::new(ErrorKind::InvalidArgument(format!(
            "{} does not name a file",
            o.meta_path.display()
        )))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".rebase-tmp");
    let tmp = dir.join(tmp_name);
    ops.remove_if_present(&tmp)?;
    let new_meta = ops.create(&tmp)?;
    ofd_lock(new_meta.file(), LockKind::Exclusive).map_err(|e| e.with_path(&tmp))?;
    // The new file takes the old one's owner, group and mode (a daemon running as another user
    // must still open it after root rebased it). Owner first: a chown clears set-id bits.
    if let Ok(m) = o.meta.metadata() {
        if let Err(e) = std::os::unix::fs::fchown(new_meta.file(), Some(m.uid()), Some(m.gid())) {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot give the rebased overlay its old owner");
        }
        let _ = new_meta
            .file()
            .set_permissions(std::fs::Permissions::from_mode(m.permissions().mode()));
    }
    new_meta.write_at(&header, 0, "write header")?;
    let need = bitmap_len(o.virtual_size);
    let mut buf = vec![0u8; WINDOW];
    let mut pos = 0u64;
    while pos < need {
        let n = ((need - pos) as usize).min(WINDOW);
        o.bitmap.copy_bytes(pos, &mut buf[..n]);
        if buf[..n].iter().any(|&x| x != 0) {
            new_meta.write_at(&buf[..n], BITMAP_OFFSET + pos, "write bitmap")?;
        }
        pos += n as u64;
    }
    new_meta.set_len(BITMAP_OFFSET + need, "size bitmap")?;
    new_meta.allocate(BITMAP_OFFSET, need)?;
    #[cfg(not(feature = "unsafe-lifecycle-order"))]
    new_meta.sync("fdatasync new metadata file")?;
    ops.rename(&tmp, &o.meta_path)?;
    ops.sync_dir(&dir)?;
    #[cfg(feature = "unsafe-lifecycle-order")]
    {
        // Deliberately broken for the crash checker: the new file replaces the old one before
        // it (and the data its bits cover) is durable.
        image.sync("fdatasync raw image")?;
        new_meta.sync("fdatasync new metadata file")?;
    }
    drop(new_meta);
    let _keep_old_locked_until_here: &File = &o.meta;
    // Not opened (`-u`): the path as stored, so a URI or a missing file is still named.
    let stored_old = (!o.header.backing_file.is_empty())
        .then(|| PathBuf::from(std::ffi::OsStr::from_bytes(&o.header.backing_file)));
    Ok(Rebased {
        old_base: o.base_path.clone().or(stored_old),
        stored,
        copied,
    })
}
