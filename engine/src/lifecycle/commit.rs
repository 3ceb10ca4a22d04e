//! `commit`: write every sector the overlay holds into its base, then empty the overlay.
//!
//! The overlay is locked for writing before its header and bitmap are read, and stays locked to
//! the end: the bits copied are exactly the bits on disk, and the bits cleared and the sectors
//! punched in (5) and (6) are exactly the ones copied. (Read before the lock, a server that
//! was still stopping could commit more bits after the read; clearing every bit and punching
//! the whole raw image then dropped sectors that were never copied.)
//!
//! Order: (1) lock the base for writing (a whole-file exclusive OFD lock on a raw base; an
//! add-cow base is opened for writing, which locks it the same way): serving share-locks its
//! base, so a base that any running server or QEMU reads is refused, never changed under it;
//! (2) grow the base to the overlay's size if it is smaller (as `qemu-img commit` does; a raw
//! base is extended with zeros, an add-cow base is resized with clear bits); (2b) an add-cow
//! base's enabled dirty bitmaps get the sectors to be copied dirty, durably; (3) copy every set
//! sector into the base at the same offset (an add-cow base: into its raw image, setting its
//! bits afterwards, data durable before bits as serving does); (4) fdatasync the base;
//! (5) clear the overlay's bits of the copied sectors; fdatasync its `.add-cow`; (6) punch the
//! overlay's raw image under the copied sectors; fdatasync it.
//!
//! Until (5) is durable the overlay still reads its own copy of every set sector, and the base
//! changed only under set sectors (and past its old end, which read as zeros and still does),
//! so the overlay reads the same. Once a bit is clear on disk, (4) made the base's copy of that
//! sector durable, so it reads the same again. The punch in (6) frees space no bit refers to.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::bitmap::SparseBitmap;
use crate::error::{Error, ErrorKind, Result};
use crate::format::is_add_cow;
use crate::format::open::file_len;
use crate::format::{bitmap_len, OpenOptions, Overlay, BITMAP_OFFSET, SECTOR_SIZE};
use crate::lifecycle::fileops::{OpFile, Ops};
use crate::lifecycle::resize::grow;
use crate::lifecycle::{clear_runs, WINDOW};
use crate::sys::{ofd_lock, LockKind};

/// Bytes copied at a time.
const COPY_CHUNK: u64 = 1 << 20;

/// What to commit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The `.add-cow` file whose sectors go into its base.
    pub overlay: PathBuf,
}

/// What `commit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The base written into.
    pub base: PathBuf,
    /// Bytes copied (set sectors × 512).
    pub bytes: u64,
    /// The base's size before, when it had to grow to the overlay's size.
    pub base_grown_from: Option<u64>,
}

/// The base being written: a raw file, or an add-cow overlay (its raw image and bitmap).
enum Target {
    Raw(OpFile),
    AddCow {
        overlay: Box<Overlay>,
        meta: OpFile,
        image: OpFile,
    },
}

fn base_locked(e: Error, path: &Path) -> Error {
    if e.kind() == &ErrorKind::Locked {
        Error::new(ErrorKind::Locked)
            .with_path(path)
            .with_op("lock base for writing: it is in use (a served overlay or QEMU reads it)")
    } else {
        e.with_path(path)
    }
}

/// Commits the overlay at `opts.overlay` into its base. Refused: an overlay without a base, an
/// overlay or base held by another process ([`ErrorKind::Locked`]).
pub fn commit(opts: &CommitOptions, ops: &Ops) -> Result<Committed> {
    // Locked before its header and bitmap are read (`Overlay::open` locks first), so the bits
    // loaded are every bit on disk and nobody sets another until we let go: a server that was
    // still stopping when we started either let go before (its last commit's bits are loaded
    // and copied) or still holds the overlay (`Locked`, nothing changed). Its base is not
    // share-locked: we lock it for writing below.
    ops.about_to_lock();
    let top = Overlay::open(
        &opts.overlay,
        &OpenOptions {
            no_base_lock: true,
            ..OpenOptions::default()
        },
    )?;
    let Some(base_path) = top.base_path.clone() else {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "{} has no base: there is nothing to commit into",
            opts.overlay.display()
        ))));
    };
    if crate::format::paths::nbd_uri(&base_path)?.is_some() {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "{}: the base is on an image server (NBD): commit writes its base, and image \
             servers are read-only here",
            base_path.display()
        ))));
    }
    let size = top.virtual_size;

    let probe =
        File::open(&base_path).map_err(|e| Error::io("open base", e).with_path(&base_path))?;
    let mut grown_from = None;
    let target = if is_add_cow(&probe, &base_path)? {
        drop(probe);
        let bo = Overlay::open(&base_path, &OpenOptions::default())
            .map_err(|e| base_locked(e, &base_path))?;
        let meta = ops.open(&bo.meta, &bo.meta_path)?;
        let image = ops.open(&bo.image, &bo.image_path)?;
        if bo.virtual_size < size && bo.base_size.is_some_and(|b| b > bo.virtual_size) {
            // Grown, the base's new clear sectors would read its own base's bytes where the
            // overlay reads zeros today (past the base's end): the guest's disk would change.
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "{} is {} bytes, smaller than the overlay ({size} bytes), and its own base is                  larger ({} bytes): growing it would show that base's bytes where the overlay                  reads zeros; commit refused (rebase the overlay or stream it instead)",
                base_path.display(),
                bo.virtual_size,
                bo.base_size.unwrap_or(0),
            ))));
        }
        if bo.virtual_size < size {
            grown_from = Some(bo.virtual_size);
            grow(&meta, &image, bo.virtual_size, size)?;
        }
        // Bits past the old end are clear after the grow: a fresh in-memory bitmap of the new
        // size starting from the loaded one.
        let overlay = if grown_from.is_some() {
            let reopened = Overlay {
                bitmap: grown_bitmap(&bo.bitmap, size / SECTOR_SIZE),
                virtual_size: size,
                ..bo
            };
            Box::new(reopened)
        } else {
            Box::new(bo)
        };
        Target::AddCow {
            overlay,
            meta,
            image,
        }
    } else {
        drop(probe);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base_path)
            .map_err(|e| Error::io("open base for writing", e).with_path(&base_path))?;
        ofd_lock(&f, LockKind::Exclusive).map_err(|e| base_locked(e, &base_path))?;
        let raw = ops.open(&f, &base_path)?;
        let len = file_len(&f, &base_path, "stat base")?;
        if len < size {
            grown_from = Some(len);
            raw.set_len(size, "grow base")?;
        }
        Target::Raw(raw)
    };

    let top_meta = ops.open(&top.meta, &top.meta_path)?;
    let top_image = ops.open(&top.image, &top.image_path)?;
    let runs = set_runs(&top.bitmap);

    // An add-cow base's own dirty bitmaps: the sectors about to change in it are dirty, durably,
    // before any of them is written (the crash rule of changed-block tracking).
    if let Target::AddCow { overlay, .. } = &target {
        let set = crate::dirty::DirtySet::open(&overlay.meta_path, size, false, None)?;
        let bytes: Vec<(u64, u64)> = runs
            .iter()
            .map(|&(first, count)| (first * SECTOR_SIZE, count * SECTOR_SIZE))
            .collect();
        set.mark_ranges(&bytes)?;
    }

    // (3) copy.
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut bytes = 0u64;
    for &(first, count) in &runs {
        let mut at = first * SECTOR_SIZE;
        let end = (first + count) * SECTOR_SIZE;
        while at < end {
            let n = (end - at).min(COPY_CHUNK) as usize;
            top_image.read_at(&mut buf[..n], at, "read raw image")?;
            match &target {
                Target::Raw(f) => f.write_at(&buf[..n], at, "write base")?,
                Target::AddCow { image, .. } => image.write_at(&buf[..n], at, "write base")?,
            }
            at += n as u64;
            bytes += n as u64;
        }
    }

    #[cfg(feature = "unsafe-lifecycle-order")]
    {
        // Deliberately broken for the crash checker: the overlay forgets its sectors before the
        // base's copy of them is durable.
        clear_runs(&top_meta, &runs, bitmap_len(size))?;
        top_meta.sync("fdatasync overlay bitmap")?;
    }

    // (4) the base durable: data, then (add-cow) its bits.
    match &target {
        Target::Raw(f) => f.sync("fdatasync base")?,
        Target::AddCow {
            overlay,
            meta,
            image,
        } => {
            image.sync("fdatasync base raw image")?;
            set_bits(meta, &overlay.bitmap, &runs)?;
            meta.sync("fdatasync base bitmap")?;
        }
    }

    // (5) clear the bits of what was copied, (6) free those sectors of the raw image. Only what
    // was copied: a bit this commit did not copy (there is none while we hold the lock) keeps
    // its bit and its data.
    #[cfg(not(feature = "unsafe-lifecycle-order"))]
    {
        clear_runs(&top_meta, &runs, bitmap_len(size))?;
        top_meta.sync("fdatasync overlay bitmap")?;
    }
    for (offset, len) in punch_ranges(&runs, size) {
        top_image.punch(offset, len)?;
    }
    if !runs.is_empty() {
        top_image.sync("fdatasync raw image")?;
    }
    Ok(Committed {
        base: base_path,
        bytes,
        base_grown_from: grown_from,
    })
}

/// What (6) punches of a raw image of `size` bytes: each copied run rounded out to
/// [`PUNCH_GRANULE`] (clipped to the size), touching ranges merged, as `(offset, len)`. Rounding
/// out only adds sectors whose bits were clear under the lock (their bytes are read from the
/// base, never from the raw image), and it frees whole file-system blocks around short runs
/// (punching part of a block frees nothing) with one call per granule-sized region rather than
/// one per run of a fragmented overlay.
fn punch_ranges(runs: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(first, count) in runs {
        let start = (first * SECTOR_SIZE) / PUNCH_GRANULE * PUNCH_GRANULE;
        let end = ((first + count) * SECTOR_SIZE)
            .div_ceil(PUNCH_GRANULE)
            .saturating_mul(PUNCH_GRANULE)
            .min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l >= start => *l = end.max(*o + *l) - *o,
            _ if end > start => out.push((start, end - start)),
            _ => {}
        }
    }
    out
}

/// The alignment (6) rounds punched runs out to (see [`punch_ranges`]).
const PUNCH_GRANULE: u64 = 1 << 20;

/// The runs `(first sector, count)` of set bits.
pub(crate) fn set_runs(bitmap: &SparseBitmap) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut s = 0;
    while s < bitmap.sectors() {
        let (set, n) = bitmap.run_from(s, u64::MAX);
        if n == 0 {
            break;
        }
        if set {
            runs.push((s, n));
        }
        s += n;
    }
    runs
}

/// `old` resized to `sectors` bits (the new ones clear).
fn grown_bitmap(old: &SparseBitmap, sectors: u64) -> SparseBitmap {
    let new = SparseBitmap::new(sectors);
    for (first, count) in set_runs(old) {
        new.set_range(first, count);
    }
    new
}

/// Sets the bits of `runs` in `bitmap` and writes every bitmap window they changed to `meta`.
pub(crate) fn set_bits(meta: &OpFile, bitmap: &SparseBitmap, runs: &[(u64, u64)]) -> Result<()> {
    let mut windows: Vec<u64> = Vec::new();
    for &(first, count) in runs {
        if let Some((a, b)) = bitmap.set_range(first, count) {
            let (wa, wb) = (a / WINDOW as u64, b / WINDOW as u64);
            for w in wa..=wb {
                if windows.last() != Some(&w) {
                    windows.push(w);
                }
            }
        }
    }
    windows.sort_unstable();
    windows.dedup();
    let total = bitmap_len(bitmap.sectors() * SECTOR_SIZE);
    let mut buf = vec![0u8; WINDOW];
    for w in windows {
        let start = w * WINDOW as u64;
        let n = ((total - start) as usize).min(WINDOW);
        bitmap.copy_bytes(start, &mut buf[..n]);
        meta.write_at(&buf[..n], BITMAP_OFFSET + start, "write bitmap")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn punch_ranges_round_out_to_the_granule_and_merge() {
        let g = super::PUNCH_GRANULE;
        // A sector, two runs in one granule, a run across a boundary, the clipped end.
        let runs = [(1, 1), (2048, 4), (2050 + 2048, 1), (3 * 2048 + 2047, 2)];
        assert_eq!(
            super::punch_ranges(&runs, 3 * g + 4096),
            vec![(0, 3 * g + 4096)]
        );
        assert_eq!(
            super::punch_ranges(&[(0, 1), (10 * 2048, 1)], 20 * g),
            vec![(0, g), (10 * g, g)]
        );
        assert_eq!(super::punch_ranges(&[], g), vec![]);
    }
}
