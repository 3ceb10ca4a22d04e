//! Offline lifecycle operations on an overlay: [`resize`], [`rebase`] and [`commit`].
//!
//! Each one changes on-disk state in an order that keeps every crash state a valid overlay that
//! reads as an allowed state (the orders are documented on each module and in
//! `docs/LIFECYCLE.md`). All their file changes go through [`fileops`], which the crash checker
//! records and replays; guest-visible bytes of bases are read through [`view`].

pub mod commit;
pub mod fileops;
pub mod rebase;
pub mod resize;
pub mod view;

pub use commit::{commit, CommitOptions, Committed};
pub use fileops::{FileOp, OpLog, Ops};
pub use rebase::{rebase, RebaseOptions, Rebased};
pub use resize::{resize, ResizeOptions, Resized};
pub use view::Layer;

use crate::error::{Error, Result};
use crate::format::overlay::next_data;
use crate::format::BITMAP_OFFSET;
use fileops::OpFile;

/// Bytes of bitmap read and rewritten at a time.
const WINDOW: usize = 64 * 1024;

/// Clears, on disk, the bit of every sector from `from_sector` on within the first `end_byte`
/// bytes of the bitmap in `meta` (reading what is there, so stray bits past the end of the disk
/// are cleared too). Only windows that change are written; holes are skipped. No sync.
pub(crate) fn clear_bits_from(meta: &OpFile, from_sector: u64, end_byte: u64) -> Result<()> {
    let mut pos = from_sector / 8;
    let mut buf = vec![0u8; WINDOW];
    while pos < end_byte {
        let Some(data) = next_data(meta.file(), BITMAP_OFFSET + pos)
            .map_err(|e| Error::io("seek data in bitmap", e).with_path(meta.path()))?
        else {
            break;
        };
        let start = data.saturating_sub(BITMAP_OFFSET).max(pos);
        if start >= end_byte {
            break;
        }
        let n = ((end_byte - start) as usize).min(WINDOW);
        let window = &mut buf[..n];
        meta.read_at(window, BITMAP_OFFSET + start, "read bitmap")?;
        let mut changed = false;
        for (i, b) in window.iter_mut().enumerate() {
            let first_sector = (start + i as u64) * 8;
            let keep = if first_sector + 8 <= from_sector {
                0xff
            } else if first_sector >= from_sector {
                0
            } else {
                (1u8 << (from_sector - first_sector)) - 1
            };
            if *b & !keep != 0 {
                *b &= keep;
                changed = true;
            }
        }
        if changed {
            meta.write_at(window, BITMAP_OFFSET + start, "clear bitmap bits")?;
        }
        pos = start + n as u64;
    }
    Ok(())
}
