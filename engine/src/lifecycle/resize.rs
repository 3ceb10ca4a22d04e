//! `resize`: grow or shrink an overlay's virtual size (the raw image's size) offline.
//!
//! Grow: (1) drop any bytes after the old bitmap, clear stray bits past the old end in its last
//! byte, extend the bitmap with clear bits and allocate its blocks; fdatasync the `.add-cow`;
//! (2) extend the raw image; fdatasync it. Until (2) is durable the disk has its old size and a
//! bitmap longer than needed with zeros after it (accepted by `Overlay::open` without a
//! warning); after, the new sectors are clear and read from the base, or as zeros past its end.
//! A grow that fails (out of space for the bitmap's blocks, an I/O error) undoes itself in the
//! same safe order: the raw image back to its old size (durably) first, then the bitmap back to
//! its old length, so a failed grow leaves the overlay as it was, not a half-allocated bitmap.
//!
//! Shrink: (1) clear the bits of every sector past the new end; fdatasync the `.add-cow`;
//! (2) shrink the raw image; fdatasync it; (3) truncate the bitmap to its new length; fdatasync.
//! Clearing first means no crash state has a bit set past the end of the disk (which `open`
//! would report, and which a later grow would turn into reads of zeros from the shrunk raw
//! image instead of the base). Inside the new size nothing changes at any step.

use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::format::overlay::OverlayStamp;
use crate::format::{
    bitmap_len, check_virtual_size, OpenOptions, Overlay, BITMAP_OFFSET, SECTOR_SIZE,
};
use crate::lifecycle::clear_bits_from;
use crate::lifecycle::fileops::{OpFile, Ops};

/// What to resize.
#[derive(Debug, Clone, Default)]
pub struct ResizeOptions {
    /// The `.add-cow` file.
    pub overlay: PathBuf,
    /// The new virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Allow a smaller size (the sectors past it are discarded).
    pub shrink: bool,
}

/// What `resize` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now.
    pub new_size: u64,
    /// The overlay's two files as the resize left them, stamped while it still held their
    /// lock: what a served disk that let go of its locks for the resize expects to find when it
    /// takes them back (`Disk::relock_overlay`).
    pub left: OverlayStamp,
}

/// Resizes the overlay at `opts.overlay` (locked for writing meanwhile, so not while served).
///
/// Refused: a size that is not a multiple of 512, one over [`crate::format::MAX_VIRTUAL_SIZE`]
/// ([`ErrorKind::TooLarge`]), and a smaller size without `shrink`. A refusal changes nothing.
pub fn resize(opts: &ResizeOptions, ops: &Ops) -> Result<Resized> {
    check_new_size(&opts.overlay, opts.size)?;
    resize_from(&opts.overlay, opts.shrink, |_| Ok(opts.size), ops)
}

/// [`resize`] to `new_size(old size)`, where the old size is read under the lock: for a size
/// relative to the current one (`+1G`, `-1G`). Computed from a size read before the lock, a
/// server that grew the overlay (`export-resize`) and stopped in between would make `-1G`
/// shrink past what was asked for.
pub fn resize_from(
    overlay: &Path,
    shrink: bool,
    new_size: impl FnOnce(u64) -> Result<u64>,
    ops: &Ops,
) -> Result<Resized> {
    ops.about_to_lock();
    let o = Overlay::open(overlay, &OpenOptions::default())?;
    let old_size = o.virtual_size;
    let size = new_size(old_size)?;
    check_new_size(overlay, size)?;
    if size < old_size && !shrink {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "shrinking from {old_size} to {size} bytes discards the data past the new end: use --shrink to do it anyway",
        ))));
    }
    let meta = ops.open(&o.meta, &o.meta_path)?;
    let image = ops.open(&o.image, &o.image_path)?;
    if size > old_size {
        grow(&meta, &image, old_size, size)?;
    } else if size < old_size {
        shrink_to(&meta, &image, old_size, size)?;
    }
    let left = OverlayStamp::of_files(&o.meta, &o.image)
        .map_err(|e| Error::io("stat after resize", e).with_path(&o.meta_path))?;
    Ok(Resized {
        old_size,
        new_size: size,
        left,
    })
}

/// Refuses a new size that is not a multiple of 512 or over the limit.
fn check_new_size(overlay: &Path, size: u64) -> Result<()> {
    if size % SECTOR_SIZE != 0 {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "new size {size} is not a multiple of 512"
        ))));
    }
    check_virtual_size(size).map_err(|e| e.with_path(overlay).with_op("resize"))
}

/// Grows an overlay (its `.add-cow` file `meta` and raw image `image`) from `old` to `new`
/// bytes, in the order the module documents.
pub(crate) fn grow(meta: &OpFile, image: &OpFile, old: u64, new: u64) -> Result<()> {
    #[cfg(feature = "unsafe-lifecycle-order")]
    {
        // Deliberately broken for the crash checker: the raw image grows (durably) before the
        // bitmap does, so a crash in between leaves a truncated bitmap.
        image.set_len(new, "grow raw image")?;
        image.sync("fdatasync raw image")?;
    }
    let old_end = BITMAP_OFFSET + bitmap_len(old);
    let new_end = BITMAP_OFFSET + bitmap_len(new);
    // Bytes after the old bitmap are past the end of the disk: drop them, so the extension
    // below reads as zeros, and clear stray bits past the old end in its last byte.
    meta.set_len(old_end, "trim bitmap")?;
    clear_bits_from(meta, old / SECTOR_SIZE, old_end - BITMAP_OFFSET)?;
    meta.set_len(new_end, "extend bitmap")?;
    if let Err(e) = meta
        .allocate(old_end, new_end - old_end)
        .and_then(|()| meta.sync("fdatasync bitmap"))
    {
        // Out of space (or I/O error) before the raw image changed: give the space back.
        trim_bitmap_back(meta, old_end);
        return Err(e);
    }
    #[cfg(not(feature = "unsafe-lifecycle-order"))]
    if let Err(e) = image
        .set_len(new, "grow raw image")
        .and_then(|()| image.sync("fdatasync raw image"))
    {
        // The raw image may have grown without being durable. Put it back to the old size
        // durably first; only then may the bitmap shrink (a bitmap shorter than the raw image
        // is a broken overlay, a longer one is not). If the raw image cannot be put back, the
        // longer bitmap stays.
        if image
            .set_len(old, "restore raw image size")
            .and_then(|()| image.sync("fdatasync raw image"))
            .is_ok()
        {
            trim_bitmap_back(meta, old_end);
        }
        return Err(e);
    }
    Ok(())
}

/// After a failed grow: truncates the `.add-cow` file back to `old_end` (its length before the
/// grow) and syncs it, so a grow that ran out of space leaves no extended, half-allocated bitmap
/// behind. Best effort: the file is a valid overlay either way (a bitmap longer than the disk
/// with zeros after it is accepted), so a failure here is only logged.
fn trim_bitmap_back(meta: &OpFile, old_end: u64) {
    if let Err(e) = meta
        .set_len(old_end, "trim bitmap back")
        .and_then(|()| meta.sync("fdatasync bitmap"))
    {
        tracing::warn!(error = %e, "cannot trim the bitmap back after a failed grow; the overlay stays valid with a longer bitmap");
    }
}

/// Shrinks an overlay from `old` to `new` bytes, in the order the module documents.
fn shrink_to(meta: &OpFile, image: &OpFile, old: u64, new: u64) -> Result<()> {
    let old_end = BITMAP_OFFSET + bitmap_len(old);
    let new_end = BITMAP_OFFSET + bitmap_len(new);
    #[cfg(feature = "unsafe-lifecycle-order")]
    {
        // Deliberately broken for the crash checker: the bitmap is cut (durably) before the
        // raw image shrinks, so a crash in between leaves a truncated bitmap.
        meta.set_len(new_end, "truncate bitmap")?;
        meta.sync("fdatasync bitmap")?;
    }
    clear_bits_from(
        meta,
        new / SECTOR_SIZE,
        old_end.min(file_size(meta)?).saturating_sub(BITMAP_OFFSET),
    )?;
    meta.sync("fdatasync bitmap")?;
    image.set_len(new, "shrink raw image")?;
    image.sync("fdatasync raw image")?;
    meta.set_len(new_end, "truncate bitmap")?;
    meta.sync("fdatasync bitmap")?;
    Ok(())
}

fn file_size(f: &OpFile) -> Result<u64> {
    crate::format::open::file_len(f.file(), f.path(), "stat")
}
